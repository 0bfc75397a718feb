"""Smoothing statistics of the ``smooth_q`` lever (numerics §4d): Q's token mean and the key bias.

``smooth_q`` quantises ``q - q_mean`` on the low path and adds back the exact per-key term
``key_bias = q_mean . k`` (per query head and key), since ``q . k = (q - q_mean) . k + q_mean . k``.
Both are statistics of the whole call, so they run before the prepass (which subtracts ``q_mean``) as two
small memory-bound kernels:

- ``token_mean(x)`` ``[B, H, L, D] -> [B, H, D]`` fp32: the fp64 sum over the tokens of the finite-or-zero
  input (numerics §4b: a NaN / inf element reads as 0), divided by L in fp64, rounded to fp32 once —
  ``reference.quant.token_mean``. Grid ``(cdiv(L, TILE_T), B * H)``: each program writes the fp64 sum of its
  tile; the partial sums are added on the host side in one fixed order (exact for <= 16-bit inputs, whose
  fp64 sums do not round), so no atomics and no order dependence.
- ``key_bias(k, q_mean)`` ``-> [B, Hq, Lk]`` fp32: ``q_mean[h] . k[c]`` for the query heads of each kv head
  (GQA), fp64 products of fp32 values (exact) summed in fp64 and rounded once, as the oracle's ``_gqa_dot``
  (the summation order differs, so the fp32 result may differ in the last bit where the fp64 sum rounds).
  Grid ``(cdiv(Lk, TILE_T), B * Hkv)``: a program reads its k tile once for all ``Hq / Hkv`` query heads.

The torch twins (``*_torch``) are the oracle's functions; the CPU op path and the tests use them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per program: a [TILE_T, D] fp64 tile (<= 64 x 256 x 8 B = 128 KiB of registers spread over the
# warps) keeps the grid wide at short lengths and the partial-sum tensor small at long ones.
_TILE_T = 64
_NUM_WARPS = 4


@triton.jit
def _finite_tile(X, off_z, off_h, offs_t, offs_d, stride_z, stride_h, stride_t, stride_d, L):
    """The ``[TILE_T, D]`` tile of tokens ``offs_t`` as fp64, non-finite elements and padding read as 0."""
    ptrs = (X + off_z.to(tl.int64) * stride_z + off_h.to(tl.int64) * stride_h
            + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :] * stride_d)
    x = tl.load(ptrs, mask=(offs_t < L)[:, None], other=0.0).to(tl.float32)
    return tl.where(tl.abs(x) < float("inf"), x, 0.0).to(tl.float64)    # |NaN| < inf is False too


@triton.jit
def _token_sum_kernel(X, PART, stride_z, stride_h, stride_t, stride_d, H, L, NT,
                      D: tl.constexpr, TILE_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_t = pid_t * TILE_T + tl.arange(0, TILE_T)
    offs_d = tl.arange(0, D)
    x = _finite_tile(X, pid_bh // H, pid_bh % H, offs_t, offs_d, stride_z, stride_h, stride_t, stride_d, L)
    tl.store(PART + (pid_bh.to(tl.int64) * NT + pid_t) * D + offs_d, tl.sum(x, axis=0))


@triton.jit
def _key_bias_kernel(K, QM, KB, stride_z, stride_h, stride_t, stride_d, Hkv, Lk,
                     D: tl.constexpr, TILE_T: tl.constexpr, GROUP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_z = pid_bh // Hkv
    off_h = pid_bh % Hkv
    offs_t = pid_t * TILE_T + tl.arange(0, TILE_T)
    offs_d = tl.arange(0, D)
    k = _finite_tile(K, off_z, off_h, offs_t, offs_d, stride_z, stride_h, stride_t, stride_d, Lk)
    for g in tl.static_range(GROUP):
        row = pid_bh.to(tl.int64) * GROUP + g            # query head off_h * GROUP + g of batch off_z
        qm = tl.load(QM + row * D + offs_d).to(tl.float64)
        kb = tl.sum(k * qm[None, :], axis=1)             # fp32 x fp32 products are exact in fp64
        tl.store(KB + row * Lk + offs_t, kb.to(tl.float32), mask=offs_t < Lk)


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, L, D], got {tuple(x.shape)}")
    d = x.shape[3]
    if d & (d - 1):                                      # tl.arange spans the head dim
        raise ValueError(f"the smoothing kernels need a power-of-two head dim, got {d}")


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of the finite-or-zero ``x [B, H, L, D]``: fp32 ``[B, H, D]`` (L == 0: zeros)."""
    _check(x, "x")
    B, H, L, D = x.shape
    if L == 0 or B * H == 0:
        return torch.zeros((B, H, D), dtype=torch.float32, device=x.device)
    nt = triton.cdiv(L, _TILE_T)
    part = torch.empty((B * H, nt, D), dtype=torch.float64, device=x.device)
    _token_sum_kernel[(nt, B * H)](x, part, *x.stride(), H, L, nt, D=D, TILE_T=_TILE_T, num_warps=_NUM_WARPS)
    return (part.sum(1) / L).float().view(B, H, D)


def key_bias(k: torch.Tensor, q_mean: torch.Tensor) -> torch.Tensor:
    """``q_mean[b, h] . k[b, h // G, c]`` for every query head h and key c: fp32 ``[B, Hq, Lk]``
    (``q_mean`` fp32 ``[B, Hq, D]``, ``G = Hq / Hkv``; non-finite k elements read as 0)."""
    _check(k, "k")
    B, Hkv, Lk, D = k.shape
    if q_mean.dim() != 3 or q_mean.shape[0] != B or q_mean.shape[2] != D or Hkv == 0 or q_mean.shape[1] % Hkv:
        raise ValueError(f"q_mean must be [B={B}, Hq (a multiple of {Hkv}), D={D}], got {tuple(q_mean.shape)}")
    Hq = q_mean.shape[1]
    out = torch.empty((B, Hq, Lk), dtype=torch.float32, device=k.device)
    if Lk == 0 or B * Hq == 0:
        return out
    _key_bias_kernel[(triton.cdiv(Lk, _TILE_T), B * Hkv)](
        k, q_mean.float().contiguous(), out, *k.stride(), Hkv, Lk, D=D, TILE_T=_TILE_T, GROUP=Hq // Hkv,
        num_warps=_NUM_WARPS)
    return out


# ------------------------------------------------------------------------------------------------
# Torch twins: the oracle's functions (reference.quant), in the kernels' layout
# ------------------------------------------------------------------------------------------------
def token_mean_torch(x: torch.Tensor) -> torch.Tensor:
    from ..reference.quant import finite_or_zero
    from ..reference.quant import token_mean as ref_token_mean
    return ref_token_mean(finite_or_zero(x).float())[:, :, 0]


def key_bias_torch(k: torch.Tensor, q_mean: torch.Tensor) -> torch.Tensor:
    from ..reference.quant import _gqa_dot, finite_or_zero
    return _gqa_dot(finite_or_zero(k).float(), q_mean.float()[:, :, None, :])
