"""The symbolic mask proof on hand-built graphs: what it proves, what it refuses, at any length."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from thrift_inductor.passes import masks
from thrift_inductor.passes.masks import ALL_KEEP, BANDED, CAUSAL

LONG = 1 << 17            # 128k: a 2^34-element mask if it were ever built
SHORT = 96
WINDOW = 17               # not a multiple of anything in sight
HEAD_DIM = 8
FINFO_MIN = torch.finfo(torch.float32).min


def _ij(q):
    n = q.shape[2]
    return torch.arange(n)[:, None], torch.arange(n)[None, :]


# name -> (mask builder over q [1, 1, L, D], expected kind, expected window)
MASKS = {
    "arange_le": (lambda q: _ij(q)[1] <= _ij(q)[0], CAUSAL, None),
    "additive_where_inf": (lambda q: torch.where(_ij(q)[1] <= _ij(q)[0], 0.0, float("-inf")), CAUSAL, None),
    "hf_old_one_minus": (lambda q: (1.0 - (_ij(q)[1] <= _ij(q)[0]).float()) * FINFO_MIN, CAUSAL, None),
    "triu_finfo": (lambda q: torch.triu(torch.full((q.shape[2], q.shape[2]), FINFO_MIN), diagonal=1), CAUSAL, None),
    "tril_ones": (lambda q: torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), CAUSAL, None),
    "masked_fill": (lambda q: torch.zeros(q.shape[2], q.shape[2]).masked_fill(_ij(q)[1] > _ij(q)[0], FINFO_MIN),
                    CAUSAL, None),
    "band": (lambda q: (_ij(q)[1] <= _ij(q)[0]) & (_ij(q)[1] > _ij(q)[0] - WINDOW), BANDED, WINDOW),
    "band_not_gt": (lambda q: ~(_ij(q)[1] > _ij(q)[0]) & ~(_ij(q)[0] - _ij(q)[1] >= WINDOW), BANDED, WINDOW),
    "all_keep": (lambda q: _ij(q)[0] >= 0, ALL_KEEP, None),
    "cache_positions": (lambda q: (torch.arange(q.shape[2])[None, :] + 0)
                        <= (torch.arange(q.shape[2]) + 0)[:, None][None, None], CAUSAL, None),
    "sliced_cat": (lambda q: torch.cat([torch.arange(q.shape[2] + 1)[:1] - 1, torch.arange(q.shape[2] + 1)[1:]])
                   [1:, None] >= torch.arange(q.shape[2])[None, :] + 1, CAUSAL, None),
}
REFUSED = {
    "offset": lambda q: _ij(q)[1] <= _ij(q)[0] + 1,                      # bottom-right-ish: not top-left
    "anti_causal": lambda q: _ij(q)[1] >= _ij(q)[0],
    "two_bands": lambda q: (_ij(q)[1] <= _ij(q)[0] - 5) | (_ij(q)[1] == _ij(q)[0]),
    "chunked": lambda q: (_ij(q)[1] // 32) == (_ij(q)[0] // 32),
    "nothing": lambda q: _ij(q)[1] < 0,
    "scaled_values": lambda q: torch.where(_ij(q)[1] <= _ij(q)[0], 0.0, -1.0),
}


def _mask_graph(fn, length: int, mode: str = "fake"):
    g = make_fx(fn, tracing_mode=mode)(torch.empty(1, 1, length, HEAD_DIM)).graph
    (out,) = [n for n in g.nodes if n.op == "output"]
    (q,) = [n for n in g.nodes if n.op == "placeholder"]
    return out.args[0], q.meta["val"].shape[2]


@pytest.fixture(autouse=True)
def _stats():
    masks.reset_stats()


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_proven_masks(name, mode):
    fn, kind, window = MASKS[name]
    mask, n = _mask_graph(fn, SHORT, mode)
    assert masks.prove_mask(mask, n, n) == masks.MaskProof(kind, window)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_masks(name):
    mask, n = _mask_graph(REFUSED[name], SHORT, "symbolic")
    proof = masks.prove_mask(mask, n, n)
    assert proof.kind is None and proof.reason


@pytest.mark.parametrize("name", ["arange_le", "band", "hf_old_one_minus", "sliced_cat"])
def test_proof_at_128k_builds_nothing(name):
    fn, kind, window = MASKS[name]
    mask, n = _mask_graph(fn, LONG, "fake")
    assert masks.prove_mask(mask, n, n) == masks.MaskProof(kind, window)
    assert masks.stats.proofs == 1 and masks.stats.largest_evaluated == 0


def test_window_wider_than_sequence_is_causal_when_static():
    fn = lambda q: (_ij(q)[1] <= _ij(q)[0]) & (_ij(q)[1] > _ij(q)[0] - 4 * SHORT)  # noqa: E731
    mask, n = _mask_graph(fn, SHORT, "fake")
    assert masks.prove_mask(mask, n, n).kind == CAUSAL


def test_window_wider_than_hint_is_still_banded_when_symbolic():
    """The old two-size evaluation took this for causal; the proof keeps the band for every length."""
    fn = lambda q: (_ij(q)[1] <= _ij(q)[0]) & (_ij(q)[1] > _ij(q)[0] - 4 * SHORT)  # noqa: E731
    mask, n = _mask_graph(fn, SHORT, "symbolic")
    assert masks.prove_mask(mask, n, n) == masks.MaskProof(BANDED, 4 * SHORT)


def test_tensor_input_is_refused():
    g = make_fx(lambda q, m: m & (torch.arange(q.shape[2])[None, :] >= 0))(
        torch.empty(1, 1, SHORT, HEAD_DIM), torch.ones(SHORT, SHORT, dtype=torch.bool)).graph
    (out,) = [n for n in g.nodes if n.op == "output"]
    proof = masks.prove_mask(out.args[0], SHORT, SHORT)
    assert proof.kind is None and "tensor input" in proof.reason
