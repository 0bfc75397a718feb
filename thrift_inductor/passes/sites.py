"""Bookkeeping for attention sites the pass saw: dynamo counters plus a registry for ``explain()``.

Counters live in ``torch._dynamo.utils.counters["thrift"]``: ``rewritten`` and ``skipped:<reason>``.
The registry is module-level (the pass object is created per compile and copied by Inductor's config
patching, so it cannot own state that outlives one compile).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from typing import Optional

from torch._dynamo.utils import counters

log = logging.getLogger("thrift_inductor")

COUNTER_GROUP = "thrift"
REWRITTEN = "rewritten"


@dataclasses.dataclass(frozen=True)
class Site:
    graph: int                 # id of the pass invocation (one per joint graph compiled)
    node: str                  # FX node name of the attention op that was inspected
    op: str                    # its target, e.g. "aten._scaled_dot_product_flash_attention_for_cpu"
    kind: str                  # "sdpa" (fused SDPA op) or "pattern" (hand-written attention)
    q_shape: tuple
    kv_shape: tuple
    dtype: str
    is_causal: bool
    rewritten: bool
    reason: Optional[str]      # None when rewritten
    config: str                # ThriftConfig.cache_key() the site was (or would have been) rewritten with


_lock = threading.Lock()
_sites: list[Site] = []
_graph_ids = itertools.count()


def new_graph_id() -> int:
    return next(_graph_ids)


def record(site: Site) -> None:
    with _lock:
        _sites.append(site)
    if site.rewritten:
        counters[COUNTER_GROUP][REWRITTEN] += 1
        log.debug("thrift: rewrote %s (%s) q%s kv%s %s causal=%s", site.node, site.op, site.q_shape,
                  site.kv_shape, site.dtype, site.is_causal)
    else:
        counters[COUNTER_GROUP][f"skipped:{site.reason}"] += 1
        log.info("thrift: left %s (%s) as stock attention: %s", site.node, site.op, site.reason)


def sites() -> list[Site]:
    """All sites recorded since the last ``clear_sites()`` (oldest first)."""
    with _lock:
        return list(_sites)


def clear_sites() -> None:
    """Forget recorded sites and restart graph ids (``explain()`` calls this before compiling)."""
    global _graph_ids
    with _lock:
        _sites.clear()
        _graph_ids = itertools.count()


def shape_of(t) -> tuple:
    """Shape as a tuple of ints / symbol names (SymInts print as e.g. ``s0``)."""
    return tuple(int(s) if isinstance(s, int) else str(s) for s in t.shape)
