"""Trajectory records and the writer of IRG's six mode datasets.

A trajectory is one full IRG interaction: prompt → think 1 → image 1 → reflection
(think 2) → image 2. IRGL trains on it through six *modes* (spec §5.3); each mode is a
parquet dataset in IRG's conversation format (spec §5.1):

    <out>/<mode>/part-00000.parquet      columns: conversation (JSON string), row_id

with one conversation per trajectory:

    user      system prompt (need_loss false; IRG's parser ignores a "system" role);
              SYSTEM_PROMPT_FULL paraphrases IRG's, SYSTEM_PROMPT_SHORT is the demo's
    user      prompt        (need_loss false)
    assistant [think1, image1, think2, image2]  the parts the mode uses, with its flags

The flags of each part are a :data:`FlagTable` (mode → part → flags). The spec marks
the table as inferred, so it is configurable; :data:`DEFAULT_FLAG_TABLE` follows spec
§5.3: improving modes use image 1 as a clean condition (need_loss false, need_vae and
need_vit true); ``improving_full_learning`` also puts CE on think 1, as most rows of
IRG's toy data do.

Records on disk (``--records FILE.jsonl``): one JSON object per line with ``id``,
``prompt``, ``think1``, ``think2`` (or ``reflection``), ``metadata`` (optional) and, for
each image, ``image1_b64``/``image2_b64`` (base64 of the file bytes) or
``image1_path``/``image2_path`` (relative to the JSONL file's folder).

CLI: ``python -m irg_jax.data.trajectories --records FILE.jsonl --out DIR``.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import json
import pathlib
import sys
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SECTION_IMPROVEMENTS = "### Detailed Explanation of Required Improvements:"
SECTION_GUIDANCE = "### Step-by-Step Modification Guidance:"
SECTION_FINAL_PROMPT = "### Final Comprehensive Prompt for the Improved Image:"

# The system prompt, in our own words (IRG's content: plan in <think>, draw; then analyse
# and improve with the four-section think). SHORT is the demo default: every token costs.
SYSTEM_PROMPT_SHORT = ("plan the image inside <think> </think> , then draw it . then check the image , "
                       "write an improvement think with the three ### sections , and draw a better image .")
SYSTEM_PROMPT_FULL = (
    "Think about the picture before drawing it: write the plan inside <think> </think> and then "
    "give the image, as in <think> plan here </think> image here. Once one image and one round of "
    "thinking are done, keep going: examine the image you drew, find where it falls short of the "
    "request, and produce a better image. Each later round compares the previous image with what "
    "the improved one must look like and explains, step by step, how to get from one to the other.\n"
    "Every improvement think starts with <think> and ends with </think>, uses paragraph breaks, "
    "and has these parts:\n"
    "   - a first paragraph that analyses the previous image and its shortcomings\n"
    f"   - {SECTION_IMPROVEMENTS}\n"
    f"   - {SECTION_GUIDANCE}\n"
    f"   - {SECTION_FINAL_PROMPT}\n"
    "Make the guidance concrete and usable for image generation: layout, light, colour, texture, "
    "placement and style. Describe only the thinking, never the improved image itself.")


MODES: tuple[str, ...] = (
    "initial_thinking_understanding_learning",
    "initial_thinking_generation_learning",
    "initial_full_learning",
    "improving_thinking_understanding_learning",
    "improving_thinking_generation_learning",
    "improving_full_learning",
)
PART_ORDER: tuple[str, ...] = ("think1", "image1", "think2", "image2")
TEXT_PARTS = frozenset({"think1", "think2"})
IMAGE_FLAGS: tuple[str, ...] = ("need_loss", "need_vae", "need_vit")

FlagTable = Mapping[str, Mapping[str, Mapping[str, bool]]]

_TARGET = {"need_loss": True, "need_vae": False, "need_vit": False}
_CONDITION = {"need_loss": False, "need_vae": True, "need_vit": True}
_LOSS = {"need_loss": True}
_NO_LOSS = {"need_loss": False}

DEFAULT_FLAG_TABLE: FlagTable = {
    "initial_thinking_understanding_learning": {"think1": _LOSS},
    "initial_thinking_generation_learning": {"think1": _NO_LOSS, "image1": _TARGET},
    "initial_full_learning": {"think1": _LOSS, "image1": _TARGET},
    "improving_thinking_understanding_learning": {"think1": _NO_LOSS, "image1": _CONDITION, "think2": _LOSS},
    "improving_thinking_generation_learning": {"think1": _NO_LOSS, "image1": _CONDITION, "think2": _NO_LOSS,
                                               "image2": _TARGET},
    "improving_full_learning": {"think1": _LOSS, "image1": _CONDITION, "think2": _LOSS, "image2": _TARGET},
}
DEFAULT_ROWS_PER_GROUP = 1024


@dataclasses.dataclass(frozen=True)
class TrajectoryRecord:
    """One IRG trajectory. Images are encoded file bytes (PNG, JPEG, ...)."""

    id: str
    prompt: str
    think1: str
    image1: bytes
    think2: str  # the reflection
    image2: bytes
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self, with_images: bool = True) -> dict:
        out = {"id": self.id, "prompt": self.prompt, "think1": self.think1, "think2": self.think2,
               "metadata": dict(self.metadata)}
        if with_images:
            out["image1_b64"] = base64.b64encode(self.image1).decode("ascii")
            out["image2_b64"] = base64.b64encode(self.image2).decode("ascii")
        return out


def validate_flag_table(table: FlagTable) -> None:
    """Raises ValueError naming the offending mode/part if the table cannot be written."""
    for mode, parts in table.items():
        if not parts:
            raise ValueError(f"flag table: mode {mode!r} uses no part")
        for part, flags in parts.items():
            if part not in PART_ORDER:
                raise ValueError(f"flag table: mode {mode!r} has unknown part {part!r}; parts: {PART_ORDER}")
            allowed = ("need_loss",) if part in TEXT_PARTS else IMAGE_FLAGS
            unknown = set(flags) - set(allowed)
            if unknown:
                raise ValueError(f"flag table: {mode}/{part} has unknown flags {sorted(unknown)}; allowed {allowed}")
            if not all(isinstance(v, bool) for v in flags.values()):
                raise ValueError(f"flag table: {mode}/{part} flags must be booleans, got {dict(flags)}")
            if part not in TEXT_PARTS and not any(flags.get(f, False) for f in IMAGE_FLAGS):
                raise ValueError(f"flag table: image part {mode}/{part} has every flag false; "
                                 "IRG's parser drops such an image")


def conversation(record: TrajectoryRecord, mode_parts: Mapping[str, Mapping[str, bool]], *,
                 system_prompt: str | None, image_b64: Mapping[str, str]) -> list[dict]:
    """The IRG conversation (list of turns) of one record for one mode's parts and flags."""
    turns: list[dict] = []
    if system_prompt:
        turns.append({"role": "user", "content": system_prompt, "need_loss": False})
    turns.append({"role": "user", "content": record.prompt, "need_loss": False})
    parts = []
    for name in PART_ORDER:
        flags = mode_parts.get(name)
        if flags is None:
            continue
        if name in TEXT_PARTS:
            parts.append({"type": "text", "content": getattr(record, name),
                          "need_loss": bool(flags.get("need_loss", True))})
        else:
            parts.append({"type": "image", "content": image_b64[name],
                          **{f: bool(flags.get(f, False)) for f in IMAGE_FLAGS}})
    turns.append({"role": "assistant", "content": parts})
    return turns


class ModeDatasetWriter:
    """Streams records into ``<out>/<mode>/part-00000.parquet``, one row group per ``rows_per_group``.

    ``initial_image_source`` chooses the image that modes without think 2 learn after
    think 1: IRG uses "image1"; a world whose first images are deliberately wrong may
    pass "image2" so that turn 1 is not taught to be wrong.
    """

    _SCHEMA = pa.schema([("conversation", pa.string()), ("row_id", pa.string())])

    def __init__(self, out_dir: str | pathlib.Path, *, system_prompt: str | None = SYSTEM_PROMPT_FULL,
                 flag_table: FlagTable = DEFAULT_FLAG_TABLE, modes: Iterable[str] | None = None,
                 rows_per_group: int = DEFAULT_ROWS_PER_GROUP, initial_image_source: str = "image1"):
        validate_flag_table(flag_table)
        self.modes = tuple(modes) if modes is not None else tuple(flag_table)
        missing = [m for m in self.modes if m not in flag_table]
        if missing:
            raise ValueError(f"modes {missing} have no entry in the flag table ({sorted(flag_table)})")
        if initial_image_source not in ("image1", "image2"):
            raise ValueError(f"initial_image_source must be 'image1' or 'image2', got {initial_image_source!r}")
        if rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
        self.out_dir = pathlib.Path(out_dir)
        self.system_prompt = system_prompt
        self.flag_table = flag_table
        self.rows_per_group = rows_per_group
        self.initial_image_source = initial_image_source
        self.counts = {m: 0 for m in self.modes}
        self._buffers: dict[str, tuple[list[str], list[str]]] = {m: ([], []) for m in self.modes}
        self._writers: dict[str, pq.ParquetWriter] = {}

    def path(self, mode: str) -> pathlib.Path:
        return self.out_dir / mode / "part-00000.parquet"

    def add(self, record: TrajectoryRecord) -> None:
        b64 = {"image1": base64.b64encode(record.image1).decode("ascii"),
               "image2": base64.b64encode(record.image2).decode("ascii")}
        before_reflection = {**b64, "image1": b64[self.initial_image_source]}
        for mode in self.modes:
            parts = self.flag_table[mode]
            images = b64 if "think2" in parts else before_reflection
            turns = conversation(record, parts, system_prompt=self.system_prompt, image_b64=images)
            texts, ids = self._buffers[mode]
            texts.append(json.dumps(turns, ensure_ascii=False))
            ids.append(f"{mode}/{record.id}")
            if len(texts) >= self.rows_per_group:
                self._flush(mode)

    def _flush(self, mode: str) -> None:
        texts, ids = self._buffers[mode]
        if not texts:
            return
        if mode not in self._writers:
            self.path(mode).parent.mkdir(parents=True, exist_ok=True)
            self._writers[mode] = pq.ParquetWriter(self.path(mode), self._SCHEMA, compression="zstd")
        table = pa.table({"conversation": texts, "row_id": ids}, schema=self._SCHEMA)
        self._writers[mode].write_table(table, row_group_size=len(texts))
        self.counts[mode] += len(texts)
        self._buffers[mode] = ([], [])

    def close(self) -> dict[str, int]:
        """Flushes and closes every file; returns rows written per mode."""
        for mode in self.modes:
            self._flush(mode)
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        return dict(self.counts)

    def __enter__(self) -> "ModeDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mode_datasets(records: Iterable[TrajectoryRecord], out_dir: str | pathlib.Path,
                        **writer_kwargs) -> dict[str, int]:
    """Writes the six (or ``modes``) datasets; returns rows per mode. See :class:`ModeDatasetWriter`."""
    writer = ModeDatasetWriter(out_dir, **writer_kwargs)
    with writer:
        for record in records:
            writer.add(record)
    return dict(writer.counts)


def _image_bytes(obj: Mapping, name: str, base: pathlib.Path, where: str) -> bytes:
    if f"{name}_b64" in obj:
        try:
            return base64.b64decode(obj[f"{name}_b64"], validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise ValueError(f"{where}: {name}_b64 is not valid base64 ({e})") from None
    if f"{name}_path" in obj:
        path = base / obj[f"{name}_path"]
        try:
            return path.read_bytes()
        except OSError as e:
            raise ValueError(f"{where}: cannot read {name}_path {str(path)!r} ({e})") from None
    raise ValueError(f"{where}: no {name}_b64 or {name}_path")


def record_from_json(obj: Mapping, *, base_dir: str | pathlib.Path = ".", where: str = "record") -> TrajectoryRecord:
    """Parses one JSONL object (see module docstring); ``where`` names it in errors."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    think2 = obj.get("think2", obj.get("reflection"))
    missing = [k for k, v in (("id", obj.get("id")), ("prompt", obj.get("prompt")), ("think1", obj.get("think1")),
                              ("think2", think2)) if not isinstance(v, str)]
    if missing:
        raise ValueError(f"{where}: missing or non-string fields {missing}")
    base = pathlib.Path(base_dir)
    return TrajectoryRecord(id=obj["id"], prompt=obj["prompt"], think1=obj["think1"],
                            image1=_image_bytes(obj, "image1", base, where), think2=think2,
                            image2=_image_bytes(obj, "image2", base, where), metadata=obj.get("metadata") or {})


def read_records_jsonl(path: str | pathlib.Path) -> Iterator[TrajectoryRecord]:
    path = pathlib.Path(path)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e})") from None
            yield record_from_json(obj, base_dir=path.parent, where=where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write IRG's six mode datasets from trajectory records.")
    parser.add_argument("--records", required=True, help="JSONL of trajectory records")
    parser.add_argument("--out", required=True, help="output folder; gets one sub-folder per mode")
    parser.add_argument("--flag-table", help="JSON file {mode: {part: {flag: bool}}} replacing the default")
    parser.add_argument("--system-prompt", help="system prompt text (default: the full paraphrase)")
    parser.add_argument("--no-system-prompt", action="store_true", help="omit the system-prompt turn")
    parser.add_argument("--rows-per-group", type=int, default=DEFAULT_ROWS_PER_GROUP)
    parser.add_argument("--initial-image", choices=("image1", "image2"), default="image1",
                        help="image the initial modes learn after think 1")
    args = parser.parse_args(argv)
    table = DEFAULT_FLAG_TABLE
    if args.flag_table:
        table = json.loads(pathlib.Path(args.flag_table).read_text())
    system_prompt = None if args.no_system_prompt else (args.system_prompt or SYSTEM_PROMPT_FULL)
    counts = write_mode_datasets(read_records_jsonl(args.records), args.out, flag_table=table,
                                 system_prompt=system_prompt, rows_per_group=args.rows_per_group,
                                 initial_image_source=args.initial_image)
    for mode, n in counts.items():
        print(f"{mode}: {n} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
