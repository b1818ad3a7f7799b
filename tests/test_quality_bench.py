"""bench/quality.py reads llama-perplexity's --kl-divergence report (the lines as its
perplexity.cpp prints them) and puts ours and llama.cpp's side by side."""
from pathlib import Path

import pytest

from bench.quality import PEERS, SUITE, parse_kld, table

REPORT = """perplexity: calculating perplexity over 10 chunks, n_ctx=512, batch_size=512, n_seq=1
...
====== Perplexity statistics ======
Mean PPL(Q)                   :  21.345678 ±   0.801234
Mean PPL(base)                :  20.123456 ±   0.750000
Cor(ln(PPL(Q)), ln(PPL(base))):  98.12%
Mean ln(PPL(Q)/PPL(base))     :   0.058965 ±   0.004321

====== KL divergence statistics ======
Mean    KLD:   0.061234 ±   0.001234
Maximum KLD:   3.456789
99.9%   KLD:   2.000000
99.0%   KLD:   0.654321
95.0%   KLD:   0.222222
Median  KLD:   0.030000

====== Token probability statistics ======
Mean    Δp: -0.321 ± 0.045 %
RMS Δp    :  4.567 ± 0.123 %
Same top p: 88.123 ± 0.654 %
"""


def test_parse_kld_reads_every_figure():
    got = parse_kld(REPORT)
    assert got == {"ppl": 21.345678, "base_ppl": 20.123456, "kl_mean": 0.061234, "kl_p99": 0.654321,
                   "kl_max": 3.456789, "top1": pytest.approx(0.88123), "n": 10 * 255}


def test_parse_kld_refuses_a_report_without_the_statistics():
    with pytest.raises(RuntimeError, match="kl_mean"):
        parse_kld(REPORT.replace("Mean    KLD", "Mean KL"))


def test_table_marks_where_ours_is_at_or_below_its_peer():
    text = Path("legal.txt")
    results = {("legal", "int8"): {"ppl": 10.1, "base_ppl": 10.0, "kl_mean": 0.002, "kl_p99": 0.02, "top1": 0.97},
               ("legal", "Q8_0"): {"ppl": 10.2, "base_ppl": 10.0, "kl_mean": 0.001, "kl_p99": 0.01, "top1": 0.98}}
    rows = table(results, [text], {"int8": 140e6, "Q8_0": 145e6}, {"legal": 6000}).splitlines()
    assert rows[2] == "| legal (6000 tokens) | int8 | **+1.00 %** | 0.0020 | 2.00x | 0.020 | 97.0 % | 140 |"
    assert rows[3] == "|  | Q8_0 | +2.00 % | 0.0010 |  | 0.010 | 98.0 % | 145 |"


def test_a_variant_is_compared_with_its_schemes_peer():
    from bench.quality import parse_variant, variant_name
    scheme, extra = parse_variant("int4:head=int8")
    name = variant_name(scheme, extra)
    assert (scheme, extra, name) == ("int4", {"head": "int8"}, "int4 head=int8")
    text = Path("legal.txt")
    results = {("legal", "int4"): {"ppl": 13.0, "base_ppl": 10.0, "kl_mean": 0.3, "kl_p99": 2.0, "top1": 0.7},
               (("legal", name)): {"ppl": 12.0, "base_ppl": 10.0, "kl_mean": 0.1, "kl_p99": 1.0, "top1": 0.8},
               ("legal", "Q4_0"): {"ppl": 12.5, "base_ppl": 10.0, "kl_mean": 0.2, "kl_p99": 1.5, "top1": 0.75}}
    rows = table(results, [text], {"int4": 72e6, name: 86e6, "Q4_0": 90e6}, {"legal": 6000},
                 {"int4": [name]}).splitlines()
    assert rows[2] == "| legal (6000 tokens) | int4 | +30.00 % | 0.3000 | 1.50x | 2.000 | 70.0 % | 72 |"
    assert rows[3] == "|  | int4 head=int8 | **+20.00 %** | **0.1000** | 0.50x | 1.000 | 80.0 % | 86 |"
    assert rows[4] == "|  | Q4_0 | +25.00 % | 0.2000 |  | 1.500 | 75.0 % | 90 |"
    for bad in ("int5:head=int8", "int4", "int4:head"):
        with pytest.raises(Exception, match="expected|KEY=VALUE"):
            parse_variant(bad)


def test_the_suite_has_the_kinds_the_issue_asks_for():
    kinds = {p.name.split("-")[0] for p in SUITE}
    assert {"prose", "legal", "tech", "code", "chat", "de", "fr"} <= kinds
    assert (SUITE[0].parent / "LICENSES.md").exists()
    for p in SUITE:
        assert p.name in (SUITE[0].parent / "LICENSES.md").read_text(), p.name
    assert set(PEERS) == {"int8", "int4", "int4-b32"}


def test_the_token_ids_of_a_llama_perplexity_base_file_are_read_back(tmp_path):
    import numpy as np
    from bench.quality import kld_tokens
    ids = np.arange(2 * 8, dtype="<i4")
    f = tmp_path / "base.kld"
    f.write_bytes(b"_logits_" + np.array([8, 100, 2], "<i4").tobytes() + ids.tobytes() + b"\0" * 64)
    assert kld_tokens(f) == (8, ids.tolist())
    (tmp_path / "junk").write_bytes(b"junk" * 8)
    with pytest.raises(RuntimeError, match="not a llama-perplexity logits file"):
        kld_tokens(tmp_path / "junk")


def test_table_gives_both_f32_perplexities_and_whether_the_tokens_match():
    text = Path("legal.txt")
    results = {("legal", "f32"): {"ppl": 19.2, "n": 2805}, ("legal", "F32"): {"ppl": 19.21, "n": 2805, "token_diff": 0}}
    rows = table(results, [text], {}, {"legal": 5666}).splitlines()
    assert rows[2] == "| legal (5666 tokens) | f32 / F32 | ppl 19.200 / 19.210 | 2805 / 2805 positions | | same tokens | | |"
