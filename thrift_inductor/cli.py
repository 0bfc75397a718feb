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
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import torch

ARCHIVE_FORMAT = "thrift-inductor-cache"
ARCHIVE_VERSION = 1
MANIFEST_NAME = "manifest.json"
BLOB_NAME = "artifacts.bin"
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


def export_cache(path: str | Path) -> dict:
    """Write everything this process compiled to ``path``; returns the manifest.

    Raises RuntimeError when nothing was compiled (the mega-cache records compiles in-process only)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("nothing to export: no torch.compile artifacts were recorded in this process. "
                           "Call export_cache() in the process that compiled the model (after its first run).")
    blob, info = saved
    manifest = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob), **environment_identity(),
                "artifacts": {str(kind): len(keys) for kind, keys in info.artifacts.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
        zf.writestr(BLOB_NAME, blob)
    return manifest


def read_archive(path: str | Path) -> tuple[dict, bytes]:
    """(manifest, blob) after the format and checksum checks; raises ``CacheArchiveError``."""
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read(MANIFEST_NAME))
            blob = zf.read(BLOB_NAME)
    except FileNotFoundError:
        raise CacheArchiveError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise CacheArchiveError(f"{path}: not a thrift-inductor cache archive ({exc})") from None
    if manifest.get("format") != ARCHIVE_FORMAT or manifest.get("version") != ARCHIVE_VERSION:
        raise CacheArchiveError(f"{path}: unknown archive format {manifest.get('format')!r} "
                                f"v{manifest.get('version')!r} (expected {ARCHIVE_FORMAT} v{ARCHIVE_VERSION})")
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
    torch.compiler.load_cache_artifacts(blob)
    return manifest


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
    print(f"wrote {args.path}: {manifest['size']} bytes, artifacts {manifest['artifacts']}")
    return 0


def _cmd_import(args) -> int:
    manifest = import_cache(args.path, allow_foreign=args.allow_foreign)
    print(f"loaded {args.path}: artifacts {manifest['artifacts']} (torch {manifest['torch']}, gpu {manifest['gpu']})")
    if args.run:
        print("demo compile:", _run_demo())
    return 0


def _cmd_info(args) -> int:
    manifest, _ = read_archive(args.path)
    print(json.dumps(manifest, indent=1, sort_keys=True))
    mismatch = foreign_fields(manifest)
    print("matches this environment" if not mismatch else f"foreign here: {sorted(mismatch)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thrift-inductor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="group", required=True)
    cache = sub.add_parser("cache", help="export / import compiled-graph caches").add_subparsers(
        dest="command", required=True)
    exp = cache.add_parser("export", help="write this process's compiled artifacts (needs --run)")
    exp.add_argument("path")
    exp.add_argument("--run", action="store_true", help="compile the demo model first")
    exp.set_defaults(fn=_cmd_export)
    imp = cache.add_parser("import", help="verify and load an archive")
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
    try:
        return args.fn(args)
    except (CacheArchiveError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
