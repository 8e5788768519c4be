"""Random number streams: seeding them all, saving and restoring them all.

Sampling draws from torch's generator of the device the logits live on (the CPU's, or each GPU's);
Python's and NumPy's generators are seeded too so that a run is reproducible end to end. A checkpoint
stores every stream (rng_state), and an evaluation runs inside forked_rng so that it never changes
what training samples next.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch's CPU generator and every GPU's (torch.manual_seed seeds all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every stream seed_everything touches: python, numpy, torch (CPU) and cuda (all devices, or None)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def forked_rng(seed: int):
    """Inside the block every stream is seeded with `seed`; afterwards all are as they were before."""
    saved = rng_state()
    try:
        seed_everything(seed)
        yield
    finally:
        set_rng_state(saved)
