"""Per-layer attention-output error for the fidelity harness (bench/quality.py).

One eager forward of the model records the inputs of every ``F.scaled_dot_product_attention`` call; each
site is then recomputed by the thrift kernel (CUDA; the oracle on CPU) and by the oracle, against fp64
exact attention, on a few query heads (one per KV group).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from thrift_inductor import reference as ref

LAYER_HEADS = (0, 3, 6)             # one query head per KV group of SmolLM2 (9 q / 3 kv heads)


# ------------------------------------------------------------------------------------------------
class SdpaCapture:
    """Records (q, k, v, is_causal, scale, enable_gqa) of every F.scaled_dot_product_attention call
    made by an eager forward (HF's sdpa attention calls it by module attribute)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self._orig = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            self.calls.append(dict(q=q.detach(), k=k.detach(), v=v.detach(), mask=attn_mask,
                                   is_causal=is_causal, scale=scale))
            return self._orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
        torch.nn.functional.scaled_dot_product_attention = spy
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._orig


def _causal(call) -> Optional[bool]:
    """True/False when the call is causal / unmasked; None for any other mask."""
    mask = call["mask"]
    if mask is None:
        return bool(call["is_causal"])
    lq, lk = call["q"].shape[2], call["k"].shape[2]
    tril = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    m = mask if mask.dtype == torch.bool else mask == 0
    return True if bool((m == tril).all()) else None


def layer_errors(model, ids: torch.Tensor, variants: list, heads=LAYER_HEADS) -> list[dict]:
    """Each attention site of one forward: the thrift kernel (CUDA; the oracle on CPU) and the oracle
    against fp64 exact attention, and the kernel against the oracle. ``variants``: ``quality.Variant``."""
    import thrift_inductor
    with SdpaCapture() as cap, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    rows = []
    for layer, call in enumerate(cap.calls):
        causal = _causal(call)
        if causal is None:
            continue
        q, k, v = call["q"], call["k"], call["v"]
        group = q.shape[1] // k.shape[1]
        hs = [h for h in heads if h < q.shape[1]]
        q, k, v = q[:, hs], k[:, [h // group for h in hs]], v[:, [h // group for h in hs]]
        exact = ref.exact_attention(q, k, v, is_causal=causal, scale=call["scale"])
        for var in variants:
            cfg = var.config()
            got = thrift_inductor.attention(q, k, v, is_causal=causal, scale=call["scale"], config=cfg).double()
            oracle = ref.thrift_attention_reference(q, k, v, is_causal=causal, scale=call["scale"],
                                                    config=cfg).double()
            err = (got - exact).norm()
            rows.append(dict(layer=layer, variant=var.name, format=var.format, fraction=var.fraction,
                             selection=var.selection,
                             rel_l2_vs_exact=float(err / exact.norm()),
                             rel_l2_oracle_vs_exact=float((oracle - exact).norm() / exact.norm()),
                             rel_l2_vs_oracle=float((got - oracle).norm() / oracle.norm()),
                             cos_vs_exact=float(F.cosine_similarity(got.flatten(), exact.flatten(), dim=0)),
                             sqnr_db=float(20 * torch.log10(exact.norm() / err.clamp_min(1e-300)))))
    return rows
