"""How fast ThriftAttention runs: attention-kernel launch configs, in three tiers (Flex/FA style).

Everything here is a *speed* knob (query tile, warps, pipeline stages). Nothing here may change
numerics: the KV tile is the selection block (``BLOCK_N == block_size``, docs/kernels.md §3), and a
query tile never straddles two query blocks (``block_m | block_size``), so every config computes the
same per-(row, block) math and differs only in fp32 summation order. What is computed lives in
``config.ThriftConfig``.

Tiers:
- ``default_config(arch, dtype, head_dim, format, block_size)``: one config, no benchmarking needed.
- ``AUTOTUNE``: a short list benchmarked under ``max_autotune``.
- ``EXHAUSTIVE``: the product space, for ``max_autotune_flex_search_space="EXHAUSTIVE"``.
Every list is filtered through ``can_implement`` before use. The CPU interpreter gets exactly one
config (torch 2.11 cannot benchmark >= 2 template choices under ``TRITON_INTERPRET``, and benchmarking
an interpreted kernel only measures the interpreter).
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
BLOCK_M_CHOICES = (16, 32, 64, 128)
NUM_WARPS_CHOICES = (2, 4, 8)
NUM_STAGES_CHOICES = (1, 2, 3, 4)
HEAD_DIMS = (16, 32, 64, 128, 256)   # tl.arange needs a power of two; 256 is the largest tile we keep in registers
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Bytes per element of the low-precision operands in shared memory: FP4 formats are stored as exact bf16
# values (no FP4 MMA on sm_90, docs/numerics.md §5); fp8 as e4m3 codes.
LOW_ELEMENT_BYTES = {"nvfp4": 2, "mxfp4": 2, "fp8": 1}


@dataclasses.dataclass(frozen=True, order=True)
class AttnKernelConfig:
    """One launch config of the attention template. ``BLOCK_N`` is not here: it is ``block_size``."""

    block_m: int
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        return f"BLOCK_M={self.block_m}, num_warps={self.num_warps}, num_stages={self.num_stages}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AttnKernelConfig":
        return cls(block_m=int(d["block_m"]), num_warps=int(d["num_warps"]), num_stages=int(d["num_stages"]))


def shared_memory_bytes(cfg: AttnKernelConfig, head_dim: int, dtype: torch.dtype, block_size: int,
                        format: str = "nvfp4") -> int:
    """Upper estimate of the shared memory one CTA needs.

    The q tile stays resident in both precisions; each pipeline stage holds one K and one V tile of the
    wider of the two precisions (the lo and hi loops are separate, so only one precision is in flight);
    plus the P tile of the P.V dot staged in 16 bits.
    """
    in_bytes = torch.empty((), dtype=dtype).element_size()
    lo_bytes = LOW_ELEMENT_BYTES[format]
    q_tiles = cfg.block_m * head_dim * (in_bytes + lo_bytes)
    kv_stage = 2 * block_size * head_dim * max(in_bytes, lo_bytes)
    p_tile = cfg.block_m * block_size * 2
    return q_tiles + cfg.num_stages * kv_stage + p_tile


def tile_registers_per_thread(cfg: AttnKernelConfig, head_dim: int, block_size: int) -> int:
    """fp32 registers per thread for the accumulator plus the score tile."""
    return cfg.block_m * (head_dim + block_size) // (cfg.num_warps * THREADS_PER_WARP)


def why_not(cfg: AttnKernelConfig, head_dim: int, dtype: torch.dtype, block_size: int, *,
            format: str = "nvfp4", arch: str = FALLBACK_ARCH) -> Optional[str]:
    """The reason ``cfg`` cannot run this problem, or None when it can."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    if dtype not in DTYPES:
        return f"dtype {dtype} not in {DTYPES}"
    if format not in LOW_ELEMENT_BYTES:
        return f"format {format!r} not in {tuple(LOW_ELEMENT_BYTES)}"
    if cfg.block_m < MIN_BLOCK_M or cfg.block_m & (cfg.block_m - 1):
        return f"BLOCK_M {cfg.block_m} must be a power of two >= {MIN_BLOCK_M}"
    if block_size % cfg.block_m:
        return f"BLOCK_M {cfg.block_m} must divide block_size {block_size} (a query tile is inside one query block)"
    if cfg.num_warps not in NUM_WARPS_CHOICES:
        return f"num_warps {cfg.num_warps} not in {NUM_WARPS_CHOICES}"
    if cfg.num_stages < 1:
        return f"num_stages {cfg.num_stages} must be >= 1"
    smem = shared_memory_bytes(cfg, head_dim, dtype, block_size, format)
    limit = SMEM_BYTES.get(arch, SMEM_BYTES[FALLBACK_ARCH])
    if smem > limit:
        return f"needs ~{smem} B shared memory, {arch} has {limit}"
    regs = tile_registers_per_thread(cfg, head_dim, block_size)
    if regs > TILE_REGS_PER_THREAD:
        return f"tile state needs ~{regs} fp32 registers/thread (> {TILE_REGS_PER_THREAD}: spills)"
    return None


def can_implement(cfg: AttnKernelConfig, head_dim: int, dtype: torch.dtype, block_size: int, *,
                  format: str = "nvfp4", arch: str = FALLBACK_ARCH) -> bool:
    return why_not(cfg, head_dim, dtype, block_size, format=format, arch=arch) is None


# --- tier 1: per-arch defaults ------------------------------------------------------------------------
# Key: (arch, head_dim, is_8bit_low_path). dtype enters only through can_implement (fp32 inputs double
# the hi-path smem). BLOCK_N is the 64-token selection block, so BLOCK_M <= 64 at the default
# block size; one warpgroup (4 warps) per 64 query rows is the wgmma shape.
# Provenance: not yet measured for the thrift kernel; seeded from the H100 fp8/bf16 FlashAttention runs
# in fp8_attn_feasibility.md (3 stages best, 4 warps per 64 rows) and Flex's h100 defaults.
_DEFAULTS = {
    ("sm90", 16, False): AttnKernelConfig(64, 4, 3),
    ("sm90", 32, False): AttnKernelConfig(64, 4, 3),
    ("sm90", 64, False): AttnKernelConfig(64, 4, 3),
    ("sm90", 128, False): AttnKernelConfig(64, 4, 3),
    ("sm90", 256, False): AttnKernelConfig(64, 8, 2),
    ("sm90", 16, True): AttnKernelConfig(64, 4, 3),
    ("sm90", 32, True): AttnKernelConfig(64, 4, 3),
    ("sm90", 64, True): AttnKernelConfig(64, 4, 3),
    ("sm90", 128, True): AttnKernelConfig(64, 4, 3),
    ("sm90", 256, True): AttnKernelConfig(64, 8, 2),
    # sm_80 keeps fewer stages: 163 KB of shared memory.
    ("sm80", 16, False): AttnKernelConfig(64, 4, 2),
    ("sm80", 32, False): AttnKernelConfig(64, 4, 2),
    ("sm80", 64, False): AttnKernelConfig(64, 4, 2),
    ("sm80", 128, False): AttnKernelConfig(64, 4, 2),
    ("sm80", 256, False): AttnKernelConfig(64, 8, 1),
}
# The interpreter: few large programs keep interpreter overhead low (it runs programs one by one);
# stages/warps are ignored there. Capped at block_size.
CPU_INTERPRETER_CONFIG = AttnKernelConfig(64, 4, 1)

# --- tier 2 / 3: autotune lists ------------------------------------------------------------------------
AUTOTUNE = (
    AttnKernelConfig(64, 4, 3), AttnKernelConfig(64, 4, 2), AttnKernelConfig(64, 4, 4),
    AttnKernelConfig(64, 8, 3), AttnKernelConfig(32, 4, 3), AttnKernelConfig(32, 2, 3),
    AttnKernelConfig(128, 8, 3), AttnKernelConfig(128, 8, 2),
)
EXHAUSTIVE = tuple(AttnKernelConfig(m, w, s) for m, w, s in
                   itertools.product(BLOCK_M_CHOICES, NUM_WARPS_CHOICES, NUM_STAGES_CHOICES))


def arch_of(device: torch.device) -> str:
    """``"sm90"``-style arch key for a CUDA device, ``"cpu"`` otherwise. Needs no CUDA for non-CUDA devices."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}" if major < 9 else "sm90"   # sm_100+ untuned: treat like the target GPU


def _fits(configs: Iterable[AttnKernelConfig], head_dim, dtype, block_size, format, arch) -> list[AttnKernelConfig]:
    return [c for c in configs if can_implement(c, head_dim, dtype, block_size, format=format, arch=arch)]


def default_config(arch: str, dtype: torch.dtype, head_dim: int, format: str,
                   block_size: int) -> Optional[AttnKernelConfig]:
    """The single config to use without benchmarking, or None if no config fits (caller falls back)."""
    if arch == "cpu":
        preferred = dataclasses.replace(CPU_INTERPRETER_CONFIG,
                                        block_m=min(CPU_INTERPRETER_CONFIG.block_m, block_size))
    else:
        table_arch = arch if any(k[0] == arch for k in _DEFAULTS) else FALLBACK_ARCH
        preferred = _DEFAULTS.get((table_arch, head_dim, format == "fp8"))
    # Small block sizes (16, 32) or fp32 inputs can rule the table entry out: take the largest
    # autotune entry that still fits, so every (arch, dtype, head_dim, format, block_size) has a default.
    candidates = ([preferred] if preferred else []) + sorted(AUTOTUNE, reverse=True) + sorted(EXHAUSTIVE, reverse=True)
    fitting = _fits(candidates, head_dim, dtype, block_size, format, arch)
    return fitting[0] if fitting else None


def candidate_configs(arch: str, dtype: torch.dtype, head_dim: int, format: str, block_size: int, *,
                      search: str = "default") -> list[AttnKernelConfig]:
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
