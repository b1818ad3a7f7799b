"""Constrained decoding: a grammar held to by a per-sequence logits mask.

A request carries a `Grammar` (a JSON schema, "any JSON object", or a Lark grammar); the engine
starts one `Matcher` per sequence, asks it for the allowed tokens before each sampling step and
advances it with the sampled token. The grammar engine is llguidance (Microsoft's, the one
behind llama.cpp's `%llguidance` grammars, vLLM and SGLang): it builds the token mask lazily
from a lexer and an Earley parser over a token trie, so compiling a schema costs milliseconds
whatever the vocabulary size and a mask costs tens of microseconds; it reads the bundle's
`tokenizer.json` (Hugging Face `tokenizers` format) directly, and ships abi3 wheels for Linux
aarch64. outlines-core, the alternative, precomputes a regex index over the whole vocabulary
per schema (seconds for a 128k vocabulary), cannot express recursive JSON ("any object"), and
needs its vocabulary rebuilt by hand from the tokenizer's byte encoding.

The end-of-sequence tokens are the grammar's end: they are allowed exactly when the grammar
accepts what has been generated.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np


MAX_SCHEMA_DEPTH = 64      # objects/arrays nested in a schema: far beyond real ones, far below Python's recursion limit
# llguidance's bounds on one grammar's work (its defaults, which bound a mask to milliseconds);
# errors leave out the parser's state, which would echo the schema and output into messages
GRAMMAR_LIMITS = {"verbose_errors": False}


class ConstraintError(ValueError):
    """A grammar or schema the engine cannot compile; the message names the problem."""


class GrammarFailed(ConstraintError):
    """A grammar that failed while generating (e.g. a step exceeding its limits)."""


def check_depth(value, origin: str) -> None:
    """ConstraintError when `value` (a schema, JSON-shaped) nests objects and arrays more than
    MAX_SCHEMA_DEPTH deep; checked without recursion, so any depth is answered."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            inner = item.values()
        elif isinstance(item, (list, tuple)):
            inner = item
        else:
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise ConstraintError(f"{origin} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep")
        stack.extend((x, depth + 1) for x in inner)


@dataclass(frozen=True)
class Grammar:
    """What the output must match, as llguidance's grammar text. Build it with the class methods;
    `origin` names what it came from, for error messages ("response_format.json_schema")."""
    source: str
    origin: str = "grammar"

    @classmethod
    def json_schema(cls, schema, origin: str = "json_schema") -> Grammar:
        """Output one JSON value valid against `schema` (a dict, or True/False)."""
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"{origin} must be a JSON object (a JSON schema), got {type(schema).__name__}")
        check_depth(schema, origin)
        return cls(_ll().LLMatcher.grammar_from_json_schema(_schema_text(compact(schema), origin)), origin)

    @classmethod
    def json_object(cls, origin: str = "response_format") -> Grammar:
        """Any JSON object (OpenAI's JSON mode)."""
        return cls.json_schema({"type": "object"}, origin)

    @classmethod
    def lark(cls, text: str, origin: str = "grammar") -> Grammar:
        """A Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON schema)."""
        return cls(_ll().LLMatcher.grammar_from_lark(text), origin)


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def compact(schema):
    """`schema` set to be written on one line, `{"a": 1, "b": [2, 3]}` (Python's json.dumps
    layout): with free whitespace, small models pad JSON with newlines until max_tokens."""
    if isinstance(schema, dict) and "x-guidance" not in schema:
        return {**schema, "x-guidance": JSON_LAYOUT}
    return schema


def closed(schema, origin: str = "schema"):
    """`schema` with every object that lists `properties` but says nothing of others closed
    (`additionalProperties: false`), as OpenAI's strict mode requires: output valid against the
    result is valid against the original, and a small model cannot wander off into made-up keys.
    ConstraintError for a schema nested too deep (`check_depth`)."""
    check_depth(schema, origin)
    return _closed(schema)


def _closed(schema):
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _schema_text(schema, origin: str) -> str:
    try:
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{origin} is not serialisable as JSON: {e}") from e


def _ll():
    import llguidance      # imported on first use: plain generation never pays for it
    return llguidance


class Grammars:
    """One model's grammar compiler: its tokenizer as llguidance sees it (built once, on first
    use), with the model's vocabulary size and eos ids.

    Given the engine's own `tokenizers.Tokenizer` of a byte-level BPE vocabulary (Llama 3,
    SmolLM2), llguidance gets each token's bytes from it once and encodes through it
    (`_Vocabulary`): Llama 3's 128k vocabulary then takes ~55 MB and ~2.5 s to build, against
    ~120 MB and ~6 s from tokenizer.json, from which llguidance builds a second tokenizer of
    its own (docs/MODELS.md, "Where the runtime's memory goes"). Other tokenizers go through
    tokenizer.json, where llguidance knows each format's pieces."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids, tokenizer=None):
        self._tokenizer_json = tokenizer_json
        self._hf = tokenizer if tokenizer is not None and _byte_level(tokenizer) and eos_ids else None
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._tokenizer = None
        self._error: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def of_bundle(cls, bundle, eos_ids=None, tokenizer=None) -> Grammars:
        """The compiler for a bundle's tokenizer (eos ids: the bundle's own unless given;
        `tokenizer`: the bundle's, already loaded, to share)."""
        return cls((bundle.path / bundle.manifest["tokenizer"]).read_text(), bundle.config.vocab_size,
                   bundle.config.eos_token_ids if eos_ids is None else eos_ids, tokenizer)

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None and self._error is None:
                ll = _ll()
                eos = self.eos_ids or None
                source = (ll.TokenizerWrapper(_Vocabulary(self._hf, self.eos_ids)) if self._hf is not None
                          else self._tokenizer_json)
                try:
                    try:        # the model's vocabulary (often padded past the tokenizer's)...
                        self._tokenizer = ll.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
                    except ValueError as e:
                        if "vocab size too small" not in str(e):
                            raise
                        # ...or the tokenizer's, when it has more entries than the model has logits
                        self._tokenizer = ll.LLTokenizer(source, eos_token=eos)
                except Exception as e:      # llguidance rejects some tokenizers (e.g. word-level ones)
                    self._error = f"this model's tokenizer cannot be used for constrained decoding: {e}"
                finally:
                    if not isinstance(source, str):
                        source.tokens = source._gtokenizer.tokens = None    # copied into llguidance's trie
                    self._tokenizer_json = None                               # read once
            if self._error:
                raise ConstraintError(self._error)
            return self._tokenizer

    def check(self, grammar: Grammar) -> None:
        """Raise ConstraintError naming the problem if `grammar` does not compile within the
        limits, or cannot even compute its first mask."""
        ll = _ll()
        message = ll.LLMatcher.validate_grammar(grammar.source, self.tokenizer, limits=_limits())
        if message:
            raise ConstraintError(f"{grammar.origin}: the schema cannot be compiled: {message}")
        matcher = self.matcher(grammar)
        try:
            matcher.allowed()
        except GrammarFailed as e:
            raise ConstraintError(f"{grammar.origin}: {e}") from e

    def matcher(self, grammar: Grammar) -> Matcher:
        m = _ll().LLMatcher(self.tokenizer, grammar.source, log_level=0, limits=_limits())
        if m.is_error():
            raise ConstraintError(f"{grammar.origin}: the schema cannot be compiled: {m.get_error()}")
        return Matcher(m, self.tokenizer.vocab_size, self.vocab_size)


def _byte_level(tokenizer) -> bool:
    import tokenizers
    return isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel)


class _Vocabulary:
    """What `llguidance.TokenizerWrapper` reads: each token's exact bytes, the special ids, an
    eos id, and text -> ids (the engine's tokenizer, as llguidance's own would encode)."""

    def __init__(self, tokenizer, eos_ids):
        from edge.engine.detokenizer import TokenBytes
        token_bytes = TokenBytes(tokenizer)
        self.tokens = [token_bytes(i) for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]
        self.special_token_ids = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
        self.eos_token_id, self.bos_token_id = eos_ids[0], None
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False).ids


def _limits():
    return _ll().LLParserLimits(**GRAMMAR_LIMITS)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, grammar_vocab: int, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size        # the model's logits; the grammar's vocabulary is at least as large
        self._bits = np.zeros((grammar_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Bool mask [vocab_size] of the tokens that keep the output inside the grammar.
        GrammarFailed when the grammar has failed (e.g. a limit of its work exceeded)."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._m.is_error():
            raise GrammarFailed(f"constrained decoding failed: {self._m.get_error()}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token outside the grammar at -inf."""
        return np.where(self.allowed(), logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def advance(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise GrammarFailed(f"constrained decoding failed: {self._m.get_error()}")

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def stopped(self) -> bool:
        """The grammar is complete and nothing may follow (only the end of the sequence)."""
        return self._m.is_stopped()
