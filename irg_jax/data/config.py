"""``config.data``: every data-pipeline setting, its IRG default, and its validation.

Defaults follow IRG's stage-1 run (spec §4.6-4.8): packs of ~40k tokens, single samples up
to 32768, CFG dropout text 0 / ViT 0 / VAE-condition 0.3, timestep shift 4, latent table
64 per side, ViT table 70 per side. The static budgets (``pack.*``) are ours: every pack is
padded to them, and VAE images to one of ``pack.image_buckets`` (at most 4 shapes).
"""
from __future__ import annotations

import ml_collections

from irg_jax.data import packed_batch as pb
from irg_jax.data.mixture import groups_from_config, stage1_groups
from irg_jax.data.pack_policy import PackingPolicy
from irg_jax.data.packing import PackingRules

MAX_BUCKETS = 4


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tokenizer_path = ""  # model dir with tokenizer.json[.gz], or a WordTokenizer vocab JSON
    c.groups = stage1_groups("")
    c.pack = ml_collections.ConfigDict({
        "und_len": 24576,       # text + image-marker + ViT tokens per pack
        "gen_len": 20480,       # VAE latent tokens per pack
        "vit_len": 16384,       # ViT patches per pack
        "ce_len": 8192,         # CE positions per pack
        "num_vae_images": 16,   # VAE images per pack (noisy and clean copies count separately)
        "image_buckets": ((512, 512), (768, 768), (1024, 1024)),  # (H, W); the largest holds all
    })
    # IRG's packing policy (``PackedDataset``), in tokens of the logical sequence.
    c.expected_num_tokens = 40000
    c.max_num_tokens = 40000
    c.max_num_tokens_per_sample = 32768
    c.prefer_buffer_before = 16384
    c.max_buffer_size = 50
    # CFG condition dropout and flow time shift.
    c.text_cond_dropout_prob = 0.0
    c.vit_cond_dropout_prob = 0.0
    c.vae_cond_dropout_prob = 0.3
    c.timestep_shift = 4.0
    # Refinement bridge (ours; 1 = off, IRG): image 2 trained on the path from image 1 that
    # inference's ``refine_start`` of the same value follows (see irg_jax.data.packing).
    c.refine_bridge_start = 1.0
    c.refine_bridge_shift = 1.0   # timestep shift of bridged targets
    # Geometry shared with the model.
    c.vae_downsample = 8
    c.latent_patch_size = 2
    c.vit_patch_size = 14
    c.max_latent_size = 64
    c.vit_max_patches_per_side = 70
    # Input pipeline.
    c.num_workers = 0           # Grain worker processes (0: build packs in the main process)
    c.worker_buffer_size = 2    # packs buffered per worker
    c.read_threads = 2          # threads decoding rows ahead, per group
    c.prefetch_batches = 2      # batches prefetched by a background thread (0: none)
    c.row_group_cache_size = 4
    c.max_image_pixels = 200_000_000
    c.fail_fast = False         # True: the first bad row raises instead of being skipped
    return c


def vae_stride(data) -> int:
    return int(data.vae_downsample * data.latent_patch_size)


def budgets_from_config(data) -> tuple[pb.PackBudgets, ...]:
    """One :class:`PackBudgets` per image bucket, smallest area first."""
    p = data.pack
    buckets = sorted((tuple(int(x) for x in b) for b in p.image_buckets), key=lambda b: b[0] * b[1])
    return tuple(pb.PackBudgets(p.und_len, p.gen_len, p.vit_len, p.ce_len, p.num_vae_images, b,
                                3 * data.vit_patch_size ** 2) for b in buckets)


def rules_from_config(data, tokenizer) -> PackingRules:
    return PackingRules(
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        start_of_image_id=tokenizer.start_of_image_id, end_of_image_id=tokenizer.end_of_image_id,
        vit_patch_size=data.vit_patch_size, vae_stride=vae_stride(data), max_latent_size=data.max_latent_size,
        vit_max_patches_per_side=data.vit_max_patches_per_side,
        text_cond_dropout_prob=data.text_cond_dropout_prob, vit_cond_dropout_prob=data.vit_cond_dropout_prob,
        vae_cond_dropout_prob=data.vae_cond_dropout_prob, timestep_shift=data.timestep_shift,
        refine_bridge_start=data.refine_bridge_start, refine_bridge_shift=data.refine_bridge_shift)


def policy_from_config(data) -> PackingPolicy:
    return PackingPolicy(data.expected_num_tokens, data.max_num_tokens, data.max_num_tokens_per_sample,
                         data.prefer_buffer_before, data.max_buffer_size)


def check_data_config(data, model=None, error=ValueError) -> None:
    """Raise ``error(key, reason)`` (or ``ValueError``) on the first inconsistent setting.

    ``model`` is accepted for cross-checks with the model config; none are made yet."""
    def fail(key, reason):
        if error is ValueError:
            raise ValueError(f"config.data.{key}: {reason}")
        raise error(f"data.{key}", reason)

    stride = vae_stride(data)
    buckets = [tuple(b) for b in data.pack.image_buckets]
    if not 1 <= len(buckets) <= MAX_BUCKETS:
        fail("pack.image_buckets", f"need 1..{MAX_BUCKETS} buckets, got {len(buckets)}")
    for b in buckets:
        if len(b) != 2 or any(int(x) <= 0 or int(x) % stride for x in b):
            fail("pack.image_buckets", f"bucket {b} must be (H, W), positive multiples of the VAE stride {stride}")
        if max(b) // stride > data.max_latent_size:
            fail("pack.image_buckets", f"bucket {b} has {max(b) // stride} latent tokens per side "
                 f"> max_latent_size {data.max_latent_size}")
    big = max(buckets, key=lambda b: b[0] * b[1])
    for b in buckets:
        if b[0] > big[0] or b[1] > big[1]:
            fail("pack.image_buckets", f"the largest bucket {big} must contain every other one, not {b}")
    for key in ("und_len", "gen_len", "vit_len", "ce_len", "num_vae_images"):
        if data.pack[key] <= 0:
            fail(f"pack.{key}", "must be positive")
    for key in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
        if not 0.0 <= data[key] <= 1.0:
            fail(key, f"must be in [0, 1], got {data[key]}")
    for key in ("timestep_shift", "refine_bridge_shift"):
        if data[key] <= 0:
            fail(key, "must be positive")
    if not 0.0 < data.refine_bridge_start <= 1.0:
        fail("refine_bridge_start", f"must be in (0, 1], got {data.refine_bridge_start}")
    if data.max_num_tokens_per_sample > data.max_num_tokens:
        fail("max_num_tokens_per_sample", "must not exceed max_num_tokens")
    if data.expected_num_tokens > data.max_num_tokens:
        fail("expected_num_tokens", "must not exceed max_num_tokens")
    if data.num_workers < 0 or data.read_threads < 0 or data.prefetch_batches < 0:
        fail("num_workers", "num_workers, read_threads and prefetch_batches must be >= 0")
    try:
        groups = groups_from_config(data.groups)
    except ValueError as e:
        fail("groups", str(e).removeprefix("config.data.groups").lstrip(".: "))
    for g in groups:
        if g.vae.stride != stride:
            fail(f"groups.{g.name}.vae_transform.stride", f"{g.vae.stride} != VAE stride {stride}")
        if g.vit.stride != data.vit_patch_size:
            fail(f"groups.{g.name}.vit_transform.stride", f"{g.vit.stride} != vit_patch_size {data.vit_patch_size}")
        if g.vit.max_size // g.vit.stride > data.vit_max_patches_per_side:
            fail(f"groups.{g.name}.vit_transform.max_size",
                 f"{g.vit.max_size}/{g.vit.stride} patches per side > vit_max_patches_per_side "
                 f"{data.vit_max_patches_per_side}")
