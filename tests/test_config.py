"""Config loading, overrides and start-up validation."""
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from irg_jax.config import ConfigError, base_config, load_config_file, validate, write_resolved


def _write(tmp_path, body):
    f = tmp_path / "cfg.py"
    f.write_text(textwrap.dedent(body))
    return f


def test_base_config_validates_on_8_devices():
    validate(base_config(), num_devices=8)


def test_config_file_arg_and_lock(tmp_path):
    f = _write(tmp_path, """
        from irg_jax.config import base_config
        def get_config(arg=None):
            c = base_config()
            if arg:
                for kv in arg.split(","):
                    k, v = kv.split("=")
                    c[k] = int(v)
            return c
    """)
    c = load_config_file(f"{f}:total_steps=7,batch_size=16")
    assert c.total_steps == 7 and c.batch_size == 16
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        c.total_stpes = 3


@pytest.mark.parametrize("edit, key", [
    (lambda c: c.mesh.update(data=3), "mesh"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), "mesh"),
    (lambda c: c.update(batch_size=4) or c.mesh.update(data=8, fsdp=1), "batch_size"),
    (lambda c: c.optim.update(schedule="linear"), "optim.schedule"),
    (lambda c: c.optim.update(lr=0.0), "optim.lr"),
    (lambda c: c.update(total_steps=-1), "total_steps"),
    (lambda c: c.ema.update(decay=1.5), "ema.decay"),
    (lambda c: c.sharding.update(rules=(("embed", "model"),)), "sharding.rules[0]"),
    (lambda c: c.checkpoint.update(init_from="/nonexistent/ckpt"), "checkpoint.init_from"),
])
def test_validation_names_the_key(edit, key):
    c = base_config()
    edit(c)
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=8)
    assert e.value.key == key
    assert str(e.value).startswith(f"config.{key}:")


@pytest.mark.parametrize("per_save", [0, 3])
def test_layers_per_save_must_divide_the_layers(per_save, tmp_path):
    root = pathlib.Path(__file__).resolve().parent.parent
    c = load_config_file(f"{root}/configs/irgl_stage1.py:tiny,data_root={tmp_path}")  # 2 decoder layers
    c.model.layers_per_save = per_save
    with pytest.raises(ConfigError, match=r"^config.model.layers_per_save: must be >= 1 and divide"):
        validate(c, num_devices=8)
    c.model.layers_per_save = 2
    validate(c, num_devices=8)


def test_unknown_and_missing_keys():
    c = base_config()
    c.optim.learning_rate = 1.0
    with pytest.raises(ConfigError, match=r"config.optim.learning_rate: unknown key"):
        validate(c, num_devices=8)
    c = base_config()
    del c.optim["clip_norm"]
    with pytest.raises(ConfigError, match=r"config.optim.clip_norm: missing key"):
        validate(c, num_devices=8)


def test_write_resolved(tmp_path):
    c = base_config()
    out = write_resolved(c, tmp_path / "wd")
    data = json.loads(out.read_text())
    assert data["optim"]["eps"] == 1e-15
    assert data["mesh"] == {"data": 1, "fsdp": -1, "tensor": 1}
