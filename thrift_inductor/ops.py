"""The graph-visible op ``thrift::attention``.

Custom ops are opaque to AOTAutograd and decompositions, so the Inductor lowering (``lowering.py``)
sees exactly this node. Every ``ThriftConfig`` field travels as an op argument (never a global), so
two call sites with different configs are two different nodes and cache keys see the config.

Implementations:
- Fake (meta): shape/dtype only; output is contiguous ``[B, Hq, Lq, Dv]`` in ``q.dtype``.
- CPU and any other device: the oracle ``reference.thrift_attention_reference`` (the kernels run on CPU
  only through the Inductor template under the interpreter, or ``pipeline.run`` called directly).
- CUDA: ``pipeline.run`` on a kernel implementation. Never the oracle: a problem no kernel takes raises
  with the reason from ``problem.why_not`` (the API and the FX pass ask the same predicate first, so a
  compiled model never gets here with such a problem).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from .config import ThriftConfig

log = logging.getLogger("thrift_inductor")

OP_NAME = "thrift::attention"
# Explicit schema: inferred annotations would make the ints SymInt, and these are config constants.
OP_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float? scale, bool is_causal, str format, float fraction, "
             "int? top_k, str selection, int block_size, str p_quant, int? window=None, int sink_blocks=0, "
             "str q_quant=\"format\", bool smooth_q=False) -> Tensor")
# The opt-in fidelity levers the op carries (numerics §4d) and the stage op that reads each: keyword op
# arguments, present only when a lever is on, so a graph without levers keeps its form and its cache keys.
SELECT_LEVERS = ("sink_blocks",)              # thrift::select ranks the sink blocks first
PREPASS_LEVERS = ("q_quant", "smooth_q")      # thrift::prepass quantises Q differently, adds key_bias
OP_LEVERS = SELECT_LEVERS + PREPASS_LEVERS


def config_to_op_args(cfg: ThriftConfig) -> tuple:
    """The trailing op arguments (after q, k, v, scale, is_causal) that encode ``cfg``."""
    return (cfg.format, float(cfg.fraction), cfg.top_k, cfg.selection, int(cfg.block_size), cfg.p_quant)


def config_to_op_kwargs(cfg: ThriftConfig, names: tuple = OP_LEVERS) -> dict:
    """Keyword op arguments of the opt-in levers the op carries (``OP_LEVERS``, or the subset ``names`` a
    stage op takes), only those that are on: a graph without them keeps its old form (and its cache keys)."""
    levers = cfg.levers()
    return {name: levers[name] for name in names if name in levers}


def config_from_op_args(format: str, fraction: float, top_k: Optional[int], selection: str,
                        block_size: int, p_quant: str, sink_blocks: int = 0, q_quant: str = "format",
                        smooth_q: bool = False) -> ThriftConfig:
    return ThriftConfig(format=format, fraction=fraction, top_k=top_k, selection=selection,
                        block_size=block_size, p_quant=p_quant, sink_blocks=sink_blocks, q_quant=q_quant,
                        smooth_q=smooth_q)


def _reference(q, k, v, scale, is_causal, cfg, window=None):
    # Imported lazily: the oracle is only needed when the op actually runs, not to trace or rewrite.
    from .reference import thrift_attention_reference
    extra = {} if window is None else {"window": window}
    out = thrift_attention_reference(q, k, v, is_causal=is_causal, scale=scale, config=cfg, **extra)
    return out.to(q.dtype).contiguous()


def _kernels(q, k, v, scale, is_causal, cfg, window=None):
    from . import pipeline
    if q.numel() == 0 or k.shape[2] == 0:      # empty problems: SDPA's answer (empty, or zeros without keys)
        return q.new_zeros((*q.shape[:3], v.shape[-1]))
    return pipeline.run(q, k, v, scale=scale, is_causal=is_causal, config=cfg, window=window).contiguous()


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=OP_SCHEMA)
def thrift_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool,
                     format: str, fraction: float, top_k: Optional[int], selection: str,
                     block_size: int, p_quant: str, window: Optional[int] = None, sink_blocks: int = 0,
                     q_quant: str = "format", smooth_q: bool = False) -> Tensor:
    """ThriftAttention forward. q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (GQA when Hq % Hkv == 0)."""
    cfg = config_from_op_args(format, fraction, top_k, selection, block_size, p_quant, sink_blocks, q_quant,
                              smooth_q)
    return _reference(q, k, v, scale, is_causal, cfg, window)


@thrift_attention.register_fake
def _thrift_attention_fake(q, k, v, scale, is_causal, format, fraction, top_k, selection,
                           block_size, p_quant, window=None, sink_blocks=0, q_quant="format", smooth_q=False):
    # Also the Meta kernel, which the dispatcher picks for mixed cpu/meta inputs: without this check a
    # device mismatch would return an uninitialised tensor instead of an error (and tracing would pass).
    if not (q.device == k.device == v.device):
        raise ValueError(f"thrift attention: query, key and value must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[-1]))    # contiguous, like every real impl


@thrift_attention.register_kernel("cuda")
def _thrift_attention_cuda(q, k, v, scale, is_causal, format, fraction, top_k, selection,
                           block_size, p_quant, window=None, sink_blocks=0, q_quant="format", smooth_q=False):
    cfg = config_from_op_args(format, fraction, top_k, selection, block_size, p_quant, sink_blocks, q_quant,
                              smooth_q)
    return _kernels(q, k, v, scale, is_causal, cfg, window)


def call_op(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float], is_causal: bool,
            config: ThriftConfig, window: Optional[int] = None) -> Tensor:
    """Call ``torch.ops.thrift.attention`` with ``config`` spelled out as op arguments."""
    extra = {} if window is None else {"window": int(window)}
    return torch.ops.thrift.attention.default(q, k, v, None if scale is None else float(scale),
                                              bool(is_causal), *config_to_op_args(config), **extra,
                                              **config_to_op_kwargs(config))
