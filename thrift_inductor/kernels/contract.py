"""The attention kernel contract: which tensors an implementation receives, in which order, how shaped.

Written once here; the Triton source, the Inductor template's ``def_kernel``, the lowering's input nodes
and the eager launcher are all generated from ``OPERANDS`` (docs/kernels.md §3). A kernel receives two
tuples: the pointers in ``OPERANDS`` order and, per operand, its strides (a tuple of ``rank`` ints), so no
stride list is ever spelled out by hand.

Numerics fixed by the contract (not speed knobs; docs/numerics.md §4-§5):
- ``FP8_ACC_PROMOTE``: fp8 dots re-accumulate in fp32 every this many K elements.

Lever operands (``LEVER_OPERANDS``, numerics §4d) follow the base ones only when their lever is on
(``operands(config)``): a call without levers has exactly the 14 base operands, so its kernels, its
template's argument list and its graph are those of a build without levers (no placeholder tensor), and an
implementation written before a lever never sees its operand (``kernels.implementations`` refuses the lever
for it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .rounding import low_dtype


@dataclasses.dataclass(frozen=True)
class Operand:
    name: str          # kernel parameter name (Inductor buffer name in the template)
    rank: int
    stage: str         # "input" (q, k, v), "prepass" (thrift::prepass output) or "select" (thrift::select output)
    field: str         # attribute on the stage's NamedTuple (Prepass / BlockLists), or q/k/v
    shape: str         # for docs and error messages
    dtype: str         # "in" (input dtype), "low" (format storage), "f32", "i32", "i8"
    lever: Optional[str] = None   # ThriftConfig field that turns this operand on (None: always present)


OPERANDS = (
    Operand("Q", 4, "input", "q", "[B, Hq, Lq, D]", "in"),
    Operand("K", 4, "input", "k", "[B, Hkv, Lk, D]", "in"),
    Operand("V", 4, "input", "v", "[B, Hkv, Lk, D]", "in"),
    Operand("Q_LO", 4, "prepass", "q_lo", "[B, Hq, Lq, D]", "low"),
    Operand("Q_SCALE", 3, "prepass", "q_scale", "[B, Hq, Lq]", "f32"),
    Operand("K_LO", 4, "prepass", "k_lo", "[B, Hkv, Lk, D]", "low"),
    Operand("K_SCALE", 3, "prepass", "k_scale", "[B, Hkv, Lk]", "f32"),
    Operand("V_LO_T", 4, "prepass", "v_lo_t", "[B, Hkv, D, NKB*bs]", "low"),
    Operand("V_SCALE", 4, "prepass", "v_scale", "[B, Hkv, NKB, D]", "f32"),
    Operand("HI_IDX", 4, "select", "hi_idx", "[B, Hq, NQB, NKB]", "i32"),
    Operand("HI_CNT", 3, "select", "hi_cnt", "[B, Hq, NQB]", "i32"),
    Operand("LO_IDX", 4, "select", "lo_idx", "[B, Hq, NQB, NKB]", "i32"),
    Operand("LO_CNT", 3, "select", "lo_cnt", "[B, Hq, NQB]", "i32"),
    Operand("HI_MAP", 4, "select", "hi_map", "[B, Hq, NQB, NKB]", "i8"),
)
# Appended after OPERANDS, in this order, when their lever is on. The prepass writes them (LeverOutputs).
LEVER_OPERANDS = (
    Operand("KEY_BIAS", 3, "prepass", "key_bias", "[B, Hq, Lk]", "f32", lever="smooth_q"),
)
NAMES = tuple(o.name for o in OPERANDS)
INDEX = {o.name: i for i, o in enumerate(OPERANDS + LEVER_OPERANDS)}
# Operands that must hold valid block indices when autotuning benchmarks the kernel on synthetic data.
SELECTION_OPERANDS = tuple(o.name for o in OPERANDS if o.stage == "select")

FP8_ACC_PROMOTE = 32     # one e4m3 wgmma K-step; docs/numerics.md §5


def operands(config=None) -> tuple:
    """The operands of a call with ``config`` (a ``ThriftConfig``; None: no lever): the base ones, then the
    lever operands whose lever is on."""
    return OPERANDS + tuple(o for o in LEVER_OPERANDS if config is not None and getattr(config, o.lever, False))


def expected(q_shape, k_shape, fmt: str, block_size: int, dtype: torch.dtype, config=None) -> dict:
    """name -> (shape, dtype) of every operand of ``operands(config)`` for these inputs."""
    B, Hq, Lq, D = q_shape
    _, Hkv, Lk, _ = k_shape
    nqb, nkb = -(-Lq // block_size), -(-Lk // block_size)
    dt = {"in": dtype, "low": low_dtype(fmt), "f32": torch.float32, "i32": torch.int32, "i8": torch.int8}
    shapes = {"Q": (B, Hq, Lq, D), "K": (B, Hkv, Lk, D), "V": (B, Hkv, Lk, D), "Q_LO": (B, Hq, Lq, D),
              "Q_SCALE": (B, Hq, Lq), "K_LO": (B, Hkv, Lk, D), "K_SCALE": (B, Hkv, Lk),
              "V_LO_T": (B, Hkv, D, nkb * block_size), "V_SCALE": (B, Hkv, nkb, D),
              "HI_IDX": (B, Hq, nqb, nkb), "HI_CNT": (B, Hq, nqb), "LO_IDX": (B, Hq, nqb, nkb),
              "LO_CNT": (B, Hq, nqb), "HI_MAP": (B, Hq, nqb, nkb), "KEY_BIAS": (B, Hq, Lk)}
    return {o.name: (shapes[o.name], dt[o.dtype]) for o in operands(config)}


def gather(q, k, v, prepass, lists, levers=None) -> tuple:
    """The operand tensors in contract order from the stage outputs (``Prepass``, ``BlockLists`` and the
    prepass's ``LeverOutputs`` or None): the base operands, then every lever operand ``levers`` holds."""
    src = {"input": {"q": q, "k": k, "v": v}, "prepass": prepass._asdict(), "select": lists._asdict()}
    extra = {} if levers is None else levers._asdict()
    return (tuple(src[o.stage][o.field] for o in OPERANDS)
            + tuple(extra[o.field] for o in LEVER_OPERANDS if extra.get(o.field) is not None))


def check(tensors: tuple, q_shape, k_shape, fmt: str, block_size: int, dtype: torch.dtype, config=None) -> None:
    """Raise ``ValueError`` naming the first operand whose shape or dtype breaks the contract (for the
    operands of ``config``'s levers; None: the base operands), or a missing / extra operand."""
    want = expected(q_shape, k_shape, fmt, block_size, dtype, config)
    if len(tensors) != len(want):
        raise ValueError(f"expected the {len(want)} operands {tuple(want)}, got {len(tensors)} tensors")
    for (name, (shape, dt)), t in zip(want.items(), tensors):
        if tuple(t.shape) != tuple(shape) or t.dtype != dt:
            raise ValueError(f"{name}: expected {tuple(shape)} {dt}, got {tuple(t.shape)} {t.dtype}")


def strides(tensors: tuple) -> tuple:
    """Per-operand stride tuples (the kernel's second argument)."""
    return tuple(tuple(t.stride()) for t in tensors)


def _names(ops) -> tuple:
    return tuple(o.name for o in (OPERANDS if ops is None else ops))


def template_pointer_tuple(ops=None) -> str:
    """Template source for the pointer tuple: ``(Q, K, ...)`` (names bound by ``def_kernel``); ``ops`` is an
    ``operands(config)`` tuple (None: the base operands)."""
    return "(" + ", ".join(_names(ops)) + ",)"


def template_stride_tuple(ops=None) -> str:
    """Template source for the stride tuple, one ``({{stride("X")}})`` per operand (rank >= 2 each)."""
    assert all(o.rank >= 2 for o in OPERANDS + LEVER_OPERANDS)   # "(a, b)" is a tuple; "(a)" would not be
    return "(" + ", ".join('({{stride("%s")}})' % n for n in _names(ops)) + ",)"


def template_def_kernel(ops=None) -> str:
    return "{{def_kernel(" + ", ".join('"%s"' % n for n in _names(ops)) + ")}}"
