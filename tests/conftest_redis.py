"""A real, throwaway ``redis-server`` on a free loopback port, for the cache-sharing tests.

Not a conftest plugin: test modules that need Redis import the fixtures
(``from conftest_redis import redis_server, redis_url  # noqa: F401``). Tests skip, with the reason,
when the ``redis-server`` binary or the ``redis`` package is absent (``.ci/run`` installs both).
"""
from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0
POLL_S = 0.05


def free_port() -> int:
    """A loopback port nothing listens on (also used as a guaranteed-dead Redis address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RedisServer:
    proc: subprocess.Popen
    port: int
    password: Optional[str] = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self):
        import redis
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=REDIS_STOP_TIMEOUT_S)


def start_redis(workdir: Path, password: Optional[str] = None) -> RedisServer:
    """Start ``redis-server`` without persistence on 127.0.0.1; skips the test when it cannot."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the 'redis' package is not installed")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]
    if password:
        args += ["--requirepass", password]
    server = RedisServer(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port,
                         password)
    client = server.client()
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                server.proc.kill()
                pytest.skip("redis-server did not start")
            time.sleep(POLL_S)


@pytest.fixture
def redis_server(tmp_path):
    server = start_redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No Redis, sharing URL or signing key from the environment, a private autotune store, warnings
    re-armed, a fresh Inductor cache and Dynamo state (cache tests; import the fixture by name)."""
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from thrift_inductor import autotune_store, cli, remote_cache
    for env in (autotune_store.REDIS_ENV, remote_cache.INDUCTOR_URL_ENV, cli.SIGNING_KEY_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(autotune_store.STORE_ENV, str(tmp_path / "store.json"))
    monkeypatch.setattr(remote_cache, "_warned_down", set())
    monkeypatch.setattr(autotune_store, "_STORES", {})
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():
        yield
    torch._dynamo.reset()
