"""The params directory: parameter trees outside the train state (what training exports, what
``irg_jax.convert`` writes and reads, what generation loads).

Layout of an export directory (what ``irg_jax.generate --checkpoint`` reads, and what
``irg_jax.convert bagel-to-orbax`` writes):

    DIR/params/         Orbax pytree: pure dict of parameter arrays
    DIR/model_config.json
    DIR/export.json     {"source": ..., "step": ..., "dtype": ...}
    DIR/tokenizer/      optional: the tokenizer's files only (:func:`tokenizer_files`: tokenizer.json
                        and its companions, or a word-vocabulary json)

Multi-process: :func:`save_params` must be called by every process (Orbax writes the parameter
shards collectively); the small files are written by process 0 only.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from irg_jax import runtime


def save_params(directory: str | pathlib.Path, params: Any, model_cfg: ml_collections.ConfigDict,
                info: dict, tokenizer_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write ``params`` (global arrays, any sharding) and the files beside them; every process calls it."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        # force: an earlier export is replaced; Orbax removes it on process 0 and synchronises.
        ckptr.save(directory / "params", params, force=True)
        ckptr.wait_until_finished()
    if not runtime.is_primary():
        return directory
    (directory / "model_config.json").write_text(model_cfg.to_json_best_effort(indent=2))
    (directory / "export.json").write_text(json.dumps(info, indent=2))
    if tokenizer_dir:
        files = tokenizer_files(tokenizer_dir)
        if not files:
            logging.warning("%s: no tokenizer files found; the export has no tokenizer/ (generate then needs "
                            "--tokenizer)", tokenizer_dir)
        target = directory / "tokenizer"
        if target.exists():  # a previous export's files must not mix with these
            shutil.rmtree(target)
        if files:
            target.mkdir()
        for f in files:
            shutil.copy(f, target / f.name)
    return directory


# Files of a Hugging Face tokenizer folder that travel with ``tokenizer.json`` (copied when present).
HF_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                           "merges.txt")


def tokenizer_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The files of the tokenizer that ``irg_jax.data.tokenizer.load_tokenizer(path)`` loads, and no
    others (``path`` may be a data root that also holds the parquet files): a word-vocabulary
    file; a folder's ``word_vocab.json``; or its ``tokenizer.json`` (or ``.json.gz``) with the
    Hugging Face companion files beside it. Empty when ``path`` holds no tokenizer."""
    src = pathlib.Path(path)
    if src.is_file():
        return [src]
    if not src.is_dir():
        return []
    if (src / "word_vocab.json").is_file():
        return [src / "word_vocab.json"]
    main = next((src / n for n in ("tokenizer.json", "tokenizer.json.gz") if (src / n).is_file()), None)
    if main is None:
        return []
    return [main] + [src / n for n in HF_TOKENIZER_COMPANIONS if (src / n).is_file()]


def load_model_config(directory: str | pathlib.Path) -> ml_collections.ConfigDict:
    path = pathlib.Path(directory) / "model_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an irg_jax params checkpoint (no model_config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_params(directory: str | pathlib.Path, abstract_params: Any, shardings: Any | None = None,
                   dtype=jnp.float32) -> Any:
    """Restore ``DIR/params`` into the given structure (sharded when ``shardings`` is given)."""
    path = pathlib.Path(directory).absolute() / "params"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no params checkpoint")
    # Orbax stores dict keys as strings (the integer layer indices of unscanned models included):
    # match on string keys, hand back the caller's keys.
    wanted_keys = abstract_params
    abstract_params = keys_to_str(abstract_params)
    shardings = (jax.tree.map(lambda _: None, abstract_params) if shardings is None
                 else keys_to_str(shardings))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) if s is not None
                          else jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        stored = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        _check_structure(stored, abstract_params, path)
        # Restore in the stored dtype, then cast: an export may be bf16 while training wants fp32.
        stored_target = jax.tree.map(
            lambda t, m: jax.ShapeDtypeStruct(t.shape, m.dtype, sharding=t.sharding), target, stored)
        params = ckptr.restore(path, stored_target)
    return keys_like(jax.tree.map(lambda x: x.astype(dtype), params), wanted_keys)


def keys_to_str(tree: Any) -> Any:
    return {str(k): keys_to_str(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def keys_like(tree: Any, like: Any) -> Any:
    """``tree`` (string keys) with the keys of ``like`` (e.g. integer layer indices)."""
    if not isinstance(like, dict):
        return tree
    return {k: keys_like(tree[str(k)], v) for k, v in like.items()}


def _check_structure(stored: Any, wanted: Any, path: pathlib.Path) -> None:
    s_paths = {jax.tree_util.keystr(p): getattr(l, "shape", None)
               for p, l in jax.tree_util.tree_flatten_with_path(stored)[0]}
    w_paths = {jax.tree_util.keystr(p): l.shape for p, l in jax.tree_util.tree_flatten_with_path(wanted)[0]}
    missing = sorted(set(w_paths) - set(s_paths))
    extra = sorted(set(s_paths) - set(w_paths))
    shape = sorted(f"{k}: stored {tuple(s_paths[k])}, model {w_paths[k]}" for k in set(w_paths) & set(s_paths)
                   if tuple(s_paths[k]) != tuple(w_paths[k]))
    if missing or extra or shape:
        raise ValueError(f"{path}: params do not match the model.\n  missing: {missing[:20]}\n"
                         f"  unexpected: {extra[:20]}\n  shape mismatches: {shape[:20]}")
