"""irg_jax.convert: sharded safetensors with an index json (read and written), and every config
error reported as one line with exit status 2.

The sharded source is written here with safetensors' own ``save_file`` and a hand-written
index (the Hugging Face layout), not with the writer under test.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from irg_jax import convert
from irg_jax.convert import __main__ as cli
from irg_jax.convert import to_bagel
from irg_jax.convert.plan import build_plan
from irg_jax.convert import params_dir
from _bagel_folders import SIZES, write_config_jsons
from _bagel_folders import fixture, random_state  # noqa: F401 (pytest fixtures)

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_sharded_source(folder, fixture, tensors, n=3, stem="model"):
    """``stem-0000i-of-0000n.safetensors`` + ``stem.safetensors.index.json``, keys dealt round-robin."""
    write_config_jsons(folder, SIZES)
    for name in ("ae.safetensors", "ae_config.json"):
        shutil.copyfile(fixture / name, folder / name)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.nbytes for v in tensors.values())
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def _params_on_host(ckpt):
    cfg = params_dir.load_model_config(ckpt)
    plan = build_plan(cfg)
    return to_bagel.restore_on_host(ckpt, plan, jnp.float32)


def test_sharded_source_and_sharded_output_round_trip(fixture, random_state, tmp_path):
    """HF-sharded source -> params -> sharded BAGEL output (index: weight_map, total_size) ->
    params again: every tensor identical, every shard within the size limit."""
    src = write_sharded_source(tmp_path / "src", fixture, random_state)
    cli.main(cli._parse(["x", "bagel-to-orbax", str(src), str(tmp_path / "ckpt"), "--no-progress"]))
    assert json.loads((tmp_path / "ckpt" / "export.json").read_text())["source_file"].endswith(
        "model.safetensors.index.json")

    limit_mib = 0.02  # ~20 KiB: the random model is ~270 KiB of float32
    cli.main(cli._parse(["x", "orbax-to-bagel", str(tmp_path / "ckpt"), str(tmp_path / "back"),
                         "--max-shard-mib", str(limit_mib), "--no-progress"]))
    back = tmp_path / "back"
    assert not (back / "ema.safetensors").exists()
    index = json.loads((back / "ema.safetensors.index.json").read_text())
    shards = sorted(p.name for p in back.glob("ema-*-of-*.safetensors"))
    assert len(shards) > 3 and shards == sorted(set(index["weight_map"].values()))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    tensors = {}
    for name in shards:
        part = load_file(str(back / name))
        assert all(index["weight_map"][k] == name for k in part), name
        size = sum(v.nbytes for v in part.values())
        assert size <= limit_mib * 2**20 or len(part) == 1, (name, size)
        tensors.update(part)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert sorted(tensors) == sorted(random_state)
    for key, value in random_state.items():
        assert np.array_equal(tensors[key], value), key

    # The sharded output is a valid source in turn, and gives back the same parameters.
    convert.bagel_to_orbax(back, tmp_path / "ckpt2", progress=False)
    a, b = _params_on_host(tmp_path / "ckpt"), _params_on_host(tmp_path / "ckpt2")
    assert a.keys() == b.keys()
    for path in a:
        assert np.array_equal(np.asarray(a[path]), np.asarray(b[path])), path

    # Written again as one file: the stale shards and index go, so no loader finds two copies.
    convert.orbax_to_bagel(tmp_path / "ckpt", back, progress=False)
    assert (back / "ema.safetensors").is_file()
    assert not list(back.glob("ema-*-of-*.safetensors")) and not (back / "ema.safetensors.index.json").exists()


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(cli._parse(["x", *argv]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_broken_index_is_named(fixture, random_state, tmp_path, capsys):
    src = write_sharded_source(tmp_path / "src", fixture, random_state)
    (src / "model-00002-of-00003.safetensors").unlink()
    err = _cli_error(["bagel-to-orbax", str(src), str(tmp_path / "o"), "--no-progress"], capsys)
    assert err.startswith("error: ") and "model-00002-of-00003.safetensors" in err and "missing" in err

    src = write_sharded_source(tmp_path / "src2", fixture, random_state)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "vae2llm.bias"
    index["weight_map"][key] = "model-00001-of-00003.safetensors" if index["weight_map"][key].startswith(
        "model-00002") else "model-00002-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _cli_error(["bagel-to-orbax", str(src), str(tmp_path / "o2"), "--no-progress"], capsys)
    assert "does not hold what the weight_map says" in err and key in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def _edit(file, **changes):
    data = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    file.write_text(json.dumps(data))


CONFIG_ERRORS = [
    ("llm_config.json", dict(tie_word_embeddings=True), "llm_config.json: tie_word_embeddings = True is not supported"),
    ("llm_config.json", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("llm_config.json", dict(hidden_size=None), "llm_config.json: hidden_size is missing"),
    ("llm_config.json", dict(num_hidden_layers="3"), "num_hidden_layers must be a positive integer"),
    ("llm_config.json", dict(hidden_act="gelu"), "hidden_act = 'gelu' is not supported"),
    ("vit_config.json", dict(image_size=SIZES["patch"] * 5), "vit_max_num_patch_per_side = 4 differs"),
    ("vit_config.json", dict(num_hidden_layers=1), "at least 2 are needed"),
    ("bagel_config.json", dict(connector_act="gelu"), "connector_act = 'gelu' is not supported"),
    ("bagel_config.json", dict(special_token_ids={"bos_token_id": 1}), "special_token_ids.eos_token_id"),
    ("bagel_config.json", dict(visual_und=False), "visual_und = False is not supported"),
]


@pytest.mark.parametrize("file,changes,expected", CONFIG_ERRORS, ids=[c[2][:40] for c in CONFIG_ERRORS])
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, file, changes, expected):
    """Checked before any weight is read: the weights file here is empty."""
    src = tmp_path / "src"
    write_config_jsons(src, SIZES)
    (src / "ema.safetensors").write_bytes(b"")
    _edit(src / file, **changes)
    err = _cli_error(["bagel-to-orbax", str(src), str(tmp_path / "o"), "--no-progress"], capsys)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(src / file) in err, err
    assert expected in err, err


def test_invalid_json_and_unreadable_weights_exit_2(tmp_path, capsys):
    src = tmp_path / "src"
    write_config_jsons(src, SIZES)
    (src / "ema.safetensors").write_bytes(b"not a safetensors file")
    (src / "vit_config.json").write_text("{\"hidden_size\": 24,")
    err = _cli_error(["bagel-to-orbax", str(src), str(tmp_path / "o"), "--no-progress"], capsys)
    assert len(err.splitlines()) == 1 and "vit_config.json: not valid JSON" in err
    write_config_jsons(src, SIZES)
    err = _cli_error(["bagel-to-orbax", str(src), str(tmp_path / "o"), "--no-progress"], capsys)
    assert len(err.splitlines()) == 1 and "ema.safetensors: not a readable safetensors file" in err


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m["latent"].update(time_scale=1000.0), "latent.time_scale 1000"),
    (lambda m: m["vit"].update(enabled=False), "vit.enabled is False"),
    (lambda m: m.update(connector_act="relu"), "connector_act 'relu'"),
])
def test_orbax_to_bagel_unrepresentable_model_exits_2(tmp_path, capsys, edit, expected):
    from irg_jax.model import config as model_config
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    m = model_config.tiny().to_dict()
    edit(m)
    (ckpt / "model_config.json").write_text(json.dumps(m, default=list))
    err = _cli_error(["orbax-to-bagel", str(ckpt), str(tmp_path / "o"), "--no-progress"], capsys)
    assert len(err.splitlines()) == 1 and expected in err and "model_config.json" in err, err


def test_cli_process_exit_code_and_help(tmp_path):
    """As a user runs it: exit status 2, one stderr line, no traceback; --no-tables and
    --max-shard-mib documented."""
    src = tmp_path / "src"
    write_config_jsons(src, SIZES)
    (src / "ema.safetensors").write_bytes(b"")
    _edit(src / "llm_config.json", tie_word_embeddings=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "irg_jax.convert", "bagel-to-orbax", str(src), str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tie_word_embeddings" in lines[0] and "Traceback" not in proc.stderr, proc.stderr

    sub = cli._parser()._subparsers._group_actions[0].choices["orbax-to-bagel"]
    text = " ".join(sub.format_help().split())
    assert "FAILS IRG's official fine-tune loader" in text and "KeyError" in text
    assert "ema.safetensors.index.json" in text and "--max-shard-mib" in text
    with pytest.raises(SystemExit):
        cli._parse(["x", "orbax-to-bagel", "a", "b", "--max-shard-mib", "0"])
