"""The Inductor graph passes that put ``thrift::attention`` into compiled graphs.

Two hooks (inductor.md §2c):
- ``joint_custom_pre_pass`` -> ``ThriftPatternPass``: hand-written attention (``softmax(q kᵀ s) v`` and
  its variants), matched *before* Inductor's joint-graph passes. Those passes rewrite a softmax of a
  division into a form no pattern (theirs or ours) recognises, so matching later misses ``/ sqrt(d)``.
- ``joint_custom_post_pass`` -> ``ThriftAttentionPass``: fused SDPA ops, including the ones
  ``fuse_attention`` made from hand-written forms our patterns do not know.

Both carry the config and a ``uuid()`` that hashes every ``.py`` / ``.jinja`` file of the package, so
editing a kernel template or the lowering misses the FX graph cache.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import ThriftConfig
from .sdpa import rewrite_sdpa_ops
from .sites import new_graph_id

log = logging.getLogger("thrift_inductor")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_SUFFIXES = (".py", ".jinja")


@functools.lru_cache(maxsize=1)
def _source_files() -> tuple[str, ...]:
    files = []
    for root, dirs, names in os.walk(_PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(_SOURCE_SUFFIXES))
    return tuple(files)


def source_hash() -> bytes:
    """Hash of every thrift source file, re-read on each call (torch's ``get_hash_for_files`` caches
    per path tuple, so an edit made while the process runs would not show)."""
    h = hashlib.sha256()
    for path in _source_files():
        h.update(os.path.relpath(path, _PACKAGE_DIR).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.digest()


class _ThriftPassBase(CustomGraphPass):
    def __init__(self, config: ThriftConfig | None = None):
        self.config = config if config is not None else ThriftConfig()

    def uuid(self) -> bytes:
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(source_hash())
        h.update(self.config.cache_key().encode())
        return h.digest()


class ThriftAttentionPass(_ThriftPassBase):
    """``joint_custom_post_pass``: fused SDPA ops -> ``thrift::attention`` (eligible sites only)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        n = rewrite_sdpa_ops(graph, self.config, new_graph_id())
        if n:
            graph.eliminate_dead_code()
            graph.lint()


class ThriftPatternPass(_ThriftPassBase):
    """``joint_custom_pre_pass``: hand-written attention -> ``thrift::attention``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .patterns import apply_patterns   # pattern tracing is slow: only when a graph is compiled
        n = apply_patterns(graph, self.config, new_graph_id())
        if n:
            graph.eliminate_dead_code()
            graph.lint()
