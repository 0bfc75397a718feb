"""Shared test setup: Triton interpreter on CPU-only machines, seeds, the ``cuda`` marker, real QKV data.

The interpreter switch must run before anything imports triton (Triton reads TRITON_INTERPRET when
its jit decorators run), so it sits at the very top. Importing torch alone does not import triton.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        # CPU CI: run every @triton.jit kernel through the interpreter on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"

import json
import pathlib
import random

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings

    # Oracle properties run on CPU at small shapes; wall time varies too much on 2-core CI for
    # hypothesis' per-example deadline, and derandomize keeps CI runs reproducible.
    settings.register_profile("thrift", deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "thrift"))
except ImportError:   # hypothesis is a test extra; tests that need it importorskip it
    pass

DEFAULT_SEED = 0
REAL_QKV_NAME = "smollm2_emma_8k_qkv.safetensors"
# Where the real Q/K/V file may live: an explicit env path, the repo's ignored data folder (how it is
# carried to the GPU machine), or the shared design data folder of this workspace.
REAL_QKV_CANDIDATES = (
    os.environ.get("THRIFT_QKV_PATH", ""),
    str(pathlib.Path(__file__).resolve().parents[1] / ".data" / REAL_QKV_NAME),
    "/work/shared/data/" + REAL_QKV_NAME,
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Seed torch and random before every test; returns the seed for tests that derive their own."""
    torch.manual_seed(DEFAULT_SEED)
    random.seed(DEFAULT_SEED)
    return DEFAULT_SEED


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def real_qkv_path():
    for path in REAL_QKV_CANDIDATES:
        if path and os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="session")
def real_qkv():
    """Loader for the real SmolLM2 Q/K/V (``/work/shared/data/README.md``); skips if the file is absent.

    ``real_qkv(layer, tokens=None, q_heads=None)`` -> ``(q, k, v, scale)``: fp16 ``[1, Hq, T, 64]`` /
    ``[1, Hkv, T, 64]`` (first ``tokens`` tokens; ``q_heads`` a slice of query heads, the kv heads
    they use are sliced to match, GQA 9:3), causal, ``scale`` from the file metadata."""
    path = real_qkv_path()
    if path is None:
        pytest.skip(f"{REAL_QKV_NAME} not found (set THRIFT_QKV_PATH)")
    safetensors = pytest.importorskip("safetensors")

    def load(layer: int, tokens=None, q_heads=None):
        with safetensors.safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["info"])
            t = slice(None, tokens)
            q = f.get_slice(f"layer{layer}.q")[:, :, t]
            k = f.get_slice(f"layer{layer}.k")[:, :, t]
            v = f.get_slice(f"layer{layer}.v")[:, :, t]
        group = q.shape[1] // k.shape[1]
        if q_heads is not None:
            first, stop = q_heads.start or 0, q_heads.stop or q.shape[1]
            if first % group or stop % group:
                raise ValueError(f"q_heads must cover whole GQA groups of {group}")
            q = q[:, first:stop]
            k, v = k[:, first // group:stop // group], v[:, first // group:stop // group]
        return q.contiguous(), k.contiguous(), v.contiguous(), float(info[f"layer{layer}.scale"])

    return load
