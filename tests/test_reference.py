"""CPU tests of the numerics oracle (thrift_inductor/reference.py) against docs/numerics.md.

Hand-checked vectors pin the rounding contracts; hypothesis covers oracle invariants at small shapes;
a slow-but-obvious per-row loop (``naive_thrift``) cross-checks the vectorised attention.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from thrift_inductor.config import ThriftConfig
from thrift_inductor.reference import (
    block_lists, block_stats, dequantize, e2m1_rn, e4m3_rn, e8m0_up, exact_attention, fake_quantize,
    hi_block_mask, quantize, quantize_fp8, quantize_mxfp4, quantize_nvfp4, quantize_operands, quantize_p,
    resolve_top_k, select_blocks, select_from_stats, thrift_attention_reference,
)

from tolerances import (
    SDPA_BF16_ATOL, SDPA_BF16_RTOL, SDPA_FP32_ATOL, SDPA_FP32_RTOL, SQNR_FLOOR_DB,
    assert_bit_exact, assert_kernel_matches_oracle, rel_l2, sqnr_db,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

FORMATS = ("nvfp4", "mxfp4", "fp8")
SMALL_BS = 16                     # smallest selection block: many blocks at CPU-friendly lengths
FEW = settings(max_examples=12)   # oracle-on-CPU properties: a dozen shapes each keeps the file < 1 min


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------- rounding
def test_e2m1_ties_and_saturation():
    x = t([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 6.5, 100.0, 0.1, 0.26, 2.9, 4.99, 5.01])
    want = t([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, 0.5, 3.0, 4.0, 6.0])
    assert_bit_exact(e2m1_rn(x), want, "e2m1 positives")
    assert_bit_exact(e2m1_rn(-x), -want, "e2m1 negatives")
    grid = t([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert_bit_exact(e2m1_rn(grid), grid, "grid points are fixed")
    assert e2m1_rn(t([math.inf]))[0] == 6.0 and e2m1_rn(t([-math.inf]))[0] == -6.0


def test_e4m3_hand_vectors():
    x = t([1.0625, 1.1875, 448.0, 449.0, 464.0, 500.0, 1e9, -1e9, math.inf,
           2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -9, 2.0 ** -6, 2.0 ** -12, 240.0, 0.0])
    want = t([1.0, 1.25, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0, 448.0,
              0.0, 2.0 ** -8, 2.0 ** -9, 2.0 ** -6, 0.0, 240.0, 0.0])
    assert_bit_exact(e4m3_rn(x), want, "e4m3 ties / saturation / subnormals")


def test_e4m3_matches_torch_cast_where_valid():
    # torch's float8_e4m3fn cast is RNE for |x| <= 448; our values must agree bit for bit there,
    # across the normal and subnormal ranges.
    x = torch.randn(200_000) * torch.exp(torch.randn(200_000) * 4)
    x = torch.cat([x.clamp(-448, 448), torch.arange(-2048, 2049) * 2.0 ** -13])
    assert_bit_exact(e4m3_rn(x), x.to(torch.float8_e4m3fn).float(), "e4m3 vs torch cast")


def test_e8m0_up_vectors():
    x = t([1.0, 1.01, 0.3, 0.5, 0.75, 3.0, 0.0, -1.0, 1e-40, 1e39, math.inf])
    want = t([1.0, 2.0, 0.5, 0.5, 1.0, 4.0, 2.0 ** -126, 2.0 ** -126, 2.0 ** -126, 2.0 ** 127, 2.0 ** 127])
    assert_bit_exact(e8m0_up(x), want, "e8m0 round-up")


# -------------------------------------------------------------------------------- quantisers
@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_blocks_quantise_to_zero(fmt):
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    qt = quantize(x, fmt)
    deq = dequantize(qt)
    assert torch.equal(deq[0], torch.zeros(64)) and torch.equal(deq[2], torch.zeros(64))
    assert torch.isfinite(qt.scales).all()


def test_nvfp4_scale_underflow_and_saturation():
    tiny = torch.full((16,), 5 * 2.0 ** -11)       # amax/6 < 2**-10: the E4M3 scale rounds to 0
    qt = quantize_nvfp4(tiny)
    assert qt.scales.item() == 0.0 and torch.equal(dequantize(qt), torch.zeros(16))
    big = torch.linspace(-6000.0, 6000.0, 16)      # amax/6 = 1000 > 448: scale saturates, codes clip
    qt = quantize_nvfp4(big)
    assert qt.scales.item() == 448.0
    assert qt.codes.abs().max().item() == 6.0
    assert dequantize(qt).abs().max().item() == 6 * 448.0


def test_mxfp4_scale_rounds_up_so_nothing_clips():
    x = torch.randn(8, 64) * 10
    qt = quantize_mxfp4(x)
    assert qt.scales.shape == (8, 2)
    assert torch.equal(qt.scales, e8m0_up(x.view(8, 2, 32).abs().amax(-1) / 6))
    assert (x.view(8, 2, 32).abs() / qt.scales[..., None] <= 6).all()


def test_fp8_per_token_and_per_block_scales():
    x = torch.randn(2, 3, 70, 8)
    per_token = quantize_fp8(x, dim=-1)
    assert per_token.scales.shape == (2, 3, 70, 1)
    assert torch.equal(per_token.scales.squeeze(-1), x.abs().amax(-1) / 448)
    per_block = quantize_fp8(x, dim=-2, block=32)      # V layout: per (32-token block, channel)
    assert per_block.scales.shape == (2, 3, 3, 8)
    assert torch.equal(per_block.scales[:, :, 2], x[:, :, 64:].abs().amax(-2) / 448)
    assert quantize_fp8(torch.zeros(4, 8)).scales.eq(1.0).all()


@pytest.mark.parametrize("fmt", ("nvfp4", "mxfp4"))
def test_ragged_tail_equals_zero_padding(fmt):
    v = torch.randn(2, 70, 16)
    padded = F.pad(v, (0, 0, 0, 26))
    assert torch.equal(fake_quantize(v, fmt, dim=-2), fake_quantize(padded, fmt, dim=-2)[:, :70])


@pytest.mark.parametrize("fmt", FORMATS)
def test_sqnr_floor_on_gaussian(fmt):
    x = torch.randn(64, 256)
    assert sqnr_db(x, fake_quantize(x, fmt)) >= SQNR_FLOOR_DB[fmt]


def _e2m1_step(y):
    y = y.abs()
    return torch.where(y < 2, 0.5, torch.where(y < 4, 1.0, 2.0))


def _e4m3_step(y):
    y = y.abs().clamp(min=2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(y)) - 3)


# Magnitudes whose nvfp4 scales stay E4M3 normals (>= 2**-6) and unsaturated (<= 448): there the
# round trip is exact; subnormal scales are coarser than the codes and are tested by hand above.
block_values = st.lists(st.floats(-2000.0, 2000.0, width=32), min_size=64, max_size=64)


@FEW
@given(block_values, st.sampled_from(FORMATS))
def test_round_trip_idempotent(values, fmt):
    x = t(values).view(2, 32)
    if fmt == "nvfp4":
        amax = x.view(4, 16).abs().amax(-1)
        hypothesis.assume(bool(((amax / 6 >= 2.0 ** -6) & (amax / 6 <= 448)).all()))
    deq = fake_quantize(x, fmt)
    again = quantize(deq, fmt)
    # Values are a fixed point. Codes/scales can re-balance (mxfp4: max code 3 at scale s == code 6
    # at s/2; fp8: 448 * s / 448 may move the scale by an ulp), the represented values may not.
    torch.testing.assert_close(dequantize(again), deq, rtol=2e-7 if fmt == "fp8" else 0, atol=0)
    if fmt == "nvfp4":
        assert torch.equal(again.codes, quantize(x, fmt).codes)


@FEW
@given(block_values, st.sampled_from(FORMATS), st.floats(1e-3, 1e3))
def test_error_within_half_step(values, fmt, mag):
    x = t(values).view(2, 32) * mag
    qt = quantize(x, fmt)
    sf = qt.scales.repeat_interleave(qt.block, -1) if qt.block else qt.scales
    y = x / sf
    if fmt == "nvfp4":
        hypothesis.assume(bool(((sf > 2.0 ** -6) & (sf < 448)).all()))
    step = _e4m3_step(y) if fmt == "fp8" else _e2m1_step(y)
    # E4M3 scale rounding can push |y| up to 6 * 17/16 under nvfp4; saturating there costs < half a
    # step of the top interval, so the bound below still holds. 1e-6 covers x * (1/sf) rounding.
    bound = 0.5 * step * sf + 1e-6 * x.abs()
    assert ((x - dequantize(qt)).abs() <= bound).all()


def test_quantize_operands_axes():
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32)
    for fmt in FORMATS:
        q_lo, k_lo, v_lo = quantize_operands(q, k, v, fmt, SMALL_BS)
        assert torch.equal(q_lo, fake_quantize(q, fmt, dim=-1))
        assert torch.equal(k_lo, fake_quantize(k, fmt, dim=-1))
        v_block = SMALL_BS if fmt == "fp8" else None
        want_v = fake_quantize(v.transpose(-1, -2), fmt, dim=-1, block=v_block).transpose(-1, -2)
        assert torch.equal(v_lo, want_v)
        assert q_lo.dtype == torch.float32 and v_lo.shape == v.shape


def test_bad_format_raises():
    with pytest.raises(ValueError, match="format"):
        quantize(torch.randn(16), "int4")
    with pytest.raises(ValueError, match="blocks of 16"):
        quantize(torch.randn(16), "nvfp4", block=32)
