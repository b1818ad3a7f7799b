from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer

from edge.engine.detokenizer import StreamDecoder

TEXTS = [
    "plain ascii, nothing special.",
    "Café naïve résumé — Ångström, façade, Øresund.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧 and flags 🇫🇷🇯🇵!",
    "CJK: 世界你好, 日本語のテキスト, 한국어 문장.",
    "mixed😀世界é\n\n  indented\tand 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛑 ≈ 3.14159",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory) -> Tokenizer:
    # A directory of its own: the shared asset cache also holds Llama 3's tokenizer.model,
    # which from_pretrained would silently load instead of the GGUF's tokenizer.
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=smollm2_gguf.name).backend_tokenizer
    assert tok.get_vocab_size() == 49152
    return tok


def llama2_style_tokenizer() -> Tokenizer:
    """SentencePiece-like: ▁ for spaces, <0xNN> byte fallback, and a decoder that strips the
    first leading space (Replace, ByteFallback, Fuse, Strip), as Llama 2 and Mistral use."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(",.!:—-\n\t") + ["é", "ï"]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


METASPACE_WORDS = "hello world, Café naïve résumé 世界 你好 😀 👍🏽 end.".split()


def metaspace_tokenizer() -> Tokenizer:
    """Whole-word pieces with a Metaspace decoder, which drops the first token's leading space."""
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + ["▁" + w for w in METASPACE_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["</s>"])
    return tok


def stream(tokenizer, ids, **kwargs) -> list[str]:
    decoder = StreamDecoder(tokenizer, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def assert_streams_exactly(tokenizer, ids, **kwargs):
    chunks = stream(tokenizer, ids, **kwargs)
    assert "".join(chunks) == tokenizer.decode(ids, **kwargs)
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # no lone surrogates: each chunk is whole code points


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_stream_equals_decode(smollm2_tokenizer, text):
    assert_streams_exactly(smollm2_tokenizer, smollm2_tokenizer.encode(text).ids)


def test_byte_level_tokens_do_split_characters(smollm2_tokenizer):
    # The premise of the tests above: some single tokens decode to U+FFFD on their own.
    ids = smollm2_tokenizer.encode(TEXTS[2]).ids
    assert any("\ufffd" in smollm2_tokenizer.decode([i]) for i in ids)
    chunks = stream(smollm2_tokenizer, ids)
    assert "" in chunks[:-1]  # something was held back until its character completed


def test_chunks_end_on_character_boundaries(smollm2_tokenizer):
    text = TEXTS[4]
    ids = smollm2_tokenizer.encode(text).ids
    assert smollm2_tokenizer.decode(ids) == text
    position = 0
    for chunk in stream(smollm2_tokenizer, ids):
        assert text.startswith(chunk, position)
        position += len(chunk)
    assert position == len(text)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_flag(smollm2_tokenizer, skip):
    eos, bos = smollm2_tokenizer.token_to_id("<|im_end|>"), smollm2_tokenizer.token_to_id("<|im_start|>")
    ids = [bos] + smollm2_tokenizer.encode("Hi 😀").ids + [eos]
    assert_streams_exactly(smollm2_tokenizer, ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(stream(smollm2_tokenizer, ids, skip_special_tokens=skip))) != skip


@pytest.mark.parametrize("text", TEXTS)
def test_llama2_style_stream_equals_decode(text):
    tok = llama2_style_tokenizer()
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert_streams_exactly(tok, ids)


@pytest.mark.parametrize("order", [range(len(METASPACE_WORDS)), [5, 6, 0, 3, 3, 7, 1], [7, 8, 7, 2, 9]])
def test_metaspace_stream_equals_decode(order):
    tok = metaspace_tokenizer()
    text = " ".join(METASPACE_WORDS[i] for i in order)
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert_streams_exactly(tok, ids)
    # the premise: decoding pieces separately loses the spaces the decoder strips from each first token
    assert "".join(tok.decode([i]) for i in ids) == text.replace(" ", "")


def test_decodes_only_a_small_window(smollm2_tokenizer):
    class Recording:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return smollm2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = smollm2_tokenizer.encode(" ".join(TEXTS) * 8).ids
    recording = Recording()
    assert "".join(stream(recording, ids)) == smollm2_tokenizer.decode(ids)
    assert len(ids) > 500
    assert recording.longest <= 8
