"""The portable Triton attention implementation: support rules, configs, eager launch, Inductor choices.

Kernel source: ``kernel.py`` (one ``@triton.jit`` tile used by both the eager kernel and the template).
Template: ``template.py.jinja``, generated around ``kernels/contract.py`` (no argument list by hand).
Configs: ``configs.py`` (``TritonConfig``, defaults and autotune tiers).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import triton

from ...constants import MAX_KV_BLOCKS_SELECT
from ...problem import HEAD_DIM, NO_KERNEL, Problem, Reason, interpreting
from .. import contract
from ..rounding import FORMAT_CODES
from . import configs as C
from .configs import TritonConfig

TEMPLATE_PATH = Path(__file__).resolve().parent / "template.py.jinja"
log = logging.getLogger("thrift_inductor.lowering")


def kernel_head_dim(head_dim: int, fmt: str) -> int:
    """HEAD_DIM constexpr for a problem head dim: the next supported power of two (zero padding)."""
    floor = C.FP4_HEAD_DIMS[0] if fmt != "fp8" else C.HEAD_DIMS[0]
    return max(floor, triton.next_power_of_2(int(head_dim)))


def constexprs(problem: Problem, scale: float, config: TritonConfig) -> dict:
    """Every constexpr of ``thrift_attention_tile`` for a problem and a launch config."""
    cfg = problem.config
    return dict(SM_SCALE=float(scale), BLOCK_M=config.block_m, BLOCK_N=cfg.block_size,
                HEAD_DIM=kernel_head_dim(problem.head_dim, cfg.format), IS_CAUSAL=bool(problem.is_causal),
                FORMAT=FORMAT_CODES[cfg.format], P_MICRO=cfg.p_quant == "microblock",
                GQA_GROUP=problem.gqa_group, P_EXACT_ROUND=interpreting(),
                FP8_ACC_PROMOTE=contract.FP8_ACC_PROMOTE, RESCALE_SLACK=float(config.rescale_slack),
                HI_STAGES=config.hi_stages, LOW_LISTS=bool(config.low_lists),
                WINDOW=int(problem.window or 0),
                Q_ROW_SCALE=cfg.format == "fp8" or cfg.q_quant == "fp8", HAS_KEY_BIAS=bool(cfg.smooth_q))


class TritonAttention:
    name = "triton"
    # The low-path levers (numerics §4d) this kernel computes; kernels.implementations refuses the others.
    low_path_levers = ("q_quant", "smooth_q")

    def kernel_head_dim(self, problem: Problem) -> int:
        return kernel_head_dim(problem.head_dim, problem.config.format)

    def why_not(self, problem: Problem) -> Optional[Reason]:
        cfg = problem.config
        if problem.device_type not in ("cuda", "cpu") or (problem.device_type == "cpu" and not interpreting()):
            return Reason(NO_KERNEL, f"Triton runs on CUDA (or CPU under TRITON_INTERPRET=1), not {problem.device_type}")
        hd = self.kernel_head_dim(problem)
        if hd not in C.HEAD_DIMS:
            return Reason(HEAD_DIM, f"head dim {problem.head_dim} pads to {hd}, not in {C.HEAD_DIMS}")
        if cfg.format == "fp8" and cfg.block_size < C.FP8_MIN_BLOCK:
            return Reason(NO_KERNEL, f"fp8 needs block_size >= {C.FP8_MIN_BLOCK} (fp8 wgmma K), got {cfg.block_size}")
        if cfg.block_size < C.MIN_BLOCK_M:
            return Reason(NO_KERNEL, f"block_size {cfg.block_size} < {C.MIN_BLOCK_M} (tl.dot minimum)")
        if isinstance(problem.kv_len, int) and triton.cdiv(problem.kv_len, cfg.block_size) > MAX_KV_BLOCKS_SELECT:
            return Reason(NO_KERNEL, f"{triton.cdiv(problem.kv_len, cfg.block_size)} kv blocks exceed the "
                                     f"selection kernel's MAX_KV_BLOCKS_SELECT={MAX_KV_BLOCKS_SELECT}")
        if not self.configs(problem, "default"):
            return Reason(NO_KERNEL, f"no launch config fits head_dim={hd} {problem.dtype} "
                                     f"block_size={cfg.block_size} on {problem.arch}")
        return None

    def configs(self, problem: Problem, search: str = "default") -> list:
        cfg = problem.config
        configs = C.candidate_configs(problem.arch, problem.dtype, self.kernel_head_dim(problem), cfg.format,
                                      cfg.block_size, search=search)
        if problem.window is not None:     # a band is walked densely (the lists would need per-step masks)
            configs = list(dict.fromkeys(dataclasses.replace(c, low_lists=False) for c in configs))
        return configs

    def config_why_not(self, problem: Problem, config: TritonConfig) -> Optional[str]:
        cfg = problem.config
        if problem.window is not None and config.low_lists:
            return "a sliding window walks the dense band (low_lists is off for windows)"
        return C.why_not(config, self.kernel_head_dim(problem), problem.dtype, cfg.block_size,
                         format=cfg.format, arch=problem.arch)

    def config_to_dict(self, config: TritonConfig) -> dict:
        return {"impl": self.name, **config.to_dict()}

    def config_from_dict(self, d: dict) -> TritonConfig:
        return TritonConfig.from_dict(d)

    def launch(self, operands: tuple, problem: Problem, scale: float, config: Optional[TritonConfig] = None,
               *, return_lse: bool = False, out_dtype: Optional[torch.dtype] = None):
        q = operands[contract.INDEX["Q"]]
        B, Hq, Lq, D = q.shape
        Lk = operands[contract.INDEX["K"]].shape[2]
        if D != self.kernel_head_dim(problem):
            raise ValueError(f"operands have head dim {D}; the kernel runs at {self.kernel_head_dim(problem)} "
                             "(pad first: pipeline.run does)")
        contract.check(operands, q.shape, operands[contract.INDEX["K"]].shape, problem.config.format,
                       problem.config.block_size, q.dtype, problem.config)
        config = config or self.configs(problem, "default")[0]
        why = self.config_why_not(problem, config)
        if why:
            raise ValueError(f"launch config {config.describe()} cannot run this problem: {why}")
        out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
        lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
        if out.numel() == 0 or Lk == 0:
            out.zero_()       # no key: output 0, lse -inf (the oracle's convention)
            return (out, lse) if return_lse else out
        from .kernel import thrift_attention_fwd
        grid = (triton.cdiv(Lq, config.block_m), B * Hq)
        thrift_attention_fwd[grid](operands, contract.strides(operands), out, *out.stride(), lse, *lse.stride(),
                                   Lq, Lk, Hq, num_warps=config.num_warps, num_stages=config.num_stages,
                                   HAS_LSE=return_lse, **constexprs(problem, scale, config))
        return (out, lse) if return_lse else out

    def append_choices(self, choices: list, input_nodes: list, layout, problem: Problem, scale: float,
                       configs: Sequence) -> list:
        template = _template(bool(problem.config.smooth_q))
        appended = []
        for kc in configs:
            start = len(choices)
            err = template.maybe_append_choice(choices, input_nodes=input_nodes, layout=layout,
                                               num_stages=kc.num_stages, num_warps=kc.num_warps,
                                               **constexprs(problem, scale, kc))
            appended.extend([kc] * (len(choices) - start))
            if err is not None:
                log.info("template config %s rejected: %s", kc.describe(), err)
        return appended


TEMPLATE_NAME = "thrift_attention"
# The template of calls with the key-bias operand (smooth_q): its argument list has KEY_BIAS, so it is a
# second template (a name of its own); calls without it keep the first one, unchanged.
KEY_BIAS_TEMPLATE_NAME = "thrift_attention_key_bias"
_TEMPLATES: dict = {}


def template_source(key_bias: bool = False) -> str:
    """The jinja source with the contract's argument lists filled in (``key_bias``: KEY_BIAS appended)."""
    from ...config import ThriftConfig
    ops = contract.operands(ThriftConfig(smooth_q=key_bias))
    src = TEMPLATE_PATH.read_text()
    return (src.replace("@DEF_KERNEL@", contract.template_def_kernel(ops))
               .replace("@POINTERS@", contract.template_pointer_tuple(ops))
               .replace("@STRIDES@", contract.template_stride_tuple(ops)))


def _template(key_bias: bool = False):
    """The Inductor TritonTemplate (one per process and variant: Inductor asserts unique template names)."""
    name = KEY_BIAS_TEMPLATE_NAME if key_bias else TEMPLATE_NAME
    if name not in _TEMPLATES:
        from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplate

        @SymbolicGridFn
        def thrift_attention_grid(batch, q_heads, num_queries, head_dim, meta, *, cdiv):
            """One program per (query tile of BLOCK_M rows, batch x query head); called with the output
            sizes (ints when benchmarking, sympy in wrapper codegen for dynamic lengths)."""
            return (cdiv(num_queries, meta["BLOCK_M"]), batch * q_heads, 1)

        getattr(TritonTemplate, "all_templates", {}).pop(name, None)   # re-import / reload
        _TEMPLATES[name] = TritonTemplate(name=name, grid=thrift_attention_grid, source=template_source(key_bias))
    return _TEMPLATES[name]
