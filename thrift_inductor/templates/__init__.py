"""Triton kernel sources: ``prepass`` -> ``select`` -> ``attention`` (docs/kernels.md), plus ``common``
(the shared bit-exact rounding helpers). Each module holds one ``@triton.jit`` source and its host launcher.
"""
