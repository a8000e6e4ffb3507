"""Shared fixtures: the tiny recipe models (built once per session) and their calibration feeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

import models

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# No example database, and hypothesis' other caches go under .pytest_cache (git-ignored) instead of
# a .hypothesis folder in the working directory.
settings.register_profile("onnxq", database=None)
settings.load_profile("onnxq")
set_hypothesis_home_dir(Path(__file__).resolve().parent.parent / ".pytest_cache" / "hypothesis")

TINY_MODELS = ["tiny-bert", "tiny-gpt2", "tiny-llama", "cnn-digits", "cnn-digits-opset11-constants"]


@pytest.fixture(scope="session")
def model_path():
    """``model_path(name)``: the cached recipe model (built on first use), once per session."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            if not models.is_built(name):
                pytest.importorskip("torch")
                pytest.importorskip("optimum.exporters.onnx")
            cache[name] = models.build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def calib_feeds(model_path):
    """``calib_feeds(name, n)``: seeded sample inputs for a recipe model, computed once per session."""
    cache: dict[tuple[str, int], list] = {}

    def get(name: str, n: int = 16) -> list:
        if (name, n) not in cache:
            model_path(name)
            cache[(name, n)] = models.sample_inputs(name, n, seed=0)
        return cache[(name, n)]

    return get
