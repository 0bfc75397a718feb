"""Cache archive CLI: mega-cache round trip on CPU, and refusal of corrupted or foreign archives."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from thrift_inductor import cli


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


def rewrite(src, dst, *, manifest=None, blob=None):
    with zipfile.ZipFile(src) as zf:
        m = json.loads(zf.read(cli.MANIFEST_NAME))
        b = zf.read(cli.BLOB_NAME)
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr(cli.MANIFEST_NAME, json.dumps(manifest if manifest is not None else m))
        zf.writestr(cli.BLOB_NAME, blob if blob is not None else b)
    return m, b


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
