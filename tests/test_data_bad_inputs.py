"""Bad files and rows of every class are skipped and named (file, row, reason) in the log and the
counters, never crash the pipeline; ``fail_fast`` stops at the first one."""
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _irg_rows import assistant, image_part, text_part, trajectory, user, write_parquet
from irg_jax.data.irg_format import BadRowError, ParquetRows, RowDecoder, SkipCounter, Skipped
from irg_jax.data.mixture import MODES, stage1_groups
from irg_jax.data.tokenizer import HFTokenizer, WordTokenizer
from irg_jax.data.transforms import ImageTransform

TOK = WordTokenizer.from_corpus(["draw a red circle think one two caf"] + [f"{i}" for i in range(64)])
VAE, VIT = ImageTransform(64, 32, 16), ImageTransform(56, 28, 14)
GOOD = [user("draw a red circle"), assistant(text_part("think one"))]


def write_cells(path, cells, binary=False):
    """A ``conversation`` column of raw bytes: ``binary`` as a binary column, else as a string column
    whose bytes are not checked (what a foreign writer can leave behind)."""
    raw = pa.array([c if isinstance(c, bytes) or c is None else json.dumps(c).encode() for c in cells], pa.binary())
    col = raw if binary else pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), raw.null_count)
    pq.write_table(pa.table({"conversation": col}), str(path))
    return str(path)


def bad_files(d):
    """Four files that cannot be used, beside one good one; returns {path: reason}."""
    good = write_parquet(d / "a-good.parquet", [GOOD] * 3)
    data = open(good, "rb").read()
    (d / "b-truncated.parquet").write_bytes(data[: len(data) // 2])
    (d / "c-zero-bytes.parquet").write_bytes(b"")
    pq.write_table(pa.table({"conversation": pa.array([], pa.string())}), str(d / "d-no-rows.parquet"))
    write_parquet(d / "e-messages.parquet", [GOOD], column="messages")
    return {str(d / "b-truncated.parquet"): "unreadable_file", str(d / "c-zero-bytes.parquet"): "empty_file",
            str(d / "d-no-rows.parquet"): "no_rows", str(d / "e-messages.parquet"): "missing_column"}


def test_bad_files_are_skipped_and_named(tmp_path, caplog):
    want = bad_files(tmp_path)
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        rows = ParquetRows([str(tmp_path)], counter)
    assert len(rows) == 3 and all(r.source.startswith(str(tmp_path / "a-good.parquet")) for r in (rows[0], rows[2]))
    assert {p: r for p, r, _ in rows.problems} == want
    assert counter.skipped_files == {"unreadable_file": 1, "empty_file": 1, "no_rows": 1}
    assert counter.skipped["missing_column"] == 1  # its one row
    assert "ArrowInvalid" in dict((p, d) for p, _, d in rows.problems)[str(tmp_path / "b-truncated.parquet")]
    for path, reason in want.items():
        assert any(path in m and reason in m for m in caplog.messages), (path, reason)
    assert counter.metrics()["skipped_files/no_rows"] == 1
    with pytest.raises(BadRowError, match=r"b-truncated.parquet: unreadable_file"):
        ParquetRows([str(tmp_path)], SkipCounter(fail_fast=True))


ROW_CLASSES = {
    # reason: cell (bytes: written as they are)
    "invalid_utf8": b'[{"role": "user", "content": "caf\xe9 \xff"}]',
    "invalid_text": b'[{"role": "user", "content": "draw \\ud800 a circle"}]',
    "empty_image": [user("a"), assistant(image_part("", need_loss=True))],
    "malformed_json": b'[{"role": "user"',
}


@pytest.mark.parametrize("binary", [False, True])
def test_bad_rows_are_skipped_and_named(tmp_path, binary):
    names = list(ROW_CLASSES)
    path = write_cells(tmp_path / "rows.parquet", [ROW_CLASSES[n] for n in names] + [GOOD], binary=binary)
    rows = ParquetRows([path])
    decoder = RowDecoder(TOK, VAE, VIT)
    for i, name in enumerate(names):
        got = decoder(rows[i])
        assert isinstance(got, Skipped) and got.reason == name and got.source == f"{path} row {i}", got
    assert "\\xe9" in decoder(rows[0]).detail  # the offending bytes are shown
    assert "turn 0" in decoder(rows[1]).detail and "turn 1 part 0" in decoder(rows[2]).detail
    ok = decoder(rows[len(names)])
    assert not isinstance(ok, Skipped) and ok.text_ids[0] == tuple(TOK.encode("draw a red circle"))
    for i, name in enumerate(names):
        with pytest.raises(BadRowError, match=rf"rows.parquet row {i}: {name}"):
            RowDecoder(TOK, VAE, VIT, fail_fast=True)(rows[i])


def test_lone_surrogate_never_reaches_the_tokenizer(fixtures_dir):
    """The HF tokenizer raises TypeError on a lone surrogate; the reader names the row instead."""
    tok = HFTokenizer.from_dir(str(fixtures_dir / "irg_data" / "tokenizer"))
    with pytest.raises(TypeError):
        tok.encode("a \ud800 b")
    from irg_jax.data.irg_format import parse_conversation
    with pytest.raises(BadRowError, match="invalid_text.*turn 1 part 0: lone surrogate"):
        parse_conversation('[{"role": "user", "content": "a"}, {"role": "assistant", "content": '
                           '[{"type": "text", "content": "b \\udc80"}]}]', tokenizer=tok, vae_transform=VAE,
                           vit_transform=VIT, source="f row 3")


class FailingTokenizer(WordTokenizer):
    def encode(self, text):
        if "circle" in text:
            raise ValueError("no circles here")
        return super().encode(text)


def test_any_row_error_is_named_not_raised(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [GOOD, [user("a square")]])
    rows = ParquetRows([path])
    tok = FailingTokenizer(TOK.tokens)
    got = RowDecoder(tok, VAE, VIT)(rows[0])
    assert got.reason == "tokenizer_error" and "ValueError: no circles here" in got.detail
    assert not isinstance(RowDecoder(tok, VAE, VIT)(rows[1]), Skipped)

    class Broken:  # an unexpected failure inside a transform
        def __call__(self, img):
            raise ZeroDivisionError("boom")
    path = write_parquet(tmp_path / "img.parquet", [[user("a"), assistant(image_part(need_loss=True))]])
    got = RowDecoder(TOK, Broken(), VIT)(ParquetRows([path])[0])
    assert got.reason == "decode_error" and "ZeroDivisionError: boom" in got.detail and "img.parquet row 0" in got.source
    with pytest.raises(BadRowError, match="img.parquet row 0: decode_error"):
        RowDecoder(TOK, Broken(), VIT, fail_fast=True)(ParquetRows([path])[0])


def test_unreadable_row_group_is_named(tmp_path):
    path = write_parquet(tmp_path / "rg.parquet", [GOOD] * 4, row_group_size=2)
    rows = ParquetRows([path])
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(1).column(0).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start:start + 40] = b"\xff" * 40  # a corrupt page in row group 1; the footer is intact
    open(path, "wb").write(bytes(data))
    decoder = RowDecoder(TOK, VAE, VIT)
    assert not isinstance(decoder(rows[0]), Skipped)
    got = decoder(rows[3])
    assert got.reason == "unreadable_row_group" and got.source == f"{path} row 3" and "row group 1" in got.detail


def test_other_roles_and_empty_parts_are_named(caplog):
    conv = [{"role": "system", "content": "be brief"}, user("draw"), assistant(text_part(""), text_part("one"))]
    from irg_jax.data.irg_format import parse_conversation
    s = parse_conversation(json.dumps(conv), tokenizer=TOK, vae_transform=VAE, vit_transform=VIT, source="f row 7")
    assert s.notes == ("other_role_ignored", "empty_part_ignored") and len(s.plan) == 2
    assert "turn 0 has role 'system'" in s.note_details[0] and s.note_details[1] == "turn 2 part 0"
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        for n, d in zip(s.notes, s.note_details):
            counter.note(n, s.source, d)
    assert any("f row 7: other_role_ignored (turn 0 has role 'system'" in m for m in caplog.messages)
    assert any("f row 7: empty_part_ignored (turn 2 part 0)" in m for m in caplog.messages)


# ----------------------------------------------------------------------------- the pipeline


def dataset(root):
    """Six mode folders of good rows; one bad item of every class spread over them.
    Returns the names (file, row, reason) the run must report and the good rows it must deliver."""
    expect, good = [], []
    for m, mode in enumerate(MODES):
        (root / mode).mkdir()
        path = write_parquet(root / mode / "part-00000.parquet", [trajectory(m * 100 + i) for i in range(6)],
                             row_group_size=4)
        good += [f"{path} row {i}" for i in range(6)]
    d = root / MODES[0]
    for path, reason in bad_files(d).items():
        expect.append((path, None, reason))
    (d / "a-good.parquet").unlink()
    bad = write_cells(root / MODES[1] / "part-00001.parquet", [ROW_CLASSES["invalid_utf8"], trajectory(1), None])
    expect += [(bad, 0, "invalid_utf8"), (bad, 2, "null_conversation")]
    good.append(f"{bad} row 1")
    bad = write_cells(root / MODES[2] / "part-00001.parquet", [trajectory(2), ROW_CLASSES["invalid_utf8"]], binary=True)
    expect.append((bad, 1, "invalid_utf8"))
    good.append(f"{bad} row 0")
    bad = write_cells(root / MODES[3] / "part-00001.parquet", [ROW_CLASSES["invalid_text"], ROW_CLASSES["empty_image"]])
    expect += [(bad, 0, "invalid_text"), (bad, 1, "empty_image")]
    role = [{"role": "tool", "content": "x"}] + trajectory(4)
    bad = write_parquet(root / MODES[4] / "part-00001.parquet", [role])
    expect.append((bad, 0, "other_role_ignored"))
    good.append(f"{bad} row 0")  # the other turns are used, as in IRG
    return expect, good


def test_pipeline_skips_and_names_every_bad_item(tmp_path, caplog):
    from test_data_pipeline import make, tiny_config
    expect, good = dataset(tmp_path)
    d = tiny_config(tmp_path)
    # packs with room for the non-mandatory groups beside the four mandatory samples
    d.expected_num_tokens, d.max_num_tokens = 480, 560
    d.pack.und_len, d.pack.gen_len, d.pack.vit_len, d.pack.ce_len, d.pack.num_vae_images = 400, 192, 32, 96, 16
    delivered = set()
    with caplog.at_level(logging.WARNING):
        it, _ = make(d)
        for _ in range(30):
            next(it)
            delivered.update(s for pack in it.last_sources for s in pack)
    m = it.metrics()
    assert sorted(set(good) - delivered) == [] and delivered <= set(good)
    for path, row, reason in expect:
        where = path if row is None else f"{path} row {row}"
        assert any(where + ":" in msg and reason in msg for msg in caplog.messages), (where, reason)
    for reason in ("unreadable_file", "empty_file", "no_rows"):
        assert m[f"data/skipped_files/{reason}"] == 1
    for reason in ("missing_column", "invalid_utf8", "null_conversation", "invalid_text", "empty_image"):
        assert m[f"data/skipped/{reason}"] >= 1, reason
    assert m["data/noted/other_role_ignored"] >= 1 and m["data/dropped"] == 0
    d.fail_fast = True
    with pytest.raises(BadRowError, match="unreadable_file"):
        make(d)
    for path, row, _ in expect:
        if row is None:
            os.remove(path)
    it, _ = make(d)
    with pytest.raises(BadRowError, match=r"part-00001.parquet row \d: (invalid_utf8|null_conversation|invalid_text|empty)"):
        for _ in range(30):
            next(it)
