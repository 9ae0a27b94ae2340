"""Host side of IRG inference: load an export, tokenise, batch, run the compiled loop, detokenise.

:class:`IRGRunner` pads every batch to ``batch_size`` rows (repeating the last prompt) so
all batches share one compiled program; each row's randomness is
``fold_in(key(seed), row_id)``, so a prompt's result does not depend on its batch.

On a device mesh (``mesh=``, with the training ``rules``) the parameters are restored
sharded by the rules straight from the Orbax export and the rows of a batch are split over
the data axes (``irg_jax.inference.placement``); ``batch_size`` rows are padded further to a
multiple of the data-parallel size, and the padding is dropped from the results.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irg_jax.convert.autoencoder_file import load_autoencoder_for
from irg_jax.data.tokenizer import HFTokenizer, Tokenizer, WordTokenizer
from irg_jax.inference import feedback, irg_loop
from irg_jax.inference.placement import Placement
from irg_jax.model.bagel import Bagel
from irg_jax.parallel.sharding import state_shardings
from irg_jax.convert.params_dir import load_model_config, restore_params


@dataclasses.dataclass
class TurnOutput:
    text: str
    image: np.ndarray      # uint8 [H, W, 3]
    num_tokens: int
    ended: bool            # the think ended with <|im_end|> (False: cut at max_think_tokens)


@dataclasses.dataclass
class PromptResult:
    prompt: str
    row_id: int
    turns: list[TurnOutput]


def load_export(directory: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                rules=None) -> tuple[Bagel, object]:
    """(model, autoencoder) from an export directory (``irg_jax.convert.params_dir`` layout).

    With a ``mesh``, every parameter is restored directly into its sharding under ``rules``
    (default: the training default), so no device ever holds the whole model."""
    cfg = load_model_config(directory)
    abstract = nnx.eval_shape(lambda: Bagel(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    abstract.rebuild_tables()
    consts = nnx.split(abstract, nnx.Param, ...)[2]
    shardings = None
    if mesh is not None:
        pl = Placement.make(mesh, rules)
        shardings = state_shardings(abstract_params, pl.mesh, pl.rules).to_pure_dict()
    params = restore_params(directory, nnx.to_pure_dict(abstract_params), shardings, dtype=jnp.dtype(cfg.dtype))
    model = nnx.merge(graphdef, params, consts)
    return model, load_autoencoder_for(directory, cfg)


def load_tokenizer_dir(path: str | os.PathLike) -> Tokenizer:
    """``tokenizer.json[.gz]`` (Hugging Face) or a word vocabulary json (``{"type": "word", ...}``)."""
    folder = pathlib.Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: tokenizer path does not exist")
    if folder.is_file():
        return WordTokenizer.load(str(folder))
    if (folder / "word_vocab.json").exists():  # the training loader's order (irg_jax.data.tokenizer)
        return WordTokenizer.load(str(folder / "word_vocab.json"))
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.json.gz").exists():
        return HFTokenizer.from_dir(str(folder))
    for f in sorted(folder.glob("*.json")):
        try:
            return WordTokenizer.load(str(f))
        except ValueError:
            continue
    raise FileNotFoundError(f"{folder}: no tokenizer.json[.gz] and no word-vocabulary json")


def check_tokenizer(tokenizer: Tokenizer, model_cfg, origin: str) -> None:
    ids = model_cfg.special_ids
    want = dict(bos=ids.bos, eos=ids.eos, start_of_image=ids.start_of_image, end_of_image=ids.end_of_image)
    got = dict(bos=tokenizer.bos_id, eos=tokenizer.eos_id, start_of_image=tokenizer.start_of_image_id,
               end_of_image=tokenizer.end_of_image_id)
    if want != got:
        raise ValueError(f"{origin}: tokenizer special ids {got} differ from the model config's {want}")
    if tokenizer.vocab_size > model_cfg.llm.vocab_size:
        raise ValueError(f"{origin}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model_cfg.llm.vocab_size} embedding rows")


class PromptError(ValueError):
    """Prompts that cannot run (empty, or longer than the bucket), each named by where it came from."""


def check_prompts(tokenizer: Tokenizer, prompts: Sequence[str], max_tokens: int,
                  where: Sequence[str] | None = None) -> None:
    """Raise :class:`PromptError` naming every prompt that is empty (or only whitespace) or has
    more than ``max_tokens`` tokens (the bucket's prompt width), with ``where`` it came from
    (e.g. ``file line 3``; default ``prompt <i>``) and its length; called before any work."""
    where = [f"prompt {i}" for i in range(len(prompts))] if where is None else list(where)
    if len(where) != len(prompts):
        raise ValueError(f"check_prompts: {len(where)} locations for {len(prompts)} prompts")
    problems, seen = [], set()
    for text, at in zip(prompts, where):
        key = (at, text if isinstance(text, str) else repr(text))
        if key in seen:  # a prompt sampled several times is checked (and named) once
            continue
        seen.add(key)
        if not isinstance(text, str):
            problems.append(f"{at}: the prompt is a {type(text).__name__}, not a string")
            continue
        n = len(tokenizer.encode(text)) if text.strip() else 0
        if not text.strip():
            problems.append(f"{at}: empty prompt" + (" (only whitespace)" if text else ""))
        elif n == 0:
            problems.append(f"{at}: the prompt has no tokens")
        elif n > max_tokens:
            problems.append(f"{at}: {n} tokens, more than the bucket's {max_tokens} (max_prompt_tokens)")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise PromptError(f"{len(problems)} of {len(seen)} prompts cannot run, nothing generated: {shown}")


def default_image_size(model_cfg, cap: int = 1024) -> int:
    """The largest square the latent position table allows, capped at IRG's 1024."""
    px = feedback.pixels_per_token(model_cfg)
    return min(cap, model_cfg.latent.max_latent_size * px) // px * px


class IRGRunner:
    def __init__(self, model: Bagel, ae, tokenizer: Tokenizer, config: irg_loop.InferenceConfig, batch_size: int,
                 mesh: jax.sharding.Mesh | None = None, rules=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.program = irg_loop.IRGProgram(model, ae, mesh, rules)
        self.static, self.dynamic = config.static(), config.dynamic()
        feedback.image_grid(self.cfg, *config.image_size, config.vit_max_size, config.vit_min_size)  # validates
        sys_ids, sys_len = irg_loop.encode_segments(tokenizer, [config.system_prompt],
                                                    len(tokenizer.encode(config.system_prompt)) + 2, "system prompt")
        self.sys_ids = np.repeat(sys_ids, batch_size, 0)
        self.sys_len = np.repeat(sys_len, batch_size, 0)

    def check_prompts(self, prompts: Sequence[str], where: Sequence[str] | None = None) -> None:
        """:func:`check_prompts` against this runner's bucket (``config.max_prompt_tokens``)."""
        check_prompts(self.tokenizer, prompts, self.config.max_prompt_tokens, where)

    def encode(self, prompts: Sequence[str], row_ids: Sequence[int], seed: int,
               thinks: Sequence[str] | None = None) -> tuple:
        """The compiled program's arguments for at most ``batch_size`` prompts (padded to ``batch_size``
        rows by repeating the last prompt): ``self.program(*runner.encode(...))``."""
        n = len(prompts)
        if not 0 < n <= self.batch_size or len(row_ids) != n:
            raise ValueError(f"run_batch takes 1..{self.batch_size} prompts with one row id each, got "
                             f"{n} prompts and {len(row_ids)} ids")
        pad = self.batch_size - n
        texts = list(prompts) + [prompts[-1]] * pad
        ids = list(row_ids) + [row_ids[-1]] * pad
        p_ids, p_len = irg_loop.encode_segments(self.tokenizer, texts, self.config.max_prompt_tokens + 2)
        think1 = None
        if thinks is not None:
            if len(thinks) != n:
                raise ValueError(f"run_batch: {len(thinks)} given thinks for {n} prompts")
            think1 = irg_loop.encode_segments(self.tokenizer, list(thinks) + [thinks[-1]] * pad,
                                              self.static.max_think_tokens + 1, "given think")
        return (self.static, self.dynamic, self.sys_ids, self.sys_len, p_ids, p_len,
                irg_loop.row_keys_for(seed, ids), think1)

    def generate_turns(self, prompts: Sequence[str], row_ids: Sequence[int], seed: int,
                       thinks: Sequence[str] | None = None) -> list[dict]:
        """The compiled loop on at most ``batch_size`` prompts: one host dict per turn (``think``,
        ``image``, ``latents``), with one row per prompt (the padding dropped)."""
        turns = self.program.run_padded(*self.encode(prompts, row_ids, seed, thinks))
        return [jax.tree.map(lambda x: x[:len(prompts)], t) for t in irg_loop.as_host(turns)]

    def run_batch(self, prompts: Sequence[str], row_ids: Sequence[int], seed: int,
                  thinks: Sequence[str] | None = None) -> list[PromptResult]:
        """At most ``batch_size`` prompts -> one result each (the batch is padded internally).

        ``thinks``: one given think-1 text per prompt (written as in the training data), which
        the model draws from instead of a think it samples.
        """
        n = len(prompts)
        turns = [irg_loop.Turn(**t) for t in self.generate_turns(prompts, row_ids, seed, thinks)]
        results = []
        for i in range(n):
            outs = []
            for t in turns:
                k = int(t.think.length[i])
                outs.append(TurnOutput(self.tokenizer.decode(np.asarray(t.think.ids[i, :k]).tolist()),
                                       np.asarray(t.image[i]), k, bool(t.think.ended[i])))
            results.append(PromptResult(prompts[i], int(row_ids[i]), outs))
        return results

    def run(self, prompts: Sequence[str], seed: int, row_ids: Sequence[int] | None = None,
            progress: bool = True, thinks: Sequence[str] | None = None,
            where: Sequence[str] | None = None) -> Iterator[list[PromptResult]]:
        """Yield one list of results per batch, in prompt order (``thinks``: see :meth:`run_batch`).

        Every prompt is checked (:meth:`check_prompts`, named by ``where``) before the first
        batch runs: a bad one raises :class:`PromptError` before anything is generated."""
        self.check_prompts(prompts, where)
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        starts = range(0, len(prompts), self.batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="IRG batches", unit="batch")
        for s in starts:
            chunk = slice(s, s + self.batch_size)
            yield self.run_batch(prompts[chunk], row_ids[chunk], seed, None if thinks is None else thinks[chunk])


def export_tokenizer(directory: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                     model_cfg=None) -> Tokenizer:
    """The export's tokenizer (``DIR/tokenizer``, or ``tokenizer_path``), checked against its model config."""
    tok_path = pathlib.Path(tokenizer_path) if tokenizer_path else pathlib.Path(directory) / "tokenizer"
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path}: the export has no tokenizer; pass --tokenizer PATH")
    tokenizer = load_tokenizer_dir(tok_path)
    check_tokenizer(tokenizer, load_model_config(directory) if model_cfg is None else model_cfg, str(tok_path))
    return tokenizer


def from_checkpoint(directory: str | os.PathLike, config: irg_loop.InferenceConfig, batch_size: int,
                    tokenizer_path: str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules=None, prompts: Sequence[str] | None = None,
                    where: Sequence[str] | None = None) -> IRGRunner:
    """A runner for an export; with a ``mesh``, restored sharded and run data-parallel (see module doc).

    The tokenizer, the image size and the given ``prompts`` (:func:`check_prompts`, named by
    ``where``) are checked before the parameters are restored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_cfg = load_model_config(directory)
    tokenizer = export_tokenizer(directory, tokenizer_path, model_cfg)
    feedback.image_grid(model_cfg, *config.image_size, config.vit_max_size, config.vit_min_size)  # validates
    if prompts is not None:
        check_prompts(tokenizer, prompts, config.max_prompt_tokens, where)
    model, ae = load_export(directory, mesh, rules)
    return IRGRunner(model, ae, tokenizer, config, batch_size, mesh, rules)


class Prompt(NamedTuple):
    text: str
    where: str   # "<file> line <n>": the line the prompt came from


def read_prompt_file(path: str | os.PathLike) -> list[Prompt]:
    """One prompt per line, or JSON lines with a ``prompt`` field (blank lines skipped), each with
    its line number. A JSON prompt that is not a string, or a line that is not valid JSON,
    is an error naming the line; empty prompts are returned (and refused by :func:`check_prompts`)."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        where = f"{path} line {n}"
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if "prompt" not in record:
                raise ValueError(f"{where}: JSON line has no 'prompt' field (keys: {sorted(record)})")
            if not isinstance(record["prompt"], str):
                raise ValueError(f"{where}: 'prompt' is a {type(record['prompt']).__name__}, not a string")
            prompts.append(Prompt(record["prompt"], where))
        else:
            prompts.append(Prompt(line, where))
    return prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The texts of :func:`read_prompt_file`."""
    return [p.text for p in read_prompt_file(path)]

