"""Undo a materialised GQA repeat on k / v so the op gets the un-repeated tensors.

``k.repeat_interleave(G, dim=1)`` (gpt-fast) and HF's ``repeat_kv`` (``k[:, :, None].expand(...)
.reshape(...)``) both reach the ATen graph as::

    unsqueeze(k, 2) -> expand([B, Hkv, G, L, D]) -> [clone] -> view/reshape([B, Hkv*G, L, D])

The op does GQA itself (query head h reads kv head h // G), which is exactly the order
``repeat_interleave`` produces, so passing the base ``k`` is equivalent and saves the copy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_COPIES = (aten.clone.default,)


def _val(n) -> Optional[torch.Tensor]:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def unrepeat_kv(node: Node) -> Optional[tuple[Node, int]]:
    """``(base, G)`` if ``node`` is a GQA repeat of ``base`` along dim 1, else ``None``."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _RESHAPES):
        return None
    x = node.args[0]
    if isinstance(x, Node) and x.op == "call_function" and x.target in _COPIES:
        x = x.args[0]
    if not (isinstance(x, Node) and x.op == "call_function" and x.target is aten.expand.default):
        return None
    u = x.args[0]
    if not (isinstance(u, Node) and u.op == "call_function" and u.target is aten.unsqueeze.default
            and u.args[1] == 2):
        return None
    base = u.args[0]
    out, exp, b = _val(node), _val(x), _val(base)
    if out is None or exp is None or b is None or b.dim() != 4 or exp.dim() != 5 or out.dim() != 4:
        return None
    B, Hkv, L, D = b.shape
    g = exp.shape[2]
    if tuple(exp.shape) != (B, Hkv, g, L, D) or tuple(out.shape) != (B, Hkv * g, L, D):
        return None
    if not isinstance(g, int):
        return None
    return base, g


def unrepeat_pair(k: Node, v: Node) -> tuple[Node, Node]:
    """Un-repeat k and v together (only when both are repeats with the same group)."""
    rk, rv = unrepeat_kv(k), unrepeat_kv(v)
    if rk is not None and rv is not None and rk[1] == rv[1]:
        return rk[0], rv[0]
    return k, v
