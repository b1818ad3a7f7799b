"""The launch layer: what every interface does to start, written once.

Resolve a `--model` into a bundle (converting a checkpoint once, fetching the embedded
default model on first use: `model_store`), open it, build the engine (`load_engine`), and
turn interface options into a request (`request.RequestDefaults`, `args`).

May import: edge.engine, edge.model, and convert/ (only to build a bundle on first use).
Imported by: edge.cli, edge.service, edge.api, edge.serial. The engine never imports it.
"""
from __future__ import annotations

from edge.engine.engine import Engine
from edge.launch.model_store import open_bundle, weight_cache_dir
from edge.launch.request import DEFAULT_CTX


def load_engine(model: str | None = None, backend: str = "auto", ctx: int = DEFAULT_CTX,
                threads: int | None = None, log=print, verify: bool | str = True) -> Engine:
    """verify="full" hashes every bundle file before anything reads it (serve, prepare)."""
    bundle = open_bundle(model, log=log, verify=verify)
    return Engine(bundle, max_ctx=ctx, backend=backend, threads=threads, weight_cache=weight_cache_dir(bundle))


def engine_from_args(a, log=print, verify: bool | str = True) -> Engine:
    """For commands built with `args.add_model_args`."""
    return load_engine(a.model, a.backend, a.ctx, a.threads, log=log, verify=verify)
