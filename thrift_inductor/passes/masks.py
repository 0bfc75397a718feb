"""Is an attention mask just "causal" (or a sliding window, or nothing) in disguise?

HF models (and many hand-written ones) build their mask from ``arange`` comparisons and pass it to
SDPA or add it to the scores. ThriftAttention takes ``is_causal`` (and a left window) instead, so such
a mask may be dropped iff it is a pure function of shapes (no tensor input feeds it) whose value is,
for every index, the top-left causal mask ``j <= i``, a band ``i - W < j <= i``, or keeps everything
(bool: True = keep; additive: 0 = keep, <= -1e4 = drop).

The proof is symbolic and independent of the sequence length (``mask_symbolic`` turns the subgraph
into one formula over the element's indices, ``mask_decide`` decides it), so it holds for every
value of symbolic lengths and costs the same at 64k tokens as at 64. A second, independent check
evaluates the subgraph on the host, only when that is cheap (``CROSS_CHECK_MAX_ELEMENTS``); static
masks the prover cannot read are still accepted when their exact evaluation is small
(``EXACT_EVAL_MAX_ELEMENTS``). ``stats`` records the largest evaluation (tests assert on it).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Optional

import sympy
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from .mask_decide import ADDITIVE_MASKED_MAX, classify
from .mask_symbolic import Unproven, interpret, to_sympy

log = logging.getLogger("thrift_inductor")

# Host evaluation as a second check of a symbolic proof: only masks up to this many elements
# (a 1024 x 1024 bool mask evaluates in about a millisecond).
CROSS_CHECK_MAX_ELEMENTS = 1 << 20
# Static masks the symbolic prover cannot read are evaluated exactly up to this size (2048 x 2048).
EXACT_EVAL_MAX_ELEMENTS = 1 << 22
# A mask subgraph longer than this is not a shape-only mask worth proving (HF's is ~40 nodes).
MAX_MASK_NODES = 400
# Proofs per mask node and score size (one HF mask feeds every layer's attention); weak, so a
# compiled graph's nodes are not kept alive.
_CACHE: "weakref.WeakKeyDictionary[Node, dict]" = weakref.WeakKeyDictionary()

CAUSAL, BANDED, ALL_KEEP = "causal", "banded", "all_keep"


@dataclasses.dataclass(frozen=True)
class MaskProof:
    """What a mask was proven to be. ``kind`` None = not proven (``reason`` says why)."""
    kind: Optional[str]            # CAUSAL | BANDED | ALL_KEEP | None
    window: Optional[int] = None   # BANDED: query i keeps keys i - window < j <= i
    reason: str = ""


@dataclasses.dataclass
class Stats:
    proofs: int = 0                # masks proven symbolically
    largest_evaluated: int = 0     # most elements ever materialised on the host while checking


stats = Stats()


def reset_stats() -> None:
    stats.proofs = 0
    stats.largest_evaluated = 0


# --------------------------------------------------------------------------- the subgraph
def _ancestors(node: Node) -> Optional[list[Node]]:
    """Ancestors of ``node`` in graph order, or ``None`` if a tensor input / buffer feeds it."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if isinstance(val, _SCALARS):
            continue            # a size (or size arithmetic): its value is its symbolic expression
        if n.op == "placeholder":
            return None         # data-dependent (user mask, padding mask, registered tril buffer...)
        if n.op != "call_function":
            return None         # get_attr (a constant buffer), submodule calls
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


_SCALARS = (int, torch.SymInt)


def _hint(v) -> Optional[int]:
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        try:
            return int(v.node.hint) if v.node.hint is not None else None
        except Exception:
            return None
    return None


# --------------------------------------------------------------------------- host evaluation
def _evaluate(nodes: list[Node]) -> torch.Tensor:
    """Run the subgraph on the host at the size hints."""
    env: dict = {}

    def load(a):
        if isinstance(a, Node):
            return env[a]
        if isinstance(a, torch.device):
            return torch.device("cpu")   # evaluate on the host, whatever device the graph targets
        return a

    for n in nodes:
        if isinstance(n.meta.get("val"), _SCALARS):
            env[n] = _hint(n.meta["val"])
            continue
        args = torch.fx.node.map_aggregate(n.args, load)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, load)
        env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]]


def _keep_of(value: torch.Tensor, lq: int, lk: int) -> Optional[torch.Tensor]:
    """bool keep matrix ``[..., lq, lk]`` of an evaluated mask, or None if it is not a clean mask."""
    if value.dim() > 4:
        return None
    try:
        value = value.expand(*value.shape[:-2], lq, lk) if value.dim() >= 2 else value.expand(lq, lk)
    except RuntimeError:
        return None
    if value.dtype == torch.bool:
        return value
    if not value.is_floating_point():
        return None
    keep = value == 0
    return keep if bool((value[~keep] <= ADDITIVE_MASKED_MAX).all()) else None


def _expected(kind: str, window: Optional[int], lq: int, lk: int) -> torch.Tensor:
    d = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]      # j - i
    if kind == ALL_KEEP:
        return torch.ones(lq, lk, dtype=torch.bool)
    keep = d <= 0
    return keep & (d > -window) if kind == BANDED else keep


def _classify_value(keep: torch.Tensor, lq: int, lk: int) -> MaskProof:
    """Exact classification of an evaluated (static) keep matrix."""
    flat = keep.reshape(-1, lq, lk)
    if not bool((flat == flat[:1]).all()):
        return MaskProof(None, reason="mask differs across batch or heads")
    k = flat[0]
    for kind in (ALL_KEEP, CAUSAL):
        if bool((k == _expected(kind, None, lq, lk)).all()):
            return MaskProof(kind)
    window = int(k[-1].sum())
    if window > 0 and bool((k == _expected(BANDED, window, lq, lk)).all()):
        return MaskProof(BANDED, window)
    return MaskProof(None, reason="evaluated mask is not causal, banded or all-keep")


def _evaluate_checked(nodes, lq: int, lk: int, limit: int) -> Optional[torch.Tensor]:
    """The keep matrix at the size hints if that costs <= ``limit`` elements, else None."""
    out = nodes[-1].meta["val"]
    sizes = [_hint(s) for s in out.shape] + [lq, lk]
    if any(s is None for s in sizes):
        return None
    elements = max(1, lq * lk)
    for s in out.shape[:-2]:
        elements *= _hint(s)
    if elements > limit:
        return None
    stats.largest_evaluated = max(stats.largest_evaluated, elements)
    value = _evaluate(nodes)
    return _keep_of(value, lq, lk) if isinstance(value, torch.Tensor) else None


# --------------------------------------------------------------------------- the proof
def _prove(mask: Node, lq, lk) -> MaskProof:
    if not isinstance(mask, Node) or not isinstance(mask.meta.get("val"), torch.Tensor):
        return MaskProof(None, reason="mask is not a graph tensor")
    if free_unbacked_symbols(mask.meta["val"]):
        return MaskProof(None, reason="mask has data-dependent sizes")
    nodes = _ancestors(mask)
    if nodes is None:
        return MaskProof(None, reason="mask depends on a tensor input (padding, user mask or buffer)")
    if len(nodes) > MAX_MASK_NODES:
        return MaskProof(None, reason=f"mask subgraph has {len(nodes)} nodes (> {MAX_MASK_NODES})")
    hq, hk = _hint(lq), _hint(lk)
    try:
        kind, offset, window = classify(interpret(nodes), to_sympy(lq), to_sympy(lk))
    except Unproven as exc:
        static = all(isinstance(s, int) for s in (*mask.meta["val"].shape, lq, lk))
        keep = _evaluate_checked(nodes, hq, hk, EXACT_EVAL_MAX_ELEMENTS) if static else None
        if keep is None:
            return MaskProof(None, reason=f"not proven: {exc}")
        proof = _classify_value(keep, hq, hk)
        log.debug("thrift: mask %s evaluated (%s): %s", mask.name, exc, proof)
        return proof
    stats.proofs += 1
    if kind == CAUSAL and offset != 0:
        return MaskProof(None, reason=f"causal mask aligned at j <= i + {offset} (the op is top-left)")
    if kind == BANDED:
        if offset != 0:
            return MaskProof(None, reason=f"banded mask aligned at offset {offset}")
        if not (isinstance(window, sympy.Integer) and int(window) >= 1):
            return MaskProof(None, reason=f"sliding window {window} is not a constant")
        window = int(window)
    proof = MaskProof(kind, window if kind == BANDED else None)
    if hq is not None and hk is not None:
        keep = _evaluate_checked(nodes, hq, hk, CROSS_CHECK_MAX_ELEMENTS)
        if keep is not None and not bool((keep == _expected(kind, proof.window, hq, hk)).all()):
            log.warning("thrift: symbolic proof of mask %s (%s) disagrees with its evaluation", mask.name, proof)
            return MaskProof(None, reason="symbolic proof disagrees with evaluation")
    return proof


def prove_mask(mask, lq, lk) -> MaskProof:
    """What ``mask`` (an FX node, broadcast to scores ``[..., lq, lk]``) provably is.

    Never raises: anything unexpected means "not proven" (the site then stays stock)."""
    cache = _CACHE.setdefault(mask, {}) if isinstance(mask, Node) else {}
    key = (str(lq), str(lk))
    if key in cache:
        return cache[key]
    try:
        # Inductor runs passes under its FakeTensorMode; the cross-check needs real values.
        with unset_fake_temporarily(), torch.no_grad():
            proof = _prove(mask, lq, lk)
    except Exception as exc:   # a bug or an op that misbehaves: be conservative
        log.debug("thrift: mask %s not proven (%s: %s)", getattr(mask, "name", mask), type(exc).__name__, exc)
        proof = MaskProof(None, reason=f"{type(exc).__name__}: {exc}")
    if proof.kind is None:
        log.info("thrift: mask %s: %s", getattr(mask, "name", mask), proof.reason)
    cache[key] = proof
    return proof


def is_causal_mask(mask, lq, lk) -> bool:
    """True iff ``mask`` is provably the top-left causal mask for ``[.., lq, lk]`` scores."""
    return prove_mask(mask, lq, lk).kind == CAUSAL


def mask_is_all_keep(mask: Node) -> bool:
    """A mask that keeps everything (all-True bool / all-zero additive) is the same as no mask."""
    val = mask.meta.get("val") if isinstance(mask, Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return False
    return prove_mask(mask, val.shape[-2], val.shape[-1]).kind == ALL_KEEP
