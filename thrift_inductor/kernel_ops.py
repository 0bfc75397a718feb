"""Graph-visible ops for the two helper kernels: ``thrift::prepass`` and ``thrift::select``.

The Inductor lowering emits them as fallback kernels ahead of the attention template (docs/kernels.md):
Custom ops are opaque to AOTAutograd, so the graph keeps exactly these nodes, and their fake impls give
output shapes that are plain functions of the input sizes (``ceil(L / bs)``), which is what dynamic
sequence lengths need: no data-dependent shape, no guard on the length.

Implementations, per device:
- CUDA: the Triton kernels (``kernels/prepass.py``, ``kernels/select.py``).
- CPU: the same Triton kernels through the interpreter when ``TRITON_INTERPRET=1``, else the pure-torch
  twins built from the oracle (identical results; the tests hold both to that).
Outputs are always contiguous, matching the fakes.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import Tensor

from .config import ThriftConfig
from .ops import PREPASS_LEVERS, SELECT_LEVERS, config_to_op_kwargs
from .kernels import prepass as _prepass
from .kernels import select as _select

PREPASS_OP = "thrift::prepass"
SELECT_OP = "thrift::select"


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def select_config(selection: str, fraction: float, top_k: Optional[int], block_size: int,
                  sink_blocks: int = 0) -> ThriftConfig:
    """The part of ``ThriftConfig`` that selection reads (format and p_quant do not matter to it)."""
    return ThriftConfig(selection=selection, fraction=fraction, top_k=top_k, block_size=block_size,
                        sink_blocks=sink_blocks)


@torch.library.custom_op(PREPASS_OP, mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, str format, int block_size, "
                                "str q_quant=\"format\", bool smooth_q=False) -> Tensor[]")
def prepass_op(q: Tensor, k: Tensor, v: Tensor, format: str, block_size: int, q_quant: str = "format",
               smooth_q: bool = False) -> List[Tensor]:
    """docs/kernels.md §1 outputs, in order: q_lo, q_scale, k_lo, k_scale, v_lo_t, v_scale, q_mean,
    k_mean, k_min, k_max; then the lever outputs that are on (``prepass.LeverOutputs``: key_bias with
    ``smooth_q``). ``q_quant`` / ``smooth_q``: the low-path levers of numerics §4d."""
    prep, levers = _prepass.run(q, k, v, format, block_size, q_quant=q_quant, smooth_q=smooth_q,
                                torch_twin=not _use_triton(q))
    return list(prep) + _prepass.lever_list(levers)


@prepass_op.register_fake
def _prepass_fake(q, k, v, format, block_size, q_quant="format", smooth_q=False):
    _prepass.validate(q, k, v, format, block_size, q_quant=q_quant)
    shapes = _prepass.output_shapes(tuple(q.shape), tuple(k.shape), format, block_size, smooth_q=smooth_q)
    return [q.new_empty(shape, dtype=dtype) for shape, dtype in shapes.values()]


@torch.library.custom_op(SELECT_OP, mutates_args=(),
                         schema="(Tensor q_mean, Tensor k_mean, Tensor k_min, Tensor k_max, SymInt Lq, SymInt Lk, "
                                "bool is_causal, str selection, float fraction, int? top_k, int block_size, "
                                "SymInt? window=None, int sink_blocks=0) -> Tensor[]")
def select_op(q_mean: Tensor, k_mean: Tensor, k_min: Tensor, k_max: Tensor, Lq: int, Lk: int,
              is_causal: bool, selection: str, fraction: float, top_k: Optional[int],
              block_size: int, window: Optional[int] = None, sink_blocks: int = 0) -> List[Tensor]:
    """docs/kernels.md §2 outputs, in order: hi_idx, hi_cnt, lo_idx, lo_cnt (int32), hi_map (int8).

    ``window``: sliding-window left context in tokens (docs/numerics.md §4a; needs is_causal), None = none;
    the lists then hold only band blocks. Output shapes do not depend on it."""
    cfg = select_config(selection, fraction, top_k, block_size, sink_blocks)
    fn = _select.select_stats if _use_triton(q_mean) else _select.select_stats_torch
    return list(fn(q_mean, k_mean, k_min, k_max, Lq, Lk, is_causal=is_causal, config=cfg,
                   window=window))


def _check_window_args(window, is_causal: bool) -> None:
    """The window errors the real op raises that need no concrete length (a SymInt window is not compared,
    so the fake adds no guard)."""
    if window is None:
        return
    if not is_causal:
        raise ValueError("window (a left context) needs is_causal=True")
    if isinstance(window, bool) or (isinstance(window, int) and window < 1):
        raise ValueError(f"window must be an int >= 1, got {window!r}")


@select_op.register_fake
def _select_fake(q_mean, k_mean, k_min, k_max, Lq, Lk, is_causal, selection, fraction, top_k, block_size,
                 window=None, sink_blocks=0):
    select_config(selection, fraction, top_k, block_size, sink_blocks)   # same argument errors as the real op
    _check_window_args(window, is_causal)
    shapes = _select.output_shapes(tuple(q_mean.shape), tuple(k_mean.shape))
    return [q_mean.new_empty(shape, dtype=dt) for shape, dt in zip(shapes.values(), _select.OUTPUT_DTYPES)]


def call_prepass(q: Tensor, k: Tensor, v: Tensor, fmt: str, block_size: int,
                  config: Optional[ThriftConfig] = None) -> _prepass.Prepass:
    """``torch.ops.thrift.prepass`` with its outputs named (the §1 outputs; ``config``'s low-path levers
    are passed on, their outputs are dropped: see ``call_prepass_levers``)."""
    return call_prepass_levers(q, k, v, fmt, block_size, config)[0]


def call_prepass_levers(q: Tensor, k: Tensor, v: Tensor, fmt: str, block_size: int,
                        config: Optional[ThriftConfig] = None):
    """``torch.ops.thrift.prepass`` with ``config``'s low-path levers: ``(Prepass, LeverOutputs or None)``."""
    kw = {} if config is None else config_to_op_kwargs(config, PREPASS_LEVERS)
    outs = torch.ops.thrift.prepass.default(q, k, v, fmt, int(block_size), **kw)
    return _prepass.split_outputs(outs)


def call_select(pre: _prepass.Prepass, Lq: int, Lk: int, *, is_causal: bool,
                config: ThriftConfig, window: Optional[int] = None) -> _select.BlockLists:
    """``torch.ops.thrift.select`` on a ``Prepass`` with ``config``'s selection fields, outputs named.
    ``window``: sliding-window left context (causal only), None = none."""
    out = torch.ops.thrift.select.default(pre.q_mean, pre.k_mean, pre.k_min, pre.k_max, Lq, Lk,
                                          bool(is_causal), config.selection, float(config.fraction),
                                          config.top_k, int(config.block_size), window,
                                          **config_to_op_kwargs(config, SELECT_LEVERS))   # as the op's
    return _select.BlockLists(*out)
