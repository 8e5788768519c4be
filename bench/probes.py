"""Small measurements behind the findings in results.md (each a few seconds to a minute on CPU).

    python bench/probes.py saved      # autograd's saved bytes of shared_prompt_logps vs grpo_lib.memory's count
    python bench/probes.py sampler    # torch.multinomial vs exponential-race sampling of [32, vocab] probs
    python bench/probes.py gqa        # saved bytes and time of shared_prompt_logps, repeat_kv vs SDPA's enable_gqa

All on the embedded SmolLM2-135M-Instruct with LoRA r=16, one group: G=8 completions of T=64 tokens
after the 81-token one-shot `larger` prompt.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

G, P, T = 8, 81, 64


def policy():
    from grpo_lib import models

    model, tokenizer = models.load_policy("smollm2-135m", lora_r=16, device="cpu")
    model.train()
    return model, tokenizer


def group_inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (P,), generator=g), torch.randint(3, vocab, (G, T), generator=g)


def saved_bytes(model, fn) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct non-parameter storages autograd saves while fn() runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def probe_saved() -> None:
    from grpo_lib import memory, model_specs
    from grpo_lib.logprobs import shared_prompt_logps

    model, _ = policy()
    spec = model_specs.model_spec(model)
    prompt, completions = group_inputs(spec.vocab_size)
    measured, _ = saved_bytes(model, lambda: shared_prompt_logps(model, prompt[None], torch.ones_like(prompt)[None], completions,
                                                            torch.zeros(len(completions), dtype=torch.long)))
    tokens = P + G * (T - 1)  # the prompt once, then T-1 completion tokens per row on its cache
    per_token = memory.layer_activation_bytes(spec, True, "all-linear", 16)
    kv = G * (P + T - 1) * 2 * spec.q_dim * 4 + P * 2 * spec.kv_dim * 4
    predicted = spec.num_layers * (tokens * per_token + kv)
    print(f"saved by autograd: {measured / 2**20:.1f} MiB; memory.py's count: {predicted / 2**20:.1f} MiB "
          f"({predicted / measured:.3f}x); of which keys/values {spec.num_layers * kv / 2**20:.1f} MiB")


def probe_sampler(repeats: int = 20) -> None:
    """Sampling one token per row: multinomial (what generate() does), the exponential race argmax(p / E),
    E ~ Exp(1), and grpo_lib.sampling.draw (two-level inverse CDF), which draw from the same distribution."""
    from grpo_lib.sampling import draw as two_level

    vocab = 49152
    probs = torch.softmax(torch.randn(G * 4, vocab), dim=-1)
    for name, draw in (("torch.multinomial", lambda: torch.multinomial(probs, 1)),
                       ("argmax(p / Exp(1))", lambda: (probs / torch.empty_like(probs).exponential_()).argmax(-1)),
                       ("sampling.draw", lambda: two_level(probs))):
        draw()
        t = time.perf_counter()
        for _ in range(repeats):
            draw()
        print(f"{name:20} {1000 * (time.perf_counter() - t) / repeats:7.2f} ms per decoding step of {G * 4} rows")
    # same distribution: frequencies of a small categorical
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(200000, 4)
    a = torch.multinomial(p, 1).flatten().bincount(minlength=4) / 200000
    b = (p / torch.empty_like(p).exponential_()).argmax(-1).bincount(minlength=4) / 200000
    print(f"frequencies multinomial {a.tolist()}, exponential race {b.tolist()}")


def probe_gqa() -> None:
    from grpo_lib.logprobs import shared_prompt_logps

    model, _ = policy()
    prompt, completions = group_inputs(model.config.vocab_size)
    results = {}
    for force in ("0", "1"):
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = force  # read by transformers at every attention call
        for _ in range(2):  # the second run is timed
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            nbytes, logps = saved_bytes(model, lambda: shared_prompt_logps(model, prompt[None], torch.ones_like(prompt)[None], completions,
                                                            torch.zeros(len(completions), dtype=torch.long)))
            logps.sum().backward()
            elapsed = time.perf_counter() - t
        results[force] = logps.detach()
        print(f"TRANSFORMERS_SDPA_FORCE_GQA={force}: saved {nbytes / 2**20:7.1f} MiB, forward+backward "
              f"{elapsed:.2f}s")
    print(f"max |logp difference|: {(results['0'] - results['1']).abs().max().item():.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["saved", "sampler", "gqa"])
    args = ap.parse_args(argv)
    {"saved": probe_saved, "sampler": probe_sampler, "gqa": probe_gqa}[args.probe]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
