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
