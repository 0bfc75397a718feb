"""Kernel implementations of the ThriftAttention pipeline: prepass -> select -> attention.

Stage kernels shared by every implementation: ``prepass.py`` (quantised operands, block statistics),
``select.py`` (block lists and the high-precision map), ``rounding.py`` (bit-exact grid helpers). The
attention operands they produce are fixed by ``contract.py``.

Attention implementations sit behind one small interface (``Implementation``) and are registered in
``IMPLEMENTATIONS``; each lives in its own folder with its own config dataclass (``triton/``: the
portable Triton kernel, also run by CPU CI through the interpreter; ``gluon/``: the warp-specialized
Hopper kernel of the fp8 format). ``implementations_for(problem)``
is what ``problem.why_not`` asks; the Inductor lowering offers every accepting implementation's
configs as autotune choices, and the eager pipeline runs the first one's default config.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from ..problem import LEVER, Problem, Reason

# Levers (ThriftConfig, numerics §4d) that change what the attention kernel computes: an implementation
# runs only those it lists in ``low_path_levers`` (sink_blocks lives in selection: every kernel runs it).
LOW_PATH_LEVERS = ("q_quant", "smooth_q", "smooth_k")


class Implementation(Protocol):
    """What an attention implementation provides (see ``triton/__init__.py`` for the reference one)."""

    name: str
    low_path_levers: tuple     # the LOW_PATH_LEVERS it computes (optional attribute; absent: none)

    def why_not(self, problem: Problem) -> Optional[Reason]:
        """None when this implementation computes ``problem`` (after padding the head dim, if it pads)."""

    def kernel_head_dim(self, problem: Problem) -> int:
        """The head dim the kernel runs at (>= problem.head_dim; the pipeline zero-pads up to it)."""

    def configs(self, problem: Problem, search: str) -> Sequence:
        """Launch configs to offer: ``search`` in {"default", "autotune", "exhaustive"}; default first."""

    def config_why_not(self, problem: Problem, config) -> Optional[str]:
        """None when ``config`` can run ``problem``."""

    def config_to_dict(self, config) -> dict:
        """JSON form for the autotune store, with ``"impl": name``."""

    def config_from_dict(self, d: dict):
        """Inverse of ``config_to_dict``."""

    def launch(self, operands: tuple, problem: Problem, scale: float, config=None, *, return_lse: bool = False,
               out_dtype=None):
        """Eager launch on the contract operands (``contract.gather``); returns ``[B, Hq, Lq, D]`` (in
        ``out_dtype``, default the input dtype), and with ``return_lse`` also the fp32 ``[B, Hq, Lq]``
        log-sum-exp (numerics §4c); an implementation without it raises ``NotImplementedError``."""

    def append_choices(self, choices: list, input_nodes: list, layout, problem: Problem, scale: float,
                       configs: Sequence) -> list:
        """Inductor: append one autotune choice per config; returns the config of each appended choice."""


def lever_why_not(impl, problem: Problem) -> Optional[Reason]:
    """The low-path levers of ``problem`` that ``impl`` does not compute (its ``low_path_levers``), as a
    refusal: a kernel written before a lever never runs a problem with it, without knowing about it."""
    carried = getattr(impl, "low_path_levers", ())
    missing = [name for name in LOW_PATH_LEVERS if name in problem.config.levers() and name not in carried]
    if not missing:
        return None
    return Reason(LEVER, f"the {impl.name} kernel does not compute the low-path lever(s) {', '.join(missing)}")


class _Registered:
    """An implementation as the registry hands it out: ``why_not`` asks ``lever_why_not`` first, everything
    else is the implementation's own (attribute access passes through)."""

    def __init__(self, impl):
        self._impl = impl

    def __getattr__(self, name):
        return getattr(self._impl, name)

    def why_not(self, problem: Problem) -> Optional[Reason]:
        return lever_why_not(self._impl, problem) or self._impl.why_not(problem)


def _registry() -> dict:
    from .gluon import GluonAttention
    from .triton import TritonAttention
    return {impl.name: _Registered(impl) for impl in (TritonAttention(), GluonAttention())}


_IMPLEMENTATIONS: Optional[dict] = None


def implementations() -> dict:
    """name -> Implementation, in preference order (built on first use: it imports Triton)."""
    global _IMPLEMENTATIONS
    if _IMPLEMENTATIONS is None:
        _IMPLEMENTATIONS = _registry()
    return _IMPLEMENTATIONS


def implementations_for(problem: Problem) -> tuple[list, list]:
    """(accepting implementations in preference order, [(name, Reason)] of the refusing ones)."""
    ok, refused = [], []
    for name, impl in implementations().items():
        reason = impl.why_not(problem)
        if reason is None:
            ok.append(impl)
        else:
            refused.append((name, reason))
    return ok, refused
