"""ThriftConfig: the frozen description of *what* ThriftAttention computes.

Everything here changes numerics or which blocks are selected, so it travels as op arguments and is
part of every cache key. How fast it runs (tiles, warps, stages) lives in ``heuristics.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from .constants import DEFAULT_BLOCK_SIZE, DEFAULT_FRACTION

Format = Literal["nvfp4", "mxfp4", "fp8"]
Selection = Literal["block_mean", "quest", "local"]
PQuant = Literal["block", "microblock"]
QQuant = Literal["format", "fp8"]

FORMATS = ("nvfp4", "mxfp4", "fp8")
SELECTIONS = ("block_mean", "quest", "local")
P_QUANTS = ("block", "microblock")
Q_QUANTS = ("format", "fp8")
# Opt-in fidelity levers (docs/fidelity_notes.md, numerics §4d) and their defaults: the paper's numerics.
# Defined in the oracle (reference.quant.lowpath_operands, reference.selection); sink_blocks, q_quant and
# smooth_q also run as op arguments through the kernels (ops.OP_LEVERS); problem.why_not refuses the others
# (smooth_k, head_weights: Reason "lever").
LEVER_DEFAULTS = {"smooth_q": False, "smooth_k": False, "q_quant": "format", "sink_blocks": 0,
                  "head_weights": None}
BLOCK_SIZES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class ThriftConfig:
    """What ThriftAttention computes.

    format:     low-precision path. ``nvfp4`` (E2M1 x E4M3 scale per 16), ``mxfp4`` (E2M1 x E8M0 scale
                per 32, rounded up), ``fp8`` (e4m3, per-token Q/K scales, per-(block, channel) V scales).
    fraction:   share of (causal) block pairs computed in the input precision; 0 = pure low precision,
                1 = exact attention. Ignored when ``top_k`` is set.
    top_k:      fixed number of high-precision KV blocks per query block (overrides ``fraction``).
    selection:  scoring heuristic: ``block_mean`` (mean q . mean k), ``quest`` (min/max keys), ``local``.
    block_size: tokens per selection block; also the kernel's KV tile.
    p_quant:    how probabilities are quantised on the low path (see docs/numerics.md):
                ``block`` = one scale per (query row, KV block), the block's row max maps to the top code;
                ``microblock`` = additionally a format scale per 16 (nvfp4) / 32 (mxfp4) tokens.

    Opt-in fidelity levers (default off = the paper's numerics; numerics §4d; smooth_k and head_weights run in
    the oracle only, see LEVER_DEFAULTS):
    smooth_q:    quantise ``q - mean_q`` (per query head, mean over the call's tokens) on the low path and
                 add the exact per-key term ``mean_q . (k - mean_k)`` back to the low scores.
    smooth_k:    quantise ``k - mean_k`` (per kv head) on the low path and add the exact per-row term
                 ``q . mean_k`` back to the low scores (so low and high blocks share one frame).
    q_quant:     ``format`` (Q like K) or ``fp8`` (Q on the low path in e4m3 with a per-token fp32 scale,
                 K and V in ``format``; the same as ``format`` for the fp8 format).
    sink_blocks: the first ``sink_blocks`` kv blocks (attention sinks) always run on the high path; they
                 take their slots out of each query block's budget (block_mean / quest selection).
    head_weights: one weight per query head of the call (calibrated budgets, from
                 ``reference.selection.allocate_head_weights``): head h gets ``w_h`` times the uniform
                 head's block pairs, the call's total never above the uniform one (``head_budgets``).
    """

    format: Format = "nvfp4"
    fraction: float = DEFAULT_FRACTION
    top_k: Optional[int] = None
    selection: Selection = "block_mean"
    block_size: int = DEFAULT_BLOCK_SIZE
    p_quant: PQuant = "block"
    smooth_q: bool = False
    smooth_k: bool = False
    q_quant: QQuant = "format"
    sink_blocks: int = 0
    head_weights: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"ThriftConfig.format must be one of {FORMATS}, got {self.format!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"ThriftConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.p_quant not in P_QUANTS:
            raise ValueError(f"ThriftConfig.p_quant must be one of {P_QUANTS}, got {self.p_quant!r}")
        if self.format == "fp8" and self.p_quant != "block":
            raise ValueError("p_quant='microblock' is an FP4 scheme; the fp8 format uses p_quant='block'")
        if not isinstance(self.fraction, (int, float)) or not (0.0 <= float(self.fraction) <= 1.0):
            raise ValueError(f"ThriftConfig.fraction must lie in [0, 1], got {self.fraction!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"ThriftConfig.top_k must be a non-negative int or None, got {self.top_k!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"ThriftConfig.block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        object.__setattr__(self, "fraction", float(self.fraction))
        for name in ("smooth_q", "smooth_k"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ThriftConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.q_quant not in Q_QUANTS:
            raise ValueError(f"ThriftConfig.q_quant must be one of {Q_QUANTS}, got {self.q_quant!r}")
        if self.format == "fp8" and self.q_quant == "fp8":
            object.__setattr__(self, "q_quant", "format")     # the fp8 format's Q already is fp8
        if isinstance(self.sink_blocks, bool) or not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"ThriftConfig.sink_blocks must be a non-negative int, got {self.sink_blocks!r}")
        if self.sink_blocks and self.selection == "local":
            raise ValueError("ThriftConfig.sink_blocks applies to block_mean / quest selection, not 'local'")
        if self.head_weights is not None:
            hw = self.head_weights
            if (not isinstance(hw, (tuple, list)) or not hw or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and 0.0 <= w < float("inf") for w in hw)):
                raise ValueError(f"ThriftConfig.head_weights must be a non-empty sequence of finite weights >= 0, "
                                 f"got {hw!r}")
            object.__setattr__(self, "head_weights", tuple(float(w) for w in hw))

    def levers(self) -> dict:
        """The fidelity levers that differ from their defaults (``LEVER_DEFAULTS``), name -> value."""
        return {name: getattr(self, name) for name, default in LEVER_DEFAULTS.items()
                if getattr(self, name) != default}

    def replace(self, **changes) -> "ThriftConfig":
        return dataclasses.replace(self, **changes)

    def cache_key(self) -> str:
        """Stable text identity (used in autotune-store keys and logs)."""
        levers = "".join(f"-{name}={value}" for name, value in self.levers().items())
        return (f"{self.format}-f{self.fraction:g}-k{self.top_k}-{self.selection}"
                f"-b{self.block_size}-p{self.p_quant}{levers}")

    @classmethod
    def from_options(cls, options: dict | None) -> "ThriftConfig":
        """Build from ``torch.compile(..., options={...})`` keys prefixed ``thrift.`` or ``thrift_``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in (options or {}).items():
            for prefix in ("thrift.", "thrift_"):
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    if name not in fields:
                        raise ValueError(f"unknown thrift option {key!r}; known: {sorted(fields)}")
                    kw[name] = value
        return cls(**kw)
