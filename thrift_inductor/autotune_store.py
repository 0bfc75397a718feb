"""Per-op autotune results shared across processes and machines.

Inductor's own ``select_algorithm`` cache is keyed by the rendered kernel hash and lives in one cache
dir; the mega-cache does not carry it (inductor.md §3). This store keys the *winning launch config*
by what decides speed, so a fresh process (or another machine of the same kind) skips benchmarking:

    StoreKey(gpu, torch, triton, thrift, dtype, head_dim, causal, format, p_quant, block_size, seq_bucket)
        -> {"choice": "template", "config": {"block_m", "num_warps", "num_stages"}, "ms": ...}
        or {"choice": "fallback", "ms": ...}

``seq_bucket`` is the next power of two of the Lk size hint: with dynamic shapes one compiled graph
serves every length, and Inductor benchmarks at the hint, so the bucket is what the decision was for.

Backends (``open_store()``): a local JSON file (``THRIFT_AUTOTUNE_STORE`` or
``~/.cache/thrift_inductor/autotune.json``), optionally fronted by Redis (``THRIFT_REDIS_URL``, or the
URL a compile was scoped to by ``remote_cache.shared_caches``). Any redis-py URL works: ``rediss://``
for TLS, ``redis://:password@host`` for AUTH. Redis failures never fail a compile: they warn once and
the local file carries on. An unreadable or foreign-version local file is ignored with a warning
(the next write replaces it).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

log = logging.getLogger("thrift_inductor.autotune_store")

STORE_ENV = "THRIFT_AUTOTUNE_STORE"
REDIS_ENV = "THRIFT_REDIS_URL"
DEFAULT_STORE_PATH = Path("~/.cache/thrift_inductor/autotune.json")
REDIS_KEY_PREFIX = "thrift_inductor:autotune:v1:"
REDIS_TIMEOUT_S = 2.0          # connect/read timeout: a dead Redis must not stall a compile
FORMAT_VERSION = 1             # bump when the entry layout changes; older files are ignored
_TEMPLATE_FILES = ("kernels/triton/kernel.py", "kernels/triton/levers.py", "kernels/triton/p_grid.py",
                   "kernels/triton/template.py.jinja", "kernels/contract.py")
_ENV = object()   # scoped_redis_url not in effect: THRIFT_REDIS_URL decides
# The Redis URL of the compile in progress (set by remote_cache.shared_caches; None = no Redis). A
# context variable, not the environment: an options= URL must not leak into other compiles.
_SCOPED_URL: contextvars.ContextVar = contextvars.ContextVar("thrift_redis_url", default=_ENV)


def _thrift_version() -> str:
    try:
        from importlib.metadata import version
        return version("thrift-inductor")
    except Exception:   # not installed (PYTHONPATH checkout): the kernel hash still separates builds
        return "dev"


def kernel_source_hash() -> str:
    """Short hash of the attention kernel sources: results measured on other kernel code do not apply."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for rel in _TEMPLATE_FILES:
        p = pkg / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    return h.hexdigest()[:12]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


def seq_bucket(n: int) -> int:
    """Next power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class StoreKey:
    gpu: str
    torch_version: str
    triton_version: str
    thrift_version: str
    dtype: str
    head_dim: int
    causal: bool
    format: str
    p_quant: str
    block_size: int
    seq_bucket: int

    @classmethod
    def for_problem(cls, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool,
                    format: str, p_quant: str, block_size: int, seq_len_hint: int) -> "StoreKey":
        import triton
        return cls(gpu=device_name(device), torch_version=torch.__version__,
                   triton_version=triton.__version__,
                   thrift_version=f"{_thrift_version()}+{kernel_source_hash()}",
                   dtype=str(dtype).removeprefix("torch."), head_dim=int(head_dim), causal=bool(causal),
                   format=format, p_quant=p_quant, block_size=int(block_size),
                   seq_bucket=seq_bucket(seq_len_hint))

    def text(self) -> str:
        """Stable string form (JSON object keys, Redis keys)."""
        return "|".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


class Store(Protocol):
    def get(self, key: StoreKey) -> Optional[dict]: ...
    def put(self, key: StoreKey, entry: dict) -> None: ...


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    if entry.get("choice") == "fallback":
        return True
    cfg = entry.get("config")
    return (entry.get("choice") == "template" and isinstance(cfg, dict)
            and all(isinstance(cfg.get(f), int) for f in ("block_m", "num_warps", "num_stages")))


class LocalStore:
    """One JSON file ``{"version": 1, "entries": {key_text: entry}}``; writes are locked and atomic."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path).expanduser()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:    # truncated or corrupt: benchmark again, rewrite on put
            warnings.warn(f"thrift autotune store {self.path} is unreadable ({exc}); ignoring it",
                          RuntimeWarning, stacklevel=3)
            return {}
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            warnings.warn(f"thrift autotune store {self.path} has format {found!r}, this build reads "
                          f"{FORMAT_VERSION}; ignoring it", RuntimeWarning, stacklevel=3)
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: StoreKey) -> Optional[dict]:
        entry = self._read().get(key.text())
        return entry if _valid_entry(entry) else None

    def put(self, key: StoreKey, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        # Read-modify-write under a lock so concurrent compiles (workers, ranks) never drop entries.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            entries[key.text()] = entry
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": FORMAT_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


class RedisStore:
    """Entries as JSON strings under ``thrift_inductor:autotune:v1:<key text>``.

    Any Redis error is re-raised as ``ConnectionError`` for ``LayeredStore`` to handle.
    """

    def __init__(self, url: str):
        import redis
        self.url = url
        self._client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                            socket_timeout=REDIS_TIMEOUT_S)

    def get(self, key: StoreKey) -> Optional[dict]:
        try:
            raw = self._client.get(REDIS_KEY_PREFIX + key.text())
        except Exception as exc:
            raise ConnectionError(str(exc)) from exc
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        return entry if _valid_entry(entry) else None

    def put(self, key: StoreKey, entry: dict) -> None:
        try:
            self._client.set(REDIS_KEY_PREFIX + key.text(), json.dumps(entry, sort_keys=True))
        except Exception as exc:
            raise ConnectionError(str(exc)) from exc


class LayeredStore:
    """Redis (shared) in front of the local file (always written, so a later Redis outage still hits)."""

    def __init__(self, local: LocalStore, remote: Optional[RedisStore] = None):
        self.local = local
        self.remote = remote

    def _remote_failed(self, exc: Exception) -> None:
        from .remote_cache import redact
        warnings.warn(f"thrift autotune store: Redis at {redact(self.remote.url)} unreachable ({exc}); "
                      f"using the local store {self.local.path} only", RuntimeWarning, stacklevel=3)
        self.remote = None

    def get(self, key: StoreKey) -> Optional[dict]:
        if self.remote is not None:
            try:
                entry = self.remote.get(key)
                if entry is not None:
                    return entry
            except ConnectionError as exc:
                self._remote_failed(exc)
        return self.local.get(key)

    def put(self, key: StoreKey, entry: dict) -> None:
        self.local.put(key, entry)
        if self.remote is not None:
            try:
                self.remote.put(key, entry)
            except ConnectionError as exc:
                self._remote_failed(exc)


_STORES: dict[tuple, LayeredStore] = {}


@contextlib.contextmanager
def scoped_redis_url(url: Optional[str]) -> Iterator[None]:
    """Inside the block ``open_store()`` uses Redis at ``url`` (None: local file only), whatever the
    environment says."""
    token = _SCOPED_URL.set(url)
    try:
        yield
    finally:
        _SCOPED_URL.reset(token)


def open_store() -> LayeredStore:
    """The store named by the environment or the compile's scope (re-read on every call, cached per
    (path, url))."""
    path = os.environ.get(STORE_ENV) or str(DEFAULT_STORE_PATH)
    scoped = _SCOPED_URL.get()
    url = (os.environ.get(REDIS_ENV) if scoped is _ENV else scoped) or None
    key = (path, url)
    if key not in _STORES:
        remote = None
        if url:
            try:
                remote = RedisStore(url)
            except ImportError:
                warnings.warn(f"thrift autotune store: {REDIS_ENV} is set but the 'redis' package is missing; "
                              "using the local store only", RuntimeWarning, stacklevel=2)
        _STORES[key] = LayeredStore(LocalStore(path), remote)
    return _STORES[key]


def template_entry(config_dict: dict, ms: float) -> dict:
    return {"choice": "template", "config": dict(config_dict), "ms": float(ms)}


def fallback_entry(ms: float) -> dict:
    return {"choice": "fallback", "ms": float(ms)}
