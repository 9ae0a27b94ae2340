"""Sample grids during training: the IRG loop on a few fixed prompts with the current EMA.

Enabled by ``config.sample_every > 0``; prompts and sampler settings come from
``config.sampling``. Each call writes ``WORKDIR/samples/step_<N>.png`` (one row per prompt:
image 1, image 2, the prompt) and the same picture to TensorBoard. The compiled IRG program
is built once; later calls only swap in the new parameters (no recompilation).

Multi-process: every process calls it. The IRG program runs on the training mesh with the
parameters as they are sharded; its inputs become replicated global arrays and its outputs
come back replicated, so every process can read the images; only process 0 writes them.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw

from irg_jax import runtime
from irg_jax.inference import irg_loop
from irg_jax.inference.irg_loop import InferenceConfig, TurnGuidance
from irg_jax.inference.runner import default_image_size


class MeshProgram:
    """``irg_loop`` compiled for the training mesh, runnable by every process of a
    multi-controller run: arrays already on the mesh (the parameters) keep their sharding,
    every other input (token ids, PRNG keys, settings, the model's constant tables, the frozen
    autoencoder) becomes a replicated global array, and every output is replicated."""

    def __init__(self, model, ae, static: irg_loop.StaticSettings, mesh: jax.sharding.Mesh):
        self._replicated = NamedSharding(mesh, P())
        self.model_graph, model_state = nnx.split(model)
        self.model_state = self._global(model_state)
        self.ae_graph, ae_state = nnx.split(ae)
        self.ae_state = self._global(ae_state)
        self.static = static
        self._jitted = runtime.SyncedJit(jax.jit(self._run, out_shardings=self._replicated), "samples")

    @property
    def num_compiled(self) -> int:
        return self._jitted.num_compiled

    def set_model(self, model) -> None:
        """Swap in new parameters (same structure and shardings: no recompilation)."""
        self.model_state = self._global(nnx.split(model)[1])

    def _global(self, tree: Any) -> Any:
        def leaf(x):
            if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
                return x
            host = np.asarray(x)  # the same value on every process
            return jax.make_array_from_callback(host.shape, self._replicated, lambda index: host[index])
        return jax.tree.map(leaf, tree)

    def _run(self, model_state, ae_state, dyn, sys_ids, sys_len, prompt_ids, prompt_len, key_data):
        model = nnx.merge(self.model_graph, model_state)
        ae = nnx.merge(self.ae_graph, ae_state)
        return irg_loop.irg_loop(model, ae, self.static, dyn, sys_ids, sys_len, prompt_ids, prompt_len,
                                 jax.random.wrap_key_data(key_data))

    def __call__(self, dyn, sys_ids, sys_len, prompt_ids, prompt_len, row_keys) -> list[irg_loop.Turn]:
        inputs = self._global((dyn, sys_ids, sys_len, prompt_ids, prompt_len, jax.random.key_data(row_keys)))
        return self._jitted(self.model_state, self.ae_state, *inputs)


class TrainingSamples:
    def __init__(self, config, bundle, tokenizer, workdir: str, writer, mesh: jax.sharding.Mesh):
        s = config.sampling
        if not s.prompts:
            raise ValueError("config.sampling.prompts is empty but config.sample_every > 0")
        size = s.image_size or default_image_size(config.model)
        self.inference = InferenceConfig(
            image_size=(size, size), num_steps=s.num_steps, max_think_tokens=s.max_think_tokens,
            timestep_shift=config.model.latent.timestep_shift,
            turn1=TurnGuidance(s.cfg_text, 1.0, (0.0, 1.0), "global"),
            refine=TurnGuidance(s.cfg_text, s.cfg_img, (0.0, 1.0), "text_channel"),
            system_prompt=s.system_prompt or InferenceConfig.system_prompt)
        self.prompts, self.seed = list(s.prompts), config.seed
        self.bundle, self.tokenizer, self.writer, self.mesh = bundle, tokenizer, writer, mesh
        self.directory = pathlib.Path(workdir) / "samples"
        self.program: MeshProgram | None = None
        # The prompts as the IRG runner encodes them: [bos] ids [eos] rows, one PRNG key per row.
        n, sys_prompt = len(self.prompts), self.inference.system_prompt
        sys_ids, sys_len = irg_loop.encode_segments(tokenizer, [sys_prompt], len(tokenizer.encode(sys_prompt)) + 2,
                                                    "system prompt")
        self._inputs = (np.repeat(sys_ids, n, 0), np.repeat(sys_len, n, 0)) + irg_loop.encode_segments(
            tokenizer, self.prompts, self.inference.max_prompt_tokens + 2)

    def __call__(self, step: int, params) -> pathlib.Path | None:
        """Run the prompts with ``params`` (every process); process 0 writes the grid and returns its path."""
        model = self.bundle.module(params)
        if self.program is None:
            self.program = MeshProgram(model, self.bundle.autoencoder, self.inference.static(), self.mesh)
        else:
            self.program.set_model(model)
        turns = self.program(self.inference.dynamic(), *self._inputs,
                             irg_loop.row_keys_for(self.seed, list(range(len(self.prompts)))))
        images = [np.asarray(t.image) for t in turns]  # replicated: every process holds them
        if not runtime.is_primary():
            return None
        grid = _grid([[im[i] for im in images] for i in range(len(self.prompts))], self.prompts)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:07d}.png"
        Image.fromarray(grid).save(path)
        self.writer.write_image(step, "samples", grid)
        logging.info("step %d: sample grid written to %s", step, path)
        return path


def _grid(images: list[list[np.ndarray]], prompts: list[str], scale: int = 4, text_w: int = 260) -> np.ndarray:
    """Rows of [image per turn ... | prompt], images upscaled (nearest) by ``scale``."""
    h, w = images[0][0].shape[:2]
    cell_h, cell_w = h * scale, w * scale
    turns = len(images[0])
    canvas = Image.new("RGB", (turns * (cell_w + 4) + text_w, len(images) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, prompt) in enumerate(zip(images, prompts)):
        y = r * (cell_h + 4)
        for c, img in enumerate(row):
            canvas.paste(Image.fromarray(np.asarray(img)).resize((cell_w, cell_h), Image.NEAREST), (c * (cell_w + 4), y))
        draw.text((turns * (cell_w + 4) + 4, y + 4), prompt[:40], fill="black")
    return np.asarray(canvas)
