"""Real-model fidelity of onnxq against fp32 and ONNX Runtime's quantizers: one table per model.

Every quantizer gets the same fp32 model and the same calibration samples, runs in this process
(one after the other, memory released in between) and writes into a temporary folder that is
removed after its evaluation. A quantizer or evaluation that fails becomes a table row naming the
error; the other rows still run.

Quantizers (``--quantizers`` picks some by key):

- ``onnxq-default``: ``onnxq.quantize(path, calib, config=QuantConfig(), output=...)``;
- ``onnxq-per-tensor``: the default with per-tensor int8 symmetric weights;
- ``onnxq-<stem>``: one per ``--configs`` JSON file (``QuantConfig.from_json``);
- ``ort-static``: ``quantize_static`` QDQ, activations QUInt8, weights QInt8, per-channel, MinMax
  (defaults otherwise), after ``quant_pre_process`` (without it if that fails; the notes say so);
- ``ort-dynamic``: ``quantize_dynamic`` with QInt8 per-channel weights (no calibration);
- ``ort-matmul-nbits``: ``MatMulNBitsQuantizer`` (int4, block 128, symmetric RTN; no calibration);
  onnxq's weight-only counterpart is ``--configs tools/configs/weight-only-int4-b128.json``
  (``-matmuls.json``: the same with the tied embedding / lm_head table left float, as ORT leaves
  it; ``-gptq.json``, ``-awq.json``, ``-awq-gptq.json``: GPTQ, AWQ and AWQ then GPTQ on those
  MatMuls, calibrated on the model's calibration samples);
- ``onnxq-amp``: ``onnxq.quantize_mixed`` (automatic mixed precision) with the default config (or
  ``--amp-config``'s, e.g. ``tools/configs/dynamic.json`` for a dynamic base) and an accuracy
  budget scored by the task on an *evaluation* split kept apart from both the calibration data
  and the reported test split: MiniLM accuracy drop <= ``--amp-points`` (0.1) on 3,000 other
  movie snippets, SmolLM2 perplexity within ``--amp-ppl-pct`` (3 %) on the next
  ``--amp-windows`` tutorial windows, the CNN's top-1 drop <= ``--amp-points`` on training images
  not used for calibration. Its notes give the nodes kept in float, the quantizations tried, the
  budget metric on the evaluation split and the latency vs fp32 on ORT's CPU EP (batch 1, the
  calibration samples' shape, block-timed, median of 3 interleaved rounds).

Models (``--models``):

- ``minilm``: the real all-MiniLM-L6-v2 (recipe ``minilm-real``). Mean-pooled (attention-mask)
  embeddings of VADER movie snippets; a logistic-regression head (label: sentiment > 0) trained
  on fp32 embeddings of 3,000 snippets scores 2,000 others (fixed seeded split). Reported:
  accuracy, drop vs fp32 in points, mean cosine of the test embeddings vs fp32. Calibration:
  Amazon / NYT snippets (never movie ones), padded/truncated to 128 tokens. Evaluation batches
  are length-sorted and padded to their longest snippet (truncated at 128).
- ``smollm2``: the real SmolLM2-135M-Instruct (recipe ``smollm2-135m``, no KV cache). Perplexity
  over the first ``--windows`` non-overlapping ``--window-len``-token windows of the Python
  tutorial (tokenized whole, no special tokens); calibration on the first windows of the Python FAQ.
- ``cnn``: the digits CNN (recipe ``cnn-digits``): top-1 on its 397-image test split; calibration
  on single training images.
- ``cnn-opset11``: the same with every weight a Constant node at opset 11 (recipe
  ``cnn-digits-opset11-constants``); ``cnn-unbalanced``: the same CNN with the output channels of its
  first two Conv blocks scaled by 0.01..100 and the next Convs' inputs by the inverse (recipe
  ``cnn-digits-unbalanced``: same float function, hard for per-tensor weights; the case for
  ``--configs tools/configs/per-tensor-cle.json``). Same data and scoring as ``cnn``.

``--latency 1,2,2s`` adds a column per setting: each quantized model's latency over fp32's on
ORT's CPU EP (batch 1, the first 4 calibration samples cycled in blocks, median of 3 interleaved
rounds), with N intra-op threads, without spinning or (``Ns``) with it, as ONNX Runtime does by
default.

Quantize time is the wall time of the quantizer call (onnxq's includes its own fidelity check on 8
calibration samples; ORT static's includes ``quant_pre_process``). Sizes are of the written
file(s), MB = 10^6 bytes. Tables (Markdown) go to stdout, progress to stderr.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/fidelity.py [--models minilm,smollm2,cnn] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tools.machine import machine_info  # noqa: E402

log = logging.getLogger("fidelity")

MB = 1e6
Feed = dict[str, np.ndarray]
MODELS = ("minilm", "smollm2", "cnn", "cnn-opset11", "cnn-unbalanced")
DEFAULT_SAMPLES = {"minilm": 64, "smollm2": 16, "cnn": 64, "cnn-opset11": 64, "cnn-unbalanced": 64}
MINILM_TRAIN, MINILM_TEST = 3000, 2000
MINILM_AMP_EVAL = 3000  # movie snippets after the train and test ones: the AMP evaluation split
SMOLLM2_REFERENCE_PPL = 14.33  # ../shared/data/README.md: fp32, first 16 windows of 512 tokens
ERROR_CHARS = 160


# ----------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------

Quantizer = Callable[[Path, list[Feed], Path], dict[str, Any]]
"""``quantize(fp32_path, calib, output_path) -> notes``; raises on failure."""


@dataclass(frozen=True)
class Contender:
    """One row of every table: a label and how to make its model (``None``: the fp32 model)."""

    key: str
    label: str
    quantize: Quantizer | None


def onnxq_quantizer(config: Any) -> Quantizer:
    """Return a quantizer running ``onnxq.quantize`` with ``config``."""

    def run(fp32: Path, calib: list[Feed], output: Path) -> dict[str, Any]:
        import onnxq

        result = onnxq.quantize(fp32, calib, config=config, output=output, progress=False)
        s = result.summary
        return {
            "quantized_nodes": sum(s.quantized_nodes.values()),
            "float_nodes": len(s.float_nodes),
            "own_fidelity": {f.name: round(f.cosine, 6) for f in s.fidelity},
        }

    return run


class _ListReader:
    """An ORT calibration data reader over a list of feeds."""

    def __init__(self, samples: list[Feed]) -> None:
        self.samples = samples
        self._it: Iterator[Feed] = iter(samples)

    def get_next(self) -> Feed | None:
        """The next feed, or ``None`` at the end."""
        return next(self._it, None)

    def rewind(self) -> None:
        """Start again from the first feed."""
        self._it = iter(self.samples)


def ort_static(fp32: Path, calib: list[Feed], output: Path) -> dict[str, Any]:
    """``quantize_static``: QDQ, QUInt8 activations, QInt8 per-channel weights, MinMax."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_ListReader, CalibrationDataReader):
        """The list reader registered as an ORT ``CalibrationDataReader``."""

    notes: dict[str, Any] = {}
    source = fp32
    pre = output.with_name("preprocessed.onnx")
    t0 = time.perf_counter()
    try:
        quant_pre_process(str(fp32), str(pre))
        source = pre
        notes["pre_process"] = f"ok ({time.perf_counter() - t0:.1f} s)"
    except Exception as exc:
        notes["pre_process"] = f"failed, quantized without it: {_one_line(exc)}"
        log.warning("quant_pre_process failed (%s); quantizing the model as it is", _one_line(exc))
        pre.unlink(missing_ok=True)
    quantize_static(
        str(source),
        str(output),
        Reader(calib),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    if source == pre:
        pre.unlink(missing_ok=True)
    return notes


def ort_dynamic(fp32: Path, calib: list[Feed], output: Path) -> dict[str, Any]:
    """``quantize_dynamic`` with QInt8 per-channel weights (``calib`` is not used)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(output), weight_type=QuantType.QInt8, per_channel=True)
    return {}


def amp_quantizer(task: Task) -> Quantizer:
    """``onnxq.quantize_mixed`` under the task's budget (``task.amp_budget()``), scored on the task's
    evaluation split; the notes report what it chose and what it cost."""

    def run(fp32: Path, calib: list[Feed], output: Path) -> dict[str, Any]:
        import onnxq
        from onnxq.mixed_precision import MixedPrecision, quantize_mixed

        eval_fn, max_drop, what, extra = task.amp_budget()
        budget = MixedPrecision(eval_fn=eval_fn, max_drop=max_drop, ranking=task.args.amp_ranking, **extra)
        base = (
            onnxq.QuantConfig.from_json(task.args.amp_config) if task.args.amp_config else onnxq.QuantConfig()
        )
        result = quantize_mixed(fp32, calib, budget, config=base, output=output, progress=False)
        log.info("%s AMP:\n%s", task.name, result.to_text())
        notes: dict[str, Any] = {
            "budget": what,
            "met_on_eval_split": result.met,
            "float_nodes": f"{len(result.chosen)} of {len(result.ranking)} candidates",
            "chosen": ", ".join(f"{c.op_type} {c.name}" for c in result.chosen) or "none",
            "quantizations": result.quantizations,
            "eval_split_score": f"fp32 {result.fp32_score:.5g}, base {result.before.score:.5g}, "
            f"chosen {result.after.score:.5g}",
        }
        if result.latency_ratio:
            notes["latency_vs_fp32"] = (
                f"base {result.latency_ratio['base']:.3f}x, chosen {result.latency_ratio['chosen']:.3f}x "
                f"(fp32 {result.latency_ms['fp32']:.2f} ms)"
            )
            task.latency_ratio = result.latency_ratio["chosen"]
        return notes

    return run


amp_quantizer.needs_task = True  # type: ignore[attr-defined]  # run_contender passes the task


def ort_matmul_nbits(fp32: Path, calib: list[Feed], output: Path) -> dict[str, Any]:
    """ORT's ``MatMulNBitsQuantizer``: 4-bit, block 128, symmetric, RTN (its defaults; ``calib`` unused)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=128, is_symmetric=True)
    quant.process()
    quant.model.save_model_to_file(str(output), use_external_data_format=False)
    return {}


def _failing(message: str) -> Quantizer:
    """A quantizer that raises ``message`` (its row shows the error; the other rows still run)."""

    def run(fp32: Path, calib: list[Feed], output: Path) -> dict[str, Any]:
        raise RuntimeError(message)

    return run


def contenders(config_files: list[str]) -> list[Contender]:
    """fp32, the built-in onnxq configs, one per config file, then ORT static and dynamic.

    A config file that does not parse raises (``onnxq.ConfigError``); if onnxq itself cannot be
    imported, its rows fail with the import error instead.
    """
    onnxq_rows = [("onnxq-default", "onnxq default"), ("onnxq-per-tensor", "onnxq per-tensor weights")]
    onnxq_rows += [(f"onnxq-{Path(p).stem}", f"onnxq {Path(p).stem}") for p in config_files]
    try:
        from onnxq import PerTensor, QuantConfig, QuantSpec
    except Exception as exc:
        log.error("cannot import onnxq: %s", _one_line(exc))
        quantizers = [_failing(f"cannot import onnxq: {_one_line(exc)}")] * len(onnxq_rows)
    else:
        per_tensor = QuantConfig().with_changes(weights=QuantSpec("int8", True, PerTensor()))
        configs = [QuantConfig(), per_tensor, *(QuantConfig.from_json(p) for p in config_files)]
        quantizers = [onnxq_quantizer(c) for c in configs]
    return [
        Contender("fp32", "fp32", None),
        *(Contender(key, label, q) for (key, label), q in zip(onnxq_rows, quantizers, strict=True)),
        Contender("ort-static", "ORT quantize_static (U8S8, per-channel)", ort_static),
        Contender("ort-dynamic", "ORT quantize_dynamic (S8 weights, per-channel)", ort_dynamic),
        Contender("ort-matmul-nbits", "ORT MatMulNBits (int4 RTN, block 128)", ort_matmul_nbits),
        Contender("onnxq-amp", "onnxq automatic mixed precision", amp_quantizer),  # type: ignore[arg-type]
    ]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run the block with ``path`` as the current directory (files a library leaves there go with it)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def model_size(path: Path) -> int:
    """Bytes of an ONNX file plus any external-data files it names."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def session(path: Path, threads: int, spinning: bool = False) -> Any:
    """An ORT CPU session with ``threads`` intra-op threads, spinning only if asked."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


LATENCY_SAMPLES = 4  # the first calibration samples, as quantize_mixed times its models
LATENCY_ROUNDS = 3


def latency_session(path: Path, setting: str) -> Any:
    """An ORT CPU session for a ``--latency`` setting: ``N`` intra-op threads without spinning, or
    ``Ns`` with spinning (ONNX Runtime's default)."""
    return session(path, int(setting.rstrip("s")), spinning=setting.endswith("s"))


def latency_ratios(
    fp32: Path, model: Path, samples: list[Feed], settings: list[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """Per setting: the median over interleaved rounds of ``model``'s block time over fp32's in the
    same round (batch 1, ``timed_runs`` over ``samples``), and both medians in ms (a note). Each
    block gets a fresh session, released after it, so no other session's threads are awake
    (spinning) while a model is timed."""
    from onnxq.providers import timed_runs

    ratios, ms = {}, {}
    for setting in settings:
        per_round: list[list[float]] = [[], []]
        for _ in range(LATENCY_ROUNDS):
            for times, path in zip(per_round, (fp32, model), strict=True):
                sess = latency_session(path, setting)
                names = [o.name for o in sess.get_outputs()]
                times.append(
                    timed_runs(lambda x, sess=sess, names=names: sess.run(names, _select(x, sess)), samples)
                )
                del sess
        ratios[f"latency {setting}"] = statistics.median(
            q / f for q, f in zip(per_round[1], per_round[0], strict=True)
        )
        f, q = (statistics.median(t) for t in per_round)
        ms[f"latency_ms {setting}"] = f"fp32 {f:.2f}, this {q:.2f}"
    return ratios, ms


def _select(feed: Feed, sess: Any, index: int = 0) -> Feed:
    """``feed`` restricted to the session's inputs; a merged model (``--merged``) gets the branch
    flag too, alternating with ``index`` so half of the evaluation goes through each branch."""
    from models.merged import branch_feed

    full = branch_feed(feed, index)
    return {i.name: full[i.name] for i in sess.get_inputs()}


# ----------------------------------------------------------------------------------------------
# Tasks: what a model is evaluated on
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One quantizer's result on one model."""

    key: str
    label: str
    metrics: dict[str, float] = field(default_factory=dict)
    quantize_s: float | None = None
    eval_s: float | None = None
    size: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ModelResult:
    """Everything measured on one model."""

    model: str
    recipe: str
    calibration: str
    evaluation: str
    rows: list[Row] = field(default_factory=list)
    setup_s: float = 0.0
    total_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class Task:
    """A model, its calibration samples, and how a candidate model is scored against fp32."""

    name = ""
    recipe = ""
    columns: tuple[tuple[str, str, str], ...] = ()  # (header, metric key, format)

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.samples = args.samples or DEFAULT_SAMPLES[self.name]
        self.notes: list[str] = []

    def setup(self) -> tuple[Path, list[Feed]]:
        """Build the fp32 model, prepare the evaluation data; return ``(fp32 path, calibration)``."""
        raise NotImplementedError

    def evaluate(self, path: Path, fp32: bool) -> dict[str, float]:
        """Score the model at ``path`` (``fp32``: it is the reference; keep what later rows need)."""
        raise NotImplementedError

    def describe(self) -> tuple[str, str]:
        """One line each on the calibration and the evaluation data."""
        raise NotImplementedError

    def amp_budget(self) -> tuple[Callable[[Path], float], float, str, dict[str, Any]]:
        """``(eval_fn, max_drop, description, other MixedPrecision fields)`` for ``onnxq-amp``,
        scored on an evaluation split apart from the calibration and test data (after fp32 ran)."""
        raise NotImplementedError(f"no mixed-precision budget for {self.name}")


class MiniLMTask(Task):
    """all-MiniLM-L6-v2 sentence embeddings: sentiment accuracy of a logistic head, cosine vs fp32."""

    name = "minilm"
    recipe = "minilm-real"
    columns = (
        ("accuracy", "accuracy", ".4f"),
        ("Δ vs fp32 (points)", "drop_points", "+.2f"),
        ("mean cosine vs fp32", "cosine", ".5f"),
    )
    max_len = 128

    def setup(self) -> tuple[Path, list[Feed]]:
        from transformers import AutoTokenizer

        import models

        path = models.build(self.recipe)
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, local_files_only=True)
        movie = models.vader_snippets("movie")
        rng = np.random.default_rng(self.args.seed)
        order = rng.permutation(len(movie))
        self.train_idx = order[:MINILM_TRAIN]
        self.test_idx = order[MINILM_TRAIN : MINILM_TRAIN + MINILM_TEST]
        texts = [t for t, _ in movie]
        self.train_texts = [texts[i] for i in self.train_idx]
        self.test_texts = [texts[i] for i in self.test_idx]
        labels = np.array([s > 0 for _, s in movie], dtype=np.int64)
        self.y_train, self.y_test = labels[self.train_idx], labels[self.test_idx]
        end = MINILM_TRAIN + MINILM_TEST
        self.amp_idx = order[end : end + MINILM_AMP_EVAL]
        self.amp_texts = [texts[i] for i in self.amp_idx]
        self.y_amp = labels[self.amp_idx]

        pool = [t for t, _ in models.vader_snippets("nyt")] + [t for t, _ in models.vader_snippets("amazon")]
        picks = np.random.default_rng(self.args.seed + 1).choice(len(pool), self.samples, replace=False)
        calib = []
        for i in picks:
            text = pool[int(i)]
            padding = False if self.args.minilm_unpadded else "max_length"
            enc = self.tokenizer(
                text, padding=padding, truncation=True, max_length=self.max_len, return_tensors="np"
            )
            calib.append({k: v.astype(np.int64) for k, v in enc.items()})
        return path, calib

    def describe(self) -> tuple[str, str]:
        return (
            f"{self.samples} NYT/Amazon VADER snippets (seed {self.args.seed + 1}), "
            + ("truncated" if self.args.minilm_unpadded else "padded/truncated")
            + f" to {self.max_len} tokens",
            f"VADER movie snippets, label sentiment > 0; logistic head trained on fp32 embeddings of "
            f"{MINILM_TRAIN}, accuracy on {MINILM_TEST} others (seed {self.args.seed}); mean-pooled "
            f"embeddings, batches of {self.args.batch_size} sorted by length",
        )

    def embed(self, path: Path, texts: list[str], desc: str) -> np.ndarray:
        """Mean-pooled (attention mask) ``last_hidden_state`` of ``texts``, in their order."""
        sess = session(path, self.args.threads)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_len)
        ids = enc["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), sess.get_outputs()[0].shape[-1] or 384), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        bs = self.args.batch_size
        for batch, start in enumerate(tqdm(range(0, len(order), bs), desc=desc, unit="batch", leave=False)):
            idx = order[start : start + bs]
            width = max(len(ids[i]) for i in idx)
            batch_ids = np.full((len(idx), width), pad, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                batch_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            feed = {"input_ids": batch_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
            hidden = sess.run(["last_hidden_state"], _select(feed, sess, batch))[0]
            m = mask[:, :, None].astype(np.float32)
            out[idx] = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return out

    def evaluate(self, path: Path, fp32: bool) -> dict[str, float]:
        test = self.embed(path, self.test_texts, "minilm test")
        if fp32:
            from sklearn.linear_model import LogisticRegression

            train = self.embed(path, self.train_texts, "minilm train")
            head = LogisticRegression(max_iter=5000, random_state=self.args.seed)
            self.head = head.fit(train, self.y_train)
            self.ref_test = test
            self.ref_acc = float(self.head.score(test, self.y_test))
            self.notes.append(f"head train accuracy {self.head.score(train, self.y_train):.4f}")
        acc = float(self.head.score(test, self.y_test))
        num = (test * self.ref_test).sum(1)
        cos = num / (np.linalg.norm(test, axis=1) * np.linalg.norm(self.ref_test, axis=1))
        return {"accuracy": acc, "drop_points": 100 * (acc - self.ref_acc), "cosine": float(cos.mean())}

    def amp_budget(self) -> tuple[Callable[[Path], float], float, str, dict[str, Any]]:
        def accuracy_points(path: Path) -> float:
            return 100 * float(
                self.head.score(self.embed(path, self.amp_texts, "minilm amp eval"), self.y_amp)
            )

        points = self.args.amp_points
        what = (
            f"accuracy drop <= {points} points on {len(self.amp_texts)} other movie snippets "
            f"(seed {self.args.seed}, disjoint from train/test)"
        )
        return accuracy_points, points, what, {"max_refine_trials": 4}


class SmolLM2Task(Task):
    """SmolLM2-135M perplexity on the Python tutorial, calibrated on the Python FAQ."""

    name = "smollm2"
    recipe = "smollm2-135m"
    columns = (("perplexity", "ppl", ".3f"), ("Δ vs fp32", "ppl_change_pct", "+.2f%"))

    def setup(self) -> tuple[Path, list[Feed]]:
        import models

        path = models.build(self.recipe)
        n, amp = self.args.windows, self.args.amp_windows
        windows = models.text_windows(self.recipe, "tutorial", n + amp, self.args.window_len)
        self.windows, self.amp_windows = windows[:n], windows[n : n + amp]
        calib_windows = models.text_windows(self.recipe, "faq", self.samples, self.args.window_len)
        return path, [models.causal_lm_feed(w[None, :]) for w in calib_windows]

    def describe(self) -> tuple[str, str]:
        n = self.args.window_len
        return (
            f"first {self.samples} non-overlapping {n}-token windows of the Python FAQ",
            f"perplexity over the first {self.args.windows} non-overlapping {n}-token windows of the "
            f"Python tutorial ({self.args.windows * (n - 1)} predicted tokens)",
        )

    def perplexity(self, path: Path, windows: np.ndarray) -> float:
        """Perplexity of the model at ``path`` over ``windows``."""
        import models

        sess = session(path, self.args.threads)
        nll, count = 0.0, 0
        for i, window in enumerate(tqdm(windows, desc="smollm2 windows", unit="window", leave=False)):
            ids = window[None, :]
            logits = sess.run(["logits"], _select(models.causal_lm_feed(ids), sess, i))[0][0, :-1]
            logits = logits.astype(np.float64)
            peak = logits.max(axis=1)
            lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
            nll += float((lse - logits[np.arange(len(logits)), window[1:]]).sum())
            count += len(logits)
        return math.exp(nll / count)

    def amp_budget(self) -> tuple[Callable[[Path], float], float, str, dict[str, Any]]:
        pct = self.args.amp_ppl_pct
        what = (
            f"perplexity within +{pct}% on tutorial windows {self.args.windows}..."
            f"{self.args.windows + len(self.amp_windows) - 1} (after the test windows)"
        )
        extra = {"eval_samples": 2, "diff_samples": 2, "refine": False}
        return lambda p: -math.log(self.perplexity(p, self.amp_windows)), math.log1p(pct / 100), what, extra

    def evaluate(self, path: Path, fp32: bool) -> dict[str, float]:
        ppl = self.perplexity(path, self.windows)
        if fp32:
            self.ref_ppl = ppl
            if self.args.windows == 16 and self.args.window_len == 512:
                ok = abs(ppl / SMOLLM2_REFERENCE_PPL - 1) < 0.005
                self.notes.append(
                    f"fp32 perplexity {ppl:.3f} vs reference {SMOLLM2_REFERENCE_PPL} "
                    f"({'matches' if ok else 'DIFFERS'})"
                )
                if not ok:
                    log.warning("fp32 perplexity %.3f, reference %s", ppl, SMOLLM2_REFERENCE_PPL)
        return {"ppl": ppl, "ppl_change_pct": 100 * (ppl / self.ref_ppl - 1)}


class CNNTask(Task):
    """The digits CNN: top-1 on the held-out split, calibrated on training images."""

    name = "cnn"
    recipe = "cnn-digits"
    columns = (("top-1", "top1", ".4f"), ("Δ vs fp32 (points)", "drop_points", "+.2f"))

    def setup(self) -> tuple[Path, list[Feed]]:
        import models

        path = models.build(self.recipe)
        x_train, y_train, self.x_test, self.y_test = models.digits_split()
        picks = np.random.default_rng(self.args.seed).choice(len(x_train), self.samples, replace=False)
        rest = np.setdiff1d(np.arange(len(x_train)), picks)
        self.x_amp, self.y_amp = x_train[rest], y_train[rest]
        recorded = json.loads((path.parent / "metrics.json").read_text())["fp32_top1_accuracy"]
        self.notes.append(f"fp32 top-1 recorded at build: {recorded:.4f}")
        return path, [{"input": x_train[int(i) : int(i) + 1].copy()} for i in picks]

    def describe(self) -> tuple[str, str]:
        return (
            f"{self.samples} single training images (seed {self.args.seed})",
            f"top-1 on the {len(self.y_test)}-image held-out digits split",
        )

    def evaluate(self, path: Path, fp32: bool) -> dict[str, float]:
        import models

        acc = models.onnx_top1(path, self.x_test, self.y_test)
        if fp32:
            self.ref_acc = acc
        return {"top1": acc, "drop_points": 100 * (acc - self.ref_acc)}

    def amp_budget(self) -> tuple[Callable[[Path], float], float, str, dict[str, Any]]:
        import models

        points = self.args.amp_points
        what = f"top-1 drop <= {points} points on the {len(self.y_amp)} training images not calibrated on"
        return lambda p: 100 * models.onnx_top1(p, self.x_amp, self.y_amp), points, what, {}


class CNNOpset11Task(CNNTask):
    """The digits CNN at opset 11 with Constant-node weights."""

    name = "cnn-opset11"
    recipe = "cnn-digits-opset11-constants"


class CNNUnbalancedTask(CNNTask):
    """The digits CNN with unbalanced channel ranges (same float function)."""

    name = "cnn-unbalanced"
    recipe = "cnn-digits-unbalanced"


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (MiniLMTask, SmolLM2Task, CNNTask, CNNOpset11Task, CNNUnbalancedTask)
}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run_contender(task: Task, contender: Contender, fp32: Path, calib: list[Feed], tmp: Path) -> Row:
    """Quantize (unless fp32), evaluate, and return the row; errors end up in ``row.error``."""
    row = Row(contender.key, contender.label)
    path = fp32
    stage = "quantize"
    out_dir = tmp / contender.key
    try:
        if contender.quantize is not None:
            out_dir.mkdir()
            path = out_dir / "model.onnx"
            log.info("%s: quantizing with %s ...", task.name, contender.label)
            t0 = time.perf_counter()
            quantize = contender.quantize
            if getattr(quantize, "needs_task", False):
                quantize = quantize(task)  # type: ignore[call-arg,assignment]
            with _working_dir(out_dir):  # ORT's failed symbolic shape inference drops files in the cwd
                row.notes.update(quantize(fp32, calib, path))
            row.quantize_s = time.perf_counter() - t0
            gc.collect()
        row.size = model_size(path)
        stage = "evaluate"
        log.info("%s: evaluating %s ...", task.name, contender.label)
        t0 = time.perf_counter()
        row.metrics = task.evaluate(path, fp32=contender.quantize is None)
        row.eval_s = time.perf_counter() - t0
        if task.args.latency and contender.quantize is not None:
            stage = "latency"
            ratios, ms = latency_ratios(fp32, path, calib[:LATENCY_SAMPLES], task.args.latency)
            row.metrics.update(ratios)
            row.notes.update(ms)
        log.info(
            "%s/%s: %s (quantize %s s, eval %.1f s)",
            task.name,
            contender.key,
            ", ".join(f"{k} {v:.5g}" for k, v in row.metrics.items()),
            "-" if row.quantize_s is None else f"{row.quantize_s:.1f}",
            row.eval_s,
        )
    except Exception as exc:
        row.error = f"{stage} failed: {_one_line(exc)}"
        row.notes["traceback"] = traceback.format_exc()
        log.error("%s/%s: %s", task.name, contender.key, row.error)
        if contender.quantize is None:
            raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # quantized models are only kept while evaluated
        gc.collect()
    return row


def _merged(fp32: Path, calib: list[Feed], folder: Path) -> tuple[Path, list[Feed]]:
    """``fp32`` in the merged-decoder layout (written to ``folder``) and ``calib`` with the branch
    flag, alternating so half of the samples calibrate each branch."""
    import onnx

    from models.merged import branch_feed, merge_into_if

    merged = folder / "merged" / "model.onnx"
    merged.parent.mkdir()
    onnx.save(
        merge_into_if(onnx.load(str(fp32))), merged, save_as_external_data=True, location="model.onnx.data"
    )
    return merged, [branch_feed(f, i) for i, f in enumerate(calib)]


def run_model(name: str, args: argparse.Namespace, chosen: list[Contender]) -> ModelResult:
    """Evaluate fp32 and every chosen quantizer on model ``name``."""
    t_start = time.perf_counter()
    task = TASKS[name](args)
    log.info("%s: building / loading %s and the data ...", name, task.recipe)
    fp32, calib = task.setup()
    calibration, evaluation = task.describe()
    result = ModelResult(name, task.recipe, calibration, evaluation, setup_s=time.perf_counter() - t_start)
    log.info("%s: %d calibration samples; setup %.1f s", name, len(calib), result.setup_s)
    with tempfile.TemporaryDirectory(prefix=f"fidelity.{name}.") as tmp:
        if args.merged:
            fp32, calib = _merged(fp32, calib, Path(tmp))
            result.notes = ["merged-decoder layout: the model in both branches of an If (models/merged.py)"]
        for contender in chosen:
            result.rows.append(run_contender(task, contender, fp32, calib, Path(tmp)))
    del calib
    result.notes = [*result.notes, *task.notes]
    result.total_s = time.perf_counter() - t_start
    del task
    gc.collect()
    return result


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None else str(value)
    if spec.endswith("%"):
        return f"{value:{spec[:-1]}}%"
    return f"{value:{spec}}"


def _setting_label(key: str) -> str:
    setting = key.removeprefix("latency ")
    threads = setting.rstrip("s")
    return f"{threads} thread{'s' if threads != '1' else ''}" + (
        ", spinning" if setting.endswith("s") else ""
    )


def render_table(result: ModelResult, task_cls: type[Task]) -> str:
    """The Markdown table of one model."""
    columns = list(task_cls.columns)
    settings = dict.fromkeys(k for row in result.rows for k in row.metrics if k.startswith("latency "))
    columns += [(f"latency ÷ fp32 ({_setting_label(k)})", k, ".3f") for k in settings]
    header = ["quantizer", *(c[0] for c in columns), "quantize (s)", "eval (s)", "size (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in result.rows:
        if row.error:
            error = row.error.replace("|", "\\|").replace("`", "'")
            cells = [row.label, f"**{error}**", *["—"] * (len(columns) - 1)]
        else:
            cells = [row.label, *(_fmt(row.metrics.get(k), f) for _, k, f in columns)]
        size = row.size / MB if row.size else None
        cells += [_fmt(row.quantize_s, ".1f"), _fmt(row.eval_s, ".1f"), _fmt(size, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_notes(result: ModelResult) -> str:
    """Per-model footnotes: data, timings, quantizer notes."""
    notes = [
        f"- calibration: {result.calibration}",
        f"- evaluation: {result.evaluation}",
        f"- time: setup {result.setup_s:.0f} s, whole model {result.total_s:.0f} s",
        *(f"- {n}" for n in result.notes),
    ]
    for row in result.rows:
        extra = {k: v for k, v in row.notes.items() if k != "traceback"}
        if extra:
            notes.append(f"- {row.label}: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    return "\n".join(notes)


def _latency_settings(text: str) -> list[str]:
    settings = [t.strip() for t in text.split(",") if t.strip()]
    for t in settings:
        if not t.rstrip("s").isdigit() or int(t.rstrip("s")) < 1 or t.count("s") > 1:
            raise argparse.ArgumentTypeError(f"{t!r}: a setting is N or Ns (N threads, s: spinning)")
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument(
        "--samples",
        type=int,
        help="calibration samples (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SAMPLES.items())
        + "; smollm2 samples are windows)",
    )
    p.add_argument("--configs", nargs="*", default=[], metavar="CONFIG.json", help="extra onnxq configs")
    p.add_argument(
        "--quantizers",
        help="comma-separated keys to run (default all): onnxq-default, onnxq-per-tensor, "
        "onnxq-<config stem>, ort-static, ort-dynamic; fp32 always runs",
    )
    p.add_argument("--windows", type=int, default=16, help="smollm2 evaluation windows")
    p.add_argument("--window-len", type=int, default=512, help="smollm2 tokens per window")
    p.add_argument("--batch-size", type=int, default=32, help="minilm evaluation batch size")
    p.add_argument(
        "--minilm-unpadded",
        action="store_true",
        help="minilm calibration samples at the snippets' own lengths (default: padded to 128 tokens); "
        "onnxq-amp times latency on them",
    )
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for evaluation")
    p.add_argument(
        "--latency",
        type=_latency_settings,
        default=[],
        metavar="SETTINGS",
        help="also time every quantized model against fp32 (batch 1, the first 4 calibration samples, "
        "median of 3 interleaved rounds) under each comma-separated ORT CPU setting: N intra-op "
        "threads without spinning, Ns with spinning (ORT's default), e.g. 1,2,2s",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of splits and calibration picks")
    p.add_argument("--amp-points", type=float, default=0.1, help="onnxq-amp: max accuracy drop (points)")
    p.add_argument("--amp-ppl-pct", type=float, default=3.0, help="onnxq-amp: smollm2 ppl rise (%%)")
    p.add_argument(
        "--amp-config", metavar="CONFIG.json", help="onnxq-amp: the base config (default: QuantConfig())"
    )
    p.add_argument(
        "--amp-ranking",
        choices=("auto", "measured", "added_error"),
        default="auto",
        help="onnxq-amp: MixedPrecision(ranking=...), the order nodes leave 8 bits in",
    )
    p.add_argument("--amp-windows", type=int, default=4, help="onnxq-amp: smollm2 evaluation windows")
    p.add_argument(
        "--merged",
        action="store_true",
        help="each model in the merged-decoder layout: the whole model in both branches of an If "
        "(weights shared in the main graph), calibrated and evaluated through alternate branches",
    )
    p.add_argument("--json", metavar="OUT.json", help="write every number here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_names if m not in TASKS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.samples is not None and args.samples < 1:
        p.error("--samples must be positive")
    if args.amp_config:  # quantizers run in a scratch folder
        args.amp_config = str(Path(args.amp_config).resolve())
    return args


def configure_logging(verbose: bool) -> None:
    """Progress to stderr, unless the process already set up logging (e.g. under pytest).

    Without ``verbose``, ORT's quantizer warnings (one per tensor, through the root logger) and the
    step-by-step logs of onnxscript / onnx_ir passes are dropped.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.ERROR)
        for name in ("onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return 1 if any row failed, else 0."""
    args = parse_args(argv)
    configure_logging(args.verbose)
    try:
        all_contenders = contenders(args.configs)
    except Exception as exc:  # a config file that does not parse: say which and stop
        log.error("--configs: %s: %s", type(exc).__name__, exc)
        return 2
    chosen = all_contenders
    if args.quantizers:
        keys = {k.strip() for k in args.quantizers.split(",") if k.strip()}
        unknown = keys - {c.key for c in all_contenders}
        if unknown:
            known = ", ".join(c.key for c in all_contenders)
            log.error("unknown quantizer(s) %s; known: %s", ", ".join(sorted(unknown)), known)
            return 2
        chosen = [c for c in all_contenders if c.key == "fp32" or c.key in keys]

    t0 = time.perf_counter()
    info = machine_info()
    command = shlex.join(["tools/fidelity.py", *(sys.argv[1:] if argv is None else argv)])
    print("# Fidelity on real models: fp32 vs onnxq vs ONNX Runtime\n")
    print(f"command: `{command}`  ")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores; onnxruntime {info['onnxruntime']}, "
        f"onnxq {info['onnxq']}, git {info.get('git', {}).get('head', '?')} "
        f"({info.get('git', {}).get('onnxq_modified_files', '?')} modified files under onnxq/); "
        f"evaluation with {args.threads} ORT threads\n",
        flush=True,
    )
    results: list[ModelResult] = []
    failed = False

    def dump() -> None:
        if args.json:
            data = {
                "command": command,
                "args": vars(args),
                "machine": info,
                "total_s": time.perf_counter() - t0,
                "models": [asdict(r) for r in results],
            }
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")

    for name in args.model_names:
        try:
            result = run_model(name, args, chosen)
        except Exception as exc:
            log.exception("%s: fp32 setup or evaluation failed", name)
            print(f"## {name}\n\n**failed**: `{_one_line(exc)}`\n", flush=True)
            failed = True
            continue
        results.append(result)
        failed |= any(r.error for r in result.rows)
        print(f"## {name} ({result.recipe})\n")
        print(render_table(result, TASKS[name]))
        print()
        print(render_notes(result))
        print(flush=True)
        dump()
    print(f"total runtime: {time.perf_counter() - t0:.0f} s")
    dump()
    if args.json:
        log.info("wrote %s", args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
