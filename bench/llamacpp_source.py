"""llama.cpp's sources out of the llama-cpp-python sdist on PyPI (it vendors llama.cpp).

One pinned version for everything that uses llama.cpp: the benchmark builds its tools from it,
and the tests run its `convert_hf_to_gguf.py` (with its own vendored gguf-py) to write GGUFs the
way users get them. Only `pip download` of the source archive; nothing is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"      # the sdist whose vendor/llama.cpp we use
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# what convert_hf_to_gguf.py needs next to it
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def fetch_sdist(directory: Path, log=print) -> Path:
    """The pinned sdist in `directory`, downloaded with pip if it is not there yet."""
    directory = Path(directory)
    sdist = directory / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        directory.mkdir(parents=True, exist_ok=True)
        log(f"pip download --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", str(directory),
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True)
    if not sdist.exists():
        raise RuntimeError(f"pip download did not produce {sdist}")
    return sdist


def extract_llamacpp(sdist: Path, dest: Path, members: tuple[str, ...] = ("",)) -> Path:
    """vendor/llama.cpp (only the paths starting with one of `members`) into `dest`, atomically:
    an existing `dest` is taken as complete and returned as is."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    with tarfile.open(sdist) as tar:
        chosen = []
        for m in tar.getmembers():
            if m.name.startswith(_VENDOR) and m.name[len(_VENDOR):].startswith(members):
                m.name = m.name[len(_VENDOR):]
                chosen.append(m)
        tar.extractall(tmp, members=chosen, filter="data")
    if not chosen:
        raise RuntimeError(f"{sdist}: no vendor/llama.cpp inside")
    tmp.rename(dest)
    return dest


def converter(cache: Path, log=print) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with conversion/ and gguf-py/ beside it) under `cache`."""
    cache = Path(cache)
    root = extract_llamacpp(fetch_sdist(cache, log), cache / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-convert",
                            CONVERTER_MEMBERS)
    return root / "convert_hf_to_gguf.py"


def convert_hf_to_gguf(script: Path, hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter on a Hugging Face directory in a subprocess whose `gguf` is the
    gguf-py vendored with it (first on sys.path), not the installed one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(script).parent / "gguf-py"),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("NO_LOCAL_GGUF", None)
    r = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return Path(out)
