"""Choosing a backend for a bundle: the LiteRT graph (fast path) or the NumPy float reference."""
from __future__ import annotations

import os
from pathlib import Path

from edge.model.bundle import Bundle
from edge.model.thread_policy import AUTO, available_cores, parse_threads

BACKENDS = ("auto", "litert", "numpy")


def default_threads() -> int:
    return available_cores()


def limit_thread_pools(threads: int) -> dict[str, int]:
    """Bound every CPU thread pool of the process by `threads`, not only XNNPACK's: NumPy's
    BLAS (OpenBLAS in the wheels; attention and the numpy backend) through threadpoolctl, which
    resizes it at run time whatever was imported first, and the tokenizers' Rayon pool (created
    on first use, so the variable still counts). Without this OpenBLAS starts one thread per
    core, and next to busy processes its spinning threads collapse prefill.
    Returns {pool: threads} as now set."""
    import threadpoolctl
    threadpoolctl.threadpool_limits(limits=threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    pools = {f"{p['internal_api']}:{Path(p['filepath']).name}": p["num_threads"]
             for p in threadpoolctl.threadpool_info()}
    return pools | {"rayon": threads}


def load_backend(bundle: Bundle, backend: str, max_ctx: int, threads: int | str | None = None,
                 weight_cache: Path | None = None):
    """litert runs the bundle's graph (XNNPACK's packed weights cached in `weight_cache`, a
    directory of its own per graph, when given); numpy is the float reference (f32/f16 only).
    threads: the graph's thread count, or "auto"/None: the graph on 1 thread or all cores,
    whichever `ThreadPolicy` times faster. Beside the graph NumPy's pool (attention) runs on one
    thread whatever the count: OpenBLAS's threads spin between calls, and on as many cores as
    XNNPACK's they take its cores (1B int4 pp128 on 2 cores: 61 t/s with both pools at 2, 81
    with NumPy's at 1, docs/SPEED.md). The numpy backend gets the count, or all cores."""
    threads = parse_threads(threads) or AUTO
    if backend == "auto":
        backend = "litert" if bundle.has_graph else "numpy"
    limit_thread_pools(1 if backend == "litert" else threads if isinstance(threads, int) else default_threads())
    if backend == "litert":
        from edge.model.litert_model import LiteRTModel
        return LiteRTModel(bundle, max_ctx, threads, weight_cache=weight_cache)
    if backend == "numpy":
        if not bundle.has_float_weights:
            raise ValueError(f"{bundle.path}: a {bundle.quant} bundle has no float weights for the numpy "
                             "backend; convert with --quant f32 or f16 for a reference bundle")
        from edge.model.numpy_model import NumpyModel
        return NumpyModel(bundle.config, bundle.tensor, max_ctx)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
