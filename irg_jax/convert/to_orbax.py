"""BAGEL / IRG PyTorch checkpoint folder -> irg_jax params checkpoint (``bagel-to-orbax``).

Reads from SRC:
  ema.safetensors | model.safetensors | ema_bf16.safetensors   the Bagel state dict (first found;
                                                               each also as STEM.safetensors.index.json
                                                               + STEM-0000i-of-0000n.safetensors shards)
  llm_config.json, vit_config.json [, ae_config.json, bagel_config.json]   the model config
  ae.safetensors                                               FLUX autoencoder (copied as-is)
  tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, ...)

Writes DST in the layout of :mod:`irg_jax.convert.params_dir` (``params/``, ``model_config.json``,
``export.json``, ``tokenizer/``; read back by ``params_dir.load_model_config`` and
``restore_params``, hence by training's ``init_from`` kind 'params'), plus
``ae.safetensors`` (FLUX names, see :func:`irg_jax.convert.load_autoencoder_for`) and
``bagel_configs/`` (the source json files, reused by ``orbax-to-bagel``).

Memory: the header is validated first (no data read); then each source tensor is read,
converted, cast and placed in the output tree (device_put into its sharding when a mesh
is given) before the next one is read, and Orbax writes the tree without extra copies
(:func:`write_params_tree`). Peak anonymous host memory is one copy of the output
parameters plus a few copies of the largest single tensor (the memory-mapped source
adds only reclaimable page cache).
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from irg_jax.convert import plan as plan_lib
from irg_jax.convert.autoencoder_file import AE_FILE
from irg_jax.convert.errors import ConvertError
from irg_jax.convert.safetensors_stream import SafetensorsSource
from irg_jax.convert.shards import ShardedSource, index_name, open_weights
from irg_jax.convert import ae_keys
from irg_jax.model import config as config_lib
from irg_jax.model.embeddings import sincos_2d_table
from irg_jax.parallel import sharding as sharding_lib

WEIGHT_STEMS = ("ema", "model", "ema_bf16")
# In order of preference: each state dict as one file, then as shards with an index json.
WEIGHT_FILES = tuple(n for stem in WEIGHT_STEMS for n in (f"{stem}.safetensors", index_name(stem)))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.json.gz", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
CONFIG_FILES = ("llm_config.json", "vit_config.json", "ae_config.json", "bagel_config.json", "config.json")
SOURCE_CONFIG_DIR = "bagel_configs"
DTYPES = ("float32", "bfloat16")


def find_weights(src: pathlib.Path) -> pathlib.Path:
    """The Bagel state dict of a checkpoint folder: the first of :data:`WEIGHT_FILES` present
    (a ``.safetensors`` file, or the index json of a sharded one)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint folder")
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"{src}: no BAGEL weights file; expected one of {', '.join(WEIGHT_FILES)}")


def table_warnings(source: SafetensorsSource | ShardedSource, model_cfg) -> list[str]:
    """Compare the stored sin-cos tables (if any) with the ones rebuilt from the config."""
    d = model_cfg.llm.hidden_size
    sides = {"latent_pos_embed.pos_embed": ("max_latent_size (bagel_config.json)", model_cfg.latent.max_latent_size)}
    if model_cfg.vit.enabled:
        sides["vit_pos_embed.pos_embed"] = ("vit_max_num_patch_per_side", model_cfg.vit.max_patches_per_side)
    out = []
    for key, (what, side) in sides.items():
        if key not in source.keys():
            continue
        got = source.read(key)
        want = sincos_2d_table(side, d)
        if got.shape != want.shape:
            out.append(f"{source.path}: {key} has shape {got.shape}, but {what} = {side} gives a table of "
                       f"{want.shape}; the table is rebuilt from the config (the weights do not depend on it)")
        elif not np.allclose(np.asarray(got, np.float32), want.astype(got.dtype).astype(np.float32), atol=1e-5):
            err = float(np.abs(np.asarray(got, np.float32) - want).max())
            out.append(f"{source.path}: {key} differs from the rebuilt 2-D sin-cos table (max abs {err:.3g}); "
                       f"it is rebuilt from the config, not loaded")
    return out


def tokenizer_problems(src: pathlib.Path, model_cfg) -> list[str]:
    """Special-token ids and vocabulary size of SRC's tokenizer.json against the config."""
    if not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer.json.gz")):
        return []
    from irg_jax.data.tokenizer import HFTokenizer
    try:
        tok = HFTokenizer.from_dir(str(src))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ConvertError(f"{src}: the tokenizer files cannot be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    ids = model_cfg.special_ids
    problems = [f"{tok.source}: {name} id is {got}, the model config says {want} (bagel_config.json "
                f"special_token_ids, Qwen2.5 ids by default)"
                for name, got, want in (("<|im_start|>", tok.bos_id, ids.bos), ("<|im_end|>", tok.eos_id, ids.eos),
                                        ("<|vision_start|>", tok.start_of_image_id, ids.start_of_image),
                                        ("<|vision_end|>", tok.end_of_image_id, ids.end_of_image))
                if got != want]
    if tok.vocab_size > model_cfg.llm.vocab_size:
        problems.append(f"{tok.source}: {tok.vocab_size} tokens, more than llm_config.json vocab_size "
                        f"{model_cfg.llm.vocab_size} (embedding rows)")
    return problems


def param_shardings(plan: plan_lib.Plan, mesh: jax.sharding.Mesh, rules) -> dict:
    """NamedSharding per parameter path, from its logical axes and the rules table."""
    return {p: jax.sharding.NamedSharding(
        mesh, sharding_lib.logical_to_spec(plan.logical_axes[p], rules, s.shape, mesh))
        for p, s in plan.params.items()}


def stream_params(source: SafetensorsSource | ShardedSource, plan: plan_lib.Plan, dtype, *,
                  shardings: Mapping[tuple, jax.sharding.Sharding] | None = None, progress: bool = True) -> dict:
    """Read, convert and place every parameter, one source tensor at a time -> params pure dict.

    Leaves are host numpy arrays of ``dtype``, or jax Arrays in ``shardings[path]``.
    Stacked (scan_layers) parameters are assembled layer by layer in their final buffer.
    """
    dtype = np.dtype(dtype)
    total = sum(source.nbytes(m.source) for m in plan.moves)
    leaves = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{source.path.name} -> params",
              disable=not progress) as bar:
        for path, moves in plan.moves_by_param().items():
            if moves[0].layer is None:
                value = _read_converted(source, moves[0], dtype)
            else:
                value = np.empty(plan.params[path].shape, dtype)
                for move in moves:
                    value[move.layer] = _read_converted(source, move, dtype)
            if shardings is not None:
                value = jax.device_put(value, shardings[path])
                value.block_until_ready()
            leaves[path] = value
            bar.update(sum(source.nbytes(m.source) for m in moves))
    return plan.nested(leaves)


def _read_converted(source: SafetensorsSource | ShardedSource, move: plan_lib.Move,
                    dtype: np.dtype) -> np.ndarray:
    value = move.rule.to_ours(source.read(move.source))
    if tuple(value.shape) != move.param_shape:  # validate() ran on the header; this guards the data
        raise plan_lib.CheckpointMismatch(str(source.path), shapes=[
            f"{move.source}: converted to {tuple(value.shape)}, expected {move.param_shape} ({move.param_name})"])
    return np.ascontiguousarray(value, dtype=dtype)


def write_params_tree(directory: pathlib.Path, params: dict) -> None:
    """Write ``params`` as ``DIR/params`` of the :mod:`irg_jax.convert.params_dir` layout, lean on memory.

    Same Orbax pytree format as ``params_dir.save_params`` (``restore_params`` reads it), but
    numpy leaves are written without Orbax's defensive deep copy and chunks are stored
    uncompressed: zstd on OCDBT holds about one more copy of the data in host memory
    while writing (measured), and trained weights barely compress.
    """
    import orbax.checkpoint as ocp
    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, handlers.ArrayHandler()))
    target = directory.absolute() / "params"
    if target.exists():
        shutil.rmtree(target)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                                use_compression=False))
    checkpointer.save(target, args=ocp.args.PyTreeSave(params))
    checkpointer.close()


def copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(src / n, dst / n)
    return names


def bagel_to_orbax(src_dir, dst_dir, *, dtype: str = "float32", scan_layers: bool = False,
                   mesh: jax.sharding.Mesh | None = None, rules=None, progress: bool = True) -> pathlib.Path:
    """Convert a BAGEL checkpoint folder into an irg_jax params checkpoint; returns DST.

    ``dtype`` is the stored parameter dtype ('float32' or 'bfloat16'); ``scan_layers``
    stacks the decoder layers (the layout of configs with ``model.scan_layers``); with a
    ``mesh`` every parameter is placed in its sharding (``rules``: the logical-axis
    table, default :data:`irg_jax.config.schema.DEFAULT_RULES`) as soon as it is read.
    Raises :class:`irg_jax.convert.plan.CheckpointMismatch` listing every problem.
    """
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    src, dst = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    weights = find_weights(src)
    model_cfg = config_lib.from_bagel_dir(src)  # BagelConfigError: one line naming the file and key
    model_cfg.scan_layers = bool(scan_layers)
    plan = plan_lib.build_plan(model_cfg)

    shardings = None
    if mesh is not None:
        if rules is None:
            from irg_jax.config.schema import DEFAULT_RULES
            rules = DEFAULT_RULES
        shardings = param_shardings(plan, mesh, rules)

    problems = tokenizer_problems(src, model_cfg)
    if problems:
        raise plan_lib.CheckpointMismatch(str(src), config=problems)
    ae_path = src / AE_FILE
    if ae_path.is_file():
        try:  # validates keys and shapes, then dropped
            ae_keys.load_autoencoder(ae_path, model_cfg.autoencoder)
        except ValueError as e:
            raise plan_lib.CheckpointMismatch(str(ae_path), config=[
                f"{e} (ae_config.json gives the FLUX sizes)"]) from None
    else:
        logging.warning("%s: no %s; DST will have no autoencoder weights (copy them in before generating)",
                        src, AE_FILE)

    with open_weights(weights) as source:
        plan_lib.validate(source.shapes(), plan, model_cfg, str(weights))
        for message in table_warnings(source, model_cfg):
            logging.warning("%s", message)
        params = stream_params(source, plan, np.dtype(jnp.dtype(dtype)), shardings=shardings,
                               progress=progress)

    info = {"source": "bagel", "source_file": str(weights.absolute()), "step": None, "dtype": dtype,
            "converter": "irg_jax.convert bagel-to-orbax"}
    dst.mkdir(parents=True, exist_ok=True)
    write_params_tree(dst, params)
    del params
    (dst / "model_config.json").write_text(model_cfg.to_json_best_effort(indent=2))
    (dst / "export.json").write_text(json.dumps(info, indent=2))
    copy_tokenizer(src, dst / "tokenizer")
    if ae_path.is_file():
        shutil.copyfile(ae_path, dst / AE_FILE)
    (dst / SOURCE_CONFIG_DIR).mkdir(exist_ok=True)
    for name in CONFIG_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / SOURCE_CONFIG_DIR / name)
    logging.info("converted %s (%d tensors) to %s", weights, len(plan.moves), dst)
    return dst
