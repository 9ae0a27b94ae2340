"""IRG's parquet conversation format on hand-built files: every flag combination, every bad input."""
import base64
import itertools
import logging

import numpy as np
import pytest
from PIL import Image

from _irg_rows import assistant, image_b64, image_part, text_part, user, write_parquet
from irg_jax.data.irg_format import (BadRowError, ParquetRows, RowDecoder, SkipCounter, Skipped, expand_paths,
                                     parse_conversation)
from irg_jax.data.tokenizer import WordTokenizer, load_tokenizer
from irg_jax.data.transforms import ImageTransform, irg_target_size, to_rgb

TOK = WordTokenizer.from_corpus(["draw a red circle think one two answer"])
VAE, VIT = ImageTransform(64, 32, 16), ImageTransform(56, 28, 14)


def parse(conv, **kw):
    import json
    return parse_conversation(json.dumps(conv), tokenizer=TOK, vae_transform=VAE, vit_transform=VIT,
                              source="mem row 0", **kw)


@pytest.mark.parametrize("loss,vae,vit", list(itertools.product([False, True], repeat=3)))
def test_every_image_flag_combination(loss, vae, vit):
    conv = [user("draw a circle"), assistant(text_part("think"), image_part(need_loss=loss, need_vae=vae, need_vit=vit))]
    s = parse(conv)
    want = [("text", False, True), ("text", True, True)]
    want += [("vae_image", True, False)] * loss + [("vae_image", False, True)] * vae + [("vit_image", False, True)] * vit
    assert [(p.type, p.loss, p.enable_cfg) for p in s.plan] == want
    assert len(s.images) == loss + vae + vit
    for p, img in zip([p for p in s.plan if p.type != "text"], s.images):
        stride = 16 if p.type == "vae_image" else 14
        assert img.dtype == np.uint8 and img.shape[0] % stride == 0 and img.shape[1] % stride == 0
    if not (loss or vae or vit):
        assert s.notes == ("image_without_flags_dropped",)


def test_text_flags_defaults_and_ints():
    s = parse([user("a", need_loss=1), assistant(text_part("b"), text_part("c", need_loss=0), text_part("")),
               user("")])
    assert [p.loss for p in s.plan] == [True, True, False]
    assert "empty_part_ignored" in s.notes and "empty_turn_ignored" in s.notes
    assert s.text_ids[0] == tuple(TOK.encode("a"))


def test_tokenizers(fixtures_dir, tmp_path):
    tok = load_tokenizer(str(fixtures_dir / "irg_data" / "tokenizer"))
    assert tok.encode("e\u0301") == tok.encode("\u00e9")  # NFC
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    TOK.save(str(tmp_path / "vocab.json"))
    w = load_tokenizer(str(tmp_path / "vocab.json"))
    assert w.tokens == TOK.tokens and w.encode("draw a zebra .") == [w.tokens.index("draw"), w.tokens.index("a"), 0, 0]
    assert w.decode(w.encode("draw a circle")) == "draw a circle"
    with pytest.raises(ValueError, match="vision_start"):
        import tokenizers
        from irg_jax.data.tokenizer import HFTokenizer
        HFTokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<|im_start|>": 1}, unk_token="a")))


BAD_ROWS = {
    "null_conversation": None,
    "malformed_json": '[{"role": "user", "content": "unterminated',
    "conversation_not_a_list": '{"role": "user"}',
    "turn_not_an_object": '["hello"]',
    "user_content_not_a_string": [{"role": "user", "content": ["x"]}],
    "assistant_content_not_a_list": [user("a"), {"role": "assistant", "content": "answer"}],
    "part_not_an_object": [user("a"), {"role": "assistant", "content": ["answer"]}],
    "bad_flag": [user("a", need_loss="false")],
    "undecodable_base64": [user("a"), assistant(image_part("abcde", need_loss=True))],
    "undecodable_image": [user("a"), assistant(image_part(base64.b64encode(b"not an image").decode(), need_loss=True))],
    "empty_plan": [],
    "empty_image": [user("a"), assistant(image_part("", need_loss=True))],
    "invalid_text": '[{"role": "user", "content": "a \\ud800 b"}]',
}


def test_bad_rows_are_skipped_with_reason_and_row(tmp_path):
    names = list(BAD_ROWS)
    path = write_parquet(tmp_path / "bad.parquet", [BAD_ROWS[n] for n in names] + [[user("a"), assistant(text_part("b"))]])
    rows = ParquetRows([path])
    decoder = RowDecoder(TOK, VAE, VIT)
    for i, name in enumerate(names):
        got = decoder(rows[i])
        assert isinstance(got, Skipped) and got.reason == name, (name, got)
        assert got.source == f"{path} row {i}"
    assert not isinstance(decoder(rows[len(names)]), Skipped)
    with pytest.raises(BadRowError, match=r"bad.parquet row 0: null_conversation"):
        RowDecoder(TOK, VAE, VIT, fail_fast=True)(rows[0])


def test_image_edge_cases():
    png = image_b64(40, 24)
    mime = "\n".join(png[i:i + 76] for i in range(0, len(png), 76))
    s = parse([user("a"), assistant(image_part(mime, need_loss=True))])
    assert s.images[0].shape == (32, 48, 3)  # 40x24 -> min edge 32 -> 53.3x32 -> 48x32
    s = parse([user("a"), assistant(image_part("data:image/png;base64," + png, need_loss=True))])
    assert "data_uri_prefix_stripped" in s.notes
    jpg = base64.b64decode(image_b64(64, 48, fmt="JPEG"))
    s = parse([user("a"), assistant(image_part(base64.b64encode(jpg[: len(jpg) * 6 // 10]).decode(), need_loss=True))])
    assert "truncated_image_decoded_partially" in s.notes
    with pytest.raises(BadRowError, match="huge_image"):
        parse([user("a"), assistant(image_part(png, need_vit=True))], max_image_pixels=100)
    zero_png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x00\x00\x00\x00\n\x08\x02\x00\x00\x00"
    with pytest.raises(BadRowError, match="zero_sized_image|undecodable_image"):
        parse([user("a"), assistant(image_part(base64.b64encode(zero_png).decode(), need_vae=True))])
    s = parse([user("a"), assistant({"type": "video", "content": "x"}, text_part("b"))])
    assert "unknown_part_type_ignored" in s.notes


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_odd_modes_are_converted(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    kw = {"transparency": 3} if mode == "P" else {}
    s = parse([user("a"), assistant(image_part(image_b64(40, 40, mode, fmt, **kw), need_vae=True))])
    assert s.images[0].shape == (32, 32, 3) and any(n.startswith(f"converted_{mode}") for n in s.notes)


def test_colour_conventions():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)[0]).tolist() == [[[255, 255, 255]] * 2]  # transparent -> white
    la = Image.new("LA", (1, 1), (77, 0))
    assert np.asarray(to_rgb(la)[0]).tolist() == [[[77, 77, 77]]]  # LA: alpha dropped, no compositing
    i16 = Image.fromarray(np.array([[65535, 257]], np.uint16))
    assert np.asarray(to_rgb(i16)[0])[0, :, 0].tolist() == [255, 1]  # 16-bit scaled, not clipped


def test_size_rule_round_half_even():
    assert irg_target_size(300, 200, 980, 378, 14) == (560, 378)
    assert irg_target_size(800, 1000, 1024, 512, 16) == (800, 992)
    assert irg_target_size(1000, 200, 1024, 512, 16) == (1024, 208)
    assert irg_target_size(4000, 500, 1024, 512, 16) == (1024, 128)
    assert ImageTransform(1024, 512, 16, bucket_limit=(512, 512)).output_size(1000, 200) == (512, 96)


def test_missing_paths_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_paths([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        expand_paths([str(tmp_path / "empty")])
    path = write_parquet(tmp_path / "msg.parquet", [[user("a")]] * 3, column="messages")
    counter = SkipCounter()
    logging.disable(logging.WARNING)
    assert len(ParquetRows([path], counter)) == 0
    logging.disable(logging.NOTSET)
    assert counter.skipped["missing_column"] == 3
    with pytest.raises(BadRowError, match="missing_column"):
        ParquetRows([path], SkipCounter(fail_fast=True))


def test_row_groups_and_random_access(tmp_path):
    convs = [[user(f"draw {i}")] for i in range(10)]
    path = write_parquet(tmp_path / "rg.parquet", convs, row_group_size=3)
    rows = ParquetRows([path], cache_size=1)
    assert len(rows) == 10
    order = [7, 0, 9, 3, 3, 5]
    assert [rows[i].source for i in order] == [f"{path} row {i}" for i in order]
    import pickle
    again = pickle.loads(pickle.dumps(rows))
    assert again[4].conversation == rows[4].conversation
