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

SYSTEM = [3 + i % 200 for i in range(297)]          # a long prompt: stored once read (256 tokens: 4 chunks)
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
    assert answer(engine(bundle, tmp_path)) == (cold, 256)       # sound: restored, same answer
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
    assert answer(engine(bundle, tmp_path)) == (cold, 256)
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
