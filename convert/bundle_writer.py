"""Write a bundle atomically: everything goes into a temporary sibling directory, is fsynced,
and only then renamed into place, so a failed conversion leaves nothing behind.

The temporary directory is named `.NAME.PID@HOST.XXXXXXXX.partial`: a conversion killed
outright (SIGKILL, power loss) cannot remove it, so the next conversion to the same target
removes those whose process, on this host, no longer runs. Directories of a live process and
any name without that tag are left alone."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from edge.model.bundle import ALIGN, FORMAT_VERSION, MANIFEST, manifest_digest, sha256_of


class TensorFile:
    """Appends arrays to one binary file, each at an ALIGN-aligned offset."""

    def __init__(self, f: BinaryIO, name: str, index: dict):
        self.f, self.name, self.index = f, name, index

    def add(self, key: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        pad = (-self.f.tell()) % ALIGN
        self.f.write(b"\0" * pad)
        self.index[key] = {"file": self.name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                           "offset": self.f.tell()}
        self.f.write(arr.tobytes())


class BundleWriter:
    def __init__(self, tmp: Path):
        self.dir = tmp
        self.tensors: dict[str, dict] = {}

    @contextmanager
    def tensor_file(self, name: str) -> Iterator[TensorFile]:
        with open(self.dir / name, "wb") as f:
            yield TensorFile(f, name, self.tensors)
            f.flush()
            os.fsync(f.fileno())

    def index(self, key: str, file: str, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> None:
        """Index a tensor that another writer already put in `file` (e.g. a graph buffer)."""
        self.tensors[key] = {"file": file, "dtype": np.dtype(dtype).str, "shape": list(shape), "offset": int(offset)}

    def write_bytes(self, name: str, data: bytes) -> None:
        with open(self.dir / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, manifest: dict) -> None:
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
                 for p in sorted(self.dir.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, **manifest, "tensors": self.tensors, "files": files}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # someone else's process: alive
        return True
    return True


def stale_partials(dest: Path) -> list[Path]:
    """Temporary directories beside `dest` left by conversions to it whose process has died."""
    dest = Path(dest)
    tag = re.compile(rf"\.{re.escape(dest.name)}\.(\d+)@(.+)\.[A-Za-z0-9_]{{8}}\.partial")
    host, found = _host(), []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return found
    for p in entries:
        m = tag.fullmatch(p.name)
        if m and m[2] == host and p.is_dir() and not p.is_symlink() and not _alive(int(m[1])):
            found.append(p)
    return found


def clean_partials(dest: Path, log=None) -> list[Path]:
    """Remove `stale_partials(dest)`; returns them."""
    removed = stale_partials(dest)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
        if log:
            log(f"removed {p}: left by an interrupted conversion")
    return removed


@contextmanager
def atomic_bundle(dest: Path, overwrite: bool = False, log=None) -> Iterator[BundleWriter]:
    dest = Path(dest).resolve()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists (pass --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(dest, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}@{_host()}.", suffix=".partial", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())      # mkdtemp makes it 0700: the bundle honours the umask like its files
    try:
        yield BundleWriter(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:        # a failed write() names no file: say where it went
            raise OSError(e.errno, f"{e.strerror}: writing the bundle {dest} (in {tmp}, now removed)") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
