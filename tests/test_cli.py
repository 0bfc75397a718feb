"""Cache archive CLI: mega-cache round trip on CPU, refusal of corrupted or foreign archives, and
signing (caches are code: a signing key makes import refuse unsigned or mis-signed archives)."""
from __future__ import annotations

import hashlib
import json
import types
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from thrift_inductor import cli

SIGNING_KEY = "test-signing-key"
OTHER_KEY = "another-key"
# Tests below that care about the unsigned-import warning catch it explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:.*origin not verified:RuntimeWarning")


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


def compile_and_run():
    from thrift_inductor import backend
    backend.register()
    q, k, v = (torch.randn(1, 2, 64, 64) for _ in range(3))
    with torch.no_grad():
        # Stock C++ CPU backend: thrift lowers to its eager op, which the FX graph cache stores like any graph.
        with torch._inductor.config.patch(cpu_backend="cpp"):
            return torch.compile(attention, backend="thrift", options={"thrift.block_size": 32})(q, k, v)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An archive exported by the process that compiled (this one), from a private cache dir."""
    path = tmp_path_factory.mktemp("cache") / "thrift_cache.zip"
    torch._dynamo.reset()
    torch.compiler.save_cache_artifacts()        # drop artifacts recorded by earlier tests
    with fresh_cache():
        compile_and_run()
        manifest = cli.export_cache(path)
    torch._dynamo.reset()
    return path, manifest


@pytest.fixture(autouse=True)
def no_signing_key(monkeypatch):
    monkeypatch.delenv(cli.SIGNING_KEY_ENV, raising=False)


def rewrite(src, dst, *, manifest=None, blob=None):
    """Copy an archive with the manifest and/or blob replaced; an existing signature is kept as is."""
    with zipfile.ZipFile(src) as zf:
        m = json.loads(zf.read(cli.MANIFEST_NAME))
        b = zf.read(cli.BLOB_NAME)
        sig = zf.read(cli.SIGNATURE_NAME) if cli.SIGNATURE_NAME in zf.namelist() else None
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr(cli.MANIFEST_NAME, json.dumps(manifest if manifest is not None else m))
        zf.writestr(cli.BLOB_NAME, blob if blob is not None else b)
        if sig is not None:
            zf.writestr(cli.SIGNATURE_NAME, sig)
    return m, b


@pytest.fixture
def signed_archive(archive, tmp_path, monkeypatch):
    """The module archive's real blob exported again with ``SIGNING_KEY`` set (the mega-cache empties
    itself on save, so export is fed the same bytes instead of compiling twice)."""
    _, blob = cli.read_archive(archive[0], verify_origin=False)
    fake_info = types.SimpleNamespace(artifacts={kind: [None] * n for kind, n in archive[1]["artifacts"].items()})
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (blob, fake_info))
    monkeypatch.setenv(cli.SIGNING_KEY_ENV, SIGNING_KEY)
    path = tmp_path / "signed.zip"
    cli.export_cache(path)
    return path


def test_manifest_describes_the_blob(archive):
    path, manifest = archive
    assert manifest["format"] == cli.ARCHIVE_FORMAT and manifest["torch"] == torch.__version__
    assert manifest["artifacts"].get("inductor", 0) >= 1, manifest["artifacts"]
    assert not cli.foreign_fields(manifest)
    assert cli.read_archive(path)[0] == manifest


def test_round_trip_hits_fx_graph_cache(archive):
    path, _ = archive
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():                              # an empty cache dir: a fresh machine
        cli.import_cache(path)
        out = compile_and_run()
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert torch.isfinite(out).all()
    torch._dynamo.reset()


def test_corrupted_blob_is_refused(archive, tmp_path):
    path, _ = archive
    bad = tmp_path / "bad.zip"
    _, blob = rewrite(path, bad, blob=None)
    rewrite(path, bad, blob=bytes([blob[0] ^ 0xFF]) + blob[1:])
    with pytest.raises(cli.CacheArchiveError, match="corrupted"):
        cli.import_cache(bad)


@pytest.mark.parametrize("field", cli.IDENTITY_FIELDS)
def test_foreign_archive_is_refused(archive, tmp_path, field):
    path, manifest = archive
    foreign = tmp_path / "foreign.zip"
    rewrite(path, foreign, manifest={**manifest, field: "something-else"})
    with pytest.raises(cli.CacheArchiveError, match=f"another environment.*{field}"):
        cli.import_cache(foreign)


@pytest.mark.parametrize("content", [b"not a zip at all", None])
def test_non_archives_are_refused(tmp_path, content):
    path = tmp_path / "x.zip"
    if content is None:                              # a zip without our manifest
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("other.txt", "hi")
    else:
        path.write_bytes(content)
    with pytest.raises(cli.CacheArchiveError, match="not a thrift-inductor cache archive"):
        cli.read_archive(path)


def test_cli_commands(archive, tmp_path, capsys):
    path, _ = archive
    assert cli.main(["cache", "info", str(path)]) == 0
    assert "matches this environment" in capsys.readouterr().out
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"junk")
    assert cli.main(["cache", "import", str(bad)]) == 1
    assert "not a thrift-inductor cache archive" in capsys.readouterr().err
    assert cli.main(["cache", "export", str(tmp_path / "out.zip")]) == 2     # export needs --run
    assert "--run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------------------------------
def test_export_signs_only_with_a_key(archive, signed_archive):
    with zipfile.ZipFile(archive[0]) as zf:
        assert cli.SIGNATURE_NAME not in zf.namelist()
    with zipfile.ZipFile(signed_archive) as zf:
        assert cli.SIGNATURE_NAME in zf.namelist()


def test_signed_archive_round_trip(signed_archive):
    torch._dynamo.reset()
    with fresh_cache(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # verified: no origin warning
        assert cli.import_cache(signed_archive)["format"] == cli.ARCHIVE_FORMAT


def test_tampered_blob_with_recomputed_sha256_is_refused(signed_archive, tmp_path, monkeypatch):
    manifest, blob = cli.read_archive(signed_archive)
    evil = blob[:-1] + bytes([blob[-1] ^ 0xFF])
    tampered = tmp_path / "tampered.zip"
    rewrite(signed_archive, tampered, blob=evil,
            manifest={**manifest, "sha256": hashlib.sha256(evil).hexdigest(), "size": len(evil)})
    with pytest.raises(cli.CacheArchiveError, match="signature does not match"):
        cli.import_cache(tampered)
    # Without a key the consistent sha256 passes: integrity, not origin (hence the warning).
    monkeypatch.delenv(cli.SIGNING_KEY_ENV)
    with pytest.warns(RuntimeWarning, match="origin not verified"):
        cli.read_archive(tampered)


def test_wrong_key_is_refused(signed_archive, monkeypatch):
    monkeypatch.setenv(cli.SIGNING_KEY_ENV, OTHER_KEY)
    with pytest.raises(cli.CacheArchiveError, match="signature does not match"):
        cli.import_cache(signed_archive)


def test_unsigned_archive_is_refused_when_a_key_is_set(archive, monkeypatch):
    monkeypatch.setenv(cli.SIGNING_KEY_ENV, SIGNING_KEY)
    with pytest.raises(cli.CacheArchiveError, match="unsigned archive refused"):
        cli.import_cache(archive[0])


def test_no_key_imports_with_one_line_warning(archive, capsys):
    torch._dynamo.reset()
    with fresh_cache():
        assert cli.main(["cache", "import", archive[0].as_posix()]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and cli.SIGNING_KEY_ENV in err[0], err


def test_help_says_caches_are_code(capsys):
    for argv in (["--help"], ["cache", "import", "--help"], ["cache", "export", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = " ".join(capsys.readouterr().out.split())
        assert "Caches are code" in out and cli.SIGNING_KEY_ENV in out, argv
