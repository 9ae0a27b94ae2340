"""Sample grids during training: the IRG loop on a few fixed prompts with the current EMA.

Enabled by ``config.sample_every > 0``; prompts and sampler settings come from
``config.sampling``. Each call writes ``WORKDIR/samples/step_<N>.png`` (one row per prompt:
image 1, image 2, the prompt) and the same picture to TensorBoard. The compiled IRG program
is built once; later calls only swap in the new parameters (no recompilation).
Single-host only (the generated images are fetched to the host).
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image, ImageDraw

from irg_jax.inference.irg_loop import InferenceConfig, TurnGuidance
from irg_jax.inference.runner import IRGRunner, default_image_size


class TrainingSamples:
    def __init__(self, config, bundle, tokenizer, workdir: str, writer):
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
        self.bundle, self.tokenizer, self.writer = bundle, tokenizer, writer
        self.directory = pathlib.Path(workdir) / "samples"
        self.runner: IRGRunner | None = None

    def __call__(self, step: int, params) -> pathlib.Path:
        model = self.bundle.module(params)
        if self.runner is None:
            self.runner = IRGRunner(model, self.bundle.autoencoder, self.tokenizer, self.inference,
                                    batch_size=len(self.prompts))
        else:
            self.runner.program.model_state = nnx.split(model)[1]
        results = self.runner.run_batch(self.prompts, list(range(len(self.prompts))), self.seed)
        grid = _grid([[t.image for t in r.turns] for r in results], self.prompts)
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
