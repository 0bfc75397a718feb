"""Inductor lowering of ``thrift::attention``: prepass -> selection -> autotuned attention template.

    thrift::attention(q, k, v, ...)                     (one FX node, from the rewrite pass or the user)
      -> thrift::prepass(q, k, v)       FallbackKernel, 10 outputs   (docs/kernels.md §1)
      -> thrift::select(q_mean, ...)    FallbackKernel, 5 outputs    (docs/kernels.md §2)
      -> per kernel implementation that accepts the Problem (kernels/__init__.py): one autotune choice
         per launch config (e.g. kernels/triton: TritonTemplate), input nodes in kernels/contract.py order
         + ExternKernelChoice           the eager op itself (pipeline.run on CUDA)
      -> autotune_select_algorithm      benchmarks when there are >= 2 choices

Only speed knobs are autotuned; the op arguments (format, fraction, ...) fix the numerics. The
template path needs Triton codegen: CUDA, or CPU with ``cpu_backend="triton"`` (the interpreter CI).
Elsewhere (stock C++ CPU backend), when the head dim must be padded (the eager op pads), or when no
config fits, the node lowers to the eager op alone and the reason is logged and counted. ``autotune_store.py`` is consulted before choices are built: a hit offers only the
stored winner, so nothing is benchmarked.

Dynamic shapes: sequence lengths reach the kernel only through ``{{size()}}``/``{{stride()}}`` (runtime
args); constexprs come from static values (head dim, heads, op arguments). Nothing here guards on a length.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Optional, Sequence

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import register_lowering
from torch._inductor.select_algorithm import (
    ExternKernelChoice, add_feedback_saver, autotune_select_algorithm, extern_kernels)
from torch._inductor.virtualized import V

# ops registers thrift::attention; kernel_ops registers thrift::prepass / thrift::select. Both must exist
# whenever this module is loaded: generated code (also from an FX-graph cache hit, where no lowering
# runs) calls them by name.
from . import autotune_store, kernel_ops, ops  # noqa: F401
from .ops import PREPASS_LEVERS, SELECT_LEVERS, config_to_op_kwargs
from .config import ThriftConfig
from .kernels import contract
from .problem import Problem, arch_of

log = logging.getLogger("thrift_inductor.lowering")

AUTOTUNE_NAME = "thrift_attention"            # select_algorithm op name (its caches and logs key on it)
FALLBACK_NAME = "thrift_attention_fallback"


# ---------------------------------------------------------------------------------------------------
# Fallback choice (module-level singleton: Inductor asserts unique names)
# ---------------------------------------------------------------------------------------------------
def _fallback_benchmark_kernel(q, k, v, *selection_inputs, **op_kwargs):
    """What autotuning times for the fallback: the eager op on (q, k, v). Every choice of one
    ``autotune_select_algorithm`` call gets the same inputs, so the prepass/selection tensors arrive
    here too and are ignored."""
    return torch.ops.thrift.attention.default(q, k, v, **op_kwargs)


def _create_fallback_node(q, k, v, *selection_inputs, **op_kwargs):
    """IR for a winning fallback: the op on (q, k, v) only, so the prepass/selection nodes lose their
    last user and the scheduler drops them."""
    return ir.FallbackKernel.create(torch.ops.thrift.attention.default, q, k, v, **op_kwargs)


def _fresh_fallback_choice() -> ExternKernelChoice:
    if hasattr(extern_kernels, FALLBACK_NAME):
        delattr(extern_kernels, FALLBACK_NAME)
    return ExternKernelChoice(_fallback_benchmark_kernel, name=FALLBACK_NAME, has_out_variant=False,
                              kernel_creator=_create_fallback_node)


thrift_attention_fallback = _fresh_fallback_choice()


# ---------------------------------------------------------------------------------------------------
# Scoped overrides (tests, benchmarks)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChoiceOverride:
    configs: Optional[tuple] = None      # template configs to offer (None: heuristics decide; (): none)
    fallback: Optional[bool] = None      # offer the eager fallback (None: default rule)
    store: bool = False                  # consult / feed the autotune store


_OVERRIDE: contextvars.ContextVar[Optional[ChoiceOverride]] = contextvars.ContextVar("thrift_choices", default=None)


@contextlib.contextmanager
def kernel_choices(configs: Optional[Sequence] = None, *,
                   fallback: Optional[bool] = None, store: bool = False):
    """Force the choices the lowering offers, for compiles inside the block (tests and benchmarks).

    The forced choice is not part of any cache key, so Inductor's caches are disabled inside.
    ``configs=[]`` with ``fallback=True`` compiles the eager op only.
    """
    token = _OVERRIDE.set(ChoiceOverride(None if configs is None else tuple(configs), fallback, store))
    try:
        with inductor_config.patch(force_disable_caches=True):
            yield
    finally:
        _OVERRIDE.reset(token)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _hint(expr) -> int:
    sizevars = V.graph.sizevars
    fn = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint   # 2.13 / 2.11 spelling
    return int(fn(expr))


def _fixed_input(x):
    """Realize ``x`` with a unit last stride and a frozen layout: the template reads strides at render
    time, so they may not change later (2.11 lacks ``always_freeze_layout``; inductor.md §5.12)."""
    x = ir.ExternKernel.realize_input(x)
    x = ir.ExternKernel.require_stride1(x)
    if isinstance(x.get_layout(), ir.FlexibleLayout):
        x.freeze_layout()
    return x


def _fallback_node(q, k, v, op_kwargs: dict, reason: str):
    log.info("thrift::attention lowers to the eager op: %s", reason)
    counters["thrift"]["lowering_fallback_only"] += 1
    return ir.TensorBox.create(
        ir.FallbackKernel.create(torch.ops.thrift.attention.default, q, k, v, **op_kwargs))


def _multi_output_op(op, *args):
    """Lower a list-returning custom op to a FallbackKernel and wrap each output as a TensorBox."""
    outs = ir.FallbackKernel.create(op, *args)
    return [ir.TensorBox.create(o) for o in outs]


def _search_space() -> str:
    if not inductor_config.max_autotune:
        return "default"
    return "exhaustive" if inductor_config.max_autotune_flex_search_space == "EXHAUSTIVE" else "autotune"


def synthetic_selection(batch: int, q_heads: int, lq: int, lk: int, block_size: int, is_causal: bool,
                        n_hi: int, device) -> tuple:
    """Valid §2 selection tensors for benchmarking (random ints would index out of bounds): per query
    block the last ``n_hi`` candidates (the diagonal side) on the high path, the rest ascending on the low."""
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    rows = torch.arange(nqb, device=device)
    cand = torch.clamp(rows, max=max(nkb - 1, 0)) + 1 if is_causal else torch.full_like(rows, nkb)
    cand = torch.clamp(cand, max=nkb)
    hi_cnt = torch.clamp(cand, max=n_hi)
    lo_cnt = cand - hi_cnt
    j = torch.arange(nkb, device=device)[None, :]
    lo_idx = torch.where(j < lo_cnt[:, None], j, -1)
    hi_idx = torch.where(j < hi_cnt[:, None], cand[:, None] - 1 - j, -1)
    hi_map = (j >= (cand - hi_cnt)[:, None]) & (j < cand[:, None])

    def full(t, dtype=torch.int32):
        return t.to(dtype).expand(batch, q_heads, *t.shape).contiguous()
    return {"HI_IDX": full(hi_idx), "HI_CNT": full(hi_cnt), "LO_IDX": full(lo_idx), "LO_CNT": full(lo_cnt),
            "HI_MAP": full(hi_map, torch.int8)}


def _selection_input_gen_fns(q, k, cfg: ThriftConfig, is_causal: bool) -> dict:
    from .reference import resolve_top_k   # pure torch; only needed when benchmarking
    batch, q_heads, lq = (_hint(s) for s in q.get_size()[:3])
    lk = _hint(k.get_size()[2])
    nkb = -(-lk // cfg.block_size)
    n_hi = resolve_top_k(nkb, is_causal, cfg.top_k, cfg.fraction)
    cache = {}

    def gen(pos):
        def fn(node):
            if "sel" not in cache:
                cache["sel"] = synthetic_selection(batch, q_heads, lq, lk, cfg.block_size, is_causal, n_hi,
                                                   node.get_device())
            return cache["sel"][pos]
        return fn
    return {contract.INDEX[name]: gen(name) for name in contract.SELECTION_OPERANDS}


# ---------------------------------------------------------------------------------------------------
# Autotune store feedback
# ---------------------------------------------------------------------------------------------------
def _record_autotune_result(timings, name, input_nodes, choices, profiled_time_fn, precompile_times=None):
    """``add_feedback_saver`` hook: store the fastest thrift choice under the key the lowering attached."""
    if name != AUTOTUNE_NAME:
        return
    tagged = [(c, t) for c, t in timings.items()
              if getattr(c, "thrift_store_key", None) is not None and math.isfinite(t)]
    if not tagged:
        return
    winner, ms = min(tagged, key=lambda ct: ct[1])
    cfg = winner.thrift_kernel_config
    entry = (autotune_store.fallback_entry(ms) if cfg is None
             else autotune_store.template_entry(cfg, ms))
    try:
        autotune_store.open_store().put(winner.thrift_store_key, entry)
        counters["thrift"]["autotune_store_record"] += 1
    except OSError as exc:   # a read-only home must not fail the compile
        log.warning("could not record thrift autotune result: %s", exc)


def _ensure_feedback_saver() -> None:
    from torch._inductor import select_algorithm as sa
    cache = getattr(sa, "_ALGORITHM_SELECTOR_CACHE", None)
    registered = getattr(cache, "feedback_saver_fns", None)
    if registered is None or _record_autotune_result not in registered:
        add_feedback_saver(_record_autotune_result)


def _stored_winner(key, impls: dict, problem: Problem):
    """The stored decision for ``key``: an ``AttnKernelConfig``, ``"fallback"``, or None (miss: the
    feedback saver will record what benchmarking picks)."""
    entry = autotune_store.open_store().get(key)
    if entry is not None and entry["choice"] == "fallback":
        counters["thrift"]["autotune_store_hit"] += 1
        return "fallback"
    if entry is not None:
        impl = impls.get(entry["config"].get("impl", "triton"))
        stored = None
        if impl is not None:
            try:
                stored = impl.config_from_dict(entry["config"])
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("ignoring stored thrift config %s: %s", entry["config"], exc)
        if stored is not None and impl.config_why_not(problem, stored) is None:
            counters["thrift"]["autotune_store_hit"] += 1
            return impl, stored
        log.warning("ignoring stored thrift config %s: it no longer fits", entry["config"])
    counters["thrift"]["autotune_store_miss"] += 1
    _ensure_feedback_saver()
    return None


def _tag(choices: list, start: int, key, cfg: Optional[dict]) -> None:
    """Attach the store key and the choice's config dict (None: the eager fallback) for the feedback saver."""
    for c in choices[start:]:
        c.thrift_store_key = key
        c.thrift_kernel_config = cfg


# ---------------------------------------------------------------------------------------------------
# The lowering
# ---------------------------------------------------------------------------------------------------
@register_lowering(torch.ops.thrift.attention.default, type_promotion_kind=None)
def lower_thrift_attention(q, k, v, scale, is_causal, format, fraction, top_k, selection, block_size, p_quant,
                           window=None, sink_blocks=0, q_quant="format", smooth_q=False):
    cfg = ThriftConfig(format=format, fraction=fraction, top_k=top_k, selection=selection,
                       block_size=block_size, p_quant=p_quant, sink_blocks=sink_blocks, q_quant=q_quant,
                       smooth_q=smooth_q)
    op_kwargs = dict(scale=scale, is_causal=is_causal, format=format, fraction=fraction, top_k=top_k,
                     selection=selection, block_size=block_size, p_quant=p_quant)
    if window is not None:
        op_kwargs["window"] = window
    op_kwargs.update(config_to_op_kwargs(cfg))
    device = q.get_device()
    dtype = q.get_dtype()
    override = _OVERRIDE.get()

    if device.type != "cuda" and inductor_config.cpu_backend != "triton":
        return _fallback_node(q, k, v, op_kwargs, f"no Triton codegen for {device.type} "
                              f"(cpu_backend={inductor_config.cpu_backend!r})")
    if override is not None and override.configs == ():
        return _fallback_node(q, k, v, op_kwargs, "forced by kernel_choices(configs=[])")
    B, Hq, Lq, D = q.get_size()
    _, Hkv, Lk, _ = k.get_size()
    # Head dim and head counts become constexprs: specialising on them is fine (a model has one value);
    # the lengths Lq, Lk are never guarded.
    guard_int = V.graph.sizevars.guard_int
    head_dim, hq, hkv = guard_int(D), guard_int(Hq), guard_int(Hkv)
    if guard_int(v.get_size()[-1]) != head_dim or guard_int(k.get_size()[-1]) != head_dim:
        return _fallback_node(q, k, v, op_kwargs, "key/value head dim differs from query head dim")
    if hkv == 0 or hq % hkv:
        return _fallback_node(q, k, v, op_kwargs, f"query heads {hq} not a multiple of kv heads {hkv}")
    arch = arch_of(device)
    problem = Problem(B, hq, hkv, Lq, Lk, head_dim, dtype, device.type, bool(is_causal), cfg, window, arch)
    from .kernels import implementations
    impls = {}
    for name, impl in implementations().items():
        reason = impl.why_not(problem)
        if reason is None and not getattr(impl, "inductor_choices", True):
            reason = "eager only (no Inductor choice yet)"
        if reason is None and impl.kernel_head_dim(problem) != head_dim:
            reason = f"head dim {head_dim} is padded to {impl.kernel_head_dim(problem)} by the eager op"
        if reason is None:
            impls[name] = impl
        else:
            log.info("thrift implementation %s declines: %s", name, reason)
    if not impls:
        return _fallback_node(q, k, v, op_kwargs, "no kernel implementation renders this problem")

    if override is not None and override.configs is not None:
        offered = [(impl, c) for impl in impls.values() for c in override.configs
                   if impl.config_why_not(problem, c) is None]
    else:
        offered = [(impl, c) for impl in impls.values() for c in impl.configs(problem, _search_space())]
    if not offered:
        return _fallback_node(q, k, v, op_kwargs, f"no launch config fits head_dim={head_dim} {dtype} "
                              f"block_size={block_size} on {arch}")
    # The interpreter times only itself, so on CPU the template runs alone; on GPU the eager op competes.
    with_fallback = device.type == "cuda" if override is None or override.fallback is None else override.fallback

    store_key = None
    use_store = override.store if override is not None else device.type == "cuda"
    if use_store and len(offered) + with_fallback >= 2:    # a choice to make: ask the store first
        store_key = autotune_store.StoreKey.for_problem(
            device=device, dtype=dtype, head_dim=head_dim, causal=is_causal, format=format, p_quant=p_quant,
            block_size=block_size, seq_len_hint=_hint(Lk))
        winner = _stored_winner(store_key, impls, problem)
        if winner == "fallback":
            return _fallback_node(q, k, v, op_kwargs, "autotune store: the eager op won for this key")
        if winner is not None:
            offered, with_fallback, store_key = [winner], False, None    # one choice: nothing to benchmark

    q, k, v = (_fixed_input(x) for x in (q, k, v))
    # trailing optional args only when set: graphs without them keep their old form
    prep_tail = (cfg.q_quant, cfg.smooth_q) if config_to_op_kwargs(cfg, PREPASS_LEVERS) else ()
    prep = _multi_output_op(torch.ops.thrift.prepass.default, q, k, v, format, block_size, *prep_tail)
    sel_args = (prep[6], prep[7], prep[8], prep[9], Lq, Lk, is_causal, selection, fraction, top_k, block_size)
    tail = (window, cfg.sink_blocks) if config_to_op_kwargs(cfg, SELECT_LEVERS) else (
        () if window is None else (window,))
    sel = _multi_output_op(torch.ops.thrift.select.default, *sel_args, *tail)
    from .kernels.prepass import LeverOutputs, Prepass
    from .kernels.select import BlockLists
    # the prepass's lever outputs (key_bias) follow its 10 outputs (kernel_ops.prepass_op)
    prep_fields = Prepass._fields + (LeverOutputs._fields if cfg.smooth_q else ())
    nodes = {"input": {"q": q, "k": k, "v": v}, "prepass": dict(zip(prep_fields, prep)),
             "select": dict(zip(BlockLists._fields, sel))}
    input_nodes = [_fixed_input(nodes[o.stage][o.field]) for o in contract.operands(cfg)]

    out_size = [B, Hq, Lq, D]
    layout = ir.FixedLayout(device, dtype, out_size, ir.FlexibleLayout.contiguous_strides(out_size))
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)

    choices: list = []
    for impl in impls.values():
        configs = [c for i, c in offered if i is impl]
        start = len(choices)
        appended = impl.append_choices(choices, input_nodes, layout, problem, sm_scale, configs)
        for choice, kc in zip(choices[start:], appended):
            _tag([choice], 0, store_key, impl.config_to_dict(kc))
    n_templates = len(choices)
    if with_fallback or not choices:
        start = len(choices)
        thrift_attention_fallback.maybe_append_choice(choices, input_nodes=input_nodes, layout=layout,
                                                      **op_kwargs)
        _tag(choices, start, store_key, None)
    counters["thrift"]["template_choices"] += n_templates
    gen_fns = _selection_input_gen_fns(q, k, cfg, is_causal) if len(choices) > 1 else None
    res = autotune_select_algorithm(AUTOTUNE_NAME, choices, input_nodes, layout, input_gen_fns=gen_fns)
    return res[0] if isinstance(res, tuple) else res    # 2.11 returns the node, 2.13 (node, choice)
