"""The launch layer: what every interface does to start, written once.

Resolve a `--model` into a bundle (converting a checkpoint once, fetching the embedded
default model on first use: `model_store`), open it, build the engine (`load_engine`), and
turn interface options into a request (`request.RequestDefaults`, `args`).

May import: edge.engine, edge.model, and convert/ (only to build a bundle on first use).
Imported by: edge.cli, edge.service, edge.api, edge.serial. The engine never imports it.
"""
from __future__ import annotations

from edge.engine.engine import Engine
from edge.engine.prompt_cache import PromptCache
from edge.launch.model_store import bundle_id, open_bundle, prompt_cache_dir, weight_cache_dir
from edge.launch.request import DEFAULT_CTX


def load_engine(model: str | None = None, backend: str = "auto", ctx: int = DEFAULT_CTX,
                threads: int | None = None, parallel: int = 1, kv_type: str = "f32", prompt_cache_mb: int = 0,
                log=print) -> Engine:
    bundle = open_bundle(model, log=log)
    cache = None
    if prompt_cache_mb > 0:
        cache = PromptCache(prompt_cache_dir(bundle), bundle_id(bundle), prompt_cache_mb << 20)
    return Engine(bundle, max_ctx=ctx, backend=backend, threads=threads, weight_cache=weight_cache_dir(bundle),
                  parallel=parallel, kv_type=kv_type, prompt_cache=cache)


def engine_from_args(a, log=print) -> Engine:
    """For commands built with `args.add_model_args` (and `add_parallel_args`)."""
    return load_engine(a.model, a.backend, a.ctx, a.threads, getattr(a, "parallel", 1), a.kv_type,
                       getattr(a, "prompt_cache_mb", 0), log=log)
