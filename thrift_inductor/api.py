"""Eager entry point: ``thrift_inductor.attention``, a drop-in for ``F.scaled_dot_product_attention``.

It validates inputs with SDPA-like messages, then calls the ``thrift::attention`` op (so eager and
compiled code run the same op and the same numerics).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .config import ThriftConfig
from .ops import call_op
from .problem import SUPPORTED_DTYPES, Problem, why_not


def _resolve_config(config: Optional[ThriftConfig], cfg: dict) -> ThriftConfig:
    if config is not None and not isinstance(config, ThriftConfig):
        raise TypeError(f"config must be a ThriftConfig or None, got {type(config).__name__}")
    base = config if config is not None else ThriftConfig()
    if "fraction" in cfg:
        fraction = cfg["fraction"]
        if not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    try:
        return base.replace(**cfg) if cfg else base
    except TypeError as exc:    # dataclasses.replace on an unknown field
        raise TypeError(f"unknown ThriftConfig field in {sorted(cfg)}: {exc}") from None


def validate_inputs(q: Tensor, k: Tensor, v: Tensor, *, enable_gqa: bool, config: ThriftConfig) -> None:
    """Raise ``ValueError`` / ``TypeError`` with an SDPA-like message for inputs the op cannot take."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"thrift attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"thrift attention: {name} must be 4-D [batch, heads, seq, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"thrift attention: {name} dtype must be one of float16, bfloat16, float32, "
                            f"got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"thrift attention: query, key and value must share a dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"thrift attention: query, key and value must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"thrift attention: batch sizes differ: query {B}, key {k.shape[0]}, value {v.shape[0]}")
    if k.shape[-1] != D:
        raise ValueError(f"thrift attention: query head_dim {D} != key head_dim {k.shape[-1]}")
    if v.shape[-1] != D:
        raise ValueError(f"thrift attention: value head_dim {v.shape[-1]} != query head_dim {D} "
                         f"(Dv != D is not supported)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"thrift attention: key length {k.shape[2]} != value length {v.shape[2]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"thrift attention: key heads {k.shape[1]} != value heads {v.shape[1]}")
    Hkv = k.shape[1]
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"thrift attention: query heads {Hq} != key/value heads {Hkv}; "
                             f"pass enable_gqa=True for grouped-query attention (as with SDPA)")
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"thrift attention: query heads {Hq} must be a multiple of key/value heads {Hkv}")

def validate_problem(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, config: ThriftConfig,
                     window: Optional[int] = None) -> None:
    """The one support predicate (``problem.why_not``): on CUDA it includes "some kernel takes it"."""
    reason = why_not(Problem.from_tensors(q, k, v, is_causal=is_causal, config=config, window=window))
    if reason is not None:
        raise ValueError(f"thrift attention: {reason.message} [{reason.name}]")


def attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, window: Optional[int] = None, config: Optional[ThriftConfig] = None,
              **cfg) -> Tensor:
    """ThriftAttention, eager. Same layout and semantics as ``F.scaled_dot_product_attention``.

    q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``; ``enable_gqa=True`` allows ``Hq % Hkv == 0``.
    Any strides are taken as they are (transposed ``[B, L, H, D]`` views, expanded heads, a strided head
    dim): the oracle and the kernels read through strides, nothing is copied (the kernel path copies only
    to zero-pad a head dim such as 96). Empty problems follow SDPA (``_empty_result``). NaN / Inf inputs:
    docs/numerics.md §4b (a row that sees one is NaN; masked keys do not leak).
    ``scale`` defaults to ``1/sqrt(D)``; causal is top-left aligned (query i sees keys j <= i);
    ``window=W`` (with ``is_causal=True``) is sliding-window attention: query i sees keys i - W < j <= i.
    ``config`` (a ``ThriftConfig``) and/or its fields as keywords (``format="fp8"``, ``fraction=0.1``…)
    choose the numerics; keywords override ``config``. Returns ``[B, Hq, Lq, D]`` in ``q.dtype``.
    """
    resolved = _resolve_config(config, cfg)
    validate_inputs(q, k, v, enable_gqa=enable_gqa, config=resolved)
    empty = _empty_result(q, k)
    if empty is not None:
        return empty
    validate_problem(q, k, v, is_causal=is_causal, config=resolved, window=window)
    return call_op(q, k, v, scale=scale, is_causal=is_causal, config=resolved, window=window)


def _empty_result(q: Tensor, k: Tensor) -> Optional[Tensor]:
    """SDPA's answer for a problem with nothing to compute, or None. Measured on torch 2.13 (CPU):
    batch, query heads or Lq of 0 give an empty ``[B, Hq, Lq, D]``; Lk of 0 (no key for any row) gives
    zeros, as the numerics' "no visible key gives 0". Answered here, on every device, so no kernel is
    launched with an empty grid; ``Hq = Hkv = 0`` is accepted like SDPA does. Asked after the input checks
    (dtype, shapes, devices) but before the format's head-dim rule, which has nothing to apply to."""
    B, Hq, Lq, D = q.shape
    if B == 0 or Hq == 0 or Lq == 0 or k.shape[2] == 0:
        return q.new_zeros((B, Hq, Lq, D))
    return None
