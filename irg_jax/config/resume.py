"""Config on resume: which keys may change, and the workdir's record of the configs it ran with.

A workdir's train state, optimiser state and data-iterator state were made by one config; a
resume with other values for most keys would carry on with a silently different run (another
batch size, learning rate, data mixture or model). :func:`check_resume` therefore compares the
config with the one stored in the checkpoint being resumed and refuses every changed key that
is not in :data:`ALLOWED_ON_RESUME`: keys that change how long the run goes, how often it logs,
saves or samples, the device layout (a checkpoint restores on any mesh) and memory/compute
knobs that leave the state and the data stream alone.

:func:`record` writes the resolved config into the workdir once the start-up checks have
passed: ``config.json`` for the first one; a later, different one as ``config.step<N>.json``
(``N``: the step it starts from; ``config.step<N>.<k>.json`` if that exists); an existing
file is never overwritten.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Iterator

import ml_collections

# Keys (or key prefixes, whole dotted components) that may change when a run resumes.
ALLOWED_ON_RESUME: tuple[str, ...] = (
    "total_steps", "log_every", "checkpoint_every", "sample_every", "sampling",
    "checkpoint.keep", "checkpoint.async_save", "nan_guard",
    "mesh", "sharding",                      # restore reshards onto any mesh
    "model.remat", "model.remat_policy", "model.mlp_chunk", "model.ce_chunk",
    "model.layers_per_save", "model.attention",
    "data.fail_fast",
)


class ResumeConfigError(ValueError):
    """Resuming with changed config values that are not allowed to change; names each one."""

    def __init__(self, changes: list[tuple[str, Any, Any]], step: int, workdir: str):
        self.keys = [k for k, _, _ in changes]
        listed = "; ".join(f"config.{k}: {_short(old)} -> {_short(new)}" for k, old, new in changes)
        super().__init__(
            f"{workdir} resumes from step {step} with a changed config: {listed}. These keys cannot change "
            f"on resume (allowed: {', '.join(ALLOWED_ON_RESUME)}); use the old values or a new workdir.")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def as_json(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as plain JSON values (tuples become lists), as it is stored and written."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict) and d:
        for k in sorted(d):
            yield from _flatten(d[k], f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED_ON_RESUME)


def changes(old: dict, new: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]], list[str]]:
    """(refused, allowed, schema) differences between two JSON configs: refused and allowed are
    (key, old, new) for keys present in both; schema lists keys present in only one of them
    (a code update added or removed them, the run's own values did not change)."""
    a, b = dict(_flatten(as_json(old))), dict(_flatten(as_json(new)))
    refused, allowed = [], []
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            (allowed if _allowed(key) else refused).append((key, a[key], b[key]))
    return refused, allowed, sorted(a.keys() ^ b.keys())


def check_resume(saved: dict | None, config: ml_collections.ConfigDict, step: int, workdir: str) -> list[str]:
    """Raise :class:`ResumeConfigError` if ``config`` changes a key outside the allow-list
    compared with ``saved`` (the config stored with the resumed checkpoint); returns
    log lines describing the allowed changes."""
    if saved is None:
        return [f"checkpoint {step} stores no config: resuming without comparing configs"]
    refused, allowed, schema = changes(saved, as_json(config))
    if refused:
        raise ResumeConfigError(refused, step, workdir)
    notes = [f"resume changes config.{k}: {_short(o)} -> {_short(n)}" for k, o, n in allowed]
    if schema:
        notes.append(f"keys added or removed since checkpoint {step} was written (code update): {', '.join(schema)}")
    return notes


_VERSION = re.compile(r"^config\.step(\d+)(?:\.(\d+))?\.json$")


def _config_files(workdir: pathlib.Path) -> list[pathlib.Path]:
    """The workdir's config files, oldest first: config.json, then config.step<N>[.<k>].json."""
    files = [workdir / "config.json"] if (workdir / "config.json").exists() else []
    versions = []
    for path in workdir.glob("config.step*.json"):
        m = _VERSION.match(path.name)
        if m:
            versions.append(((int(m.group(1)), int(m.group(2) or 0)), path))
    return files + [p for _, p in sorted(versions)]


def record(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, step: int) -> pathlib.Path | None:
    """Write the resolved config unless the newest config file already holds it; returns the
    path written (None: unchanged). Never overwrites a file."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(as_json(config), indent=2, sort_keys=True)
    existing = _config_files(workdir)
    if existing:
        try:
            if json.loads(existing[-1].read_text()) == json.loads(text):
                return None
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: keep it, write the current config beside it
        out, k = workdir / f"config.step{step}.json", 1
        while out.exists():
            out, k = workdir / f"config.step{step}.{k}.json", k + 1
    else:
        out = workdir / "config.json"
    with open(out, "x") as f:  # "x": fail rather than overwrite
        f.write(text)
    return out
