"""Shared fixtures: a tiny random Llama built in-process (seconds), the embedded tokenizer, and the
embedded model itself for the few slow tests that need real language."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(scope="session")
def tokenizer():
    from grpo_lib.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def add_random_lora(model, r: int = 4, seed: int = 0):
    """LoRA with non-zero B so the adapted policy differs from the reference."""
    from peft import get_peft_model

    from grpo_lib.models import lora_config

    config = lora_config(r=r, alpha=2 * r)
    config.init_lora_weights = False  # random A and B: adapters change the outputs
    torch.manual_seed(seed)
    return get_peft_model(model, config)


@pytest.fixture
def tiny_peft_model(tiny_model):
    return add_random_lora(tiny_model)


@pytest.fixture(scope="session")
def embedded_policy():
    from grpo_lib.models import load_policy

    return load_policy("smollm2-135m", lora_r=8)
