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


def test_compare_llamacpp_shows_each_repetition_of_edge_bench(tiny_bundle):
    """bench/compare_llamacpp.py reads `edge-llm bench --json`'s per-repetition samples: the
    table's "(max ...)" is the best repetition, in tokens/s."""
    from bench.compare_llamacpp import markdown, run_edge_bench
    row = run_edge_bench(tiny_bundle, threads=1, reps=3, n_prompt=16, n_gen=8)
    raw = row["raw"]
    assert row["pp_samples"] == pytest.approx([16 / t for t in raw["pp_samples_s"]])
    assert row["tg_samples"] == pytest.approx([8 / t for t in raw["tg_samples_s"]])
    assert len(row["pp_samples"]) == len(row["tg_samples"]) == 3
    result = dict(n_prompt=16, n_gen=8, threads=1, reps=3, rounds=1, loadavg_before=(0.0,) * 3,
                  loadavg_after=(0.0,) * 3, cpu="test", pairs=[{"edge": row}])
    table = markdown(result)
    assert f"(max {max(row['pp_samples']):.1f})" in table and f"(max {max(row['tg_samples']):.1f})" in table, table
