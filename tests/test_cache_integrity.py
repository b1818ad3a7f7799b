"""Every cache the service reads is verified before use: a damaged prompt-cache entry is
ignored, removed and logged (the answer is the one a cold start gives, and the service still
starts); a damaged XNNPACK weight cache is rebuilt, with answers identical to a clean start."""
from __future__ import annotations

import json
import logging
import zlib

import numpy as np
import pytest

from edge.engine.engine import Engine, GenerationParams
from edge.engine.prompt_cache import MAX_HEADER, PromptCache
from edge.engine.sampler import SamplingParams
from edge.model.bundle import Bundle
from edge.model.forward import PREFILL_CHUNK

SYSTEM = [3 + i % 200 for i in range(297)]          # a long prompt: stored once read (its whole prefill chunks)
KEPT = len(SYSTEM) // PREFILL_CHUNK * PREFILL_CHUNK
QUESTION = SYSTEM + [1, 2]
GREEDY = GenerationParams(max_tokens=6, sampling=SamplingParams(temperature=0.0))


def engine(bundle, cache_dir, **kw) -> Engine:
    e = Engine(bundle, max_ctx=512, backend="numpy",
               prompt_cache=PromptCache(cache_dir, "b1", 1 << 30) if cache_dir else None, **kw)
    e.eos_ids = frozenset()
    return e


def answer(e: Engine):
    events = list(e.generate(QUESTION, GREEDY))
    return [ev.token_id for ev in events if ev.token_id is not None], events[-1].usage.cached_tokens


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return Bundle.open(tiny_bundle)


@pytest.fixture(scope="module")
def cold(bundle):
    return answer(engine(bundle, None))[0]


@pytest.fixture
def stored(bundle, tmp_path, cold):
    """A cache directory holding one sound entry for SYSTEM, and that entry's path."""
    e = engine(bundle, tmp_path)
    assert answer(e)[0] == cold
    e.wait_for_writes()
    (path,) = tmp_path.glob("*.kv")
    assert answer(engine(bundle, tmp_path)) == (cold, KEPT)       # sound: restored, same answer
    return path


def split(path):
    raw = path.read_bytes()
    end = raw.index(b"\n") + 1
    return json.loads(raw[:end]), raw[end:]


def rewrite(path, header: dict, body: bytes, fix_crc: bool = False):
    if fix_crc:
        header = {**header, "crc32": zlib.crc32(body)}
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


def flip_bits(path):
    header, body = split(path)
    data = bytearray(body)
    rng = np.random.default_rng(1)
    for i in rng.integers(4 * header["n"], len(data), 200):       # in K and V, after the tokens
        data[i] ^= 1 << int(rng.integers(8))
    rewrite(path, header, bytes(data))


def nans(path, fix_crc=False):
    header, body = split(path)
    data = bytearray(body)
    at = 4 * header["n"] + 4 * 1000
    data[at:at + 400] = np.full(100, np.nan, np.float32).tobytes()
    rewrite(path, header, bytes(data), fix_crc)


def overwrite_tail(path):
    raw = bytearray(path.read_bytes())
    raw[-4096:] = b"\x00" * 4096
    path.write_bytes(bytes(raw))


DATA_DAMAGE = {"bit flips after the header": flip_bits, "NaNs": nans,
               "NaNs under a matching checksum": lambda p: nans(p, fix_crc=True),
               "overwritten tail": overwrite_tail}


@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_damaged_prompt_cache_data_is_ignored_removed_and_logged(damage, bundle, tmp_path, stored, cold, caplog):
    DATA_DAMAGE[damage](stored)
    e = engine(bundle, tmp_path)                      # starts: the header is sound
    with caplog.at_level(logging.WARNING, "edge"):
        got = answer(e)
        assert got == (cold, 0)                       # read again, not loaded: the cold answer
    assert f"removing {stored.name}" in caplog.text
    e.wait_for_writes()                               # stored again, now sound
    assert answer(engine(bundle, tmp_path)) == (cold, KEPT)
    for _ in range(2):                                # and again and again: no lasting failure
        assert answer(e)[0] == cold


def header_damage(field, value):
    def damage(path):
        header, body = split(path)
        if value is KeyError:
            del header[field]
        else:
            header[field] = value
        rewrite(path, header, body)
    return damage


HEADER_DAMAGE = {"dtype floaT32": header_damage("dtype", "floaT32"), "n as a string": header_damage("n", "512"),
                 "n a boolean": header_damage("n", True), "missing shape": header_damage("shape", KeyError),
                 "missing n": header_damage("n", KeyError), "missing checksum": header_damage("crc32", KeyError),
                 "checksum a float": header_damage("crc32", 1.5), "shape of strings": header_damage("shape", ["a"] * 4),
                 "huge shape": header_damage("shape", [10 ** 30] * 4), "header not an object": lambda p: p.write_bytes(
                     b"[1, 2]\n" + split(p)[1]), "endless header": lambda p: p.write_bytes(b"{" * (2 * MAX_HEADER))}


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_damaged_prompt_cache_header_never_stops_the_service_from_starting(damage, bundle, tmp_path, stored, cold,
                                                                          caplog):
    HEADER_DAMAGE[damage](stored)
    with caplog.at_level(logging.WARNING, "edge"):
        e = engine(bundle, tmp_path)                  # what `serve` does at start
    assert not stored.exists() and f"removing {stored.name}" in caplog.text
    assert answer(e) == (cold, 0)


# --- the XNNPACK weight cache -----------------------------------------------------------------

def litert_answer(bundle, cache_dir):
    e = Engine(bundle, max_ctx=128, backend="litert", weight_cache=cache_dir)
    e.eos_ids = frozenset()
    events = list(e.generate(PROMPT_IDS, GREEDY))
    logits = e.model.prefill(PROMPT_IDS, e.model.new_cache())
    return [ev.token_id for ev in events if ev.token_id is not None], logits


PROMPT_IDS = [5, 17, 33, 2, 9, 40, 41, 8, 8, 1, 30, 31]


@pytest.fixture
def packed(bundle, tmp_path):
    """A weight-cache directory holding a sound cache, and the answer of that clean start."""
    cache_dir = tmp_path / "xnnpack"
    clean = litert_answer(bundle, cache_dir)
    (cache,) = cache_dir.glob("*.xnnpack")
    return cache_dir, cache, clean


def same(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1])


def flip_bytes(cache):
    data = bytearray(cache.read_bytes())
    rng = np.random.default_rng(2)
    for i in rng.integers(0, len(data), max(1, len(data) // 50)):
        data[i] ^= 0xFF
    cache.write_bytes(bytes(data))


def fill_7f(cache):
    n = min(4 << 20, cache.stat().st_size)
    with open(cache, "r+b") as f:
        f.write(b"\x7f" * n)


def foreign_graph(cache):
    check = cache.with_name(cache.name + ".sum")
    check.write_text(json.dumps({**json.loads(check.read_text()), "graph": "0" * 64}))


@pytest.mark.parametrize("damage", [flip_bytes, fill_7f, foreign_graph, lambda c: c.with_name(c.name + ".sum").unlink()],
                         ids=["flipped bytes", "4 MiB of 0x7f", "another graph's", "no check file"])
def test_a_damaged_weight_cache_is_rebuilt_and_answers_like_a_clean_start(damage, bundle, packed, caplog):
    from edge.model.litert_runner import cache_is_sound
    cache_dir, cache, clean = packed
    damage(cache)
    with caplog.at_level(logging.WARNING, "edge"):
        assert same(litert_answer(bundle, cache_dir), clean)
    assert "is not used" in caplog.text and "building it again" in caplog.text
    assert cache_is_sound(cache, bundle.manifest["files"]["model.tflite"]["sha256"])[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, "edge"):
        assert same(litert_answer(bundle, cache_dir), clean)        # the next start uses it: no loop
    assert "is not used" not in caplog.text


def test_a_disk_filling_up_while_the_cache_is_written_is_logged_not_fatal(bundle, tmp_path, monkeypatch, caplog):
    """The writer's files are capped below the cache's size (RLIMIT_FSIZE, as a full disk):
    XNNPACK's write fails and it aborts its process; the service logs it and packs in memory."""
    import resource
    import signal

    from edge.model import litert_runner
    clean = litert_answer(bundle, None)

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # writes fail with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
    monkeypatch.setattr(litert_runner, "_writer_setup", small_disk)
    cache_dir = tmp_path / "xnnpack"
    with caplog.at_level(logging.WARNING, "edge"):
        got = litert_answer(bundle, cache_dir)
    assert same(got, clean)
    assert "XNNPACK weight cache not written" in caplog.text and "exit status" in caplog.text, caplog.text
    assert list(cache_dir.iterdir()) == []
