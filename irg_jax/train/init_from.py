"""Initial parameters from elsewhere: a converted BAGEL / exported params tree, or a previous run's EMA.

Before anything is restored, the source is checked against the run's model: the model
values it was made with (``DIR/model_config.json`` of a params checkpoint, the ``config``
item of a train-state checkpoint) against ``config.model`` and the model copies in
``config.data`` (see :func:`irg_jax.model.config.model_value_differences`), and the stored
tree's keys and shapes against the model's parameters. Every difference is named in one
:class:`InitFromMismatch`; nothing is trained with values the weights were not made for.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from irg_jax.convert.autoencoder_file import AE_FILE, load_autoencoder_for
from irg_jax.model import config as model_config
from irg_jax.convert import params_dir


class InitFromMismatch(ValueError):
    """``checkpoint.init_from`` does not fit the run's model; the message lists every difference."""

    def __init__(self, origin: str, *, values=(), missing=(), unexpected=(), shapes=()):
        self.origin, self.values, self.missing = origin, list(values), list(missing)
        self.unexpected, self.shapes = list(unexpected), list(shapes)
        sections = [("model values (checkpoint vs config)", self.values),
                    ("parameters the checkpoint lacks", self.missing),
                    ("checkpoint parameters the model lacks", self.unexpected),
                    ("shape mismatches (checkpoint vs model)", self.shapes)]
        lines = [f"checkpoint.init_from={origin}: does not match this run's model; set the config to the "
                 f"checkpoint's values or convert/train a matching checkpoint"]
        for title, items in sections:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    - {item}" for item in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        super().__init__("\n".join(lines))


def autoencoder_file(config: ml_collections.ConfigDict) -> pathlib.Path | None:
    """Where the frozen FLUX autoencoder's weights come from (None: identity AE or none given).

    A converted checkpoint (or export) holds ``ae.safetensors`` next to its params; a stage-2
    run started from a stage-1 workdir finds it in that run's export.
    """
    if config.model.autoencoder.kind != "flux" or not config.checkpoint.init_from:
        return None
    root = pathlib.Path(config.checkpoint.init_from)
    for folder in (root, root / "export"):
        if (folder / AE_FILE).is_file():
            return folder / AE_FILE
    raise FileNotFoundError(f"checkpoint.init_from={root}: no {AE_FILE} there or in its export/; the FLUX "
                            "autoencoder cannot be random")


def load_autoencoder(config: ml_collections.ConfigDict):
    """The frozen autoencoder for training: FLUX weights from ``init_from``, or None (built from config)."""
    path = autoencoder_file(config)
    return None if path is None else load_autoencoder_for(path.parent, config.model)


def tree_differences(stored: Any, wanted: Any) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shapes) of a stored tree (metadata leaves with ``.shape``) against
    the model's abstract params; paths as ``decoder/layers/1/...`` (keys compared as strings)."""
    def flat(tree):
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}

    s, w = flat(stored), flat(wanted)
    missing = sorted(set(w) - set(s))
    unexpected = sorted(set(s) - set(w))
    shapes = sorted(f"{k}: {s[k]} vs {w[k]}" for k in set(s) & set(w) if s[k] != w[k])
    return missing, unexpected, shapes


def _layer_summary(names: list[str]) -> list[str]:
    """Per-layer groups of missing/extra keys collapsed to one line each (a layer-count change
    otherwise lists every tensor of every layer)."""
    groups: dict[str, list[str]] = {}
    out = []
    for name in names:
        parts = name.split("/")
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            groups.setdefault("/".join(parts[:3]), []).append(name)
        else:
            out.append(name)
    out += [f"{layer}/... ({len(items)} tensors)" for layer, items in groups.items()]
    return sorted(out)


def check_source(origin: str, recorded_model, stored_tree: Any, bundle, data_cfg=None) -> None:
    """Raise :class:`InitFromMismatch` naming every model value, key and shape that differs.

    ``recorded_model``: the model config the checkpoint was made with (None: not recorded,
    only the tree is checked, with a warning).
    """
    values: list[str] = []
    if recorded_model is None:
        logging.warning("checkpoint.init_from=%s: no recorded model config; only keys and shapes are checked",
                        origin)
    else:
        values, unrecorded = model_config.model_value_differences(recorded_model, bundle.model_cfg, data_cfg)
        if unrecorded:
            logging.warning("checkpoint.init_from=%s: the recorded model config has no %s; the config's values "
                            "are used unchecked", origin, ", ".join(unrecorded))
    missing, unexpected, shapes = tree_differences(stored_tree, bundle.abstract_params)
    if values or missing or unexpected or shapes:
        raise InitFromMismatch(origin, values=values, missing=_layer_summary(missing),
                               unexpected=_layer_summary(unexpected), shapes=shapes)


def _read_model_json(path: pathlib.Path):
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InitFromMismatch(str(path.parent), values=[f"{path.name} is not valid JSON ({e})"]) from None


def _stored_params_tree(path: pathlib.Path) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path.absolute() / "params")
    return meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta


def check_params_source(path: pathlib.Path, bundle, data_cfg=None) -> None:
    """The checks of :func:`check_source` for kind 'params' (an export / converted checkpoint)."""
    if not (path / "params").exists():
        raise FileNotFoundError(f"checkpoint.init_from={path}: no params/ (not a converted checkpoint or "
                                f"an export; a previous run's workdir needs init_from_kind='train_state')")
    model_json = path / "model_config.json"
    recorded = _read_model_json(model_json) if model_json.is_file() else None
    check_source(str(path), recorded, _stored_params_tree(path), bundle, data_cfg)


def _train_state_source(path: pathlib.Path) -> tuple[int, Any, Any, str]:
    """(step, recorded model config or None, stored params-like tree, 'ema' | 'params') of a workdir."""
    directory = path.absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint.init_from={path}: no checkpoints/ (not a training workdir; a "
                                f"converted checkpoint or export needs init_from_kind='params')")
    manager = ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"checkpoint.init_from: no complete checkpoint under {directory}")
        meta = manager.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        if not isinstance(tree, dict) or "params" not in tree:
            raise InitFromMismatch(f"{path} (step {step})", values=[
                "the checkpoint's state item is not an irg_jax train state (no 'params')"])
        source = "ema" if tree.get("ema") else "params"
        try:
            config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # an older checkpoint without the config item
            logging.warning("checkpoint.init_from=%s: step %d has no readable config item (%s)", path, step, e)
            config = None
    finally:
        manager.close()
    recorded = ml_collections.ConfigDict(config["model"]) if isinstance(config, dict) and "model" in config else None
    return step, recorded, tree[source], source


def load_params(ckpt_cfg: ml_collections.ConfigDict, bundle, mesh: jax.sharding.Mesh,
                data_cfg: ml_collections.ConfigDict | None = None):
    """Sharded float32 params for a fresh run (``checkpoint.init_from`` / ``init_from_kind``).

    - ``params``: an export directory (``DIR/params``), e.g. ``irg_jax.convert bagel-to-orbax``
      output (IRG stage 1 starts from BAGEL's EMA) or a run's ``WORKDIR/export``;
    - ``train_state``: a previous run's workdir; its latest checkpoint's EMA (IRG stage 2
      starts from the stage-1 EMA; the raw params when that run kept no EMA), read without
      restoring the optimiser state.

    Either kind is first checked with :func:`check_source` (``data_cfg``: the run's
    ``config.data``, whose copies of model values are compared too).
    """
    path = pathlib.Path(ckpt_cfg.init_from)
    if ckpt_cfg.init_from_kind == "params":
        check_params_source(path, bundle, data_cfg)
        with jax.set_mesh(mesh):
            return params_dir.restore_params(path, bundle.abstract_params, bundle.param_shardings)

    step, recorded, stored, source = _train_state_source(path)
    check_source(f"{path} (step {step}, {source})", recorded, stored, bundle, data_cfg)
    if source != "ema":
        logging.warning("checkpoint.init_from=%s: step %d has no EMA; starting from its raw params", path, step)
    # Orbax stores dict keys as strings (layer indices included): restore with string keys.
    abstract = params_dir.keys_to_str(bundle.abstract_params)
    target = jax.tree.map(lambda a, s, m: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=s),
                          abstract, params_dir.keys_to_str(bundle.param_shardings), params_dir.keys_to_str(stored))
    with jax.set_mesh(mesh):
        manager = ocp.CheckpointManager(path.absolute() / "checkpoints")
        try:
            item = {source: target}
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        finally:
            manager.close()
        params = jax.tree.map(lambda x, a: x.astype(a.dtype), restored["state"][source], abstract)
    return params_dir.keys_like(params, bundle.abstract_params)
