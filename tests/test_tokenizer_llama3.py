"""Llama 3's tokenizer, rebuilt from Meta's tokenizer.model, against Meta's own tiktoken code;
then its vocabulary written into a GGUF and read back, against the same reference.

The reference encodes special-token text as special tokens (allowed_special="all"), which is
what a `tokenizers` tokenizer does with its special added tokens.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from convert.gguf_metadata import read_metadata
from convert.gguf_tokenizer import LLAMA3_SPLIT, tokenizer_json_from_gguf
from convert.llama3_tokenizer import (
    load_ranks,
    special_tokens,
    tokenizer_json_from_tiktoken,
    write_llama3_vocab_to_gguf,
)
from tests.tokenizer_corpus import CORPUS


@pytest.fixture(scope="module")
def tokenizer_json(llama3_tiktoken_model) -> str:
    return tokenizer_json_from_tiktoken(llama3_tiktoken_model)


@pytest.fixture(scope="module")
def ours(tokenizer_json) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)


@pytest.fixture(scope="module")
def gguf_meta(tokenizer_json, tmp_path_factory) -> dict:
    """The vocabulary written into a small GGUF (one dummy tensor) and read back."""
    path = tmp_path_factory.mktemp("llama3") / "llama3-vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    write_llama3_vocab_to_gguf(writer, tokenizer_json)
    writer.add_tensor("token_embd.weight", np.zeros((1, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_metadata(gguf.GGUFReader(path))


@pytest.fixture(scope="module")
def from_gguf(gguf_meta) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json_from_gguf(gguf_meta))


def reference_ids(ref, s: str, bos: bool) -> list[int]:
    return ref.encode(s, bos=bos, eos=False, allowed_special="all")


def mismatches(tok: Tokenizer, ref, add_special_tokens: bool) -> list[tuple[str, list[int], list[int]]]:
    return [
        (s, got, want) for s in CORPUS
        if (got := tok.encode(s, add_special_tokens=add_special_tokens).ids)
        != (want := reference_ids(ref, s, bos=add_special_tokens))
    ]


def test_split_regex_and_special_tokens_are_metas(llama3_reference_tokenizer, ours):
    ref = llama3_reference_tokenizer
    assert LLAMA3_SPLIT == ref.pat_str
    assert len(special_tokens()) == 256
    assert {t: ours.token_to_id(t) for t in special_tokens()} == ref.special_tokens
    assert ours.get_vocab_size() == ref.n_words == 128256


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_match_meta_reference_on_corpus(llama3_reference_tokenizer, ours, add_special_tokens):
    bad = mismatches(ours, llama3_reference_tokenizer, add_special_tokens)
    assert len(CORPUS) >= 200
    assert not bad, f"{len(bad)} of {len(CORPUS)} differ, first: {bad[0]}"


def test_decode_round_trips(llama3_reference_tokenizer, ours):
    for s in CORPUS:
        ids = ours.encode(s, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == s == llama3_reference_tokenizer.decode(ids), repr(s)


def test_begin_of_text_is_added_once(ours):
    assert ours.encode("Hi").ids == [128000, 13347]
    assert ours.encode("<|begin_of_text|>Hi", add_special_tokens=False).ids == [128000, 13347]


def test_malformed_tiktoken_line_is_refused(tmp_path, llama3_tiktoken_model):
    bad = tmp_path / "tokenizer.model"
    lines = llama3_tiktoken_model.read_text().splitlines()
    bad.write_text("\n".join(lines[:5] + ["not-base64!! 5"] + lines[6:10]))
    with pytest.raises(ValueError, match=":6:"):
        load_ranks(bad)


def test_gguf_carries_llama_cpp_vocab_keys(gguf_meta):
    types = gguf_meta["tokenizer.ggml.token_type"]
    tokens = gguf_meta["tokenizer.ggml.tokens"]
    assert gguf_meta["tokenizer.ggml.model"] == "gpt2"
    assert gguf_meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(tokens) == len(types) == 128256
    assert tokens[128000:] == special_tokens()
    assert set(types[:128000]) == {gguf.TokenType.NORMAL} and set(types[128000:]) == {gguf.TokenType.CONTROL}
    assert len(gguf_meta["tokenizer.ggml.merges"]) == len(set(gguf_meta["tokenizer.ggml.merges"])) > 250_000
    assert (gguf_meta["tokenizer.ggml.bos_token_id"], gguf_meta["tokenizer.ggml.eos_token_id"]) == (128000, 128001)
    assert gguf_meta["tokenizer.ggml.add_bos_token"] is True
    assert gguf_meta["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_gguf_round_trip_matches_meta_reference(llama3_reference_tokenizer, from_gguf, add_special_tokens):
    bad = mismatches(from_gguf, llama3_reference_tokenizer, add_special_tokens)
    assert not bad, f"{len(bad)} of {len(CORPUS)} differ, first: {bad[0]}"
