"""`edge-llm` without surprises: numeric options and ports refused at parse time with the
range, a description on every subcommand, `list`/`ls` for `models`, `run --format json` and
`--json-schema FILE`, and `rm` removing only what belongs to the model it names."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from edge.cli import main as cli
from edge.launch import model_store
from edge.model.bundle import Bundle

EDGE = [sys.executable, "-m", "edge.cli"]


def edge(*args, home: Path | None = None, **kw):
    env = dict(os.environ)
    if home is not None:
        env["EDGE_LLM_HOME"] = str(home)
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "argument --port: must be from 0 to 65535, got 99999"),
    (["serve", "--port", "-1"], "argument --port: must be from 0 to 65535, got -1"),
    (["serve", "--port", "80a"], "argument --port: not an integer: '80a'"),
    (["serve", "--ollama-port", "70000"], "a port is 0-65535 or 'off', got 70000"),
    (["serve", "--max-body", "0"], "argument --max-body: must be at least 1, got 0"),
    (["serve", "--watchdog-stall", "-5"], "argument --watchdog-stall: must be at least 0.001, got -5"),
    (["serve", "--parallel", "0"], "argument --parallel/-np: must be at least 1, got 0"),
    (["serve", "--prompt-cache-mb", "-1"], "argument --prompt-cache-mb: must be at least 0, got -1"),
    (["run", "x", "--max-tokens", "0"], "argument --max-tokens/-n: must be at least 1, got 0"),
    (["run", "x", "--temperature", "-0.5"], "argument --temperature/--temp: must be at least 0, got -0.5"),
    (["run", "x", "--temperature", "nan"], "argument --temperature/--temp: must be at least 0, got nan"),
    (["run", "x", "--top-p", "0"], "argument --top-p: must be above 0 and at most 1, got 0"),
    (["run", "x", "--top-p", "1.5"], "argument --top-p: must be above 0 and at most 1, got 1.5"),
    (["run", "x", "--min-p", "2"], "argument --min-p: must be from 0 to 1, got 2"),
    (["run", "x", "--top-k", "-3"], "argument --top-k: must be at least 0, got -3"),
    (["run", "x", "--repeat-penalty", "0"], "argument --repeat-penalty: must be above 0, got 0"),
    (["run", "x", "--seed", "-2"], "argument --seed: must be at least -1, got -2"),
    (["chat", "--threads", "0"], "argument --threads: --threads takes a positive number or 'auto', got '0'"),
    (["chat", "--ctx", "-1"], "argument --ctx: must be at least 0, got -1"),
    (["chat", "--ctx", "2k"], "argument --ctx: not an integer: '2k'"),
    (["perplexity", "f.txt", "--stride", "0"], "argument --stride: must be at least 1, got 0"),
    (["bench", "--reps", "0"], "argument -r/--reps: must be at least 1, got 0"),
    (["convert", "src", "-o", "out", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["serial", "--port", "/dev/null", "--baud", "0"], "argument --baud: must be at least 1, got 0"),
    (["serial", "--port", "/dev/null", "--line-limit", "0"], "argument --line-limit: must be at least 1, got 0"),
])
def test_bad_numbers_are_refused_before_anything_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_good_numbers_pass():
    a = cli.build_parser().parse_args(["serve", "--port", "0", "--ollama-port", "off", "--temperature", "0",
                                       "--top-p", "1", "--min-p", "0", "--seed", "-1", "--ctx", "0"])
    assert (a.port, a.temperature, a.top_p, a.min_p, a.seed, a.ctx) == (0, 0.0, 1.0, 0.0, -1, 0)
    assert cli.build_parser().parse_args(["serve", "--port", "65535"]).port == 65535


def test_serve_refuses_a_port_out_of_range_and_binds_nothing():
    done = edge("serve", "--port", "99999")
    assert done.returncode == 2 and "must be from 0 to 65535, got 99999" in done.stderr
    assert "listening" not in done.stderr


def test_every_subcommand_has_a_description():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 20, name
    out = edge("models", "--help").stdout
    assert "List the converted models" in out
    assert "Remove converted models" in edge("rm", "--help").stdout


def test_list_and_ls_are_models(tmp_path):
    home = tmp_path / "home"
    outs = [edge(cmd, home=home) for cmd in ("models", "list", "ls")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    assert "not converted yet" in outs[0].stdout


def test_rm_of_a_copied_bundle_keeps_the_cache_the_original_still_uses(tiny_bundle, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_LLM_HOME", str(home))
    original = model_store.bundles_dir() / "tiny-original"
    copy = model_store.bundles_dir() / "tiny-copy"
    shutil.copytree(tiny_bundle, original)
    shutil.copytree(tiny_bundle, copy)                         # a hand-made copy: the same graph
    cache = model_store.weight_cache_dir(Bundle.open(original))
    (cache / "model.xnnpack").write_bytes(b"x" * 5000)
    assert model_store.weight_cache_dir(Bundle.open(copy)) == cache

    done = edge("rm", "tiny-copy", home=home)
    assert done.returncode == 0, done.stderr
    assert "removed tiny-copy" in done.stdout
    assert "kept its XNNPACK cache" in done.stderr
    assert not copy.exists() and original.exists()
    assert (cache / "model.xnnpack").read_bytes() == b"x" * 5000          # the original's cache is intact

    done = edge("rm", "tiny-original", home=home)                         # the last one: its cache goes
    assert done.returncode == 0 and "kept" not in done.stderr
    assert not original.exists() and not cache.exists()


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}


def test_run_json_schema_and_format_json(smol_bundle, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    common = ["-m", str(smol_bundle), "--backend", "numpy", "--ctx", "512", "-n", "80", "--temperature", "0"]
    done = edge("run", "Make up a person: a name and an age.", "--json-schema", str(schema), *common)
    assert done.returncode == 0, done.stderr
    person = json.loads(done.stdout)
    jsonschema.validate(person, PERSON)
    assert set(person) == {"name", "age"}                  # the schema is closed, as in strict mode

    done = edge("run", "Describe a cat as a JSON object.", "--format", "json", *common)
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), dict)


def test_run_json_schema_errors_come_before_the_model_loads(tmp_path):
    missing = edge("run", "x", "--json-schema", str(tmp_path / "nope.json"), "-m", str(tmp_path / "no-model"))
    assert missing.returncode == 1 and "nope.json" in missing.stderr and "no-model" not in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = edge("run", "x", "--json-schema", str(bad), "-m", str(tmp_path / "no-model"))
    assert done.returncode == 1 and "not JSON" in done.stderr
    both = edge("run", "x", "--json-schema", str(bad), "--format", "json")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
