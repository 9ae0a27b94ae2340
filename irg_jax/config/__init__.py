"""Configuration: the training schema, loading with overrides, validation, and the resolved JSON."""
from irg_jax.config.schema import base_config, DEFAULT_RULES, FSDP_TENSOR_RULES
from irg_jax.config.validation import ConfigError, validate
from irg_jax.config.io import load_config_file, write_resolved

__all__ = ["base_config", "DEFAULT_RULES", "FSDP_TENSOR_RULES", "ConfigError", "validate",
           "load_config_file", "write_resolved"]
