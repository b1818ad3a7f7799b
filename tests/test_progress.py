"""Progress lines with rate and ETA (edge/model/progress.py), on a terminal and in logs."""
from __future__ import annotations

import io
import re

from edge.model.progress import Progress, watch_file


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


RATE_ETA = re.compile(r"\d+/\d+( \w+)? \d+\.\d+( \w+)?/s ETA \d+(m\d\ds|s)")


def test_terminal_line_shows_rate_and_eta():
    out, clock = Tty(), Clock()
    bar = Progress(30, "calibrating", out, clock=clock)
    clock.t += 6
    for _ in range(12):
        bar.step("layers.2.qkv")
    line = out.getvalue().split("\r")[-1]
    assert "12/30 2.0/s ETA 9s" in line and RATE_ETA.search(line), line
    clock.t += 9
    bar.close()
    assert out.getvalue().rstrip().endswith("calibrating: 12/30 done in 15.0s (0.8/s)")


def test_bytes_shown_in_megabytes():
    out, clock = Tty(), Clock()
    bar = Progress(100 * 2**20, "packing weights", out, unit="MB", scale=2**20, clock=clock)
    clock.t += 2
    bar.update(25 * 2**20)
    assert "25/100 MB 12.5 MB/s ETA 6s" in out.getvalue()


def test_not_a_terminal_quiet_unless_verbose_then_a_line_every_interval():
    quiet, clock = io.StringIO(), Clock()
    bar = Progress(10, "gptq", quiet, verbose=False, clock=clock)
    for _ in range(5):
        clock.t += 20
        bar.step()
    assert quiet.getvalue() == ""
    bar.close()
    assert quiet.getvalue() == "gptq: 5/10 done in 100.0s (0.1/s)\n"

    log, clock = io.StringIO(), Clock()
    bar = Progress(10, "gptq", log, verbose=True, every=10, clock=clock)
    for _ in range(4):
        clock.t += 6
        bar.step()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and all(RATE_ETA.search(x) for x in lines), lines     # at 12 s and 24 s
    assert lines[0] == "gptq: 2/10 0.2/s ETA 48s"


def test_verbose_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDGE_LLM_PROGRESS", "1")
    assert Progress(1, "x", io.StringIO()).verbose
    monkeypatch.setenv("EDGE_LLM_PROGRESS", "0")
    assert not Progress(1, "x", io.StringIO()).verbose


def test_watch_file_reports_the_growth_of_a_file(tmp_path):
    out = Tty()
    with watch_file((tmp_path, ".cache-*.tmp"), 4 * 2**20, "packing weights", out) as bar:
        (tmp_path / ".cache-1.tmp").write_bytes(b"\0" * (3 * 2**20))
    assert bar.done == 3 * 2**20
    assert re.search(r"packing weights: 3/4 MB done in \d+\.\ds \(\d+\.\d MB/s\)", out.getvalue()), out.getvalue()


def test_conversion_phases_close_with_their_rate(tmp_path, capsys):
    from convert.convert import convert
    from tests.tiny_llama import write_tiny_llama
    write_tiny_llama(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "b", quant="int8")
    err = capsys.readouterr().err
    assert re.search(r"converting src \(int8\): \d+/\d+ done in \d+\.\ds \(\d+\.\d/s\)", err), err
