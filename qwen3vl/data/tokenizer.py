"""Tokenizer: a thin wrapper over HF `tokenizers`, for a real Qwen tokenizer.json or a built-in byte tokenizer.

Why a built-in tokenizer: tests, CI and the synthetic training run must work offline with no checkpoint. The
built-in one (`builtin_tokenizer.json`, made by `python -m qwen3vl.tools.make_builtin_tokenizer`) is a byte-level
BPE: id b is byte b, so any text encodes losslessly; the Qwen special tokens sit right after the bytes (ids
256..263), so the whole chat/vision machinery runs unchanged; 248 merges cover the chat scaffolding, the
synthetic questions and common English words, which makes a synthetic sample a third as long as with bytes.

Both kinds expose the same API; `special_ids` is what a model config needs (image/video/vision-start/end ids).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import tokenizers

from qwen3vl.data import chat

__all__ = ["Tokenizer", "QWEN_SPECIAL_TOKENS", "BUILTIN_PATH", "byte_table"]

BUILTIN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_tokenizer.json")

# Order matters for the built-in tokenizer: these get ids 256, 257, ... in this order.
QWEN_SPECIAL_TOKENS = (chat.ENDOFTEXT, chat.IM_START, chat.IM_END, chat.VISION_START, chat.VISION_END,
                       chat.VISION_PAD, chat.IMAGE_PAD, chat.VIDEO_PAD)

# special_ids key -> token text.
_SPECIAL_KEYS = {
    "image_token_id": chat.IMAGE_PAD,
    "video_token_id": chat.VIDEO_PAD,
    "vision_start_token_id": chat.VISION_START,
    "vision_end_token_id": chat.VISION_END,
    "im_start": chat.IM_START,
    "im_end": chat.IM_END,
    "eos": chat.IM_END,  # chat models stop on <|im_end|> (Qwen generation_config eos)
    "pad": chat.ENDOFTEXT,  # Qwen's pad token
}


@functools.lru_cache(maxsize=1)
def byte_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


class Tokenizer:
    """encode/decode text with chat special tokens recognised in the text.

    vocab_size: the number of ids (added tokens included) rounded up to `pad_to` (64), i.e. the embedding
    rows a model trained from scratch with this tokenizer needs. Real checkpoints use their own config value
    (Qwen3-VL: 151936 rows for 151669 tokens).
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, pad_to: int = 64, name: str = "tokenizer"):
        self._tok = tok
        self.name = name
        self.num_tokens = tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = _round_up(self.num_tokens, pad_to)
        missing = [t for t in QWEN_SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{name}: missing Qwen special tokens {missing}; a Qwen(2/2.5/3)-VL tokenizer.json "
                             "is required")
        self.special_ids = {k: int(tok.token_to_id(v)) for k, v in _SPECIAL_KEYS.items()}

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, *, pad_to: int = 64) -> "Tokenizer":
        """A HF tokenizer.json (e.g. from a Qwen3-VL checkpoint directory; a directory is accepted too)."""
        path = os.fspath(tokenizer_json)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path!r}")
        return cls(tokenizers.Tokenizer.from_file(path), pad_to=pad_to, name=path)

    @classmethod
    def builtin(cls, *, pad_to: int = 64) -> "Tokenizer":
        """The built-in byte-level BPE (module docstring): 512 ids, Qwen special tokens at 256..263."""
        return cls(tokenizers.Tokenizer.from_file(BUILTIN_PATH), pad_to=pad_to, name="builtin")

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json (so a checkpoint carries the tokenizer it was trained with)."""
        self._tok.save(os.fspath(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and each token's (start, end) character span in `text` (for loss masks)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        """Id of a token by its text, e.g. token_id("<|image_pad|>"); KeyError if absent."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise KeyError(f"{self.name}: no token {name!r}")
        return int(i)

    def __repr__(self):
        return f"Tokenizer({self.name}, num_tokens={self.num_tokens}, vocab_size={self.vocab_size})"
