"""The launch layer: what every interface does to start, written once.

Resolve a `--model` into a bundle (converting a checkpoint once, fetching the embedded
default model on first use: `model_store`), open it, build the engine (`load_engine`) and the shared scheduler
(`scheduling.start_scheduler`), and turn interface options into a request
(`request.RequestDefaults`, `args`). `request` is the
one home of the product's defaults and limits (sampling, max_tokens, context, queue, request
time limit, ports); interfaces show and validate them there, never restate them.

May import: edge.engine, edge.model, and convert/ (only to build a bundle on first use).
Imported by: edge.cli, edge.service, edge.api, edge.serial, edge.assist. The engine never
imports it.
"""
from __future__ import annotations

from edge.engine.engine import KV_TYPES, Engine
from edge.engine.prompt_cache import PromptCache
from edge.launch.memory import release_free_memory
from edge.launch.model_store import bundle_id, open_bundle, prompt_cache_dir, weight_cache_dir
from edge.launch.request import DEFAULT_CTX, DEFAULT_KV_POOL_MB
from edge.model.config import ModelConfig
from edge.model.kv_cache import KVCache

KV_MEMORY_SHARE = 0.5        # --ctx 0, --kv-pool-mb 0: the KV cache may take this share of the available memory


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def kv_bytes_per_token(cfg: ModelConfig, kv_type: str = "f32") -> int:
    return KVCache.bytes_per_token(cfg, KV_TYPES[kv_type])


def max_context(cfg: ModelConfig, available: int | None, kv_type: str = "f32", parallel: int = 1) -> int:
    """`--ctx 0`: the model's maximum, bounded so `parallel` full sequences take at most half
    the memory."""
    ctx = cfg.max_position_embeddings
    if available:
        ctx = min(ctx, int(available * KV_MEMORY_SHARE) // (parallel * kv_bytes_per_token(cfg, kv_type)))
    return max(ctx, 16)


def kv_pool_bytes(kv_pool_mb: int, avail: int | None = None) -> int:
    """The KV pool `--kv-pool-mb` asks for (0: a share of the memory available, `avail` or
    measured now)."""
    if kv_pool_mb:
        return kv_pool_mb << 20
    return int((avail or available_memory() or 4 << 30) * KV_MEMORY_SHARE)


def load_engine(model: str | None = None, backend: str = "auto", ctx: int = DEFAULT_CTX,
                threads: int | None = None, parallel: int = 1, kv_type: str = "f32", prompt_cache_mb: int = 0,
                log=print, verify: bool | str = True, kv_pool_mb: int = DEFAULT_KV_POOL_MB) -> Engine:
    """verify="full" hashes every bundle file before anything reads it (serve, prepare)."""
    bundle = open_bundle(model, log=log, verify=verify)
    if kv_pool_mb < 0 or ctx < 0:
        raise ValueError(f"--ctx and --kv-pool-mb must be 0 (automatic) or positive, got {ctx} and {kv_pool_mb}")
    avail = available_memory() if 0 in (ctx, kv_pool_mb) else None
    pool = kv_pool_bytes(kv_pool_mb, avail)
    if ctx == 0:          # one sequence may take the whole pool
        ctx = min(max_context(bundle.config, avail, kv_type), pool // kv_bytes_per_token(bundle.config, kv_type))
        mib = kv_bytes_per_token(bundle.config, kv_type) * ctx / 2**20
        log(f"context: {ctx} tokens (model maximum {bundle.config.max_position_embeddings}; KV cache "
            f"{mib:.0f} MiB" + (f" of {avail / 2**20:.0f} MiB available)" if avail else ")"))
    cache = None
    if prompt_cache_mb > 0:
        cache = PromptCache(prompt_cache_dir(bundle), bundle_id(bundle), prompt_cache_mb << 20)
    engine = Engine(bundle, max_ctx=ctx, backend=backend, threads=threads, weight_cache=weight_cache_dir(bundle),
                    parallel=parallel, kv_type=kv_type, prompt_cache=cache, kv_pool_bytes=pool)
    release_free_memory()      # what reading tokenizer.json freed (Llama 3: ~120 MB) goes back to the system
    return engine


def engine_from_args(a, log=print, verify: bool | str = True) -> Engine:
    """For commands built with `args.add_model_args` (and `add_parallel_args`)."""
    return load_engine(a.model, a.backend, a.ctx, a.threads, getattr(a, "parallel", 1), a.kv_type,
                       getattr(a, "prompt_cache_mb", 0), log=log, verify=verify,
                       kv_pool_mb=getattr(a, "kv_pool_mb", DEFAULT_KV_POOL_MB))
