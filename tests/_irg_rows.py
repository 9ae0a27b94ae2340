"""Helpers for data tests: small IRG-format rows and parquet files."""
import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_b64(w=40, h=24, mode="RGB", fmt="PNG", seed=0, **save_kw) -> str:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return base64.b64encode(buf.getvalue()).decode()


def user(text, **flags):
    return {"role": "user", "content": text, **flags}


def text_part(text, **flags):
    return {"type": "text", "content": text, **flags}


def image_part(b64=None, **flags):
    return {"type": "image", "content": b64 if b64 is not None else image_b64(), **flags}


def assistant(*parts):
    return {"role": "assistant", "content": list(parts)}


def write_parquet(path, conversations, column="conversation", row_group_size=None):
    """``conversations``: list of JSON-able objects, pre-serialised strings or None."""
    cells = [c if (c is None or isinstance(c, str)) else json.dumps(c) for c in conversations]
    table = pa.table({column: pa.array(cells, pa.string()), "row_id": [str(i) for i in range(len(cells))]})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def trajectory(i, *, think1_loss=True, image1=(False, True, True), think2_loss=True, image2_loss=True, size=(48, 32)):
    """An improving-full style row: prompt, think1, image1 (flags), think2, image2."""
    w, h = size
    l1, v1, t1 = image1
    return [user("draw a red circle"),
            assistant(text_part(f"think one {i}", need_loss=think1_loss),
                      image_part(image_b64(w, h, seed=i), need_loss=l1, need_vae=v1, need_vit=t1),
                      text_part(f"think two {i}", need_loss=think2_loss),
                      image_part(image_b64(w, h, seed=100 + i), need_loss=image2_loss))]
