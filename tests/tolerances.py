"""Named tolerances and comparison helpers shared by every numerics test.

The rule (aesthetics.md "one oracle, three numbers"): a kernel is judged against the oracle
(``thrift_inductor.reference``) with a budget *relative to the oracle's own distance from exact
attention*, plus a floor for the output dtype's rounding, never with a bare atol picked to pass.
"""
from __future__ import annotations

import math

import torch

# --- output-dtype rounding floors -------------------------------------------------------------
# Kernel and oracle both round their fp32 result to the output dtype; where their fp32 values differ
# by summation order the rounding can land one ulp apart. A floor of one unit roundoff times ||exact||
# (i.e. as if *every* element were half an ulp off) covers that without hiding real errors.
UNIT_ROUNDOFF = {
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
    torch.float32: 2.0 ** -24,
}
# fp32 outputs: kernels sum in a different order than the oracle's matmuls; 1e-5 relative is far
# below any quantisation error (>= 1e-3 for fp8) and far above fp32 reorder noise (~1e-7 * sqrt(L)).
FP32_REORDER_FLOOR = 1e-5
KERNEL_BUDGET = 0.05   # kernel may be 5% of the oracle's own error away from the oracle
# Compiled fp8 on sm_90: the wgmma sums each 32-element K-step in ~14 bits (the kernel re-accumulates in
# fp32 between steps), flipping a few P codes; measured 3.6-5.2% of the oracle's error on H200
# (tests/gpu/test_attention_cuda.py). The interpreter has no such floor and keeps the strict budgets.
FP8_GPU_BUDGET = 0.08

# --- oracle vs SDPA at fraction = 1 (every block on the high path) -----------------------------
# fp32: the only differences are summation order and exp vs SDPA's softmax: rtol/atol at ~100 ulp.
SDPA_FP32_ATOL, SDPA_FP32_RTOL = 1e-5, 1e-4
# bf16 / fp16: the oracle additionally rounds P to the input dtype (numerics §4), SDPA does not on
# CPU (math backend upcasts); a few ulps of the output dtype.
SDPA_BF16_ATOL, SDPA_BF16_RTOL = 2e-2, 2e-2
SDPA_FP16_ATOL, SDPA_FP16_RTOL = 3e-3, 3e-3

# --- quantisation sanity floors (SQNR of fake-quantised Gaussian data, dB) ----------------------
# Measured on N(0,1) [64, 256] tensors (5 seeds, spread < 0.2 dB): e4m3 with per-token scales 31.6 dB,
# NVFP4 (E2M1, 16-blocks, E4M3 scales) 20.4 dB, MXFP4 (power-of-two scales, 32-blocks) 18.7 dB.
# The floors sit ~2 dB below, so a broken scale or grid (a factor 2 costs ~6 dB) fails.
SQNR_FLOOR_DB = {"fp8": 29.5, "nvfp4": 18.5, "mxfp4": 16.5}


def dtype_floor(dtype: torch.dtype) -> float:
    """Relative floor for comparing two results rounded to ``dtype``."""
    if dtype == torch.float32:
        return FP32_REORDER_FLOOR
    return UNIT_ROUNDOFF.get(dtype, FP32_REORDER_FLOOR)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (0 if both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio, 10 log10(||x||^2 / ||x - x_hat||^2), in dB."""
    err = rel_l2(x_hat, x)
    return math.inf if err == 0.0 else -20.0 * math.log10(err)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def assert_kernel_matches_oracle(kernel_out: torch.Tensor, oracle_out: torch.Tensor, exact_out: torch.Tensor,
                                 budget: float = KERNEL_BUDGET, floor: float | None = None) -> None:
    """Assert ``||kernel - oracle|| <= budget * ||oracle - exact|| + floor * ||exact||``.

    ``floor`` defaults to ``dtype_floor(oracle_out.dtype)``. All norms are L2 over the whole tensor in
    fp64; tensors are moved to the CPU so CUDA kernels can be compared with a CPU oracle."""
    if kernel_out.shape != oracle_out.shape or oracle_out.shape != exact_out.shape:
        raise AssertionError(f"shape mismatch: kernel {tuple(kernel_out.shape)}, oracle "
                             f"{tuple(oracle_out.shape)}, exact {tuple(exact_out.shape)}")
    if floor is None:
        floor = dtype_floor(oracle_out.dtype)
    k, o, e = (t.detach().double().cpu() for t in (kernel_out, oracle_out, exact_out))
    if not torch.isfinite(k).all():
        bad = (~torch.isfinite(k)).nonzero()[:5].tolist()
        raise AssertionError(f"kernel output has non-finite values, first at {bad}")
    dist = (k - o).norm().item()
    oracle_err = (o - e).norm().item()
    exact_norm = e.norm().item()
    allowed = budget * oracle_err + floor * exact_norm
    if not dist <= allowed:
        worst = (k - o).abs().flatten().argmax().item()
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), k.shape))
        raise AssertionError(
            f"kernel vs oracle ||diff|| = {dist:.4g} > allowed {allowed:.4g} "
            f"(budget {budget} x oracle error {oracle_err:.4g} + floor {floor:.3g} x ||exact|| {exact_norm:.4g}); "
            f"rel_l2(kernel, oracle) = {dist / max(o.norm().item(), 1e-300):.4g}, worst element {idx}: "
            f"kernel {k[idx].item():.6g} oracle {o[idx].item():.6g} exact {e[idx].item():.6g}")


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Equality including dtype and shape, with the first mismatches in the message (NaN == NaN)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: shape/dtype {tuple(actual.shape)} {actual.dtype} != "
                             f"{tuple(expected.shape)} {expected.dtype}")
    a, b = actual.detach().cpu(), expected.detach().cpu()
    same = (a == b)
    if a.is_floating_point():
        same |= torch.isnan(a) & torch.isnan(b)
    if not same.all():
        where = (~same).nonzero()[:5]
        rows = [f"{tuple(i.tolist())}: {a[tuple(i)].item()} vs {b[tuple(i)].item()}" for i in where]
        raise AssertionError(f"{what}: {int((~same).sum())} of {a.numel()} elements differ; first: {rows}")
