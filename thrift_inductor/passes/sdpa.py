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
from .masks import ALL_KEEP, BANDED, CAUSAL, prove_mask
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


# Prefill only: a single-query graph is decode (one new token against a KV cache), a later issue.
# (The lead may move this name into eligibility.py; the string is the stable reason either way.)
DECODE = getattr(E, "DECODE", "decode")


def op_takes_window() -> bool:
    """Does ``thrift::attention`` take a sliding window yet? Banded masks are rewritten only then."""
    from .. import ops
    return "window" in ops.OP_SCHEMA


def mask_decision(mask, lq, lk) -> tuple[Optional[str], bool, Optional[int]]:
    """(reason, is_causal, window) for an attention mask against ``[..., lq, lk]`` scores.

    A mask that is provably causal, banded (when the op takes a window) or keeps everything is
    dropped in favour of the op's own arguments; anything else keeps the site stock."""
    if mask is None:
        return None, False, None
    if not isinstance(mask, Node):
        return E.MASK, False, None
    proof = prove_mask(mask, lq, lk)
    if proof.kind == CAUSAL:
        return None, True, None
    if proof.kind == ALL_KEEP:
        return None, False, None
    if proof.kind == BANDED:
        return (None, True, proof.window) if op_takes_window() else (E.WINDOW, False, None)
    return E.MASK, False, None


def decode_reason(qv: torch.Tensor) -> Optional[str]:
    return DECODE if qv.shape[-2] == 1 else None


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
        reason = reason or E.check_tensors(qv, kv, vv, cfg, is_causal=is_causal) or decode_reason(qv)
        window = None
        if reason is None:
            reason, mask_causal, window = mask_decision(mask, qv.shape[-2], kv.shape[-2])
            is_causal = is_causal or mask_causal
        if reason is None and window is not None:   # the support predicate decides windows too
            reason = E.check_tensors(qv, kv, vv, cfg, is_causal=True, window=window)
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
            if window is not None:
                new.kwargs = {**new.kwargs, "window": window}   # same output metadata as without
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
