"""Hand-written attention -> ``thrift::attention`` (``joint_custom_pre_pass``).

Spellings covered (each also with a ``clone`` after the softmax, which is what eval-mode dropout
becomes, and with an additive causal mask, HF "eager" style)::

    softmax(q @ kᵀ * s) @ v          softmax(q @ kᵀ / s) @ v          softmax(q @ kᵀ * s + mask) @ v

Patterns are traced with ``fwd_only`` (inference graphs): in a training graph the softmax output feeds
the backward, so the match is refused by the matcher itself and the site stays stock.
They are traced lazily, once per process (tracing ~30 variants takes seconds, inductor.md §5.11), with
fp32 and fp16 example inputs (half softmax adds casts) and batch 2 / batch 1 (matmul's reshape adds a
``clone`` only when batch > 1).

Config and scale reach the replacement through a context variable: ``register_replacement`` traces
the replacement right after ``extra_check`` accepted a match, so the check computes the op arguments
(scale as a float, causal-ness of the mask) and the replacement reads them.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from typing import Optional

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement
from torch.fx import Node

from ..config import ThriftConfig
from ..ops import config_to_op_args, config_to_op_kwargs
from . import eligibility as E
from .gqa import unrepeat_pair
from .sdpa import decode_reason, mask_decision
from .sites import Site, record, shape_of

aten = torch.ops.aten

# Example scalar for the traced scale: an odd value so it cannot be confused with shapes (the same
# workaround fuse_attention.py uses; scalars are matched by position, not value).
_SCALE_EXAMPLE = 0.66666


@dataclasses.dataclass
class _Active:
    cfg: ThriftConfig
    graph_id: int
    seen: set
    count: int = 0
    scale: Optional[float] = None
    is_causal: bool = False
    window: Optional[int] = None


_ACTIVE: contextvars.ContextVar[Optional[_Active]] = contextvars.ContextVar("thrift_pattern_state", default=None)


# --------------------------------------------------------------------------- search functions
def _mul(query, key, value, scale):
    return torch.matmul(query, key.transpose(-2, -1)).mul(scale).softmax(dim=-1).matmul(value)


def _div(query, key, value, inv_scale):
    return torch.matmul(query, key.transpose(-2, -1)).div(inv_scale).softmax(dim=-1).matmul(value)


def _mul_clone(query, key, value, scale):
    return torch.matmul(query, key.transpose(-2, -1)).mul(scale).softmax(dim=-1).clone().matmul(value)


def _div_clone(query, key, value, inv_scale):
    return torch.matmul(query, key.transpose(-2, -1)).div(inv_scale).softmax(dim=-1).clone().matmul(value)


def _mul_mask(query, key, value, attn_mask, scale):
    return (torch.matmul(query, key.transpose(-2, -1)).mul(scale) + attn_mask).softmax(dim=-1).matmul(value)


def _div_mask(query, key, value, attn_mask, inv_scale):
    return (torch.matmul(query, key.transpose(-2, -1)).div(inv_scale) + attn_mask).softmax(dim=-1).matmul(value)


def _mul_mask_clone(query, key, value, attn_mask, scale):
    s = torch.matmul(query, key.transpose(-2, -1)).mul(scale) + attn_mask
    return s.softmax(dim=-1).clone().matmul(value)


def _div_mask_clone(query, key, value, attn_mask, inv_scale):
    s = torch.matmul(query, key.transpose(-2, -1)).div(inv_scale) + attn_mask
    return s.softmax(dim=-1).clone().matmul(value)


def _replacement(query, key, value, *_unused):
    state = _ACTIVE.get()
    window = {} if state.window is None else {"window": state.window}
    return torch.ops.thrift.attention.default(query, key, value, state.scale, state.is_causal,
                                              *config_to_op_args(state.cfg), **window,
                                              **config_to_op_kwargs(state.cfg))


# name -> (search fn, scale is a divisor, has mask)
_SEARCH = {
    "mul": (_mul, False, False), "div": (_div, True, False),
    "mul_clone": (_mul_clone, False, False), "div_clone": (_div_clone, True, False),
    "mul_mask": (_mul_mask, False, True), "div_mask": (_div_mask, True, True),
    "mul_mask_clone": (_mul_mask_clone, False, True), "div_mask_clone": (_div_mask_clone, True, True),
}


# --------------------------------------------------------------------------- checks
def _constant_scalar(x) -> Optional[float]:
    """A Python number, or a ``full([], c)`` / ``scalar_tensor(c)`` node (GPT-2 divides by one)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, Node) and x.op == "call_function" and x.target in (aten.full.default, aten.scalar_tensor.default):
        value = x.args[1] if x.target is aten.full.default else x.args[0]
        if isinstance(value, (int, float)) and (x.target is not aten.full.default or list(x.args[0]) == []):
            return float(value)
    return None


def _make_check(divide: bool, masked: bool):
    def check(match: Match) -> bool:
        state = _ACTIVE.get()
        if state is None:
            return False
        q, k, v = (match.kwargs[n] for n in ("query", "key", "value"))
        qv, kv, vv = (n.meta.get("val") for n in (q, k, v))
        out = match.output_nodes()[0]
        raw = match.kwargs["inv_scale" if divide else "scale"]
        scalar = _constant_scalar(raw)
        reason = None
        if scalar is None or (divide and scalar == 0.0) or not math.isfinite(scalar):
            reason = "scale"
        elif not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)):
            reason = E.RANK
        else:
            reason = E.check_tensors(qv, kv, vv, state.cfg) or decode_reason(qv)
        is_causal, window = False, None
        if reason is None and masked:
            reason, is_causal, window = mask_decision(match.kwargs["attn_mask"], qv.shape[-2], kv.shape[-2])
        if reason is None and window is not None:   # the support predicate decides windows too
            reason = E.check_tensors(qv, kv, vv, state.cfg, is_causal=True, window=window)
        key = (state.graph_id, out.name)
        if key not in state.seen:   # overlapping patterns may check one site more than once
            state.seen.add(key)
            if reason is not None:
                record(Site(graph=state.graph_id, node=out.name, op="hand-written", kind="pattern",
                            q_shape=shape_of(qv) if isinstance(qv, torch.Tensor) else (),
                            kv_shape=shape_of(kv) if isinstance(kv, torch.Tensor) else (),
                            dtype=str(getattr(qv, "dtype", "?")).replace("torch.", ""), is_causal=is_causal,
                            rewritten=False, reason=reason, config=state.cfg.cache_key()))
        if reason is not None:
            return False
        state.scale = (1.0 / scalar) if divide else scalar
        state.is_causal = is_causal
        state.window = window
        state.count += 1
        record(Site(graph=state.graph_id, node=out.name, op="hand-written", kind="pattern",
                    q_shape=shape_of(qv), kv_shape=shape_of(kv), dtype=str(qv.dtype).replace("torch.", ""),
                    is_causal=is_causal, rewritten=True, reason=None, config=state.cfg.cache_key()))
        return True
    return check


# --------------------------------------------------------------------------- registration
# Example sizes only shape the trace; the patterns match any sizes. What changes the traced graph is
# layout: matmul's reshape adds a ``clone`` for an operand that is not viewable as [B*H, L, D] (batch > 1
# and non-contiguous, e.g. heads split off a [B, L, H, D] projection), and none for batch 1.
_SHAPE = (2, 4, 8, 16)
_SHAPE_BS1 = (1, 4, 8, 16)
# (q, k, v) strided flags. Unmasked spellings: all-contiguous and all-strided (attention written
# on a fused qkv projection). Masked (HF eager) spellings: every combination (RoPE'd q, repeat_kv'd k
# and v end up with different layouts), ~0.2 s of tracing each, so only traced when a graph needs them.
_UNMASKED_LAYOUTS = ((False, False, False), (True, True, True))
_MASKED_LAYOUTS = tuple((a, b, c) for a in (False, True) for b in (False, True) for c in (False, True))


def _trace(fn, args, **kwargs):
    """``fwd_only`` without its no-op removal: that pass deletes the ``clone`` an eval-mode dropout
    leaves in the graph, but our pass runs before Inductor removes it, so the pattern must keep it."""
    try:
        gm = fwd_only(fn, args, run_functional_passes=False, **kwargs)
    except TypeError:   # a torch without that keyword: no no-op removal to skip
        return fwd_only(fn, args, **kwargs)
    # Dead casts (CPU half bmm traces upcasts it never uses) would count as extra users and make the
    # pattern demand them: drop them, as fwd_only's functional passes would have.
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _example(shape, dtype, strided: bool) -> torch.Tensor:
    if strided:   # [B, L, H, D] memory viewed as [B, H, L, D]
        return torch.empty((shape[0], shape[2], shape[1], shape[3]), dtype=dtype).transpose(1, 2)
    return torch.empty(shape, dtype=dtype)


@functools.lru_cache(maxsize=2)
def _patterns(masked: bool) -> PatternMatcherPass:
    patterns = PatternMatcherPass(pass_name=f"thrift_attention_patterns{'_masked' if masked else ''}")
    layouts = [(_SHAPE, lay) for lay in (_MASKED_LAYOUTS if masked else _UNMASKED_LAYOUTS)]
    layouts.append((_SHAPE_BS1, (False, False, False)))
    # fp16 too: a half softmax is traced with casts to fp32 and back (bf16 gives the same graph).
    for dtype in (torch.float32, torch.float16):
        for shape, strided in layouts:
            mask = torch.empty((shape[0], 1, shape[2], shape[2]), dtype=dtype)
            for fn, divide, has_mask in _SEARCH.values():
                if has_mask != masked:
                    continue
                # The scalar goes last: the matcher names traced inputs positionally after dropping scalars.
                args = [_example(shape, dtype, s) for s in strided] + ([mask] if masked else []) + [_SCALE_EXAMPLE]
                workaround = {"inv_scale" if divide else "scale": _SCALE_EXAMPLE}
                register_replacement(fn, _replacement, args, _trace, patterns,
                                     extra_check=_make_check(divide, masked), scalar_workaround=workaround,
                                     skip_duplicates=True)
    return patterns


def _softmax_inputs(graph: torch.fx.Graph) -> list:
    """Inputs of every decomposed softmax (``amax(x, -1)``) in ``graph``."""
    return [n.args[0] for n in graph.nodes if n.op == "call_function" and n.target is aten.amax.default]


def apply_patterns(graph: torch.fx.Graph, cfg: ThriftConfig, graph_id: int) -> int:
    """Rewrite eligible hand-written attention in ``graph``; returns the number of rewritten sites."""
    inputs = _softmax_inputs(graph)
    if not inputs:
        return 0   # no softmax, nothing to match: skip the (once per process, slow) registration
    state = _Active(cfg=cfg, graph_id=graph_id, seen=set())
    token = _ACTIVE.set(state)
    try:
        _patterns(False).apply(graph)
        if any(isinstance(x, Node) and x.target is aten.add.Tensor for x in inputs):
            _patterns(True).apply(graph)    # softmax(scores + mask): maybe a causal mask
    finally:
        _ACTIVE.reset(token)
    if state.count:
        _unrepeat_new_sites(graph)
    return state.count


def _unrepeat_new_sites(graph: torch.fx.Graph) -> None:
    """HF ``repeat_kv`` before hand-written attention: hand the op the un-repeated k / v."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.thrift.attention.default:
            k, v = unrepeat_pair(node.args[1], node.args[2])
            if k is not node.args[1]:
                node.args = (node.args[0], k, v, *node.args[3:])
