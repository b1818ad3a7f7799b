"""What keeps a loaded model's memory down: embedding rows read without mapping the file,
llguidance's vocabulary built from the engine's own tokenizer (no second tokenizer), and
freed memory handed back once a long prompt has been read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers

from edge.engine.constraint import Grammar, Grammars
from edge.model.bundle import Bundle
from edge.model.embedding import FileRows


def test_file_rows_read_the_rows_asked_without_mapping_the_file(tmp_path):
    table = np.random.default_rng(0).integers(0, 255, (300, 48), dtype=np.uint8)
    path = tmp_path / "table.bin"
    path.write_bytes(b"x" * 4096 + table.tobytes() + b"tail")
    rows = FileRows(path, 4096, table.shape, np.uint8)
    ids = np.array([0, 299, 7, 7, 150])
    assert np.array_equal(rows[ids], table[ids])
    assert np.array_equal(rows[np.array([[3, 4], [5, 6]])], table[[[3, 4], [5, 6]]])
    assert rows[np.array([], dtype=np.int64)].shape == (0, 48)
    assert str(path) not in open("/proc/self/maps").read()
    for bad in (300, -1):
        with pytest.raises(IndexError, match="outside a table of 300 rows"):
            rows[np.array([1, bad])]


def test_file_rows_name_a_truncated_file(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(100))
    with pytest.raises(OSError, match="short read of row 3"):
        FileRows(path, 0, (10, 32), np.uint8)[np.array([0, 3])]


def test_a_bundle_embeds_through_file_rows_as_through_its_mapped_table(tiny_int8):
    b = Bundle.open(tiny_int8)
    emb = b.embedding()
    assert isinstance(emb.rows, FileRows)
    ids = np.arange(b.config.vocab_size)
    assert np.array_equal(emb.rows[ids], np.asarray(b.tensor("embed")))


def _vocabularies(tokenizer_json: str, vocab_size: int, eos: list[int]):
    hf = tokenizers.Tokenizer.from_str(tokenizer_json)
    own = Grammars(tokenizer_json, vocab_size, eos).tokenizer
    shared = Grammars(tokenizer_json, vocab_size, eos, tokenizer=hf)
    return own, shared


@pytest.mark.parametrize("which", ["llama3", "smollm2"])
def test_grammars_share_the_engines_tokenizer_with_the_same_vocabulary(which, request):
    if which == "llama3":
        text, eos = request.getfixturevalue("llama3_tokenizer_json"), [128001, 128009]
        vocab = 128256
    else:
        b = Bundle.open(request.getfixturevalue("smol_bundle"))
        text, eos, vocab = (b.path / b.manifest["tokenizer"]).read_text(), b.config.eos_token_ids, b.config.vocab_size
    own, grammars = _vocabularies(text, vocab, eos)
    assert grammars._hf is not None                  # byte-level BPE: built from the shared tokenizer
    shared = grammars.tokenizer
    assert grammars._tokenizer_json is None          # nothing of the build kept
    assert (shared.vocab_size, shared.eos_tokens) == (own.vocab_size, own.eos_tokens)
    for i in range(own.vocab_size):
        assert own.decode_bytes([i]) == shared.decode_bytes([i]), i
        assert own.is_special_token(i) == shared.is_special_token(i), i
    text = 'Hello, {"a": 1} — ünïcode 日本語 \n\t  x'
    assert shared.tokenize_str(text) == own.tokenize_str(text)


def test_grammar_masks_are_the_same_from_the_shared_tokenizer(llama3_tokenizer_json):
    import llguidance
    own, grammars = _vocabularies(llama3_tokenizer_json, 128256, [128001, 128009])
    schema = Grammar.json_schema({"type": "object", "properties": {"name": {"type": "string"},
                                                                   "n": {"type": "integer"}}}, "test")
    a = grammars.matcher(schema)
    b = llguidance.LLMatcher(own, schema.source, log_level=0)
    hf = tokenizers.Tokenizer.from_str(llama3_tokenizer_json)
    for token in hf.encode('{"name": "Ada", "n": 42}', add_special_tokens=False).ids:
        bits = np.zeros((128256 + 31) // 32, np.int32)
        b.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        assert np.array_equal(a.allowed(), np.unpackbits(bits.view(np.uint8), bitorder="little")[:128256].view(bool))
        a.advance(token)
        assert b.consume_token(token)
    assert a.accepting


def test_a_tokenizer_that_is_not_byte_level_goes_through_its_json():
    from tokenizers import models, pre_tokenizers
    t = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    g = Grammars(t.to_str(), 3, [2], tokenizer=t)
    assert g._hf is None
    assert json.loads(g._tokenizer_json)["model"]["type"] == "WordLevel"


def _multi_row_sets(model) -> set[int]:
    return {t for g in model.graphs.values() for s in g._sigs.values() for t in s._sets if t > 1}


@pytest.mark.parametrize("threads", [1, "auto"])
def test_released_chunk_buffers_are_made_again_with_the_same_results(tiny_int8, threads):
    from edge.model.backends import load_backend
    model = load_backend(Bundle.open(tiny_int8), "litert", 128, threads)
    ids = np.random.default_rng(3).integers(0, 256, 40)

    def run():
        cache = model.new_cache()
        model.prefill(ids[:37], cache)                 # chunks of 16, 16, 5 rows
        return model.prefill(ids[37:], cache, all_logits=True), model.forward(ids[:1], cache)

    first = run()
    assert _multi_row_sets(model) >= {16}
    model.release_buffers()
    assert not _multi_row_sets(model)
    again = run()
    assert _multi_row_sets(model) >= {16}
    for a, b in zip(first, again):
        assert np.array_equal(a, b)


def test_the_scheduler_releases_buffers_once_nothing_runs(tiny_int8):
    import threading

    from edge.engine.engine import Engine, GenerationParams
    from edge.engine.sampler import SamplingParams
    from edge.engine.scheduler import Scheduler
    engine = Engine(Bundle.open(tiny_int8), max_ctx=128, threads=1)
    idle = threading.Event()
    seen = []

    def on_idle():
        seen.append(_multi_row_sets(engine.model))
        idle.set()

    scheduler = Scheduler(engine, max_queue=2, time_limit=None, on_idle=on_idle)
    try:
        params = GenerationParams(sampling=SamplingParams(temperature=0.0), max_tokens=3)
        events = list(scheduler.submit(list(range(3, 43)), params).events())
        assert events[-1].finish_reason in ("stop", "length")
        assert idle.wait(60)
        assert seen == [set()]              # the 16-row chunk buffers were gone before on_idle ran
        idle.clear()
        again = list(scheduler.submit(list(range(3, 43)), params).events())
        assert [e.token_id for e in again] == [e.token_id for e in events]
        assert idle.wait(60)
    finally:
        scheduler.close()


def test_a_closed_scheduler_ends_its_threads(tiny_int8):
    import threading

    from edge.engine.engine import Engine, GenerationParams
    from edge.engine.scheduler import Scheduler
    engine = Engine(Bundle.open(tiny_int8), max_ctx=64, threads=1)
    scheduler = Scheduler(engine, max_queue=2, time_limit=None)
    list(scheduler.submit([5, 6, 7], GenerationParams(max_tokens=2)).events())
    assert scheduler.tokenize(len, "abc").result() == 3
    before = {t.name for t in threading.enumerate()}
    assert any(n.startswith("edge-llm-tokenizer") for n in before)
    assert scheduler.close(timeout=60)
    assert not scheduler._worker.is_alive()
    with pytest.raises(RuntimeError, match="shutdown"):
        scheduler.tokenize(len, "abc")
    with pytest.raises(RuntimeError, match="shutdown"):
        scheduler.readers.submit(len, "abc")
