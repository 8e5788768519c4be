"""tests/fp16_matmuls.py stands in for a GPU's fp16 tensor cores in the colab-t4 notebook runs: it must give
what they give (products of fp16 inputs accumulated in fp32, rounded to fp16) and keep every dtype float16."""

import torch

from tests.fp16_matmuls import Fp16MatmulsInFloat32


def test_fp16_products_are_fp32_products_rounded_to_fp16_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float16, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float16, requires_grad=True)
    b = torch.randn(3, dtype=torch.float16)
    with Fp16MatmulsInFloat32():
        y = torch.nn.functional.linear(x, w, b)
        y.backward(torch.ones_like(y))
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.float16
    assert torch.equal(y, (x.float() @ w.float().T + b.float()).half())
    assert torch.equal(x.grad, (torch.ones(5, 3) @ w.float()).half())  # d(sum y)/dx = 1 @ W
    assert torch.equal(w.grad, (torch.ones(3, 5) @ x.float()).half())


def test_overflow_gives_inf_as_on_the_gpu_and_other_dtypes_are_untouched():
    big = torch.full((1, 2), 300.0, dtype=torch.float16)
    with Fp16MatmulsInFloat32():
        assert torch.isinf(big @ big.T).all()  # 2 * 300^2 = 180000 > 65504, the largest float16
        a = torch.randn(2, 2, dtype=torch.float64)
        assert (a @ a).dtype == torch.float64
