"""What the cache checks cost: the prompt cache's per-restore check (CRC-32 of the entry's data
and finite K/V) on the Llama 3.2 1B shape, and the XNNPACK weight cache's check at start
(CRC-32 of the whole file) on a file of a 1B int4 cache's size, with sha256 and blake2b over
the same bytes for comparison. Random data of the right size: the checks do not depend on
the values.

    python -m bench.integrity_cost [--tokens 2048] [--cache-mb 600] [--dir DIR]

Prints one JSON object (seconds, best of --repeat runs; the file is read from the page
cache after the first run, as at a restart of the service on a machine with free memory).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from edge.engine.prompt_cache import PromptCache
from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache
from edge.model.litert_runner import file_crc32

# Llama 3.2 1B: 16 layers, 8 KV heads of 64
LLAMA_1B = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                       num_kv_heads=8, head_dim=64, max_position_embeddings=131072)


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def prompt_cache_cost(directory: Path, tokens: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    shape = (LLAMA_1B.num_layers, LLAMA_1B.num_kv_heads, tokens, LLAMA_1B.head_dim)
    k, v = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    ids = rng.integers(0, LLAMA_1B.vocab_size, tokens).tolist()
    pc = PromptCache(directory, "bench", 1 << 40)
    path = pc.write(ids, k, v)
    (entry,) = pc.entries()
    cache = KVCache(LLAMA_1B, tokens)
    restore = best(lambda: pc.restore(entry, cache), repeat)
    data = path.read_bytes()[path.read_bytes().index(b"\n") + 1:]
    crc = best(lambda: zlib.crc32(data), repeat)
    finite = best(lambda: np.isfinite(k).all() and np.isfinite(v).all(), repeat)
    t_entries = best(pc.entries, repeat)
    path.unlink()
    return {"tokens": tokens, "data_mib": round(len(data) / 2**20, 1), "restore_s": round(restore, 4),
            "of_which_crc32_s": round(crc, 4), "of_which_finite_s": round(finite, 4),
            "check_share": round((crc + finite) / restore, 2), "header_checks_at_start_s": round(t_entries, 5)}


def weight_cache_cost(directory: Path, mb: int, repeat: int) -> dict:
    path = directory / "bench.xnnpack"
    block = np.random.default_rng(1).integers(0, 256, 8 << 20, np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(mb // 8):
            f.write(block)
    size = path.stat().st_size

    def hashed(make):
        def run():
            h = make()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
        return run
    out = {"file_mb": round(size / 1e6), "crc32_s": round(best(lambda: file_crc32(path), repeat), 3),
           "sha256_s": round(best(hashed(hashlib.sha256), repeat), 3),
           "blake2b_s": round(best(hashed(hashlib.blake2b), repeat), 3)}
    path.unlink()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--cache-mb", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the test files (default: a temp dir)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        result = {"load_average": os.getloadavg(), "prompt_cache": prompt_cache_cost(Path(d), a.tokens, a.repeat),
                  "weight_cache": weight_cache_cost(Path(d), a.cache_mb, a.repeat)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
