"""Compiled programs are reused, never rebuilt: a second ``python -m irg_jax.generate`` on the same
export loads every program from the persistent compilation cache (the CLI sets the cache up
itself, before the first compilation), and a second runner on the same export and bucket in
the same process compiles nothing. The export carries only the tokenizer's files.

The signals are JAX's own compilation events (``irg_jax.runtime.CompileStats``: programs loaded
from the cache vs compiled), the cache's entries and trace counts, never wall-clock time.
"""
import argparse
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from irg_jax import runtime
from irg_jax.inference import cli
from irg_jax.data.tokenizer import WordTokenizer
from irg_jax.inference import runner as runner_lib
from irg_jax.convert.params_dir import save_params, tokenizer_files
from test_generate_cli import tiny_export

REPO = pathlib.Path(__file__).resolve().parent.parent
# the smallest loop (one turn, two steps, two think tokens): compiling it is the test's main cost
SMALL = ["--num_steps", "2", "--max_think_tokens", "2", "--max_prompt_tokens", "12", "--image_size", "32",
         "--system_prompt", "plan", "--vit_max_size", "28", "--num_refinements", "0"]


def _generate_in_subprocess(cwd: pathlib.Path, export: pathlib.Path, out: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "irg_jax.generate", "--checkpoint", str(export),
                           "--prompt", "a red square", "--out", out, "--seed", "3", *SMALL],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("XLA programs:")]
    assert len(line) == 1, proc.stderr[-2000:]
    words = line[0].replace(",", " ").replace("(", " ").split()
    return {"loaded": int(words[2]), "compiled": int(words[8]), "written": int(words[10])}


def test_a_second_generate_run_compiles_nothing(tmp_path):
    export = tiny_export(tmp_path)
    cache = tmp_path / ".cache" / "jax"  # the default: ./.cache/jax under the working directory
    first = _generate_in_subprocess(tmp_path, export, "out1")
    entries = sorted(p.name for p in cache.iterdir())
    assert first["compiled"] > 0 and first["written"] == first["compiled"] == len(entries), (first, entries)
    second = _generate_in_subprocess(tmp_path, export, "out2")
    assert second == {"loaded": first["compiled"], "compiled": 0, "written": 0}, second
    assert sorted(p.name for p in cache.iterdir()) == entries
    for name in ("turn1.png", "turn1.txt"):  # the cached programs compute the same result
        a, b = (tmp_path / out / "0" / name for out in ("out1", "out2"))
        if name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        else:
            assert a.read_text() == b.read_text()


def test_setup_compilation_cache_after_import(tmp_path, monkeypatch):
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                                                  "jax_persistent_cache_min_compile_time_secs")}
    try:
        monkeypatch.chdir(tmp_path)
        jax.config.update("jax_compilation_cache_dir", None)
        assert runtime.setup_compilation_cache(environ={}) == str(tmp_path / ".cache" / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / ".cache" / "jax")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        # an explicit directory wins; a threshold from the environment is kept
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
        env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}
        assert runtime.setup_compilation_cache("elsewhere", environ=env) == str(tmp_path / "elsewhere")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
        assert runtime.setup_compilation_cache("", environ={}) is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)


def test_a_new_runner_on_the_same_export_shares_the_compiled_program(tmp_path):
    export = tiny_export(tmp_path)
    p = argparse.ArgumentParser()
    cli.add_sampling_flags(p)
    args = p.parse_args(["--checkpoint", str(export), *SMALL])
    from irg_jax.convert.params_dir import load_model_config
    icfg = cli.inference_config(args, load_model_config(export))
    first = runner_lib.from_checkpoint(export, icfg, 3)
    want = first.run_batch(["draw it", "a red square"], [0, 1], seed=2)
    assert first.program._shared.traces >= 1  # traced here, or by an earlier test in this process
    second = runner_lib.from_checkpoint(export, icfg, 3)
    assert second.program._shared is first.program._shared
    assert second.program.model_state is not first.program.model_state  # shared code, not parameters
    with runtime.CompileStats() as compiles:
        got = second.run_batch(["draw it", "a red square"], [0, 1], seed=2)
    assert second.program.num_traces == 0 and compiles.requests == 0, compiles.summary()
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w.turns[-1].image, g.turns[-1].image)
    # another bucket (batch size) is a new program (traced and lowered only: compiling it adds nothing)
    third = runner_lib.from_checkpoint(export, icfg, 2)
    third.program.lower(*third.encode(["draw it"], [0], seed=2))
    assert third.program.num_traces == 1 and third.program._shared is first.program._shared


def test_the_export_copies_only_the_tokenizer(tmp_path):
    tok = WordTokenizer.from_corpus(["a red square"])
    root = tmp_path / "data"  # a data root, as the small variants' tokenizer_path is
    (root / "mode_a").mkdir(parents=True)
    tok.save(str(root / "word_vocab.json"))
    for f in ("part-0.parquet", "mode_a/part-1.parquet"):
        (root / f).write_bytes(b"PAR1 not really")
    (root / "notes.json").write_text("{}")
    params = {"w": jax.numpy.ones((2,))}
    from irg_jax.model import config as model_config
    out = save_params(tmp_path / "export", params, model_config.tiny(), {"source": "test"}, tokenizer_dir=root)
    assert not list(out.rglob("*.parquet"))
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["word_vocab.json"]
    assert runner_lib.load_tokenizer_dir(out / "tokenizer").tokens == tok.tokens

    hf = tmp_path / "hf"  # a model folder: tokenizer.json and its companions, nothing else
    hf.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "config.json", "model.safetensors"):
        (hf / f).write_text("{}")
    assert [f.name for f in tokenizer_files(hf)] == ["tokenizer.json", "tokenizer_config.json", "merges.txt"]
    save_params(tmp_path / "export", params, model_config.tiny(), {"source": "test"}, tokenizer_dir=hf)
    names = sorted(p.name for p in (out / "tokenizer").iterdir())  # the earlier export's vocabulary is gone
    assert names == ["merges.txt", "tokenizer.json", "tokenizer_config.json"]
    assert tokenizer_files(tmp_path / "nothing") == [] and tokenizer_files(tmp_path / "export" / "params") == []
