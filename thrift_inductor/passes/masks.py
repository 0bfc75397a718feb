"""Is an attention mask just "causal" in disguise?

HF "eager" models (and many hand-written ones) build a causal mask from ``arange`` comparisons and
add it to the scores. ThriftAttention takes ``is_causal=True`` instead, so such a mask may be dropped
iff it is a pure function of shapes (no tensor input feeds it) whose value equals the top-left causal
mask (bool: True = keep; additive: 0 = keep, very negative = drop).

The check evaluates the mask's ancestor subgraph on concrete sizes. With static shapes that is exact.
With symbolic sizes it is evaluated at the size hints and at a second, larger size: a mask that only
looks causal at small lengths (e.g. a sliding window wider than the hint) is caught if the window is
shorter than the second length (documented limit).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch.fx import Node
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

log = logging.getLogger("thrift_inductor")

# An additive mask entry this negative is "masked": exp() underflows to 0 in every dtype after the
# row max is subtracted (HF uses finfo.min, old BERT code -10000).
ADDITIVE_MASKED_MAX = -1.0e4
# Second evaluation size for symbolic lengths: hint * FACTOR + OFFSET (odd, so ragged blocks occur).
SECOND_SIZE_FACTOR = 2
SECOND_SIZE_OFFSET = 67
# Never materialise a mask bigger than this many elements while checking it.
MAX_EVAL_ELEMENTS = 1 << 26


def _ancestors(node: Node) -> Optional[list[Node]]:
    """Ancestors of ``node`` in graph order, or ``None`` if a tensor input / buffer feeds it."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if isinstance(n.meta.get("val"), torch.Tensor):
                return None     # data-dependent (user mask, padding mask, registered tril buffer...)
            continue
        if n.op == "get_attr":
            return None
        if n.op != "call_function":
            return None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _hint(v) -> Optional[int]:
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        try:
            return int(v.node.hint) if v.node.hint is not None else None
        except Exception:
            return None
    return None


def _evaluate(nodes: list[Node], sym_values: dict) -> torch.Tensor:
    env: dict = {}

    def load(a):
        if isinstance(a, Node):
            return env[a]
        if isinstance(a, torch.device):
            return torch.device("cpu")   # evaluate on the host, whatever device the graph targets
        return a

    for n in nodes:
        if n.op == "placeholder":
            env[n] = sym_values[n]
            continue
        args = torch.fx.node.map_aggregate(n.args, load)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, load)
        env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]]


def _is_causal_value(mask: torch.Tensor, lq: int, lk: int) -> bool:
    if mask.dim() > 4 or mask.numel() > MAX_EVAL_ELEMENTS:
        return False
    if mask.shape[-2:] != (lq, lk) and mask.dim() >= 2:
        try:
            mask = mask.expand(*mask.shape[:-2], lq, lk)
        except RuntimeError:
            return False
    keep = torch.ones(lq, lk, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return bool((mask == keep).all())
    if not mask.is_floating_point():
        return False
    m = mask.float()
    return bool(((m == 0) == keep).all()) and bool((m[..., ~keep] <= ADDITIVE_MASKED_MAX).all())


def is_causal_mask(mask: Node, lq, lk) -> bool:
    """True iff ``mask`` (an FX node) is provably the top-left causal mask for ``[.., lq, lk]`` scores.

    Never raises: anything unexpected means "not provably causal" (the site then stays stock)."""
    try:
        # Inductor runs passes under its FakeTensorMode; the check needs real values.
        with unset_fake_temporarily(), torch.no_grad():
            return _is_causal_mask(mask, lq, lk)
    except Exception as exc:
        log.debug("thrift: mask %s not provably causal (%s)", getattr(mask, "name", mask), exc)
        return False


def _is_causal_mask(mask: Node, lq, lk) -> bool:
    if not isinstance(mask, Node) or not isinstance(mask.meta.get("val"), torch.Tensor):
        return False
    if free_unbacked_symbols(mask.meta["val"]):
        return False
    nodes = _ancestors(mask)
    if nodes is None:
        return False
    sym_nodes = [n for n in nodes if n.op == "placeholder"]
    hints = {n: _hint(n.meta.get("val")) for n in sym_nodes}
    if any(h is None for h in hints.values()) or _hint(lq) is None or _hint(lk) is None:
        return False
    trials = [(hints, _hint(lq), _hint(lk))]
    if sym_nodes:
        # Scale every symbolic size the same way; lq / lk follow if they are those symbols.
        def grow(x):
            return x * SECOND_SIZE_FACTOR + SECOND_SIZE_OFFSET
        big = {n: grow(h) for n, h in hints.items()}
        grow_q = grow(_hint(lq)) if not isinstance(lq, int) else lq
        grow_k = grow(_hint(lk)) if not isinstance(lk, int) else lk
        trials.append((big, grow_q, grow_k))
    for values, tq, tk in trials:
        if tq * tk > MAX_EVAL_ELEMENTS:
            return False
        try:
            with torch.no_grad():
                value = _evaluate(nodes, values)
        except Exception as exc:   # an op we cannot run on the host: be conservative
            log.debug("thrift: could not evaluate mask %s: %s", mask.name, exc)
            return False
        if not isinstance(value, torch.Tensor) or not _is_causal_value(value, tq, tk):
            return False
    return True


def mask_is_all_keep(mask: Node) -> bool:
    """A mask that keeps everything (e.g. all-True bool / all-zero additive) is the same as no mask."""
    try:
        with unset_fake_temporarily(), torch.no_grad():
            return _mask_is_all_keep(mask)
    except Exception:
        return False


def _mask_is_all_keep(mask: Node) -> bool:
    nodes = _ancestors(mask) if isinstance(mask, Node) else None
    if not nodes or any(n.op == "placeholder" for n in nodes):
        return False
    try:
        with torch.no_grad():
            value = _evaluate(nodes, {})
    except Exception:
        return False
    if value.dtype == torch.bool:
        return bool(value.all())
    return value.is_floating_point() and bool((value == 0).all()) and not math.isnan(float(value.sum()))
