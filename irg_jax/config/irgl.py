"""IRGL stage-1 / stage-2 training configs (mirroring IRG's run scripts, spec §4.6-4.8).

``configs/irgl_stage1.py`` and ``configs/irgl_stage2.py`` call :func:`irgl_config`. The
argument string picks a variant and optional paths: ``"<variant>[,data_root=DIR][,init_from=DIR]"``
with variant ``bagel_7b_mot`` (default), ``demo`` (the CPU demo) or ``tiny`` (tests).
"""
from __future__ import annotations

import ml_collections

from irg_jax.config.schema import base_config
from irg_jax.data.trajectories import SYSTEM_PROMPT_SHORT
from irg_jax.data.config import default_data_config
from irg_jax.data.mixture import stage1_groups, stage2_groups
from irg_jax.model import config as model_configs

VARIANTS = ("bagel_7b_mot", "demo", "tiny")
# The demo world's WordTokenizer puts <unk> at 0 and the four special tokens at 1..4.
WORD_TOKENIZER_SPECIAL_IDS = dict(bos=1, eos=2, start_of_image=3, end_of_image=4)


def parse_arg(arg: str | None) -> tuple[str, dict[str, str]]:
    parts = [p for p in (arg or "").split(",") if p]
    variant = "bagel_7b_mot"
    if parts and "=" not in parts[0]:
        variant = parts.pop(0)
    if variant not in VARIANTS:
        raise ValueError(f"config arg: unknown variant {variant!r}; choose one of {VARIANTS}")
    kv = {}
    for p in parts:
        k, sep, v = p.partition("=")
        if not sep or k not in ("data_root", "init_from", "tokenizer"):
            raise ValueError(f"config arg: expected data_root=, init_from= or tokenizer=, got {p!r}")
        kv[k] = v
    return variant, kv


def _small_model(vocab_size: int, layers: int, hidden: int, mlp: int) -> ml_collections.ConfigDict:
    m = model_configs.demo(vocab_size=vocab_size)
    m.llm.num_layers, m.llm.hidden_size, m.llm.intermediate_size = layers, hidden, mlp
    m.llm.head_dim = hidden // m.llm.num_heads
    m.special_ids = ml_collections.ConfigDict(WORD_TOKENIZER_SPECIAL_IDS)
    return m


def _small_data(stage: int, data_root: str, image: int, und_len: int, gen_len: int, vit_len: int,
                ce_len: int, images: int, model) -> ml_collections.ConfigDict:
    d = default_data_config()
    stride = model.autoencoder.downsample * model.latent.patch_size
    vit_patch = model.vit.patch_size
    groups = stage1_groups if stage == 1 else stage2_groups
    d.groups = groups(data_root, vae=(stride, image, image), vit=(vit_patch, image, image))
    d.tokenizer_path = data_root
    d.pack = ml_collections.ConfigDict({
        "und_len": und_len, "gen_len": gen_len, "vit_len": vit_len, "ce_len": ce_len,
        "num_vae_images": images, "image_buckets": ((image, image),)})
    d.max_num_tokens = und_len + gen_len
    d.expected_num_tokens = int(0.9 * d.max_num_tokens)
    d.max_num_tokens_per_sample = d.max_num_tokens
    d.prefer_buffer_before = d.max_num_tokens // 2
    d.vae_downsample = model.autoencoder.downsample
    d.latent_patch_size = model.latent.patch_size
    d.vit_patch_size = vit_patch
    d.max_latent_size = model.latent.max_latent_size
    d.vit_max_patches_per_side = model.vit.max_patches_per_side
    d.timestep_shift = model.latent.timestep_shift
    d.read_threads = 1
    d.prefetch_batches = 1
    return d


def _generation_only(groups) -> None:
    """The demo's stage-1 mixture: the two initial generation modes (learn image 1 from a plan).

    IRG's stage 1 opens every pack with one sample of each generation mode and spends most of
    a small pack's tokens on text. Turn 1 (the demo's first score) is learned by the initial
    modes; the demo's model starts from scratch and within its budget is still learning to draw,
    so its stage 1 trains the modes that draw most images per token: initial thinking-generation
    (the plan given, image 1 learned) and initial full (the plan learned too, which the model
    writes itself at inference), one of each per pack and then 1 : 1. Stage 2 trains the two full
    modes (think, image 1, reflection, image 2). Both modes have the same shape (64 image tokens
    and at most ~45 text tokens), so ten samples fill a 448 + 640-token pack. bench/demo_images.py, same session:
    40 generation-target images per step of 4 packs at 0.47-0.52 s (the previous mixture,
    thinking-generation 6 : full 1 with the improving and understanding modes at 0.1-0.5:
    34 at 0.53 s; with only 7% of the samples from those other modes, 36.5 at 0.51 s: mixed
    sample lengths leave 13% of the pack empty instead of 5%)."""
    kept = ("initial_thinking_generation_learning", "initial_full_learning")
    for name, group in groups.items():
        group.is_mandatory, group.weight = name in kept, 1.0 if name in kept else 0.0
        if name not in kept:
            group.paths = ()


def irgl_config(stage: int, arg: str | None) -> ml_collections.ConfigDict:
    variant, kv = parse_arg(arg)
    c = base_config()
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 500 if stage == 1 else 0
    c.ema.decay = 0.995
    if variant == "bagel_7b_mot":
        c.model = model_configs.bagel_7b_mot()
        c.data = default_data_config()
        c.data.groups = (stage1_groups if stage == 1 else stage2_groups)(kv.get("data_root", ""))
        c.data.tokenizer_path = kv.get("tokenizer", kv.get("init_from", ""))
        c.batch_size = 8          # one ~40k-token pack per GPU, as IRG's 8-GPU runs
        c.total_steps = 30000
        c.log_every = 1
        c.checkpoint_every = 1000
    else:
        small = dict(demo=dict(layers=4, hidden=128, mlp=384), tiny=dict(layers=2, hidden=64, mlp=128))[variant]
        c.model = _small_model(vocab_size=256, **small)
        # From scratch, a tiny model needs a time signal it can read: t * 1000 before the sinusoid
        # features (BAGEL feeds t in [0, 1], where only the lowest frequencies move), and IRG's
        # stage-1 shift 4, which puts most training timesteps in the noisy range where the image
        # has to come from the text.
        c.model.latent.time_scale = 1000.0
        c.model.latent.timestep_shift = 4.0
        # Demo packs (1,088 tokens): stage 1 is generation only (below), so its packs give the
        # generation expert 640 tokens (10 images of 64 tokens); stage 2's full-mode samples carry
        # a reflection each, so its packs keep 640 understanding + 448 generation tokens.
        budgets = dict(demo=dict(und_len=448 if stage == 1 else 640, gen_len=640 if stage == 1 else 448,
                                 vit_len=96, ce_len=320, images=10 if stage == 1 else 8),
                       tiny=dict(und_len=576, gen_len=384, vit_len=64, ce_len=256, images=8))[variant]
        c.data = _small_data(stage, kv.get("data_root", ""), 32, model=c.model, **budgets)
        if variant == "demo" and stage == 1:
            _generation_only(c.data.groups)
        if "tokenizer" in kv:
            c.data.tokenizer_path = kv["tokenizer"]
        # Block-sparse attention: small blocks let the packed step skip the blocks between the
        # demo's short documents (bench/demo_images.py: 32-token blocks ran the demo's stage-1 step
        # 1.3-1.4x faster than 128-token blocks, and 128 was 3.7x faster than 512).
        c.model.attention.block_q = c.model.attention.block_k = 32 if variant == "demo" else 128
        # Trained from scratch, the demo needs an unconditional branch for CFG (IRG fine-tunes
        # BAGEL, which learned one in pre-training, so IRG's own text dropout is 0).
        c.data.text_cond_dropout_prob = 0.1
        # Stage 1 at 5e-3 with 4 packs per step (about 1 s per step on 2 cores). Measured with
        # irg_jax.synthetic.conditioning_probe (the share of the image variance explained at t = 0.8):
        # 8 packs at 2e-3 for 400 steps stayed on the plateau where the model draws the average
        # image (gain 0.03-0.05, MSE 0.19); 4 packs at 5e-3 leave it after about 300 steps (a 1200-step
        # run: MSE 0.165 at step 400, gain 0.61 and MSE 0.084 at the end; the demo's 850 steps:
        # gain 0.36, MSE 0.099). Stage 2 keeps 1e-3 although
        # the fresh Adam state spikes the MSE on its first steps: 150 steps at 3e-4 left turn 2
        # below turn 1.
        c.optim.lr = (5e-3 if stage == 1 else 1e-3) if variant == "demo" else 3e-3
        c.optim.warmup_steps = 50 if stage == 1 else 0
        c.optim.schedule = "cosine" if variant == "demo" else "constant"
        c.ema.decay = 0.99
        c.ema.warmup = True  # from scratch: do not average the random initialisation into the export
        c.batch_size = 4 if variant == "demo" else 8
        c.total_steps = 600 if variant == "demo" else 20
        c.log_every = 10 if variant == "demo" else 2
        c.checkpoint_every = 200 if variant == "demo" else 10
        c.checkpoint.keep = 2
        c.sampling.prompts = ("a red circle", "two blue squares", "a green triangle above a yellow circle",
                              "a blue square left of a red triangle")
        c.sampling.image_size = 32
        c.sampling.system_prompt = SYSTEM_PROMPT_SHORT
    if "init_from" in kv:
        c.checkpoint.init_from = kv["init_from"]
        c.checkpoint.init_from_kind = "params" if stage == 1 else "train_state"
    return c
