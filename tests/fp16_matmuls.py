"""fp16 matrix products on a CPU at fp32 speed, computed as a GPU's tensor cores compute them.

A CPU without AVX512-FP16 multiplies float16 matrices some 60x slower than float32 (329 ms vs 5.6 ms for
512x576 @ 576x1536 on this project's 2-core EPYC VM), so the colab-t4 preset's fp16 code path would take
hours in tests/test_notebooks.py. `Fp16MatmulsInFloat32`, a torch dispatch mode, runs each float16 matrix
product (forward and backward: dispatch modes see the ops autograd runs) with float32 inputs and rounds the
result to float16, which is what a T4's fp16 tensor cores do (fp16 inputs are exact in fp32; products
accumulate in fp32; the output is fp16, overflowing to inf as on the GPU). Every tensor the code under test
sees keeps dtype float16, so loss scaling, inf checks and dtype casts run as they would on the GPU; only
the kernel differs.

It models what grpo_lib asks of cuBLAS under fp16, and nothing looser: models.fp16_matmuls_accumulate_in_fp32
turns off reduced-precision reductions (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction =
False; fp16 accumulation is off by default), so a GPU accumulates every product in fp32 and rounds once, as
here: a partial sum above 65504 does not overflow if the result fits (tests/test_fp16.py checks it). With
torch's default (reductions allowed) cuBLAS may round split-K partial sums to fp16, which this mode would miss.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


def _is_cpu_half(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float16 and x.device.type == "cpu"


def _widened(tree):
    return tree_map(lambda a: a.float() if _is_cpu_half(a) else a, tree)


class Fp16MatmulsInFloat32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # bitsandbytes' nf4 matmul dequantises to A's dtype and multiplies inside its own kernel, where this
        # mode no longer sees the product: widen A (and the bias) instead
        if (func in MATMULS or func.namespace == "bitsandbytes" and func.__name__.startswith("gemm_4bit")) and \
                any(_is_cpu_half(a) for a in args):
            return func(*_widened(args), **_widened(kwargs)).half()
        return func(*args, **kwargs)


def notebook_cell() -> str:
    """Source of a cell to inject after a notebook's parameters cell: from there on, fp16 matrix products run
    as above (the mode stays entered for the kernel's life)."""
    path = __file__
    return (
        "# injected by tests/fp16_matmuls.py: fp16 matmuls computed in fp32 and rounded to fp16, as on a T4\n"
        "import importlib.util as _importlib_util\n"
        f"_spec = _importlib_util.spec_from_file_location('fp16_matmuls', {path!r})\n"
        "fp16_matmuls = _importlib_util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(fp16_matmuls)\n"
        "fp16_matmuls.Fp16MatmulsInFloat32().__enter__()\n"
    )
