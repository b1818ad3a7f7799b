"""Fault injection against `edge-llm serve`: the hostile-client and broken-cache probes of the
isolation work, replayed in a few minutes, printed as a table (probe, expected, seen).

    python -m bench.faults                      # builds a random 8-layer model, starts serve itself
    python -m bench.faults --model BUNDLE       # e.g. a SmolLM2 bundle
    python -m bench.faults --target http://127.0.0.1:8080 --ollama http://127.0.0.1:11434 \\
        --wyoming 127.0.0.1:10700               # a running server: only the probes that need no restart

Phases: (A) one server with the OpenAI and Ollama ports, Wyoming, the serial console on a
pty (JSON lines), 4 slots and a prompt cache: the request probes, then SIGTERM with 12 Ollama
requests in flight; (B) restarts over a damaged XNNPACK weight cache and each kind of damaged
prompt-cache entry; (C) `ulimit -n 256`, `convert` on a full disk (a small tmpfs: needs root)
and killed mid-way. A probe whose server froze is followed by a restart, so that one
failure does not hide the rest. Exit status 1 if any probe failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import fault_limits as limits, fault_probes as probes
from bench.fault_server import REPO, Server, Table


# The tests' random Llama (tests/tiny_llama.py) made larger, so that an answer of 1,900 tokens
# takes seconds (the disconnect and shutdown probes need answers still running; it never picks
# eos greedily), in int8 like a real bundle (its XNNPACK cache holds packed int8 weights).
RANDOM_MODEL = dict(max_position_embeddings=4096, tie_word_embeddings=False, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64)


def random_model(workdir: Path) -> tuple[Path, Path]:
    """(checkpoint, int8 bundle) of a random Llama, built once in `workdir`."""
    sys.path.insert(0, str(REPO))
    from convert.convert import convert
    from tests.tiny_llama import write_tiny_llama
    src, bundle = workdir / "random-src", workdir / "random-int8"
    if not (src / "config.json").exists():
        src.mkdir(parents=True, exist_ok=True)
        model = write_tiny_llama(src, **RANDOM_MODEL)
        import torch
        with torch.no_grad():            # an lm_head row of zeros: greedy answers never end early at eos
            model.lm_head.weight[model.config.eos_token_id] = 0
        model.save_pretrained(src, safe_serialization=True)
    if not (bundle / "manifest.json").exists():
        convert(src, bundle, quant="int8", quiet=True, overwrite=True, rotate=False, smooth=False, gptq=False)
    return src, bundle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundle to serve (default: a random 8-layer int8 model built here)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edge-llm-faults")
    p.add_argument("--target", default=None, help="a running server's OpenAI base URL (no restarts then)")
    p.add_argument("--ollama", default=None, help="with --target: its Ollama base URL")
    p.add_argument("--wyoming", default=None, help="with --target: its Wyoming HOST:PORT")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    a = p.parse_args(argv)

    a.workdir.mkdir(parents=True, exist_ok=True)
    src, bundle = random_model(a.workdir)
    model = a.model or str(bundle)
    home = a.workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    table = Table()
    flags = ["--parallel", str(a.parallel), "--ctx", "2048", "--kv-type", "f16", "--prompt-cache-mb", "64", "--max-queue", "16"]
    if a.target:
        wy = a.wyoming.rpartition(":") if a.wyoming else None
        server = Server(a.workdir, None, home, start=False, openai=a.target.rstrip("/"), ollama=a.ollama,
                        wyoming=(wy[0], int(wy[2])) if wy else None)
    else:
        server = Server(a.workdir, model, home, flags, serial=True)
        if not server.start():
            print(f"serve did not start; see {server.log_path}", file=sys.stderr)
            return 1
    t0 = time.monotonic()
    try:
        ref = probes.reference(server)

        def run(probe, *args) -> None:
            try:
                probe(*args)
            except Exception as e:                                     # a probe's own bug: say so, go on
                table.add(probe.__name__, "(probe ran)", f"probe crashed: {type(e).__name__}: {e}", False)
        for probe in (probes.empty_stop, probes.serial_empty_stop, probes.innocent_streams, probes.cross_site,
                      probes.wyoming_idle, probes.wyoming_transcripts, probes.bad_input, probes.deep_schemas,
                      probes.ollama_disconnect):
            run(probe, server, table, a.parallel)
            probes.revive(server, table)
        if server.managed:
            run(probes.long_prompt, server, ref)
            run(probes.ollama_shutdown, server, table, a.parallel)
            run(limits.xnnpack_damage, server, table, ref)
            run(limits.prompt_cache_damage, server, table, ref)
            run(limits.low_fd_limit, a.workdir, model, table)
        else:
            table.add("restarts (caches, SIGTERM, ulimit)", "-", "not run against --target", None)
        run(limits.full_disk_convert, a.workdir, src, table)
        run(limits.killed_convert, a.workdir, src, table)
        if server.managed:
            run(limits.full_disk_xnnpack, a.workdir, model, table)
    finally:
        server.stop()
    print(table.markdown())
    print(f"\n{time.monotonic() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if a.markdown:
        a.markdown.write_text(table.markdown() + "\n")
    return 1 if any(r.ok is False for r in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
