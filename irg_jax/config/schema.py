"""The training config schema: every key a training config may have, with its default.

Config files under ``configs/`` start from :func:`base_config` and change values; they
never add keys. :func:`irg_jax.config.validate` rejects a config whose key set differs
from this schema, naming the key.
"""
from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes. FSDP by default: weights shard their "embed" dimension over
# ``fsdp``; head / MLP / vocab dimensions go to ``tensor`` (a size-1 axis is ignored, so
# FSDP+tensor parallelism is just a mesh edit such as ``mesh.tensor=2``).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vit_heads", "tensor"),
    ("mlp", "tensor"),
    ("vit_mlp", "tensor"),
    ("vocab", "tensor"),
)
# Weights shard over both axes (tensor takes heads/MLP, fsdp the rest) and activations
# keep their hidden dimension replicated; used by bigger models on a 2-D mesh.
FSDP_TENSOR_RULES = DEFAULT_RULES + (("length", None),)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8  # global packs per step
    c.log_every = 10
    c.checkpoint_every = 500
    c.sample_every = 0  # 0: no sample grids during training
    # What a sample grid shows (irg_jax.train.samples): the IRG loop on these prompts with the EMA.
    c.sampling = ml_collections.ConfigDict({
        "prompts": (), "image_size": 0, "num_steps": 10, "max_think_tokens": 64,
        "cfg_text": 1.0, "cfg_img": 1.0, "system_prompt": "",
    })

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # A parameter over this size that the rules shard on a dimension the mesh does not divide
    # is a start-up error naming it (None: no limit); smaller ones are replicated and logged.
    c.sharding = ml_collections.ConfigDict({"rules": DEFAULT_RULES, "max_unshardable_mib": 16.0})

    c.optim = ml_collections.ConfigDict({
        "lr": 2e-5, "schedule": "constant", "warmup_steps": 0, "min_lr": 1e-7,
        "b1": 0.9, "b2": 0.95, "eps": 1e-15, "weight_decay": 0.0,
        "clip_norm": 1.0, "grad_accum_steps": 1,
    })
    # warmup: decay min(decay, (1 + step) / (10 + step)) (for runs from scratch; BAGEL/IRG: off)
    c.ema = ml_collections.ConfigDict({"enabled": True, "decay": 0.995, "warmup": False})
    c.loss = ml_collections.ConfigDict({
        "ce_weight": 1.0, "mse_weight": 1.0,
        "text_loss_disable_step": -1, "image_loss_disable_step": -1,  # -1: never
    })
    c.freeze = ml_collections.ConfigDict({
        "llm": False, "vit": False, "und_expert": False, "gen_expert": False,
        # IRG's step-triggered variants (-1: never), applied with real parameter masks.
        "llm_step": -1, "text_experts_step": -1, "vit_step": -1, "image_experts_step": -1,
    })
    c.checkpoint = ml_collections.ConfigDict({
        "keep": 3, "async_save": True,
        "init_from": "",       # path: a converted BAGEL checkpoint or a stage-1 export
        "init_from_kind": "",  # "params" (converted/exported params) or "train_state" (EMA of a run)
    })
    c.nan_guard = ml_collections.ConfigDict({"max_consecutive": 5})
    return c
