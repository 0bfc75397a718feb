"""Pure eligibility predicates: may this attention site become ``thrift::attention``?

Each ``check_*`` returns ``None`` when fine, else a short reason name. Reason names are stable (they end
up in ``counters["thrift"]["skipped:<reason>"]`` and in ``explain()`` tables). Shape, dtype, head-dim and
kernel support are NOT decided here: ``check_tensors`` asks the one predicate, ``problem.why_not``, that
the eager API, the op and the lowering ask too.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ThriftConfig
from ..problem import (DTYPE, DV_MISMATCH, DYNAMIC_HEAD_DIM, GQA_HEADS, HEAD_DIM, NO_KERNEL, RANK,  # noqa: F401
                       WINDOW, Problem, why_not)

# Reasons that belong to the site, not to the problem.
MASK = "mask"                  # attn_mask that is not provably causal
DROPOUT = "dropout"            # dropout_p > 0: ThriftAttention has no dropout
TRAINING = "training"          # the site's outputs feed a backward op (no thrift backward yet)


def check_dropout(dropout_p) -> Optional[str]:
    return None if dropout_p in (0, 0.0, None) else DROPOUT


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ThriftConfig, *,
                  is_causal: bool = False, window: Optional[int] = None) -> Optional[str]:
    """The support predicate on the site's (fake) tensors: the reason name, or None."""
    reason = why_not(Problem.from_tensors(q, k, v, is_causal=is_causal or window is not None, config=cfg,
                                          window=window))
    return None if reason is None else reason.name
