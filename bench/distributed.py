"""Multi-GPU prefill (issue 13 item 3): thrift vs stock under tensor and context parallelism.

Per mode, prefill length N and implementation, on every rank: median ms, peak memory, the share of the
step with a collective in flight and the exposed part of it, and the output's relative L2 against stock.

  tp  an HF Llama with Llama-3-8B dims (``--layers`` decoder layers, no lm_head), heads sharded with DTensor
      ``parallelize_module`` (q/k/v, gate/up colwise; o/down rowwise), ``torch.compile`` with
      ``backend="inductor"`` (stock) or ``backend="thrift"``; identical tokens on every rank.
  cp  one layer's causal attention at the same dims (32 q / 8 kv heads, d 128), the sequence in torch's
      head-tail layout: ``thrift_inductor.distributed.context_parallel_attention`` vs stock, the first of
      ``torch_cp`` (torch's ``context_parallel``: SDPA with GQA through its ring), ``torch_cp_repeat_kv``
      (the same with K/V repeated to every query head) and ``allgather_sdpa`` (all-gather K/V, SDPA of the
      local query pieces with a lower-right causal mask) that runs on every rank; the row's ``impl`` names
      it and ``note`` says why the ones before it did not run.

Method. Every timed call follows a barrier; a rank times its call with ``perf_counter`` around it (CUDA
synchronised), the step time of a repeat is the slowest rank's, ``ms`` the median over ``--reps`` (fixed
counts: a collective needs every rank to call the same number of times, so no ``do_bench``). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed calls (weights and inputs included; n/a on CPU).
Communication: one more call under ``torch.profiler``; collective intervals are the NCCL kernels (CUDA) or
the ``gloo:*`` events (CPU), compute intervals the other kernels (CUDA) or the step thread's ``aten::``
events (CPU). ``comm_share`` = |union of collective intervals| / step, ``comm_exposed_share`` = the part
of it with no compute running. On CPU these only check the plumbing (gloo works on its own threads, Inductor's C++
kernels are not profiler events).

    python bench/distributed.py                     # CUDA: 2 ranks, nccl, 64k + 128k, bf16
    python bench/distributed.py --smoke             # CPU: 2 gloo ranks, tiny dims, 512 tokens, fp32
    torchrun --nproc-per-node 2 bench/distributed.py   # same, ranks from torchrun's environment

Writes ``distributed_<device>.csv`` (one row per mode, N, implementation and rank) and ``.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH.parent), str(BENCH)):      # run as a script from a checkout without install
    if _p not in sys.path:
        sys.path.insert(0, _p)

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0)
SMOKE_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, vocab_size=97)
GPU_LENGTHS = (65536, 131072)
SMOKE_LENGTHS = (512,)
WORLD = 2
GPU_WARMUP, GPU_REPS = 2, 5           # whole-prefill calls of 0.1-2 s: few and long
SMOKE_WARMUP, SMOKE_REPS = 1, 2
PG_TIMEOUT_S = 300                    # longer than any compile a peer may wait for in a collective
STEP_EVENT = "bench_step"
MIB = 1 << 20
STATUS_CHARS = 160
NOTE_CHARS = 2 * STATUS_CHARS         # the reasons of the candidates before the one that ran
# NVLink multicast must stay off on the lent GPU machines (docs/distributed.md): set before any process group.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclasses.dataclass
class Row:
    mode: str
    n: int
    impl: str
    rank: int
    world: int
    dtype: str
    status: str = "ok"                  # ok | oom | error: <message>
    ms: float = math.nan                # the step: median over repeats of the slowest rank
    rank_ms: float = math.nan           # this rank's own median
    peak_mib: float = math.nan
    comm_share: float = math.nan
    comm_exposed_share: float = math.nan
    rel_l2_vs_stock: float = math.nan
    first_call_s: float = math.nan      # set-up + compile + the first call, this rank
    rewritten: str = ""                 # tp thrift: attention sites the pass rewrote on this rank
    note: str = ""
    gpu: str = ""
    torch: str = ""
    triton: str = ""
    cuda: str = ""
    commit: str = ""


# ------------------------------------------------------------------------------------------ timing
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _covered(intervals, lo: int, hi: int) -> int:
    """Length of the union of ``intervals`` within ``[lo, hi]``."""
    total, reach = 0, lo
    for s, e in sorted(intervals):
        s, e = max(s, reach), min(e, hi)
        if e > s:
            total, reach = total + e - s, e
    return total


def comm_shares(fn, device) -> tuple:
    """(in flight, exposed) communication share of one profiled call of ``fn`` (see the module doc)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        with record_function(STEP_EVENT):
            fn()
            _sync(device)
    events = [e for e in prof.profiler.kineto_results.events() if not e.is_user_annotation()
              or e.device_type() == DeviceType.CPU]
    step = next(e for e in events if e.name() == STEP_EVENT and e.device_type() == DeviceType.CPU)
    lo, hi = step.start_ns(), step.end_ns()
    comm, compute = [], []
    for e in events:
        if e is step or e.name() == STEP_EVENT:
            continue
        span = (e.start_ns(), e.end_ns())
        if device.type == "cuda":
            if e.device_type() == DeviceType.CUDA:
                (comm if "nccl" in e.name().lower() else compute).append(span)
        elif e.name().startswith("gloo:"):
            comm.append(span)
        elif e.name().startswith("aten::") and e.start_thread_id() == step.start_thread_id():
            compute.append(span)        # not the wrappers around a whole compiled graph, nor comm waits
    step_ns = max(hi - lo, 1)
    exposed = _covered(comm + compute, lo, hi) - _covered(compute, lo, hi)      # |comm \ compute|
    return _covered(comm, lo, hi) / step_ns, exposed / step_ns


def measure(fn, device, warmup: int, reps: int) -> dict:
    """Every rank calls ``fn`` ``warmup + reps + 1`` times (the last one profiled)."""
    for _ in range(warmup):
        out = fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else math.nan
    dist.barrier()
    shares = comm_shares(fn, device)
    return dict(out=out, times=times, peak_mib=peak, comm_share=shares[0], comm_exposed_share=shares[1])


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().float().cpu(), ref.detach().float().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _status(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__}: {text}"[:STATUS_CHARS]


# ------------------------------------------------------------------------------------------ tensor parallel
def build_tp_model(dims: dict, layers: int, max_len: int, device, dtype, mesh):
    import transformers
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_len, pad_token_id=0,
                                   attn_implementation="sdpa", **dims)
    torch.manual_seed(0)                # the same weights on every rank (DTensor takes each rank's shard)
    with torch.device(device):
        model = transformers.LlamaModel(cfg).to(dtype).eval()
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    for layer in model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def tp_candidates(model, n: int, args, device) -> list:
    """[[stock], [thrift]]: ``(impl name, enter(stack) -> fn)`` lists; the same tokens on every rank."""
    tokens = torch.randint(0, args.dims["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    tokens = tokens.to(device)

    def compiled(backend, options):
        def enter(stack):
            torch._dynamo.reset()
            fwd = torch.compile(model, backend=backend, options=options)

            def fn():
                with torch.no_grad():
                    return fwd(tokens, use_cache=False).last_hidden_state
            return fn
        return enter
    # FX-graph cache off: a cache hit would skip the thrift pass (0 sites rewritten); compiled kernels
    # may still come from their caches (compile time is not measured here)
    stock = {"fx_graph_cache": False}
    thrift = {**stock, "thrift.format": args.format, "thrift.fraction": args.fraction}
    return [[("inductor", compiled("inductor", stock))], [(args.thrift_impl, compiled("thrift", thrift))]]


# ------------------------------------------------------------------------------------------ context parallel
def cp_inputs(n: int, args, device, dtype):
    from thrift_inductor.distributed import load_balanced_layout, shard
    hq, hkv, d = (args.dims[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = load_balanced_layout(n, world, args.alignment)
    if any(layout.local_len(r) != n // world for r in range(world)):
        raise ValueError(f"cp needs N divisible by 2 x world x {args.alignment} (equal head-tail pieces), got {n}")
    g = torch.Generator(device=device).manual_seed(n)
    local = [shard(torch.randn(1, h, n, d, generator=g, device=device, dtype=dtype), layout, rank)
             for h in (hq, hkv, hkv)]      # every rank draws the whole sequence, keeps its pieces
    return layout, [t.contiguous() for t in local]


def _lower_right_sdpa(q, k, v):
    """Causal attention of the last ``Lq`` of ``Lk`` positions (SDPA's lower-right causal bias)."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention
    from torch.nn.attention.bias import causal_lower_right
    gqa = q.shape[1] != k.shape[1]
    if gqa and not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)):
        # flash takes lower-right causal with GQA; efficient attention and the CPU path take it only
        # with every query head's K/V (else SDPA would materialise an Lq x Lk mask and pick math)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        gqa = False
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def cp_stock_candidates(layout, q, k, v, mesh, device):
    """Stock context-parallel attention, in order of preference: (name, enter(stack) -> fn)."""
    from thrift_inductor.distributed import unshard
    rank, world = dist.get_rank(), dist.get_world_size()

    def torch_cp(repeat_kv: bool):
        def enter(stack):
            from torch.distributed.tensor.experimental import context_parallel
            # torch shards its buffers itself; q/k/v are already this rank's pieces (as a model computes
            # them from sharded inputs), so the buffer is the positions, which also checks the layouts agree
            positions = torch.arange(layout.seq_len, device=device)[None]
            stack.enter_context(context_parallel(mesh, buffers=[positions], buffer_seq_dims=[1],
                                                 no_restore_buffers={positions}))
            if not torch.equal(positions[0].cpu(), layout.positions(rank)):
                raise RuntimeError("torch's context_parallel shards the sequence unlike thrift's head-tail layout")
            kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) if repeat_kv else t for t in (k, v))
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True,
                                                                            enable_gqa=not repeat_kv)
        return enter

    def allgather_sdpa(stack):
        def fn():
            kv = torch.cat([k, v], -1)
            parts = [torch.empty_like(kv) for _ in range(world)]
            dist.all_gather(parts, kv)
            whole = unshard(parts, layout)
            out = torch.empty_like(q)
            for off, s, e in layout.local_pieces(rank):
                out[:, :, off:off + e - s] = _lower_right_sdpa(q[:, :, off:off + e - s], whole[:, :, :e, :k.shape[-1]],
                                                               whole[:, :, :e, k.shape[-1]:])
            return out
        return fn
    return [("torch_cp", torch_cp(False)), ("torch_cp_repeat_kv", torch_cp(True)), ("allgather_sdpa", allgather_sdpa)]


def cp_candidates(n: int, args, device, mesh) -> list:
    """[[stock, in order of preference], [thrift]]: ``(impl name, enter(stack) -> fn)`` lists."""
    from thrift_inductor.distributed import context_parallel_attention
    layout, (q, k, v) = cp_inputs(n, args, device, args.dtype)

    def thrift(stack):
        return lambda: context_parallel_attention(q, k, v, config=args.config, is_causal=True, layout="load_balanced")
    return [cp_stock_candidates(layout, q, k, v, mesh, device), [(args.thrift_impl, thrift)]]


# ------------------------------------------------------------------------------------------ one measurement
def _all_ranks_ok(ok: bool, device) -> bool:
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_one(mode: str, n: int, candidates, args, device, stock_out=None):
    """The first candidate whose first call runs on every rank, measured: (row, this rank's times, output)."""
    from torch._dynamo.utils import counters
    row = Row(mode=mode, n=n, impl=candidates[-1][0], rank=dist.get_rank(), world=dist.get_world_size(),
              dtype=str(args.dtype).replace("torch.", ""), **args.env)
    notes, out, times = [], None, []
    for name, enter in candidates:
        counters.clear()
        with contextlib.ExitStack() as stack:
            try:
                t0 = time.perf_counter()
                fn = enter(stack)
                fn()                                  # the first call: compiles, and proves it runs
                _sync(device)
                row.first_call_s, ok = time.perf_counter() - t0, True
            except Exception as exc:                  # the next candidate, or the row says what happened
                ok, row.status = False, _status(exc)
            if not _all_ranks_ok(ok, device):
                if ok:
                    row.status = "error: another rank failed"
                if name != candidates[-1][0]:
                    notes.append(f"{name}: {row.status.removeprefix('error: ')}")
                continue
            row.impl, row.status = name, "ok"
            if "thrift" in counters:
                row.rewritten = str(counters["thrift"].get("rewritten", 0))
            try:
                res = measure(fn, device, args.warmup, args.reps)
            except Exception as exc:
                row.status = _status(exc)
                break
            out, times = res.pop("out"), res.pop("times")
            row.rank_ms = statistics.median(times)
            for key, value in res.items():
                setattr(row, key, value)
            if stock_out is not None:
                row.rel_l2_vs_stock = rel_l2(out, stock_out)
            break
    row.note = "; ".join(notes)[:NOTE_CHARS]
    return row, times, out


def gather_rows(row: Row, times: list, rows: list) -> None:
    """Every rank's row to every rank; ``ms`` = median over repeats of the slowest rank."""
    mine = [None] * dist.get_world_size()
    dist.all_gather_object(mine, (row, times))
    all_times = [t for _, t in mine]
    if all(all_times) and len({len(t) for t in all_times}) == 1:
        step = statistics.median(max(rep) for rep in zip(*all_times))
        for r, _ in mine:
            r.ms = step
    rows.extend(r for r, _ in mine)


def run_mode(mode: str, args, device, mesh, rows: list, on_rows) -> None:
    """Every length of one mode: stock first (its output is the reference of thrift's ``rel_l2_vs_stock``)."""
    model = None
    if mode == "tp":
        model = build_tp_model(args.dims, args.layers, max(args.lengths), device, args.dtype, mesh)
    for n in args.lengths:
        stock, thrift = tp_candidates(model, n, args, device) if mode == "tp" else cp_candidates(n, args, device, mesh)
        row, times, out = run_one(mode, n, stock, args, device)
        stock_out = None if out is None else out.detach().cpu()    # off the device: not in thrift's peak
        del out
        gather_rows(row, times, rows)
        on_rows(rows)
        _free(device)
        row, times, out = run_one(mode, n, thrift, args, device, stock_out)
        del out, stock, thrift, stock_out
        gather_rows(row, times, rows)
        on_rows(rows)
        _free(device)
    del model
    _free(device)


def _free(device) -> None:
    import gc
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ outputs
def write_csv(rows: list, path: Path) -> None:
    from common import write_rows_csv
    write_rows_csv(rows, path)


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def table(rows: list) -> str:
    """One line per mode, N and implementation; per-rank values joined by ``/``."""
    lines = ["| mode | N | impl | ms | vs stock | peak GiB per rank | comm in flight | comm exposed "
             "| rel L2 vs stock | rewritten | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r.mode, r.n, r.impl) for r in rows))
    for mode, n, impl in keys:
        group = sorted((r for r in rows if (r.mode, r.n, r.impl) == (mode, n, impl)), key=lambda r: r.rank)
        stock = [r.ms for r in rows if (r.mode, r.n) == (mode, n) and not r.impl.startswith("thrift")]
        ms = group[0].ms
        ratio = stock[0] / ms if stock and ms > 0 else math.nan
        per = lambda f, spec: " / ".join(_fmt(f(r), spec) for r in group)
        status = sorted({r.status for r in group}, key=lambda s: s == "ok")[0]
        lines.append(f"| {mode} | {n} | {impl} | {_fmt(ms, '.1f')} | {_fmt(ratio, '.2f')}x "
                     f"| {per(lambda r: r.peak_mib / 1024, '.1f')} | {per(lambda r: 100 * r.comm_share, '.0f')} % "
                     f"| {per(lambda r: 100 * r.comm_exposed_share, '.0f')} % "
                     f"| {_fmt(max(r.rel_l2_vs_stock for r in group), '.3g')} "
                     f"| {'/'.join(r.rewritten for r in group if r.rewritten) or '-'} | {status} |")
    notes = sorted({f"{r.mode} {r.n}, {r.impl} ran; before it {r.note}" for r in rows if r.note})
    return "\n".join(lines + [""] + [f"- stock cascade: {n}" for n in notes]) + "\n"


def markdown(rows: list, args) -> str:
    env = args.env
    dims = ", ".join(f"{k} {v}" for k, v in args.dims.items())
    return (f"# Distributed prefill, {env['gpu']} x {args.world} ({args.backend})\n\n"
            f"torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}; "
            f"{str(args.dtype).replace('torch.', '')}, B=1; {dims}; tp: {args.layers} decoder layers, no lm_head; cp: one layer's causal "
            f"attention, head-tail layout; thrift {args.format} fraction {args.fraction}; warm-up {args.warmup}, "
            f"{args.reps} timed repeats.\n\n"
            "ms: median over repeats of the slowest rank (barrier before every call). vs stock: stock ms / ms. "
            "Peak: max_memory_allocated over the timed calls. comm: share of one profiled call with a collective "
            "in flight (NCCL kernels / gloo events) and the part of it with no compute running. rel L2: the "
            "rank's output vs stock's (largest over ranks).\n\n" + table(rows))


# ------------------------------------------------------------------------------------------ ranks
def worker(rank: int, world: int, args) -> None:
    """One rank: process group, mesh, every mode; rank 0 writes the files after each measurement."""
    from torch.distributed.device_mesh import init_device_mesh
    from common import environment
    from thrift_inductor import backend
    from thrift_inductor.config import ThriftConfig
    from thrift_inductor.distributed import alignment
    backend.register()      # the entry point is missing when pip installed into another interpreter
    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=device)
    else:
        torch.set_num_threads(1)        # the ranks share the cores
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    mesh = init_device_mesh(device.type, (world,))
    args.config = ThriftConfig(format=args.format, fraction=args.fraction)
    args.alignment, args.env = alignment(args.config), environment()
    args.env = {k: str(args.env[k]) for k in ("gpu", "torch", "triton", "cuda", "commit")}
    out = Path(args.out)
    tag = _device_tag(args.device)

    def on_rows(rows):
        if rank == 0:
            write_csv(rows, out / f"distributed_{tag}.csv")
            (out / f"distributed_{tag}.md").write_text(markdown(rows, args))
    rows: list = []
    for mode in args.modes:
        run_mode(mode, args, device, mesh, rows, on_rows)
    dist.barrier()
    if rank == 0:
        print(table(rows), flush=True)
    dist.destroy_process_group()


def _device_tag(device: str) -> str:
    if device != "cuda":
        return "cpu"
    from model import gpu_tag          # bench/model.py's short name: 'NVIDIA H200' -> 'H200'
    return gpu_tag("cuda")


def _spawned(rank: int, world: int, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    worker(rank, world, args)


def launch(args) -> None:
    """Under torchrun (``RANK`` set): this process is one rank. Otherwise spawn ``--world`` ranks."""
    if args.device == "cuda":
        os.environ.update(GPU_ENV)          # before any process group exists (the children inherit it)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")   # no compile pool per rank on few cores
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(_spawned, args=(args.world, args), nprocs=args.world, join=True)


def parse_args(argv=None):
    from thrift_inductor.config import DEFAULT_FRACTION
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny dims, 512 tokens, few repeats (CPU check of every path)")
    p.add_argument("--modes", nargs="+", default=["tp", "cp"], choices=["tp", "cp"])
    p.add_argument("--lengths", nargs="+", type=int, default=None)
    p.add_argument("--layers", type=int, default=2, help="tp: decoder layers")
    p.add_argument("--world", type=int, default=WORLD)
    p.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4", "fp8"])
    p.add_argument("--fraction", type=float, default=DEFAULT_FRACTION)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args(argv)
    args.dims = dict(SMOKE_DIMS if args.smoke else LLAMA3_8B)
    args.lengths = args.lengths or list(SMOKE_LENGTHS if args.smoke else GPU_LENGTHS)
    if args.warmup is None:
        args.warmup = SMOKE_WARMUP if args.smoke else GPU_WARMUP
    if args.reps is None:
        args.reps = SMOKE_REPS if args.smoke else GPU_REPS
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.backend = "nccl" if args.device == "cuda" else "gloo"
    args.thrift_impl = f"thrift-{args.format}"
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(f"--world {args.world} needs as many GPUs, found {torch.cuda.device_count()}")
    return args


if __name__ == "__main__":
    launch(parse_args())
