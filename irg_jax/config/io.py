"""Loading config files (``path.py[:arg]``) and writing the resolved config."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import ml_collections


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``configs/x.py[:arg]`` by calling its ``get_config(arg)``; the result is locked."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


def write_resolved(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Write the fully resolved config as ``workdir/config.json``."""
    out = pathlib.Path(workdir) / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
    return out
