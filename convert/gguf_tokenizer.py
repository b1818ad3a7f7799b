"""A Hugging Face `tokenizers` JSON from the tokenizer a GGUF describes.

A GGUF carries no tokenizer.json, only llama.cpp's metadata: the token list, the BPE merges,
a type per token and the name of a pre-tokenizer (`tokenizer.ggml.pre`). We rebuild what
transformers builds from the same metadata (byte-level BPE, control tokens as special added
tokens, BOS/EOS template from the add_*_token flags), and take the pre-tokenizer for each
`pre` name from llama.cpp, whose `llama-vocab.cpp` is the reference for what a name means.

Where the two disagree we follow llama.cpp, because it reproduces the model's own tokenizer:
- "smollm" (and the others llama.cpp groups with it): digits are split one by one before the
  GPT-2 split, as in SmolLM2's tokenizer.json. transformers knows no "smollm" and falls back to
  the plain GPT-2 split, which tokenizes e.g. "   42" or "a  1" differently.
- the Llama 3 family ignores merges (a piece that is itself a token is kept whole), as
  llama.cpp, tiktoken and HF's Llama 3 tokenizer.json do; transformers' GGUF loader does not,
  and then differs from Meta's tokenizer on some text (e.g. Vietnamese "dấu: ắ ằ").
- without an explicit `tokenizer.ggml.add_bos_token`, the Llama 3 family adds BOS.
Only byte-level BPE ("gpt2") vocabularies are supported; anything else raises ValueError.
"gpt2" is also accepted as a pre name (llama.cpp spells it "gpt-2"): it is transformers' fallback.
"""
from __future__ import annotations

from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre name -> (how text is split before BPE, ignore_merges), per llama.cpp's llama-vocab.cpp.
_LLAMA3 = ("llama3", True)
_GPT2 = ("gpt2", False)
_DIGITS_GPT2 = ("digits+gpt2", False)
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], ("llama3", False)),
    **dict.fromkeys(["gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4",
                     "granite-docling"], _GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], _DIGITS_GPT2),
}
_ADD_BOS_BY_DEFAULT = {name for name, spec in PRE_TOKENIZERS.items() if spec == _LLAMA3}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """The post-processor transformers installs: BOS/EOS around each sequence when enabled."""
    def sequence(name: str, type_id: int) -> list[str]:
        return [f"{t[0]}:{type_id}" for t in (bos,) if t] + [f"${name}:{type_id}"] + \
               [f"{t[0]}:{type_id}" for t in (eos,) if t]

    single = sequence("A", 0)
    return processors.TemplateProcessing(single=single, pair=single + sequence("B", 1),
                                         special_tokens=[t for t in (bos, eos) if t])


def add_bos_token(meta: dict[str, Any]) -> bool:
    """Whether plain `encode(text)` should start with BOS, the way llama.cpp decides it."""
    default = meta.get("tokenizer.ggml.pre") in _ADD_BOS_BY_DEFAULT
    return bool(meta.get("tokenizer.ggml.add_bos_token", default)) and "tokenizer.ggml.bos_token_id" in meta


def tokenizer_json_from_gguf(meta: dict[str, Any]) -> str:
    """Build the tokenizer from `read_metadata(...)` output; raises ValueError if unsupported."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    split, ignore_merges = PRE_TOKENIZERS[pre]
    raw = _required(meta, "tokenizer.ggml.tokens")
    tokens = _byte_level_spelling(raw)
    merges = [_split_merge(m) for m in _required(meta, "tokenizer.ggml.merges")]
    tok = byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, split, ignore_merges)
    _add_typed_tokens(tok, raw, meta.get("tokenizer.ggml.token_type") or [])
    tok.post_processor = template_processor(*_bos_eos(meta, tokens))
    return tok.to_str()


def _required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF has no {key}")
    return meta[key]


def _byte_level_spelling(tokens: list[str]) -> list[str]:
    """Tokens written as raw text are respelled in the byte alphabet, as transformers does."""
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    return [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")) for t in tokens]


def _split_merge(merge: str) -> tuple[str, str]:
    """Split "a b" at the first space after the first character, as llama.cpp does."""
    i = merge.index(" ", 1)
    return merge[:i], merge[i + 1:]


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], split: str,
                   ignore_merges: bool) -> Tokenizer:
    """Byte-level BPE whose text is first cut by `split`: "llama3", "gpt2" or "digits+gpt2"."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    tok.pre_tokenizer = _splitter(split)
    tok.decoder = decoders.ByteLevel()
    return tok


def _splitter(split: str) -> pre_tokenizers.PreTokenizer:
    if split == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "gpt2":
        return gpt2
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])


def _add_typed_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so
    that text such as "<|im_start|>" encodes to its one id. Like transformers, we skip those the
    file spells outside the byte alphabet: such a control token is a llama.cpp mislabel, and
    adding either would grow the vocabulary past the model's."""
    alphabet = set(bytes_to_unicode().values())
    typed = [(t, k) for t, k in zip(tokens, types)
             if k in (TokenType.CONTROL, TokenType.USER_DEFINED) and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in typed if k == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in typed if k == TokenType.USER_DEFINED])


def _bos_eos(meta: dict[str, Any], tokens: list[str]) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos_id is not None
    return ((tokens[bos_id], bos_id) if add_bos_token(meta) else None,
            (tokens[eos_id], eos_id) if add_eos else None)

