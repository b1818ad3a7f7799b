"""Run a multi-signature .tflite graph on LiteRT's CompiledModel (XNNPACK), cheaply per call.

Why CompiledModel and not `Interpreter` + signature runners (measured on the 2-core x86 dev
box with a 310 MB int8 graph: 4 layers of D=2048, F=8192 and a 32000-row head, every
signature run once; RSS = anonymous + file-backed):
- memory: Interpreter 633 MB (313 + 320) and CompiledModel without a cache 640 MB (315 + 324):
  XNNPACK repacks every weight into anonymous memory next to the mapped file. With
  `xnnpack_weight_cache_path` the packed weights live in a file-backed mmap: 408 MB (82 + 326)
  on the load that writes the cache, 345 MB (19 + 326) on later loads, which take 0.05 s
  instead of 0.5 s and never touch the .tflite pages. File-backed pages are reclaimable, so on
  a 4 GB Pi the cache decides it. The Interpreter's Python API offers no weight cache.
- per call: ~9 us for `runner(sig)(x, attn)` on a tiny layer graph whose bare invoke takes
  ~4.6 us, about 4 us more than the Interpreter's raw wrapper; 17 calls a token cost < 0.1 ms
  of a step of tens of ms.
- delegation is checkable: `is_fully_accelerated()` is False as soon as any op of any
  signature falls back to a builtin kernel (the Interpreter's Python API only lists the nodes
  of subgraph 0, and lists replaced ops beside the DELEGATE node).

Inputs and outputs are float32 [T, width]; T may change between calls (decode T=1, prefill
chunks, multi-row steps): the signature's inputs are resized (~3 us) and the buffers kept for
that T are used (made on the first use of a T), which keeps the single dynamic-T subgraph
delegated.

LiteRT prints INFO lines and warnings about NPU / OpenVINO / GPU plugins it cannot find while
it sets up; those are filtered out of the user's terminal, anything else it prints is passed on.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
from ai_edge_litert import _pywrap_litert_tensor_buffer_wrapper as _tb
from ai_edge_litert.compiled_model import CompiledModel, CpuOptions, Environment, Options

_HARMLESS = re.compile(r"^(INFO: |WARNING: .*(npu_registry|compiler_plugin|gpu_registry|"
                       r"NPU|OpenVINO|openvino))")
_env = None
log = logging.getLogger("edge.litert")


class GraphNotDelegated(RuntimeError):
    """Some op of the graph is not run by XNNPACK: it would be slow or wrong (see FINDINGS)."""


@contextmanager
def quiet_litert():
    """Capture native stderr (fd 2) while LiteRT sets up; re-emit all but the harmless lines.

    A continuation line ("└ ...") follows the fate of the line it continues.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            _reemit(tmp.read().decode(errors="replace"))


def _reemit(text: str) -> None:
    keep = True
    for line in text.splitlines():
        if not line.lstrip().startswith("└"):
            keep = not _HARMLESS.search(line)
        if keep and line.strip():
            print(line, file=sys.stderr)


def _silence_exit() -> None:
    """At exit LiteRT's static teardown logs INFO lines ("DestroyAccelerator") to fd 2.

    Nothing in Python runs after those C++ destructors, so they cannot be filtered: once Python's
    own output is flushed, fd 2 goes to /dev/null for the last moments of the process.
    """
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _environment():
    """One LiteRT environment per process (creating one probes every accelerator plugin)."""
    global _env
    if _env is None:
        with quiet_litert():
            _env = Environment.create()
        atexit.register(_silence_exit)
    return _env


def weight_cache_file(model_path: Path, cache_dir: Path) -> Path:
    """The XNNPACK cache file for this exact model file.

    XNNPACK finds packed weights by buffer position, not content: a cache written for another
    model of the same shape would be used silently. The name therefore carries the model
    file's size, mtime and inode (bundles are written by rename, so a rebuilt model always
    gets a new name), and stale caches of the same model name are removed.
    """
    st = model_path.stat()
    path = cache_dir / f"{model_path.stem}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}.xnnpack"
    ours = re.compile(re.escape(model_path.stem) + r"(-[0-9a-f]+){3}\.xnnpack(\.sum)?")
    for old in cache_dir.iterdir():
        if old not in (path, _sum_file(path)) and ours.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return path


# --- the cache's check: the graph it was packed from and a CRC-32 of its content ------------------

def _sum_file(cache: Path) -> Path:
    return cache.with_name(cache.name + ".sum")


def file_crc32(path: Path, block: int = 8 << 20) -> int:
    """zlib's CRC-32 of a file, read in blocks (the cheapest whole-file check measured: docs)."""
    crc, buf = 0, bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _cache_sum(cache: Path, identity: str) -> dict:
    return {"graph": identity, "size": cache.stat().st_size, "crc32": file_crc32(cache)}


def _seal(tmp: Path, final: Path, identity: str) -> None:
    """A freshly written cache becomes `final`, its check file first (a cache without a
    matching check file is rebuilt, never used)."""
    check = _sum_file(final)
    part = check.with_name(f".{check.name}.tmp-{os.getpid()}")
    part.write_text(json.dumps(_cache_sum(tmp, identity)))
    os.replace(part, check)
    os.replace(tmp, final)
    _checked[final] = _stamp(final, identity)


_checked: dict[Path, tuple] = {}     # caches this process wrote or checked, and their `_stamp`


def _stamp(cache: Path, identity: str) -> tuple:
    """What must not have changed since a check: the cache's and its check file's size,
    modification time and inode."""
    stamp = [identity]
    for f in (cache, _sum_file(cache)):
        try:
            st = f.stat()
            stamp += [st.st_size, st.st_mtime_ns, st.st_ino]
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def cache_is_sound(cache: Path, identity: str) -> tuple[bool, str]:
    """(whether `cache` matches its check file, why not). Read once per process: a graph
    loaded again (another thread count) maps the file this process has already checked."""
    if _checked.get(cache) == _stamp(cache, identity):
        return True, ""
    try:
        want = json.loads(_sum_file(cache).read_text())
    except (OSError, ValueError) as e:
        return False, f"no readable check file ({e.__class__.__name__})"
    if not isinstance(want, dict) or want.get("graph") != identity:
        return False, "packed from another graph"
    if want.get("size") != cache.stat().st_size:
        return False, "its size changed"
    t0 = time.perf_counter()
    crc = file_crc32(cache)
    log.debug("weight cache %s checked in %.2f s", cache.name, time.perf_counter() - t0)
    if want.get("crc32") != crc:
        return False, "its content fails its checksum (damaged)"
    _checked[cache] = _stamp(cache, identity)
    return True, ""


CACHE_SPARE_BYTES = 256 << 20     # free space left on the disk after a new weight cache
_writer_setup = None              # a callable run in the cache writer's process before it starts (tests)


def _weight_cache_paths(model: Path, cache_dir, identity: str) -> tuple[Path | None, Path | None]:
    """(the cache file, the file to write when it must be built, or None). An existing cache
    is used only when it passes its check (`cache_is_sound`); otherwise it is removed, logged,
    and built again. A new cache is written under a temporary name and renamed once complete,
    and leftovers of interrupted writes are removed. With too little free space there is no
    cache: the weights are packed in memory, with a warning."""
    if cache_dir is None:
        return None, None
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = weight_cache_file(model, cache_dir)
    if final.exists():
        sound, why = cache_is_sound(final, identity)
        if sound:
            return final, None
        log.warning("XNNPACK weight cache %s is not used (%s): removed, building it again", final, why)
        final.unlink(missing_ok=True)
        _sum_file(final).unlink(missing_ok=True)
    for old in cache_dir.glob(".*.tmp-*"):
        pid = old.name.rpartition("-")[2]
        if not (pid.isdigit() and _alive(int(pid))):
            old.unlink(missing_ok=True)
    import shutil
    need = model.stat().st_size + CACHE_SPARE_BYTES      # packed weights are about the graph's size
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        warnings.warn(f"{cache_dir}: {free >> 20} MB free, a weight cache needs ~{need >> 20} MB; packing the "
                      "weights in memory instead (slower start, more RAM). Free some disk space.",
                      RuntimeWarning, stacklevel=3)
        return None, None
    return final, final.with_name(f".{final.name}.tmp-{os.getpid()}")


_WRITER = """
import sys
from ai_edge_litert.compiled_model import CompiledModel, CpuOptions, Environment, Options
CompiledModel.from_file(sys.argv[1], environment=Environment.create(), options=Options(
    cpu_options=CpuOptions(num_threads=int(sys.argv[3]), xnnpack_weight_cache_path=sys.argv[2])))
"""


def _write_cache(model: Path, tmp: Path, threads: int) -> bool:
    """XNNPACK writes the cache while loading the graph, and aborts its process when a write
    fails (a disk filling up meanwhile): so a process of its own writes it. False, with a log
    line saying why, when that process fails; the partial file is removed."""
    try:
        r = subprocess.run([sys.executable, "-c", _WRITER, str(model), str(tmp), str(threads)],
                           capture_output=True, text=True, errors="replace", preexec_fn=_writer_setup)
        ok = r.returncode == 0 and tmp.exists()
    except OSError as e:
        r, ok = None, False
        detail = str(e)
    if not ok:
        if r is not None:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not _HARMLESS.search(ln)]
            detail = f"exit status {r.returncode}" + (f": {lines[-1].strip()}" if lines else "")
        import shutil
        free = shutil.disk_usage(tmp.parent).free >> 20
        log.warning("XNNPACK weight cache not written to %s (%s; %d MB free on that disk); packing the weights "
                    "in memory instead (slower start, more RAM)", tmp.parent, detail, free)
        tmp.unlink(missing_ok=True)
    return ok


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GraphRunner:
    """A loaded graph file: `run(signature, **inputs)` or the faster `runner(signature)`."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 weight_cache: str | os.PathLike | None = None, require_delegation: bool = True,
                 identity: str | None = None):
        """weight_cache: a directory for XNNPACK's packed-weight cache (None: pack in RAM);
        identity: the graph's content hash (the bundle's), recorded with the cache and checked
        with its CRC-32 before every use."""
        path = Path(path)
        threads = threads or os.cpu_count() or 1
        identity = identity or f"{path.name}:{path.stat().st_size}"
        final, tmp = _weight_cache_paths(path, weight_cache, identity)
        if tmp is not None:
            # written by a process of its own, which also spares this one the anonymous memory
            # the writing load keeps (measured on the 1B shape: 257 MB, the lm_head)
            if _write_cache(path, tmp, threads):
                _seal(tmp, final, identity)
            else:
                final = None
        with quiet_litert():
            self._model = CompiledModel.from_file(str(path), environment=_environment(), options=Options(
                cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=str(final or ""))))
        self.path = path
        if not self.delegated:
            msg = f"{path}: not every op is delegated to XNNPACK; this graph would run slowly"
            if require_delegation:
                raise GraphNotDelegated(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        sigs = self._model.get_signature_list()
        self._sigs = {name: _Signature(self._model, name, self._model.get_signature_index(name))
                      for name in sigs}

    @property
    def delegated(self) -> bool:
        """True while XNNPACK runs every op of every signature (a few us to ask)."""
        return bool(self._model.is_fully_accelerated())

    @property
    def signatures(self) -> list[str]:
        return list(self._sigs)

    def input_names(self, signature: str) -> list[str]:
        return list(self._sigs[signature].inputs)

    def output_names(self, signature: str) -> list[str]:
        return list(self._sigs[signature].outputs)

    def run(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Convenient form: named inputs, a dict of fresh output arrays."""
        sig = self._sigs[signature]
        if inputs.keys() != set(sig.inputs):
            raise ValueError(f"{signature} takes inputs {sig.inputs}, got {sorted(inputs)}")
        outs = sig(*(inputs[n] for n in sig.inputs))
        return {n: o.copy() for n, o in zip(sig.outputs, outs)}

    def release_buffers(self) -> None:
        """Drop every signature's buffers kept for calls of more than one row (not while a
        call runs); one-row (decode) buffers stay."""
        for sig in self._sigs.values():
            sig.release()

    def runner(self, signature: str, fresh: bool = False) -> Callable[..., tuple[np.ndarray, ...]]:
        """Fast form: f(*inputs in `input_names` order) -> outputs in `output_names` order.

        The returned arrays are this signature's own buffers, overwritten by its next call:
        consume or copy them before calling the same signature again (each signature has
        buffers of its own, so one signature's outputs may be another's inputs). With `fresh`
        the outputs are new arrays each call (one copy out of the graph, not two).
        """
        sig = self._sigs[signature]
        return sig.fresh if fresh else sig


class _Signature:
    """One signature's buffers for the current T. A switch of T resizes the inputs (~3 us) and
    takes the buffers kept for that T, made on its first use (LiteRT's setup logs filtered
    then, ~0.4 ms), so decode alternating with multi-row steps (speculative verification,
    batches) does not rebuild them every step. Besides the current T's, the most recently used
    sizes are kept up to KEEP_ROWS rows in all (memory: ~2 MB a row over a 1B model's
    signatures); a large prefill chunk's buffers are let go once T changes, as before."""

    KEEP_ROWS = 24

    def __init__(self, model, name: str, index: int):
        self._model, self._index = model, index
        # The pybind entry points directly: CompiledModel.run_by_index and TensorBuffer.write/
        # read rebuild capsule lists, normalise dtypes and allocate on every call.
        self._write, self._read = _tb.WriteTensorBuffer, _tb.ReadTensorToBuffer
        self._run = model._model.RunByIndex
        ins = model.get_input_tensor_details(name)
        sig = model.get_signature_list()[name]
        self.inputs, self.outputs = sig["inputs"], sig["outputs"]
        self._in_widths = [ins[n]["shape"][-1] for n in self.inputs]
        self._name = name
        self._t = -1
        self._sets: dict[int, tuple] = {}     # T -> its buffers, least recently used first

    def _resize(self, t: int) -> None:
        """Switch to T = t: its kept buffers, or new ones."""
        m = self._model
        for i, w in enumerate(self._in_widths):
            m.resize_input_tensor(i, [t, w], self._index)
        kept = self._sets.pop(t, None)
        if kept is None:
            bufs = (m.create_input_buffers(self._index), m.create_output_buffers(self._index))
            details = m.get_output_tensor_details(self._name)
            out = [np.empty(details[n]["shape"], np.float32) for n in self.outputs]
            kept = (bufs, [b.capsule for b in bufs[0]], [b.capsule for b in bufs[1]],   # the TensorBuffers own them
                    out, [o.reshape(-1) for o in out], [(t, w) for w in self._in_widths])
        for big in [n for n in self._sets if n > self.KEEP_ROWS]:
            del self._sets[big]                          # e.g. a prefill chunk's
        while sum(self._sets) > self.KEEP_ROWS:          # the others, least recently used first
            del self._sets[next(iter(self._sets))]
        self._sets[t] = kept
        _, self._in_caps, self._out_caps, self._out, self._out_flat, self._shapes = kept
        self._t = t

    def release(self) -> None:
        """Forget the buffers of every T > 1; the next call of such a T makes them again."""
        for t in [t for t in self._sets if t > 1]:
            del self._sets[t]
        if self._t > 1:
            self._t = -1
            self._in_caps = self._out_caps = self._out = self._out_flat = self._shapes = ()

    def __call__(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        self._invoke(xs)
        for cap, o in zip(self._out_caps, self._out_flat):
            self._read(cap, o, "float32")
        return tuple(self._out)

    def fresh(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Like a call, the outputs read into new arrays (the caller may keep them)."""
        self._invoke(xs)
        outs = tuple(np.empty(o.shape, np.float32) for o in self._out)
        for cap, o in zip(self._out_caps, outs):
            self._read(cap, o.reshape(-1), "float32")
        return outs

    def _invoke(self, xs) -> None:
        t = xs[0].shape[0]
        if t != self._t and t not in self._sets:
            with quiet_litert():     # the first write sets up LiteRT's buffer environment (logs)
                self._resize(t)
                self._write_inputs(xs)
                self._run(self._index, self._in_caps, self._out_caps)
            return
        if t != self._t:
            self._resize(t)          # buffers kept from an earlier call of this size
        self._write_inputs(xs)
        self._run(self._index, self._in_caps, self._out_caps)

    def _write_inputs(self, xs) -> None:
        for cap, x, shape in zip(self._in_caps, xs, self._shapes):
            if x.shape != shape or x.dtype != np.float32:
                raise ValueError(f"{self._name}: expected float32 {shape}, got {x.dtype} {x.shape}")
            self._write(cap, x.reshape(-1), "float32")
