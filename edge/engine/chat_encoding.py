"""Chat messages -> token ids, where only the chat template's own markup becomes special tokens.

Rendering a template and tokenizing the text, as transformers' `apply_chat_template` and
llama.cpp do, lets a message forge turns: a user who writes `<|eot_id|><|start_header_id|>system
<|end_header_id|>` gets the real special ids. Here every special-token string inside the caller's
data (message contents, tool calls, tools, template variables; not dict keys) is wrapped in
private-use markers before rendering (the markers transformers' `sanitize_control_tokens` uses;
any already in the text are dropped first). The rendered text is then cut at the special tokens
that are *not* marked, which only the template can have written; everything between them,
markers removed, is encoded with special-token matching off, i.e. as plain text, which is what
Meta's tiktoken tokenizer does in plain-text mode. With no special-token text in the data, the
ids are exactly those of encoding the rendered text normally (= `apply_chat_template`).

The raw completions path (`Engine.encode_text`) still parses special tokens: its prompt is the
caller's own template.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tokenizers import Tokenizer

from edge.engine.chat_template import ChatTemplate

MARK_START, MARK_END = "\U000f0000", "\U000f0001"


class ChatEncoder:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.template = template
        specials = [(i, t) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
        specials.sort(key=lambda it: len(it[1].content), reverse=True)   # longest first, like the tokenizer
        self._special_ids = {t.content: i for i, t in specials}
        plain = "|".join(re.escape(t.content) for _, t in specials) or "(?!)"
        self._special_text = re.compile(plain)
        # As the tokenizer matches them in text, lstrip/rstrip tokens take the whitespace beside
        # them (`_strip`); found with the plain alternation of literals, which the regex engine
        # skips through by first character (a `\s*` per alternative made it try all of them at
        # every position: 0.22 s for a 4.5 kB prompt with Llama 3's 256 special tokens).
        self._strips = {t.content: (t.lstrip, t.rstrip) for _, t in specials}
        self._marked = re.compile(f"{MARK_START}({plain}){MARK_END}|[{MARK_START}{MARK_END}]")
        self._as_text = Tokenizer.from_str(tokenizer.to_str())
        self._as_text.encode_special_tokens = True      # special added tokens are not matched

    def encode(self, messages: list[dict], add_generation_prompt: bool = True, *,
               continue_final_message: bool = False, **extra) -> list[int]:
        text = self.template.render(self.mark(messages), add_generation_prompt,
                                    continue_final_message=continue_final_message, **self.mark(extra))
        return self.encode_rendered(text)

    def mark(self, obj: Any) -> Any:
        """Wrap the special-token strings in every string of `obj` (recursively; not dict keys)."""
        if isinstance(obj, str):
            obj = obj.replace(MARK_START, "").replace(MARK_END, "")
            return self._special_text.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
        if isinstance(obj, Mapping):
            return {k: self.mark(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.mark(v) for v in obj]
        return obj

    def _strip(self, piece: str, m: re.Match, at: int) -> tuple[int, int]:
        """The span a special token takes in `piece`: with the whitespace before it (back to
        `at`) when it strips left, and after it when it strips right."""
        lstrip, rstrip = self._strips[m.group(0)]
        start, end = m.start(), m.end()
        if lstrip:
            while start > at and piece[start - 1].isspace():
                start -= 1
        if rstrip:
            while end < len(piece) and piece[end].isspace():
                end += 1
        return start, end

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a rendered chat: unmarked special tokens by id, the rest as plain text."""
        ids: list[int] = []
        run: list[str] = []             # plain text since the last template special token

        def flush():
            if run:
                ids.extend(self._as_text.encode("".join(run), add_special_tokens=False).ids)
                run.clear()

        # split() alternates: template text, marked token (or None for a lone marker), template text, ...
        for k, piece in enumerate(self._marked.split(text)):
            if not piece:
                continue
            if k % 2:                   # a marked token from the caller's data: plain text
                run.append(piece)
                continue
            at = 0
            for m in self._special_text.finditer(piece):
                if m.start() < at:      # inside the whitespace an rstrip token took
                    continue
                start, end = self._strip(piece, m, at)
                run.append(piece[at:start])
                flush()
                ids.append(self._special_ids[m.group(0)])
                at = end
            run.append(piece[at:])
        flush()
        return ids
