"""``thrift-inductor cache export|import|info``: move compiled thrift graphs between machines.

Wraps PyTorch's mega-cache (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``: FX graph
entries with bundled Triton binaries, AOTAutograd entries, runtime autotune configs; inductor.md §3) in
a zip with a manifest, so a blob is refused when it is corrupted or was made for another stack:

    manifest.json   {"format", "version", "sha256", "size", "torch", "triton", "thrift", "gpu", "artifacts"}
    artifacts.bin   the mega-cache bytes

The mega-cache only holds what *this process* compiled, so export from Python in the compiling process
(``export_cache(path)``) or use ``cache export PATH --run`` to compile the demo model first.
Importing must happen before the first compile of the process (``import_cache(path)`` or
``cache import PATH --run`` for the demo). A loaded graph skips compilation and autotuning entirely.

Caches are code: the blob holds compiled Python and GPU binaries that the importing process executes.
The sha256 in the manifest proves the blob is intact, not who made it. With a shared secret in
``THRIFT_CACHE_SIGNING_KEY``, export adds ``signature.hmac-sha256`` (HMAC-SHA256 over manifest + blob)
and import refuses unsigned or mis-signed archives; without it import warns that origin is unchecked.
docs/caches.md says when to use an archive and when a shared Redis (``THRIFT_REDIS_URL``).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import torch

ARCHIVE_FORMAT = "thrift-inductor-cache"
ARCHIVE_VERSION = 1
MANIFEST_NAME = "manifest.json"
BLOB_NAME = "artifacts.bin"
SIGNATURE_NAME = "signature.hmac-sha256"
SIGNING_KEY_ENV = "THRIFT_CACHE_SIGNING_KEY"
# Prefixed to the signed bytes so a signature over this archive layout is never valid for other data.
SIGNATURE_DOMAIN = b"thrift-inductor-cache/signature/v1\0"
MANIFEST_LENGTH_BYTES = 8       # the manifest length is signed too: no bytes can move from blob to manifest
SECURITY_NOTE = ("Caches are code: an archive (and a shared Redis) holds compiled Python and GPU binaries "
                 "that the importing machine executes. Import only archives you trust; set "
                 f"{SIGNING_KEY_ENV} on both machines to sign on export and refuse unsigned or mis-signed "
                 "archives on import.")
# What must match between the exporting and importing machine: compiled code and Triton binaries are
# only valid for the same torch/Triton build, thrift sources, and GPU.
IDENTITY_FIELDS = ("torch", "triton", "thrift", "gpu")
DEMO_LENGTHS = (256, 384)       # two lengths: the demo exercises one dynamic-length graph


class CacheArchiveError(ValueError):
    """A cache archive that must not be loaded (unreadable, corrupted, or from another stack)."""


def _thrift_identity() -> str:
    from .autotune_store import _thrift_version, kernel_source_hash
    return f"{_thrift_version()}+{kernel_source_hash()}"


def environment_identity() -> dict:
    """The fields of this machine and build that an archive must match."""
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "triton": triton.__version__, "thrift": _thrift_identity(), "gpu": gpu}


def signing_key() -> Optional[bytes]:
    """The archive signing key from ``THRIFT_CACHE_SIGNING_KEY`` (None when unset or empty)."""
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode() if key else None


def signature(manifest_bytes: bytes, blob: bytes, key: bytes) -> str:
    """Hex HMAC-SHA256 over the manifest exactly as stored and the blob."""
    mac = hmac.new(key, SIGNATURE_DOMAIN, hashlib.sha256)
    mac.update(len(manifest_bytes).to_bytes(MANIFEST_LENGTH_BYTES, "big"))
    mac.update(manifest_bytes)
    mac.update(blob)
    return mac.hexdigest()


def export_cache(path: str | Path) -> dict:
    """Write everything this process compiled to ``path``; returns the manifest. Signed when
    ``THRIFT_CACHE_SIGNING_KEY`` is set.

    Raises RuntimeError when nothing was compiled (the mega-cache records compiles in-process only)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("nothing to export: no torch.compile artifacts were recorded in this process. "
                           "Call export_cache() in the process that compiled the model (after its first run).")
    blob, info = saved
    manifest = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob), **environment_identity(),
                "artifacts": {str(kind): len(keys) for kind, keys in info.artifacts.items()}}
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    key = signing_key()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST_NAME, manifest_bytes)
        zf.writestr(BLOB_NAME, blob)
        if key is not None:
            zf.writestr(SIGNATURE_NAME, signature(manifest_bytes, blob, key))
    return manifest


def read_archive(path: str | Path, *, verify_origin: bool = True) -> tuple[dict, bytes]:
    """(manifest, blob) after the signature, format and checksum checks; raises ``CacheArchiveError``.

    With a signing key the signature is checked first, over the raw bytes, so a tampered manifest is
    refused before it is parsed. ``verify_origin=False`` skips it (``cache info``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            manifest_bytes = zf.read(MANIFEST_NAME)
            blob = zf.read(BLOB_NAME)
            signed = zf.read(SIGNATURE_NAME).decode("ascii", "replace") if SIGNATURE_NAME in zf.namelist() else None
    except FileNotFoundError:
        raise CacheArchiveError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:   # truncated zips raise any
        raise CacheArchiveError(f"{path}: not a thrift-inductor cache archive ({exc})") from None
    key = signing_key() if verify_origin else None
    if key is not None:
        if signed is None:
            raise CacheArchiveError(f"{path}: unsigned archive refused ({SIGNING_KEY_ENV} is set)")
        if not hmac.compare_digest(signed.strip(), signature(manifest_bytes, blob, key)):
            raise CacheArchiveError(f"{path}: signature does not match (tampered, or signed with another key); "
                                    "refusing to load")
    elif verify_origin:
        warnings.warn(f"{path}: origin not verified ({SIGNING_KEY_ENV} unset): the archive runs as code",
                      RuntimeWarning, stacklevel=3)
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise CacheArchiveError(f"{path}: not a thrift-inductor cache archive ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT \
            or manifest.get("version") != ARCHIVE_VERSION:
        got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise CacheArchiveError(f"{path}: unknown archive format {got[0]!r} v{got[1]!r} "
                                f"(expected {ARCHIVE_FORMAT} v{ARCHIVE_VERSION})")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.get("sha256") or len(blob) != manifest.get("size"):
        raise CacheArchiveError(f"{path}: corrupted: artifacts sha256 {digest[:16]}... does not match the "
                                f"manifest's {str(manifest.get('sha256'))[:16]}...; re-export it")
    return manifest, blob


def foreign_fields(manifest: dict, here: Optional[dict] = None) -> dict:
    """``{field: (archive value, local value)}`` for every identity field that differs."""
    here = environment_identity() if here is None else here
    return {f: (manifest.get(f), here[f]) for f in IDENTITY_FIELDS if manifest.get(f) != here[f]}


def import_cache(path: str | Path, *, allow_foreign: bool = False) -> dict:
    """Verify and load an archive into this process's Inductor caches; returns the manifest.

    Call before the first compile. A foreign archive (other torch/Triton/thrift/GPU) is refused unless
    ``allow_foreign``: its entries would only miss (different cache keys) or, worse, load binaries built
    for another GPU."""
    manifest, blob = read_archive(path)
    mismatch = foreign_fields(manifest)
    if mismatch and not allow_foreign:
        detail = ", ".join(f"{f}: archive {a!r} vs here {b!r}" for f, (a, b) in mismatch.items())
        raise CacheArchiveError(f"{path}: made for another environment ({detail}); refusing to load")
    try:
        loaded = torch.compiler.load_cache_artifacts(blob)
    except Exception as exc:   # a blob torch cannot parse (another mega-cache version, crafted bytes)
        raise CacheArchiveError(f"{path}: torch could not load the artifacts ({type(exc).__name__}: {exc})") \
            from exc
    if loaded is None:         # torch logs why and returns None for bytes it cannot deserialize
        raise CacheArchiveError(f"{path}: torch could not deserialize the artifacts (another torch build?)")
    return manifest


def import_cache_or_warn(path: str | Path, **kwargs) -> Optional[dict]:
    """``import_cache`` for programs that must start anyway: a refused archive is a warning and None,
    and the process then compiles (and autotunes) locally."""
    try:
        return import_cache(path, **kwargs)
    except CacheArchiveError as exc:
        warnings.warn(f"cache archive not loaded, compiling locally: {exc}", RuntimeWarning, stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def _run_demo() -> dict:
    """Compile and run a small causal self-attention stack with ``backend="thrift"``; returns counters."""
    from torch._dynamo.utils import counters

    from . import backend
    backend.register()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    fn = torch.compile(attention, backend="thrift")
    with torch.no_grad():
        for length in DEMO_LENGTHS:
            q, k, v = (torch.randn(1, 4, length, 64, device=device, dtype=dtype) for _ in range(3))
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
            fn(q, k, v)
    return {k: v for k, v in counters["inductor"].items() if "cache" in k or "autotune" in k}


def _cmd_export(args) -> int:
    if not args.run:
        print("error: the mega-cache only holds what this process compiled. Use `cache export PATH --run` to "
              "compile the demo model first, or call thrift_inductor.cli.export_cache(path) from the program "
              "that compiled your model.", file=sys.stderr)
        return 2
    print("demo compile:", _run_demo())
    manifest = export_cache(args.path)
    signed = "signed" if signing_key() else f"unsigned ({SIGNING_KEY_ENV} unset)"
    print(f"wrote {args.path}: {manifest['size']} bytes, {signed}, artifacts {manifest['artifacts']}")
    return 0


def _cmd_import(args) -> int:
    manifest = import_cache(args.path, allow_foreign=args.allow_foreign)
    print(f"loaded {args.path}: artifacts {manifest['artifacts']} (torch {manifest['torch']}, gpu {manifest['gpu']})")
    if args.run:
        print("demo compile:", _run_demo())
    return 0


def _cmd_info(args) -> int:
    manifest, _ = read_archive(args.path, verify_origin=False)
    print(json.dumps(manifest, indent=1, sort_keys=True))
    with zipfile.ZipFile(args.path) as zf:
        print("signed" if SIGNATURE_NAME in zf.namelist() else "unsigned")
    mismatch = foreign_fields(manifest)
    print("matches this environment" if not mismatch else f"foreign here: {sorted(mismatch)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thrift-inductor", description=__doc__.splitlines()[0],
                                     epilog=SECURITY_NOTE)
    sub = parser.add_subparsers(dest="group", required=True)
    cache = sub.add_parser("cache", help="export / import compiled-graph caches", epilog=SECURITY_NOTE,
                           description="Move compiled graphs between machines without Redis (docs/caches.md)."
                           ).add_subparsers(dest="command", required=True)
    exp = cache.add_parser("export", help="write this process's compiled artifacts (needs --run)",
                           epilog=SECURITY_NOTE)
    exp.add_argument("path")
    exp.add_argument("--run", action="store_true", help="compile the demo model first")
    exp.set_defaults(fn=_cmd_export)
    imp = cache.add_parser("import", help="verify and load an archive (it runs as code)", epilog=SECURITY_NOTE)
    imp.add_argument("path")
    imp.add_argument("--run", action="store_true", help="then compile the demo model (shows cache hits)")
    imp.add_argument("--allow-foreign", action="store_true", help="load despite version/GPU mismatch")
    imp.set_defaults(fn=_cmd_import)
    info = cache.add_parser("info", help="print an archive's manifest")
    info.add_argument("path")
    info.set_defaults(fn=_cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            return args.fn(args)
        except (CacheArchiveError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            for w in caught:          # one line each, not Python's file:line two-liner
                print(f"warning: {w.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
