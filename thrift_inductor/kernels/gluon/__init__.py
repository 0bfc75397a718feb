"""The warp-specialized Hopper implementation (Gluon) of the fp8 format: support rules, configs, eager launch.

Kernel source: ``kernel.py`` (TMA producer warp + two consumer warpgroups). Same contract operands and
numerics as the portable Triton kernel (``kernels/contract.py``, docs/numerics.md); the one GPU test
matrix (tests/test_kernel_matrix.py) runs both. It takes what it was written for and refuses the rest
with a reason, so the portable kernel keeps every other case:
- sm_90 exactly (wgmma, setmaxnreg) and a Triton with Gluon's ``warp_specialize``;
- format fp8, ``block_size`` 64, ``p_quant`` block, no sliding window;
- fp16 / bf16 inputs (the high path's wgmma takes 16-bit operands), head dim padded to 64 or 128.
Inductor: offered as an extern choice beside the template (``append_choices``); autotuning decides.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import torch

from ...problem import HEAD_DIM, NO_KERNEL, WINDOW, Problem, Reason
from .. import contract

BLOCK = 64                          # the kernel's query/kv block (kernel.BLOCK, without importing Gluon)
HEAD_DIMS = (64, 128)               # a consumer's [64, D] fp32 accumulator + [64, 64] scores fit 232 regs
DTYPES = (torch.float16, torch.bfloat16)
VALIDATED_TRITON = "3.6"            # the Triton the GPU test matrix ran this kernel on (H200, torch 2.11)
STAGES_CHOICES = (2, 3, 4)          # depth of the K/V shared-memory ring
DEFAULT_STAGES = 3
# Lazy rescale slack (log2 units); 0 rescales every block. H200, 32k causal, kernel alone
# (bench/results/ws_sweep_H200.log): 0 beats 8 by 10-12% (d128 362 vs 328 TF/s, d64 244 vs 218), as for
# the Triton kernel: the lazy test is a block-wide max and a branch per block.
DEFAULT_RESCALE_SLACK = 0.0


@dataclasses.dataclass(frozen=True, order=True)
class GluonConfig:
    num_stages: int = DEFAULT_STAGES
    rescale_slack: float = DEFAULT_RESCALE_SLACK
    ablate: int = 0      # measurement only (kernel.py _AB_* bits; bench/ws_ablation.py): wrong numbers unless 0

    def describe(self) -> str:
        extra = f", ablate={self.ablate}" if self.ablate else ""
        return f"gluon_ws, num_stages={self.num_stages}, rescale_slack={self.rescale_slack:g}{extra}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GluonConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@functools.lru_cache(maxsize=None)
def gluon_available() -> Optional[str]:
    """None when Gluon's Hopper warp specialization imports here, else why not."""
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except Exception as exc:     # any import failure means: not this Triton
        return f"no Gluon Hopper API in this Triton ({type(exc).__name__}: {exc})"
    if not hasattr(gl, "warp_specialize"):
        return "this Triton's Gluon has no warp_specialize"
    import triton
    if not triton.__version__.startswith(VALIDATED_TRITON):
        # Gluon is experimental and changes between releases: run only what the GPU matrix has passed on
        return f"validated on Triton {VALIDATED_TRITON}.x only (this is {triton.__version__})"
    return None


def _exactly_sm90(problem: Problem) -> bool:
    """``Problem.arch`` folds sm_100+ into "sm90" (untuned archs run the sm_90 configs); wgmma and setmaxnreg
    exist only on 9.0, so where a GPU is present its capability decides."""
    if problem.device_type != "cuda" or problem.arch != "sm90":
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() == (9, 0)


class GluonAttention:
    name = "gluon_ws"
    inductor_choices = False      # the lowering offers it once it has an Inductor choice (append_choices)

    def kernel_head_dim(self, problem: Problem) -> int:
        d = int(problem.head_dim)
        return next((h for h in HEAD_DIMS if h >= d), d)

    def why_not(self, problem: Problem) -> Optional[Reason]:
        cfg = problem.config
        if not _exactly_sm90(problem):
            return Reason(NO_KERNEL, "the warp-specialized kernel is written for sm_90 (wgmma, setmaxnreg)")
        if cfg.format != "fp8":
            return Reason(NO_KERNEL, f"the warp-specialized kernel runs the fp8 format, not {cfg.format}")
        if cfg.block_size != BLOCK or cfg.p_quant != "block":
            return Reason(NO_KERNEL, f"the warp-specialized kernel needs block_size {BLOCK} and p_quant='block'")
        if problem.window is not None:
            return Reason(WINDOW, "the warp-specialized kernel has no sliding window")
        if problem.dtype not in DTYPES:
            return Reason(NO_KERNEL, f"the warp-specialized kernel takes fp16/bf16 inputs, not {problem.dtype}")
        if self.kernel_head_dim(problem) not in HEAD_DIMS:
            return Reason(HEAD_DIM, f"head dim {problem.head_dim} is above {HEAD_DIMS[-1]}")
        why = gluon_available()
        if why:
            return Reason(NO_KERNEL, why)
        return None

    def configs(self, problem: Problem, search: str = "default") -> list:
        if search == "default":
            return [GluonConfig()]
        return [GluonConfig(num_stages=s) for s in STAGES_CHOICES] + [GluonConfig(rescale_slack=8.0)]

    def config_why_not(self, problem: Problem, config) -> Optional[str]:
        if not isinstance(config, GluonConfig):
            return f"not a GluonConfig: {config!r}"
        if config.num_stages not in STAGES_CHOICES:
            return f"num_stages {config.num_stages} not in {STAGES_CHOICES}"
        return None

    def config_to_dict(self, config: GluonConfig) -> dict:
        return {"impl": self.name, **config.to_dict()}

    def config_from_dict(self, d: dict) -> GluonConfig:
        return GluonConfig.from_dict(d)

    def launch(self, operands: tuple, problem: Problem, scale: float, config: Optional[GluonConfig] = None,
               *, return_lse: bool = False, out_dtype: Optional[torch.dtype] = None):
        if return_lse or out_dtype not in (None, operands[contract.INDEX["Q"]].dtype):
            raise NotImplementedError("the warp-specialized kernel returns the output in the input dtype only "
                                      "(no log-sum-exp yet): use impl_name='triton'")
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        from .kernel import MAXNREG, thrift_attention_ws_fwd
        q = operands[contract.INDEX["Q"]]
        B, Hq, Lq, D = q.shape
        k_lo = operands[contract.INDEX["K_LO"]]
        vt = operands[contract.INDEX["V_LO_T"]]
        Hkv, Lk = k_lo.shape[1], k_lo.shape[2]
        if D != self.kernel_head_dim(problem):
            raise ValueError(f"operands have head dim {D}; the kernel runs at {self.kernel_head_dim(problem)}")
        contract.check(operands, q.shape, k_lo.shape, problem.config.format, problem.config.block_size, q.dtype)
        config = config or self.configs(problem, "default")[0]
        why = self.config_why_not(problem, config)
        if why:
            raise ValueError(f"launch config {config!r} cannot run this problem: {why}")
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if out.numel() == 0 or Lk == 0:
            return out.zero_()
        # TMA reads the two low-precision kv operands as 2-D row-major views
        k_lo, vt = k_lo.contiguous(), vt.contiguous()
        nkb_pad = vt.shape[-1]
        k_desc = TensorDescriptor(k_lo, [B * Hkv * Lk, D], [D, 1], [BLOCK, D],
                                  gl.NVMMASharedLayout.get_default_for([BLOCK, D], gl.float8e4nv))
        vt_desc = TensorDescriptor(vt, [B * Hkv * D, nkb_pad], [nkb_pad, 1], [D, BLOCK],
                                   gl.NVMMASharedLayout.get_default_for([D, BLOCK], gl.float8e4nv))
        grid = (-(-Lq // (2 * BLOCK)), B * Hq)
        thrift_attention_ws_fwd[grid](k_desc, vt_desc, operands, contract.strides(operands), out, out.stride(),
                                      Lq, Lk, Hq, Hkv, SM_SCALE=float(scale), HEAD_DIM=D,
                                      IS_CAUSAL=bool(problem.is_causal), GQA_GROUP=problem.gqa_group,
                                      FP8_ACC_PROMOTE=contract.FP8_ACC_PROMOTE,
                                      RESCALE_SLACK=float(config.rescale_slack), NUM_STAGES=config.num_stages,
                                      ABLATE=int(config.ablate),
                                      num_warps=4, maxnreg=MAXNREG)
        return out

    def append_choices(self, choices: list, input_nodes: list, layout, problem: Problem, scale: float,
                       configs: Sequence) -> list:
        return []     # eager only until it wins (Inductor choice: see docs/kernels.md)
