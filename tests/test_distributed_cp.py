"""Context parallel (issue 13 item 2, CPU part): ThriftAttention over a sequence sharded across gloo
ranks equals the single-device oracle on the whole sequence.

In process (no ranks): the oracle's log-sum-exp follows torch's SDPA flash convention, partial results
over block-aligned key chunks merge to the whole call's output, and the layouts partition the sequence.

Multi-process: this file runs as a script in 4 processes, once (gloo on loopback, bounded by
``TIMEOUT_S``); world sizes 2, 3 and 4 run on subgroups of ranks ``0 .. w-1``, each rank looping over
``cases(world)`` — nvfp4 / mxfp4 / fp8, fraction 0 /
0.05 / 1, causal and not, fp32 and bf16, GQA 4/2, contiguous (uneven, ragged) and torch's causal
head-tail layout, plus extras (quest / local selection, block size 32, B=2, a poisoned key, ranks with
no tokens) — and stores its output rows, lse and selected blocks. Rank r also computes the
single-device oracle for cases ``r::world``. The pytest side reassembles the sequence and asserts:

- the all-gathered selection equals the single-device ``select_blocks`` rows bit for bit;
- output and lse equal the oracle's within fp32 reorder noise (``RTOL``, see there), NaN where it is NaN;
- rounded to bf16, the output is at most one bf16 ulp from the oracle's bf16 output.
"""
from __future__ import annotations

import math
import os
import pathlib
import sys
import time

import pytest
import torch
from gloo_ranks import launch_ranks

from thrift_inductor.config import ThriftConfig
from thrift_inductor.distributed import (
    LOAD_BALANCED,
    SequenceLayout,
    alignment,
    contiguous_layout,
    layout_from_lengths,
    load_balanced_layout,
    merge_partials,
    shard,
    unshard,
)
from thrift_inductor.reference import select_blocks, thrift_attention_reference
from thrift_inductor.reference.quant import finite_or_zero

BATCH, HQ, HKV = 1, 4, 2
FORMATS = ("nvfp4", "mxfp4", "fp8")
FRACTIONS = (0.0, 0.05, 1.0)
DTYPES = (torch.float32, torch.bfloat16)
# Per world size: (layout kind or explicit per-rank lengths, sequence length). Every one is ragged (not
# a multiple of 64) and uneven over the ranks.
SEQUENCES = {
    2: ((None, 460), (LOAD_BALANCED, 700)),                     # 256 + 204; 4 pieces of 3/3/3/2 blocks
    3: (((128, 320, 252), 700), (LOAD_BALANCED, 650)),          # explicit lengths; 6 pieces of 2/2/2/2/2/1
    4: ((None, 500), (LOAD_BALANCED, 700)),                     # 128 x 3 + 116; 8 pieces of 2/2/2/1/1/1/1/1
}
WORLDS = tuple(sorted(SEQUENCES))
MAX_WORLD = max(WORLDS)
TIMEOUT_S = 240                 # one launch, every world size; 20-30 s on 2 shared cores
# Chunked vs single-device differ only in fp32 rounding: the factor exp(B_rj - m_r) is formed as
# exp(B_rj - m_c) * exp(m_c - m_r) through the chunk's lse (a few ulp of |lse| ~ 10, i.e. ~1e-6
# relative), and sums run in another order. Measured worst over every case: 3.9e-7 absolute on outputs
# up to 4, 9.5e-7 on lse up to 7.5 (2 ulp; docs/numerics.md §4c). Quantisation moves outputs by >= 1e-3,
# so 1e-5 cannot hide a real difference (a different P code, scale or selected block).
RTOL = 1e-5
ATOL = 1e-5
# bf16 keeps 8 significant bits: neighbours are 2**-7 apart relative to the lower binade's start, so two
# roundings of fp32 values within ATOL + RTOL|v| of each other are at most ATOL + 2**-7 |v| apart.
BF16_ONE_ULP = 2.0 ** -7


def _case(world: int, s: int, fmt: str, fraction: float, causal: bool, dtype, seed: int) -> dict:
    kind, seq_len = SEQUENCES[world][s]
    return dict(name=f"w{world}-{kind or 'contiguous'}-{seq_len}-{fmt}-f{fraction}-{'causal' if causal else 'full'}-"
                f"{str(dtype)[6:]}", kind=kind, seq_len=seq_len, config=ThriftConfig(format=fmt, fraction=fraction),
                causal=causal, dtype=dtype, head_dim=(32, 64)[seed % 2], seed=seed)


def cases(world: int) -> list[dict]:
    """Every case a world size runs (the same list in every rank and in pytest). Two ranks: every
    format x fraction x causal, once in fp32 and once in bf16, on the two layouts in turn (so each
    layout meets each format, dtype and mask). Three / four ranks: every format x mask at 5% (fraction
    0 and 1 on one format), dtype and layout alternating. Extras as listed."""
    out = []
    if world == 2:
        for fmt in FORMATS:
            for fraction in FRACTIONS:
                for causal in (False, True):
                    for t, dtype in enumerate(DTYPES):
                        flip = (FORMATS.index(fmt) + causal + t) % 2
                        out.append(_case(world, flip, fmt, fraction, causal, dtype, len(out)))
    else:
        grid = [(fmt, 0.05, causal) for fmt in FORMATS for causal in (False, True)]
        grid += [("nvfp4", 0.0, True), ("fp8", 1.0, False)]
        for i, (fmt, fraction, causal) in enumerate(grid):
            out.append(_case(world, (i + causal) % 2, fmt, fraction, causal, DTYPES[i % 2], 100 * world + i))
    extra = {
        2: [dict(config=ThriftConfig(format="nvfp4", selection="quest"), causal=True),
            dict(config=ThriftConfig(format="nvfp4", p_quant="microblock"), causal=False, batch=2)],
        3: [dict(config=ThriftConfig(format="fp8", selection="local"), causal=True),
            dict(config=ThriftConfig(format="mxfp4", block_size=32, fraction=0.1), causal=True, seq_len=333)],
        4: [dict(config=ThriftConfig(format="nvfp4"), causal=True, poison=True),
            dict(config=ThriftConfig(format="fp8", fraction=0.2), causal=True, seq_len=150)],   # ranks without tokens
    }[world]
    for j, e in enumerate(extra):
        case = dict(kind=LOAD_BALANCED, seq_len=SEQUENCES[world][1][1], dtype=torch.float32, head_dim=64,
                    seed=1000 * world + j)
        case.update(e)
        case["name"] = f"w{world}-extra{j}-{case['config'].cache_key()}-{case['seq_len']}"
        out.append(case)
    return out


def make_layout(case: dict, world: int) -> SequenceLayout:
    kind, seq_len, align = case["kind"], case["seq_len"], alignment(case["config"])
    if kind is None:
        return contiguous_layout(seq_len, world, align)
    if kind == LOAD_BALANCED:
        return load_balanced_layout(seq_len, world, align)
    return layout_from_lengths(kind)


def make_inputs(case: dict):
    g = torch.Generator().manual_seed(case["seed"])
    b, length, d = case.get("batch", BATCH), case["seq_len"], case["head_dim"]
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(case["dtype"]) for h in (HQ, HKV, HKV))
    if case.get("poison"):
        k[0, 1, 300, 3] = math.nan           # rows >= 300 of kv head 1's query heads turn NaN (numerics §4b)
    return q, k, v


# ------------------------------------------------------------------ the worker (run as a script)
def _run_cases(world: int, rank: int, group) -> dict:
    from thrift_inductor.distributed import context_parallel_attention, global_selection, resolve_layout
    results = {}
    for i, case in enumerate(cases(world)):
        q, k, v = make_inputs(case)
        layout = make_layout(case, world)
        ql, kl, vl = (shard(t, layout, rank) for t in (q, k, v))
        cfg, causal = case["config"], case["causal"]
        # the string form (contiguous by lengths / load_balanced) must resolve to the same layout
        kind = LOAD_BALANCED if case["kind"] == LOAD_BALANCED else "contiguous"
        assert resolve_layout(kind, ql.shape[2], group, cfg) == layout
        out, lse = context_parallel_attention(ql, kl, vl, group=group, config=cfg, is_causal=causal, layout=kind,
                                              out_dtype=torch.float32, return_lse=True)
        hi = global_selection(ql, kl, layout=layout, group=group, config=cfg, is_causal=causal)
        whole = select_blocks(finite_or_zero(q), finite_or_zero(k), is_causal=causal, config=cfg)
        bs = cfg.block_size
        expect = [whole[:, :, s // bs:-(-e // bs)] for _, s, e in layout.local_pieces(rank)]
        res = dict(out=out, lse=lse, hi=hi, hi_expect=expect)
        if i % world == rank:
            # (the oracle rounds its fp32 result last, so ref.to(dtype) is its default output)
            res["ref"] = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg, out_dtype=torch.float32,
                                                    return_lse=True)
        results[case["name"]] = res
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One of ``MAX_WORLD`` processes. World size w runs on ranks ``0 .. w-1`` in a subgroup (so the
    ``group=`` path is exercised and the processes start once); the other ranks go on to the next w."""
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=MAX_WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    groups = {w: dist.new_group(list(range(w))) for w in WORLDS}     # every rank creates every group
    results = {}
    for world in WORLDS:
        if rank < world:
            t0 = time.monotonic()
            results[world] = _run_cases(world, rank, groups[world])
            results[world]["seconds"] = time.monotonic() - t0
    torch.save(results, pathlib.Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ the pytest side
def _skip_reason():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    return None


def _launch(out_dir: pathlib.Path) -> float:
    return launch_ranks(__file__, MAX_WORLD, out_dir, TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory):
    """Every rank's results, from one launch of ``MAX_WORLD`` processes for all world sizes."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out_dir = tmp_path_factory.mktemp("cp")
    elapsed = _launch(out_dir)
    print(f"\n{MAX_WORLD} gloo processes, every world size: {elapsed:.1f} s")
    assert elapsed < TIMEOUT_S
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(MAX_WORLD)]


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """Elementwise ``|got - ref| <= ATOL + RTOL |ref|``, NaN exactly where ref is NaN; returns max |diff|."""
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(got == -math.inf, ref == -math.inf), f"{what}: -inf pattern differs"
    ok = torch.isfinite(ref)
    diff = (got[ok] - ref[ok]).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    bad = diff > ATOL + RTOL * ref[ok].abs()
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements off, max |diff| {worst:.3g}"
    return worst


@pytest.mark.parametrize("world", WORLDS)
def test_context_parallel_equals_single_device_oracle(world, ranks_results):
    ranks = [res[world] for res in ranks_results[:world]]
    worst = {"out": 0.0, "lse": 0.0}
    for i, case in enumerate(cases(world)):
        name = case["name"]
        per_rank = [res[name] for res in ranks]
        for r, res in enumerate(per_rank):
            assert len(res["hi"]) == len(res["hi_expect"]), (name, r)
            for got, exp in zip(res["hi"], res["hi_expect"]):
                assert torch.equal(got, exp), f"{name} rank {r}: all-gathered selection differs"
        layout = make_layout(case, world)
        out = unshard([res["out"] for res in per_rank], layout)
        lse = unshard([res["lse"] for res in per_rank], layout)
        ref_out, ref_lse = per_rank[i % world]["ref"]
        worst["out"] = max(worst["out"], _assert_close(out, ref_out, f"{name} out"))
        worst["lse"] = max(worst["lse"], _assert_close(lse, ref_lse, f"{name} lse"))
        if case["dtype"] != torch.float32:
            rounded, ref_rounded = out.to(case["dtype"]).float(), ref_out.to(case["dtype"]).float()
            # the fp32 bound (ATOL covers outputs near 0, where reorder noise is relative to |v|) plus one ulp
            off = (rounded - ref_rounded).abs() > ATOL + BF16_ONE_ULP * torch.maximum(rounded.abs(), ref_rounded.abs())
            assert not bool(off.any()), f"{name}: {int(off.sum())} bf16 outputs more than one ulp from the oracle's"
        if case.get("poison"):
            assert bool(out.isnan().any()) and not bool(out.isnan().all()), name
    print(f"world {world}: {len(cases(world))} cases, ranks {[round(r['seconds'], 1) for r in ranks]} s, "
          f"max |diff| out {worst['out']:.2e} lse {worst['lse']:.2e}")


# ------------------------------------------------------------------ in process: the lse contract
def test_lse_is_the_sdpa_flash_logsumexp_at_fraction_one():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 200, 64, generator=g) for h in (HQ, HKV, HKV))
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    for causal in (False, True):
        out, lse = thrift_attention_reference(q, k, v, is_causal=causal, config=ThriftConfig(fraction=1.0),
                                              out_dtype=torch.float32, return_lse=True)
        ref_out, ref_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kk, vv, 0.0, causal)[:2]
        assert lse.dtype == torch.float32 and lse.shape == (1, HQ, 200)
        torch.testing.assert_close(lse, ref_lse, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        # plain call unchanged, and equal to the lse-returning call
        assert torch.equal(thrift_attention_reference(q, k, v, is_causal=causal, config=ThriftConfig(fraction=1.0),
                                                      out_dtype=torch.float32), out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_partials_over_block_aligned_key_chunks_merge_to_the_oracle(fmt):
    """Non-causal (each key chunk is a plain call): chunks of 128 / 64 / 256 / ragged keys, the global
    selection shifted into each chunk's frame, merged by lse."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 500, 32, generator=g) for h in (HQ, HKV, HKV))
    cfg = ThriftConfig(format=fmt, fraction=0.25)
    hi = select_blocks(q, k, is_causal=False, config=cfg)
    ref_out, ref_lse = thrift_attention_reference(q, k, v, config=cfg, out_dtype=torch.float32, return_lse=True)
    out, lse = torch.zeros_like(ref_out), torch.full_like(ref_lse, -math.inf)
    for s, e in ((128, 192), (0, 128), (192, 448), (448, 500)):
        part = thrift_attention_reference(q, k[:, :, s:e], v[:, :, s:e], config=cfg, hi_idx=torch.where(
            hi >= 0, hi - s // 64, -1), out_dtype=torch.float32, return_lse=True)
        out, lse = merge_partials(out, lse, *part)
    _assert_close(out, ref_out, f"{fmt} out")
    _assert_close(lse, ref_lse, f"{fmt} lse")
    # a chunk boundary inside a block changes the P scale B_rj: not the oracle any more
    bad = [thrift_attention_reference(q, k[:, :, s:e], v[:, :, s:e], config=cfg.replace(fraction=0.0),
                                      out_dtype=torch.float32, return_lse=True) for s, e in ((0, 100), (100, 500))]
    split = merge_partials(*bad[0], *bad[1])[0]
    whole = thrift_attention_reference(q, k, v, config=cfg.replace(fraction=0.0), out_dtype=torch.float32)
    assert float((split - whole).abs().max()) > 1e-3


def test_layouts_partition_and_round_trip():
    lay = load_balanced_layout(700, 4, 64)
    assert lay.pieces[0] == ((0, 128), (640, 700)) and lay.pieces[3] == ((384, 448), (448, 512))
    assert [lay.local_len(r) for r in range(4)] == [188, 192, 192, 128]
    lay.validate(64)
    assert load_balanced_layout(150, 4, 64).local_len(3) == 0          # fewer blocks than pieces
    x = torch.arange(2 * 700).view(1, 2, 700, 1)
    assert torch.equal(unshard([shard(x, lay, r) for r in range(4)], lay), x)
    with pytest.raises(ValueError, match="multiple of 64"):
        layout_from_lengths((100, 600)).validate(64)
    with pytest.raises(ValueError, match="partition"):
        SequenceLayout(300, (((0, 128),), ((192, 300),))).validate(64)
    with pytest.raises(ValueError, match="ragged last piece"):          # it would shift the next piece
        SequenceLayout(200, (((128, 200), (0, 64)), ((64, 128),))).validate(64)
    assert alignment(ThriftConfig(format="mxfp4", block_size=16)) == 32      # the V scale group


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("fmt,causal", [("fp8", False), ("nvfp4", True)])
def test_kernel_partials_merge_like_the_oracle(fmt, causal):
    """The chunk computation context parallel runs on a GPU (``kernels=True``): the Triton kernel with the
    chunk's share of the global selection and its lse output; merged over block-aligned key chunks it is
    the single-device oracle within the kernel budget (tests/tolerances.py)."""
    from thrift_inductor.distributed.context_parallel import _chunk_attention
    from tolerances import FP8_GPU_BUDGET, KERNEL_BUDGET, assert_kernel_matches_oracle
    from thrift_inductor.reference import exact_attention
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 320, 64, generator=g).to(dev) for h in (HQ, HKV, HKV))
    cfg = ThriftConfig(format=fmt, fraction=0.25)
    hi = select_blocks(q, k, is_causal=causal, config=cfg)
    ref_out, ref_lse = thrift_attention_reference(q, k, v, is_causal=causal, config=cfg, out_dtype=torch.float32,
                                                  return_lse=True)
    out, lse = torch.zeros_like(ref_out), torch.full_like(ref_lse, -math.inf)
    q_chunks = ((0, 320),) if not causal else ((0, 128), (128, 320))
    for q0, q1 in q_chunks:
        for s, e in ((0, 128), (128, 320)):
            if causal and s >= q1:
                continue                                   # keys after the query chunk: masked anyway
            diag = causal and (s, e) == (q0, q1)
            if causal and not diag and e > q0:
                e = q0                                     # keys before the query chunk: a plain call
            hq = hi[:, :, q0 // 64:-(-q1 // 64)]
            local = torch.where((hq >= s // 64) & (hq < -(-e // 64)), hq - s // 64, -1)
            part = _chunk_attention(q[:, :, q0:q1], k[:, :, s:e], v[:, :, s:e], local, is_causal=diag,
                                    scale=None, config=cfg, kernels=True)
            out[:, :, q0:q1], lse[:, :, q0:q1] = merge_partials(out[:, :, q0:q1], lse[:, :, q0:q1], *part)
    exact = exact_attention(q, k, v, is_causal=causal)
    budget = FP8_GPU_BUDGET if dev.type == "cuda" and fmt == "fp8" else KERNEL_BUDGET
    assert_kernel_matches_oracle(out, ref_out, exact, budget=budget)
    assert float((lse - ref_lse).abs().max()) < 1e-3
