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

from ..problem import Problem, Reason


class Implementation(Protocol):
    """What an attention implementation provides (see ``triton/__init__.py`` for the reference one)."""

    name: str

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


def _registry() -> dict:
    from .gluon import GluonAttention
    from .triton import TritonAttention
    return {impl.name: impl for impl in (TritonAttention(), GluonAttention())}


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
