"""Models as Ollama's /api/tags, /api/ps and /api/show describe them: from a bundle's
manifest, loaded or not (nothing here loads a model)."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from edge.api.runtime import ServerState
from edge.launch import model_store
from edge.launch.model_store import bundle_id

log = logging.getLogger("edge.ollama")

FOREVER_AT = "9999-12-31T23:59:59Z"      # expires_at of a model that stays loaded


def bundle_at(state: ServerState, key: str | None):
    """The bundle at a registry key, loaded or not (manifest and config only)."""
    if key is None:
        return None
    loaded = state.models.get(key) if state.models is not None else None
    if loaded is not None and loaded.engine is not None:
        return loaded.engine.bundle
    return model_store.open_bundle(key, verify=False, log=lambda *_: None)


def installed_bundles() -> list:
    out = []
    for m in model_store.stored_models():
        try:
            out.append(model_store.open_bundle(str(m.path), verify=False, log=lambda *_: None))
        except (OSError, ValueError) as e:
            log.warning("Ollama: %s left out of /api/tags: %s", m.path.name, e)
    return out


def model_entry(bundle, name: str) -> dict:
    files = bundle.manifest["files"]
    tag = name if ":" in name else f"{name}:latest"
    return {"name": tag, "model": tag, "modified_at": modified_at(bundle),
            "size": sum(f["size"] for f in files.values()),
            "digest": bundle_id(bundle),
            "details": details(bundle)}


def details(bundle) -> dict:
    n = bundle.config.parameter_count
    return {"parent_model": "", "format": "tflite", "family": "llama", "families": ["llama"],
            "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
            "quantization_level": bundle.quant}


def modified_at(bundle) -> str:
    return iso((bundle.path / "manifest.json").stat().st_mtime)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")
