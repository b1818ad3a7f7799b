"""`edge-llm` in scripts: the prompt from stdin, stdout carrying only the answer, a closed
pipe ending quietly, --version, and every option's help showing its default."""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest

from edge.cli import main as cli
from edge.engine.engine import Engine
from edge.launch.request import RequestDefaults
from edge.model.bundle import Bundle

EDGE = [sys.executable, "-m", "edge.cli"]


def run_args(bundle, *extra):
    return [*EDGE, "run", *extra, "-m", str(bundle), "-n", "6", "--temperature", "0", "--ctx", "256"]


def expected_answer(bundle, prompt: str, max_tokens: int = 6) -> str:
    engine = Engine(Bundle.open(bundle), max_ctx=256)
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    params = RequestDefaults().build(max_tokens=max_tokens, temperature=0.0)
    return "".join(ev.text for ev in engine.generate(ids, params))


@pytest.mark.slow
def test_run_reads_the_prompt_from_stdin_and_prints_only_the_answer(tiny_bundle):
    answer = expected_answer(tiny_bundle, "w1 w2 w3")
    assert answer.strip()
    for argv, stdin in ((run_args(tiny_bundle, "-"), "w1 w2 w3\n"),       # `-`
                        (run_args(tiny_bundle), "w1 w2 w3\n"),            # no prompt, stdin is a pipe
                        (run_args(tiny_bundle, "w1 w2 w3"), "")):         # the argument, as before
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == answer + "\n", argv


def test_run_refuses_an_empty_stdin(tiny_bundle):
    done = subprocess.run(run_args(tiny_bundle, "-"), input="  \n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "empty" in done.stderr


def test_a_closed_pipe_ends_quietly_with_status_0(tiny_bundle):
    argv = [*EDGE, "run", "w1 w2", "-m", str(tiny_bundle), "-n", "400", "--temperature", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(8)          # like `| head -c 8`: read a little, then go away
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert first
    assert proc.returncode == 0, err.decode()
    assert b"Broken pipe" not in err and b"Traceback" not in err, err.decode()


def test_version():
    done = subprocess.run([*EDGE, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"edge-llm {version('edge-llm')}"


def _options(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a in sub._actions:
                    yield name, sub, a


def test_every_option_has_help_with_its_default():
    parser = cli.build_parser()
    checked = 0
    for command, sub, action in _options(parser):
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        text = sub._get_formatter()._get_help_string(action) if action.help else ""
        name = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert text.strip(), f"{name} has no help text"
        takes_value = action.option_strings and action.nargs != 0 and not action.required
        if takes_value:
            assert "default" in text.lower(), f"{name}: the help does not say the default: {text!r}"
            checked += 1
    assert checked > 40
    # and it is what --help prints
    out = subprocess.run([*EDGE, "bench", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "(default: 3)" in out.replace("\n", " ").replace("  ", " ") or "default 3" in out
