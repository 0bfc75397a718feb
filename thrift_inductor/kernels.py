"""Eager CUDA orchestration: prepass -> selection -> attention, three Triton launches (docs/kernels.md).

``thrift::attention``'s CUDA impl (``ops.py``) asks ``supports`` first and runs
``thrift_attention_triton`` when it says yes; otherwise it uses the oracle. Launchers are called
directly (not through the ``thrift::prepass`` / ``thrift::select`` ops) to skip dispatcher overhead;
the numerics are the same either way.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
import triton

from .config import ThriftConfig
from .constants import MAX_KV_BLOCKS_SELECT
from .templates.prepass import prepass
from .templates.select import select

log = logging.getLogger("thrift_inductor")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ThriftConfig) -> str:
    """Empty string when the Triton path runs this call, else the reason it does not."""
    tensors = (("q", q), ("k", k), ("v", v))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-d tensor"
        if not (t.is_cuda or (t.device.type == "cpu" and _interpreting())):
            return f"{name} is not a CUDA tensor (CPU tensors need TRITON_INTERPRET=1)"
    if not (q.device == k.device == v.device):
        return "q, k, v are on different devices"
    if not (q.dtype == k.dtype == v.dtype):
        return f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} are not [B,Hq,Lq,D], [B,Hkv,Lk,D] x2"
    if Hkv == 0 or Hq % Hkv != 0:
        return f"Hq={Hq} is not a multiple of Hkv={Hkv}"
    if Lk == 0:
        return "no keys (Lk == 0)"
    if triton.cdiv(Lk, cfg.block_size) > MAX_KV_BLOCKS_SELECT:
        return f"{triton.cdiv(Lk, cfg.block_size)} kv blocks exceed MAX_KV_BLOCKS_SELECT={MAX_KV_BLOCKS_SELECT}"
    # The attention kernel owns its own limits (dtype, head dim, block size, p_quant).
    from .templates.attention import can_implement
    ok, reason = can_implement(cfg, D, q.dtype, cfg.block_size)
    return "" if ok else reason


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ThriftConfig) -> bool:
    """Whether ``thrift_attention_triton`` computes this call (the reason is logged at DEBUG)."""
    reason = why_not(q, k, v, cfg)
    if reason:
        log.debug("thrift Triton path declined: %s", reason)
    return not reason


def thrift_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float],
                            is_causal: bool, config: Optional[ThriftConfig] = None,
                            cfg: Optional[ThriftConfig] = None) -> torch.Tensor:
    """ThriftAttention forward on CUDA: ``[B, Hq, Lq, D]`` in ``q.dtype``.

    ``config`` (``cfg`` is accepted as an alias) defaults to ``ThriftConfig()``; ``scale=None`` means
    ``1/sqrt(D)`` (SDPA semantics). Inputs may have any strides.
    """
    if config is not None and cfg is not None and config != cfg:
        raise ValueError("pass either config= or cfg=, not two different configs")
    config = config or cfg or ThriftConfig()
    reason = why_not(q, k, v, config)
    if reason:
        raise ValueError(f"thrift_attention_triton cannot run this call: {reason}")
    from .templates.attention import attention_forward   # imported late: it is the largest kernel module

    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    pre = prepass(q, k, v, config.format, config.block_size)
    lists = select(pre, Lq, Lk, is_causal=is_causal, config=config)
    return attention_forward(q, k, v, pre.q_lo, pre.q_scale, pre.k_lo, pre.k_scale, pre.v_lo_t, pre.v_scale,
                             lists.hi_idx, lists.hi_cnt, lists.lo_idx, lists.lo_cnt,
                             scale=scale, is_causal=is_causal, cfg=config)
