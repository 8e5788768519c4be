"""Device discipline on a CPU-only machine: tests/fake_cuda.py simulates cuda:0, and the library runs on it.

1. the checker itself: strict code (a module named grpo_lib.*) that mixes a "GPU" tensor with a CPU one
   raises like CUDA, what CUDA allows passes, third-party code is never blamed;
2. sampling, log-probs, the loss, a trainer step and evaluation run clean with the model on the fake
   cuda:0, and give the same numbers as without it;
3. the harness catches a real GPU-only bug (notebook 03's advantages x completion mask).
"""

from __future__ import annotations

import copy
import gc
import math
import re
import sys
import types

import numpy as np
import pytest
import torch

import grpo_lib.models as models
from grpo_lib.advantages import group_advantages
from grpo_lib.config import GRPOConfig
from grpo_lib.eval import evaluate
from grpo_lib.logprobs import rollout_logps
from grpo_lib.loss import grpo_loss
from grpo_lib.sampling import sample_groups
from grpo_lib.trainer import GRPOTrainer
from tests import fake_cuda
from tests.conftest import add_random_lora, make_tiny_llama
from tests.fake_cuda import MIX_MESSAGE, NUMPY_MESSAGE, SEEN_CPU, FakeCuda

# The same functions compiled twice: as grpo_lib code (strict) and as a third-party library's (lenient).
PROBE_SOURCE = '''
import torch

def add(a, b):
    return a + b

def device_type(t):
    return t.device.type

def is_cuda(t):
    return t.is_cuda

def get_device(t):
    return t.get_device()

def to_numpy(t):
    return t.numpy()

def cpu_numpy(t):
    return t.cpu().numpy()

def one_on_its_device(t):
    return torch.tensor([1.0], device=t.device) + t

def index(t, i):
    return t[i]

def set_index(t, i, v):
    t[i] = v
    return t

def forward(layer, x):
    return layer(x)

def arange_like(t):
    return torch.arange(t.size(0), device=t.device)
'''


def probe(module_name: str) -> types.SimpleNamespace:
    namespace = {"__name__": module_name}
    exec(compile(PROBE_SOURCE, f"<{module_name}>", "exec"), namespace)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if callable(v)})


STRICT = probe("grpo_lib._device_check_probe")
THIRD_PARTY = probe("some_library._device_check_probe")


def mix_error(op: str) -> str:
    return re.escape(MIX_MESSAGE.format(op=op))


@pytest.fixture
def fake():
    with FakeCuda() as mode:
        yield mode


@pytest.fixture
def layer(fake):
    torch.manual_seed(0)
    return fake.place(torch.nn.Linear(3, 2))


@pytest.fixture
def t(fake, layer):
    """A tensor on the fake cuda:0: the output of a placed layer, [2]."""
    out = layer(torch.ones(3).to("cuda"))
    assert fake.on_gpu(out)
    return out.detach()


# ----------------------------------------------------------------------------------------------
# 1. the checker
# ----------------------------------------------------------------------------------------------


def test_strict_code_sees_cuda_other_code_sees_the_cpu(fake, t):
    assert STRICT.device_type(t) == "cuda" and STRICT.is_cuda(t) and STRICT.get_device(t) == 0
    assert t.device.type == "cpu" and not t.is_cuda and t.get_device() == -1  # this module is not strict
    assert t.device is SEEN_CPU and THIRD_PARTY.device_type(t) == "cpu"
    cpu = torch.ones(2)
    assert STRICT.device_type(cpu) == "cpu" and not STRICT.is_cuda(cpu)
    # a device read by third-party code and passed back puts the result on the GPU, as it would there
    assert fake.on_gpu(THIRD_PARTY.arange_like(t)) and not fake.on_gpu(THIRD_PARTY.arange_like(cpu))
    assert fake.on_gpu(STRICT.arange_like(t)) and STRICT.arange_like(t).tolist() == [0, 1]


def test_a_gpu_tensor_and_a_cpu_tensor_in_strict_code_raise(fake, t):
    with pytest.raises(RuntimeError, match=mix_error("add")):
        STRICT.add(t, torch.ones(2))  # (a)
    with pytest.raises(RuntimeError, match=mix_error("add")):
        STRICT.add(torch.ones(2), t)
    with pytest.raises(RuntimeError, match=mix_error("add")):
        STRICT.add(torch.ones(2), t[0])  # a GPU scalar does not go into a CPU op


def test_a_cpu_scalar_may_join_a_gpu_op(fake, t):
    out = STRICT.add(t, torch.tensor(2.0))  # (b) a 0-dim CPU tensor, as CUDA allows
    assert fake.on_gpu(out) and out.tolist() == pytest.approx([v + 2 for v in t.tolist()])


def test_numpy_of_a_gpu_tensor_raises_whoever_calls(fake, t):
    with pytest.raises(TypeError, match=re.escape(NUMPY_MESSAGE)):
        STRICT.to_numpy(t)  # (c)
    with pytest.raises(TypeError, match=re.escape(NUMPY_MESSAGE)):
        np.asarray(t)  # numpy, pandas, matplotlib: __array__
    with pytest.raises(TypeError, match=re.escape(NUMPY_MESSAGE)):
        THIRD_PARTY.to_numpy(t)
    array = STRICT.cpu_numpy(t)  # (d)
    assert isinstance(array, np.ndarray) and array.tolist() == pytest.approx(t.tolist())
    assert fake.on_gpu(t) and not fake.on_gpu(t.cpu()) and fake.on_gpu(t), "cpu() copies; the original stays"


def test_a_tensor_made_on_the_device_of_another_mixes_with_it(fake, t):
    out = STRICT.one_on_its_device(t)  # (e) torch.tensor([1.0], device=t.device) + t
    assert fake.on_gpu(out) and out.tolist() == pytest.approx([v + 1 for v in t.tolist()])


def test_indices_may_stay_on_the_cpu(fake, t):
    out = STRICT.index(t, torch.tensor([1, 0]))  # (f)
    assert fake.on_gpu(out) and out.tolist() == [t[1].item(), t[0].item()]
    target = torch.zeros(3, device="cuda")
    STRICT.set_index(target, torch.tensor([0, 2]), t)  # CPU indices, GPU values
    STRICT.set_index(target, torch.tensor([1]), torch.tensor(5.0))  # a CPU scalar value
    assert fake.on_gpu(target) and target.tolist() == pytest.approx([t[0].item(), 5.0, t[1].item()])
    with pytest.raises(RuntimeError, match=mix_error("__setitem__")):
        STRICT.set_index(target, torch.tensor([0, 2]), torch.ones(2))  # CPU values into a GPU tensor
    with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
        STRICT.index(torch.arange(3), torch.tensor([0], device="cuda"))  # GPU indices into a CPU tensor


def test_third_party_code_is_never_blamed(fake, t, layer):
    out = THIRD_PARTY.add(t, torch.ones(2))  # (g)
    assert fake.on_gpu(out), "the result carries the GPU tag on"
    assert fake.on_gpu(THIRD_PARTY.forward(layer, torch.ones(3)))


def test_a_module_called_from_strict_code_is_checked(fake, layer):
    with pytest.raises(RuntimeError, match=mix_error("linear")):
        STRICT.forward(layer, torch.ones(3))  # the forward runs in torch frames, called from strict code
    out = STRICT.forward(layer, torch.ones(3).to("cuda"))
    assert fake.on_gpu(out) and out.shape == (2,)


def test_transfers_copy_and_move_the_tag(fake, t):
    x = torch.ones(2)
    y = x.to("cuda")
    assert fake.on_gpu(y) and not fake.on_gpu(x)
    y.add_(1)
    assert x.tolist() == [1.0, 1.0], "a transfer copies"
    assert fake.on_gpu(x.cuda()) and not fake.on_gpu(x)
    back = t.to("cpu")
    assert not fake.on_gpu(back) and fake.on_gpu(t) and back is not t
    assert fake.on_gpu(t.to(torch.float64)) and t.to(torch.float64).dtype == torch.float64
    assert fake.on_gpu(x.to(t)) and not fake.on_gpu(t.to(x))  # .to(other) follows other
    assert fake.on_gpu(x.to(t.device)), "the device seen by this (non-strict) module still means the GPU"
    assert fake.on_gpu(torch.zeros(2, device="cuda:0")) and not fake.on_gpu(torch.zeros(2))
    assert not fake.on_gpu(torch.zeros_like(t, device="cpu")) and fake.on_gpu(torch.zeros_like(t))
    assert fake.on_gpu(torch.as_tensor(x, device="cuda")) and not fake.on_gpu(x)
    assert fake.on_gpu(t.new_ones(3)) and fake.on_gpu(t.unbind(0)[0])


def test_autograd_and_module_moves(fake):
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 2)
    module.to("cuda")  # Module.to swaps param.data: the parameters themselves are on the GPU
    assert all(fake.on_gpu(p) for p in module.parameters())
    leaf = torch.ones(2, requires_grad=True)
    (module(leaf.to("cuda")) ** 2).sum().backward()
    assert fake.on_gpu(module.weight.grad) and not fake.on_gpu(leaf.grad)
    assert leaf.grad.abs().sum() > 0, "gradients flow back through a transfer"
    twin = copy.deepcopy(module)  # the reference copy of full fine-tuning (models.frozen_copy)
    assert all(fake.on_gpu(p) for p in twin.parameters())
    assert isinstance(twin.weight, torch.nn.Parameter)


def test_dead_tensors_leave_the_registry(fake):
    before = len(fake._tags)
    tensors = [torch.zeros(4, device="cuda") for _ in range(50)]
    assert len(fake._tags) == before + 50
    del tensors
    gc.collect()
    assert len(fake._tags) == before


def test_custom_strict_prefixes():
    with FakeCuda(strict_prefixes=("some_library",)) as mode:
        t = torch.ones(2, device="cuda")
        with pytest.raises(RuntimeError, match=mix_error("add")):
            THIRD_PARTY.add(t, torch.ones(2))
        out = STRICT.add(t, torch.ones(2))  # grpo_lib is not strict here
        assert mode.on_gpu(out) and out.tolist() == [2.0, 2.0]


def test_install_and_uninstall():
    mode = fake_cuda.install()
    try:
        assert fake_cuda.install() is mode, "installing twice keeps the one mode"
        x = torch.zeros(2, device="cuda")
        assert mode.on_gpu(x) and mode.on_gpu(x + 1)
    finally:
        fake_cuda.uninstall()
    assert not mode.on_gpu(x + 1), "ops are no longer watched"
    assert fake_cuda._installed is None


def test_patch_loaders_places_the_loaded_model(monkeypatch):
    calls = []

    def load_policy(name_or_path="tiny", *, lora_r=16, device=None):
        calls.append(device)
        return torch.nn.Linear(2, 2), "tokenizer"

    def load_policy_from_config(config, device=None):
        return models.load_policy(config, device=device)  # through the module attribute, as in grpo_lib

    monkeypatch.setattr(models, "load_policy", load_policy)
    monkeypatch.setattr(models, "load_policy_from_config", load_policy_from_config)
    user = types.ModuleType("grpo_lib._loader_user")  # did `from grpo_lib.models import load_policy`
    user.load_policy = load_policy
    monkeypatch.setitem(sys.modules, user.__name__, user)
    with FakeCuda() as mode:
        mode.patch_loaders()
        model, tokenizer = models.load_policy_from_config("config")
        assert tokenizer == "tokenizer" and all(mode.on_gpu(p) for p in model.parameters())
        model, _ = user.load_policy("tiny")
        assert all(mode.on_gpu(p) for p in model.parameters())
        model, _ = models.load_policy("tiny", device="cuda")
        assert all(mode.on_gpu(p) for p in model.parameters())
        model, _ = models.load_policy("tiny", device="cpu")  # asked for the CPU: stays there
        assert not any(mode.on_gpu(p) for p in model.parameters())
        assert calls == ["cpu", "cpu", "cpu", "cpu"], "the real loader always loads on the CPU"
    assert models.load_policy is load_policy and user.load_policy is load_policy, "restored on exit"
    assert models.load_policy_from_config is load_policy_from_config


def test_notebook_cell_installs_the_fake_gpu(monkeypatch):
    from pathlib import Path

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "fake_cuda", raising=False)
    source = fake_cuda.notebook_cell(str(Path(__file__).resolve().parent.parent))
    namespace = {"__name__": "__main__"}  # a notebook cell
    exec(compile(source, "<injected cell>", "exec"), namespace)
    injected = namespace["fake_cuda"]
    try:
        mode = injected._installed
        x = torch.zeros(2, device="cuda")
        assert mode.on_gpu(x)
        assert models.load_policy.__fake_cuda_original__ is not None
        with pytest.raises(RuntimeError, match=re.escape("cuda:0 and cpu!")):
            exec("x + torch.ones(2)", {"__name__": "__main__", "x": x, "torch": torch})
    finally:
        injected.uninstall()
    assert not hasattr(models.load_policy, "__fake_cuda_original__"), "uninstall restores the loaders"


# ----------------------------------------------------------------------------------------------
# 2. the library on the fake cuda:0: clean, and the same numbers
# ----------------------------------------------------------------------------------------------

PROMPTS = [{"prompt": f"<|im_start|>user\nSay {w}<|im_end|>\n<|im_start|>assistant\n", "answer": w}
           for w in ("yes", "no", "maybe", "sure")]
PROMPT_TEXTS = [row["prompt"] for row in PROMPTS[:2]]
ROWS = [{"prompt": f"<|im_start|>user\nWhich is larger, {a} or {b}?<|im_end|>\n<|im_start|>assistant\n",
         "answer": str(max(a, b))} for a, b in ((12, 40), (77, 31), (50, 51))]


def has_a_vowel_count(prompts, completions, **kw):
    """A dense toy reward (as in test_trainer): the share of vowels, so groups have variance."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def tiny_config(**kw) -> GRPOConfig:
    base = dict(model="tiny", load_in_4bit=False, lora_r=4, gradient_checkpointing=False, prompts_per_step=2,
                num_generations=4, max_completion_length=6, learning_rate=5e-3, max_steps=1, max_prompt_length=64,
                seed=3)
    return GRPOConfig(**{**base, **kw})


def tiny_policy(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return add_random_lora(model)


def rollout_and_loss(model, tokenizer):
    """What a step computes before the optimiser, with the library's own device handling."""
    torch.manual_seed(0)
    rollout = sample_groups(model, tokenizer, PROMPT_TEXTS, 4, 6, 1.0, 1.0)
    idx = torch.arange(8)
    logps = rollout_logps(model, rollout, idx)
    plain_logps = rollout_logps(model, rollout, idx, share_prompt=False)
    with torch.no_grad(), models.reference_mode(model) as ref:
        ref_logps = rollout_logps(ref, rollout, idx)
    rewards = torch.tensor([has_a_vowel_count(None, [c])[0] for c in rollout.completion_texts]).view(2, 4)
    advantages = group_advantages(rewards)[0].view(-1).to(models.model_device(model))  # as the trainer does
    loss, stats = grpo_loss(logps, None, ref_logps, advantages, rollout.completion_mask)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in models.trainable_parameters(model)])
    return rollout, logps, plain_logps, loss, stats, grads


def test_sampling_logps_and_loss_on_the_fake_gpu(tokenizer):
    expected = rollout_and_loss(tiny_policy(tokenizer), tokenizer)
    with FakeCuda() as fake:
        model = fake.place(tiny_policy(tokenizer))
        rollout, logps, plain_logps, loss, stats, grads = rollout_and_loss(model, tokenizer)
        assert models.model_device(model) == torch.device("cuda", 0), "grpo_lib sees the GPU"
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
            assert fake.on_gpu(getattr(rollout, name)), f"rollout.{name} is on the GPU"
        assert all(fake.on_gpu(x) for x in (logps, plain_logps, loss, grads))
    assert rollout.completion_texts == expected[0].completion_texts
    assert torch.equal(rollout.completion_ids, expected[0].completion_ids)
    assert torch.equal(rollout.completion_mask, expected[0].completion_mask)
    torch.testing.assert_close(logps, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(plain_logps, expected[2], rtol=0, atol=0)
    assert loss.item() == expected[3].item() and stats == expected[4]
    torch.testing.assert_close(grads, expected[5], rtol=0, atol=0)
    assert grads.abs().sum() > 0


def one_trainer_step(tokenizer, settings: dict, fake=None):
    model = tiny_policy(tokenizer)
    if fake is not None:
        fake.place(model)
    trainer = GRPOTrainer(model, tokenizer, [has_a_vowel_count], tiny_config(**settings), PROMPTS)
    record = trainer.step()
    params = torch.cat([p.detach().flatten() for p in models.trainable_parameters(model)])
    return record, params


@pytest.mark.parametrize("settings", [
    {},  # shared-prompt path, one backward per group
    {"num_iterations": 2, "gradient_accumulation_steps": 2, "loss_type": "dapo", "share_prompt_forward": False},
], ids=["default", "mu2-micro-plain"])
def test_a_trainer_step_on_the_fake_gpu(tokenizer, settings):
    expected, expected_params = one_trainer_step(tokenizer, settings)
    with FakeCuda() as fake:
        record, params = one_trainer_step(tokenizer, settings, fake)
        assert fake.on_gpu(params)
    assert record.completions == expected.completions
    assert record.total == expected.total and record.advantages == expected.advantages
    for key in ("loss", "grad_norm", "kl/mean", "ratio/mean"):
        assert record.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-6, abs=1e-9), key
    assert record.token_stats == expected.token_stats
    torch.testing.assert_close(params, expected_params, rtol=1e-6, atol=1e-8)


def test_evaluate_on_the_fake_gpu(tokenizer):
    model = tiny_policy(tokenizer)
    expected = [evaluate(model, tokenizer, ROWS, max_completion_length=5, num_samples=2, greedy=greedy)
                for greedy in (False, True)]
    with FakeCuda() as fake:
        fake.place(model)
        got = [evaluate(model, tokenizer, ROWS, max_completion_length=5, num_samples=2, greedy=greedy)
               for greedy in (False, True)]
    assert nan_as_text(got) == nan_as_text(expected)  # consistency is NaN here (no tags): NaN != NaN
    assert got[0]["samples"] == 6 and got[1]["samples"] == 3
    assert all(math.isnan(g["consistency"]) for g in got)


def nan_as_text(value):
    """A result with each float NaN replaced by the text "nan", so that == compares it."""
    if isinstance(value, dict):
        return {k: nan_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_text(v) for v in value]
    return "nan" if isinstance(value, float) and math.isnan(value) else value


# ----------------------------------------------------------------------------------------------
# 3. a real GPU-only bug, caught on the CPU
# ----------------------------------------------------------------------------------------------

NOTEBOOK_03_CELLS = '''
reward_matrix = total.view(-1, G)  # CPU: reward functions return CPU tensors
advantages, zero_std = group_advantages(reward_matrix)
token_advantages = advantages.view(-1)[:, None] * rollout.completion_mask  # [N, T]
'''
FIXED = NOTEBOOK_03_CELLS.replace("advantages.view(-1)[:, None]",
                                  "advantages.view(-1)[:, None].to(rollout.completion_mask.device)")


def test_notebook_03_advantages_times_mask_is_caught(tokenizer):
    with FakeCuda() as fake:
        model = fake.place(tiny_policy(tokenizer))
        torch.manual_seed(0)
        rollout = sample_groups(model, tokenizer, PROMPT_TEXTS, 4, 6, 1.0, 1.0)
        total = torch.tensor([has_a_vowel_count(None, [c])[0] for c in rollout.completion_texts])

        def cell(source):
            namespace = {"__name__": "__main__", "total": total, "G": 4, "rollout": rollout,
                         "group_advantages": group_advantages}
            exec(compile(source, "<notebook 03>", "exec"), namespace)  # a notebook cell runs as __main__
            return namespace

        with pytest.raises(RuntimeError, match=mix_error("mul")):
            cell(NOTEBOOK_03_CELLS)
        fixed = cell(FIXED)
        token_advantages = fixed["token_advantages"]
        assert fake.on_gpu(token_advantages) and token_advantages.shape == rollout.completion_mask.shape
        with pytest.raises(TypeError, match=re.escape(NUMPY_MESSAGE)):
            cell(FIXED + "token_advantages[0].numpy()")  # the same cell's next line, on a GPU
    expected = fixed["advantages"].view(-1)[:, None] * rollout.completion_mask
    torch.testing.assert_close(token_advantages, expected)
