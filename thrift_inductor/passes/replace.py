"""Insert a ``thrift::attention`` node with correct fake metadata."""
from __future__ import annotations

from typing import Optional

import torch
from torch._guards import detect_fake_mode
from torch.fx import Node

from ..config import ThriftConfig
from ..ops import config_to_op_args, config_to_op_kwargs


def _scale_arg(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, (int, float)):
        return float(scale)
    raise TypeError(f"thrift: non-constant attention scale {scale!r}")


def insert_thrift_op(graph: torch.fx.Graph, q: Node, k: Node, v: Node, scale, is_causal: bool,
                     cfg: ThriftConfig) -> Node:
    """Add ``thrift::attention(q, k, v, ...)`` at the graph's current insert point; sets ``meta['val']``."""
    op = torch.ops.thrift.attention.default
    args = (q, k, v, _scale_arg(scale), bool(is_causal), *config_to_op_args(cfg))
    kwargs = config_to_op_kwargs(cfg)
    new = graph.call_function(op, args, kwargs)
    vals = [n.meta["val"] for n in (q, k, v)]
    fake_mode = detect_fake_mode(vals)
    with fake_mode if fake_mode is not None else torch._subclasses.FakeTensorMode():
        new.meta["val"] = op(*vals, *args[3:], **kwargs)
    return new
