"""Text checks both HTTP APIs make on a request body before anything reads it."""
from __future__ import annotations

from pydantic import BaseModel, model_validator


def lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for k, v in value.items():
            if (where := lone_surrogate(k, path) if isinstance(k, str) else None) is not None:
                return where
            if (where := lone_surrogate(v, f"{path}.{k}" if path else str(k))) is not None:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (where := lone_surrogate(v, f"{path}.{i}" if path else str(i))) is not None:
                return where
    return None


def surrogate_message(where: str) -> str:
    return (f"{where or 'the body'}: contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
            "which is not valid Unicode text")


def valid_unicode(data):
    """A request body's pydantic "before" check: JSON may spell a lone surrogate ("\\ud800"),
    which no tokenizer can encode and no byte count gets right."""
    if (where := lone_surrogate(data)) is not None:
        raise ValueError(surrogate_message(where))
    return data


class UnicodeBody(BaseModel):
    """A request body: any text in it (a message, a prompt, a stop string, a tool's schema)
    must be valid Unicode, or no tokenizer can read it and no byte count is right."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        return valid_unicode(data)
