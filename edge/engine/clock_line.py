"""Home Assistant's clock line moved to the end of the system message, so that the prompt of
a home keeps one prefix from conversation to conversation.

Home Assistant 2025.x begins the Assist system prompt with `Current time is HH:MM:SS. Today's
date is YYYY-MM-DD.` (later releases put it last when no GetDateTime tool is offered). A
prefix cache can reuse nothing past a line that changes every second, so with the line first
every conversation reads the whole home again: 21 s to the first word for 50 exposed entities
on a 2-core machine, against under a second with the line last (bench/README.md). The line
says the same at the end of the message, where Home Assistant itself now puts it.
"""
from __future__ import annotations

import re

CLOCK_LINE = re.compile(r"Current time is \d{1,2}:\d{2}(?::\d{2})?(?: ?[AaPp][Mm])?\. "
                        r"Today's date is \d{4}-\d{2}-\d{2}\.[ \t]*\n")


def clock_last(messages: list[dict]) -> list[dict]:
    """`messages` with a leading clock line of the first (system) message moved to its end;
    anything else is returned as it is."""
    first = messages[0] if messages else None
    if not isinstance(first, dict) or first.get("role") not in ("system", "developer"):
        return messages
    content = first.get("content")
    m = CLOCK_LINE.match(content) if isinstance(content, str) else None
    if m is None or not content[m.end():].strip():
        return messages
    moved = content[m.end():].rstrip("\n") + "\n" + m.group(0).strip()
    return [{**first, "content": moved}, *messages[1:]]
