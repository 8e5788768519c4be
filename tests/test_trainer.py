"""The training loop on a tiny random model: records, mu > 1, micro-batches, checkpoints and resume,
failures that apply nothing and lose nothing."""

import copy
import json
import math

import pytest
import torch

from grpo_lib import checkpoint, runlog
from grpo_lib.advantages import group_advantages
from grpo_lib.config import GRPOConfig
from grpo_lib.logprobs import rollout_logps
from grpo_lib.runlog import RunDirError
from grpo_lib.sampling import sample_groups
from grpo_lib.trainer import GRPOTrainer, StepOOMError
from tests.conftest import add_random_lora, make_tiny_llama

PROMPTS = [{"prompt": f"<|im_start|>user\nSay {w}<|im_end|>\n<|im_start|>assistant\n", "answer": w}
           for w in ("yes", "no", "maybe", "sure", "ok", "fine")]


def has_a_vowel_count(prompts, completions, **kw):
    """A dense toy reward: the share of vowels, so groups have variance."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def tiny_config(**kw):
    base = dict(model="tiny", load_in_4bit=False, lora_r=4, gradient_checkpointing=False, prompts_per_step=2,
                num_generations=4, max_completion_length=6, learning_rate=5e-3, max_steps=4, save_steps=2,
                reward_funcs=("format",), max_prompt_length=64, seed=3)
    return GRPOConfig(**{**base, **kw})


def make_trainer(tokenizer, run_dir=None, lora_seed=0, **kw):
    model = make_tiny_llama(len(tokenizer))  # the same "pretrained" base every time
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model = add_random_lora(model, seed=lora_seed)
    return GRPOTrainer(model, tokenizer, [has_a_vowel_count], tiny_config(**kw), PROMPTS, run_dir=run_dir)


def test_step_record_is_consistent(tokenizer):
    trainer = make_trainer(tokenizer)
    rec = trainer.step()
    N, G = 8, 4
    assert rec.step == 1 and len(rec.completions) == N and rec.num_groups == 2
    assert rec.reward_names == ["has_a_vowel_count"]
    totals = torch.tensor(rec.total)
    assert totals.tolist() == pytest.approx([r[0] for r in rec.rewards])
    adv, zero = group_advantages(totals.reshape(2, G))
    assert rec.advantages == pytest.approx(adv.reshape(-1).tolist(), abs=1e-6)
    assert rec.metrics["adv/zero_std_frac"] == zero.float().mean().item()
    assert [len(t) for t in rec.tokens] == rec.lengths == [len(x) for x in rec.token_stats["logp"]]
    assert all(v >= 0 for row in rec.token_stats["kl"] for v in row)  # k3 >= 0
    assert rec.metrics["kl/mean"] >= 0 and rec.metrics["grad_norm"] > 0
    json.dumps(rec.to_dict())  # serialisable as strict JSON


# ----------------------------------------------------------------------------------------------
# seeding: when training starts, never when a trainer is built
# ----------------------------------------------------------------------------------------------


def global_draws() -> tuple:
    """One draw from each global stream seed_everything seeds: (python, numpy, torch)."""
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(1).item()


def seed_globals(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_building_a_trainer_leaves_the_global_random_streams_alone(tokenizer):
    model = add_random_lora(make_tiny_llama(len(tokenizer)))  # the model's own initialisation draws first
    seed_globals(123)
    GRPOTrainer(model, tokenizer, [has_a_vowel_count], tiny_config(), PROMPTS)
    after_trainer = global_draws()
    seed_globals(123)
    assert after_trainer == global_draws()


def test_the_first_step_seeds_whatever_was_drawn_before_it(tokenizer):
    """Two trainers of one config; before their first step the global streams are left in different states
    (different seeds, different amounts drawn): the first steps sample and score the same completions."""
    records = []
    for seed, draws in ((0, 0), (1, 57)):
        trainer = make_trainer(tokenizer)
        seed_globals(seed)
        for _ in range(draws):
            global_draws()
        records.append(trainer.step())
    first, second = records
    assert first.completion_ids == second.completion_ids and first.completions == second.completions
    assert first.rewards == second.rewards and first.advantages == second.advantages


def test_seed_seeds_every_stream_with_the_configs_seed(tokenizer):
    trainer = make_trainer(tokenizer, seed=11)
    torch.manual_seed(0)
    trainer.seed()
    seeded = global_draws()
    seed_globals(11)
    assert seeded == global_draws()


def test_an_explicit_seed_is_not_repeated_by_the_first_step(tokenizer):
    """trainer.seed() starts the streams; the first step then continues from wherever the caller left them, so
    what is drawn in between shifts the step (here: 5 torch draws, against a step right after seed())."""
    plain = make_trainer(tokenizer)
    plain.seed()
    expected = plain.step()
    shifted = make_trainer(tokenizer)
    shifted.seed()
    torch.rand(5)
    assert shifted.step().completion_ids != expected.completion_ids
    again = make_trainer(tokenizer)
    torch.manual_seed(77)
    assert again.step().completion_ids == expected.completion_ids  # seed() then step() = a step that seeds itself


def test_resume_from_a_step_0_checkpoint_keeps_its_random_state(tokenizer, tmp_path):
    """A checkpoint written before the first step holds the RNG state of that moment; resuming it must continue
    from that state, not seed again at the first step."""
    original = make_trainer(tokenizer, run_dir=tmp_path)
    original.seed()
    torch.rand(7)  # a state that seeding would not give
    original.save_checkpoint()
    expected = original.step()
    assert expected.completion_ids != make_trainer(tokenizer).step().completion_ids, "the shift shows in the step"
    resumed = make_trainer(tokenizer, run_dir=tmp_path, lora_seed=99)
    assert resumed.resume() == 0
    record = resumed.step()
    assert record.completion_ids == expected.completion_ids and record.total == expected.total


def step_capturing_rollout(trainer):
    """trainer.step(), and the Rollout it sampled: (StepRecord, Rollout)."""
    import grpo_lib.trainer as tr

    captured = {}
    original = tr.sample_groups

    def spy(*a, **k):
        captured["rollout"] = original(*a, **k)
        return captured["rollout"]

    tr.sample_groups = spy
    try:
        return trainer.step(), captured["rollout"]
    finally:
        tr.sample_groups = original


def test_one_step_raises_probability_of_high_advantage_completions(tokenizer):
    trainer = make_trainer(tokenizer, beta=0.0, learning_rate=1e-4)
    rec, rollout = step_capturing_rollout(trainer)
    # the same completions scored before (recorded logps) and after the update
    before = torch.tensor([sum(x) for x in rec.token_stats["logp"]])
    with torch.no_grad():
        after = (rollout_logps(trainer.model, rollout, torch.arange(8)) * rollout.completion_mask).sum(1)
    adv = torch.tensor(rec.advantages)
    assert not torch.allclose(after, before)
    # the surrogate the step ascends, J = mean_i A_i * mean_t logp_it, went up
    lengths = torch.tensor(rec.lengths, dtype=torch.float32)
    assert (adv * after / lengths).mean() > (adv * before / lengths).mean()


def test_microbatches_give_the_same_update(tokenizer):
    params = []
    for ga in (1, 2, 4):
        trainer = make_trainer(tokenizer, gradient_accumulation_steps=ga, loss_type="dapo")
        trainer.step()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(params[2], params[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type,ga", [("grpo", 1), ("bnpo", 1), ("dr_grpo", 1), ("dapo", 1), ("bnpo", 2),
                                          ("cispo", 2)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_backward_per_group_gives_the_loss_and_gradients_of_one_backward(tokenizer, loss_type, ga, k):
    """The shared-prompt path calls backward once per k groups (groups_per_backward); the plain path once per
    micro-batch. Same rollout, same initial weights: the summed loss and the accumulated gradients must agree."""
    cfg = dict(prompts_per_step=4, gradient_accumulation_steps=ga, loss_type=loss_type, groups_per_backward=k,
               max_grad_norm=0.0, seed=5, epsilon_high=5.0 if loss_type == "cispo" else None)
    first = make_trainer(tokenizer, **cfg)
    rows = first.next_rows()
    rollout = sample_groups(first.model, tokenizer, [r["prompt"] for r in rows], 4, 6, 1.0, 1.0)
    advantages = torch.linspace(-1.5, 1.5, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    results = {}
    for share in (True, False):
        trainer = make_trainer(tokenizer, share_prompt_forward=share, **cfg)
        micro = trainer._microbatches(16)
        parts = [p.tolist() for idx in micro for p in trainer._backward_parts(rollout, idx)]
        # shared path: k groups a part (4 rows each, in order, within a micro-batch); plain path: the micro-batch
        groups_of = [sorted({i // 4 for i in idx.tolist()}) for idx in micro]
        assert parts == ([[r for g in gs[j:j + k] for r in range(g * 4, g * 4 + 4)] for gs in groups_of
                          for j in range(0, len(gs), k)] if share else [idx.tolist() for idx in micro])
        totals, _ = trainer._update(rollout, advantages)  # the step leaves the gradients in .grad
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])
        results[share] = (totals["loss"], grads)
    # CISPO's loss holds the log-probs themselves (~ -10 each, under advantages of both signs): a looser abs
    tolerance = 1e-6 if loss_type == "cispo" else 1e-7
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5, abs=tolerance)
    assert results[True][1].abs().max() > 0
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)


def test_mu_two_uses_stored_old_logps(tokenizer):
    trainer = make_trainer(tokenizer, num_iterations=2, learning_rate=5e-2, epsilon=0.01)
    rec = trainer.step()
    ratios = [v for row in rec.token_stats["ratio"] for v in row]
    assert any(abs(v - 1) > 1e-3 for v in ratios)  # 2nd update sees a policy that moved away from old
    assert rec.metrics["clip/region"] > 0  # with epsilon=0.01, the second iteration clips


# ----------------------------------------------------------------------------------------------
# a step that fails applies nothing: the next step is the one an uninterrupted run takes
# ----------------------------------------------------------------------------------------------

INIT_SCALE = 2.0 ** 16  # torch.amp.GradScaler's default init_scale; backoff_factor 0.5


def fail_once(monkeypatch, owner, name, when):
    """Replace owner.name by a version that raises a (simulated) CUDA out-of-memory error the first time
    when() holds, and calls the original otherwise. Returns the list that records the failure."""
    original = getattr(owner, name)
    fired = []

    def flaky(*a, **k):
        if not fired and when():
            fired.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*a, **k)

    monkeypatch.setattr(owner, name, flaky)
    return fired


def training_state(trainer) -> dict:
    """Everything a step may change, as plain copies: data position, loss scale, step counts, trainable weights,
    AdamW's state and the schedule."""
    from grpo_lib.models import trainable_parameters

    return {"data_position": trainer.data_position, "scale": trainer.scaler.get_scale(),
            "growth": trainer.scaler.state_dict().get("_growth_tracker"), "step_count": trainer.step_count,
            "params": [p.detach().clone() for p in trainable_parameters(trainer.model)],
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "scheduler": trainer.scheduler.state_dict()}


def assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def record_without_timings(record) -> dict:
    d = record.to_dict()
    d["metrics"] = {k: v for k, v in d["metrics"].items() if not k.startswith("time/") and k != "tokens/generate_per_s"}
    return d


def assert_failed_step_left_no_trace(failed, fresh):
    """`failed` went through a step that raised; `fresh` (same config, same initial weights) never stepped. Both
    must hold the same state now, and their next steps must give the same record and the same state after."""
    assert_same_tree(training_state(failed), training_state(fresh))
    assert_same_tree(record_without_timings(failed.step()), record_without_timings(fresh.step()), "record")
    assert_same_tree(training_state(failed), training_state(fresh))


def test_out_of_memory_after_an_optimizer_step_restores_everything(tokenizer, monkeypatch):
    """mu=2: the first update is applied, then the second runs out of memory (at the first log-prob forward
    after an optimizer step, wherever that falls). The step is undone whole: parameters, AdamW states, the
    schedule, the data position and the random streams as before it, so the next step is the first step of a
    trainer that never failed."""
    import grpo_lib.trainer as tr

    trainer, fresh = make_trainer(tokenizer, num_iterations=2), make_trainer(tokenizer, num_iterations=2)
    fired = fail_once(monkeypatch, tr, "rollout_logps", lambda: trainer.scheduler.last_epoch >= 1)
    with pytest.raises(StepOOMError, match="the step was not applied.*gradient_accumulation_steps"):
        trainer.step()
    assert fired == [True]
    assert trainer.step_count == 0 and not trainer.optimizer.state_dict()["state"]
    assert trainer.scheduler.last_epoch == 0 and trainer.data_position == 0
    assert_failed_step_left_no_trace(trainer, fresh)


def test_out_of_memory_in_a_backward_restores_the_data_position_and_random_streams(tokenizer, monkeypatch):
    """mu=1, two micro-batches: the second backward runs out of memory after the first one filled .grad. The
    gradients are dropped, and the prompts and random draws the step consumed are given back."""
    trainer = make_trainer(tokenizer, gradient_accumulation_steps=2)
    fresh = make_trainer(tokenizer, gradient_accumulation_steps=2)
    calls = []
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(1) or
                        torch.autograd.backward(self, *a, **k))
    fired = fail_once(monkeypatch, torch.Tensor, "backward", lambda: len(calls) == 1)
    with pytest.raises(StepOOMError, match="the step was not applied"):
        trainer.step()
    assert fired == [True] and len(calls) == 1, "the first backward ran, the second failed"
    assert trainer.data_position == 0 and all(p.grad is None for p in trainer.model.parameters())
    assert_failed_step_left_no_trace(trainer, fresh)


def test_out_of_memory_in_sampling_gives_the_step_back(tokenizer, monkeypatch):
    """Dynamic sampling's second round runs out of memory: two batches of prompts and their random draws were
    consumed; all are given back."""
    import grpo_lib.trainer as tr

    kw = dict(prompts_per_step=2, dynamic_sampling=True, max_resample_rounds=3, seed=1)
    trainer, fresh = make_trainer(tokenizer, **kw), make_trainer(tokenizer, **kw)
    trainer.reward_funcs = fresh.reward_funcs = [vowels_unless_yes_or_no]
    fired = fail_once(monkeypatch, tr, "sample_groups", lambda: trainer.data_position >= 4)
    with pytest.raises(StepOOMError, match="during step 1; the step was not applied"):
        trainer.step()
    assert fired == [True] and trainer.data_position == 0
    assert_failed_step_left_no_trace(trainer, fresh)


@pytest.mark.parametrize("mu", [1, 2])
def test_out_of_memory_inside_the_optimizer_step_says_what_it_left(tokenizer, monkeypatch, mu):
    """AdamW allocates its moments at its first step, so the step itself can run out of memory, halfway through
    the parameters. mu=2 holds a copy of the weights and optimiser (the step is undone whole); mu=1 does not, so
    the error says the parameters may be partly updated and to resume; the data position, random streams and
    loss scale are given back either way, and the trainer can step again."""
    trainer, fresh = make_trainer(tokenizer, num_iterations=mu), make_trainer(tokenizer, num_iterations=mu)
    fired = fail_once(monkeypatch, trainer.optimizer, "step", lambda: True)
    expected = ("the step was not applied" if mu == 2 else
                "the optimiser step had begun.*the parameters may be partly updated.*resume from the last checkpoint")
    with pytest.raises(StepOOMError, match=expected):
        trainer.step()
    assert fired == [True] and trainer.data_position == 0 and trainer.step_count == 0
    if mu == 2:
        assert_failed_step_left_no_trace(trainer, fresh)
    else:
        assert trainer.step().step == 1


@pytest.mark.parametrize("mu", [1, 2])
def test_out_of_memory_after_the_last_update_says_what_it_left(tokenizer, monkeypatch, mu):
    """The per-token KL of the record runs out of memory after the last optimiser step: mu=2 restores its copy
    (not applied); mu=1 has none, so the update stands and the error says the parameters may be updated."""
    import grpo_lib.trainer as tr

    trainer, fresh = make_trainer(tokenizer, num_iterations=mu), make_trainer(tokenizer, num_iterations=mu)
    fired = fail_once(monkeypatch, tr, "k3_kl", lambda: True)
    with pytest.raises(StepOOMError, match="the step was not applied" if mu == 2 else "may be partly updated"):
        trainer.step()
    assert fired == [True] and trainer.data_position == 0 and trainer.step_count == 0
    if mu == 2:
        assert_failed_step_left_no_trace(trainer, fresh)
    else:
        now, initial = training_state(trainer)["params"], training_state(fresh)["params"]
        assert any(not torch.equal(a, b) for a, b in zip(now, initial)), "mu=1: the optimiser step was applied"


def fp16_lora_trainer(tokenizer, **kw):
    """An fp16 base with fp32 LoRA adapters: the GradScaler is on (CPU torch has one)."""
    half = make_tiny_llama(len(tokenizer)).half()
    half.generation_config.pad_token_id = tokenizer.pad_token_id
    half.generation_config.eos_token_id = tokenizer.eos_token_id
    return GRPOTrainer(add_random_lora(half, seed=0), tokenizer, [has_a_vowel_count],
                       tiny_config(dtype="float16", **kw), PROMPTS)


def test_out_of_memory_after_a_skipped_fp16_update_restores_the_loss_scale(tokenizer, monkeypatch):
    """fp16, mu=2: the first update's gradients are inf (an fp16 overflow), so the GradScaler skips it and halves
    the loss scale; then the second update runs out of memory. The scale is back at 2^16 and the next step is
    the first step of a trainer that never failed."""
    import grpo_lib.trainer as tr
    from grpo_lib.models import trainable_parameters

    trainer, fresh = fp16_lora_trainer(tokenizer, num_iterations=2), fp16_lora_trainer(tokenizer, num_iterations=2)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == INIT_SCALE
    poison = {"on": True}
    for p in trainable_parameters(trainer.model):
        p.register_hook(lambda g: torch.full_like(g, math.inf) if poison["on"] else g)
    seen_scales = []
    fired = fail_once(monkeypatch, tr, "rollout_logps",
                      lambda: seen_scales.append(trainer.scaler.get_scale()) or seen_scales[-1] < INIT_SCALE)
    with pytest.raises(StepOOMError, match="the step was not applied"):
        trainer.step()
    assert fired == [True] and seen_scales[-1] == INIT_SCALE / 2, "the first update was skipped, the scale halved"
    assert trainer.scaler.get_scale() == INIT_SCALE and trainer.data_position == 0
    poison["on"] = False
    assert_failed_step_left_no_trace(trainer, fresh)


def test_fp16_out_of_memory_inside_the_optimizer_step_lets_the_next_step_unscale(tokenizer, monkeypatch):
    """fp16, mu=1: the optimiser step fails after the GradScaler unscaled the gradients. torch's scaler remembers
    that unscale_ ran until its update(); the restored scaler must not, or the next step's unscale_ refuses."""
    trainer = fp16_lora_trainer(tokenizer)
    fired = fail_once(monkeypatch, trainer.optimizer, "step", lambda: True)
    with pytest.raises(StepOOMError, match="parameters may be partly updated"):
        trainer.step()
    assert fired == [True] and trainer.scaler.get_scale() == INIT_SCALE
    record = trainer.step()
    assert record.step == 1 and record.metrics["amp/loss_scale"] == INIT_SCALE


def rewards_by_step(run_dir):
    return {r.step: r.total for r in runlog.load_run_log(run_dir)}


def test_resume_reproduces_uninterrupted_run(tokenizer, tmp_path):
    full = tmp_path / "full"
    make_trainer(tokenizer, run_dir=full).train()
    part = tmp_path / "part"
    t = make_trainer(tokenizer, run_dir=part, max_steps=3)  # checkpoint at 2, step 3 logged, then "crash"
    t.train()
    assert [d.name for d in checkpoint.checkpoint_dirs(part)] == ["step-000002", "step-000003"]
    import shutil

    shutil.rmtree(checkpoint.checkpoint_dirs(part)[-1])  # as if killed before checkpoint 3 was written
    resumed = make_trainer(tokenizer, run_dir=part, lora_seed=99)  # other adapters: the checkpoint must win
    with pytest.warns(UserWarning, match="1 run-log line"):
        assert resumed.resume() == 2
    resumed.train()
    assert [r.step for r in runlog.load_run_log(part)] == [1, 2, 3, 4]
    dropped, _ = runlog.read_log_lines(part / runlog.DROPPED_NAME)
    assert [d["step"] for d in dropped] == [3]
    got, expected = rewards_by_step(part), rewards_by_step(full)
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_damaged_checkpoint_falls_back(tokenizer, tmp_path):
    make_trainer(tokenizer, run_dir=tmp_path).train()
    last = checkpoint.checkpoint_dirs(tmp_path)[-1]
    adapter = last / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    with open(tmp_path / runlog.LOG_NAME, "a") as f:
        f.write('{"step": 5, "prom')  # a torn last line
    t = make_trainer(tokenizer, run_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"step-000004 is damaged \(adapter/adapter_model.safetensors has 100 bytes"):
        assert t.resume() == 2
    assert [r.step for r in runlog.load_run_log(tmp_path)] == [1, 2]


def test_run_dir_of_another_config_is_refused(tokenizer, tmp_path):
    make_trainer(tokenizer, run_dir=tmp_path, max_steps=2).train()
    other = make_trainer(tokenizer, run_dir=tmp_path, beta=0.5)
    with pytest.raises(RunDirError, match=r"different config \{'beta': \(0.04, 0.5\)\}"):
        other.resume()
    assert make_trainer(tokenizer, run_dir=tmp_path, beta=0.5).resume(force=True) == 2
    fresh = make_trainer(tokenizer, run_dir=tmp_path, beta=0.5)
    with pytest.raises(RunDirError, match="already holds 2 logged step"):
        fresh.train()


def test_failing_reward_loses_nothing(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, run_dir=tmp_path, max_steps=3, save_steps=1)
    calls = {"n": 0}

    def breaks_on_third_step(prompts, completions, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("missing column")
        return [0.0] * len(completions)

    breaks_on_third_step.__name__ = "breaks_on_third_step"
    trainer.reward_funcs = [breaks_on_third_step]
    from grpo_lib.rewards import RewardFunctionError

    with pytest.raises(RewardFunctionError, match="'breaks_on_third_step' raised KeyError"):
        trainer.train()
    assert [r.step for r in runlog.load_run_log(tmp_path)] == [1, 2]
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000001", "step-000002"]


def test_dataset_without_prompt_column(tokenizer):
    from grpo_lib.data import DataError

    model = add_random_lora(make_tiny_llama(len(tokenizer)))
    with pytest.raises(DataError, match="row 0 has no 'prompt' column"):
        GRPOTrainer(model, tokenizer, ["format"], tiny_config(), [{"question": "hi"}])
    with pytest.raises(DataError, match="row 1 has no 'answer' column.*which the reward functions read"):
        GRPOTrainer(model, tokenizer, ["format", "answer"], tiny_config(), [{"prompt": "a", "answer": "1"},
                                                                           {"prompt": "b"}])


def test_fp16_compute_trains_with_loss_scaling_and_fp16_weights_are_refused(tokenizer):
    """fp16 compute (a T4) trains LoRA adapters (fp32) with a GradScaler: CPU torch has one, so the T4's
    path runs here. fp16 trainable weights cannot be unscaled into: refused with the fix."""
    half = make_tiny_llama(len(tokenizer)).half()
    half.generation_config.pad_token_id = tokenizer.pad_token_id
    half.generation_config.eos_token_id = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="lora_r > 0"):
        GRPOTrainer(half, tokenizer, [has_a_vowel_count], tiny_config(lora_r=0, beta=0.0), PROMPTS)
    lora = add_random_lora(half, seed=0)  # peft keeps the adapters in fp32
    trainer = GRPOTrainer(lora, tokenizer, [has_a_vowel_count], tiny_config(dtype="float16"), PROMPTS)
    assert trainer.scaler.is_enabled() and trainer.scaler._device == "cpu"
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    record = trainer.step()
    assert trainer.scaler.get_scale() > 0 and math.isfinite(record.metrics["grad_norm"])
    moved = [not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()) if p.requires_grad]
    assert any(moved) or trainer.scaler.get_scale() < 2.0**16, "an update, or a skipped step with a lower scale"


def test_gradient_checkpointing_engages_whatever_mode_the_model_came_in(tokenizer):
    """Hugging Face models checkpoint only in training mode. A model handed over in eval mode (as
    from_pretrained returns it) must still recompute its layers in backward: with checkpointing, a decoder
    layer's MLP runs twice per call of the layer (forward, then the recompute in backward; the layer's own
    hooks stay outside the checkpoint), without it once."""
    def mlp_runs_per_layer_call(checkpointing: bool) -> float:
        model = make_tiny_llama(len(tokenizer))  # eval mode, no adapters: full fine-tuning
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = GRPOTrainer(model, tokenizer, [has_a_vowel_count],
                              tiny_config(lora_r=0, beta=0.0, gradient_checkpointing=checkpointing), PROMPTS)
        import grpo_lib.trainer as tr

        rollout = tr.sample_groups(model, tokenizer, [r["prompt"] for r in trainer.next_rows()], 4, 6, 1.0, 1.0)
        counts = {"layer": 0, "mlp": 0}
        layer = model.model.layers[0]
        layer.register_forward_pre_hook(lambda *a: counts.__setitem__("layer", counts["layer"] + 1))
        layer.mlp.register_forward_pre_hook(lambda *a: counts.__setitem__("mlp", counts["mlp"] + 1))
        trainer._update(rollout, torch.linspace(-1, 1, 8))
        assert not model.training, "the trainer restores the mode it found"
        return counts["mlp"] / counts["layer"]

    assert mlp_runs_per_layer_call(False) == 1
    assert mlp_runs_per_layer_call(True) == 2


def test_full_finetuning_with_kl_builds_a_frozen_reference(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    trainer = GRPOTrainer(model, tokenizer, [has_a_vowel_count], tiny_config(lora_r=0, learning_rate=1e-3), PROMPTS)
    ref = trainer.ref_model
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    initial = [p.detach().clone() for p in ref.parameters()]
    trainer.step()
    record = trainer.step()  # the policy has moved: the KL to the frozen copy is positive
    assert all(torch.equal(a, b) for a, b in zip(initial, ref.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.parameters()))
    assert record.metrics["kl/mean"] > 0


def test_unscorable_completions_get_no_advantage(tokenizer):
    """A reward that applies only to completions with a vowel: the others are unscorable (NaN total),
    get advantage 0, and are counted in the metrics."""
    def vowels_only(completions, **kwargs):
        return [sum(ch in "aeiou" for ch in c) if any(ch in "aeiou" for ch in c) else None for c in completions]

    trainer = make_trainer(tokenizer)
    trainer.reward_funcs = [vowels_only]
    record = trainer.step()
    unscorable = [t is None for t in record.total]
    assert record.metrics["reward/unscorable_frac"] == sum(unscorable) / len(unscorable)
    for i, u in enumerate(unscorable):
        if u:
            assert record.advantages[i] == 0.0
    json.dumps(record.to_dict())


CHAT_PROMPTS = [{"prompt": [{"role": "user", "content": f"Say {w}"}], "answer": "1", "solution": "1"}
                for w in ("yes", "no", "maybe", "sure")]


def test_reward_functions_written_for_trl_run_in_the_trainer(tokenizer):
    """trl.rewards' functions and a tutorial-style function, on a conversational dataset, as TRL calls them."""
    trl_rewards = pytest.importorskip("trl.rewards")
    seen = {}

    def tutorial(completions, **kwargs):
        seen["shape"] = completions[0]
        seen["state"] = kwargs["trainer_state"].global_step
        return [float(len(c[0]["content"])) for c in completions]

    funcs = [trl_rewards.think_format_reward, trl_rewards.get_soft_overlong_punishment(6, 2), tutorial]
    model = add_random_lora(make_tiny_llama(len(tokenizer)))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    trainer = GRPOTrainer(model, tokenizer, funcs, tiny_config(), CHAT_PROMPTS)
    trainer.step()
    record = trainer.step()
    assert seen["shape"][0]["role"] == "assistant" and seen["state"] == 1
    assert record.reward_names == ["think_format_reward", "soft_overlong_punishment_reward", "tutorial"]
    for i, ids in enumerate(record.completion_ids):  # DAPO's soft overlong punishment, L_max 6, cache 2
        expected = 0.0 if len(ids) <= 4 else (4 - len(ids)) / 2 if len(ids) <= 6 else -1.0
        assert record.rewards[i][1] == pytest.approx(expected)
        assert record.rewards[i][2] == float(len(record.completions[i]))
    assert all(p in [r["prompt"] for r in CHAT_PROMPTS] for p in record.columns["prompt"])  # the raw chat prompts


# ----------------------------------------------------------------------------------------------
# the objective's variants and the entropy metric
# ----------------------------------------------------------------------------------------------


def test_entropy_mean_is_the_sampling_policys_token_entropy(tokenizer):
    """entropy/mean = the token-weighted mean over the sampled completions' real tokens of the entropy of
    softmax(logits / tau) under the policy that sampled them, computed here with the full logits."""
    import copy

    trainer = make_trainer(tokenizer, temperature=0.8, num_iterations=2)
    sampler = copy.deepcopy(trainer.model)  # the parameters before the step's updates
    rec, r = step_capturing_rollout(trainer)
    T = r.completion_ids.size(1)
    input_ids = torch.cat([r.prompt_ids[r.group_index], r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask[r.group_index], r.completion_mask], 1)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = sampler(input_ids=input_ids, attention_mask=attn, position_ids=positions).logits
        entropy = torch.distributions.Categorical(logits=logits[:, -T - 1:-1] / 0.8).entropy()  # [N, T]
    m = r.completion_mask.bool()
    assert rec.metrics["entropy/mean"] == pytest.approx(entropy[m].mean().item(), rel=1e-5)
    recorded = torch.tensor([v for row in rec.token_stats["entropy"] for v in row])
    torch.testing.assert_close(recorded, entropy[m], rtol=0, atol=6e-5)  # stored rounded to 4 decimals


VARIANTS = {
    "gspo": dict(importance_sampling_level="sequence", num_iterations=2, epsilon=3e-4, epsilon_high=4e-4),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0, num_iterations=2, beta=0.0),
    "truncated-masked": dict(mask_truncated_completions=True, loss_type="dapo"),
    "top-entropy": dict(top_entropy_quantile=0.2, gradient_accumulation_steps=2),
    "top-entropy-plain": dict(top_entropy_quantile=0.2, share_prompt_forward=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_step_of_each_variant(tokenizer, variant):
    trainer = make_trainer(tokenizer, **VARIANTS[variant])
    rec = trainer.step()
    for key in ("loss", "grad_norm", "entropy/mean", "ratio/mean"):
        assert math.isfinite(rec.metrics[key]), key
    assert rec.metrics["entropy/mean"] > 0
    assert ("clip/cispo" in rec.metrics) == (variant == "cispo")
    json.dumps(rec.to_dict())


def hand_made_rollout(tokenizer, trainer):
    """Two groups of 4 completions of 6 tokens; EOS in rows 0, 2, 5, 6: rows 1, 3, 4, 7 are truncated."""
    from grpo_lib.sampling import Rollout, completion_mask_from_eos, tokenize_prompts

    rows = trainer.next_rows()
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], "cpu")
    ids = torch.randint(100, 1000, (8, 6), generator=torch.Generator().manual_seed(0))
    for i, t in ((0, 2), (2, 5), (5, 0), (6, 3)):
        ids[i, t] = tokenizer.eos_token_id
    mask, truncated = completion_mask_from_eos(ids, [tokenizer.eos_token_id])
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollout([r["prompt"] for r in rows], prompt_ids, prompt_mask, ids, mask, [""] * 8, truncated, 4)


@pytest.mark.parametrize("share", [True, False])
def test_mask_truncated_completions_removes_their_gradient_exactly(tokenizer, share):
    """loss_type grpo, beta 0, mu 1: a completion adds -A_i/(N |o_i|) grad logp_it, so leaving the truncated
    ones out of the loss must give exactly the update of a step in which their advantages are 0."""
    results = []
    for masked in (True, False):
        trainer = make_trainer(tokenizer, beta=0.0, mask_truncated_completions=masked, share_prompt_forward=share,
                               max_grad_norm=0.0)
        rollout = hand_made_rollout(tokenizer, trainer)
        assert rollout.truncated.tolist() == [False, True, False, True, True, False, False, True]
        advantages = torch.tensor([1.0, -0.5, 0.7, 1.2, -1.5, 0.3, -0.9, 0.8])
        if not masked:
            advantages = advantages.masked_fill(rollout.truncated, 0.0)
        trainer._update(rollout, advantages)
        results.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad]))
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_the_planner_plans_the_path_the_trainer_takes(tokenizer, monkeypatch, checkpointing, share, rho):
    """memory.estimate and the trainer agree on a config's path: the share_prompt the trainer passes to every
    rollout_logps call of an update (reference and training passes) is the planner's share_prompt_forward, and
    the trainer calls backward per group (4 groups, one micro-batch: 4 backward parts) exactly when the planner
    says backward_per_group."""
    import grpo_lib.trainer as tr
    from grpo_lib import memory
    from grpo_lib.models import enable_gradient_checkpointing

    trainer = make_trainer(tokenizer, prompts_per_step=4, groups_per_backward=1, top_entropy_quantile=rho,
                           gradient_checkpointing=checkpointing, share_prompt_forward=share)
    if checkpointing:
        enable_gradient_checkpointing(trainer.model.get_base_model())
    rollout = sample_groups(trainer.model, tokenizer, [r["prompt"] for r in trainer.next_rows()], 4, 6, 1.0, 1.0)
    shares, backwards = [], []
    real_logps = tr.rollout_logps
    monkeypatch.setattr(tr, "rollout_logps", lambda *a, **kw: shares.append(a[5]) or real_logps(*a, **kw))
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **kw: backwards.append(1) or
                        torch.autograd.backward(self, *a, **kw))
    trainer._update(rollout, torch.linspace(-1, 1, 16))
    plan = memory.estimate(trainer.config, trainer.model, device="cpu").settings
    assert shares and set(shares) == {plan["share_prompt_forward"]}
    assert len(backwards) == (4 if plan["backward_per_group"] else 1)
    assert plan["share_prompt_forward"] == share  # gradient checkpointing does not switch the shared path off


def test_top_entropy_quantile_keeps_micro_batches_whole(tokenizer):
    """The quantile is over a micro-batch's tokens, so the shared-prompt path scores the whole micro-batch
    before its backward (one part per micro-batch, not per group)."""
    from types import SimpleNamespace

    rollout = SimpleNamespace(group_index=torch.arange(4).repeat_interleave(4))  # 4 groups of G = 4
    parts = {}
    for rho in (1.0, 0.5):
        trainer = make_trainer(tokenizer, top_entropy_quantile=rho, prompts_per_step=4, gradient_accumulation_steps=2,
                               groups_per_backward=1)
        parts[rho] = [p.tolist() for idx in trainer._microbatches(16) for p in trainer._backward_parts(rollout, idx)]
    assert parts[1.0] == [list(range(g * 4, g * 4 + 4)) for g in range(4)]
    assert parts[0.5] == [list(range(8)), list(range(8, 16))]


# ----------------------------------------------------------------------------------------------
# dynamic sampling, the saturation stop, tracking
# ----------------------------------------------------------------------------------------------

def vowels_unless_yes_or_no(completions, answer, **kwargs):
    """Prompts whose answer is "yes" or "no" get 0 for every completion (zero variance); the others the vowel share."""
    return [0.0 if a in ("yes", "no") else sum(ch in "aeiou" for ch in c) / max(len(c), 1)
            for c, a in zip(completions, answer)]


def test_cat_groups_keeps_each_groups_log_probs(tokenizer):
    """Groups taken from two rollouts with different prompt and completion widths, re-padded into one, give
    the same per-token log-probs as in their own rollout (padding never touches real tokens)."""
    from grpo_lib.sampling import cat_groups

    trainer = make_trainer(tokenizer, prompts_per_step=2)
    torch.manual_seed(0)
    a = sample_groups(trainer.model, tokenizer, [PROMPTS[0]["prompt"], PROMPTS[2]["prompt"]], 4, 6)
    b = sample_groups(trainer.model, tokenizer, [PROMPTS[4]["prompt"]], 4, 3)
    both = cat_groups([(a, [1]), (b, [0])], tokenizer.pad_token_id)
    assert both.prompts == [a.prompts[1], b.prompts[0]] and both.completion_ids.shape == (8, 6)
    assert both.completion_texts == a.completion_texts[4:8] + b.completion_texts
    with torch.no_grad():
        for share in (True, False):
            whole = rollout_logps(trainer.model, both, torch.arange(8), share_prompt=share)
            first = rollout_logps(trainer.model, a, torch.arange(4, 8), share_prompt=share)
            second = rollout_logps(trainer.model, b, torch.arange(4), share_prompt=share)
            torch.testing.assert_close(whole[:4], first)
            torch.testing.assert_close(whole[4:, :3], second)
            assert (both.completion_mask[4:, 3:] == 0).all()  # b's completions padded to the wider width


@pytest.mark.parametrize("informative, prompts_per_step, expected", [
    ([[1], [0, 2], [1]], 3, [(0, [1]), (1, [0, 2])]),  # 1 + 2 found: the third batch is not needed
    ([[], [], []], 2, [(0, [0, 1])]),  # nothing informative anywhere: the first batch whole
    ([[0, 1, 2]], 2, [(0, [0, 1])]),  # more than needed: the first ones in order
    ([[2], [0, 1, 2]], 2, [(0, [2]), (1, [0])]),  # ... across batches too
    ([[], [1]], 1, [(1, [1])]),  # a batch that gives nothing is left out
    ([[1], []], 3, [(0, [1])]),  # fewer than needed after every round: train on what was found
])
def test_groups_to_train(informative, prompts_per_step, expected):
    from grpo_lib.trainer import groups_to_train

    assert groups_to_train(informative, prompts_per_step) == expected


def test_dynamic_sampling_trains_on_informative_groups_only(tokenizer):
    trainer = make_trainer(tokenizer, prompts_per_step=2, dynamic_sampling=True, max_resample_rounds=3, seed=1)
    trainer.reward_funcs = [vowels_unless_yes_or_no]
    generated = 0
    for _ in range(3):
        record = trainer.step()
        generated += record.metrics["sampling/groups_generated"]
        m = record.metrics
        assert record.num_groups == 2 and m["adv/zero_std_frac"] == 0.0, "only groups with reward variance"
        assert not {"yes", "no"} & set(record.answers)
        assert m["sampling/groups_generated"] == 2 * (m["sampling/rounds"] + 1)
        flat = m["sampling/zero_std_frac"] * m["sampling/groups_generated"]
        assert flat == pytest.approx(round(flat)) and m["sampling/informative_groups"] == 2
        assert m["tokens/generated"] >= sum(record.lengths)
    assert trainer.data_position == generated, "every prompt sampled was consumed from the data order"


def test_dynamic_sampling_gives_up_after_max_rounds(tokenizer):
    def flat(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tokenizer, prompts_per_step=2, dynamic_sampling=True, max_resample_rounds=2)
    trainer.reward_funcs = [flat]
    record = trainer.step()
    m = record.metrics
    assert m["sampling/rounds"] == 2 and m["sampling/groups_generated"] == 6 and m["sampling/zero_std_frac"] == 1.0
    assert m["sampling/informative_groups"] == 0 and record.num_groups == 2  # the first batch, KL only
    assert trainer.data_position == 6


def test_saturation_stop_ends_the_run_and_saves_everything(tokenizer, tmp_path):
    def all_right(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tokenizer, run_dir=tmp_path, max_steps=10, save_steps=5, saturation_threshold=0.9,
                           saturation_patience=2)
    trainer.reward_funcs = [all_right]
    records = trainer.train()
    assert [r.step for r in records] == [1, 2] and trainer.stop_reason.startswith("saturated: 2 steps in a row")
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000002"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    state = torch.load(checkpoint.checkpoint_dirs(tmp_path)[0] / checkpoint.STATE_NAME, weights_only=False)
    assert state["saturated_steps"] == 2


def test_report_to_tensorboard_gets_every_step(tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tokenizer, run_dir=tmp_path, max_steps=3, report_to=("tensorboard",))
    records = trainer.train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([r.metrics["reward/mean"] for r in records])
