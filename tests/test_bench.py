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


def bench(bundle, *args):
    return subprocess.run([sys.executable, "-m", "edge.cli", "bench", "-m", str(bundle), "-r", "1", *args],
                          capture_output=True, text=True)


def cells(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]


def test_bench_prints_llama_bench_table_with_progress_on_stderr(tiny_bundle):
    done = bench(tiny_bundle, "-p", "8,16", "-n", "4", "-t", "1,2")
    assert done.returncode == 0, done.stderr
    head, rule, *rows = cells(done.stdout)
    assert head == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    assert all(c.strip("-:") == "" for c in rule)
    assert [(r[4], r[5]) for r in rows] == [("1", "pp8"), ("1", "tg4"), ("1", "pp16"),
                                            ("2", "pp8"), ("2", "tg4"), ("2", "pp16")]
    for r in rows:
        assert r[0].endswith(" f32") and r[1].endswith("MiB") and r[2].endswith(" K") and r[3] == "litert"
        mean, sd = (float(x) for x in r[6].split(" ± "))
        assert mean > 0 and sd >= 0
    assert "bench: pp16, 2 threads: run 1/1" in done.stderr and "bench:" not in done.stdout


def test_bench_p0_and_n0_skip_that_test(tiny_bundle):
    only_tg = bench(tiny_bundle, "-p", "0", "-n", "4", "--json")
    assert only_tg.returncode == 0, only_tg.stderr
    row = json.loads(only_tg.stdout)
    assert row["pp_samples_s"] == [] and row["pp_tokens_per_s"] is None and row["tg_tokens_per_s"] > 0
    only_pp = bench(tiny_bundle, "-p", "8", "-n", "0")
    assert [r[5] for r in cells(only_pp.stdout)[2:]] == ["pp8"]
    nothing = bench(tiny_bundle, "-p", "0", "-n", "0")
    assert nothing.returncode == 1 and "nothing to measure" in nothing.stderr
    bad = bench(tiny_bundle, "-p", "64,x")
    assert bad.returncode == 2 and "comma-separated list" in bad.stderr


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


def test_bench_threads_auto_reports_the_policy(tiny_bundle):
    """The default thread setting, auto, measured like a count: its row says which count each
    row bucket chose and what each cost."""
    done = bench(tiny_bundle, "-p", "16", "-n", "8", "-t", "auto,1", "--json")
    assert done.returncode == 0, done.stderr
    auto, one = json.loads(done.stdout)
    assert auto["threads"] == "auto" and one["threads"] == 1
    assert "thread_policy" in auto and "thread_policy" not in one
    decode = auto["thread_policy"]["1"]
    assert decode["best"] in (1, 2) and all(c > 0 for c in decode["cost"].values())
    bad = bench(tiny_bundle, "-t", "0")
    assert bad.returncode == 2 and "positive number or 'auto'" in bad.stderr


def test_compare_llamacpp_prints_each_rounds_ratio_with_its_load():
    from bench.compare_llamacpp import markdown_rounds, round_ratio
    ours = {"pp_tokens_per_s": 180.0, "tg_tokens_per_s": 45.0, "loadavg_at_start": (1.25, 1.0, 1.0)}
    theirs = {"pp_tokens_per_s": 120.0, "tg_tokens_per_s": 36.0, "loadavg_at_start": (1.5, 1.0, 1.0)}
    r = round_ratio(2, "int4", ours, theirs)
    assert r["pp_ratio"] == pytest.approx(1.5) and r["tg_ratio"] == pytest.approx(1.25)
    row = cells(markdown_rounds([r]))[-1]
    assert row == ["2", "int4 / Q4_0", "1.25 / 1.50", "180.0", "120.0", "**1.50**", "45.0", "36.0", "**1.25**"]


def test_contention_ratios_are_to_each_engines_own_quiet_figure(monkeypatch, tmp_path):
    import argparse

    import bench.contention as contention
    speeds = {0: (100.0, 20.0), 1: (80.0, 10.0)}            # (pp, tg) by busy count
    busy_now = []

    class FakeBusy:
        def __init__(self, n):
            busy_now.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def edge(bundle, threads, reps, p, n):
        pp, tg = speeds[busy_now[-1]]
        return {"pp_tokens_per_s": pp, "tg_tokens_per_s": tg, "raw": {}}

    def llama(gguf, threads, reps, p, n, workdir, binary=None):
        pp, tg = speeds[busy_now[-1]]
        return {"pp_tokens_per_s": pp / 2, "tg_tokens_per_s": tg / 4}

    monkeypatch.setattr(contention, "Busy", FakeBusy)
    monkeypatch.setattr(contention, "run_edge_bench", edge)
    monkeypatch.setattr(contention, "run_llama_bench", llama)
    a = argparse.Namespace(busy=[0, 1], ours=["auto"], model=tmp_path / "m", gguf=tmp_path / "g.gguf",
                           threads=2, reps=1, n_prompt=16, n_gen=8, workdir=tmp_path, llama_bench=tmp_path / "lb")
    rows = contention.run_all(a)
    busy1 = {r["engine"]: r for r in rows if r["busy"] == 1}
    assert busy1["edge-llm"]["pp_ratio"] == pytest.approx(0.8) and busy1["edge-llm"]["tg_ratio"] == pytest.approx(0.5)
    assert busy1["llama.cpp"]["pp_ratio"] == pytest.approx(0.8) and busy1["llama.cpp"]["tg_ratio"] == pytest.approx(0.5)
    table = contention.markdown(rows, a)
    assert "| edge-llm | auto | 1 |" in table and "| 0.80 |" in table


def test_prefill_ab_reports_every_variant_and_its_logits_against_the_first(tiny_int8, capsys):
    """bench/prefill_ab.py: one line per (flags, chunk) with its median speed, and the largest
    logit difference from the first variant (0 for the first itself)."""
    from bench.prefill_ab import main
    assert main(["--model", str(tiny_int8), "-p", "24", "--reps", "1", "--threads", "1",
                 "--flags", "none,0x3", "--chunks", "8,24"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("flags")]
    assert [ln.split()[1:4] for ln in lines] == [["none", "chunk", "8:"], ["none", "chunk", "24:"],
                                                 ["0x3", "chunk", "8:"], ["0x3", "chunk", "24:"]]
    assert all(float(ln.split("median")[1].split()[0]) > 0 for ln in lines)
    assert lines[0].endswith("max |Δlogit| 0")
