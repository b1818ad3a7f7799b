"""llama.cpp's tools (llama-bench, llama-quantize, llama-perplexity, ...) built with cmake
from the pinned llama-cpp-python sdist (bench/llamacpp_source.py); no prebuilt binaries are
downloaded. Other scripts get a built tool with `llamacpp_bin`:

    from bench.llamacpp_build import llamacpp_bin
    subprocess.run([llamacpp_bin("llama-perplexity"), "-m", "model-Q8_0.gguf", "-f", "text.txt"])
"""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

from bench.llamacpp_source import LLAMA_CPP_PYTHON_VERSION, extract_llamacpp, fetch_sdist
from bench.random_llama import log

DEFAULT_WORKDIR = Path(os.environ.get("EDGE_LLM_BENCH_DIR", "~/.cache/edge-llm-bench")).expanduser()
LLAMACPP_TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity")


def _llamacpp_dir(workdir: Path) -> Path:
    return Path(workdir) / "llama.cpp"


def download_llamacpp_source(workdir: Path) -> Path:
    """vendor/llama.cpp out of the llama-cpp-python sdist (PyPI, source only, no install)."""
    root = _llamacpp_dir(workdir)
    src = extract_llamacpp(fetch_sdist(root, log), root / "src")
    if not (src / "CMakeLists.txt").exists():
        raise RuntimeError(f"{src}: no CMakeLists.txt (an incomplete extraction? delete it and retry)")
    return src


def llamacpp_commit(workdir: Path) -> str:
    """The llama.cpp commit the sdist vendors (its git submodule HEAD, shipped in the sdist)."""
    root = _llamacpp_dir(workdir)
    cached = root / "commit.txt"
    if cached.exists():
        return cached.read_text().strip()
    commit = "unknown"
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if sdist.exists():
        with tarfile.open(sdist) as tar:
            try:
                f = tar.extractfile(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/.git/modules/vendor/llama.cpp/HEAD")
                commit = f.read().decode().strip()[:12]
                cached.write_text(commit + "\n")
            except KeyError:
                pass
    return commit


def build_llamacpp(workdir: Path, jobs: int = 2, targets=LLAMACPP_TARGETS) -> Path:
    """cmake Release build of the llama.cpp tools; returns the bin directory. Records the
    build time and commit in llama.cpp/build-info.json."""
    root = _llamacpp_dir(workdir)
    bindir = root / "build" / "bin"
    if all((bindir / t).exists() for t in targets):
        return bindir
    src = download_llamacpp_source(workdir)
    flags = {
        "CMAKE_BUILD_TYPE": "Release", "GGML_NATIVE": "ON", "GGML_OPENMP": "ON", "BUILD_SHARED_LIBS": "OFF",
        "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_SERVER": "OFF",
        "LLAMA_BUILD_APP": "OFF", "LLAMA_BUILD_UI": "OFF", "LLAMA_USE_PREBUILT_UI": "OFF",
        "LLAMA_OPENSSL": "OFF",
    }
    log(f"building llama.cpp ({', '.join(targets)}) with -j{jobs}; this takes a while ...")
    t0 = time.perf_counter()
    fresh = not (root / "build" / "CMakeCache.txt").exists()
    build_log = root / "build.log"
    with open(build_log, "w" if fresh else "a") as out:
        for cmd in (["cmake", "-S", str(src), "-B", str(root / "build"), *[f"-D{k}={v}" for k, v in flags.items()]],
                    ["cmake", "--build", str(root / "build"), "--config", "Release", f"-j{jobs}", "--target", *targets]):
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"llama.cpp build failed; see {build_log}:\n{build_log.read_text()[-3000:]}")
    build_s = time.perf_counter() - t0
    info_path = root / "build-info.json"
    if fresh or not info_path.exists():
        info = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "llama_cpp_commit": llamacpp_commit(workdir),
                "build_s": round(build_s, 1), "jobs": jobs, "cmake_flags": flags, "targets": list(targets),
                "built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_after": os.getloadavg()}
    else:       # one more target on an existing build: keep the first build's record
        info = json.loads(info_path.read_text())
        info["targets"] = list(dict.fromkeys([*info.get("targets", []), *targets]))
    info_path.write_text(json.dumps(info, indent=2))
    log(f"  built in {build_s:.0f} s -> {bindir}")
    return bindir


def llamacpp_bin(name: str, workdir: Path = DEFAULT_WORKDIR, jobs: int = 2) -> Path:
    """Path of a llama.cpp tool (llama-bench, llama-quantize, llama-perplexity), built if needed."""
    targets = tuple(dict.fromkeys([*LLAMACPP_TARGETS, name]))
    path = build_llamacpp(Path(workdir), jobs, targets) / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not built")
    return path
