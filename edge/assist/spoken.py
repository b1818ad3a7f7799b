"""What makes a reply fit to be spoken: it ends at a sentence end, soon after a token budget,
in the language the user spoke, and a failure is a short sentence too."""
from __future__ import annotations

import re

# What Assist says when it cannot answer (sent as `not-handled`, then the connection closes).
BUSY = "Sorry, I am busy right now. Please try again in a moment."
EMPTY = "Sorry, I did not catch a question."
TOO_LONG = "Sorry, that is too long for me."
UNREADABLE = "Sorry, I could not read that request."
FAILED = "Sorry, something went wrong while I was answering."

_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*$")

# The languages Home Assistant's pipelines commonly send, by their code's first part.
LANGUAGE_NAMES = {
    "ar": "Arabic", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "fi": "Finnish", "fr": "French", "hu": "Hungarian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nb": "Norwegian", "nl": "Dutch",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "sk": "Slovak", "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "zh": "Chinese",
}
_LANGUAGE_CODE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


def language_line(language: str | None) -> str | None:
    """The system prompt's line for the transcript's language ("de-CH" -> "Answer in German
    (de-CH)."); None for no language or a value that is not a language tag."""
    if not isinstance(language, str) or not _LANGUAGE_CODE.match(language):
        return None
    name = LANGUAGE_NAMES.get(language.split("-")[0].split("_")[0].lower())
    return f"Answer in {name} ({language})." if name else f"Answer in the language with the code {language}."


def system_prompt(system: str | None, language: str | None) -> str | None:
    line = language_line(language)
    if line is None:
        return system
    return f"{system}\n{line}" if system else line


class SentenceBudget:
    """Cuts a streamed reply at the first sentence end once `budget` tokens have been
    generated. `feed(piece)` returns the text to pass on and whether the reply is complete
    (the piece that opens the next sentence is not passed on). A sentence ends at . ! ? or
    … (with closing quotes or brackets) followed by whitespace, or at a line break."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.tokens = 0
        self.text = ""

    def feed(self, piece: str, tokens: int = 1) -> tuple[str, bool]:
        if self.budget is not None and self.tokens >= self.budget and self._ends_here(piece):
            return "", True
        self.tokens += tokens
        self.text += piece
        return piece, False

    def _ends_here(self, piece: str) -> bool:
        before = self.text.rstrip(" \t")
        if self.text.endswith("\n") and self.text.strip():
            return True
        return bool(piece[:1].isspace() and _SENTENCE_END.search(before))

    def complete_sentences(self) -> str:
        """The text up to its last sentence end (all of it when it has none): what a reply cut
        off by the token limit should say."""
        text = self.text.strip()
        ends = [m.end() for m in re.finditer(r"[.!?…。！？][\"'”’)\]]*(?=\s|$)", text)]
        return text[:ends[-1]] if ends else text
