"""Benchmark runners: run the IRG loop on a benchmark's prompts and write its scorer's layout.

    python -m irg_jax.inference.benchmarks geneval --data evaluation_metadata_long.jsonl --out DIR \\
        --checkpoint EXPORT [sampling flags of irg_jax.generate]
    python -m irg_jax.inference.benchmarks wise --data final_data.json --out DIR --checkpoint EXPORT
    python -m irg_jax.inference.benchmarks tiif --data TIIF_DIR_OR_JSONL --out DIR --checkpoint EXPORT

Layouts (see irg_jax/inference/README.md for running the official scorers):

  geneval  <out>/<idx:05>/metadata.jsonl (the prompt's metadata line), <out>/<idx:05>/samples/<k:05>.png
           (``--samples`` images per prompt, default 4: the final turn unless ``--turn``), and
           <out>/<idx:05>/irg/<k:05>_turn<t>.png/.txt with every turn
  wise     <out>/<prompt_id>.png (final turn), <out>/<prompt_id>.txt (the thinks), and
           <out>/irg/<prompt_id>_turn<t>.png
  tiif     <out>/<type>/<model>/{short,long}_description/turn<t>_<line>.png and .txt
           (IRG's tiif_multi_turn_gen.py layout; <line> is the 0-based line of the item in its file)

Row ids (the per-row random stream) are the prompt index times the number of samples
plus the sample index, so a rerun with the same seed reproduces every image.

The mesh flags are those of ``irg_jax.generate`` (``--mesh``, ``--rules``, ``--train_config``):
parameters sharded like in training, prompt rows split over the data axes. So are its checks
and its error handling (every prompt checked before the parameters are loaded and before any
file is written; one-line errors, ``--debug``) and its persistent compilation cache
(``--compilation_cache``).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Callable, Iterator

from irg_jax.inference import cli

Writer = Callable[[object], None]  # PromptResult -> files


@dataclasses.dataclass
class Job:
    prompt: str
    row_id: int
    write: Writer
    where: str = ""  # where the prompt came from (file and line or item), named when it cannot run


def _save_png(image, path: pathlib.Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _pick(result, turn: int):
    return result.turns[-1] if turn <= 0 else result.turns[turn - 1]


def _read_jsonl(path: pathlib.Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
            rows.append((n, record))
    return rows


def _need(record: dict, key: str, where: str):
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(record)})")
    return record[key]


def geneval_jobs(data: pathlib.Path, out: pathlib.Path, samples: int, turn: int) -> Iterator[Job]:
    for idx, (n, meta) in enumerate(_read_jsonl(data)):
        where = f"{data} line {n}"
        prompt = _need(meta, "prompt", where)
        folder = out / f"{idx:05d}"
        for k in range(samples):
            def write(result, folder=folder, k=k):
                _save_png(_pick(result, turn).image, folder / "samples" / f"{k:05d}.png")
                for t, tr in enumerate(result.turns, 1):
                    _save_png(tr.image, folder / "irg" / f"{k:05d}_turn{t}.png")
                    (folder / "irg" / f"{k:05d}_turn{t}.txt").write_text(tr.text, encoding="utf-8")
            yield Job(prompt, idx * samples + k, write, where)


def write_geneval_metadata(data: pathlib.Path, out: pathlib.Path, settings: dict) -> None:
    """Each prompt folder's ``metadata.jsonl`` (what the scorer reads) and ``irg/settings.json``."""
    for idx, (_, meta) in enumerate(_read_jsonl(data)):
        folder = out / f"{idx:05d}"
        (folder / "irg").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
        # the scorer lists <out>/*/ as prompt folders: settings go inside each one
        (folder / "irg" / "settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


def wise_jobs(data: pathlib.Path, out: pathlib.Path, turn: int) -> Iterator[Job]:
    items = json.loads(data.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{data}: expected a JSON list of WISE items")
    for n, item in enumerate(items):
        where = f"{data} item {n}"
        pid, prompt = _need(item, "prompt_id", where), _need(item, "Prompt", where)

        def write(result, pid=pid):
            _save_png(_pick(result, turn).image, out / f"{pid}.png")
            thinks = [f"[turn {t}]\n{tr.text}" for t, tr in enumerate(result.turns, 1)]
            (out / f"{pid}.txt").write_text("\n\n".join(thinks), encoding="utf-8")
            for t, tr in enumerate(result.turns, 1):
                _save_png(tr.image, out / "irg" / f"{pid}_turn{t}.png")
        yield Job(prompt, n, write, f"{where} (prompt_id {pid})")


def tiif_jobs(data: pathlib.Path, out: pathlib.Path, model_name: str) -> Iterator[Job]:
    files = sorted(data.glob("*.jsonl")) if data.is_dir() else [data]
    if not files:
        raise FileNotFoundError(f"{data}: no *.jsonl files")
    row = 0
    for f in files:
        for line, (n, item) in enumerate(_read_jsonl(f)):
            where = f"{f} line {n}"
            kind = _need(item, "type", where)
            for field in ("short_description", "long_description"):
                folder = out / str(kind) / model_name / field

                def write(result, folder=folder, line=line):
                    folder.mkdir(parents=True, exist_ok=True)
                    for t, tr in enumerate(result.turns, 1):
                        _save_png(tr.image, folder / f"turn{t}_{line}.png")
                        (folder / f"turn{t}_{line}.txt").write_text(tr.text, encoding="utf-8")
                yield Job(str(_need(item, field, where)), row, write, f"{where} {field}")
                row += 1


def run_jobs(runner, jobs: list[Job], seed: int, write_files: bool = True) -> int:
    """Run the jobs in batches of ``runner.batch_size``; ``write_files`` False: generate only (the
    other processes of a multi-process run)."""
    from tqdm import tqdm
    with tqdm(total=len(jobs), desc="prompts", unit="prompt", disable=not write_files) as bar:
        for s in range(0, len(jobs), runner.batch_size):
            chunk = jobs[s:s + runner.batch_size]
            results = runner.run_batch([j.prompt for j in chunk], [j.row_id for j in chunk], seed)
            if write_files:
                for job, result in zip(chunk, results):
                    job.write(result)
            bar.update(len(chunk))
    return len(jobs)


def benchmark_jobs(benchmark: str, data: pathlib.Path, out: pathlib.Path, *, samples: int = 4, turn: int = 0,
                   model_name: str = "IRG-JAX") -> list[Job]:
    """Every generation of ``benchmark`` on ``data`` (reads ``data``, writes nothing)."""
    if benchmark == "geneval":
        return list(geneval_jobs(data, out, samples, turn))
    if benchmark == "wise":
        return list(wise_jobs(data, out, turn))
    if benchmark == "tiif":
        return list(tiif_jobs(data, out, model_name))
    raise ValueError(f"unknown benchmark {benchmark!r} (geneval, wise, tiif)")


def run_benchmark(runner, benchmark: str, data: pathlib.Path, out: pathlib.Path, *, seed: int, settings: dict,
                  samples: int = 4, turn: int = 0, model_name: str = "IRG-JAX") -> int:
    """Write ``benchmark``'s layout for every prompt of ``data``; returns the number of generations.

    Every prompt is checked (``runner.check_prompts``) before any file is written. Under
    multi-process JAX every process runs the generations; process 0 writes the files."""
    jobs = benchmark_jobs(benchmark, data, out, samples=samples, turn=turn, model_name=model_name)
    runner.check_prompts([j.prompt for j in jobs], [j.where for j in jobs])
    primary = cli.is_writer()
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        if benchmark == "geneval":
            write_geneval_metadata(data, out, settings)
        else:
            (out / "irg_settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return run_jobs(runner, jobs, seed, write_files=primary)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m irg_jax.inference.benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("benchmark", choices=("geneval", "wise", "tiif"))
    p.add_argument("--data", required=True, help="GenEval metadata jsonl, WISE final_data.json, TIIF jsonl or dir")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=4, help="geneval: images per prompt")
    p.add_argument("--turn", type=int, default=0, help="geneval/wise: turn whose image is scored (0 = last)")
    p.add_argument("--model_name", default="IRG-JAX", help="tiif: folder name under <type>/")
    cli.add_sampling_flags(p)
    args = p.parse_args(argv)
    return cli.run_cli(p.prog, args.debug, lambda: _main(args))


def _main(args) -> int:
    from irg_jax import runtime
    cli.start_up(args)
    data, out = pathlib.Path(args.data), pathlib.Path(args.out)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    kw = dict(samples=args.samples, turn=args.turn, model_name=args.model_name)
    jobs = benchmark_jobs(args.benchmark, data, out, **kw)
    with runtime.CompileStats() as compiles:
        # the prompts are checked here before the parameters are restored, and again before any file is written
        runner = cli.build_runner(args, prompts=[j.prompt for j in jobs], where=[j.where for j in jobs])
        settings = cli.settings_record(runner, args.seed)
        n = run_benchmark(runner, args.benchmark, data, out, seed=args.seed, settings=settings, **kw)
    if cli.is_writer():
        print(f"{args.benchmark}: wrote {n} generations to {out}", file=sys.stderr)
        print(compiles.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
