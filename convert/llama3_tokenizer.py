"""Llama 3's tokenizer from Meta's own `tokenizer.model`, and its vocabulary written into a GGUF.

Meta ships Llama 3's vocabulary as a tiktoken file (one "base64(token) rank" line per token)
and defines the 256 special tokens and the split regex in code (`llama_models/llama3/
tokenizer.py`). We rebuild it as Hugging Face byte-level BPE the way transformers'
TikTokenConverter does: merges are recovered from the ranks, and merges are ignored for a
piece that is itself a token, which is what makes BPE-with-merges agree with tiktoken.
The post-processor adds <|begin_of_text|> like HF's Llama 3 tokenizer.json.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from gguf import GGUFWriter, TokenType
from tokenizers import AddedToken, Tokenizer

from convert.gguf_tokenizer import byte_level_bpe, bytes_to_unicode, template_processor

NUM_SPECIAL_TOKENS = 256
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
_NAMED_SPECIAL_TOKENS = [
    BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]


def special_tokens() -> list[str]:
    """Llama 3's special tokens in id order (ids follow the last ranked token, 128000 on)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))]
    return _NAMED_SPECIAL_TOKENS + reserved


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Token bytes -> rank from a tiktoken file; a malformed line is an error, not skipped."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a 'base64 rank' line: {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of each token into two ranked tokens, ordered by the rank of the token they
    make (then by the ranks of the parts), as transformers' TikTokenConverter orders them."""
    merges: list[tuple[bytes, bytes]] = []
    for token in sorted(ranks, key=ranks.__getitem__):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]]))
    return merges


def tokenizer_json_from_tiktoken(path: str | Path) -> str:
    """The Llama 3 tokenizer (tokenizers JSON) from Meta's `tokenizer.model`."""
    ranks = load_ranks(path)
    spell = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = byte_level_bpe(vocab, merges, "llama3", ignore_merges=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens()])
    if tok.token_to_id(BOS) != len(ranks):
        raise ValueError(f"{path}: special tokens did not land at ids {len(ranks)}.. as Llama 3 numbers them")
    tok.post_processor = template_processor((BOS, len(ranks)), None)
    return tok.to_str()


def write_llama3_vocab_to_gguf(writer: GGUFWriter, tokenizer_json: str, eos_token: str = EOS) -> None:
    """Write a Llama 3 vocabulary as llama.cpp's convert_hf_to_gguf.py does: model "gpt2", pre
    "llama-bpe", every id's token (a gap becomes "[PAD<id>]", UNUSED), special added tokens as
    CONTROL, merges as "a b", BOS/EOS ids, and whether encode() adds BOS/EOS.
    `eos_token` is "<|eot_id|>" for the instruct models, whose generation ends a turn."""
    tok = Tokenizer.from_str(tokenizer_json)
    spec = json.loads(tokenizer_json)
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {t["id"]: t["special"] for t in spec["added_tokens"]}
    size = max(by_id) + 1
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(size)])
    writer.add_token_types([_token_type(i, by_id, added) for i in range(size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    bos_id, eos_id = vocab[BOS], vocab[eos_token]
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    added_by_encode = tok.encode("").ids
    writer.add_add_bos_token(bos_id in added_by_encode)
    writer.add_add_eos_token(eos_id in added_by_encode)


def _token_type(i: int, by_id: dict[int, str], added: dict[int, bool]) -> TokenType:
    if i not in by_id:
        return TokenType.UNUSED
    if i in added:
        return TokenType.CONTROL if added[i] else TokenType.USER_DEFINED
    return TokenType.NORMAL
