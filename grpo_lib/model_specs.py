"""The architecture catalogue: the shapes of the decoder-only models the memory planner knows.

A ModelSpec is what sizes depend on (vocabulary, widths, layers, heads, tied embeddings, biases). It comes
from the built-in table MODEL_SPECS (each model's config.json on the hub, so planning needs no download),
a transformers config, or a loaded model (model_spec). grpo_lib.memory sizes a training step from it,
grpo_lib.export a merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# the linear layers of one decoder layer: what 4-bit quantises and "all-linear" LoRA adapts
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer with a SwiGLU MLP (Llama, Qwen2, SmolLM2)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2 has biases on q/k/v

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        H, I = self.hidden_size, self.intermediate_size
        return {"q_proj": (H, self.q_dim), "k_proj": (H, self.kv_dim), "v_proj": (H, self.kv_dim),
                "o_proj": (self.q_dim, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linear layers (the ones 4-bit quantisation compresses)."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, untied output head, norms and biases (kept out of 4-bit)."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        bias = self.num_layers * (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return embed + norms + bias

    @property
    def num_params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int, targets: str = "all-linear") -> int:
        """r * (in + out) per adapted linear layer, summed over layers."""
        return self.num_layers * sum(r * (i + o) for n, (i, o) in self.linear_shapes().items()
                                     if n in lora_targets(targets))


def _spec(name, V, H, I, L, nh, nkv, hd, tie, bias=False) -> ModelSpec:
    return ModelSpec(name, V, H, I, L, nh, nkv, hd, tie, bias)


# From each model's config.json on the hub (so planning needs no download).
MODEL_SPECS: dict[str, ModelSpec] = {s.name: s for s in [
    _spec("Qwen2.5-0.5B-Instruct", 151936, 896, 4864, 24, 14, 2, 64, True, True),
    _spec("Qwen2.5-1.5B-Instruct", 151936, 1536, 8960, 28, 12, 2, 128, True, True),
    _spec("Qwen2.5-Coder-1.5B-Instruct", 151936, 1536, 8960, 28, 12, 2, 128, True, True),
    _spec("Qwen2.5-3B-Instruct", 151936, 2048, 11008, 36, 16, 2, 128, True, True),
    _spec("Qwen2.5-7B-Instruct", 152064, 3584, 18944, 28, 28, 4, 128, False, True),
    _spec("SmolLM2-135M-Instruct", 49152, 576, 1536, 30, 9, 3, 64, True),
    _spec("SmolLM2-360M-Instruct", 49152, 960, 2560, 32, 15, 5, 64, True),
    _spec("SmolLM2-1.7B-Instruct", 49152, 2048, 8192, 24, 32, 32, 64, True),
    _spec("Llama-3.2-1B-Instruct", 128256, 2048, 8192, 16, 32, 8, 64, True),
    _spec("Llama-3.2-3B-Instruct", 128256, 3072, 8192, 28, 24, 8, 128, True),
]}


def _key(name: str) -> str:
    """'Qwen/Qwen2.5-1.5B-Instruct' -> 'qwen2.5-1.5b'; 'smollm2-135m' -> 'smollm2-135m'."""
    key = name.rstrip("/").split("/")[-1].lower()
    return key[:-len("-instruct")] if key.endswith("-instruct") else key


def lora_targets(targets: str) -> tuple[str, ...]:
    """The adapted layers of a lora_target_modules setting: "all-linear", or comma-separated names."""
    if targets == "all-linear":
        return LINEAR_NAMES
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def spec_from_config(hf_config, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a transformers config (LlamaConfig, Qwen2Config, ...)."""
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    nh = c.num_attention_heads
    return ModelSpec(
        name=name or getattr(c, "name_or_path", "") or getattr(c, "model_type", "model"),
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=nh, num_kv_heads=getattr(c, "num_key_value_heads", None) or nh,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // nh,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        attention_bias=bool(getattr(c, "attention_bias", getattr(c, "model_type", "") == "qwen2")))


def model_spec(model_or_spec) -> ModelSpec:
    """A ModelSpec from a name (built-in table: hub id, short name or the embedded "smollm2-135m"),
    a local checkpoint folder, a transformers config, or a loaded model (peft-wrapped or not)."""
    if isinstance(model_or_spec, ModelSpec):
        return model_or_spec
    if isinstance(model_or_spec, (str, os.PathLike)):
        name = str(model_or_spec)
        table = {_key(k): s for k, s in MODEL_SPECS.items()}
        if _key(name) in table:
            return table[_key(name)]
        from transformers import AutoConfig

        try:  # a local folder, or a hub id: its config.json (a few kB, before any weights are downloaded)
            return spec_from_config(AutoConfig.from_pretrained(name), name)
        except (OSError, ValueError) as e:
            from .config import ConfigError  # the config's model names no model: the user's to fix

            raise ConfigError(f"no architecture known for model {name!r}: it is not built in ({sorted(MODEL_SPECS)}) "
                             f"and its config.json could not be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    if hasattr(model_or_spec, "num_hidden_layers") or hasattr(model_or_spec, "get_text_config"):
        return spec_from_config(model_or_spec)
    if hasattr(model_or_spec, "config"):
        return spec_from_config(model_or_spec.config)
    raise TypeError(f"model_or_spec: expected a model name, a transformers config or a model, "
                    f"got {type(model_or_spec).__name__}")

