"""How fast the portable Triton attention runs: its launch configs, in three tiers (Flex/FA style).

Everything here is a *speed* knob (query tile, warps, pipeline stages, lazy-rescale slack). Nothing here
may change numerics: the kv tile is the selection block (``BLOCK_N == block_size``), a query tile covers
either part of one query block or whole query blocks (``block_m | block_size`` or ``block_size | block_m``),
so every config computes the same per-(row, block) math and differs only in fp32 summation order. What is
computed lives in ``config.ThriftConfig`` and ``kernels/contract.py``.

Tiers:
- ``default_config(arch, dtype, head_dim, format, block_size)``: one config, no benchmarking needed.
- ``AUTOTUNE``: a short list benchmarked under ``max_autotune``.
- ``EXHAUSTIVE``: the product space, for ``max_autotune_flex_search_space="EXHAUSTIVE"``.
Every list is filtered through ``why_not`` before use. The CPU interpreter gets exactly one config
(benchmarking an interpreted kernel only measures the interpreter).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Optional

import torch

# --- hardware limits the estimates are checked against ------------------------------------------
# Max dynamic shared memory per CTA (opt-in): H100/H200 227 KB, A100 163 KB. The interpreter has no
# limit; we check it against sm_90 so a config that passes CPU CI also fits the target GPU.
SMEM_BYTES = {"sm90": 232448, "sm80": 166912, "cpu": 232448}
FALLBACK_ARCH = "sm90"          # unknown CUDA archs are judged (and defaulted) like the target GPU
# fp32 registers per thread we allow for the live softmax state: the accumulator tile [BLOCK_M, D]
# plus the score tile [BLOCK_M, BLOCK_N]. fp8_attn_feasibility.md: 128x128 tiles at 8 warps
# (64 + 64 regs) ran at 243-255 regs/thread without spilling; at 4 warps (128 + 128) they spilled.
TILE_REGS_PER_THREAD = 128
THREADS_PER_WARP = 32

# --- the config space -----------------------------------------------------------------------------
MIN_BLOCK_M = 16                # tl.dot needs M >= 16
MAX_BLOCK_M = 128               # two warpgroups of 64 rows: the largest tile the register budget allows
BLOCK_M_CHOICES = (16, 32, 64, 128)
NUM_WARPS_CHOICES = (2, 4, 8)
NUM_STAGES_CHOICES = (1, 2, 3, 4)
HEAD_DIMS = (16, 32, 64, 128, 256)   # HEAD_DIM constexpr: a power of two (smaller D is zero-padded)
FP4_HEAD_DIMS = (64, 128, 256)       # the FP4 kernels are written for whole 32-element groups x 2
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Bytes per element of the low-precision operands in shared memory: FP4 formats are stored as exact bf16
# values (no FP4 MMA on sm_90, docs/numerics.md §5); fp8 as e4m3 codes.
LOW_ELEMENT_BYTES = {"nvfp4": 2, "mxfp4": 2, "fp8": 1}
FP8_MIN_BLOCK = 32              # fp8 wgmma has K = 32: the P @ V reduction (BLOCK_N) needs >= 32
# Lazy rescale slack in log2 units (FA4 uses 8): exp2(b - m_i) <= 2**slack keeps acc/l inside fp32.
# 0 rescales every tile. H100 A/B at 16k causal d128 (docs/perf_notes.md): within noise.
DEFAULT_RESCALE_SLACK = 8.0


@dataclasses.dataclass(frozen=True, order=True)
class TritonConfig:
    """One launch config of the Triton attention. ``BLOCK_N`` is not here: it is ``block_size``."""

    block_m: int
    num_warps: int
    num_stages: int
    rescale_slack: float = DEFAULT_RESCALE_SLACK
    hi_stages: Optional[int] = None      # pipelining of the high-precision loop (None: Triton's default)
    low_lists: bool = False              # low loop walks LO_IDX (block_m <= block_size) instead of every block

    def describe(self) -> str:
        extra = "" if self.hi_stages is None else f", hi_stages={self.hi_stages}"
        extra += ", low_lists" if self.low_lists else ""
        return (f"BLOCK_M={self.block_m}, num_warps={self.num_warps}, num_stages={self.num_stages}, "
                f"rescale_slack={self.rescale_slack:g}{extra}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TritonConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def shared_memory_bytes(cfg: TritonConfig, head_dim: int, dtype: torch.dtype, block_size: int,
                        format: str = "nvfp4") -> int:
    """Upper estimate of the shared memory one CTA needs: q in both precisions, per stage one K and one V
    tile of the wider precision (the two loops never overlap), the P tile of the P.V dot in 16 bits."""
    in_bytes = torch.empty((), dtype=dtype).element_size()
    lo_bytes = LOW_ELEMENT_BYTES[format]
    q_tiles = cfg.block_m * head_dim * (in_bytes + lo_bytes)
    kv_stage = 2 * block_size * head_dim * max(in_bytes, lo_bytes)
    p_tile = cfg.block_m * block_size * 2
    return q_tiles + cfg.num_stages * kv_stage + p_tile


def tile_registers_per_thread(cfg: TritonConfig, head_dim: int, block_size: int) -> int:
    """fp32 registers per thread for the accumulator plus the score tile."""
    return cfg.block_m * (head_dim + block_size) // (cfg.num_warps * THREADS_PER_WARP)


def why_not(cfg: TritonConfig, head_dim: int, dtype: torch.dtype, block_size: int, *,
            format: str = "nvfp4", arch: str = FALLBACK_ARCH) -> Optional[str]:
    """The reason ``cfg`` cannot run this problem (head_dim is the kernel's padded one), or None."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    if dtype not in DTYPES:
        return f"dtype {dtype} not in {DTYPES}"
    if format not in LOW_ELEMENT_BYTES:
        return f"format {format!r} not in {tuple(LOW_ELEMENT_BYTES)}"
    m = cfg.block_m
    if m < MIN_BLOCK_M or m > MAX_BLOCK_M or m & (m - 1):
        return f"BLOCK_M {m} must be a power of two in [{MIN_BLOCK_M}, {MAX_BLOCK_M}]"
    if block_size % m and m % block_size:
        return f"BLOCK_M {m} and block_size {block_size}: one must divide the other (tiles align to query blocks)"
    if cfg.num_warps not in NUM_WARPS_CHOICES:
        return f"num_warps {cfg.num_warps} not in {NUM_WARPS_CHOICES}"
    if cfg.num_stages < 1 or (cfg.hi_stages is not None and cfg.hi_stages < 1):
        return f"num_stages {cfg.num_stages} / hi_stages {cfg.hi_stages} must be >= 1"
    if cfg.low_lists and m > block_size:
        return f"low_lists walks one query block's list: BLOCK_M {m} must be <= block_size {block_size}"
    if cfg.rescale_slack < 0:
        return f"rescale_slack {cfg.rescale_slack} must be >= 0"
    smem = shared_memory_bytes(cfg, head_dim, dtype, block_size, format)
    limit = SMEM_BYTES.get(arch, SMEM_BYTES[FALLBACK_ARCH])
    if smem > limit:
        return f"needs ~{smem} B shared memory, {arch} has {limit}"
    regs = tile_registers_per_thread(cfg, head_dim, block_size)
    if regs > TILE_REGS_PER_THREAD:
        return f"tile state needs ~{regs} fp32 registers/thread (> {TILE_REGS_PER_THREAD}: spills)"
    return None


def can_implement(cfg: TritonConfig, head_dim: int, dtype: torch.dtype, block_size: int, *,
                  format: str = "nvfp4", arch: str = FALLBACK_ARCH) -> bool:
    return why_not(cfg, head_dim, dtype, block_size, format=format, arch=arch) is None


# --- tier 1: per-arch defaults ------------------------------------------------------------------------
# Key: (arch, head_dim, low path is fp8). Measured on the H200 (torch 2.11, Triton 3.6, 32k causal, attention
# kernel alone; docs/perf_notes.md "Kernel v2"): 64 query rows on one warpgroup beat 128 rows on two
# (255 registers, spills: 267-284 vs 325-340 TF/s fp8 d128); rescale_slack 0 (no block-wide max test per
# tile) beat 8 by 4-25%; the fp8 path is faster walking LO_IDX (d64 310 vs 260 TF/s), the bf16 (FP4) path
# walking every block densely (d128 424 vs 382). Before that change the defaults were (64, 4, 3, slack 8).
# Re-measured for fp8 on the list walk (bench/results/ab_hi_path_H200.log, two runs): d128 slack 8 356-358 vs
# slack 0 329-332 TF/s, d64 slack 0 277-282 vs slack 8 225-228: the slack is per head dim.
_SM90_FP8 = TritonConfig(64, 4, 3, rescale_slack=0.0, low_lists=True)
_SM90_FP8_D128 = TritonConfig(64, 4, 3, rescale_slack=8.0, low_lists=True)
_SM90_BF16 = TritonConfig(64, 4, 3, rescale_slack=0.0)
_DEFAULTS = {
    **{("sm90", d, True): _SM90_FP8 for d in (16, 32, 64)},
    ("sm90", 128, True): _SM90_FP8_D128,
    **{("sm90", d, False): _SM90_BF16 for d in (16, 32, 64, 128)},
    ("sm90", 256, True): TritonConfig(64, 8, 2, rescale_slack=0.0),
    ("sm90", 256, False): TritonConfig(64, 8, 2, rescale_slack=0.0),
    # sm_80 keeps fewer stages: 163 KB of shared memory. Not measured.
    **{("sm80", d, f): TritonConfig(64, 4, 2) for d in (16, 32, 64, 128) for f in (True, False)},
    **{("sm80", 256, f): TritonConfig(64, 8, 1) for f in (True, False)},
}
# The interpreter: few large programs keep interpreter overhead low (it runs programs one by one);
# stages/warps are ignored there.
CPU_INTERPRETER_CONFIG = TritonConfig(64, 4, 1)

# --- tier 2 / 3: autotune lists ------------------------------------------------------------------------
AUTOTUNE = (
    _SM90_FP8, _SM90_FP8_D128, _SM90_BF16, TritonConfig(64, 4, 2, rescale_slack=0.0, low_lists=True),
    TritonConfig(64, 4, 2, rescale_slack=0.0), TritonConfig(64, 4, 3), TritonConfig(64, 4, 4, rescale_slack=0.0),
    TritonConfig(128, 8, 3, rescale_slack=0.0), TritonConfig(32, 4, 3, rescale_slack=0.0),
)
EXHAUSTIVE = tuple(TritonConfig(m, w, s) for m, w, s in
                   itertools.product(BLOCK_M_CHOICES, NUM_WARPS_CHOICES, NUM_STAGES_CHOICES))


def _fits(configs: Iterable[TritonConfig], head_dim, dtype, block_size, format, arch) -> list[TritonConfig]:
    return [c for c in configs if can_implement(c, head_dim, dtype, block_size, format=format, arch=arch)]


def default_config(arch: str, dtype: torch.dtype, head_dim: int, format: str,
                   block_size: int) -> Optional[TritonConfig]:
    """The single config to use without benchmarking, or None if no config fits."""
    if arch == "cpu":
        preferred = CPU_INTERPRETER_CONFIG
    else:
        table_arch = arch if any(k[0] == arch for k in _DEFAULTS) else FALLBACK_ARCH
        preferred = _DEFAULTS.get((table_arch, head_dim, format == "fp8"))
    # Small block sizes or fp32 inputs can rule the table entry out: take the largest autotune entry
    # that still fits, so every (arch, dtype, head_dim, format, block_size) has a default.
    # (asked on every eager call through the support predicate: stop at the first fit, not check all ~60)
    candidates = ([preferred] if preferred else []) + sorted(AUTOTUNE, reverse=True) + sorted(EXHAUSTIVE, reverse=True)
    return next((c for c in candidates
                 if can_implement(c, head_dim, dtype, block_size, format=format, arch=arch)), None)


def candidate_configs(arch: str, dtype: torch.dtype, head_dim: int, format: str, block_size: int, *,
                      search: str = "default") -> list[TritonConfig]:
    """Configs to offer the autotuner. ``search``: ``"default"`` (1), ``"autotune"``, ``"exhaustive"``.

    The default config is always first, so a failed benchmark of the rest still leaves the known-good one.
    """
    if search not in ("default", "autotune", "exhaustive"):
        raise ValueError(f"search must be 'default', 'autotune' or 'exhaustive', got {search!r}")
    first = default_config(arch, dtype, head_dim, format, block_size)
    if first is None:
        return []
    if arch == "cpu" or search == "default":
        return [first]
    pool = AUTOTUNE if search == "autotune" else EXHAUSTIVE
    rest = [c for c in _fits(pool, head_dim, dtype, block_size, format, arch) if c != first]
    return [first, *rest]
