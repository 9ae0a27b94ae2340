"""``python -m irg_jax.generate`` on a tiny random-init export writes every promised file (on a
data=2 x fsdp=4 mesh of the 8 simulated devices; tests/test_generate_sharded.py compares the
sharded program with the single-device one)."""
import argparse
import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from irg_jax import generate
from irg_jax.inference import cli
from irg_jax.data.tokenizer import WordTokenizer
from irg_jax.model import config as model_config
from irg_jax.model.bagel import Bagel
from irg_jax.convert.params_dir import save_params


# The sampling flags of the CLI test; tests/test_generate_sharded.py runs the same bucket on the same
# mesh, so its sharded program is the one compiled here (a persistent-cache hit in a full run).
SAMPLING = ["--num_steps", "3", "--max_think_tokens", "6", "--max_prompt_tokens", "12", "--image_size", "32",
            "--system_prompt", "plan then draw it", "--cfg_text", "3.5", "--vit_max_size", "28"]
MESH = ["--mesh", "data=2,fsdp=4"]


def _tiny_config_and_tokenizer():
    tok = WordTokenizer.from_corpus(["a red square left of a blue circle", "<think> plan </think> draw it"])
    cfg = model_config.tiny()  # 2 layers; a parameter-free autoencoder keeps the export to params only
    cfg.autoencoder.update(kind="identity", z_channels=3 * 8 ** 2, scale_factor=1.0, shift_factor=0.0)
    cfg.special_ids = dict(bos=tok.bos_id, eos=tok.eos_id, start_of_image=tok.start_of_image_id,
                           end_of_image=tok.end_of_image_id)
    return cfg, tok


def config_only_export(tmp_path):
    """An export without parameters (model config and tokenizer only): anything that gets as far
    as restoring the parameters fails on it."""
    cfg, tok = _tiny_config_and_tokenizer()
    folder = tmp_path / "export"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "model_config.json").write_text(cfg.to_json_best_effort(indent=2))
    tok.save(str(folder / "tokenizer" / "vocab.json"))
    return folder


def tiny_export(tmp_path):
    cfg, tok = _tiny_config_and_tokenizer()
    model = Bagel(cfg, rngs=nnx.Rngs(0))
    model.llm2vae.kernel.set_value(jax.random.normal(jax.random.key(1), model.llm2vae.kernel.shape) * 0.2)
    vocab = tmp_path / "vocab.json"
    tok.save(str(vocab))
    params = nnx.split(model, nnx.Param, ...)[1].to_pure_dict()
    return save_params(tmp_path / "export", params, cfg, {"source": "test"}, tokenizer_dir=vocab)


def test_generate_cli_writes_turns_and_results(tmp_path):
    export = tiny_export(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red square"}\n\n{"prompt": "a blue circle left of a red square"}\n'
                       '{"prompt": "draw it"}\n')
    out = tmp_path / "out"
    rc = generate.main(["--checkpoint", str(export), "--prompts", str(prompts), "--out", str(out),
                        "--batch_size", "2", "--seed", "7", *MESH, *SAMPLING])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2"]  # 3 prompts, 2 batches (last one padded)
    for i, prompt in enumerate(["a red square", "a blue circle left of a red square", "draw it"]):
        folder = out / str(i)
        for k in (1, 2):
            img = np.asarray(Image.open(folder / f"turn{k}.png"))
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            assert (folder / f"turn{k}.txt").exists()
        record = json.loads((folder / "result.json").read_text())
        assert record["prompt"] == prompt and record["index"] == i
        assert [t["image"] for t in record["turns"]] == ["turn1.png", "turn2.png"]
        s = record["settings"]
        assert s["seed"] == 7 and s["num_steps"] == 3 and s["turn1"]["text_scale"] == 3.5
        assert s["refine"]["renorm"] == "text_channel" and s["system_prompt"] == "plan then draw it"
        assert s["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and s["batch_size"] == 2
        assert all(t["num_tokens"] <= 5 for t in record["turns"])


def test_mesh_flags(tmp_path):
    from irg_jax.config import FSDP_TENSOR_RULES
    p = argparse.ArgumentParser()
    cli.add_sampling_flags(p)
    args = p.parse_args(["--checkpoint", "x", "--mesh", "data=2,fsdp=-1", "--rules", "fsdp_tensor"])
    mesh, rules = cli.mesh_and_rules(args)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1} and rules == FSDP_TENSOR_RULES
    mesh, _ = cli.mesh_and_rules(p.parse_args(["--checkpoint", "x"]))  # the training default: all on fsdp
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    for bad in ("data=3,fsdp=4", "pipeline=2"):
        with pytest.raises(ValueError, match="mesh"):
            cli.mesh_and_rules(p.parse_args(["--checkpoint", "x", "--mesh", bad]))


def _cli(argv, capsys):
    """(exit code, stderr lines) of ``generate.main``."""
    try:
        rc = generate.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_every_prompt_is_checked_before_any_work(tmp_path, capsys):
    export = config_only_export(tmp_path)  # no params: the check must come before the restore
    prompts = tmp_path / "prompts.jsonl"
    long = " ".join(["red"] * 13)  # 13 tokens; the bucket (--max_prompt_tokens 12) allows 12
    prompts.write_text(f'a red square\n\n{{"prompt": "  "}}\ndraw it\n{long}\n{{"prompt": ""}}\n')
    out = tmp_path / "out"
    rc, err = _cli(["--checkpoint", str(export), "--prompts", str(prompts), "--out", str(out), *SAMPLING], capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"{prompts} line 3: empty prompt (only whitespace)" in err[0]
    assert f"{prompts} line 5: 13 tokens, more than the bucket's 12" in err[0]
    assert f"{prompts} line 6: empty prompt" in err[0]
    assert "line 1" not in err[0] and "line 4" not in err[0] and "3 of 5 prompts" in err[0]
    assert not out.exists(), "something was written before the prompts were checked"

    rc, err = _cli(["--checkpoint", str(export), "--prompt", " ", "--out", str(out), *SAMPLING], capsys)
    assert rc == 2 and err == ["python -m irg_jax.generate: error: 1 of 1 prompts cannot run, nothing generated: "
                               "--prompt: empty prompt (only whitespace)"]
    # a good prompt gets past the check, as far as the (missing) parameters
    rc, err = _cli(["--checkpoint", str(export), "--prompt", "draw it", "--out", str(out), *SAMPLING], capsys)
    assert rc == 2 and len(err) == 1 and "no params checkpoint" in err[0], err


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    base = ["--prompt", "draw it", "--out", str(tmp_path / "out")]
    rc, err = _cli(["--checkpoint", str(tmp_path / "nowhere"), *base], capsys)
    assert rc == 2 and len(err) == 1 and "no model_config.json" in err[0] and "Traceback" not in err[0], err
    export = config_only_export(tmp_path)
    rc, err = _cli(["--checkpoint", str(export), *base, "--mesh", "data=3,fsdp=4"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("python -m irg_jax.generate: error: --mesh"), err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('draw it\n{"prompt": "a red square"\n')
    rc, err = _cli(["--checkpoint", str(export), "--prompts", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and len(err) == 1 and f"{bad} line 2: invalid JSON" in err[0], err
    rc, err = _cli(["--checkpoint", str(export), "--out", "x"], capsys)  # argparse: no usage block
    assert rc == 2 and len(err) == 1 and "one of the arguments --prompt --prompts is required" in err[0], err
    with pytest.raises(FileNotFoundError, match="model_config.json"):  # --debug: the exception itself
        generate.main(["--checkpoint", str(tmp_path / "nowhere"), *base, "--debug"])


class _FakeRunner:
    """Stands in for IRGRunner: two turns per prompt, image value = row id."""
    batch_size = 3
    tokenizer = WordTokenizer.from_corpus(["a cat and a dog"])

    def check_prompts(self, prompts, where=None):
        from irg_jax.inference.runner import check_prompts
        check_prompts(self.tokenizer, prompts, 8, where)

    def run_batch(self, prompts, row_ids, seed):
        from irg_jax.inference.runner import PromptResult, TurnOutput
        return [PromptResult(p, r, [TurnOutput(f"think {t} of {p}", np.full((16, 16, 3), (r * 2 + t) % 256, np.uint8),
                                               3, True) for t in (1, 2)]) for p, r in zip(prompts, row_ids)]


def test_benchmark_layouts(tmp_path):
    from irg_jax.inference.benchmarks import run_benchmark
    runner = _FakeRunner()
    geneval = tmp_path / "geneval.jsonl"
    geneval.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n'
                       '{"tag": "two_object", "prompt": "a cat and a dog"}\n')
    assert run_benchmark(runner, "geneval", geneval, tmp_path / "g", seed=0, settings={}, samples=2) == 4
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["00000", "00001"]
    meta = json.loads((tmp_path / "g" / "00001" / "metadata.jsonl").read_text())
    assert meta == {"tag": "two_object", "prompt": "a cat and a dog"}
    assert sorted(p.name for p in (tmp_path / "g" / "00001" / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert np.asarray(Image.open(tmp_path / "g" / "00001" / "samples" / "00001.png"))[0, 0, 0] == 3 * 2 + 2  # row 3

    wise = tmp_path / "final_data.json"
    wise.write_text(json.dumps([{"prompt_id": 17, "Prompt": "ice in the sun", "Category": "physics"},
                                {"prompt_id": 18, "Prompt": "a bird's home"}]))
    run_benchmark(runner, "wise", wise, tmp_path / "w", seed=0, settings={}, turn=1)
    assert (tmp_path / "w" / "17.png").exists() and "think 2 of ice in the sun" in (tmp_path / "w" / "17.txt").read_text()
    assert np.asarray(Image.open(tmp_path / "w" / "18.png"))[0, 0, 0] == 1 * 2 + 1  # --turn 1

    tiif = tmp_path / "tiif"
    tiif.mkdir()
    (tiif / "a.jsonl").write_text('{"type": "color", "short_description": "red", "long_description": "a red box"}\n'
                                  '{"type": "color", "short_description": "blue", "long_description": "a blue box"}\n')
    run_benchmark(runner, "tiif", tiif, tmp_path / "t", seed=0, settings={}, model_name="M")
    folder = tmp_path / "t" / "color" / "M" / "long_description"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"turn{t}_{i}.{e}" for i in (0, 1) for t in (1, 2) for e in ("png", "txt"))
    assert (folder / "turn2_1.txt").read_text() == "think 2 of a blue box"
    assert (tmp_path / "t" / "color" / "M" / "short_description" / "turn1_0.txt").read_text() == "think 1 of red"


def test_benchmark_prompts_are_checked_before_any_file(tmp_path):
    from irg_jax.inference.benchmarks import run_benchmark
    from irg_jax.inference.runner import PromptError
    geneval = tmp_path / "geneval.jsonl"
    geneval.write_text('{"prompt": "a cat"}\n\n{"prompt": " "}\n{"prompt": "a cat and a dog and a cat and a dog"}\n')
    with pytest.raises(PromptError, match=r"2 of 3 prompts") as e:
        run_benchmark(_FakeRunner(), "geneval", geneval, tmp_path / "g", seed=0, settings={}, samples=4)
    assert f"{geneval} line 3: empty prompt" in str(e.value)
    assert f"{geneval} line 4: 11 tokens, more than the bucket's 8" in str(e.value)
    assert not (tmp_path / "g").exists()


def test_benchmark_cli_checks_prompts_before_loading(tmp_path, capsys):
    from irg_jax.inference import benchmarks
    export = config_only_export(tmp_path)  # no params: the check must come before the restore
    wise = tmp_path / "final_data.json"
    wise.write_text(json.dumps([{"prompt_id": 17, "Prompt": "draw it"}, {"prompt_id": 18, "Prompt": ""}]))
    out = tmp_path / "w"
    rc = benchmarks.main(["wise", "--data", str(wise), "--out", str(out), "--checkpoint", str(export), *SAMPLING])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err == [f"python -m irg_jax.inference.benchmarks: error: 1 of 2 prompts cannot run, nothing "
                               f"generated: {wise} item 1 (prompt_id 18): empty prompt"], err
    assert not out.exists()
