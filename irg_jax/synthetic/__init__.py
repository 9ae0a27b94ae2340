"""The synthetic world: the embedded default the demo trains on, and everything that reads it.

Flat coloured shapes on a white canvas, with prompts whose every constraint a program can
check, so IRG can be trained and scored on a laptop. The map, in the order the data flows
(``[-m]``: runs as ``python -m irg_jax.synthetic.<module> --help``):

- ``scenes``               palette, shapes and sizes; draws a scene.
- ``prompts``              ``PromptSpec``: GenEval-style prompt categories and the space of them.
- ``text``                 think-1 plans and four-section reflections, from templates.
- ``world`` [-m]           trajectories (plan, image 1 maybe with a defect, reflection, image 2);
                           writes the six IRGL mode datasets and the held-out prompts.
- ``verify/`` [-m]         the verifier: parses an image into shapes and checks the prompt;
                           scores a folder of ``irg_jax.generate`` results.
- ``own_images`` [-m]      improving-mode data from the model's own first images.
- ``given_reflection`` [-m] turn 2 with the verifier's findings given as the reflection.
- ``conditioning_probe`` [-m] how much of its image a trained model takes from its context.
- ``demo`` [-m]            ``make demo``: world, two training stages, generation, verification, report.

This package sits above the generic layers: it imports ``irg_jax.data`` (the mode-dataset
writer, the word tokenizer), ``irg_jax.model``, ``irg_jax.inference`` and ``irg_jax.config``,
and none of them imports it back. Nothing is imported here, so ``--help`` stays fast.
"""
