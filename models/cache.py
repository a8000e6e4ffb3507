"""Where built models live, and how a build is made atomic.

Every model is a folder ``<cache root>/<name>/`` holding ``model.onnx`` and side files. A build is
written into a hidden temporary folder beside it and renamed into place only once complete, so a
folder named after a model is always a finished build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Root of the repository checkout (the folder holding ``models/``)."""

CACHE_ENV = "ONNXQ_MODEL_CACHE"
"""Environment variable that overrides the cache root (default ``<repo>/.cache/models``)."""

MODEL_FILE = "model.onnx"


def cache_root() -> Path:
    """Return the folder holding one sub-folder per built model (not created here)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser().resolve() if override else REPO_ROOT / ".cache" / "models"


def model_dir(name: str) -> Path:
    """Return the folder a model named ``name`` is (or would be) built into."""
    return cache_root() / name


def is_built(name: str) -> bool:
    """True when a complete build of ``name`` is in the cache."""
    return (model_dir(name) / MODEL_FILE).is_file()


def atomic_build(name: str, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Build ``name`` with ``write(tmp_dir)`` and move it into place; return the final folder.

    ``write`` must put ``model.onnx`` (and any side files) into the folder it is given. Nothing
    appears under the model's own folder unless ``write`` returns normally; on any error (or
    interruption) the temporary folder is removed. If another process finished the same build
    first, its result is kept and ours is discarded.
    """
    final = model_dir(name)
    if not force and is_built(name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        write(tmp)
        if not (tmp / MODEL_FILE).is_file():
            raise RuntimeError(f"recipe {name!r} finished without writing {MODEL_FILE}")
        if final.exists():
            if not force and is_built(name):  # another process won the race
                logger.info("%s was built concurrently; keeping that build", name)
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            old = final.with_name(f".{name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(final)
            except OSError:
                if not is_built(name):
                    raise
                logger.info("%s was built concurrently; keeping that build", name)
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return final
