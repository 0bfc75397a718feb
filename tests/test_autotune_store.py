"""Autotune-result store: local JSON round trip, a real Redis server, and Redis outages."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest_redis import free_port, redis_server, redis_url, start_redis  # noqa: F401  (fixtures)

from thrift_inductor import autotune_store as store
from thrift_inductor.kernels.triton.configs import TritonConfig


def make_key(**changes) -> store.StoreKey:
    fields = dict(device=torch.device("cpu"), dtype=torch.bfloat16, head_dim=128, causal=True, format="fp8",
                  p_quant="block", block_size=64, seq_len_hint=3000)
    fields.update(changes)
    return store.StoreKey.for_problem(**fields)


@pytest.fixture(autouse=True)
def no_cached_stores(monkeypatch):
    monkeypatch.setattr(store, "_STORES", {})


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
    entry = store.template_entry(TritonConfig(64, 4, 3).to_dict(), 0.25)
    local.put(key, entry)
    local.put(make_key(causal=False), store.fallback_entry(0.5))
    fresh = store.LocalStore(path)                      # a new process reads the same file
    assert fresh.get(key) == entry
    assert fresh.get(make_key(causal=False))["choice"] == "fallback"
    assert TritonConfig.from_dict(fresh.get(key)["config"]) == TritonConfig(64, 4, 3)


def test_env_selects_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "a.json"))
    monkeypatch.delenv(store.REDIS_ENV, raising=False)
    s = store.open_store()
    s.put(make_key(), store.fallback_entry(1.0))
    assert json.loads((tmp_path / "a.json").read_text())["version"] == store.FORMAT_VERSION
    assert s.remote is None


@pytest.mark.parametrize("content, why", [("{not json", "unreadable"), ('{"version": 1, "entr', "unreadable"),
                                          (json.dumps({"version": 999, "entries": {}}), "format 999"),
                                          (json.dumps([1, 2]), "format 'list'")])
def test_corrupt_truncated_or_foreign_files_are_refused_with_a_warning(tmp_path, content, why):
    path = tmp_path / "store.json"
    path.write_text(content)
    local = store.LocalStore(path)
    with pytest.warns(RuntimeWarning, match=why):
        assert local.get(make_key()) is None
    with pytest.warns(RuntimeWarning, match=why):
        local.put(make_key(), store.fallback_entry(1.0))     # and writing repairs the file
    assert local.get(make_key()) is not None


def test_invalid_entries_in_a_valid_file_are_skipped_silently(tmp_path):
    path = tmp_path / "store.json"
    path.write_text(json.dumps({"version": store.FORMAT_VERSION, "entries": {make_key().text(): 1}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.LocalStore(path).get(make_key()) is None


def test_invalid_entries_are_ignored(tmp_path):
    local = store.LocalStore(tmp_path / "s.json")
    local.put(make_key(), {"choice": "template", "config": {"block_m": "64"}})
    assert local.get(make_key()) is None


def test_redis_round_trip_is_shared(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv(store.REDIS_ENV, redis_url)
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "machine_a.json"))
    entry = store.template_entry(TritonConfig(32, 4, 2).to_dict(), 0.125)
    store.open_store().put(make_key(), entry)
    # "Another machine": a different, empty local file, same Redis.
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "machine_b.json"))
    other = store.open_store()
    assert other.remote is not None
    assert other.get(make_key()) == entry
    assert other.local.get(make_key()) is None


def test_scoped_url_overrides_the_environment(tmp_path, monkeypatch, redis_url):
    """``remote_cache.shared_caches`` scopes a compile to a URL (an options= key) without the env."""
    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "local.json"))
    monkeypatch.delenv(store.REDIS_ENV, raising=False)
    with store.scoped_redis_url(redis_url):
        assert store.open_store().remote.url == redis_url
    assert store.open_store().remote is None
    monkeypatch.setenv(store.REDIS_ENV, redis_url)
    with store.scoped_redis_url(None):                # sharing turned off for this compile
        assert store.open_store().remote is None


def test_authenticated_redis(tmp_path, monkeypatch):
    """A password-protected Redis: the URL's password is used, and a wrong one degrades to local with a
    warning that does not print the password."""
    server = start_redis(tmp_path, password="s3cret-pw")
    try:
        monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "local.json"))
        monkeypatch.setenv(store.REDIS_ENV, server.url)
        entry = store.fallback_entry(3.0)
        store.open_store().put(make_key(), entry)
        assert json.loads(server.client().get(store.REDIS_KEY_PREFIX + make_key().text())) == entry
        monkeypatch.setenv(store.REDIS_ENV, f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        with pytest.warns(RuntimeWarning, match="unreachable") as caught:
            store.open_store().get(make_key())
        assert "wrong-pw" not in str(caught[0].message)
    finally:
        server.stop()


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
            self.thrift_kernel_config = None if cfg is None else cfg.to_dict()   # as lowering tags it

    monkeypatch.setenv(store.STORE_ENV, str(tmp_path / "s.json"))
    monkeypatch.delenv(store.REDIS_ENV, raising=False)
    fast, slow, fallback = Choice(TritonConfig(32, 4, 3)), Choice(TritonConfig(64, 4, 3)), Choice(None)
    untagged = object()
    timings = {slow: 2.0, fast: 1.0, fallback: 1.5, untagged: 0.1}
    lowering._record_autotune_result(timings, "mm", [], [], lambda: {})       # other ops: ignored
    assert store.open_store().get(make_key()) is None
    lowering._record_autotune_result(timings, lowering.AUTOTUNE_NAME, [], [], lambda: {})
    got = store.open_store().get(make_key())
    assert got["choice"] == "template" and got["config"] == TritonConfig(32, 4, 3).to_dict()
    lowering._record_autotune_result({fallback: 0.5, slow: float("inf")}, lowering.AUTOTUNE_NAME, [], [],
                                     lambda: {})
    assert store.open_store().get(make_key())["choice"] == "fallback"
