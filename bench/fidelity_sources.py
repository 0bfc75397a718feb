"""Where does nvfp4 thrift@5% error come from on real SmolLM2 attention? (oracle, CPU, 4k tokens)"""
import json

import torch.nn.functional as F
from safetensors import safe_open
from thrift_inductor import reference as ref
from thrift_inductor.config import ThriftConfig
P = "/work/shared/data/smollm2_emma_8k_qkv.safetensors"
N = 4096
def load(layer):
    with safe_open(P, "pt") as f:
        scale = json.loads(f.metadata()["info"])[f"layer{layer}.scale"]
        q, k, v = (f.get_tensor(f"layer{layer}.{n}")[:, :, :N].float() for n in "qkv")
    return q[:, :3], k[:, :1], v[:, :1], scale
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
def attn(q, k, v, scale):
    return F.scaled_dot_product_attention(q.double(), k.double().expand_as(q), v.double().expand_as(q), is_causal=True, scale=scale)
for layer in (15, 29):
    q, k, v, scale = load(layer)
    ex = attn(q, k, v, scale)
    ql, kl, vl = ref.quantize_operands(q, k, v, "nvfp4", 64)
    row = {}
    row["Q only"] = rel(attn(ql, k, v, scale), ex)
    row["K only"] = rel(attn(q, kl, v, scale), ex)
    row["V only"] = rel(attn(q, k, vl, scale), ex)
    row["QKV (P exact)"] = rel(attn(ql, kl, vl, scale), ex)
    for fr in (0.0, 0.05, 0.25):
        o = ref.thrift_attention_reference(q, k, v, is_causal=True, scale=scale, config=ThriftConfig(format="nvfp4", fraction=fr))
        row[f"thrift f{fr}"] = rel(o, ex)
    o = ref.thrift_attention_reference(q, k, v, is_causal=True, scale=scale, config=ThriftConfig(format="nvfp4", fraction=0.05, p_quant="microblock"))
    row["thrift f0.05 microP"] = rel(o, ex)
    # mean-smoothed K (softmax-invariant) quantised, then exact attention: does smoothing help the K error?
    km = k - k.mean(dim=2, keepdim=True)
    _, klm, _ = ref.quantize_operands(q, km, v, "nvfp4", 64)
    row["K only, mean-smoothed"] = rel(attn(q, klm, v, scale), ex)
    print(f"layer {layer}: " + ", ".join(f"{k_}={v_:.3f}" for k_, v_ in row.items()), flush=True)
