"""The on-disk prompt cache: save, restart, restore gives the same answer; foreign or damaged
files are ignored."""
from __future__ import annotations

import numpy as np
import pytest

from edge.engine.prompt_cache import PromptCache
from edge.model.backends import load_backend
from edge.model.bundle import Bundle

PROMPT = [5, 17, 33, 2, 9, 40, 41, 8, 8, 1, 30, 31]


@pytest.fixture
def model(tiny_bundle):
    return load_backend(Bundle.open(tiny_bundle), "numpy", 64, 1)


def greedy(model, cache, first_logits, n=8):
    out, logits = [], first_logits
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache)
    return out


def test_restore_continues_exactly_like_the_original(model, tmp_path):
    pc = PromptCache(tmp_path, "bundle-a", 1 << 20)
    cache = model.new_cache()
    model.prefill(PROMPT[:-1], cache)
    pc.save(cache)
    want = greedy(model, cache, model.forward(PROMPT[-1:], cache))

    restarted = PromptCache(tmp_path, "bundle-a", 1 << 20)      # a new process
    (entry,) = restarted.entries()
    assert entry.tokens == PROMPT[:-1]
    fresh = model.new_cache()
    assert restarted.restore(entry, fresh) == len(PROMPT) - 1
    assert fresh.tokens == PROMPT[:-1]
    assert greedy(model, fresh, model.forward(PROMPT[-1:], fresh)) == want


def test_foreign_truncated_and_garbage_files_are_ignored(model, tmp_path, caplog):
    cache = model.new_cache()
    model.prefill(PROMPT, cache)
    path = PromptCache(tmp_path, "bundle-a", 1 << 20).save(cache)
    assert PromptCache(tmp_path, "bundle-b", 1 << 20).entries() == []          # another bundle's
    assert not path.exists()
    path = PromptCache(tmp_path, "bundle-a", 1 << 20).save(cache)
    path.write_bytes(path.read_bytes()[:-100])                                  # truncated
    (tmp_path / "junk.kv").write_bytes(b"\x00garbage")
    assert PromptCache(tmp_path, "bundle-a", 1 << 20).entries() == []
    assert "truncated" in caplog.text and "not a prompt-cache file" in caplog.text


def test_the_directory_stays_within_its_limit(model, tmp_path):
    cache = model.new_cache()
    model.prefill(PROMPT, cache)
    one = PromptCache(tmp_path, "x", 1 << 30).save(cache).stat().st_size
    pc = PromptCache(tmp_path, "x", int(2.5 * one))
    for n in (6, 8, 10, 12):
        pc.save(cache, n)
    sizes = [p.stat().st_size for p in tmp_path.glob("*.kv")]
    assert len(sizes) == 2 and sum(sizes) <= 2.5 * one
    assert [e.tokens for e in pc.entries()] == [PROMPT[:12], PROMPT[:10]]      # the newest kept
    assert PromptCache(tmp_path, "x", 10).save(cache) is None                   # cannot fit at all
