"""Pure eligibility predicates: may this attention site become ``thrift::attention``?

Each ``check_*`` returns ``None`` when fine, else a short reason string. Reasons are stable names
(they end up in ``counters["thrift"]["skipped:<reason>"]`` and in ``explain()`` tables).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ThriftConfig

# Reason names (one per way a site can be refused).
MASK = "mask"                  # attn_mask that is not provably causal
DROPOUT = "dropout"            # dropout_p > 0: ThriftAttention has no dropout
TRAINING = "training"          # the site's outputs feed a backward op (no thrift backward yet)
DTYPE = "dtype"                # inputs not all one of fp16 / bf16 / fp32
HEAD_DIM = "head_dim"          # head dim the chosen format cannot take
DV_MISMATCH = "dv_ne_d"        # value head dim differs from query/key head dim
GQA_HEADS = "gqa_heads"        # query heads not a multiple of key/value heads
RANK = "rank"                  # not 4-D [B, H, L, D]
DYNAMIC_HEAD_DIM = "dynamic_head_dim"   # head dim must be static (kernel constexpr, format check)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP4_FORMATS = ("nvfp4", "mxfp4")
# Head dims the FP4 kernels are written for (numerics.md §2: whole 16/32-element scale blocks).
FP4_HEAD_DIMS = (64, 128, 256)
# fp8 wgmma needs the reduction dim (head dim) in multiples of 16 (e4m3 k-width 32 bytes / 2).
FP8_HEAD_DIM_MULTIPLE = 16


def check_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return DTYPE
    return None


def check_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    return None if q.dim() == k.dim() == v.dim() == 4 else RANK


def check_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ThriftConfig) -> Optional[str]:
    d, dk, dv = q.shape[-1], k.shape[-1], v.shape[-1]
    if not all(isinstance(x, int) for x in (d, dk, dv)):
        return DYNAMIC_HEAD_DIM
    if dv != d or dk != d:
        return DV_MISMATCH
    if cfg.format in FP4_FORMATS:
        return None if d in FP4_HEAD_DIMS else HEAD_DIM
    return None if d % FP8_HEAD_DIM_MULTIPLE == 0 else HEAD_DIM


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    hq, hk, hv = q.shape[1], k.shape[1], v.shape[1]
    try:
        ok = hk == hv and hq % hk == 0
    except Exception:   # symbolic head counts we cannot decide: refuse rather than guard
        return GQA_HEADS
    return None if ok else GQA_HEADS


def check_dropout(dropout_p) -> Optional[str]:
    return None if dropout_p in (0, 0.0, None) else DROPOUT


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ThriftConfig) -> Optional[str]:
    """All shape/dtype predicates, first failure wins."""
    return (check_rank(q, k, v) or check_dtype(q, k, v) or check_head_dim(q, k, v, cfg)
            or check_heads(q, k, v))
