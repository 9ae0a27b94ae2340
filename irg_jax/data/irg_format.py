"""IRG's on-disk format: parquet files whose ``conversation`` column is a JSON list of turns.

A row becomes a :class:`Sample`: the sequence plan of spec §4.1 / §5.2, the token ids of
every text item and the transformed pixels of every image item.

Parser semantics (official ``MultiThinkInterleaveT2IDataset.parse_row``):
  - user turn ``{"role": "user", "content": str, "need_loss": bool=False}`` -> a text item;
  - assistant turn ``{"role": "assistant", "content": [parts]}``; a text part
    ``{"type": "text", "content": str, "need_loss": bool=True}`` -> a text item; an image part
    ``{"type": "image", "content": base64, "need_loss", "need_vae", "need_vit"}`` (all False by
    default) -> up to three items in the fixed order noisy VAE target (``need_loss``,
    enable_cfg 0) -> clean VAE copy (``need_vae``) -> ViT copy (``need_vit``);
  - every text item and clean copy has enable_cfg 1; empty turns and empty text parts are
    ignored; flags may be JSON booleans or the integers 0/1.

Where the official code silently drops data, this reader is explicit: every case is counted
under its reason and logged with file, row and reason (the first ``SkipCounter.log_first``
of each reason, then every ``log_every``-th); ``fail_fast`` raises at the first skip instead:
  - row skipped: null or malformed JSON, bytes that are not UTF-8 (string or binary
    column), text with a lone surrogate (``"\\ud800"``, which no tokenizer can encode) or
    that the tokenizer rejects, a conversation that is not a list, a malformed turn or part,
    a flag that is not a boolean or 0/1, an image part with flags but no bytes, undecodable
    base64 or image bytes, a zero-sized or over-large image, an assistant ``content`` that is
    not a list, an empty plan, a row group that cannot be read, and any other error while
    decoding a row (``decode_error``, with the exception);
  - row kept, noted (and named in the log): a turn whose role is not user/assistant
    (ignored, as IRG does; IRG's own toy data holds a "system" turn), an image part with no
    flags (dropped: it feeds nothing), an unknown part type (ignored), an empty turn or part
    (ignored), a ``data:...;base64,`` prefix (stripped), a truncated image (decoded
    partially, as the official code does), a non-RGB image (converted, see
    ``transforms.to_rgb``);
  - file skipped at start-up (``skipped_files/<reason>``): unreadable (truncated, not
    parquet: ``unreadable_file``), zero bytes (``empty_file``), no rows (``no_rows``), no
    ``conversation`` column (``missing_column``, its rows also counted as skipped rows).
    A missing path fails at start-up.
"""
from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import glob
import io
import json
import logging
import os
import threading
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFile

from irg_jax.data.tokenizer import Tokenizer
from irg_jax.data.transforms import ImageTransform, to_rgb

TEXT, VAE_IMAGE, VIT_IMAGE = "text", "vae_image", "vit_image"
CONVERSATION_COLUMN = "conversation"
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000  # IRG sets PIL's limit to this

ROLES = ("user", "assistant")


@dataclasses.dataclass(frozen=True)
class PlanItem:
    type: str          # TEXT, VAE_IMAGE or VIT_IMAGE
    loss: bool         # text: CE on the segment; vae_image: noisy generation target (MSE)
    enable_cfg: bool   # eligible for condition dropout


@dataclasses.dataclass(frozen=True)
class Sample:
    """One parsed row. ``images[k]`` feeds the k-th image item of the plan (uint8 ``[H, W, 3]``;
    a noisy target and its clean VAE copy share one array)."""

    plan: tuple[PlanItem, ...]
    text_ids: tuple[tuple[int, ...], ...]
    images: tuple[np.ndarray, ...]
    source: str = ""
    notes: tuple[str, ...] = ()          # reasons of the row's notes (see the module docstring)
    note_details: tuple[str, ...] = ()   # where each note applies ("turn 1 part 2: ..."), same length

    @property
    def num_tokens(self) -> int:
        """IRG's estimate: text ids + VAE tokens (H*W/16^2) + ViT patches (H*W/14^2).
        Uses the image's own stride: VAE images are multiples of 16, ViT images of 14."""
        n = sum(len(t) for t in self.text_ids)
        imgs = iter(self.images)
        for item in self.plan:
            if item.type != TEXT:
                img = next(imgs)
                p = 16 if item.type == VAE_IMAGE else 14
                n += (img.shape[0] // p) * (img.shape[1] // p)
        return n

    def length_estimate(self, vae_stride: int = 16, vit_patch: int = 14) -> int:
        """Tokens this sample occupies with no dropout: ids + bos/eos per text, tokens + 2 markers
        per image (IRG's ``num_tokens + 2 * len(plan)``)."""
        n = 0
        texts, imgs = iter(self.text_ids), iter(self.images)
        for item in self.plan:
            if item.type == TEXT:
                n += len(next(texts)) + 2
            else:
                img = next(imgs)
                p = vae_stride if item.type == VAE_IMAGE else vit_patch
                n += (img.shape[0] // p) * (img.shape[1] // p) + 2
        return n


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A row that could not be used; stands in for it so that indices stay aligned."""

    reason: str
    source: str
    detail: str = ""


class BadRowError(ValueError):
    def __init__(self, reason: str, source: str, detail: str = ""):
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.source, self.detail = reason, source, detail


class SkipCounter:
    """Counts skipped files, skipped rows and notes on kept rows by reason, every time one is met
    (a bad row is met again in every epoch). Logs each with its file and row: the first
    ``log_first`` different files/rows of every reason once each, then every
    ``log_every``-th occurrence of the reason.

    ``fail_fast=True`` turns every skip of bad input into a :class:`BadRowError`."""

    def __init__(self, fail_fast: bool = False, log_first: int = 100, log_every: int = 1000):
        self.fail_fast = fail_fast
        self.log_first, self.log_every = log_first, log_every
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_files: collections.Counter = collections.Counter()
        self.noted: collections.Counter = collections.Counter()
        self._named: dict[str, set] = collections.defaultdict(set)  # kind/reason -> sources logged

    def _log(self, key: str, source: str, count: int, msg: str) -> None:
        named = self._named[key]
        if source in named:
            return
        if len(named) < self.log_first:
            named.add(source)
        elif count % self.log_every:
            return
        logging.warning("%s [occurrence %d]", msg, count)

    def skip(self, reason: str, source: str, detail: str = "", rows: int = 1, bad_input: bool = True) -> None:
        """Count a skipped row (or ``rows`` rows). ``bad_input=False`` (e.g. a sample over the
        token budget) is counted and logged but never raises under ``fail_fast``."""
        if self.fail_fast and bad_input:
            raise BadRowError(reason, source, detail)
        self.skipped[reason] += rows
        self._log(f"skipped/{reason}", source, self.skipped[reason],
                  f"data: skipped {source}: {reason}" + (f" ({detail})" if detail else ""))

    def skip_file(self, reason: str, path: str, detail: str = "") -> None:
        """Count a file left out at start-up (raises under ``fail_fast``)."""
        if self.fail_fast:
            raise BadRowError(reason, path, detail)
        self.skipped_files[reason] += 1
        self._log(f"skipped_files/{reason}", path, self.skipped_files[reason],
                  f"data: skipped file {path}: {reason}" + (f" ({detail})" if detail else ""))

    def note(self, reason: str, source: str, detail: str = "") -> None:
        self.noted[reason] += 1
        self._log(f"noted/{reason}", source, self.noted[reason],
                  f"data: {source}: {reason}" + (f" ({detail})" if detail else ""))

    def merge(self, other: "SkipCounter") -> None:
        self.skipped.update(other.skipped)
        self.skipped_files.update(other.skipped_files)
        self.noted.update(other.noted)

    def metrics(self) -> dict[str, int]:
        out = {f"skipped/{k}": v for k, v in sorted(self.skipped.items())}
        out.update({f"skipped_files/{k}": v for k, v in sorted(self.skipped_files.items())})
        out.update({f"noted/{k}": v for k, v in sorted(self.noted.items())})
        return out


# ----------------------------------------------------------------------------- parsing


class _Notes(list):
    """The reasons noted on a row; ``details`` holds, per reason, where it applies."""

    def __init__(self):
        super().__init__()
        self.details: list[str] = []
        self.where = ""

    def append(self, reason: str, detail: str | None = None) -> None:
        super().append(reason)
        self.details.append(self.where if detail is None else detail)


def _flag(obj: dict, key: str, default: bool, source: str) -> bool:
    v = obj.get(key, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise BadRowError("bad_flag", source, f"{key}={v!r}; expected true/false or 0/1")


def decode_image(content: str, source: str, notes: list[str],
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """base64 string -> RGB PIL image; raises BadRowError with the reason."""
    if content.startswith("data:") and ";base64," in content[:100]:
        content = content.split(";base64,", 1)[1]
        notes.append("data_uri_prefix_stripped")
    try:
        raw = base64.b64decode(content)  # non-validating: drops MIME line breaks, as IRG
    except (binascii.Error, ValueError) as e:
        raise BadRowError("undecodable_base64", source, str(e)) from None
    if not raw:
        raise BadRowError("empty_image", source, "the image part decodes to zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise BadRowError("huge_image", source, str(e)) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError, ...
        raise BadRowError("undecodable_image", source, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadRowError("zero_sized_image", source, f"{w}x{h}")
    if w * h > max_image_pixels:
        raise BadRowError("huge_image", source, f"{w}x{h} > {max_image_pixels} pixels")
    try:
        img.load()
    except OSError:
        # IRG loads with ImageFile.LOAD_TRUNCATED_IMAGES=True; do the same, but say so.
        img = Image.open(io.BytesIO(raw))
        prev = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            img.load()
        except Exception as e:
            raise BadRowError("undecodable_image", source, f"{type(e).__name__}: {e}") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = prev
        notes.append("truncated_image_decoded_partially")
    except Exception as e:
        raise BadRowError("undecodable_image", source, f"{type(e).__name__}: {e}") from None
    rgb, note = to_rgb(img)
    if note:
        notes.append(note)
    return rgb


def parse_conversation(raw: Any, *, tokenizer: Tokenizer, vae_transform: ImageTransform,
                       vit_transform: ImageTransform, source: str = "",
                       max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Sample:
    """One ``conversation`` cell -> :class:`Sample`; raises :class:`BadRowError` to skip the row."""
    if raw is None:
        raise BadRowError("null_conversation", source)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            raise BadRowError("invalid_utf8", source, f"byte {e.start}: {e.reason} "
                              f"({bytes(raw)[max(0, e.start - 10):e.end + 10]!r})") from None
    try:
        conversation = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise BadRowError("malformed_json", source, str(e)) from None
    if not isinstance(conversation, list):
        raise BadRowError("conversation_not_a_list", source, f"got {type(conversation).__name__}")

    plan: list[PlanItem] = []
    text_ids: list[tuple[int, ...]] = []
    images: list[np.ndarray] = []
    notes = _Notes()

    def add_text(text: str, loss: bool, where: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRowError("invalid_text", source, f"{where}: lone surrogate {text[e.start]!r} at "
                              f"character {e.start}") from None
        try:
            ids = tuple(tokenizer.encode(text))
        except Exception as e:  # tokenizers raise TypeError, ValueError, ... on text they reject
            raise BadRowError("tokenizer_error", source, f"{where}: {type(e).__name__}: {e}") from None
        plan.append(PlanItem(TEXT, loss, True))
        text_ids.append(ids)

    for t, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise BadRowError("turn_not_an_object", source, f"turn {t} is {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        notes.where = f"turn {t}"
        if role not in ROLES:  # IRG ignores such turns (its own toy data has a "system" turn)
            notes.append("other_role_ignored", f"turn {t} has role {str(role)[:40]!r}, not one of {ROLES}")
            continue
        if not content:
            notes.append("empty_turn_ignored")
            continue
        if role == "user":
            if not isinstance(content, str):
                raise BadRowError("user_content_not_a_string", source, f"turn {t}")
            add_text(content, _flag(turn, "need_loss", False, source), f"turn {t}")
        elif role == "assistant":
            if not isinstance(content, list):
                raise BadRowError("assistant_content_not_a_list", source, f"turn {t} is {type(content).__name__}")
            for p, part in enumerate(content):
                if not isinstance(part, dict):
                    raise BadRowError("part_not_an_object", source, f"turn {t} part {p}")
                ptype, pcontent = part.get("type"), part.get("content")
                notes.where = f"turn {t} part {p}"
                if ptype == "image":
                    loss = _flag(part, "need_loss", False, source)
                    vae = _flag(part, "need_vae", False, source)
                    vit = _flag(part, "need_vit", False, source)
                    if not (loss or vae or vit):
                        notes.append("image_without_flags_dropped")
                        continue
                    if not pcontent:
                        raise BadRowError("empty_image", source, f"turn {t} part {p}: an image with "
                                          f"need_loss={loss} need_vae={vae} need_vit={vit} but no bytes")
                    if not isinstance(pcontent, str):
                        raise BadRowError("undecodable_base64", source, f"turn {t} part {p} is not a string")
                    rgb = decode_image(pcontent, f"{source} turn {t} part {p}", notes, max_image_pixels)
                    if loss or vae:
                        vae_pixels = vae_transform(rgb)
                    if loss:
                        plan.append(PlanItem(VAE_IMAGE, True, False))
                        images.append(vae_pixels)
                    if vae:
                        plan.append(PlanItem(VAE_IMAGE, False, True))
                        images.append(vae_pixels)
                    if vit:
                        plan.append(PlanItem(VIT_IMAGE, False, True))
                        images.append(vit_transform(rgb))
                elif not ptype or not pcontent:
                    notes.append("empty_part_ignored")
                elif ptype == "text":
                    if not isinstance(pcontent, str):
                        raise BadRowError("text_content_not_a_string", source, f"turn {t} part {p}")
                    add_text(pcontent, _flag(part, "need_loss", True, source), f"turn {t} part {p}")
                else:
                    notes.append("unknown_part_type_ignored", f"turn {t} part {p} has type {str(ptype)[:40]!r}")
    if not plan:
        raise BadRowError("empty_plan", source, "no usable text or image")
    return Sample(tuple(plan), tuple(text_ids), tuple(images), source, tuple(notes), tuple(notes.details))


# ----------------------------------------------------------------------------- files


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files, directories (their ``*.parquet``, sorted) or glob patterns -> parquet files.
    Raises FileNotFoundError naming the first path that matches nothing."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.parquet")))
            if not found:
                raise FileNotFoundError(f"data path {p!r} is a directory with no .parquet files")
        elif os.path.isfile(p):
            found = [p]
        else:
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"data path {p!r} does not exist")
        files.extend(found)
    return files


@dataclasses.dataclass(frozen=True)
class RawRow:
    source: str       # "<file> row <n>" for messages
    conversation: Any  # the cell value (bytes for string and binary columns, or None)
    error: tuple[str, str] | None = None  # (reason, detail) when the row could not be read


@dataclasses.dataclass(frozen=True)
class _ReadError:
    detail: str


class ParquetRows:
    """Random access to the ``conversation`` cells of a list of parquet files (a Grain source).

    Files that cannot be used are skipped at start-up and named (see the module docstring);
    ``problems`` lists them as ``(path, reason, detail)``. Row groups are read whole and kept
    in a small LRU cache, so reading a row group's rows in any order costs one read per cache
    miss. String cells are handed over as their UTF-8 bytes (decoded per row, so that one
    invalid cell does not take its whole row group down); a row group that cannot be read
    yields rows carrying an ``unreadable_row_group`` error."""

    def __init__(self, paths: Sequence[str], counter: SkipCounter | None = None, cache_size: int = 4,
                 column: str = CONVERSATION_COLUMN):
        import pyarrow.parquet as pq
        self.column, self.cache_size = column, cache_size
        self.files = expand_paths(paths)
        self._refs: list[tuple[int, int, int, int]] = []  # (file, row_group, row_in_group, row_in_file)
        self.problems: list[tuple[str, str, str]] = []
        counter = counter or SkipCounter()

        def skip_file(path, reason, detail):
            self.problems.append((path, reason, detail))
            counter.skip_file(reason, path, detail)

        for f, path in enumerate(self.files):
            try:
                if os.path.getsize(path) == 0:
                    skip_file(path, "empty_file", "0 bytes")
                    continue
                pf = pq.ParquetFile(path)
                names, num_rows = pf.schema_arrow.names, pf.metadata.num_rows
                sizes = [pf.metadata.row_group(rg).num_rows for rg in range(pf.metadata.num_row_groups)]
            except BadRowError:
                raise
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError on truncated or foreign files
                skip_file(path, "unreadable_file", f"{type(e).__name__}: {e}")
                continue
            if column not in names:
                detail = f"no {column!r} column; columns are {names}"
                self.problems.append((path, "missing_column", detail))
                counter.skip("missing_column", path, detail, rows=num_rows)
                continue
            if num_rows == 0:
                skip_file(path, "no_rows", "the file holds no rows")
                continue
            row_in_file = 0
            for rg, size in enumerate(sizes):
                for r in range(size):
                    self._refs.append((f, rg, r, row_in_file))
                    row_in_file += 1
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache"), state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return len(self._refs)

    def _row_group(self, f: int, rg: int) -> list:
        key = (f, rg)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            col = pq.ParquetFile(self.files[f]).read_row_group(rg, columns=[self.column]).column(0)
            if pa.types.is_string(col.type):
                col = col.cast(pa.binary())
            elif pa.types.is_large_string(col.type):
                col = col.cast(pa.large_binary())
            values = col.to_pylist()
        except Exception as e:  # a corrupt page, or the file changed since start-up
            values = _ReadError(f"row group {rg}: {type(e).__name__}: {e}")
        with self._lock:
            self._cache[key] = values
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return values

    def __getitem__(self, index: int) -> RawRow:
        f, rg, r, row_in_file = self._refs[index]
        values, source = self._row_group(f, rg), f"{self.files[f]} row {row_in_file}"
        if isinstance(values, _ReadError):
            return RawRow(source, None, ("unreadable_row_group", values.detail))
        return RawRow(source, values[r])


@dataclasses.dataclass
class RowDecoder:
    """Grain map function: :class:`RawRow` -> :class:`Sample`, or :class:`Skipped` (or raise when
    ``fail_fast``)."""

    tokenizer: Tokenizer
    vae_transform: ImageTransform
    vit_transform: ImageTransform
    fail_fast: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, row: RawRow) -> Sample | Skipped:
        try:
            if row.error is not None:
                raise BadRowError(row.error[0], row.source, row.error[1])
            return parse_conversation(row.conversation, tokenizer=self.tokenizer,
                                      vae_transform=self.vae_transform, vit_transform=self.vit_transform,
                                      source=row.source, max_image_pixels=self.max_image_pixels)
        except BadRowError as e:
            if self.fail_fast:
                raise
            return Skipped(e.reason, row.source, e.detail)
        except Exception as e:  # anything else a row can trigger: named and skipped, never fatal
            if self.fail_fast:
                raise BadRowError("decode_error", row.source, f"{type(e).__name__}: {e}") from e
            return Skipped("decode_error", row.source, f"{type(e).__name__}: {e}")
