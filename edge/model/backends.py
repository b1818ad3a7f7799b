"""Choosing a backend for a bundle: the LiteRT graph (fast path) or the NumPy float reference."""
from __future__ import annotations

import os
from pathlib import Path

from edge.model.bundle import Bundle

BACKENDS = ("auto", "litert", "numpy")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_backend(bundle: Bundle, backend: str, max_ctx: int, threads: int | None = None,
                 weight_cache: Path | None = None):
    """litert runs the bundle's graph (XNNPACK's packed weights cached in `weight_cache`, a
    directory of its own per graph, when given); numpy is the float reference (f32/f16 only)."""
    if backend == "auto":
        backend = "litert" if bundle.has_graph else "numpy"
    if backend == "litert":
        from edge.model.litert_model import LiteRTModel
        return LiteRTModel(bundle, max_ctx, threads or default_threads(), weight_cache=weight_cache)
    if backend == "numpy":
        if not bundle.has_float_weights:
            raise ValueError(f"{bundle.path}: a {bundle.quant} bundle has no float weights for the numpy "
                             "backend; convert with --quant f32 or f16 for a reference bundle")
        from edge.model.numpy_model import NumpyModel
        return NumpyModel(bundle.config, bundle.tensor, max_ctx)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
