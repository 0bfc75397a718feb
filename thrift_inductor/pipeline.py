"""The ONE eager pipeline: prepass -> selection -> attention (docs/kernels.md), on a chosen implementation.

Used by the ``thrift::attention`` op on CUDA (and on CPU under the Triton interpreter), by the benchmarks
and by the tests. Stage kernels are called directly (not through the ``thrift::prepass`` / ``thrift::select``
ops) to skip dispatcher overhead; the numerics are the same either way.

Head dims below the implementation's kernel head dim (e.g. 80 or 96 -> 128) are zero-padded here: zero
channels change no scale, no block statistic and no score, and the padded output channels are dropped,
so the result is the oracle's on the real head dim (docs/kernels.md §4) at the cost of the padded work.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .config import ThriftConfig
from .problem import Problem, why_not


@dataclasses.dataclass
class Stages:
    """Intermediate results of one pipeline run (for benchmarks and tests)."""
    problem: Problem
    operands: tuple          # kernels/contract.py order, head dim padded to the kernel's
    prepass: object
    lists: object
    levers: object = None    # the prepass's LeverOutputs (key_bias) when a low-path lever is on, else None


def make_problem(q, k, v, *, is_causal: bool, config: ThriftConfig, window: Optional[int] = None) -> Problem:
    return Problem.from_tensors(q, k, v, is_causal=is_causal, config=config, window=window)


def implementation(problem: Problem, name: Optional[str] = None):
    """The implementation that runs ``problem``: ``name`` if given (it must accept), else the first that does."""
    from .kernels import implementations, implementations_for
    if name is not None:
        impl = implementations()[name]
        reason = impl.why_not(problem)
        if reason is not None:
            raise ValueError(f"implementation {name!r} cannot run this problem: {reason}")
        return impl
    impls, refused = implementations_for(problem)
    if not impls:
        raise ValueError(f"no kernel implementation runs this problem: {refused}")
    return impls[0]


def prepare(q, k, v, *, is_causal: bool, config: ThriftConfig, impl=None, use_torch_stages: bool = False,
            window: Optional[int] = None, hi_idx: Optional[torch.Tensor] = None) -> Stages:
    """Prepass + selection (Triton kernels, or their torch twins built on the oracle) -> contract operands.
    ``hi_idx`` (``[B, Hq, NQB, *]``, -1 padded, as the oracle takes it) replaces the selection: the lists
    are built from it (context parallel hands each chunk its share of the global selection)."""
    from .kernels import contract
    from .kernels import prepass as P
    from .kernels import select as S
    problem = make_problem(q, k, v, is_causal=is_causal, config=config, window=window)
    impl = impl or implementation(problem)
    pad = impl.kernel_head_dim(problem) - q.shape[-1]
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    prep, levers = P.run(q, k, v, config.format, config.block_size, q_quant=config.q_quant,
                         smooth_q=config.smooth_q, torch_twin=use_torch_stages)
    extra = {} if window is None else {"window": int(window)}
    if hi_idx is None:
        sel = S.select_torch if use_torch_stages else S.select
        lists = sel(prep, q.shape[2], k.shape[2], is_causal=is_causal, config=config, **extra)
    else:
        lists = lists_from_hi_idx(hi_idx, q.shape[2], k.shape[2], config.block_size, is_causal, q.device, **extra)
    return Stages(problem, contract.gather(q, k, v, prep, lists, levers), prep, lists, levers)


def lists_from_hi_idx(hi_idx: torch.Tensor, lq: int, lk: int, block_size: int, is_causal: bool, device,
                      window: Optional[int] = None):
    """``BlockLists`` (the select stage's outputs) for an explicit high-precision selection."""
    from . import reference as ref
    from .kernels.select import BlockLists
    w = {} if window is None else {"window": window}
    hi_idx = hi_idx.cpu()
    lists = ref.block_lists(hi_idx, lq, lk, block_size, is_causal, **w)
    hi_map = ref.hi_block_mask(hi_idx, lq, lk, block_size, is_causal, **w).to(torch.int8)
    return BlockLists(*(t.to(device).contiguous() for t in (*lists, hi_map)))


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float], is_causal: bool,
        config: Optional[ThriftConfig] = None, impl_name: Optional[str] = None, launch_config=None,
        window: Optional[int] = None, hi_idx: Optional[torch.Tensor] = None, return_lse: bool = False,
        out_dtype: Optional[torch.dtype] = None):
    """ThriftAttention forward on a kernel implementation: ``[B, Hq, Lq, D]`` in ``q.dtype``.

    ``scale=None`` means ``1/sqrt(D)`` of the real head dim (SDPA semantics). Inputs may have any strides.
    Raises ``ValueError`` with the reason when no kernel implementation takes the call.
    ``hi_idx`` overrides the selection; ``return_lse`` also returns the fp32 log-sum-exp ``[B, Hq, Lq]``
    (numerics §4c); ``out_dtype`` (e.g. fp32 for partial results that are merged later).
    """
    config = config or ThriftConfig()
    problem = make_problem(q, k, v, is_causal=is_causal, config=config, window=window)
    reason = why_not(problem)
    if reason is not None:
        raise ValueError(f"thrift attention cannot run this call: {reason}")
    impl = implementation(problem, impl_name)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    stages = prepare(q, k, v, is_causal=is_causal, config=config, impl=impl, window=window, hi_idx=hi_idx)
    res = impl.launch(stages.operands, problem, scale, launch_config, return_lse=return_lse, out_dtype=out_dtype)
    out, lse = res if return_lse else (res, None)
    out = out[..., :D].contiguous() if out.shape[-1] != D else out
    return (out, lse) if return_lse else out
