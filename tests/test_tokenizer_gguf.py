"""The tokenizer rebuilt from SmolLM2's GGUF metadata against transformers' from the same file.

transformers knows no pre-tokenizer named "smollm" and falls back to the plain GPT-2 split;
llama.cpp, whose meaning of the name we follow (as SmolLM2's own tokenizer.json does), first
splits digits one by one. The reference is therefore transformers' tokenizer with SmolLM2's
pre-tokenizer put back; everything else (vocabulary, merges, added tokens, post-processor)
is transformers' own. `test_digits_split_like_llama_cpp` pins the difference.
"""
from __future__ import annotations

import os

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from convert.gguf_metadata import read_metadata
from convert.gguf_tokenizer import PRE_TOKENIZERS, add_bos_token, bytes_to_unicode, tokenizer_json_from_gguf
from tests.tokenizer_corpus import CORPUS

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def reader(smollm2_gguf) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def meta(reader) -> dict:
    return read_metadata(reader)


@pytest.fixture(scope="module")
def ours(meta) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json_from_gguf(meta))


@pytest.fixture(scope="module")
def reference(smollm2_gguf, tmp_path_factory):
    """transformers' tokenizer from the GGUF, in a directory of its own (next to a stray
    tokenizer.model transformers would read that instead), with SmolLM2's pre-tokenizer."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("smollm2")
    (directory / smollm2_gguf.name).symlink_to(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=smollm2_gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def test_metadata_equals_gguf_own_decoding(reader, meta):
    assert meta.keys() == reader.fields.keys()
    for name, field in reader.fields.items():
        assert meta[name] == field.contents(), name
    assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"] == 49152
    assert isinstance(meta["tokenizer.ggml.add_bos_token"], bool)
    assert isinstance(meta["llama.rope.freq_base"], float)
    assert all(isinstance(t, int) for t in meta["tokenizer.ggml.token_type"])


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_match_transformers_on_corpus(ours, reference, add_special_tokens):
    mismatches = [
        (s, got, want) for s in CORPUS
        if (got := ours.encode(s, add_special_tokens=add_special_tokens).ids)
        != (want := reference.encode(s, add_special_tokens=add_special_tokens))
    ]
    assert len(CORPUS) >= 200
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]}"


def test_decode_round_trips(ours):
    """Every corpus string comes back, less the few bytes SmolLM2's vocabulary cannot spell
    (such as \\x1d), which byte-level BPE drops in transformers and here alike."""
    vocab = ours.get_vocab()
    spellable = {b for b, ch in bytes_to_unicode().items() if ch in vocab}
    assert len(spellable) > 230
    for s in CORPUS:
        kept = "".join(ch for ch in s if set(ch.encode()) <= spellable)
        assert ours.decode(ours.encode(s).ids, skip_special_tokens=False) == kept, repr(s)


def test_control_tokens_encode_whole(ours, meta):
    assert ours.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]
    control = [t for t, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]) if k == 3]
    assert control and all(ours.encode(t).ids == [ours.token_to_id(t)] for t in control)


def test_digits_split_like_llama_cpp(ours):
    """llama.cpp's "smollm" split isolates each digit first, so the spaces before a number stay
    one piece; transformers' GPT-2 fallback would give "ĠĠ", "Ġ" + ... instead."""
    ids = ours.token_to_id
    assert ours.encode("   42").ids == [ids("ĠĠĠ"), ids("4"), ids("2")]
    assert ours.encode("a  1").ids == [ids("a"), ids("ĠĠ"), ids("1")]


def test_bos_follows_the_file_and_llama_cpp_defaults(meta):
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert Tokenizer.from_str(tokenizer_json_from_gguf(meta)).encode("hi").ids == [6004]
    flagged = {**meta, "tokenizer.ggml.add_bos_token": True}
    assert Tokenizer.from_str(tokenizer_json_from_gguf(flagged)).encode("hi").ids == [1, 6004]
    unflagged = {k: v for k, v in meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert not add_bos_token(unflagged)
    assert add_bos_token({**unflagged, "tokenizer.ggml.pre": "llama-bpe"})


def test_eos_flag_appends_eos(meta):
    tok = Tokenizer.from_str(tokenizer_json_from_gguf({**meta, "tokenizer.ggml.add_eos_token": True}))
    assert tok.encode("hi").ids == [6004, 2]
    assert tok.encode("hi", add_special_tokens=False).ids == [6004]


@pytest.mark.parametrize("model", ["llama", "bert", "t5", None])
def test_unsupported_model_is_named(meta, model):
    with pytest.raises(ValueError, match=repr(model)):
        tokenizer_json_from_gguf({**meta, "tokenizer.ggml.model": model})


@pytest.mark.parametrize("pre", ["qwen2", "default", None])
def test_unsupported_pre_tokenizer_is_named(meta, pre):
    assert pre not in PRE_TOKENIZERS
    with pytest.raises(ValueError, match="pre-tokenizer " + repr(pre)):
        tokenizer_json_from_gguf({**meta, "tokenizer.ggml.pre": pre})


def test_missing_merges_are_named(meta):
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        tokenizer_json_from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
