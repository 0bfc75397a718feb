"""How many autotune benchmarks a compile really ran, counted at the source.

Inductor's own counter ``select_algorithm_autotune`` is replayed from the cache on an FX-graph hit, so it
cannot prove that a warm compile benchmarked nothing. ``count_benchmarks()`` wraps the two places that run
benchmarks: ``AlgorithmSelectorCache.__call__`` (template/extern choices at compile time) and
``CachingAutotuner.benchmark_all_configs`` (runtime autotune of generated kernels with several configs).
Used by the cache-sharing tests and ``bench/compile.py``; meant for a dedicated process (it patches classes).
"""
from __future__ import annotations

SELECTIONS = "selections"              # AlgorithmSelectorCache calls (each may benchmark its choices)
RUNTIME_AUTOTUNE = "runtime_autotune"  # CachingAutotuner.benchmark_all_configs calls


def count_benchmarks() -> dict:
    """Install the counting wrappers; returns the live ``{SELECTIONS: n, RUNTIME_AUTOTUNE: n}`` dict."""
    from torch._inductor import select_algorithm
    from torch._inductor.runtime import triton_heuristics

    calls = {SELECTIONS: 0, RUNTIME_AUTOTUNE: 0}

    def wrap(cls, name, key):
        inner = getattr(cls, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return inner(*args, **kwargs)
        setattr(cls, name, wrapper)
    wrap(select_algorithm.AlgorithmSelectorCache, "__call__", SELECTIONS)
    wrap(triton_heuristics.CachingAutotuner, "benchmark_all_configs", RUNTIME_AUTOTUNE)
    return calls
