"""bench/compile.py renders its tables from a run's printed log (a device call cut short by its time limit
still yields the CSV and the markdown with the warm-phase medians of issue 14's bound)."""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compile as bench_compile  # noqa: E402

LOG = """{'gpu': 'NVIDIA H200', 'torch': '2.11.0+cu130', 'triton': '3.6.0', 'cuda': '13.0', 'python': '3.12.3', 'commit': 'abc1234'}
redis: redis://127.0.0.1:40261/0
  L=8192 max-autotune cold         r0 first call 22.3s (process 38.6s) autotune=7 runtime_autotune=9 fx_hit=0 aot_hit=0 thrift={'rewritten': 2, 'autotune_store_hit': 2}
  L=8192 max-autotune warm_local   r0 first call 1.8s (process 26.0s) autotune=0 runtime_autotune=0 fx_hit=1 aot_hit=1 thrift={}
  L=8192 max-autotune warm_redis   r0 first call 2.3s (process 27.8s) autotune=0 runtime_autotune=0 fx_hit=1 fx_miss=0 aot_hit=1 aot_miss=0 thrift={}
  L=8192 max-autotune warm_local   r1 first call 2.2s (process 26.0s) autotune=0 runtime_autotune=0 fx_hit=1 aot_hit=1 thrift={}
  L=8192 max-autotune warm_redis   r1 first call 2.5s (process 31.1s) autotune=0 runtime_autotune=0 fx_hit=1 aot_hit=1 thrift={}
  L=8192 max-autotune warm_local   r2 first call 2.0s (process 27.8s) autotune=0 runtime_autotune=0 fx_hit=1 aot_hit=1 thrift={}
"""


def test_rows_from_log_renders_the_tables(tmp_path):
    rows, env = bench_compile.rows_from_log(LOG)
    assert env["commit"] == "abc1234"
    assert [(r["phase"], r["repeat"]) for r in rows] == [("cold", 0), ("warm_local", 0), ("warm_redis", 0),
                                                          ("warm_local", 1), ("warm_redis", 1), ("warm_local", 2)]
    cold = rows[0]
    assert (cold["autotune"], cold["runtime_autotune"], cold["fx_miss"], cold["thrift"]["autotune_store_hit"]) == (7, 9, 1, 2)
    assert rows[2]["fx_miss"] == 0 and rows[3]["seconds"] == 2.2
    bench_compile.write_results(tmp_path, rows, {}, env)
    md = (tmp_path / "compile.md").read_text()
    # medians: warm_local 2.0 of (1.8, 2.0, 2.2); warm_redis upper median of (2.3, 2.5) -> 1.25x
    assert "| max-autotune | 8192 | 2.0 (1.00x), n=3 | 2.5 (1.25x), n=2 | - |" in md
    assert "template vs eager fallback" not in md
    with open(tmp_path / "compile.csv") as f:
        assert sum(r["metric"] == "seconds" for r in csv.DictReader(f)) == len(rows)
