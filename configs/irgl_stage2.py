"""IRGL stage 2: only the two full-trajectory modes, warmup 0, starting from the stage-1 EMA.

  --config configs/irgl_stage2.py:bagel_7b_mot,data_root=DATA,init_from=STAGE1_WORKDIR
  --config configs/irgl_stage2.py:demo,data_root=SYNTHETIC_WORLD,init_from=STAGE1_WORKDIR
"""
from irg_jax.config.irgl import irgl_config


def get_config(arg=None):
    return irgl_config(stage=2, arg=arg)
