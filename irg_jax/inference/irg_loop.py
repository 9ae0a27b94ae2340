"""The IRG loop as one compiled program per bucket (spec §6.5, defaults §6.6).

For a batch of prompts (one cache row each):

    cond <- [SYS]                        turn-1 text-uncond context = this prefix
    cond <- [SYS, P];  T1 sampled into cond (canonical [bos] T1 [eos]), or prefilled when given
    I1 = flow(cond, text-uncond [SYS]; cfg_text 4, interval (0.4, 1], global renorm)
    for each refinement round r = 1 .. R (IRG: R = 1):
        cond <- I_r as clean VAE image (t = 0) and as ViT image   (decoded, re-encoded)
        text-uncond = cond now (everything but the coming reflection)
        T_{r+1} sampled into cond
        img-uncond = cond before I_r, plus [bos] T_{r+1} [eos]   (no image I_r)
        I_{r+1} = flow(cond, text-uncond, img-uncond; cfg_text 4, cfg_img 2, interval (0, 1],
                       text_channel renorm)
        (IRG starts I_{r+1} from noise at t = 1; ``refine_start`` s < 1 starts it from
        s·noise + (1 − s)·x(I_r) at t = s instead, x(I_r) being the re-encoded clean copy
        fed back above; a model trained with ``data.refine_bridge_start = s`` learned that path.)

Text-unconditional contexts are prefixes of the conditional cache, so they are the same
arrays with a shorter length (no copy until the branches are stacked for the sampler).
The branches are interleaved along the batch (row-major: a row's contexts stay on the device
holding the row) and evaluated in one forward per step. The loop is written as phases
(:func:`think_phase`, :func:`image_phase`, :func:`reflect_phase`, :func:`refine_phase`) that
``irg_jax.inference.plan`` also compiles one by one.

Static (part of the compiled bucket): batch size, prompt width, image size, num_steps,
max_think_tokens, top_k/top_p, renorm types, number of rounds. Traced: temperature,
timestep shift, CFG scales and intervals, renorm_min. There is no host round trip per
token or per denoising step: the whole loop is one ``jax.jit`` call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irg_jax.data.trajectories import SYSTEM_PROMPT_FULL
from irg_jax.inference import feedback, flow
from irg_jax.inference.placement import Placement, constrain_cache, constrain_rows, to_host
from irg_jax.inference.sampling import Generated, TextSampling, generate_segment
from irg_jax.model import kv_cache
from irg_jax.model.config import latent_token_dim
from irg_jax.model.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class TurnGuidance:
    text_scale: float
    img_scale: float
    interval: tuple[float, float]
    renorm: str  # 'global' | 'channel' | 'text_channel'


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """IRG's TIIF two-turn settings (spec §6.6) unless overridden."""

    image_size: tuple[int, int] = (1024, 1024)   # (H, W)
    num_steps: int = 50
    timestep_shift: float = 3.0
    max_think_tokens: int = 4096                 # decode steps incl. the start token (BAGEL's max_length)
    max_prompt_tokens: int = 256                 # prompt width of the bucket (longer prompts are an error)
    temperature: float = 0.3                     # <= 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    turn1: TurnGuidance = TurnGuidance(4.0, 1.0, (0.4, 1.0), "global")
    refine: TurnGuidance = TurnGuidance(4.0, 2.0, (0.0, 1.0), "text_channel")
    renorm_min: float = 0.0
    refine_start: float = 1.0                    # t where a refined image starts (1: from noise, IRG)
    refine_timestep_shift: float | None = None   # schedule shift of refined images (None: timestep_shift)
    num_refinements: int = 1
    system_prompt: str = SYSTEM_PROMPT_FULL
    vit_max_size: int | None = None              # ViT copy: IRG's 980 / 224, capped at the model's table
    vit_min_size: int | None = None

    def __post_init__(self):
        for name, turn in (("turn1", self.turn1), ("refine", self.refine)):
            if turn.renorm not in flow.RENORM_TYPES:
                raise ValueError(f"InferenceConfig.{name}.renorm={turn.renorm!r}: expected one of {flow.RENORM_TYPES}")
        if not 0.0 < self.refine_start <= 1.0:
            raise ValueError(f"refine_start must be in (0, 1], got {self.refine_start}")
        if self.num_refinements < 0:
            raise ValueError(f"num_refinements must be >= 0, got {self.num_refinements}")

    def static(self) -> "StaticSettings":
        return StaticSettings(tuple(self.image_size), self.num_steps, self.max_think_tokens, self.top_k,
                              float(self.top_p), self.turn1.renorm, self.refine.renorm, self.num_refinements,
                              self.vit_max_size, self.vit_min_size)

    def dynamic(self) -> "DynamicSettings":
        return DynamicSettings(
            temperature=jnp.float32(self.temperature), timestep_shift=jnp.float32(self.timestep_shift),
            turn1=flow.Guidance.make(self.turn1.text_scale, self.turn1.img_scale, self.turn1.interval,
                                     self.renorm_min),
            refine=flow.Guidance.make(self.refine.text_scale, self.refine.img_scale, self.refine.interval,
                                      self.renorm_min),
            refine_start=jnp.float32(self.refine_start),
            refine_shift=jnp.float32(self.timestep_shift if self.refine_timestep_shift is None
                                     else self.refine_timestep_shift))


class StaticSettings(NamedTuple):
    image_size: tuple[int, int]
    num_steps: int
    max_think_tokens: int
    top_k: int
    top_p: float
    turn1_renorm: str
    refine_renorm: str
    num_refinements: int
    vit_max_size: int | None
    vit_min_size: int | None


class DynamicSettings(NamedTuple):
    temperature: jax.Array
    timestep_shift: jax.Array
    turn1: flow.Guidance
    refine: flow.Guidance
    refine_start: jax.Array
    refine_shift: jax.Array


class Turn(NamedTuple):
    think: Generated     # ids [B, max_think_tokens - 1], length [B], ended [B]
    image: jax.Array     # uint8 [B, H, W, 3]
    latents: jax.Array   # float32 [B, N, D_lat] sampled latent tokens


# ------------------------------------------------------------------------------ pieces

def cache_capacity(model_cfg, static: StaticSettings, sys_width: int, prompt_width: int) -> int:
    grid = feedback.image_grid(model_cfg, *static.image_size, static.vit_max_size, static.vit_min_size)
    think = static.max_think_tokens + 1  # [bos] up to max-1 ids [eos]
    per_round = grid.num_latent_tokens + 2 + (grid.num_vit_tokens + 2 if model_cfg.vit.enabled else 0) + think
    return sys_width + prompt_width + think + static.num_refinements * per_round


def prefix_view(cache: KVCache, length: jax.Array, rope: jax.Array) -> KVCache:
    """The same cache read as its first ``length`` slots (an earlier context; no copy)."""
    return KVCache(cache.keys, cache.values, length, rope)


def stack_branches(caches: list[KVCache]) -> KVCache:
    """Interleave caches along the batch, row-major (row b's K contexts at rows b*K .. b*K+K-1), for
    one forward over all branches; a row's contexts stay on the device that holds the row."""
    if len(caches) == 1:
        return caches[0]

    def interleave(parts, axis):
        x = jnp.stack(parts, axis=axis + 1)
        return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])

    return KVCache(*(interleave(parts, ax) for parts, ax in zip(zip(*caches), (1, 1, 0, 0))))


def canonical_segment(gen: Generated, bos: int, eos: int) -> tuple[jax.Array, jax.Array]:
    """[bos] ids [eos] right-padded: (ids [B, max+1], num_valid [B])."""
    b, width = gen.ids.shape
    col = jnp.arange(width + 2)[None]
    body = jnp.pad(gen.ids, ((0, 0), (1, 1)))
    seg = jnp.where(col == 0, bos, jnp.where(col == gen.length[:, None] + 1, eos, body))
    seg = jnp.where(col <= gen.length[:, None] + 1, seg, 0)
    return seg.astype(jnp.int32), gen.length + 2


def generate_latents(model, branches: list[KVCache], noise: jax.Array, pos_ids: jax.Array, *, num_steps: int,
                     shift, guidance: flow.Guidance, renorm_type: str, record: bool = False, t_start=1.0):
    """Sample latent tokens [B, N, D_lat] against 1-3 contexts [cond, text-uncond, img-uncond]."""
    stacked = constrain_cache(stack_branches(branches))
    k = len(branches)
    pos_all = jnp.repeat(pos_ids, k, axis=0)

    def velocity_all(x, t):
        return constrain_rows(kv_cache.query_noisy_latents(model, stacked, x, t, pos_all))

    def velocity_cond(x, t):
        return constrain_rows(kv_cache.query_noisy_latents(model, branches[0], x, t, pos_ids))

    return flow.sample(constrain_rows(noise), num_steps=num_steps, shift=shift, num_branches=k,
                       velocity_all=velocity_all, velocity_cond=velocity_cond, guidance=guidance,
                       renorm_type=renorm_type, record=record, t_start=t_start)


def _row_keys(keys: jax.Array, purpose: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, purpose))(keys)


def _row_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return constrain_rows(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys))


# ------------------------------------------------------------------------------ the loop, phase by phase

def given_think(model_cfg, seg_ids: jax.Array, seg_len: jax.Array, max_tokens: int) -> Generated:
    """A think supplied as ``[bos] ids [eos]`` segments, shaped like a sampled one."""
    body = seg_ids[:, 1:max_tokens]
    length = seg_len - 2
    body = jnp.where(jnp.arange(body.shape[1])[None] < length[:, None], body, 0)
    body = jnp.pad(body, ((0, 0), (0, max_tokens - 1 - body.shape[1])))
    b = seg_ids.shape[0]
    return Generated(body.astype(jnp.int32), length.astype(jnp.int32), jnp.ones((b,), bool),
                     jnp.zeros((b, model_cfg.llm.vocab_size), jnp.float32))


class Prefix(NamedTuple):
    """Length and RoPE position of an earlier state of a cache (a text-unconditional context)."""

    length: jax.Array
    rope: jax.Array

    @staticmethod
    def of(cache: KVCache) -> "Prefix":
        return Prefix(cache.length, cache.rope)

    def view(self, cache: KVCache) -> KVCache:
        return prefix_view(cache, self.length, self.rope)


def _grid(model_cfg, static: StaticSettings) -> feedback.ImageGrid:
    return feedback.image_grid(model_cfg, *static.image_size, static.vit_max_size, static.vit_min_size)


def _positions(grid: feedback.ImageGrid, b: int) -> tuple[jax.Array, jax.Array]:
    return (jnp.broadcast_to(jnp.asarray(grid.latent_pos), (b, grid.num_latent_tokens)),
            jnp.broadcast_to(jnp.asarray(grid.vit_pos), (b, grid.num_vit_tokens)))


def think_phase(model, static: StaticSettings, dyn: DynamicSettings, sys_ids, sys_len, prompt_ids, prompt_len,
                row_keys, think1=None) -> tuple[KVCache, Prefix, Generated]:
    """Prefill [SYS, P] into a new cache, then sample (or prefill a given) think 1.

    Returns (cond cache, the [SYS]-only prefix = turn 1's text-uncond context, think 1)."""
    cfg = model.cfg
    capacity = cache_capacity(cfg, static, sys_ids.shape[1], prompt_ids.shape[1])
    cond = constrain_cache(kv_cache.init_cache(cfg, sys_ids.shape[0], capacity))
    cond, _ = kv_cache.append_text(model, cond, sys_ids, sys_len)
    sys_only = Prefix.of(cond)
    cond, _ = kv_cache.append_text(model, constrain_cache(cond), prompt_ids, prompt_len)
    if think1 is None:
        cond, think = generate_segment(model, constrain_cache(cond), _row_keys(row_keys, 0),
                                       max_tokens=static.max_think_tokens,
                                       settings=TextSampling(dyn.temperature, static.top_k, static.top_p))
    else:
        cond, _ = kv_cache.append_text(model, constrain_cache(cond), *think1)
        think = given_think(cfg, *think1, static.max_think_tokens)
    return constrain_cache(cond), sys_only, think


def image_phase(model, ae, static: StaticSettings, dyn: DynamicSettings, branches: list[KVCache], x_start,
                round_: int = 0) -> tuple[jax.Array, jax.Array]:
    """Sample one image per row against 2 (turn 1) or 3 (refinements) contexts and decode it.

    ``x_start``: x at t = 1 (turn 1), or at t = ``refine_start`` (refinements). Returns
    (latent tokens [B, N, D_lat] float32, uint8 images [B, H, W, 3])."""
    cfg = model.cfg
    grid = _grid(cfg, static)
    lat_pos, _ = _positions(grid, x_start.shape[0])
    if round_ == 0:
        latents = generate_latents(model, branches, x_start, lat_pos, num_steps=static.num_steps,
                                   shift=dyn.timestep_shift, guidance=dyn.turn1, renorm_type=static.turn1_renorm)
    else:
        latents = generate_latents(model, branches, x_start, lat_pos, num_steps=static.num_steps,
                                   shift=dyn.refine_shift, guidance=dyn.refine, renorm_type=static.refine_renorm,
                                   t_start=dyn.refine_start)
    latents = constrain_rows(latents)
    return latents, constrain_rows(feedback.to_uint8(feedback.decode_latents(ae, latents, grid, cfg)))


def reflect_phase(model, ae, static: StaticSettings, dyn: DynamicSettings, cond: KVCache, image: jax.Array,
                  row_keys, round_: int, reflection=None) -> tuple[KVCache, Prefix, jax.Array, Generated]:
    """Feed image r back (clean VAE copy, ViT copy) and sample the reflection, or prefill a given
    one (``reflection``: segments (ids [B, width], lengths [B]) as for a given think 1).

    Returns (cond cache, its prefix before the reflection = the text-uncond context, the
    fed-back latent tokens, the reflection)."""
    cfg = model.cfg
    grid = _grid(cfg, static)
    lat_pos, vit_pos = _positions(grid, image.shape[0])
    latent_hw = (grid.height // cfg.autoencoder.downsample, grid.width // cfg.autoencoder.downsample)
    eps = _row_normal(_row_keys(row_keys, 10 * round_ + 2), latent_hw + (cfg.autoencoder.z_channels,))
    fed_back = constrain_rows(feedback.vae_tokens(ae, image, eps, cfg))  # the clean copy of the previous image
    cond = constrain_cache(kv_cache.append_vae_image(model, cond, fed_back, lat_pos))
    if cfg.vit.enabled:
        cond = constrain_cache(kv_cache.append_vit_image(
            model, cond, feedback.vit_patches(image, grid, cfg.vit.patch_size), vit_pos))
    before_reflection = Prefix.of(cond)
    if reflection is not None:
        cond, _ = kv_cache.append_text(model, cond, *reflection)
        return constrain_cache(cond), before_reflection, fed_back, given_think(cfg, *reflection,
                                                                               static.max_think_tokens)
    cond, think = generate_segment(model, cond, _row_keys(row_keys, 10 * round_), max_tokens=static.max_think_tokens,
                                   settings=TextSampling(dyn.temperature, static.top_k, static.top_p))
    return constrain_cache(cond), before_reflection, fed_back, think


def refine_phase(model, ae, static: StaticSettings, dyn: DynamicSettings, cond: KVCache,
                 before_reflection: Prefix, before_image: KVCache, think: Generated, fed_back: jax.Array,
                 row_keys, round_: int) -> tuple[jax.Array, jax.Array]:
    """Image r + 1 against cond, text-uncond (cond without the reflection) and img-uncond
    (the context before image r, plus the reflection)."""
    cfg = model.cfg
    seg, seg_len = canonical_segment(think, cfg.special_ids.bos, cfg.special_ids.eos)
    img_uncond, _ = kv_cache.append_text(model, before_image, seg, seg_len)
    noise = _row_normal(_row_keys(row_keys, 10 * round_ + 1), fed_back.shape[1:])
    start = dyn.refine_start
    return image_phase(model, ae, static, dyn, [cond, before_reflection.view(cond), constrain_cache(img_uncond)],
                       start * noise + (1.0 - start) * fed_back, round_)


def irg_loop(model, ae, static: StaticSettings, dyn: DynamicSettings, sys_ids: jax.Array, sys_len: jax.Array,
             prompt_ids: jax.Array, prompt_len: jax.Array, row_keys: jax.Array,
             think1: tuple[jax.Array, jax.Array] | None = None) -> list[Turn]:
    """Run think -> image -> (feedback -> reflection -> image) x R for a batch; returns R + 1 turns.

    ``sys_ids`` / ``prompt_ids`` [B, width] hold full ``[bos] ids [eos]`` segments,
    right-padded, with lengths ``sys_len`` / ``prompt_len``; ``row_keys`` [B] PRNG keys.
    ``think1`` (optional): given think-1 segments (ids [B, width], lengths [B]) in the same
    form, prefilled instead of sampled (teacher forcing, e.g. to draw a record's plan).
    """
    cfg = model.cfg
    grid = _grid(cfg, static)
    cond, sys_only, think = think_phase(model, static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys,
                                        think1)
    noise = _row_normal(_row_keys(row_keys, 1), (grid.num_latent_tokens, latent_token_dim(cfg)))
    latents, image = image_phase(model, ae, static, dyn, [cond, sys_only.view(cond)], noise)
    turns = [Turn(think, image, latents)]
    for r in range(1, static.num_refinements + 1):
        before_image = cond
        cond, before_reflection, fed_back, think = reflect_phase(model, ae, static, dyn, cond, image, row_keys, r)
        latents, image = refine_phase(model, ae, static, dyn, cond, before_reflection, before_image, think, fed_back,
                                      row_keys, r)
        turns.append(Turn(think, image, latents))
    return turns


# ------------------------------------------------------------------------------ compiled entry point

class SharedLoop:
    """One ``jax.jit`` of :func:`irg_loop` for a model and autoencoder structure (graph
    definitions, no parameters); ``traces`` counts its traces over every program using it."""

    def __init__(self, model_graph, ae_graph):
        self.traces = 0

        def run(static: StaticSettings, model_state, ae_state, dyn, sys_ids, sys_len, prompt_ids, prompt_len,
                row_keys, think1=None):
            self.traces += 1  # runs at trace time only
            model = nnx.merge(model_graph, model_state)
            ae = nnx.merge(ae_graph, ae_state)
            return irg_loop(model, ae, static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1)

        self.jitted = jax.jit(run, static_argnums=(0,))


_SHARED_LOOPS: dict = {}


def shared_loop(model_graph, ae_graph, placement_key=None) -> SharedLoop:
    """The process-wide :class:`SharedLoop` for these graph definitions and placement (``(mesh,
    rules)`` or None): a new :class:`IRGProgram` (a new runner on the same export) reuses every
    bucket an earlier one compiled instead of tracing and compiling it again."""
    key = (model_graph, ae_graph, placement_key)
    if key not in _SHARED_LOOPS:
        _SHARED_LOOPS[key] = SharedLoop(model_graph, ae_graph)
    return _SHARED_LOOPS[key]


class IRGProgram:
    """``irg_loop`` compiled once per bucket for a fixed model and autoencoder.

    ``__call__(static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys)`` returns the
    list of :class:`Turn` (device arrays). ``num_traces`` counts the traces (each one a new
    compiled program) that this program's calls caused: one per distinct bucket (batch size,
    widths and static settings), none for a bucket that another program on the same model
    (equal graph definitions) and the same mesh and rules already compiled in this process —
    programs share their compiled code (:func:`shared_loop`), not their parameters.

    With a ``mesh`` (``irg_jax.parallel.mesh.build_mesh``) and the training ``rules``, the
    parameters are sharded by the rules, the rows split over the data axes (a batch the
    data-parallel size does not divide is padded with copies of its last row, and the
    padding dropped from the results) and the call runs under ``jax.set_mesh`` with the
    activation rules. The model and autoencoder may be abstract (``nnx.eval_shape``): then
    only :meth:`lower` works, on ``ShapeDtypeStruct`` inputs (planning, nothing allocated).
    """

    def __init__(self, model, ae, mesh: jax.sharding.Mesh | None = None, rules=None):
        self.model_graph, self.model_state = nnx.split(model)
        self.ae_graph, self.ae_state = nnx.split(ae)
        self.placement = None if mesh is None else Placement.make(mesh, rules)
        if self.placement is not None:
            self.model_state = self.placement.put_model_state(self.model_state)
            self.ae_state = self.placement.put_replicated(self.ae_state)
        self.num_traces = 0
        where = None if self.placement is None else (self.placement.mesh, self.placement.rules)
        self._shared = shared_loop(self.model_graph, self.ae_graph, where)

    def _call(self, method: str, args):
        before = self._shared.traces
        try:
            return getattr(self._shared.jitted, method)(*args)
        finally:
            self.num_traces += self._shared.traces - before

    def rows_for(self, batch: int) -> int:
        """Rows the compiled program runs for a batch of ``batch`` prompts (padding included)."""
        return batch if self.placement is None else self.placement.padded(batch)

    def _args(self, static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1):
        rows = (sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1)
        if self.placement is None:
            return (static, self.model_state, self.ae_state, dyn) + rows
        pl = self.placement
        if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rows)):
            rows = jax.tree.map(pl.pad_rows, rows)
        return (static, self.model_state, self.ae_state, pl.put_replicated(dyn)) + pl.put_rows(rows)

    def run_padded(self, static: StaticSettings, dyn: DynamicSettings, sys_ids, sys_len, prompt_ids, prompt_len,
                   row_keys, think1=None) -> list[Turn]:
        """Like ``__call__`` but returns all :meth:`rows_for` rows (padding rows last)."""
        args = self._args(static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1)
        if self.placement is None:
            return self._call("__call__", args)
        with self.placement.context():
            return self._call("__call__", args)

    def __call__(self, static: StaticSettings, dyn: DynamicSettings, sys_ids, sys_len, prompt_ids, prompt_len,
                 row_keys, think1=None) -> list[Turn]:
        turns = self.run_padded(static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1)
        n = np.shape(sys_ids)[0]
        if self.rows_for(n) == n:
            return turns
        return jax.tree.map(lambda x: x[:n], turns)

    def lower(self, static: StaticSettings, dyn: DynamicSettings, sys_ids, sys_len, prompt_ids, prompt_len, row_keys,
              think1=None):
        """Trace and lower without running (``.compile()`` the result to build the executable)."""
        args = self._args(static, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys, think1)
        if self.placement is None:
            return self._call("lower", args)
        with self.placement.context():
            return self._call("lower", args)


def encode_segments(tokenizer, texts: list[str], width: int, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """Tokenise texts as right-padded ``[bos] ids [eos]`` rows of ``width`` (host side)."""
    ids = np.zeros((len(texts), width), np.int32)
    lens = np.zeros((len(texts),), np.int32)
    for i, text in enumerate(texts):
        seg = [tokenizer.bos_id] + list(tokenizer.encode(text)) + [tokenizer.eos_id]
        if len(seg) > width:
            raise ValueError(f"{what} {i} has {len(seg) - 2} tokens; the bucket allows {width - 2} "
                             f"(raise max_prompt_tokens): {text[:80]!r}")
        ids[i, :len(seg)] = seg
        lens[i] = len(seg)
    return ids, lens


def row_keys_for(seed: int, indices: list[int]) -> jax.Array:
    """Per-row PRNG keys: fold_in(key(seed), global index) — independent of batch composition."""
    base = jax.random.key(seed)
    return jnp.stack([jax.random.fold_in(base, int(i)) for i in indices])


def as_host(turns: list[Turn]) -> list[dict[str, Any]]:
    """Turns as numpy dicts (rows on other hosts gathered: every process gets all rows)."""
    return [jax.tree.map(np.asarray, t._asdict()) for t in to_host(turns)]
