"""``torch.compile(model, backend="thrift")``: Inductor plus the ThriftAttention rewrite.

Registered only through the ``torch_dynamo_backends`` entry point (pyproject.toml). Dynamo's
``lookup_backend`` registers the name itself after loading the entry point, so registering here too
would trip its duplicate-name assertion; ``register()`` exists for uninstalled checkouts and is a no-op
when the name is already known.
"""
from __future__ import annotations

import logging

import torch
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from . import ops  # noqa: F401  (registers torch.ops.thrift.attention)
from . import remote_cache
from .config import ThriftConfig
from .passes import ThriftAttentionPass, ThriftPatternPass

log = logging.getLogger("thrift_inductor")

BACKEND_NAME = "thrift"
_OPTION_PREFIXES = ("thrift.", "thrift_")


def _load_lowering() -> None:
    # lowering.py registers the Inductor lowering of thrift::attention (TritonTemplate + fallback).
    # Without it Inductor runs the op as an opaque fallback kernel, which is still correct.
    try:
        from . import lowering  # noqa: F401
    except ImportError as exc:
        log.debug("thrift: no Inductor lowering (%s); thrift::attention runs as a fallback kernel", exc)


def split_options(options: dict | None) -> tuple[ThriftConfig, dict]:
    """``(ThriftConfig from thrift.* keys, remaining Inductor config patches)``.

    The cache-sharing key (``thrift.redis_url``) is neither: ``thrift_backend`` reads it separately."""
    options = {k: v for k, v in (options or {}).items() if k not in remote_cache.OPTION_KEYS}
    cfg = ThriftConfig.from_options(options)
    rest = {k: v for k, v in options.items() if not k.startswith(_OPTION_PREFIXES)}
    return cfg, rest


def config_patches(cfg: ThriftConfig, mode: str | None = None, inductor_options: dict | None = None,
                   sharing: dict | None = None) -> dict:
    """The Inductor config patches the backend compiles with (never applied globally).

    ``sharing``: the remote-cache flags from ``remote_cache.shared_caches``; explicit user options win."""
    patches: dict = {}
    if mode not in (None, "default"):
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(sharing or {})
    patches.update(inductor_options or {})
    patches["joint_custom_pre_pass"] = ThriftPatternPass(cfg)
    patches["joint_custom_post_pass"] = ThriftAttentionPass(cfg)
    return patches


def thrift_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                   options: dict | None = None):
    """Dynamo backend: ``compile_fx`` with the thrift passes as config patches.

    ``options`` keys ``thrift.<field>`` (or ``thrift_<field>``) set ``ThriftConfig`` fields;
    ``thrift.redis_url`` (default ``THRIFT_REDIS_URL``, empty = off) shares this compile's caches
    through Redis (``remote_cache.py``); all other keys are Inductor config patches, as with
    ``backend="inductor"``.
    """
    cfg, inductor_options = split_options(options)
    _load_lowering()
    # key_neutral: Redis on or off, the same FX graph and AOTAutograd keys (remote_cache.key_neutral);
    # also around inner_compile, which a lazily compiled backward graph calls after this returns.
    with remote_cache.key_neutral(), \
            remote_cache.shared_caches(remote_cache.resolve_url(options)) as sharing:
        return compile_fx(gm, example_inputs, inner_compile=_key_neutral_inner_compile,
                          config_patches=config_patches(cfg, mode, inductor_options, sharing))


def _key_neutral_inner_compile(*args, **kwargs):
    with remote_cache.key_neutral():
        return compile_fx_inner(*args, **kwargs)


def register() -> None:
    """Register ``backend="thrift"`` by hand (only needed when the package is not pip-installed)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if BACKEND_NAME not in _BACKENDS:
        register_backend(thrift_backend, name=BACKEND_NAME)
