"""IRGL stage 1: all six learning modes (IRG's stage-1 run: lr 2e-5, warmup 500, EMA 0.995,
timestep shift 4, VAE-condition dropout 0.3), starting from converted BAGEL-7B-MoT weights.

  --config configs/irgl_stage1.py:bagel_7b_mot,data_root=DATA,init_from=CONVERTED_BAGEL_DIR
  --config configs/irgl_stage1.py:demo,data_root=SYNTHETIC_WORLD      (CPU demo, from scratch)
  --config configs/irgl_stage1.py:tiny,data_root=SYNTHETIC_WORLD      (tests)
"""
from irg_jax.config.irgl import irgl_config


def get_config(arg=None):
    return irgl_config(stage=1, arg=arg)
