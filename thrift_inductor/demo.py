"""``python -m thrift_inductor.demo``: compile a small GPT with ``backend="thrift"`` and show what happened.

The model has seeded random weights (no pretrained model loads offline in under a minute on CPU). It
prints the ``explain()`` table, the error of three configs against exact attention, on the model's logits
and, when the real SmolLM2 Q/K/V capture is available (``THRIFT_QKV_PATH``, ``.data/`` in the checkout or
``../shared/data/`` beside it), on real attention inputs; on a GPU also timings against stock Inductor, for
the small model and for one HF Llama-3-8B-sized decoder layer at 16k tokens. Well under a minute on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention, explain
from .config import ThriftConfig

SEED = 0
VOCAB, DIM, N_HEAD, N_KV_HEAD, N_LAYER = 512, 256, 4, 2, 2      # head dim 64, GQA 2
REAL_QKV_NAME = "smollm2_emma_8k_qkv.safetensors"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where the capture may live, relative to the checkout (an installed wheel has none of these)
REAL_QKV_CANDIDATES = (os.path.join(_REPO, ".data", REAL_QKV_NAME),
                       os.path.join(_REPO, "..", "shared", "data", REAL_QKV_NAME))
HF_SEQ = 16384                  # the GPU speed row: long enough that attention dominates the layer
REAL_LAYER, REAL_TOKENS, REAL_Q_HEADS = 15, 1024, 3             # a deep layer: where FP4 alone hurts most

VARIANTS = {
    "high precision only (fraction=1)": ThriftConfig(fraction=1.0),
    "nvfp4 only (fraction=0)": ThriftConfig(format="nvfp4", fraction=0.0),
    "thrift nvfp4, 5% high precision": ThriftConfig(format="nvfp4", fraction=0.05),
}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.hd = DIM // N_HEAD
        self.wqkv = nn.Linear(DIM, (N_HEAD + 2 * N_KV_HEAD) * self.hd, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).split([N_HEAD * self.hd, N_KV_HEAD * self.hd, N_KV_HEAD * self.hd], dim=-1)
        q, k, v = (t.view(B, L, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, L, DIM))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2, self.attn = nn.RMSNorm(DIM), nn.RMSNorm(DIM), Attention()
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.SiLU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _options(cfg: ThriftConfig) -> dict:
    return {f"thrift.{k}": getattr(cfg, k) for k in ("format", "fraction", "top_k", "selection", "block_size", "p_quant")}


def _real_attention_errors(device, dtype):
    """Relative L2 error vs fp64 exact attention on real SmolLM2 Q/K/V (None if the file is absent)."""
    paths = [os.environ.get("THRIFT_QKV_PATH", ""), *REAL_QKV_CANDIDATES]
    path = next((p for p in paths if p and os.path.exists(p)), None)
    if path is None:
        return None
    from safetensors import safe_open
    from .reference import exact_attention
    with safe_open(path, "pt") as f:
        scale = json.loads(f.metadata()["info"])[f"layer{REAL_LAYER}.scale"]
        q = f.get_slice(f"layer{REAL_LAYER}.q")[:, :REAL_Q_HEADS, :REAL_TOKENS]
        k = f.get_slice(f"layer{REAL_LAYER}.k")[:, :1, :REAL_TOKENS]
        v = f.get_slice(f"layer{REAL_LAYER}.v")[:, :1, :REAL_TOKENS]
    q, k, v = (t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
    exact = exact_attention(q, k, v, is_causal=True, scale=scale)
    out = {}
    for name, cfg in VARIANTS.items():
        y = attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True, config=cfg).double()
        out[name] = float((y - exact).norm() / exact.norm())
    return out


def _hf_llama_speed(seq: int = HF_SEQ) -> None:
    """One HF Llama decoder layer at Llama-3-8B dimensions (random init, bf16): eager HF, stock Inductor
    (HF materialises the causal mask under compile), thrift nvfp4 / fp8. Skipped without transformers."""
    try:
        import transformers
    except ImportError:
        print("\n(HF speed row skipped: transformers is not installed)")
        return
    from . import backend
    backend.register()
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=1, vocab_size=32000,
                                   max_position_embeddings=seq, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    model = transformers.LlamaModel(cfg).to("cuda", torch.bfloat16).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
    print(f"\nHF Llama-3-8B-sized decoder layer, {seq} tokens, bf16 (ms, CUDA events):")
    paths = {"eager HF (SDPA is_causal)": lambda: model,
             "stock inductor": lambda: torch.compile(model),
             "thrift nvfp4 5%": lambda: torch.compile(model, backend="thrift", options={"thrift.format": "nvfp4"}),
             "thrift fp8 5%": lambda: torch.compile(model, backend="thrift", options={"thrift.format": "fp8"})}
    with torch.no_grad():
        for name, make in paths.items():
            torch._dynamo.reset()
            try:
                print(f"  {name:<36} {_bench_ms(make(), idx, iters=5):.1f}")
            except Exception as exc:      # a demo row must not hide the others
                print(f"  {name:<36} failed: {type(exc).__name__}: {str(exc)[:120]}")


def _bench_ms(fn, *args, iters: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 256 CPU, 4096 GPU)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    seq = args.seq or (4096 if cuda else 256)
    t0 = time.time()
    torch.manual_seed(SEED)
    model = TinyGPT().to(device=device, dtype=dtype).eval()
    idx = torch.randint(0, VOCAB, (1, seq), device=device)
    print(f"thrift_inductor demo: TinyGPT (seeded random weights), {N_LAYER} layers, {N_HEAD} heads / "
          f"{N_KV_HEAD} kv heads, head_dim {DIM // N_HEAD}, seq {seq}, {dtype}, {device}")

    with torch.no_grad():
        ref = model(idx).double()     # stock attention (exact up to fp rounding)
    errors, report = {}, None
    for name, cfg in VARIANTS.items():
        # explain() compiles with backend="thrift" and also returns the compiled call's output.
        rep = explain(model, idx, options=_options(cfg))
        errors[name] = (rep.output.double() - ref).abs().max().item()
        report = rep if cfg == VARIANTS["thrift nvfp4, 5% high precision"] else report
    print("\n" + str(report) + "\n")
    print("max |logits - exact-attention logits| per config (compiled with backend='thrift'):")
    for name, err in errors.items():
        print(f"  {name:<36} {err:.3e}")

    real = _real_attention_errors(device, torch.float16 if cuda else torch.float32)
    if real is not None:
        print(f"\nreal SmolLM2 attention (layer {REAL_LAYER}, {REAL_TOKENS} tokens, {REAL_Q_HEADS} heads), "
              f"relative L2 error vs fp64 exact attention:")
        for name, err in real.items():
            print(f"  {name:<36} {err:.3e}")

    if cuda:
        with torch.no_grad():
            print("\nforward time (ms, CUDA events):")
            torch._dynamo.reset()
            print(f"  {'stock inductor (SDPA)':<36} {_bench_ms(torch.compile(model), idx):.3f}")
            for name, cfg in VARIANTS.items():
                torch._dynamo.reset()
                fn = torch.compile(model, backend="thrift", options=_options(cfg))
                print(f"  {name:<36} {_bench_ms(fn, idx):.3f}")
        _hf_llama_speed()
    print(f"\ndone in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
