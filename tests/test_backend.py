"""backend="thrift": registration, option parsing, config patches (never global), pass uuid."""
import pytest
import torch
from torch._inductor import config as inductor_config

from thrift_inductor import ThriftConfig
from thrift_inductor import backend as B
from thrift_inductor.passes import ThriftAttentionPass, ThriftPatternPass, attention_pass


def test_entry_point_registers_thrift():
    assert "thrift" in torch._dynamo.list_backends()
    B.register()   # already known through the entry point: must not raise a duplicate-name error


def test_split_options():
    cfg, rest = B.split_options({"thrift.format": "fp8", "thrift_fraction": 0.2, "max_autotune": True})
    assert cfg == ThriftConfig(format="fp8", fraction=0.2)
    assert rest == {"max_autotune": True}


def test_unknown_thrift_option_is_an_error():
    with pytest.raises(ValueError, match="unknown thrift option"):
        B.split_options({"thrift.colour": "red"})


def test_config_patches_carry_config_and_mode():
    cfg = ThriftConfig(format="mxfp4")
    patches = B.config_patches(cfg, mode="max-autotune", inductor_options={"fx_graph_cache": False})
    assert isinstance(patches["joint_custom_post_pass"], ThriftAttentionPass)
    assert isinstance(patches["joint_custom_pre_pass"], ThriftPatternPass)
    assert patches["joint_custom_post_pass"].config == cfg
    assert patches["max_autotune"] is True and patches["fx_graph_cache"] is False


def test_compile_leaves_global_inductor_config_alone():
    before = (inductor_config.joint_custom_post_pass, inductor_config.joint_custom_pre_pass,
              inductor_config.max_autotune)
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2, backend="thrift", options={"thrift.format": "fp8"})
    torch.testing.assert_close(f(torch.ones(3)), torch.full((3,), 2.0))
    after = (inductor_config.joint_custom_post_pass, inductor_config.joint_custom_pre_pass,
             inductor_config.max_autotune)
    assert before == after


def test_uuid_depends_on_config_and_every_source_file(tmp_path, monkeypatch):
    a, b = ThriftAttentionPass(ThriftConfig()), ThriftAttentionPass(ThriftConfig(format="fp8"))
    assert a.uuid() != b.uuid()
    assert a.uuid() == ThriftAttentionPass(ThriftConfig()).uuid()
    assert a.uuid() != ThriftPatternPass(ThriftConfig()).uuid()
    files = attention_pass._source_files()
    assert any(f.endswith("lowering.py") for f in files) or any(f.endswith("ops.py") for f in files)
    assert all(f.endswith((".py", ".jinja")) for f in files)
    # An edited template must change the uuid (so the FX graph cache misses).
    tpl = tmp_path / "attention.py.jinja"
    tpl.write_text("v1")
    monkeypatch.setattr(attention_pass, "_source_files", lambda: (str(tpl),))
    first = a.uuid()
    tpl.write_text("v2")
    assert a.uuid() != first
