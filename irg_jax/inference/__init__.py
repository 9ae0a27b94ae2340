"""XLA-compiled IRG inference: text decoding, the flow sampler with IRG's CFG, and the IRG loop."""
