"""checkpoint (HF directory | GGUF) -> bundle. The one entry point of the conversion step."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from convert.bundle_writer import atomic_bundle, clean_partials
from convert.checkpoint import Checkpoint, CheckpointError
from convert.progress import Progress
from convert.quantize import SCHEMES, default_quant
from convert.reuse import CalibrationRows
from edge.model.config import ModelConfig
from edge.model.thread_policy import parse_threads

FLOAT_QUANTS = {"f32": np.float32, "f16": np.float16}
# Defaults from the measured table in the README (SmolLM2, 9471 tokens, vs f32):
# - int8: rotation + smoothing + GPTQ. Rotation spreads activation outliers (+0.70 % -> +0.19 %
#   perplexity, top-1 0.927 -> 0.949: folded rotations, then the in-graph one before w_down);
#   GPTQ (act-order, 4096 tokens, int8's damping: convert.gptq.damping) gives +0.03 % / 96.3 %.
# - int4 (per channel): as chosen on the development text (docs/QUANTIZATION.md), an int4-b32
#   head, w_down of the first and last layer at int8 and GPTQ damping 0.03 (convert.llama_graph,
#   convert.gptq). On the Shakespeare text, every matrix int4, rotation + smoothing + GPTQ
#   (act-order, 4096 tokens): +15.8 % / 74.7 % with an int8 head,
#   +19.6 % / 71.7 % with an int4 head (Q4_0: +21.2 % / 68.8 %). Neither helps alone (first
#   1024 tokens, ctx 256: round-to-nearest +31 %, rotation alone +173 %, as it scatters the
#   Q4_1 source's grid; GPTQ alone +44 %).
# - int4-b32: rotation + smoothing + GPTQ: +9.9 % / 79.2 % (round-to-nearest +12.6 % / 77.0 %).
# A 4-bit scheme is rotated only when GPTQ runs too (a tokenizer that cannot read the
# calibration text means no GPTQ): rotation with round-to-nearest hurt 4-bit badly.
ROTATE_BY_DEFAULT = ("int8", "int4", "int4-b32")
ROTATE_ONLY_WITH_GPTQ = ("int4", "int4-b32")
GPTQ_BY_DEFAULT = ("int8", "int4", "int4-b32")
# NumPy's BLAS threads per worker while converting. One: beside busy processes OpenBLAS's threads
# wait for each other at every matmul (calibration 11.4 s -> 309.5 s, GPTQ 37 s -> 896 s at load
# 13, where one thread would lose only its share of the CPU), and its results change with the
# thread count, so a fixed count keeps the bundle the same whatever the load (docs/SPEED.md).
# The cores are used by the conversion's workers instead (convert/workers.py).
CONVERT_THREADS = 1


def read_checkpoint(src: Path) -> Checkpoint:
    src = Path(src)
    if src.is_dir():
        from convert.hf_reader import read_hf
        return read_hf(src)
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from convert.gguf_reader import read_gguf
            return read_gguf(src)
        raise CheckpointError(f"{src}: neither a GGUF file nor a Hugging Face checkpoint directory")
    raise CheckpointError(f"{src}: no such file or directory")


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: the embedding lookup reads 1 byte per value, not 4."""
    scale = np.abs(table).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    return np.round(table / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def untie(get: Callable[[str], np.ndarray], cfg: ModelConfig) -> tuple[Callable[[str], np.ndarray], ModelConfig]:
    """The same weights with an "lm_head" of its own, so transforms can treat the head and
    the embedding table separately. The bundle still stores the table once: the lookup reads
    the head's rows and undoes what the transforms did to them (`_shared_embedding`)."""
    if not cfg.tie_word_embeddings:
        return get, cfg
    return (lambda n: get("embed" if n == "lm_head" else n)), dataclasses.replace(cfg, tie_word_embeddings=False)


def convert(src: Path, dest: Path, quant: str | None = None, overwrite: bool = False,
            name: str | None = None, quiet: bool = False, rotate: bool | None = None,
            smooth: bool = True, gptq: bool | None = None, head: str | None = None,
            threads: int | str | None = None) -> Path:
    """Graph for the matmuls (any quant) + NumPy tensors: for float quants every tensor, so the
    bundle also runs on the NumPy reference backend; for integer quants the embedding, which a
    tied model does not store again (its lookup reads the lm_head's rows in the graph).

    Integer quants are rotated (convert/rotation.py; rotate=None: as `ROTATE_BY_DEFAULT` and
    `ROTATE_ONLY_WITH_GPTQ` say), smoothed with calibrated scales (convert/smoothing.py;
    smooth=False skips it, for comparison) and rounded with GPTQ (convert/gptq.py; gptq=False
    rounds to nearest; None: `GPTQ_BY_DEFAULT`). head: the lm_head's scheme (None: llama_graph.head_scheme's choice).
    quant None: `default_quant` for the checkpoint's size. threads: the conversion's worker
    threads (convert/workers.py; None/"auto": one per core). Each runs NumPy with
    CONVERT_THREADS BLAS threads, fixed, not timed and switched as the runtime's are:
    OpenBLAS's results change with its thread count, and a bundle must not depend on what else
    ran while it was made. The workers split the work into the same pieces whatever their
    number, so the bundle is the same for every `threads`."""
    from convert.llama_graph import head_scheme
    if quant is not None and quant not in SCHEMES:
        raise ValueError(f"unknown --quant {quant!r}; choose from {', '.join(SCHEMES)}")
    stream = {"stream": _Null()} if quiet else {}
    note = (lambda m: print(m, file=stream.get("stream", sys.stderr)))
    clean_partials(Path(dest).resolve(), note)        # first: the space they hold may be needed
    ckpt = read_checkpoint(src)
    quant = quant or default_quant(ckpt.config.parameter_count)
    _check_tokenizer(ckpt)
    head = head_scheme(quant, head)
    import threadpoolctl
    from convert import workers
    threads = parse_threads(threads)
    with threadpoolctl.threadpool_limits(CONVERT_THREADS, user_api="blas"), \
            workers.limited(threads if isinstance(threads, int) else None):
        return _convert(ckpt, src, dest, quant, overwrite, name, rotate, smooth, gptq, head, stream)


def _convert(ckpt: Checkpoint, src, dest, quant: str, overwrite: bool, name, rotate, smooth, gptq, head: str,
             stream: dict) -> Path:
    from convert.llama_graph import write_llama_graph
    note = (lambda m: print(m, file=stream.get("stream", sys.stderr)))
    names = ckpt.names()
    floats = quant in FLOAT_QUANTS
    g = _GraphWeights.plain(ckpt)
    if not floats:
        g = g.transformed(ckpt, quant, rotate, smooth, quant in GPTQ_BY_DEFAULT if gptq is None else gptq,
                          head, stream)

    how = ", ".join([quant] + (["smoothing"] if g.smoothed else [])
                    + ([f"GPTQ on {g.hessians.n_tokens} tokens"] if g.hessians else []))
    bar = Progress(len(names) * (2 if floats else 1) + 1, f"converting {Path(src).name} ({how})", **stream)

    def counted(get):
        def tensor(n: str) -> np.ndarray:
            bar.step(n)
            return get(n)
        return tensor
    tensor = counted(ckpt.tensor)

    embedding = {"scheme": "float"}
    with atomic_bundle(dest, overwrite, log=note) as w, g.sweep or contextlib.nullcontext():
        layout = write_llama_graph(w.dir / "model.tflite", counted(g.get), g.cfg, quant, g.importance,
                                   g.down_rotation, g.hessians, head=head)
        with w.tensor_file("weights.bin") as tf:
            if floats:
                for n in names:
                    tf.add(n, tensor(n).astype(FLOAT_QUANTS[quant]))
            elif ckpt.config.tie_word_embeddings:
                embedding = _shared_embedding(w, tf, layout, g, ckpt)
                bar.step("embed")
            else:
                rows, scale = int8_rows(counted(g.get)("embed"))
                tf.add("embed", rows)
                tf.add("embed_scale", scale)
                embedding = {"scheme": "int8"}
        w.write_bytes("tokenizer.json", ckpt.tokenizer_json.encode("utf-8"))
        source = Path(os.path.abspath(src)).name        # the name only: a path says where it was built
        w.finish({
            "name": name or source, "source": source, "quant": quant,
            "rotation": g.rotated, "smoothing": g.smoothed, "gptq": g.hessians is not None,
            "head": quant if floats else head, "config": ckpt.config.to_dict(), "embedding": embedding,
            "tokenizer": "tokenizer.json",
            "chat_template": ckpt.chat_template, "special_tokens": ckpt.special_tokens,
            "add_bos": ckpt.add_bos,
        })
    bar.close()
    return Path(dest)


def _shared_embedding(w, tf, head, g: "_GraphWeights", ckpt: Checkpoint) -> dict:
    """Index the tied embedding as the lm_head's rows inside model.tflite, with what undoes the
    head's rewrites: its smoothing scales (a per-column divisor) and, when rotated, the final
    norm folded into it (divided out in the unrotated basis; edge/model/embedding.py).
    Returns the manifest's "embedding" entry."""
    V, D = head.shape
    packed = head.scheme != "int8"
    w.index("embed", "model.tflite", np.dtype(np.uint8 if packed else np.int8),
            (V, D // 2 if packed else D), head.data[0])
    if head.block_size:
        w.index("embed_scale", "model.tflite", np.dtype(np.float16), (V, D // head.block_size),
                head.block_scales[0])
    else:
        tf.add("embed_scale", head.channel_scales)
    if g.head_divisor is not None:
        tf.add("embed_divisor", g.head_divisor.astype(np.float32))
    if g.rotation is not None:
        tf.add("embed_norm", ckpt.tensor("final_norm"))
        tf.add("embed_rotation_signs", g.rotation.q_factors.signs.astype(np.float32))
        tf.add("embed_rotation_r", g.rotation.q_factors.r.astype(np.float32))
    return {"scheme": head.scheme, "block_size": head.block_size, "from": "lm_head"}


@dataclasses.dataclass(frozen=True)
class _GraphWeights:
    """What the graph is built from: float tensors by name (possibly rewritten), the config
    they follow, and what the quantizer and graph writer need to know about the rewrite."""
    get: Callable[[str], np.ndarray]
    cfg: ModelConfig
    importance: dict = dataclasses.field(default_factory=dict)
    down_rotation: np.ndarray | None = None
    rotated: bool = False
    smoothed: bool = False
    rotation: object = None                     # convert.rotation.Rotation, when rotated
    smoothing: object = None                    # convert.smoothing.Smoothing, when smoothed
    hessians: object = None                     # convert.gptq.Hessians when the levels are GPTQ-rounded
    sweep: object = None                        # convert.sweep.Sweep: the pass that makes them all

    @classmethod
    def plain(cls, ckpt: Checkpoint) -> "_GraphWeights":
        return cls(ckpt.tensor, ckpt.config)

    def transformed(self, ckpt: Checkpoint, quant: str, rotate: bool | None, smooth: bool, gptq: bool,
                    head: str, stream: dict):
        """Untied, then rotated and/or smoothed: exact in float, kinder to quantization; then
        (gptq) the inputs of the weights as rewritten, for GPTQ's Hessians. rotate None: the
        default (ROTATE_BY_DEFAULT, ROTATE_ONLY_WITH_GPTQ)."""
        from convert.calibration import GPTQ_TOKENS, SMOOTHING_TOKENS, first_tokens
        get, cfg = untie(self.get, self.cfg)
        segments = _calibration_tokens(ckpt, stream, GPTQ_TOKENS if gptq else SMOOTHING_TOKENS) \
            if smooth or gptq else None
        tokens = first_tokens(segments, SMOOTHING_TOKENS) if segments else None
        if rotate is None:
            rotate = quant in ROTATE_BY_DEFAULT and (
                quant not in ROTATE_ONLY_WITH_GPTQ or (gptq and tokens is not None))
        down_rotation = rotation = None
        if rotate:
            from convert.rotation import Rotation
            rotation = Rotation(cfg)
            get, down_rotation = rotation.weights(get), rotation.down_rotation
        sweep = None
        if (smooth or gptq) and tokens is not None:
            # One pass (convert/sweep.py): each layer's weights read, rotated and smoothed once,
            # both calibrations run on them as the graph writer reaches the layer; the
            # calibration tokens' embedding rows come from one rotation of the table.
            from convert.sweep import Sweep
            tables = _tables(ckpt, rotation)
            sweep = Sweep(get, CalibrationRows(get, segments, tables.get("embed")), cfg, quant, head,
                          tokens if smooth else None, segments if gptq else None, down_rotation, tables)
            get = sweep
        return _GraphWeights(get, cfg, sweep.importance if sweep else {}, down_rotation,
                             rotate, bool(sweep and sweep.smoothing), rotation,
                             sweep.smoothing if sweep else None, sweep.hessians if sweep else None, sweep)

    @property
    def head_divisor(self) -> np.ndarray | None:
        """The lm_head's smoothing scales [D] (known once the graph is written)."""
        return self.smoothing.scales["head"] if self.smoothing is not None else None


def _tables(ckpt: Checkpoint, rotation) -> dict:
    """The embedding and the lm_head as convert.table.Table (read by blocks of rows, rotated as
    `Rotation.weights` rotates them) when they are too large to make whole; {} otherwise."""
    from convert.table import streamed
    tables = {}
    head_source = "embed" if ckpt.config.tie_word_embeddings else "lm_head"
    for name, source in (("embed", "embed"), ("lm_head", head_source)):
        t = streamed(ckpt, name, source)
        if t is not None and rotation is not None:
            t = rotation.table(name, t, ckpt.tensor("final_norm") if name == "lm_head" else None)
        if t is not None:
            tables[name] = t
    return tables


def _calibration_tokens(ckpt: Checkpoint, stream: dict, max_tokens: int) -> list[np.ndarray] | None:
    """The calibration text's segments of ids, or None (with a note) if the tokenizer cannot read it."""
    from convert.calibration import calibration_tokens
    tokens = calibration_tokens(ckpt.tokenizer_json, ckpt.config.bos_token_id if ckpt.add_bos else None,
                                max_tokens)
    if tokens is None:
        print("note: the tokenizer cannot read the calibration text; quantizing without smoothing or GPTQ",
              file=stream.get("stream", sys.stderr))
    return tokens


def _check_tokenizer(ckpt: Checkpoint) -> None:
    """Refuse a tokenizer that cannot load or whose ids overrun the embedding table."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(ckpt.tokenizer_json)
    except Exception as e:
        raise CheckpointError(f"{ckpt.source}: tokenizer cannot be loaded ({e})") from e
    if tok.get_vocab_size(with_added_tokens=True) > ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.source}: tokenizer has {tok.get_vocab_size()} tokens but the model "
                              f"only {ckpt.config.vocab_size} embeddings")


class _Null:
    def write(self, _):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False
