"""`edge-llm bench` reports what llama-bench does, per backend and thread count, with the
raw samples behind every median."""
import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("backend", ["litert", "numpy"])
def test_bench_json_reports_samples_and_the_backend_that_ran(tiny_bundle, backend):
    out = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(tiny_bundle), "--backend",
                          backend, "-p", "16", "-n", "8", "-r", "2", "-t", "1,2", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [r["threads"] for r in rows] == [1, 2]
    for r in rows:
        assert r["backend"] == backend
        assert len(r["pp_samples_s"]) == len(r["tg_samples_s"]) == 2
        assert all(t > 0 for t in r["pp_samples_s"] + r["tg_samples_s"])
        assert r["pp_tokens_per_s"] > 0 and r["tg_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0


def test_bench_auto_names_the_backend_and_prints_markdown(tiny_bundle):
    out = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(tiny_bundle),
                          "-p", "8", "-n", "4", "-r", "1"], capture_output=True, text=True, check=True).stdout
    assert "| litert |" in out and "pp8 t/s" in out
