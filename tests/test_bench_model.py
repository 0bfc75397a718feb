"""CPU smoke test of bench/model.py: a tiny Llama, one short length, eager vs thrift, all outputs written."""
import csv
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import model as bench_model  # noqa: E402

TOKENS = 128


def test_bench_model_cpu_smoke(tmp_path):
    rows = bench_model.main(["--models", "tiny", "--lengths", str(TOKENS), "--paths", "eager", "thrift-fp8",
                             "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    assert [(r.path, r.status) for r in rows] == [("eager", "ok"), ("thrift-fp8", "ok")]
    thrift = rows[1]
    assert thrift.rewritten == 1 and thrift.ms > 0 and thrift.speedup_vs_best_stock > 0
    with open(tmp_path / "model_cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "thrift-fp8" in (tmp_path / "model_cpu.md").read_text()
