"""Named, reproducible recipes for the ONNX models used by tests, the demo and benchmarks.

Models are built on demand into ``<repo>/.cache/models/<name>/model.onnx`` (override the root
with ``ONNXQ_MODEL_CACHE``); side files (``config.json``, tokenizer files, ``metrics.json``,
``build_info.json``) sit beside. Builds are seeded, cached and atomic. Nothing is downloaded.

    >>> import models
    >>> path = models.build("tiny-bert")
    >>> feeds = models.sample_inputs("tiny-bert", 8)

Run ``python -m models list`` / ``python -m models build NAME ...|all`` from the repo root.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import cache, recipes
from .cache import cache_root, is_built, model_dir
from .digits import digits_split, onnx_top1
from .inputs import (
    causal_lm_feed,
    python_docs_text,
    sample_inputs,
    text_windows,
    vader_sentences,
    vader_snippets,
)

__all__ = [
    "build",
    "cache_root",
    "causal_lm_feed",
    "describe",
    "descriptions",
    "digits_split",
    "is_built",
    "model_dir",
    "names",
    "onnx_top1",
    "python_docs_text",
    "sample_inputs",
    "text_windows",
    "vader_sentences",
    "vader_snippets",
]

logger = logging.getLogger(__name__)


def names() -> list[str]:
    """Return every recipe name, in a stable order (small models first)."""
    return list(recipes.RECIPES)


def describe(name: str) -> str:
    """Return the one-line description of recipe ``name`` (``KeyError`` if unknown)."""
    return recipes.get(name).description


def descriptions() -> dict[str, str]:
    """Return ``{name: description}`` for every recipe."""
    return {name: r.description for name, r in recipes.RECIPES.items()}


def build(name: str, *, force: bool = False) -> Path:
    """Return the path of ``<cache>/<name>/model.onnx``, building it first if it is not cached.

    A cached model is returned at once. A build happens in a temporary folder that is renamed into
    place when complete, so an interrupted build never leaves a partial model. Weights are seeded,
    so rebuilding (``force=True``) gives the same model.
    """
    recipe = recipes.get(name)
    if not force and cache.is_built(name):
        return cache.model_dir(name) / cache.MODEL_FILE
    logger.info("building %s ...", name)
    folder = cache.atomic_build(name, lambda out: recipes.write_recipe(recipe, out), force=force)
    return folder / cache.MODEL_FILE
