"""One attention problem and the ONE support predicate every layer asks.

``Problem`` describes a call of ``thrift::attention``: shapes, dtype, device, causal/window, the
``ThriftConfig``. ``why_not(problem)`` answers "can thrift compute this?" for the eager API, the FX
pass, the op and the Inductor lowering alike, so nothing the pass rewrites is refused later:

- the **semantic** rules (what the numerics in docs/numerics.md are defined for) hold on every device;
- on CUDA additionally at least one kernel implementation
  (``kernels.IMPLEMENTATIONS``) must accept the problem, because the op never falls back to the Python
  oracle there; on CPU without the interpreter the oracle *is* the implementation.

A refusal is a ``Reason``: a stable ``name`` (FX-pass counters ``skipped:<name>``, ``explain()``) and a
human message. Shapes may be SymInts (the pass, the lowering): only what must be static is required to be.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from .config import ThriftConfig
from .constants import FORMAT_HEAD_DIM_MULTIPLE, MAX_HEAD_DIM
# Levers the op, the stage kernels, the portable attention kernel and the lowering carry end to end.
from .ops import OP_LEVERS  # noqa: F401  (re-exported beside LEVER)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why a problem is refused. ``name`` is stable (counters, tests); ``message`` is for people."""
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


# Reason names, one per way a problem can be refused.
RANK = "rank"                  # not 4-D [B, H, L, D]
DTYPE = "dtype"                # inputs not all one of fp16 / bf16 / fp32
DV_MISMATCH = "dv_ne_d"        # value or key head dim differs from the query head dim
GQA_HEADS = "gqa_heads"        # query heads not a multiple of key/value heads
DYNAMIC_HEAD_DIM = "dynamic_head_dim"   # head dim must be static (a kernel constexpr)
HEAD_DIM = "head_dim"          # head dim the chosen format cannot take
BATCH = "batch"                # q, k, v batch sizes differ
KV_LEN = "kv_len"              # key and value lengths differ
DEVICE = "device"              # q, k, v on different devices
WINDOW = "window"              # a sliding window the implementations cannot take
NO_KERNEL = "no_kernel"        # semantically fine, but no kernel implementation takes it on this device
LEVER = "lever"                # an opt-in fidelity lever (ThriftConfig.levers()) only the oracle defines


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def arch_of(device: torch.device | str) -> str:
    """``"sm90"``-style key for a CUDA device, ``"cpu"`` otherwise. sm_100+ is untuned: treated as sm90."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}" if major < 9 else "sm90"


@dataclasses.dataclass(frozen=True)
class Problem:
    """q ``[batch, q_heads, q_len, head_dim]``, k/v ``[batch, kv_heads, kv_len, head_dim]``."""
    batch: object
    q_heads: object
    kv_heads: object
    q_len: object
    kv_len: object
    head_dim: object
    dtype: torch.dtype
    device_type: str
    is_causal: bool
    config: ThriftConfig
    window: Optional[int] = None
    arch: str = "cpu"
    # ways the tensors may break the shape rules; filled by from_tensors, checked by why_not
    shape_error: Optional[Reason] = None

    @classmethod
    def from_tensors(cls, q, k, v, *, is_causal: bool, config: ThriftConfig, window: Optional[int] = None,
                     arch: Optional[str] = None) -> "Problem":
        """From real, fake or IR-like tensors (anything with ``shape``/``dtype``/``device``)."""
        err = _shape_error(q, k, v)
        if err is not None:
            shape = tuple(q.shape) if q.dim() == 4 else (0, 0, 0, 0)
            return cls(*shape[:2], 0, shape[2], 0, shape[3] if len(shape) == 4 else 0, q.dtype,
                       q.device.type, bool(is_causal), config, window, arch or "cpu", err)
        B, Hq, Lq, D = q.shape
        device = q.device
        if arch is None:
            arch = arch_of(device) if device.type == "cuda" and torch.cuda.is_available() else (
                "sm90" if device.type == "cuda" else "cpu")
        return cls(B, Hq, k.shape[1], Lq, k.shape[2], D, q.dtype, device.type, bool(is_causal), config,
                   window, arch)

    @property
    def gqa_group(self) -> int:
        return int(self.q_heads) // int(self.kv_heads)

    @property
    def wants_kernel(self) -> bool:
        """Whether this problem must run on a kernel (never the oracle) on its device: CUDA. (On CPU the op
        runs the oracle; the Triton kernels run there only through the interpreter, when asked for.)"""
        return self.device_type == "cuda"


def _shape_error(q, k, v) -> Optional[Reason]:
    if not (q.dim() == k.dim() == v.dim() == 4):
        return Reason(RANK, f"q, k, v must be 4-D [B, H, L, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return Reason(DTYPE, f"dtypes must be one of fp16/bf16/fp32 and equal, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        return Reason(DEVICE, f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    d, dk, dv = q.shape[-1], k.shape[-1], v.shape[-1]
    if not all(isinstance(x, int) for x in (d, dk, dv)):
        return Reason(DYNAMIC_HEAD_DIM, "head dim must be static")
    if dk != d or dv != d:
        return Reason(DV_MISMATCH, f"key/value head dims {dk}/{dv} differ from the query head dim {d}")
    try:
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            return Reason(BATCH, f"batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        if k.shape[2] != v.shape[2]:
            return Reason(KV_LEN, f"key length {k.shape[2]} != value length {v.shape[2]}")
        hq, hk, hv = q.shape[1], k.shape[1], v.shape[1]
        if not (hk == hv and hk != 0 and hq % hk == 0):
            return Reason(GQA_HEADS, f"query heads {hq} must be a multiple of key/value heads {hk} (== {hv})")
    except Exception:     # symbolic sizes we cannot decide without a guard: refuse rather than guard
        return Reason(GQA_HEADS, "symbolic batch/head/length relation cannot be decided")
    return None


def semantic_why_not(p: Problem) -> Optional[Reason]:
    """The rules of the numerics themselves (docs/numerics.md), the same on every device."""
    if p.shape_error is not None:
        return p.shape_error
    d, fmt = p.head_dim, p.config.format
    multiple = FORMAT_HEAD_DIM_MULTIPLE[fmt]
    if d > MAX_HEAD_DIM or d % multiple:
        return Reason(HEAD_DIM, f"format {fmt!r} needs a head dim that is a multiple of {multiple} and "
                                f"<= {MAX_HEAD_DIM}, got {d}")
    if p.window is not None and (not p.is_causal or p.window < 1):
        return Reason(WINDOW, f"a sliding window needs is_causal=True and window >= 1, got {p.window}")
    return None


def lever_why_not(p: Problem) -> Optional[Reason]:
    """Opt-in fidelity levers (``ThriftConfig.levers()``) are defined in the oracle (reference.quant
    .lowpath_operands, reference.selection); ``OP_LEVERS`` (sink_blocks, q_quant, smooth_q) also run as op
    arguments through the stage kernels, the portable attention kernel and the lowering. The others
    (smooth_k, head_weights) no op argument or kernel carries, so every path that runs the op refuses them
    (on every device: the op would otherwise drop them silently). Which attention implementation takes a
    carried lever is its own rule (``kernels.implementations``)."""
    levers = {k: v for k, v in p.config.levers().items() if k not in OP_LEVERS}
    if not levers:
        return None
    named = ", ".join(f"{k}={v!r}" for k, v in levers.items())
    return Reason(LEVER, f"fidelity lever(s) {named} are defined in the oracle only (no op argument, prepass "
                         f"or kernel carries them); use reference.thrift_attention_reference, or the defaults")


def why_not(p: Problem) -> Optional[Reason]:
    """None when thrift computes ``p`` on its device (semantics + a kernel where one is required)."""
    reason = semantic_why_not(p) or lever_why_not(p)
    if reason is not None or not p.wants_kernel:
        return reason
    from .kernels import implementations_for   # imports Triton: only when a kernel is needed
    impls, refusals = implementations_for(p)
    if impls:
        return None
    names = {r.name for _, r in refusals}
    detail = "; ".join(f"{impl}: {r.message}" for impl, r in refusals) or "no implementation registered"
    # every implementation refusing for one named reason (e.g. "window") keeps that name for the counters
    name = names.pop() if len(names) == 1 else NO_KERNEL
    return Reason(name, f"no kernel takes this problem on {p.device_type} ({detail})")
