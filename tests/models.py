"""Model fixtures for the rewrite-pass tests: the attention spellings the pass must find (or refuse).

Small shapes on purpose (CPU CI). Head dim 64 is the smallest FP4-eligible head dim, and sequence
lengths >= 2 selection blocks (block_size 64) so selection actually picks among blocks.
Each builder returns ``(module, example_inputs, expected)`` where ``expected`` is the number of
attention sites the pass should rewrite (0 for negatives).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM = 256          # model width: 4 query heads of 64
N_HEAD = 4
N_KV_HEAD = 2      # GQA group 2
HEAD_DIM = DIM // N_HEAD
SEQ = 128
BATCH = 2
VOCAB = 97


# --------------------------------------------------------------------------- gpt-fast style
class GptFastAttention(nn.Module):
    """Trimmed copy of pytorch-labs/gpt-fast ``Attention`` (fused qkv, GQA, F.sdpa, causal).

    ``gqa="sdpa"`` passes ``enable_gqa=True`` to SDPA; ``"repeat"`` expands k/v with
    ``repeat_interleave`` like gpt-fast does; ``"expand"`` uses the HF ``repeat_kv`` expand+reshape.
    """

    def __init__(self, gqa: str = "sdpa", dim: int = DIM, n_head: int = N_HEAD, n_kv: int = N_KV_HEAD):
        super().__init__()
        self.gqa, self.n_head, self.n_kv, self.hd = gqa, n_head, n_kv, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv) * self.hd, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, L, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, L, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, L, self.n_kv, self.hd).transpose(1, 2)
        g = self.n_head // self.n_kv
        if self.gqa == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.gqa == "repeat":
                k = k.repeat_interleave(g, dim=1)
                v = v.repeat_interleave(g, dim=1)
            else:   # HF repeat_kv
                k = k[:, :, None].expand(B, self.n_kv, g, L, self.hd).reshape(B, self.n_head, L, self.hd)
                v = v[:, :, None].expand(B, self.n_kv, g, L, self.hd).reshape(B, self.n_head, L, self.hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int = DIM):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Token embedding + ``n_layer`` blocks + head: one attention site per layer."""

    def __init__(self, make_attn, n_layer: int = 2, dim: int = DIM, vocab: int = VOCAB):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(make_attn(), dim) for _ in range(n_layer))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def gpt_fast(gqa: str = "sdpa", n_layer: int = 2, seq: int = SEQ, dtype=torch.float32):
    torch.manual_seed(0)
    m = TinyGPT(lambda: GptFastAttention(gqa), n_layer=n_layer).to(dtype).eval()
    return m, (torch.randint(0, VOCAB, (BATCH, seq)),), n_layer


# --------------------------------------------------------------------------- hand-written attention
class HandAttention(nn.Module):
    """softmax(q kᵀ · s) v written out by hand, three common spellings (no mask, not causal).

    form 1: ``(q @ kᵀ) * scale``, ``.softmax(-1)``, ``@ v``
    form 2: ``torch.matmul(q, kᵀ) / math.sqrt(d)``, ``F.softmax(dim=-1)``, ``torch.matmul(., v)``
    form 3: scores and softmax upcast to fp32, cast back before ``@ v`` (HF "eager" style)
    """

    def __init__(self, form: int, dim: int = DIM, n_head: int = N_HEAD):
        super().__init__()
        self.form, self.n_head, self.hd = form, n_head, dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        if self.form == 1:
            y = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))).softmax(dim=-1) @ v
        elif self.form == 2:
            y = torch.matmul(F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.hd), dim=-1), v)
        else:
            s = torch.matmul(q, k.transpose(-2, -1)) * self.hd ** -0.5
            y = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


def hand_written(form: int, n_layer: int = 2, seq: int = SEQ, dtype=torch.float32):
    torch.manual_seed(0)
    m = TinyGPT(lambda: HandAttention(form), n_layer=n_layer).to(dtype).eval()
    return m, (torch.randint(0, VOCAB, (BATCH, seq)),), n_layer


# --------------------------------------------------------------------------- negatives
class MaskedAttention(nn.Module):
    """SDPA with an additive float mask passed in by the caller (a real, data-dependent mask)."""

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class DropoutAttention(nn.Module):
    """SDPA with dropout that is active in train mode."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0, is_causal=True)


class PlainAttention(nn.Module):
    def __init__(self, is_causal: bool = True):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


def qkv(batch=1, heads=N_HEAD, kv_heads=None, seq=SEQ, head_dim=HEAD_DIM, dtype=torch.float32,
        requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float32).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


# --------------------------------------------------------------------------- Hugging Face (no downloads)
def _hf_common(attn_impl: str):
    return dict(attn_implementation=attn_impl)


def hf_llama(attn_impl: str = "sdpa", n_layer: int = 2, seq: int = SEQ):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=n_layer,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, max_position_embeddings=512,
                      **_hf_common(attn_impl))
    m = LlamaForCausalLM(cfg).eval()
    return m, (torch.randint(0, VOCAB, (BATCH, seq)),), n_layer


def hf_gpt2(attn_impl: str = "sdpa", n_layer: int = 2, seq: int = SEQ):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=n_layer, n_head=N_HEAD, n_positions=512,
                     **_hf_common(attn_impl))
    m = GPT2LMHeadModel(cfg).eval()
    return m, (torch.randint(0, VOCAB, (BATCH, seq)),), n_layer


def hf_bert(attn_impl: str = "sdpa", n_layer: int = 2, seq: int = SEQ):
    """BERT is bidirectional: with no padding mask the sites are eligible (non-causal)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=n_layer, num_attention_heads=N_HEAD,
                     intermediate_size=2 * DIM, max_position_embeddings=512, **_hf_common(attn_impl))
    m = BertModel(cfg, add_pooling_layer=False).eval()
    return m, (torch.randint(0, VOCAB, (BATCH, seq)),), n_layer
