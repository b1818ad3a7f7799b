"""Incremental detokenization for streaming.

Decoding one token at a time is wrong twice over: a byte-level BPE token (or a `<0xE2>`
byte-fallback token) can end in the middle of a UTF-8 character, which `decode` renders as
U+FFFD, and Metaspace-style decoders drop the leading space of whatever token comes first.
So, as TGI does with prefix_offset/read_offset, each step decodes a small window twice: the last
emitted group of tokens alone, and that group plus the pending tokens. The new text is the
difference, held back while it still ends in U+FFFD. Both decodes start at the same token, so
start-of-text effects cancel; the window starts where emitted text ended on a whole character,
so it never starts mid-character. The concatenated output equals `tokenizer.decode(all_ids)`.
"""
from __future__ import annotations

import re

import tokenizers

_INCOMPLETE = "\ufffd"


class StreamDecoder:
    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []  # the last emitted group, then the pending tokens
        self._read = 0             # self._ids[:self._read] is the last emitted group

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", never a partial character)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation), even if incomplete."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        # A trailing U+FFFD is a character whose remaining bytes are in tokens not seen yet;
        # an unchanged length is a skipped special token or an empty piece.
        if not final and (len(text) <= len(emitted) or text.endswith(_INCOMPLETE)):
            return ""
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(emitted):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The exact bytes one token stands for, even when it is part of a UTF-8 character (what
    OpenAI's logprobs `bytes` carry): byte-level BPE pieces through GPT-2's alphabet, `<0xNN>`
    byte-fallback pieces, and decoded text for everything else (special tokens included)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel)
        self._added = set(tokenizer.get_added_tokens_decoder())

    def __call__(self, token_id: int) -> bytes:
        piece = self._tokenizer.id_to_token(int(token_id))
        if piece is None:
            return b""
        if token_id not in self._added:
            if self._byte_level and all(c in _BYTE_DECODER for c in piece):
                return bytes(_BYTE_DECODER[c] for c in piece)
            if m := _BYTE_FALLBACK.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
        return self._tokenizer.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")


_PROBE = "a  b\t\n\n c  \u00e9 e\u0301 \u1100\u1161 ~"


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token stands for: every id decoded alone (a byte-level piece of
    a character decodes to U+FFFD, 3 bytes: still an upper bound), added tokens included; ~0.2 s
    for 49k ids, computed once, on the first prompt at least max_ctx bytes long. 0 when the
    tokenizer does not keep every byte (a normalizer, or whitespace dropped: the probe does not
    survive a round trip), so a text's size says nothing about its token count."""
    if tokenizer.normalizer is not None or \
            tokenizer.decode(tokenizer.encode(_PROBE, add_special_tokens=False).ids) != _PROBE:
        return 0
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    pieces = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    return max(len(p.encode()) for p in pieces)
