"""Pure-PyTorch numerics oracle: the executable form of ``docs/numerics.md``.

Every kernel is tested against this package. It never imports Triton and runs on CPU and CUDA tensors.
- ``quant``: element rounding and operand quantisers (§1-§2), bit-exact contracts;
- ``selection``: block statistics, top-k budget, selection and block lists (§3), bit-exact contracts;
- ``attention``: P quantisation and the two-precision attention (§4), defined in fp32 up to summation
  order (kernels are compared with a budget relative to ``exact_attention``, see tests/tolerances.py);
  ``return_lse=True`` adds the log-sum-exp that merges results over block-aligned key chunks (§4c).

Shape legend: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]``, ``G = Hq // Hkv``,
``bs`` = ``config.block_size``, ``NQB = ceil(Lq / bs)``, ``NKB = ceil(Lk / bs)``.
"""
from .attention import exact_attention, quantize_p, thrift_attention_reference
from .quant import (
    FORMAT_BLOCK,
    QTensor,
    dequantize,
    e2m1_rn,
    e4m3_rn,
    e8m0_up,
    fake_quantize,
    quantize,
    quantize_fp8,
    quantize_mxfp4,
    quantize_nvfp4,
    quantize_operands,
)
from .selection import (
    block_lists,
    block_stats,
    candidate_counts,
    hi_block_mask,
    resolve_top_k,
    select_blocks,
    select_from_stats,
)

__all__ = [
    "QTensor", "e2m1_rn", "e4m3_rn", "e8m0_up", "quantize_nvfp4", "quantize_mxfp4", "quantize_fp8",
    "quantize", "dequantize", "fake_quantize", "quantize_operands", "FORMAT_BLOCK", "block_stats",
    "resolve_top_k", "candidate_counts", "select_from_stats", "select_blocks", "block_lists",
    "hi_block_mask", "quantize_p", "thrift_attention_reference", "exact_attention",
]
