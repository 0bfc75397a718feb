"""Autotune-result store: local JSON round trip, a real Redis server, and Redis outages."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import warnings

import pytest
import torch

from thrift_inductor import autotune_store as store
from thrift_inductor.heuristics import AttnKernelConfig

REDIS_START_TIMEOUT_S = 10.0


def make_key(**changes) -> store.StoreKey:
    fields = dict(device=torch.device("cpu"), dtype=torch.bfloat16, head_dim=128, causal=True, format="fp8",
                  p_quant="block", block_size=64, seq_len_hint=3000)
    fields.update(changes)
    return store.StoreKey.for_problem(**fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_cached_stores(monkeypatch):
    monkeypatch.setattr(store, "_STORES", {})


@pytest.fixture
def redis_url(tmp_path):
    """A throwaway redis-server on 127.0.0.1 (no persistence), stopped after the test."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.skip("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_seq_bucket_is_next_power_of_two():
    assert [store.seq_bucket(n) for n in (1, 2, 3, 64, 65, 3000, 4096)] == [1, 2, 4, 64, 128, 4096, 4096]


def test_key_separates_what_changes_speed():
    base = make_key()
    assert make_key().text() == base.text()
    assert make_key(seq_len_hint=4000).text() == base.text()          # same bucket
    for change in (dict(seq_len_hint=5000), dict(causal=False), dict(head_dim=64), dict(format="nvfp4"),
                   dict(dtype=torch.float16), dict(block_size=32)):
        assert make_key(**change).text() != base.text(), change
    assert f"torch_version={torch.__version__}" in base.text()


def test_local_round_trip(tmp_path):
    path = tmp_path / "sub" / "store.json"
    local = store.LocalStore(path)
    key = make_key()
    assert local.get(key) is None
    entry = store.template_entry(AttnKernelConfig(64, 4, 3).to_dict(), 0.25)
    local.put(key, entry)
    local.put(make_key(causal=False), store.fallback_entry(0.5))
    fresh = store.LocalStore(path)                      # a new process reads the same file
    assert fresh.get(key) == entry
    assert fresh.get(make_key(causal=False))["choice"] == "fallback"
    assert AttnKernelConfig.from_dict(fresh.get(key)["config"]) == AttnKernelConfig(64, 4, 3)


def test_env_selects_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "a.json"))
    monkeypatch.delenv(store.REDIS_ENV, raising=False)
    s = store.open_store()
    s.put(make_key(), store.fallback_entry(1.0))
    assert json.loads((tmp_path / "a.json").read_text())["version"] == store.FORMAT_VERSION
    assert s.remote is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 999, "entries": {}}),
                                     json.dumps({"version": 1, "entries": {"x": 1}})])
def test_corrupt_or_foreign_files_read_as_empty(tmp_path, content):
    path = tmp_path / "store.json"
    path.write_text(content)
    local = store.LocalStore(path)
    assert local.get(make_key()) is None
    local.put(make_key(), store.fallback_entry(1.0))     # and writing repairs the file
    assert local.get(make_key()) is not None


def test_invalid_entries_are_ignored(tmp_path):
    local = store.LocalStore(tmp_path / "s.json")
    local.put(make_key(), {"choice": "template", "config": {"block_m": "64"}})
    assert local.get(make_key()) is None


def test_redis_round_trip_is_shared(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv(store.REDIS_ENV, redis_url)
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "machine_a.json"))
    entry = store.template_entry(AttnKernelConfig(32, 4, 2).to_dict(), 0.125)
    store.open_store().put(make_key(), entry)
    # "Another machine": a different, empty local file, same Redis.
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "machine_b.json"))
    other = store.open_store()
    assert other.remote is not None
    assert other.get(make_key()) == entry
    assert other.local.get(make_key()) is None


def test_redis_down_warns_and_uses_local(tmp_path, monkeypatch):
    monkeypatch.setenv(store.REDIS_ENV, f"redis://127.0.0.1:{free_port()}/0")   # nothing listens there
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "local.json"))
    s = store.open_store()
    entry = store.fallback_entry(2.0)
    with pytest.warns(RuntimeWarning, match="unreachable"):
        s.put(make_key(), entry)
    assert s.remote is None, "a dead Redis is dropped after the first failure"
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # and it warns only once
        assert s.get(make_key()) == entry


def test_feedback_saver_records_fastest_tagged_choice(tmp_path, monkeypatch):
    from thrift_inductor import lowering

    class Choice:
        def __init__(self, cfg):
            self.thrift_store_key = make_key()
            self.thrift_kernel_config = cfg

    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "s.json"))
    monkeypatch.delenv(store.REDIS_ENV, raising=False)
    fast, slow, fallback = Choice(AttnKernelConfig(32, 4, 3)), Choice(AttnKernelConfig(64, 4, 3)), Choice(None)
    untagged = object()
    timings = {slow: 2.0, fast: 1.0, fallback: 1.5, untagged: 0.1}
    lowering._record_autotune_result(timings, "mm", [], [], lambda: {})       # other ops: ignored
    assert store.open_store().get(make_key()) is None
    lowering._record_autotune_result(timings, lowering.AUTOTUNE_NAME, [], [], lambda: {})
    got = store.open_store().get(make_key())
    assert got["choice"] == "template" and got["config"] == AttnKernelConfig(32, 4, 3).to_dict()
    lowering._record_autotune_result({fallback: 0.5, slow: float("inf")}, lowering.AUTOTUNE_NAME, [], [],
                                     lambda: {})
    assert store.open_store().get(make_key())["choice"] == "fallback"
