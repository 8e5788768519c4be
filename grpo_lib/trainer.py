"""The GRPO loop: sample -> score -> advantages -> mu updates; when to log and checkpoint (grpo_lib.checkpoint).

The trainer only sequences the pure functions of the other modules (DESIGN.md); it defines no math.
One `step()`:
    1) take prompts_per_step prompts, sample G completions each           (sampling.sample_groups)
    2) score them with every reward function, combine with weights         (rewards.score_completions)
    3) z-score the totals inside each group                                (advantages.group_advantages)
    4) reference log-probs (adapters off, no grad) and, if mu > 1, old log-probs
    5) mu times: for each micro-batch (one group at a time on the shared-prompt path), policy log-probs
       -> grpo_loss -> backward; then one optimiser step
    6) a StepRecord with texts, rewards, advantages, per-token stats and metrics (step_metrics)

The model's mode is set for each phase: eval for sampling and the no-grad passes, train for the
updates (dropout, and Hugging Face's gradient checkpointing, which only runs in training mode).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, runlog
from .advantages import advantage_stats, group_advantages
from .config import GRPOConfig
from .data import check_dataset, filter_long_prompts
from .logprobs import rollout_logps
from .loss import (grpo_loss, k3_kl, loss_kwargs, mask_truncated_completions, masked_mean, microbatch_normalizers,
                   probability_ratio)
from .models import (fp16_matmuls_accumulate_in_fp32, frozen_copy, is_peft, model_compute_dtype, model_device,
                     model_mode, reference_mode, trainable_parameters)
from .rewards import (RewardScores, default_trainer_state, required_columns, resolve_reward_funcs,
                      reward_inputs, score_completions)
from .rng import rng_state, seed_everything, set_rng_state
from .runlog import RunDirError, StepRecord
from .sampling import Rollout, cat_groups, sample_groups
from .tracking import Tracker


@dataclass
class SampledBatch:
    """Steps 1) and 2) of a step: dataset rows, G completions of each, their scores, and the seconds taken."""

    rows: list[dict]  # [groups] dataset rows
    rollout: Rollout  # completions [N = groups * G, T], group-major, on the model's device
    scores: RewardScores  # per_func [N, F], total [N] (NaN: unscorable), on the CPU
    generate_s: float = 0.0  # seconds sampling
    score_s: float = 0.0  # seconds in the reward functions


@dataclass
class UpdateBatch:
    """What every update of a step reads (fixed for the step)."""

    rollout: Rollout  # completions [N, T]
    advantages: torch.Tensor  # [N], on the model's device
    loss_mask: torch.Tensor  # [N, T] the tokens the loss counts
    old_logps: torch.Tensor | None  # [N, T] the sampling policy's, no gradient (mu > 1)
    ref_logps: torch.Tensor | None  # [N, T] the reference policy's, no gradient (beta != 0)


def informative_groups(total: torch.Tensor, G: int) -> list[int]:
    """The groups whose rewards differ, so whose advantages are not all 0. total: [groups * G]."""
    _, zero_std = group_advantages(total.reshape(-1, G))  # zero_std: [groups]
    return (~zero_std).nonzero().flatten().tolist()


def groups_to_train(informative: list[list[int]], prompts_per_step: int) -> list[tuple[int, list[int]]]:
    """Dynamic sampling's choice among batches of prompts_per_step groups each: [(batch, its groups)] holding
    the first prompts_per_step informative groups in the order they were generated; batches that give none are
    left out. If no batch has one, the first batch whole (its KL term still applies).
    informative[b]: the indices of batch b's informative groups, ascending."""
    chosen, room = [], prompts_per_step
    for b, groups in enumerate(informative):
        take = groups[:room]
        if take:
            chosen.append((b, take))
            room -= len(take)
    return chosen or [(0, list(range(prompts_per_step)))]


class StepOOMError(RuntimeError):
    """The device ran out of memory during a step. The step was given back (GRPOTrainer.step), except where the
    message says the optimiser step had begun with num_iterations = 1: the parameters may be partly updated."""


def lr_lambda(config: GRPOConfig):
    """Multiplier of the learning rate at optimiser step s: linear warm-up, then constant/linear/cosine."""
    total = config.max_steps * config.num_iterations
    warm = config.warmup_steps * config.num_iterations

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        progress = min(1.0, (s - warm) / max(1, total - warm))
        if config.lr_scheduler_type == "linear":
            return 1.0 - progress
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


class GRPOTrainer:
    """GRPO on a (LoRA) causal LM.

    model, tokenizer: from grpo_lib.models.load_policy. reward_funcs: names or TRL-style callables
    (default: config.reward_funcs). train_dataset: rows with a "prompt" column (chat messages or text)
    and the columns the reward functions read. run_dir: where the run log and checkpoints go (optional).
    ref_model: the reference policy of full fine-tuning (a model without adapters) with beta > 0; by
    default a frozen copy of the model made here. LoRA models use themselves with adapters off.

    Random streams: building a trainer draws from and seeds nothing. The global streams (Python, NumPy, torch
    on every device: rng.seed_everything) are seeded with config.seed when training starts, at the beginning
    of the first step() of a fresh run (train() goes through step()), so what a notebook drew before does not
    change the run. seed() seeds them earlier, explicitly; the first step then does not seed again. A resume()
    that restores a checkpoint restores the checkpoint's streams instead, and nothing seeds after it.
    """

    def __init__(self, model, tokenizer, reward_funcs=None, config: GRPOConfig | None = None, train_dataset=None,
                 reward_weights=None, run_dir: str | None = None, ref_model=None):
        self.config = config = config or GRPOConfig()
        self.model, self.tokenizer, self.ref_model = model, tokenizer, ref_model
        self.reward_funcs = resolve_reward_funcs(reward_funcs if reward_funcs is not None else config.reward_funcs)
        weights = reward_weights if reward_weights is not None else config.reward_weights
        self.reward_weights = list(weights) if weights is not None else [1.0] * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for "
                             f"{len(self.reward_funcs)} reward functions")
        if config.beta != 0 and ref_model is None and not is_peft(model):
            self.ref_model = frozen_copy(model)  # the frozen reference the config promises (memory.estimate counts it)
        rows = check_dataset(train_dataset, required_columns=required_columns(self.reward_funcs))
        self.rows = filter_long_prompts(rows, tokenizer, config.max_prompt_length, config.long_prompts)
        self.run_dir = Path(run_dir) if run_dir else None
        params = trainable_parameters(model)
        if not params:
            raise ValueError("the model has no trainable parameters (load it with lora_r > 0, or unfreeze it)")
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        # fp16 compute (a T4, or dtype="float16") needs loss scaling so small gradients do not underflow
        fp16 = model_compute_dtype(model) == torch.float16
        fp16_matmuls_accumulate_in_fp32(model_compute_dtype(model), model_device(model))
        if fp16 and any(p.dtype == torch.float16 for p in params):
            raise ValueError("fp16 trainable weights cannot be trained with loss scaling (GradScaler needs fp32 "
                             "weights to unscale into): use LoRA (lora_r > 0; peft keeps adapters in fp32), or on a "
                             "GPU without bf16 (e.g. a T4) load the model in float32 (dtype='float32')")
        self.scaler = torch.amp.GradScaler(model_device(model).type, enabled=fp16)
        self._run_dir_checked = False  # config.json compared (or written) once per trainer
        self.step_count = 0  # completed steps
        self.data_position = 0  # prompts consumed, across epochs
        self.saturated_steps = 0  # steps in a row at or above saturation_threshold (saturation stop)
        self.skipped_steps = 0  # steps in a row whose fp16 optimiser step was skipped (max_skipped_steps stop)
        self.stop_reason: str | None = None  # set when train() stops before max_steps
        self.rng_started = False  # the global streams were seeded by seed() or restored by resume()
        self._weights_touched = False  # optimizer_step changed weights this step and no copy undid it

    def seed(self) -> None:
        """Seed every global random stream with config.seed now (the first step of a fresh run does it itself,
        unless this or a resume() already set them)."""
        seed_everything(self.config.seed)
        self.rng_started = True

    # ------------------------------------------------------------------------------------------
    # data order: a fresh seeded permutation per epoch, so a resume can recompute it
    # ------------------------------------------------------------------------------------------

    def next_rows(self) -> list[dict]:
        n, k = len(self.rows), self.config.prompts_per_step
        out = []
        for pos in range(self.data_position, self.data_position + k):
            epoch, i = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            out.append(self.rows[perm[i]])
        self.data_position += k
        return out

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------

    def step(self) -> StepRecord:
        """Run one GRPO step and return its record (not written anywhere: train() does that).

        A step that fails before its update is complete (out of memory, a reward function's error, an
        interrupt) is given back: the data position, every random stream and the loss scaler as before it, and
        with num_iterations > 1 the weights, AdamW's state and the schedule (_update), so the next step() is the
        step an uninterrupted run takes. With num_iterations = 1 the weights change only in the final
        optimizer_step and no copy is kept: a failure once it has begun may leave them partly updated, and the
        error says so. Out of memory is raised as StepOOMError, with cheaper settings."""
        if self.step_count == 0 and not self.rng_started:
            self.seed()  # training starts here: the run's streams do not depend on anything drawn before
        start = {"step": self.step_count, "data_position": self.data_position, "rng": rng_state(),
                 "scaler": self.scaler.state_dict()}
        self._weights_touched = False
        try:
            return self._step()
        except BaseException as e:
            if self.step_count != start["step"]:  # failed after its update was applied: only the record is lost
                raise
            partly_updated = self._give_back(start)
            if isinstance(e, torch.OutOfMemoryError):
                raise StepOOMError(self._oom_advice(partly_updated)) from e
            raise

    def _give_back(self, start: dict) -> bool:
        """Put back what step() recorded at its start; returns whether the weights may be partly updated."""
        self.data_position = start["data_position"]
        set_rng_state(start["rng"])
        # a fresh scaler: torch's also remembers an unscale_ until its update(), which a failed step never reached
        self.scaler = torch.amp.GradScaler(model_device(self.model).type, enabled=self.scaler.is_enabled())
        self.scaler.load_state_dict(start["scaler"])
        partly_updated, self._weights_touched = self._weights_touched, False
        return partly_updated

    def _step(self) -> StepRecord:
        c = self.config
        G = c.num_generations

        # 1) + 2) sample G completions per prompt and score them [N, F] -> total [N]; with dynamic sampling,
        # more prompts until prompts_per_step groups carry a learning signal
        batch = self._sample_and_score(self.next_rows())
        sampling_stats = {}
        if c.dynamic_sampling:
            batch, sampling_stats = self._keep_informative_groups(batch)
        rows, rollout, scores = batch.rows, batch.rollout, batch.scores
        times = {"generate": batch.generate_s, "score": batch.score_s}

        # 3) group-relative advantages [groups, G] -> [N], on the model's device
        t0 = time.perf_counter()
        rewards = scores.total.reshape(-1, G)
        adv, zero_std = group_advantages(rewards, c.scale_rewards)
        advantages = adv.reshape(-1).to(model_device(self.model))
        times["score"] += time.perf_counter() - t0

        # 4) + 5) reference / old log-probs, then mu updates
        t0 = time.perf_counter()
        train_stats, token_stats = self._update(rollout, advantages)
        self.step_count += 1  # the step is applied (step() gives back only a step that was not)
        times["train"] = time.perf_counter() - t0

        # 6) the record
        metrics = step_metrics(scores, rewards, adv, zero_std, rollout, train_stats, times,
                               self.scheduler.get_last_lr()[0], sampling_stats)
        completion_ids = rollout.completion_id_lists()
        return StepRecord(
            step=self.step_count, prompts=rollout.prompts, completions=rollout.completion_texts,
            reward_names=scores.names, rewards=scores.as_lists(), reward_weights=scores.weights.tolist(),
            total=scores.total.tolist(), advantages=adv.reshape(-1).tolist(),
            truncated=rollout.truncated.tolist(), lengths=rollout.lengths.tolist(), num_generations=G,
            metrics=metrics, columns={k: [r.get(k) for r in rows] for k in rows[0]},
            completion_ids=completion_ids, tokens=self._token_strings(completion_ids), token_stats=token_stats,
            logged=scores.logged_columns, reward_ranges=scores.ranges, reward_kinds=scores.kinds)

    def _sample_and_score(self, rows: list[dict]) -> SampledBatch:
        """G completions for each row, scored by the reward functions called as TRL calls them, with the
        seconds each took."""
        c = self.config
        t0 = time.perf_counter()
        rollout = sample_groups(self.model, self.tokenizer, [r["prompt"] for r in rows], c.num_generations,
                                c.max_completion_length, c.temperature, c.top_p)
        t1 = time.perf_counter()
        inputs = reward_inputs(rows, rollout.completion_texts, c.num_generations, rollout.completion_id_lists())
        scores = score_completions(self.reward_funcs, **inputs, weights=self.reward_weights,
                                   timeout_s=c.reward_timeout_s, num_generations=c.num_generations,
                                   trainer_state=default_trainer_state(self.step_count, c.max_steps))
        return SampledBatch(rows, rollout, scores, generate_s=t1 - t0, score_s=time.perf_counter() - t1)

    def _keep_informative_groups(self, first: SampledBatch) -> tuple[SampledBatch, dict[str, float]]:
        """DAPO's dynamic sampling: groups whose G rewards are all equal carry no policy gradient, so sample
        prompts_per_step more prompts at a time (at most max_resample_rounds times) until prompts_per_step
        groups with reward variance are found, and train on those (groups_to_train). Returns the batch kept
        (its times: every round's) and the metrics of the search."""
        c, G = self.config, self.config.num_generations
        batches = [first]
        informative = [informative_groups(first.scores.total, G)]
        while sum(map(len, informative)) < c.prompts_per_step and len(batches) <= c.max_resample_rounds:
            batches.append(self._sample_and_score(self.next_rows()))
            informative.append(informative_groups(batches[-1].scores.total, G))
        chosen = groups_to_train(informative, c.prompts_per_step)
        found, generated = sum(map(len, informative)), sum(len(b.rows) for b in batches)
        stats = {"sampling/rounds": len(batches) - 1, "sampling/groups_generated": generated,
                 "sampling/zero_std_frac": 1 - found / generated,
                 "sampling/informative_groups": min(found, c.prompts_per_step),
                 "tokens/generated": int(sum(b.rollout.lengths.sum() for b in batches))}
        kept = SampledBatch(
            rows=[batches[b].rows[g] for b, groups in chosen for g in groups],
            rollout=cat_groups([(batches[b].rollout, groups) for b, groups in chosen], self.tokenizer.pad_token_id),
            scores=RewardScores.cat([(batches[b].scores, [g * G + j for g in groups for j in range(G)])
                                     for b, groups in chosen]),
            generate_s=sum(b.generate_s for b in batches), score_s=sum(b.score_s for b in batches))
        return kept, stats

    def _logps(self, rollout, idx: torch.Tensor, model=None, with_entropy: bool = False):
        """[n, T] log-probs of the completions idx; with_entropy: and the policy's entropies (same pass)."""
        c = self.config
        return rollout_logps(model or self.model, rollout, idx, c.temperature, c.logprob_chunk_size,
                             c.uses_shared_prompt_forward, with_entropy)

    def _microbatches(self, N: int) -> list[torch.Tensor]:
        return list(torch.arange(N).chunk(self.config.gradient_accumulation_steps))

    def _backward_parts(self, rollout, idx: torch.Tensor) -> list[torch.Tensor]:
        """The pieces of micro-batch `idx` that each get their own forward + backward.

        On the shared-prompt path, config.groups_per_backward groups each: a backward
        after each piece frees its activations before the next piece's forward, so peak activations are
        those of one piece, and a piece of several groups runs larger matrix products. The loss is a sum of
        per-sequence terms over the micro-batch's normalisers (microbatch_normalizers), so the loss and the
        gradients are unchanged. With top_entropy_quantile < 1 the micro-batch stays whole: its entropy
        quantile is taken over all of its tokens (as TRL's over its micro-batch), so they must all be scored
        before any backward.
        """
        if not self.config.backward_per_group:
            return [idx]
        groups = rollout.group_index.to(idx.device)[idx]
        kept = groups.unique(sorted=True)
        return [idx[torch.isin(groups, part)] for part in kept.split(self.config.groups_per_backward)]

    @torch.no_grad()
    def _frozen_logps(self, rollout, reference: bool) -> torch.Tensor:
        """[N, T] log-probs without gradient, in eval mode: the reference policy (adapters off, or the frozen
        copy) or the sampling policy."""
        micro = self._microbatches(rollout.completion_ids.size(0))
        with model_mode(self.model, training=False):
            if not reference:
                return torch.cat([self._logps(rollout, idx) for idx in micro])
            with reference_mode(self.model, self.ref_model) as ref:
                return torch.cat([self._logps(rollout, idx, ref) for idx in micro])

    def _update(self, rollout, advantages: torch.Tensor):
        """mu optimiser updates on one generation batch. If anything fails (e.g. out of memory) the gradients
        are dropped, and with mu > 1 the parameters, optimiser and schedule are restored from a copy taken before
        the first update. With mu = 1 no copy is needed: only the last call, optimizer_step, changes them.
        Returns (the update's metrics, per-token lists of logp, ratio, entropy and kl)."""
        c = self.config
        mask = rollout.completion_mask
        # the loss counts these tokens; the per-token records and the entropy metric keep every sampled one
        loss_mask = mask_truncated_completions(mask, rollout.truncated) if c.mask_truncated_completions else mask
        ref_logps = self._frozen_logps(rollout, reference=True) if c.beta != 0 else None
        old_logps = self._frozen_logps(rollout, reference=False) if c.num_iterations > 1 else None
        batch = UpdateBatch(rollout, advantages, loss_mask, old_logps, ref_logps)
        snapshot = self._snapshot() if c.num_iterations > 1 else None
        micro = self._microbatches(mask.size(0))
        totals: dict[str, float] = {}
        tokens = {"logp": torch.zeros_like(mask, dtype=torch.float32),  # [N, T] each
                  "ratio": torch.ones_like(mask, dtype=torch.float32),
                  "entropy": torch.zeros_like(mask, dtype=torch.float32)}  # the sampling policy's (first forward)
        # training mode: dropout, and gradient checkpointing (HF models checkpoint only in training mode)
        with model_mode(self.model, training=True):
            try:
                updates = []  # optimizer_step's numbers, one per update
                for it in range(c.num_iterations):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss_total = 0.0
                    for micro_idx in micro:
                        normalizers = microbatch_normalizers(c.loss_type, loss_mask[micro_idx], loss_mask, len(micro))
                        for idx in self._backward_parts(rollout, micro_idx):
                            loss_total += self._backward_piece(batch, idx, it, normalizers, totals, tokens)
                    updates.append(self.optimizer_step())
                # the last update's loss; the loss scale of the step's first backward; a skip in any update counts
                totals.update({"loss": loss_total, "grad_norm": updates[-1]["grad_norm"],
                               "amp/loss_scale": updates[0]["amp/loss_scale"],
                               "amp/step_skipped": max(u["amp/step_skipped"] for u in updates),
                               "entropy/mean": masked_mean(tokens["entropy"], mask).item()})
                if ref_logps is not None:
                    tokens["kl"] = k3_kl(tokens["logp"], ref_logps.float())
                return totals, self._per_token_lists(tokens, mask)
            except BaseException:
                self.optimizer.zero_grad(set_to_none=True)
                if snapshot is not None:
                    self._restore(snapshot)
                    self._weights_touched = False  # whatever the updates did is undone
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise

    def _backward_piece(self, batch: UpdateBatch, idx: torch.Tensor, it: int, normalizers: dict,
                        totals: dict[str, float], tokens: dict[str, torch.Tensor]) -> float:
        """Forward, loss and backward of the completions idx in update `it` (0-based); returns the piece's loss.
        Adds the piece's share of the step's token-weighted statistics (1/mu of it per update) to totals, and
        writes its log-probs and entropies (first update) and its ratios to the sampling policy (last update)
        into tokens' [N, T] rows idx."""
        c = self.config
        with_entropy = it == 0 or c.top_entropy_quantile < 1.0  # for the metric, for the quantile
        out = self._logps(batch.rollout, idx, with_entropy=with_entropy)  # [n, T], logps with grad
        logps, entropies = out if with_entropy else (out, None)
        old = None if batch.old_logps is None else batch.old_logps[idx]  # [n, T]
        ref = None if batch.ref_logps is None else batch.ref_logps[idx]  # [n, T]
        loss, stats = grpo_loss(logps, old, ref, batch.advantages[idx], batch.loss_mask[idx], **loss_kwargs(c),
                                entropies=entropies, **normalizers)
        self.scaler.scale(loss).backward()
        share = stats.pop("tokens") / max(batch.loss_mask.sum().item(), 1)  # token-weighted stat means
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v * share / c.num_iterations
        if it == 0:
            tokens["logp"][idx] = logps.detach().float()
            tokens["entropy"][idx] = entropies.float()
        if it == c.num_iterations - 1 and old is not None:
            tokens["ratio"][idx] = probability_ratio(logps.detach(), old).float()
        return loss.item()

    def optimizer_step(self) -> dict[str, float]:
        """Unscale, clip, step, update the loss scale and the learning rate (unless the step was skipped), on the
        gradients the backward passes left in .grad (notebook 04 calls it after its own backward). Returns
        grad_norm, amp/loss_scale (the scale the backward used; 1.0 without loss scaling) and amp/step_skipped
        (1.0 if the GradScaler skipped the optimiser step because the gradients held inf/NaN, else 0.0)."""
        scale = self.scaler.get_scale()  # 1.0 when loss scaling is off
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        # from here the weights change, one parameter after another (AdamW also allocates its moments at its
        # first step, so this can run out of memory)
        self._weights_touched = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # update() lowers the scale (x backoff_factor) exactly when step() skipped on inf/NaN; growth only raises it
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        if not skipped:  # a skipped update does not advance the schedule (as accelerate's scheduler under TRL)
            self.scheduler.step()
        return {"grad_norm": grad_norm, "amp/loss_scale": scale, "amp/step_skipped": float(skipped)}

    def _snapshot(self) -> dict:
        """Copies of what an update changes (LoRA weights are small: this is cheap)."""
        return {"params": [p.detach().clone() for p in trainable_parameters(self.model)],
                "optimizer": _clone(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict()}

    def _restore(self, snap: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(trainable_parameters(self.model), snap["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])

    def _oom_advice(self, partly_updated: bool = False) -> str:
        c = self.config
        applied = ("the optimiser step had begun, and num_iterations = 1 keeps no copy to undo it: the parameters "
                   "may be partly updated (the data position, random streams and loss scale were given back); "
                   "resume from the last checkpoint (trainer.resume(), or --resume)" if partly_updated else
                   "the step was not applied")
        return (f"out of GPU memory during step {self.step_count + 1}; {applied}. Cheaper settings: "
                f"gradient_accumulation_steps={2 * c.gradient_accumulation_steps} (if it divides "
                f"{c.batch_size}), num_generations={max(2, c.num_generations // 2)}, max_completion_length="
                f"{max(16, c.max_completion_length // 2)}, gradient_checkpointing=True, load_in_4bit=True, or a "
                f"smaller model. `python -m grpo_lib plan` shows the memory of a configuration.")

    def _token_strings(self, completion_ids: list[list[int]]) -> list[list[str]]:
        return [[self.tokenizer.decode([t]) for t in row] for row in completion_ids]

    @staticmethod
    def _per_token_lists(stats: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, list[list[float]]]:
        lengths = mask.sum(1).tolist()
        return {k: [[round(x, 4) for x in row[:n]] for row, n in zip(v.tolist(), lengths)] for k, v in stats.items()}

    # ------------------------------------------------------------------------------------------
    # the loop, checkpoints and resume
    # ------------------------------------------------------------------------------------------

    def train(self, on_step=None) -> list[StepRecord]:
        """Steps until config.max_steps, or until the saturation or the skipped-steps stop (stop_reason says
        why). Each record is appended to run_dir/log.jsonl (flushed), sent to config.report_to's trackers and
        passed to on_step(record) (e.g. TrainingDashboard.update); checkpoints every save_steps and at the end."""
        c = self.config
        if self.run_dir is not None and not self._run_dir_checked:
            self._check_run_config()
        tracker = Tracker(c.report_to, self.run_dir, c.to_dict()) if c.report_to else None
        records = []
        try:
            while self.step_count < c.max_steps and self.stop_reason is None:
                record = self.step()
                records.append(record)
                reasons = [self._skipped_steps_stop(record), self._saturation_stop(record)]  # both count
                self.stop_reason = next((r for r in reasons if r), None)
                last = self.step_count == c.max_steps or self.stop_reason is not None
                if self.run_dir is not None:
                    runlog.append_record(self.run_dir, record)
                    if (c.save_steps and self.step_count % c.save_steps == 0) or last:
                        self.save_checkpoint()
                if tracker is not None:
                    tracker.log(record.step, record.metrics)
                if on_step is not None:
                    on_step(record)
        finally:
            if tracker is not None:
                tracker.close()
        if self.run_dir is not None and is_peft(self.model):
            self.model.save_pretrained(self.run_dir / "adapter")
        return records

    def _saturation_stop(self, record: StepRecord) -> str | None:
        """Why the run stops early, or None: the share of zero-variance groups (of every group generated, with
        dynamic sampling) at or above saturation_threshold for saturation_patience steps in a row."""
        c = self.config
        if c.saturation_threshold is None:
            return None
        share = record.metrics.get("sampling/zero_std_frac", record.metrics["adv/zero_std_frac"])
        self.saturated_steps = self.saturated_steps + 1 if share >= c.saturation_threshold else 0
        if self.saturated_steps < c.saturation_patience:
            return None
        return (f"saturated: {self.saturated_steps} steps in a row with at least {c.saturation_threshold:.0%} of the "
                f"groups zero-variance (saturation_threshold); stopped after step {self.step_count} of {c.max_steps}")

    def _skipped_steps_stop(self, record: StepRecord) -> str | None:
        """Why the run stops early, or None: max_skipped_steps steps in a row whose optimiser step fp16 loss
        scaling skipped (amp/step_skipped: inf/NaN gradients, so nothing was learned)."""
        c = self.config
        skipped = record.metrics.get("amp/step_skipped", 0.0) > 0
        self.skipped_steps = self.skipped_steps + 1 if skipped else 0
        if c.max_skipped_steps == 0 or self.skipped_steps < c.max_skipped_steps:
            return None
        return (f"fp16 overflow: the loss scaler skipped the optimiser step {self.skipped_steps} steps in a row "
                f"(inf/NaN gradients, max_skipped_steps={c.max_skipped_steps}; loss scale now "
                f"{self.scaler.get_scale():g}, loss {record.metrics.get('loss', float('nan')):.3g}); stopped after "
                f"step {self.step_count} of {c.max_steps}, nothing was learned in those steps. The forward or the "
                f"loss overflows in float16: train with dtype='bfloat16' where the GPU has bf16 (compute "
                f"capability 8+), else dtype='float32' (more memory: python -m grpo_lib plan); if earlier steps "
                f"were fine, the policy diverged: resume from an earlier checkpoint with a lower learning_rate. "
                f"`python -m grpo_lib doctor` on the run shows the losses and scales.")

    def _check_run_config(self, force: bool = False, resuming: bool = False) -> None:
        """Refuse a run directory that belongs to another config, or (without resume) already has steps."""
        old = runlog.read_run_config(self.run_dir)
        new = self.config.to_dict()
        if old is not None and not force:
            diff = runlog.config_differences(old, new)
            if diff:
                raise RunDirError(f"{self.run_dir} holds a run with a different config {diff} (old, new); "
                                  f"use another run directory, or force=True / --force to continue anyway")
        if not resuming and self.step_count == 0:
            entries, _ = runlog.read_log_lines(self.run_dir / runlog.LOG_NAME)
            if entries:
                raise RunDirError(f"{self.run_dir} already holds {len(entries)} logged step(s); resume it "
                                  f"(--resume / trainer.resume()) or choose a new run directory")
        runlog.write_run_config(self.run_dir, new)
        self._run_dir_checked = True

    def state_dict(self) -> dict:
        """What a checkpoint's trainer_state.pt holds (checkpoint.trainer_state)."""
        return checkpoint.trainer_state(self)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N: the adapter (peft format) + optimizer, scheduler, RNG states, data position."""
        return checkpoint.save_trainer(self)

    def resume(self, run_dir: str | None = None, force: bool = False) -> int:
        """Continue from the last good checkpoint of run_dir: weights, optimiser, scheduler, RNG, data
        position. Log lines after it are moved to log.dropped.jsonl (they will be redone). Returns the
        step resumed from (0 if there is no checkpoint: the run starts over)."""
        self.run_dir = Path(run_dir) if run_dir else self.run_dir
        if self.run_dir is None:
            raise RunDirError("resume needs a run_dir")
        self._check_run_config(force, resuming=True)
        return checkpoint.resume_trainer(self)


def step_metrics(scores, rewards: torch.Tensor, advantages: torch.Tensor, zero_std: torch.Tensor, rollout,
                 train_stats: dict, times: dict[str, float], lr: float, sampling_stats: dict | None = None
                 ) -> dict[str, float]:
    """The flat metrics of one step: rewards (total over the scorable completions and per function),
    advantages, the update's loss/KL/clip statistics, lengths, learning rate, timings, and dynamic
    sampling's search (whose token count, all rounds included, replaces the trained batch's).
    rewards, advantages: [groups, G]; zero_std: [groups]."""
    metrics = {**advantage_stats(rewards, advantages, zero_std), **train_stats, **scores.logged_metrics}
    for f, name in enumerate(scores.names):
        col = scores.per_func[:, f]
        metrics[f"reward/{name}/mean"] = col.nanmean().item() if (~col.isnan()).any() else float("nan")
    lengths = rollout.lengths.float()
    generated = int(lengths.sum())
    metrics.update({
        "completion/mean_length": lengths.mean().item(),
        "completion/truncated_frac": rollout.truncated.float().mean().item(),
        "lr": lr,
        **{f"time/{phase}_s": seconds for phase, seconds in times.items()},
        "time/step_s": sum(times.values()), "tokens/generated": generated,
    })
    metrics.update(sampling_stats or {})
    metrics["tokens/generate_per_s"] = metrics["tokens/generated"] / max(times["generate"], 1e-9)
    return {**metrics, **runlog.trl_aliases(metrics)}  # TRL's names too (runlog.TRL_METRIC_NAMES)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj
