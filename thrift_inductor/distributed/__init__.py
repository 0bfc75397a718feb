"""ThriftAttention across ranks of torch.distributed (issue 13, docs/distributed.md).

- ``layout``: which global token ranges each rank holds (contiguous, torch's causal head-tail);
- ``context_parallel``: the sequence sharded over ranks: global selection from all-gathered block
  summaries, a K/V ring, partial results merged through their log-sum-exp.

Tensor parallel needs nothing here: heads are local, so the ordinary op runs per rank.
"""
from .context_parallel import (
    communication_bytes,
    context_parallel_attention,
    global_selection,
    merge_partials,
    resolve_layout,
)
from .layout import (
    CONTIGUOUS,
    LAYOUTS,
    LOAD_BALANCED,
    SequenceLayout,
    alignment,
    contiguous_layout,
    layout_from_lengths,
    load_balanced_layout,
    shard,
    unshard,
)

__all__ = [
    "context_parallel_attention", "global_selection", "merge_partials", "resolve_layout",
    "communication_bytes", "SequenceLayout", "alignment", "contiguous_layout", "layout_from_lengths",
    "load_balanced_layout", "shard", "unshard", "CONTIGUOUS", "LOAD_BALANCED", "LAYOUTS",
]
