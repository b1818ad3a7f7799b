"""`edge-llm perplexity --save-base / --kl-base`: KL divergence and top-1 agreement against a
reference model's saved distributions, checked against torch's KL on the same logits."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from convert.convert import convert
from edge.cli.perplexity import kl_divergence, log_softmax, top_k_summary
from edge.engine.engine import load_backend
from edge.model.bundle import Bundle
from tests.tiny_llama import write_tiny_llama

EDGE = [sys.executable, "-m", "edge.cli"]
CTX, STRIDE = 64, 32


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_tiny_llama(src)
    out = tmp_path_factory.mktemp("bundles")
    return {q: convert(src, out / q, quant=q, quiet=True) for q in ("f32", "int4")}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = np.random.default_rng(1)
    f = tmp_path_factory.mktemp("text") / "words.txt"
    f.write_text(" ".join(f"w{i}" for i in rng.integers(3, 256, 300)))
    return f


def perplexity_cli(text, bundle, *extra) -> dict:
    done = subprocess.run([*EDGE, "perplexity", str(text), "-m", str(bundle), "--ctx", str(CTX),
                           "--stride", str(STRIDE), "--json", *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def scorer(bundle, text):
    """(ids of the text, BOS or None, the bundle's model, a cache) for walking positions here."""
    b = Bundle.open(bundle)
    ids = b.tokenizer().encode(text.read_text(), add_special_tokens=False).ids
    bos = b.config.bos_token_id if b.manifest.get("add_bos") else None
    model = load_backend(b, "litert", CTX, 2)
    return ids, bos, model, model.new_cache()


def torch_log_softmax(rows: list) -> np.ndarray:
    """The oracle's log-softmax (torch, float64), not the command's own."""
    import torch
    return torch.log_softmax(torch.tensor(np.array(rows), dtype=torch.float64), dim=-1).numpy()


def reference_logprobs(bundle, text) -> tuple[np.ndarray, np.ndarray]:
    """Every scored position's log-probabilities and target, windows walked here, not by the command."""
    ids, bos, model, cache = scorer(bundle, text)
    rows, targets = [], []
    body = CTX - (bos is not None)
    for w, start in enumerate(range(0, len(ids) - body + 1, STRIDE)):
        window = ids[start:start + body]
        cache.truncate(0)
        logits = np.asarray(model.prefill([bos] + window if bos is not None else window, cache, all_logits=True))
        scored = range(0 if bos is not None else 1, len(window)) if w == 0 else range(len(window) - STRIDE, len(window))
        offset = 1 if bos is not None else 0
        rows += [logits[offset + j - 1] for j in scored]
        targets += [window[j] for j in scored]
    return torch_log_softmax(rows), np.array(targets)


def test_a_bundle_against_its_own_base(bundles, text, tmp_path):
    base = tmp_path / "base.npz"
    saved = perplexity_cli(text, bundles["f32"], "--save-base", str(base))
    again = perplexity_cli(text, bundles["f32"], "--kl-base", str(base))
    assert again["ppl"] == saved["ppl"] == again["base_ppl"]
    assert again["kl_mean"] == 0.0 and again["kl_p99"] == 0.0 and again["kl_max"] == 0.0
    assert again["top1"] == 1.0
    assert again["n"] == saved["n"] == len(reference_logprobs(bundles["f32"], text)[1]) > 250


@pytest.mark.parametrize("top_k", [256, 16])
def test_kl_against_another_bundle_matches_torch(bundles, text, tmp_path, top_k):
    import torch
    base = tmp_path / "base.npz"
    perplexity_cli(text, bundles["f32"], "--save-base", str(base), "--top-k", str(top_k))
    got = perplexity_cli(text, bundles["int4"], "--kl-base", str(base))
    (p, ids), (q, _) = reference_logprobs(bundles["f32"], text), reference_logprobs(bundles["int4"], text)
    kl = torch.nn.functional.kl_div(torch.tensor(q), torch.tensor(p), log_target=True, reduction="none").sum(-1).numpy()
    assert got["n"] == len(kl)
    assert got["kl_mean"] > 1e-3
    if top_k == 256:            # the whole vocabulary: the same number
        assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
        assert got["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-4)
        assert got["kl_max"] == pytest.approx(kl.max(), rel=1e-4)
    else:                       # P's top 16 and one bucket for the rest: that sum, below the whole one
        tp, tq = torch.tensor(p), torch.tensor(q)
        top = tp.topk(top_k, dim=-1).indices
        rest = torch.ones_like(tp, dtype=torch.bool).scatter(-1, top, False)
        bucket = lambda lp: torch.cat([lp.gather(-1, top), torch.logsumexp(lp.masked_fill(~rest, -torch.inf), -1, keepdim=True)], -1)
        coarse = torch.nn.functional.kl_div(bucket(tq), bucket(tp), log_target=True, reduction="none").sum(-1).numpy()
        assert got["kl_mean"] == pytest.approx(coarse.mean(), rel=1e-4)
        assert got["kl_p99"] == pytest.approx(np.percentile(coarse, 99), rel=1e-4)
        assert got["kl_mean"] < kl.mean()
    assert got["top1"] == pytest.approx(np.mean(p.argmax(-1) == q.argmax(-1)))
    assert 0 < got["top1"] < 1
    assert got["ppl"] == pytest.approx(np.exp(-np.mean(q[np.arange(len(q)), ids])), rel=1e-5)


def test_bucketed_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_below_it():
    rng = np.random.default_rng(0)
    lp, lq = (log_softmax(rng.normal(0, 3, (20, 500)).astype(np.float32)) for _ in range(2))
    exact = (np.exp(lp.astype(np.float64)) * (lp.astype(np.float64) - lq)).sum(-1)
    full = kl_divergence(*top_k_summary(lp, 500), lq)
    np.testing.assert_allclose(full, exact, rtol=1e-4)
    for k in (1, 10, 100):
        part = kl_divergence(*top_k_summary(lp, k), lq)
        assert np.all(part <= exact + 1e-6) and np.all(part > 0)


def test_a_base_from_other_settings_is_refused(bundles, text, tmp_path):
    base = tmp_path / "base.npz"
    perplexity_cli(text, bundles["f32"], "--save-base", str(base))
    done = subprocess.run([*EDGE, "perplexity", str(text), "-m", str(bundles["int4"]), "--ctx", str(CTX),
                           "--stride", "16", "--kl-base", str(base)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "other tokens or settings" in done.stderr, done.stderr
    (tmp_path / "junk.npz").write_bytes(b"junk")
    done = subprocess.run([*EDGE, "perplexity", str(text), "-m", str(bundles["int4"]), "--ctx", str(CTX),
                           "--stride", str(STRIDE), "--kl-base", str(tmp_path / "junk.npz")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "not a --save-base file" in done.stderr, done.stderr


def chunk_logprobs(bundle, text) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's positions, walked here: chunk c = ids[c*CTX:(c+1)*CTX], its logits at
    CTX/2 .. CTX-2 predicting the tokens after them."""
    ids, bos, model, cache = scorer(bundle, text)
    rows, targets = [], []
    for c in range(len(ids) // CTX):
        chunk = ids[c * CTX:(c + 1) * CTX]
        cache.truncate(0)
        logits = np.asarray(model.prefill(chunk if bos is None else [bos] + chunk[1:], cache, all_logits=True))
        rows += list(logits[CTX // 2:CTX - 1])
        targets += chunk[CTX // 2 + 1:]
    return torch_log_softmax(rows), np.array(targets)


def test_chunks_score_llama_perplexity_positions(bundles, text, tmp_path):
    base = tmp_path / "chunks.npz"
    saved = perplexity_cli(text, bundles["f32"], "--chunks", "--save-base", str(base))
    got = perplexity_cli(text, bundles["int4"], "--chunks", "--kl-base", str(base))
    (p, ids), (q, _) = chunk_logprobs(bundles["f32"], text), chunk_logprobs(bundles["int4"], text)
    assert saved["n"] == got["n"] == len(ids) == (len(Bundle.open(bundles["f32"]).tokenizer().encode(
        text.read_text(), add_special_tokens=False).ids) // CTX) * (CTX - 1 - CTX // 2)
    assert saved["ppl"] == pytest.approx(np.exp(-np.mean(p[np.arange(len(p)), ids])), rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(-np.mean(q[np.arange(len(q)), ids])), rel=1e-5)
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4) and got["kl_mean"] > 1e-3
    assert got["top1"] == pytest.approx(np.mean(p.argmax(-1) == q.argmax(-1)))
    done = subprocess.run([*EDGE, "perplexity", str(text), "-m", str(bundles["int4"]), "--ctx", str(CTX),
                           "--stride", str(STRIDE), "--kl-base", str(base)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "other tokens or settings" in done.stderr, done.stderr
