"""One Redis shares everything a compile produces: thrift's autotune store and Inductor's own caches.

With ``THRIFT_REDIS_URL`` (or ``options={"thrift.redis_url": url}``) each ``backend="thrift"`` compile
runs inside ``shared_caches(url)``, which, for that compile only:

- points thrift's autotune store at the URL (``autotune_store.scoped_redis_url``);
- turns on Inductor's remote caches as config patches (never written to the global config):
  FX graph entries (compiled code with the template and GEMM choices baked in, plus bundled Triton
  binaries), runtime autotune results (pointwise/reduction kernels with several configs) and, through
  ``torch._functorch.config``, AOTAutograd entries;
- exports the URL as ``TORCHINDUCTOR_REDIS_URL``, the only way Inductor takes a Redis address, and
  restores the previous value afterwards.

Identity: Inductor's keys already hash the torch sources (``torch_key``), the GPU name, CUDA and Triton
(``CacheBase.get_system``) and the thrift passes' ``uuid()`` (every thrift source file plus the
ThriftConfig); thrift's store key names them explicitly. So one Redis can serve mixed fleets: a
different stack misses, it never loads foreign code.

Same keys with and without Redis (issue 14): torch leaves ``fx_graph_remote_cache`` and
``autotune_remote_cache`` out of its cache keys, but hashes ``bundled_autotune_remote_cache`` into the FX
graph key (GPU only: it is switched on only where Triton has a backend) and
``torch._functorch.config.enable_remote_autograd_cache`` into the AOTAutograd key. A process without
Redis then looked up other keys than the cold process with Redis had written, in the same local cache
dir and in the archive that process exported (H200: FX 0/1 in warm_local and warm_archive; CPU: the
AOTAutograd entry missed). ``key_neutral()`` wraps every thrift compile, Redis on or off, and adds those
switches to torch's key ignore lists for that compile: a cache entry's key says what was compiled,
never where it is stored.

A Redis that does not answer a ping within ``REDIS_TIMEOUT_S`` turns sharing off for that compile with
one warning per URL: the compile uses the local caches and succeeds. Inductor's Redis client has no
timeout of its own, so the exported URL carries ours as query arguments.

Caches are code: an FX-graph entry is Python plus GPU binaries that every reader executes. Only point
thrift at a Redis that only trusted writers can reach: ``redis://:password@host`` (or ``user:password``
with ACLs), ``rediss://`` for TLS (docs/caches.md).
"""
from __future__ import annotations

import contextlib
import os
import urllib.parse
import warnings
from typing import Iterator, Optional

import torch

from . import autotune_store

OPTION_KEYS = ("thrift.redis_url", "thrift_redis_url")   # read here, stripped before ThriftConfig parsing
INDUCTOR_URL_ENV = "TORCHINDUCTOR_REDIS_URL"
REDIS_TIMEOUT_S = autotune_store.REDIS_TIMEOUT_S
# Inductor config flags that make it read and write Redis; names checked against the running torch
# (2.11 and 2.13 both have all three).
INDUCTOR_REMOTE_FLAGS = ("fx_graph_remote_cache", "autotune_remote_cache", "bundled_autotune_remote_cache")
BUNDLED_FLAG = "bundled_autotune_remote_cache"
FUNCTORCH_REMOTE_FLAG = "enable_remote_autograd_cache"   # torch._functorch.config

# Switches that only say where cache entries are stored, never what is compiled: they must not enter
# the FX graph key (torch._inductor.config._cache_config_ignore_prefix) nor the AOTAutograd key
# (torch._functorch.config.save_config(), which skips _save_config_ignore).
KEY_NEUTRAL_INDUCTOR = INDUCTOR_REMOTE_FLAGS
KEY_NEUTRAL_FUNCTORCH = (FUNCTORCH_REMOTE_FLAG,)

_UNSET = object()
_warned_down: set[str] = set()
_warned_key_neutral: list = []


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def resolve_url(options: Optional[dict] = None) -> Optional[str]:
    """The Redis URL for a compile: an ``options`` key wins (an empty value turns sharing off), then
    ``THRIFT_REDIS_URL``."""
    for key in OPTION_KEYS:
        if key in (options or {}):
            return options[key] or None
    return os.environ.get(autotune_store.REDIS_ENV) or None


def with_timeouts(url: str) -> str:
    """``url`` plus socket timeouts (unless it sets its own), so Inductor's client cannot hang a compile
    on a dead host."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.setdefault("socket_connect_timeout", str(REDIS_TIMEOUT_S))
    query.setdefault("socket_timeout", str(REDIS_TIMEOUT_S))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def ping(url: str) -> Optional[str]:
    """None when Redis at ``url`` answers, else why not (missing package, refused, auth, TLS, ...)."""
    try:
        import redis
    except ImportError:
        return "the 'redis' package is not installed (pip install redis)"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:   # any failure (connection, auth, TLS, bad URL) means: compile locally
        return f"{type(exc).__name__}: {exc}"
    return None


def _triton_backend_hash() -> Optional[str]:
    try:
        from torch._inductor.runtime.autotune_cache import inductor_meta_from_config
        return inductor_meta_from_config().get("backend_hash")
    except Exception:
        return None


def inductor_patches() -> dict:
    """Inductor config patches that enable its Redis-backed caches (for the running torch version)."""
    flags = [name for name in INDUCTOR_REMOTE_FLAGS if hasattr(torch._inductor.config, name)]
    if BUNDLED_FLAG in flags and _triton_backend_hash() is None:
        # The bundled autotune cache asserts a Triton backend hash, which needs a GPU driver (or the
        # interpreter); without one there is no runtime autotuning to bundle anyway.
        flags.remove(BUNDLED_FLAG)
    return dict.fromkeys(flags, True)


@contextlib.contextmanager
def key_neutral() -> Iterator[None]:
    """Hash cache keys without the remote-cache switches, for one thrift compile (Redis on or off).

    Patches (thread-local, like ``config_patches``) the ignore lists torch reads each time it computes a
    key, so a compile with ``shared_caches`` patches and one without compute the same FX graph and
    AOTAutograd keys: a warm process without Redis hits the local entries and the archive that a cold
    process with Redis wrote, and the reverse. Compiles outside the scope (other backends) are untouched."""
    import torch._functorch.config
    import torch._inductor.config
    with contextlib.ExitStack() as stack:
        for module, attr, names in ((torch._inductor.config, "_cache_config_ignore_prefix", KEY_NEUTRAL_INDUCTOR),
                                    (torch._functorch.config, "_save_config_ignore", KEY_NEUTRAL_FUNCTORCH)):
            current = getattr(module, attr, None)
            missing = [n for n in names if isinstance(current, list) and n not in current]
            if not missing:
                continue
            try:
                stack.enter_context(module.patch({attr: current + missing}))
            except (AttributeError, KeyError, AssertionError) as exc:
                # a torch whose config module does not take these private lists: keys then depend on the
                # sharing switches (warm processes must use the same setting), the compile goes on
                if not _warned_key_neutral:
                    _warned_key_neutral.append(True)
                    warnings.warn(f"thrift: cannot keep remote-cache switches out of torch's cache keys here "
                                  f"({exc}); a process without Redis will not hit entries written with it",
                                  RuntimeWarning, stacklevel=2)
        yield


@contextlib.contextmanager
def _scoped_env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name, _UNSET)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is _UNSET:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def shared_caches(url: Optional[str]) -> Iterator[dict]:
    """Scope one compile to the Redis at ``url``; yields the Inductor config patches to compile with
    (empty when ``url`` is None or Redis is down, in which case everything stays local)."""
    if not url:
        with autotune_store.scoped_redis_url(None):
            yield {}
        return
    problem = ping(url)
    if problem is not None:
        if url not in _warned_down:
            _warned_down.add(url)
            warnings.warn(f"thrift: Redis at {redact(url)} unreachable ({problem}); compiling with local "
                          "caches only", RuntimeWarning, stacklevel=3)
        # The thrift store would try again (and warn again); it has the same answer.
        with autotune_store.scoped_redis_url(None):
            yield {}
        return
    _warned_down.discard(url)          # back up: warn again if it goes down later
    functorch_config = torch._functorch.config
    with contextlib.ExitStack() as stack:
        stack.enter_context(_scoped_env(INDUCTOR_URL_ENV, with_timeouts(url)))
        stack.enter_context(autotune_store.scoped_redis_url(url))
        if hasattr(functorch_config, FUNCTORCH_REMOTE_FLAG):
            stack.enter_context(functorch_config.patch({FUNCTORCH_REMOTE_FLAG: True}))
        yield inductor_patches()
