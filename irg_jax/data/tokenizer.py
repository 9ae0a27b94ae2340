"""Text tokenizers: a Hugging Face ``tokenizer.json`` (BAGEL / Qwen2) and a word-level demo tokenizer.

Both expose the same small interface, which is all the data pipeline and the inference
loop use:

    encode(text) -> list[int]      no BOS/EOS added (the packer wraps every text segment
                                   as ``[bos] ids [eos]``)
    decode(ids) -> str
    bos_id, eos_id                 ``<|im_start|>`` / ``<|im_end|>``
    start_of_image_id, end_of_image_id   ``<|vision_start|>`` / ``<|vision_end|>``
    vocab_size

Text is NFC-normalised before encoding (IRG's slow Qwen2 tokenizer does the same).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import unicodedata
from typing import Iterable, Protocol, Sequence

BOS, EOS = "<|im_start|>", "<|im_end|>"
START_OF_IMAGE, END_OF_IMAGE = "<|vision_start|>", "<|vision_end|>"
SPECIAL_TOKENS = (BOS, EOS, START_OF_IMAGE, END_OF_IMAGE)
UNK = "<unk>"


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    start_of_image_id: int
    end_of_image_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A ``tokenizers`` fast tokenizer loaded from ``tokenizer.json`` (or ``tokenizer.json.gz``)."""

    def __init__(self, tokenizer, source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        ids = {}
        for name in SPECIAL_TOKENS:
            i = tokenizer.token_to_id(name)
            if i is None:
                raise ValueError(
                    f"{source}: special token {name!r} is not in the vocabulary; BAGEL needs "
                    f"{', '.join(SPECIAL_TOKENS)} (Qwen2.5 tokenizers have all four)")
            ids[name] = i
        self.bos_id, self.eos_id = ids[BOS], ids[EOS]
        self.start_of_image_id, self.end_of_image_id = ids[START_OF_IMAGE], ids[END_OF_IMAGE]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str) -> "HFTokenizer":
        """Load ``<model_dir>/tokenizer.json`` (or its gzipped copy)."""
        import tokenizers
        for name in ("tokenizer.json", "tokenizer.json.gz"):
            path = os.path.join(model_dir, name)
            if os.path.exists(path):
                break
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.json.gz in {model_dir!r}")
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                tok = tokenizers.Tokenizer.from_str(f.read())
        else:
            tok = tokenizers.Tokenizer.from_file(path)
        return cls(tok, source=path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


_WORD_RE = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Deterministic word-level tokenizer for the synthetic demo world.

    Words are ``\\w+`` runs and single punctuation characters (case kept). Ids: ``<unk>`` = 0,
    then the four special tokens, then the vocabulary in sorted order. Unknown words map
    to ``<unk>``. Decoding joins words with single spaces and attaches punctuation to the
    preceding word.
    """

    def __init__(self, words: Iterable[str]):
        specials = (UNK,) + SPECIAL_TOKENS
        vocab = sorted(set(words) - set(specials))
        self.tokens: tuple[str, ...] = specials + tuple(vocab)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.unk_id = self._ids[UNK]
        self.bos_id, self.eos_id = self._ids[BOS], self._ids[EOS]
        self.start_of_image_id, self.end_of_image_id = self._ids[START_OF_IMAGE], self._ids[END_OF_IMAGE]
        self.vocab_size = len(self.tokens)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD_RE.findall(unicodedata.normalize("NFC", text))

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> "WordTokenizer":
        words: set[str] = set()
        for t in texts:
            words.update(cls.split(t))
        return cls(words)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        out = ""
        for i in ids:
            w = self.tokens[int(i)] if 0 <= int(i) < self.vocab_size else UNK
            if out and not (len(w) == 1 and not w.isalnum() and w != "_"):
                out += " "
            out += w
        return out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "word", "tokens": list(self.tokens)}, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("type") != "word" or not isinstance(data.get("tokens"), list):
            raise ValueError(f"{path}: not a WordTokenizer vocabulary (expected {{'type': 'word', 'tokens': [...]}})")
        tok = cls(data["tokens"])
        if tok.tokens != tuple(data["tokens"]):
            raise ValueError(f"{path}: token order differs from the canonical order (specials first, then sorted)")
        return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A model directory with ``tokenizer.json[.gz]`` -> :class:`HFTokenizer`; a word-vocab JSON
    file (or a directory holding ``word_vocab.json``) -> :class:`WordTokenizer`."""
    if os.path.isdir(path):
        word = os.path.join(path, "word_vocab.json")
        if os.path.exists(word):
            return WordTokenizer.load(word)
        return HFTokenizer.from_dir(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path does not exist: {path!r}")
    return WordTokenizer.load(path)
