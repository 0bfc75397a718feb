"""Rewrite fused SDPA ATen ops into ``thrift::attention``.

At ``joint_custom_post_pass`` both ``F.scaled_dot_product_attention`` and the hand-written forms that
Inductor's ``fuse_attention`` recognised are one of the ops below. Arguments are read by schema name,
so positional / keyword spellings and the per-op argument orders are handled alike.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from ..config import ThriftConfig
from . import eligibility as E
from .gqa import unrepeat_pair
from .masks import is_causal_mask, mask_is_all_keep
from .replace import insert_thrift_op
from .sites import Site, record, shape_of

aten = torch.ops.aten

SDPA_OPS = (
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten.scaled_dot_product_attention.default,
)
# Ops whose output 0 is the attention output and that return a tuple (read via getitem).
_TUPLE_OPS = SDPA_OPS[:4]


def bind_args(node: Node) -> dict:
    """Map ``node``'s args and kwargs to schema argument names, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _training_reason(node: Node) -> Optional[str]:
    """Inference graphs only read output 0; a backward op reading the site (or its LSE) means training."""
    if node.target not in _TUPLE_OPS:
        return None
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return E.TRAINING
        if user.args[1] != 0 and user.users:
            return E.TRAINING
        for consumer in user.users:
            if "backward" in str(consumer.target):
                return E.TRAINING
    return None


def _mask_reason(mask, q, k) -> tuple[Optional[str], bool]:
    """(reason, mask_is_causal). A mask that is provably causal (or keeps everything) is dropped."""
    if mask is None:
        return None, False
    if not isinstance(mask, Node):
        return E.MASK, False
    qv, kv = _val(q), _val(k)
    if is_causal_mask(mask, qv.shape[-2], kv.shape[-2]):
        return None, True
    if mask_is_all_keep(mask):
        return None, False
    return E.MASK, False


def rewrite_sdpa_ops(graph: torch.fx.Graph, cfg: ThriftConfig, graph_id: int) -> int:
    """Replace every eligible fused SDPA op in ``graph``; record every site seen. Returns #rewritten."""
    n_rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_OPS:
            continue
        a = bind_args(node)
        q, k, v = a["query"], a["key"], a["value"]
        qv, kv, vv = _val(q), _val(k), _val(v)
        mask = a.get("attn_mask", a.get("attn_bias"))
        is_causal = bool(a.get("is_causal", False))
        reason = None
        if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)):
            reason = E.RANK
        reason = reason or _training_reason(node) or E.check_dropout(a.get("dropout_p", 0.0))
        reason = reason or E.check_tensors(qv, kv, vv, cfg)
        if reason is None:
            reason, mask_causal = _mask_reason(mask, q, k)
            is_causal = is_causal or mask_causal
        if reason is None and node.target is aten.scaled_dot_product_attention.default \
                and qv.shape[1] != kv.shape[1] and not a.get("enable_gqa", False):
            reason = E.GQA_HEADS
        if reason is None:
            k, v = unrepeat_pair(k, v)
            kv = _val(k)
        site = dict(graph=graph_id, node=node.name, op=str(node.target).replace(".default", ""), kind="sdpa",
                    q_shape=shape_of(qv) if isinstance(qv, torch.Tensor) else (),
                    kv_shape=shape_of(kv) if isinstance(kv, torch.Tensor) else (),
                    dtype=str(qv.dtype).replace("torch.", "") if isinstance(qv, torch.Tensor) else "?",
                    is_causal=is_causal, config=cfg.cache_key())
        if reason is not None:
            record(Site(rewritten=False, reason=reason, **site))
            continue
        with graph.inserting_before(node):
            new = insert_thrift_op(graph, q, k, v, a.get("scale"), is_causal, cfg)
        if node.target in _TUPLE_OPS:
            for user in list(node.users):
                if user.args[1] == 0:
                    user.replace_all_uses_with(new)
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(new)
        graph.erase_node(node)
        record(Site(rewritten=True, reason=None, **site))
        n_rewritten += 1
    return n_rewritten
