"""The six IRGL learning modes as dataset groups, with IRG's mixture semantics.

A group is a list of parquet paths plus
  - ``is_mandatory``: one sample from the group opens every pack;
  - ``weight``: sampling proportion after the mandatory samples (over all groups, mandatory
    ones included, as in IRG);
  - the VAE and ViT image transform arguments (stride, max/min size, max_pixels).
A group with no paths is unused; it must then be non-mandatory with weight 0.

``stage1_groups`` / ``stage2_groups`` mirror IRG's ``train_toy_dataset_stage1.yaml`` and
``train_toy_dataset_stage2yaml`` (spec §4.8). Groups are always visited in ``MODES`` order
(mandatory draws and the cumulative weights depend on it).
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from irg_jax.data.transforms import DEFAULT_MAX_PIXELS, ImageTransform

INITIAL_THINKING_UNDERSTANDING = "initial_thinking_understanding_learning"
INITIAL_THINKING_GENERATION = "initial_thinking_generation_learning"
INITIAL_FULL = "initial_full_learning"
IMPROVING_THINKING_UNDERSTANDING = "improving_thinking_understanding_learning"
IMPROVING_THINKING_GENERATION = "improving_thinking_generation_learning"
IMPROVING_FULL = "improving_full_learning"

# The order of IRG's stage-1 yaml.
MODES = (IMPROVING_FULL, INITIAL_FULL, IMPROVING_THINKING_GENERATION, INITIAL_THINKING_GENERATION,
         IMPROVING_THINKING_UNDERSTANDING, INITIAL_THINKING_UNDERSTANDING)


@dataclasses.dataclass(frozen=True)
class TransformArgs:
    stride: int
    max_size: int
    min_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def build(self, bucket_limit: tuple[int, int] | None = None) -> ImageTransform:
        return ImageTransform(self.max_size, self.min_size, self.stride, self.max_pixels, bucket_limit)


@dataclasses.dataclass(frozen=True)
class DatasetGroup:
    name: str
    paths: tuple[str, ...]
    is_mandatory: bool
    weight: float
    vae: TransformArgs
    vit: TransformArgs


def group_config(paths=(), is_mandatory: bool = False, weight: float = 0.0,
                 vae=(16, 1024, 512), vit=(14, 980, 378), max_pixels: int = DEFAULT_MAX_PIXELS):
    """One group entry of ``config.data.groups``; ``vae``/``vit`` are (stride, max_size, min_size)."""
    def t(args):
        s, mx, mn = args
        return ml_collections.ConfigDict({"stride": s, "max_size": mx, "min_size": mn, "max_pixels": max_pixels})
    return ml_collections.ConfigDict({"paths": tuple(paths), "is_mandatory": is_mandatory,
                                      "weight": float(weight), "vae_transform": t(vae), "vit_transform": t(vit)})


def _paths(data_root: str, name: str) -> tuple[str, ...]:
    return (os.path.join(data_root, name),) if data_root else ()


_STAGE1 = {IMPROVING_FULL: (True, 1.0), INITIAL_FULL: (True, 1.0),
           IMPROVING_THINKING_GENERATION: (True, 0.5), INITIAL_THINKING_GENERATION: (True, 0.5),
           IMPROVING_THINKING_UNDERSTANDING: (False, 0.5), INITIAL_THINKING_UNDERSTANDING: (False, 0.5)}


def stage1_groups(data_root: str = "", **transform_kw) -> ml_collections.ConfigDict:
    """All six modes; full and generation modes mandatory (``<data_root>/<mode>`` each)."""
    return ml_collections.ConfigDict({
        name: group_config(_paths(data_root, name), mandatory, weight, **transform_kw)
        for name, (mandatory, weight) in _STAGE1.items()})


def stage2_groups(data_root: str = "", **transform_kw) -> ml_collections.ConfigDict:
    """Only the two full modes, both mandatory with weight 1; the other four are unused."""
    out = {}
    for name in MODES:
        full = name in (IMPROVING_FULL, INITIAL_FULL)
        out[name] = group_config(_paths(data_root, name) if full else (), full, 1.0 if full else 0.0,
                                 **transform_kw)
    return ml_collections.ConfigDict(out)


def groups_from_config(groups_cfg) -> list[DatasetGroup]:
    """The used groups (non-empty ``paths``), in ``MODES`` order then by name."""
    names = sorted(groups_cfg.keys(), key=lambda n: (MODES.index(n) if n in MODES else len(MODES), n))
    if not any(groups_cfg[n].paths for n in names):
        raise ValueError("config.data.groups: no group has paths; set config.data.groups.<mode>.paths")
    out = []
    for name in names:
        g = groups_cfg[name]
        if not g.paths:
            if g.is_mandatory or g.weight:
                raise ValueError(f"config.data.groups.{name}: no paths, but is_mandatory/weight set")
            continue
        vae, vit = g.vae_transform, g.vit_transform
        out.append(DatasetGroup(
            name, tuple(g.paths), bool(g.is_mandatory), float(g.weight),
            TransformArgs(vae.stride, vae.max_size, vae.min_size, vae.max_pixels),
            TransformArgs(vit.stride, vit.max_size, vit.min_size, vit.max_pixels)))
    if sum(g.weight for g in out) <= 0:
        raise ValueError("config.data.groups: the weights of the used groups must sum to > 0")
    return out
