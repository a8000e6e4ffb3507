"""Benchmark onnxq against ONNX Runtime's ``quantize_static`` on the same models and calibration data.

Two modes (``--mode``); both quantize random-weight ``bert-base`` and ``minilm-random`` (sequence
length 128) by default, and every quantization runs in a fresh subprocess.

``--mode minmax`` (the default, ``make bench``; about 3 minutes on 2 cores): onnxq's default against
ORT's MinMax, with latency.

1. the calibration samples (``--samples``, seed ``--seed``) are written once to an ``.npz`` that every
   contender reads, and ``--eval-samples`` held-out inputs are drawn with seed ``--eval-seed``;
2. each contender quantizes the fp32 model in its own fresh subprocess (``--worker NAME``), whose
   working directory is a scratch folder (ORT may leave temp files there):

   - ``onnxq``: ``onnxq.quantize(path, calib, output=...)`` with the default config;
   - ``ort-default``: ``quantize_static`` MinMax, QDQ, per-channel, QInt8 activations / QInt8 weights;
   - ``ort-u8s8``: the same with QUInt8 activations / QInt8 weights;

   the worker reports the wall time of the quantize call only, the process's peak RSS
   (``VmHWM``) and the RSS measured just before the call;
3. one more subprocess per model (``--worker latency``) loads fp32 and every quantized model as ORT CPU
   sessions (2 intra-op threads, no spinning, default graph optimizations), measures fidelity of the
   first output (cosine, max abs error over all held-out samples concatenated, float64), warms every
   session up and times them in blocks (all runs of one model, then the next) for ``--rounds``
   rounds, the block order reversed every other round to cancel linear drift.

``--mode methods``: every calibration method side by side with ORT's same method, for each sample
count of ``--samples`` (e.g. ``--samples 32,512``, to see whether peak RSS grows with the samples):

- onnxq: ``QuantConfig(calibration=M())`` for M in ``--methods`` (default MinMax, Percentile, Entropy,
  MSE), everything else default;
- ORT: ``quantize_static`` U8S8 (QUInt8 activations, QInt8 weights, per-channel, QDQ) with
  ``calibrate_method=CalibrationMethod.M`` and ORT's default calibrator options, on every QDQ op type
  but ``--ort-exclude-op-types`` (default ``Where``, for all ORT methods alike: BERT's attention mask
  is a ``Where`` between 0 and float32 min, and ORT's Percentile and Entropy fail on it in
  ``np.histogram`` with "Too many bins for data range"; ``--ort-exclude-op-types ''`` shows it).
  ORT has no MSE (its ``Distribution`` method is something else), so MSE's ORT row reads "n/a".
  ``RTN4``, ``GPTQ``, ``AWQ``: weight-only int4 block 128 of the MatMul/Gemm weights
  (``QuantConfig.weight_only("int4", 128, algorithm=..., exclude_op_types=("Gather",))``), to see
  what GPTQ's Hessians and AWQ's searches cost in time and peak RSS over round-to-nearest at each
  sample count; their ORT rows read "n/a" (ORT's int4 RTN is in ``tools/fidelity.py``);
  ``NoSmoothing``, ``PerTensor``, ``CLE-BC``, ``AMP``: the default with SmoothQuant off, with
  per-tensor int8 weights, with per-tensor weights plus cross-layer equalization and bias
  correction, and ``quantize_mixed`` under ``min_cosine=0.999`` (the float nodes it keeps are in
  the targets list): what each algorithm costs in time and peak RSS, and (fidelity) what it buys;
  no ORT counterpart ("n/a");
  ORT's histogram calibrators keep every sample's activations in memory, so ORT runs only at sample
  counts up to ``--ort-max-samples`` (default 32) and reads "skipped" above;
- per quantization: wall time of the quantize call, worker peak RSS (and ÷ the fp32 model file),
  output size, and cosine / max abs error of the first output vs fp32 on the held-out samples
  (``--worker fidelity``: one session at a time, same session options as above; no latency, as the
  method changes only the scales, not the graph). Ratios: time ÷ ORT's same method, time ÷ the same
  tool's MinMax at the same sample count, peak RSS ÷ fp32 file, and across sample counts peak RSS at
  the largest ÷ at the smallest count. A "targets" list checks onnxq's numbers against the goals.

Ratios are always taken between numbers measured in the same run. The tables go to stdout (Markdown),
progress to stderr; ``--json OUT.json`` writes every number. MB = 10^6 bytes. The load average is
printed at the start and the end (other processes on the machine skew the timings).

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_quantize.py [--models bert-base,minilm-random]
    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_quantize.py --mode methods --models bert-base \\
        --samples 32,512 [--methods MinMax,Percentile,Entropy,MSE] [--ort-max-samples 32]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.machine import machine_info  # noqa: E402

log = logging.getLogger("bench_quantize")

MB = 1e6
CONTENDERS = ("onnxq", "ort-default", "ort-u8s8")
LABELS = {
    "fp32": "fp32",
    "onnxq": "onnxq default",
    "ort-default": "ORT default (S8S8)",
    "ort-u8s8": "ORT U8S8",
}
DEFAULT_MODELS = "bert-base,minilm-random"
WORKER_TIMEOUT_S = 3600
MODES = ("minmax", "methods", "dynamic", "weight-only")
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy", "MSE")
# Weight-only int4 block 128 (MatMul/Gemm weights; tables stay float): round-to-nearest, GPTQ, AWQ.
WEIGHT_ONLY_METHODS = ("RTN4", "GPTQ", "AWQ")
# The static int8 default with one accuracy algorithm changed: SmoothQuant off (it is on by default
# for transformers); per-tensor weights, and the same with cross-layer equalization + bias
# correction (what they are for, on CNNs); automatic mixed precision under a cosine budget
# (quantize_mixed, MixedPrecision(min_cosine=AMP_MIN_COSINE)).
ALGORITHM_METHODS = ("NoSmoothing", "PerTensor", "CLE-BC", "AMP")
AMP_MIN_COSINE = 0.999
METHODS = CALIBRATION_METHODS + WEIGHT_ONLY_METHODS + ALGORITHM_METHODS
ORT_METHODS = ("MinMax", "Percentile", "Entropy")  # ORT's Distribution is not MSE
DEFAULT_ORT_MAX_SAMPLES = 32
# targets checked in --mode methods (onnxq's numbers)
TARGET_VS_ORT = 0.1  # histogram method time ÷ ORT's same method
TARGET_VS_MINMAX = 1.5  # histogram method time ÷ onnxq's MinMax
TARGET_RSS_PER_FILE = 1.5  # peak RSS ÷ fp32 model file, every method
FLAT_TOLERANCE = 1.05  # peak RSS at the largest sample count ÷ at the smallest


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def vm_hwm_bytes() -> int:
    """Peak RSS of this process from /proc/self/status (``VmHWM``); 0 where unavailable."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far: ``VmHWM`` of its own address space where Linux gives it,
    else ``ru_maxrss`` (KiB on Linux), which survives ``fork`` + ``execve``: a worker started by a
    parent holding 1 GB would report at least 1 GB however little it used itself."""
    return vm_hwm_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def file_size(path: Path) -> int:
    """Size of a model: the file itself plus any ``*.data`` external-data files beside it."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.data"))


def load_samples(npz: Path) -> list[dict[str, np.ndarray]]:
    """Samples saved by :func:`save_samples` (arrays ``<index>/<input>``), in order."""
    with np.load(npz, allow_pickle=False) as archive:
        out: dict[int, dict[str, np.ndarray]] = {}
        for key in archive.files:
            index, name = key.split("/", 1)
            out.setdefault(int(index), {})[name] = archive[key]
    return [out[i] for i in sorted(out)]


def save_samples(samples: list[dict[str, np.ndarray]], npz: Path) -> None:
    """Write a list of feed dicts to one ``.npz``."""
    np.savez(npz, **{f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()})


def ort_session_options() -> Any:
    """The session options of every latency / fidelity session."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


# ----------------------------------------------------------------------------------------------
# Workers (each runs in a fresh process)
# ----------------------------------------------------------------------------------------------


class ListReader:
    """An ORT ``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self.samples = samples
        self._it: Iterator[dict[str, np.ndarray]] = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed, or None at the end."""
        return next(self._it, None)

    def rewind(self) -> None:
        """Start again from the first feed."""
        self._it = iter(self.samples)


def _quantize_onnxq(
    model: Path, calib: list[dict[str, np.ndarray]], output: Path, method: str | None = None
) -> dict[str, Any]:
    """onnxq's default config, the default with ``calibration=<method>()``, weight-only int4 block 128
    (``RTN4``, ``GPTQ``, ``AWQ``), or the default with one algorithm changed (``ALGORITHM_METHODS``)."""
    import onnxq
    from onnxq import config as onnxq_config
    from onnxq.mixed_precision import MixedPrecision, quantize_mixed

    config = None
    if method in WEIGHT_ONLY_METHODS:
        algorithm = None if method == "RTN4" else getattr(onnxq_config, method)()
        config = onnxq.QuantConfig.weight_only("int4", 128, algorithm=algorithm, exclude_op_types=("Gather",))
    elif method == "NoSmoothing":
        config = onnxq.QuantConfig(smoothing=None)
    elif method in ("PerTensor", "CLE-BC"):
        weights = onnxq.QuantSpec("int8", True, onnxq.PerTensor())
        config = onnxq.QuantConfig(weights=weights)
        if method == "CLE-BC":
            config = config.with_changes(
                equalization=onnxq_config.CrossLayerEqualization(),
                bias_correction=onnxq_config.BiasCorrection(),
            )
    elif method is not None and method != "AMP":
        config = onnxq.QuantConfig(calibration=getattr(onnxq_config, method)())
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if method == "AMP":
        budget = MixedPrecision(min_cosine=AMP_MIN_COSINE, measure_latency=False)
        mixed = quantize_mixed(model, calib, budget, output=output, progress=False)
        s = mixed.summary
        extra = {
            "amp": {"met": mixed.met, "float_nodes": len(mixed.chosen), "candidates": len(mixed.ranking)}
        }
    else:
        s = onnxq.quantize(model, calib, config=config, output=output, progress=False).summary
    elapsed = time.perf_counter() - t0
    assert s is not None
    return {
        "quantize_s": elapsed,
        **extra,
        "onnxq_summary": {
            "quantized_nodes": dict(s.quantized_nodes),
            "float_nodes": len(s.float_nodes),
            "calibration_samples": s.calibration_samples,
            "size_before": s.size_before,
            "size_after": s.size_after,
            "fidelity": [asdict(f) for f in s.fidelity],
            "fidelity_samples": s.fidelity_samples,
        },
    }


def _quantize_ort(
    model: Path,
    calib: list[dict[str, np.ndarray]],
    output: Path,
    u8s8: bool,
    method: str | None = None,
    op_types: list[str] | None = None,
) -> dict[str, Any]:
    """``quantize_static`` QDQ per-channel, with ``CalibrationMethod.<method>`` (default MinMax) on
    ``op_types`` (default: ORT's, every QDQ op type)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(ListReader, CalibrationDataReader):
        """ListReader registered as an ORT CalibrationDataReader."""

    reader = Reader(calib)
    t0 = time.perf_counter()
    quantize_static(
        str(model),
        str(output),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8 if u8s8 else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method or "MinMax"),
        op_types_to_quantize=op_types,
    )
    return {"quantize_s": time.perf_counter() - t0}


def run_quantize_worker(args: argparse.Namespace) -> int:
    """``--worker onnxq|ort-default|ort-u8s8 [--method M]``: quantize once, write a JSON result."""
    result_path = Path(args.result)
    out: dict[str, Any] = {"contender": args.worker, "method": args.method}
    t_start = time.perf_counter()
    try:
        # Imports and data loading first: they are not part of the measured call.
        import onnxruntime

        if args.worker == "onnxq":
            import onnxq  # noqa: F401
        else:
            import onnxruntime.quantization  # noqa: F401
        calib = load_samples(Path(args.calib))
        model, output = Path(args.model), Path(args.output)
        gc.collect()
        out["setup_s"] = time.perf_counter() - t_start
        out["rss_before"] = rss_bytes()
        out["peak_before"] = peak_rss_bytes()
        out["load_before"] = load_average()
        cpu0 = cpu_seconds()
        if args.worker == "onnxq":
            out.update(_quantize_onnxq(model, calib, output, args.method))
        else:
            op_types = args.op_types.split(",") if args.op_types else None
            out.update(_quantize_ort(model, calib, output, args.worker == "ort-u8s8", args.method, op_types))
        out["cpu_s"] = cpu_seconds() - cpu0
        out["load_after"] = load_average()
        out["peak_rss"] = peak_rss_bytes()
        out["vm_hwm"] = vm_hwm_bytes()
        out["peak_delta"] = max(0, out["peak_rss"] - out["rss_before"])
        out["size"] = file_size(output)
        out["leftover_cwd_files"] = sorted(p.name for p in Path.cwd().iterdir())
        code = 0
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        log.error("%s failed: %s", args.worker, out["error"])
        code = 1
    out["process_s"] = time.perf_counter() - t_start
    result_path.write_text(json.dumps(out, indent=2))
    return code


def _first_output(session: Any, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    name = session.get_outputs()[0].name
    return np.concatenate([session.run([name], s)[0].astype(np.float64).ravel() for s in samples])


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Cosine, max abs error and SQNR of ``got`` against ``ref`` (float64, flattened)."""
    cos = float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    err = ref - got
    sqnr = float(10 * np.log10(np.sum(ref**2) / np.sum(err**2))) if np.any(err) else math.inf
    return {"cosine": cos, "max_abs_err": float(np.max(np.abs(err))), "sqnr_db": sqnr}


def run_fidelity_worker(args: argparse.Namespace) -> int:
    """``--worker fidelity``: fidelity of each model's first output vs fp32, one session at a time."""
    import onnxruntime as ort

    spec: dict[str, str] = json.loads(args.models_json)
    evals = load_samples(Path(args.calib))
    out: dict[str, Any] = {"fidelity": {}}
    ref_sess = ort.InferenceSession(spec["fp32"], ort_session_options(), providers=["CPUExecutionProvider"])
    ref = _first_output(ref_sess, evals)
    out["first_output"] = ref_sess.get_outputs()[0].name
    del ref_sess
    for key, path in spec.items():
        if key == "fp32":
            out["fidelity"][key] = _compare(ref, ref)
            continue
        sess = ort.InferenceSession(path, ort_session_options(), providers=["CPUExecutionProvider"])
        out["fidelity"][key] = _compare(ref, _first_output(sess, evals))
        del sess
        gc.collect()
        log.info(
            "  fidelity %-18s cosine %.6f  max abs err %.4g",
            key,
            out["fidelity"][key]["cosine"],
            out["fidelity"][key]["max_abs_err"],
        )
    Path(args.result).write_text(json.dumps(out, indent=2))
    return 0


def run_latency_worker(args: argparse.Namespace) -> int:
    """``--worker latency``: fidelity of each model's first output and block-timed latency."""
    import onnxruntime as ort

    spec: dict[str, str] = json.loads(args.models_json)
    evals = load_samples(Path(args.calib))
    feed = evals[0]
    sessions = {
        key: ort.InferenceSession(path, ort_session_options(), providers=["CPUExecutionProvider"])
        for key, path in spec.items()
    }
    out: dict[str, Any] = {"fidelity": {}, "latency_ms": {}, "rounds": args.rounds, "iters": args.iters}
    ref = _first_output(sessions["fp32"], evals)
    out["first_output"] = sessions["fp32"].get_outputs()[0].name
    for key, sess in sessions.items():
        got = ref if key == "fp32" else _first_output(sess, evals)
        out["fidelity"][key] = _compare(ref, got)
        log.info(
            "  fidelity %-12s cosine %.6f  max abs err %.4g",
            key,
            out["fidelity"][key]["cosine"],
            out["fidelity"][key]["max_abs_err"],
        )
    for sess in sessions.values():
        for _ in range(args.warmup):
            sess.run(None, feed)
    times: dict[str, list[list[float]]] = {key: [] for key in sessions}
    order = list(sessions)
    for r in range(args.rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            sess = sessions[key]
            block = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                sess.run(None, feed)
                block.append((time.perf_counter() - t0) * 1e3)
            times[key].append(block)
        log.info(
            "  latency round %d: %s",
            r + 1,
            ", ".join(f"{k} {statistics.median(v[-1]):.1f} ms" for k, v in times.items()),
        )
    fp32_rounds = [statistics.median(b) for b in times["fp32"]]
    for key, blocks in times.items():
        per_round = [statistics.median(b) for b in blocks]
        ratios = [q / f for q, f in zip(per_round, fp32_rounds, strict=True)]
        out["latency_ms"][key] = {
            "median": statistics.median([t for b in blocks for t in b]),
            "min": min(t for b in blocks for t in b),
            "per_round_median": per_round,
            "ratio_vs_fp32": statistics.median(ratios),
            "ratio_per_round": ratios,
        }
    Path(args.result).write_text(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """Everything measured for one model (``--mode minmax``)."""

    name: str
    fp32_path: str
    fp32_size: int
    calib_samples: int
    eval_samples: int
    quantize: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class MethodsRun:
    """Everything measured for one model in ``--mode methods``.

    ``by_samples[n]`` holds, for ``n`` calibration samples: ``quantize[key]`` (the worker's result;
    ``key`` is ``onnxq:<method>`` or ``ort:<method>``), ``fidelity[key]``, ``errors[key]`` and
    ``skipped[key]`` (why a cell was not run: ``"n/a"`` or ``"skipped"``)."""

    name: str
    fp32_path: str
    fp32_size: int
    eval_samples: int
    methods: list[str]
    ort_excluded_op_types: list[str] = field(default_factory=list)
    by_samples: dict[int, dict[str, Any]] = field(default_factory=dict)


def _spawn(argv: list[str], cwd: Path, what: str) -> int:
    """Run this script as a worker in a fresh interpreter; stderr passes through for progress."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    log.debug("running %s", shlex.join(cmd))
    t0 = time.perf_counter()
    try:
        # the worker's stdout goes to stderr: ORT prints progress there, the tables own stdout
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=sys.stderr, timeout=WORKER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        log.error("%s timed out after %d s", what, WORKER_TIMEOUT_S)
        return -1
    log.info("%s: exit %d after %.1f s", what, proc.returncode, time.perf_counter() - t0)
    return proc.returncode


def _exit_message(code: int) -> str:
    if code < 0 and -code == 9:
        return "worker killed by SIGKILL (out of memory?) with no result"
    if code < 0:
        return f"worker killed by signal {-code} (or timed out) with no result"
    return f"worker exited with code {code} and no result"


def run_contender(
    contender: str,
    method: str | None,
    fp32: Path,
    calib_npz: Path,
    folder: Path,
    what: str,
    op_types: list[str] | None = None,
) -> tuple[dict[str, Any], str | None, Path]:
    """Quantize ``fp32`` in a fresh worker; returns its result, the error (None if fine) and the output."""
    work, out_dir = folder / "cwd", folder / "out"
    work.mkdir(parents=True)
    out_dir.mkdir()
    output, result = out_dir / "model.onnx", folder / "result.json"
    log.info("%s: quantizing ...", what)
    argv = ["--worker", contender, "--model", str(fp32), "--calib", str(calib_npz)]
    argv += ["--output", str(output), "--result", str(result)]
    if method is not None:
        argv += ["--method", method]
    if op_types is not None:
        argv += ["--op-types", ",".join(op_types)]
    code = _spawn(argv, work, what)
    data = json.loads(result.read_text()) if result.is_file() else {}
    error = None
    if code != 0 or "error" in data:
        error = data.get("error") or _exit_message(code)
        if "traceback" in data:
            log.error("%s traceback:\n%s", what, data["traceback"])
    else:
        log.info(
            "%s: %.1f s (CPU %.1f s), peak RSS %.0f MB (+%.0f MB), %.1f MB",
            what,
            data["quantize_s"],
            data["cpu_s"],
            data["peak_rss"] / MB,
            data["peak_delta"] / MB,
            data["size"] / MB,
        )
    # ORT leaves its augmented model copy in the worker's cwd: drop it now to spare the disk
    shutil.rmtree(work, ignore_errors=True)
    return data, error, output


def _ort_op_types(exclude: list[str]) -> list[str] | None:
    """ORT's QDQ op types minus ``exclude`` (None: ORT's default, every QDQ op type)."""
    if not exclude:
        return None
    from onnxruntime.quantization.registry import QDQRegistry

    return sorted(set(QDQRegistry) - set(exclude))


def _prepare(name: str, n: int, args: argparse.Namespace, root: Path) -> tuple[Path, Path, int]:
    """Calibration (``n``, seed ``--seed``) and held-out samples as ``.npz`` under ``root``."""
    import models

    calib_npz, eval_npz = root / f"calib-{n}.npz", root / "eval.npz"
    save_samples(models.sample_inputs(name, n, seed=args.seed, seq_len=args.seq_len), calib_npz)
    evals = models.sample_inputs(name, args.eval_samples, seed=args.eval_seed, seq_len=args.seq_len)
    save_samples(evals, eval_npz)
    return calib_npz, eval_npz, len(evals)


def bench_model(name: str, n: int, args: argparse.Namespace, tmp: Path) -> ModelRun:
    """Quantize ``name`` with every contender on ``n`` samples, then time and compare all of them."""
    import models

    fp32 = models.build(name)
    root = tmp / f"{name}-{n}"
    root.mkdir()
    calib_npz, eval_npz, n_eval = _prepare(name, n, args, root)
    run = ModelRun(name, str(fp32), file_size(fp32), n, n_eval)
    log.info("%s: fp32 %.1f MB, %d calibration / %d eval samples", name, run.fp32_size / MB, n, n_eval)

    outputs: dict[str, str] = {"fp32": str(fp32)}
    for contender in CONTENDERS:
        data, error, output = run_contender(
            contender, None, fp32, calib_npz, root / contender, f"{name}/{contender}"
        )
        if error:
            run.errors[contender] = error
        else:
            outputs[contender] = str(output)
        run.quantize[contender] = data

    log.info("%s: fidelity and latency of %s ...", name, ", ".join(outputs))
    result = root / "latency.json"
    code = _spawn(
        [
            "--worker",
            "latency",
            "--models-json",
            json.dumps(outputs),
            "--calib",
            str(eval_npz),
            "--result",
            str(result),
            "--rounds",
            str(args.rounds),
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
        ],
        root,
        f"{name}/latency",
    )
    if code == 0 and result.is_file():
        run.latency = json.loads(result.read_text())
    else:
        run.errors["latency"] = f"latency worker exited with code {code}"
    return run


def bench_methods(name: str, args: argparse.Namespace, tmp: Path) -> MethodsRun:
    """``--mode methods``: every method with onnxq and ORT at every sample count, then fidelity."""
    import models

    fp32 = models.build(name)
    run = MethodsRun(name, str(fp32), file_size(fp32), args.eval_samples, list(args.methods))
    run.ort_excluded_op_types = list(args.ort_exclude_op_types)
    ort_op_types = _ort_op_types(args.ort_exclude_op_types)
    for n in args.samples:
        root = tmp / f"{name}-{n}"
        root.mkdir()
        calib_npz, eval_npz, n_eval = _prepare(name, n, args, root)
        run.eval_samples = n_eval
        log.info("%s: fp32 %.1f MB, %d calibration / %d eval samples", name, run.fp32_size / MB, n, n_eval)
        cell: dict[str, Any] = {"quantize": {}, "fidelity": {}, "errors": {}, "skipped": {}}
        run.by_samples[n] = cell
        outputs: dict[str, str] = {"fp32": str(fp32)}
        for method in args.methods:
            for tool, worker in (("onnxq", "onnxq"), ("ort", "ort-u8s8")):
                key = f"{tool}:{method}"
                if tool == "ort" and method not in ORT_METHODS:
                    cell["skipped"][key] = "n/a"
                    continue
                if tool == "ort" and n > args.ort_max_samples:
                    cell["skipped"][key] = "skipped"
                    log.info("%s/%s/%d: skipped (%d > --ort-max-samples)", name, key, n, n)
                    continue
                folder = root / f"{tool}-{method}"
                data, error, output = run_contender(
                    worker,
                    method,
                    fp32,
                    calib_npz,
                    folder,
                    f"{name}/{key}/{n}",
                    ort_op_types if tool == "ort" else None,
                )
                cell["quantize"][key] = data
                if error:
                    cell["errors"][key] = error
                else:
                    outputs[key] = str(output)
        log.info("%s/%d: fidelity of %s ...", name, n, ", ".join(outputs))
        result = root / "fidelity.json"
        argv = ["--worker", "fidelity", "--models-json", json.dumps(outputs), "--calib", str(eval_npz)]
        code = _spawn([*argv, "--result", str(result)], root, f"{name}/{n}/fidelity")
        if code == 0 and result.is_file():
            fid = json.loads(result.read_text())
            cell["fidelity"] = fid["fidelity"]
            cell["first_output"] = fid.get("first_output")
        else:
            cell["errors"]["fidelity"] = _exit_message(code)
        for key in outputs:  # quantized models are no longer needed
            if key != "fp32":
                shutil.rmtree(root / key.replace(":", "-") / "out", ignore_errors=True)
    return run


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render_table(run: ModelRun) -> str:
    """The Markdown table of one model."""
    header = [
        "model",
        "quantize (s)",
        "time ÷ ORT U8S8",
        "time ÷ ORT default",
        "peak RSS (MB)",
        "Δ RSS (MB)",
        "peak RSS / fp32 file",
        "Δ RSS / fp32 file",
        "size (MB)",
        "size %",
        "latency (ms)",
        "latency ÷ fp32 (min–max of rounds)",
        "cosine",
        "max abs err",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    q = run.quantize
    t_u8 = q.get("ort-u8s8", {}).get("quantize_s")
    t_s8 = q.get("ort-default", {}).get("quantize_s")
    lat = run.latency.get("latency_ms", {})
    fid = run.latency.get("fidelity", {})
    for key in ("fp32", *CONTENDERS):
        d = q.get(key, {})
        failed = key in run.errors
        size = run.fp32_size if key == "fp32" else d.get("size")
        t = d.get("quantize_s")
        peak, delta = d.get("peak_rss"), d.get("peak_delta")
        lk = lat.get(key, {})
        rr = lk.get("ratio_per_round") or []
        lat_ratio = (
            f"{lk['ratio_vs_fp32']:.3f} ({min(rr):.3f}–{max(rr):.3f})"
            if lk and key != "fp32"
            else ("1.000" if lk else "—")
        )
        fk = fid.get(key, {})
        cells = [
            LABELS[key] + (" **FAILED**" if failed else ""),
            _fmt(t, ".1f"),
            _fmt(_ratio(t, t_u8), ".2f", "×"),
            _fmt(_ratio(t, t_s8), ".2f", "×"),
            _fmt(peak / MB if peak else None, ".0f"),
            _fmt(delta / MB if delta is not None else None, ".0f"),
            _fmt(_ratio(peak, run.fp32_size), ".2f", "×"),
            _fmt(_ratio(delta, run.fp32_size), ".2f", "×"),
            _fmt(size / MB if size else None, ".1f"),
            _fmt(100 * size / run.fp32_size if size else None, ".1f", "%"),
            _fmt(lk.get("median"), ".1f"),
            lat_ratio,
            _fmt(fk.get("cosine"), ".6f"),
            _fmt(fk.get("max_abs_err"), ".4g"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_notes(run: ModelRun) -> str:
    """Per-model footnotes: setup times, onnxq's own summary, leftovers, errors."""
    notes = []
    for key in CONTENDERS:
        d = run.quantize.get(key, {})
        if "quantize_s" in d:
            notes.append(
                f"- {LABELS[key]}: imports + data {d['setup_s']:.1f} s, whole worker {d['process_s']:.1f} s, "
                f"RSS before quantize {d['rss_before'] / MB:.0f} MB"
                + (
                    f", files left in its cwd: {', '.join(d['leftover_cwd_files'])}"
                    if d.get("leftover_cwd_files")
                    else ""
                )
            )
    s = run.quantize.get("onnxq", {}).get("onnxq_summary")
    if s:
        fid = ", ".join(f"{f['name']} cosine {f['cosine']:.6f}" for f in s["fidelity"])
        notes.append(
            f"- onnxq summary: {sum(s['quantized_nodes'].values())} nodes quantized "
            f"({', '.join(f'{k} {v}' for k, v in s['quantized_nodes'].items())}), {s['float_nodes']} left "
            f"in float; its own fidelity on {s['fidelity_samples']} calibration samples: {fid}"
        )
    if run.latency:
        notes.append(
            f"- latency: batch 1, median of {run.latency['rounds']} rounds × {run.latency['iters']} runs "
            f"per block; ratio = median over rounds of (median ÷ fp32 median of the same round); "
            f"fidelity on output `{run.latency.get('first_output')}` over {run.eval_samples} held-out samples"
        )
    for key, err in run.errors.items():
        notes.append(f"- **{key} failed**: `{err}`")
    return "\n".join(notes)


def _tool_label(key: str) -> str:
    tool, method = key.split(":", 1)
    return f"{'onnxq' if tool == 'onnxq' else 'ORT U8S8'} {method}"


def _mb(value: float | None) -> float | None:
    return value / MB if value is not None else None


def render_methods_table(run: MethodsRun, n: int) -> str:
    """The Markdown table of one model at ``n`` calibration samples (``--mode methods``)."""
    header = [
        "method",
        "tool",
        "quantize (s)",
        "CPU (s)",
        "time ÷ ORT same method",
        "time ÷ same tool's MinMax",
        "peak RSS (MB)",
        "Δ RSS (MB)",
        "peak RSS / fp32 file",
        "size (MB)",
        "size %",
        "cosine",
        "max abs err",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    cell = run.by_samples[n]
    q, fid, skipped, errors = cell["quantize"], cell["fidelity"], cell["skipped"], cell["errors"]

    def seconds(key: str) -> float | None:
        return None if key in errors else q.get(key, {}).get("quantize_s")

    fk = fid.get("fp32", {})
    lines.append(
        "| fp32 | — | — | — | — | — | — | — | — | "
        f"{run.fp32_size / MB:.1f} | 100.0% | {_fmt(fk.get('cosine'), '.6f')} | "
        f"{_fmt(fk.get('max_abs_err'), '.4g')} |"
    )
    for method in run.methods:
        for tool in ("onnxq", "ort"):
            key = f"{tool}:{method}"
            label = "onnxq" if tool == "onnxq" else "ORT U8S8"
            if key in skipped:
                lines.append(f"| {method} | {label} | {skipped[key]} |" + " — |" * (len(header) - 3))
                continue
            d = q.get(key, {})
            t = seconds(key)
            ort_key = f"ort:{method}"
            vs_ort = skipped[ort_key] if ort_key in skipped else _fmt(_ratio(t, seconds(ort_key)), ".2f", "×")
            peak, delta, size = d.get("peak_rss"), d.get("peak_delta"), d.get("size")
            if key in errors:
                peak = delta = size = None
            f = fid.get(key, {})
            cells = [
                method,
                label + (" **FAILED**" if key in errors else ""),
                _fmt(t, ".1f"),
                _fmt(d.get("cpu_s") if t is not None else None, ".1f"),
                vs_ort,
                _fmt(_ratio(t, seconds(f"{tool}:MinMax")), ".2f", "×"),
                _fmt(_mb(peak), ".0f"),
                _fmt(_mb(delta), ".0f"),
                _fmt(_ratio(peak, run.fp32_size), ".2f", "×"),
                _fmt(_mb(size), ".1f"),
                _fmt(100 * size / run.fp32_size if size else None, ".1f", "%"),
                _fmt(f.get("cosine"), ".6f"),
                _fmt(f.get("max_abs_err"), ".4g"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _peak(run: MethodsRun, n: int, key: str) -> int | None:
    cell = run.by_samples[n]
    return None if key in cell["errors"] else cell["quantize"].get(key, {}).get("peak_rss")


def _seconds(run: MethodsRun, n: int, key: str) -> float | None:
    cell = run.by_samples[n]
    return None if key in cell["errors"] else cell["quantize"].get(key, {}).get("quantize_s")


def render_scaling_table(run: MethodsRun) -> str:
    """Quantize time and peak RSS of every method at every sample count, side by side."""
    counts = sorted(run.by_samples)
    lo, hi = counts[0], counts[-1]
    header = ["method", "tool"]
    header += [f"quantize (s) @{n}" for n in counts]
    header += [f"peak RSS (MB) @{n}" for n in counts]
    header += [f"peak RSS / fp32 file @{n}" for n in counts]
    header += [f"peak RSS @{hi} ÷ @{lo}"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for method in run.methods:
        for tool in ("onnxq", "ort"):
            key = f"{tool}:{method}"

            def show(n: int, value: str, key: str = key) -> str:
                return run.by_samples[n]["skipped"].get(key, value)

            cells = [method, "onnxq" if tool == "onnxq" else "ORT U8S8"]
            cells += [show(n, _fmt(_seconds(run, n, key), ".1f")) for n in counts]
            cells += [show(n, _fmt(_mb(_peak(run, n, key)), ".0f")) for n in counts]
            cells += [show(n, _fmt(_ratio(_peak(run, n, key), run.fp32_size), ".2f", "×")) for n in counts]
            cells.append(_fmt(_ratio(_peak(run, hi, key), _peak(run, lo, key)), ".3f", "×"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return f"{value:.3f}× (target ≤ {limit:g}×) " + ("PASS" if value <= limit else "**MISS**")


def render_targets(run: MethodsRun) -> str:
    """onnxq's numbers against the targets, one line per check."""
    lines = []
    counts = sorted(run.by_samples)
    for n in counts:
        for method in run.methods:
            key = f"onnxq:{method}"
            if key not in run.by_samples[n]["quantize"]:
                continue
            t = _seconds(run, n, key)
            checks = []
            if method in WEIGHT_ONLY_METHODS:
                checks.append("÷ ORT: n/a (weight-only; ORT's int4 RTN: tools/fidelity.py ort-matmul-nbits)")
            elif method in ALGORITHM_METHODS:
                amp = run.by_samples[n]["quantize"][key].get("amp")
                if amp:
                    checks.append(
                        f"cosine ≥ {AMP_MIN_COSINE} {'met' if amp['met'] else 'NOT met'} with "
                        f"{amp['float_nodes']} of {amp['candidates']} nodes float"
                    )
                r = _ratio(t, _seconds(run, n, "onnxq:MinMax"))
                checks.append(f"÷ onnxq MinMax {r:.2f}×" if r else "÷ onnxq MinMax: n/a (MinMax not run)")
            elif method != "MinMax":
                if method in ORT_METHODS:
                    ort_key = f"ort:{method}"
                    if ort_key in run.by_samples[n]["skipped"]:
                        checks.append(f"÷ ORT {method}: {run.by_samples[n]['skipped'][ort_key]}")
                    else:
                        checks.append(
                            f"÷ ORT {method} {_verdict(_ratio(t, _seconds(run, n, ort_key)), TARGET_VS_ORT)}"
                        )
                else:
                    others = {m: _seconds(run, n, f"ort:{m}") for m in ORT_METHODS if m != "MinMax"}
                    others = {m: v for m, v in others.items() if v}
                    if others:
                        fastest = min(others, key=lambda m: others[m])
                        checks.append(
                            f"÷ ORT {fastest} (ORT has no {method}; its fastest histogram method) "
                            + _verdict(_ratio(t, others[fastest]), TARGET_VS_ORT)
                        )
                    else:
                        checks.append(f"÷ ORT: n/a (ORT has no {method})")
                checks.append(
                    "÷ onnxq MinMax "
                    + _verdict(_ratio(t, _seconds(run, n, "onnxq:MinMax")), TARGET_VS_MINMAX)
                )
            checks.append(
                "peak RSS / fp32 file "
                + _verdict(_ratio(_peak(run, n, key), run.fp32_size), TARGET_RSS_PER_FILE)
            )
            lines.append(f"- onnxq {method} @{n} samples: " + "; ".join(checks))
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        for method in run.methods:
            key = f"onnxq:{method}"
            ratio = _ratio(_peak(run, hi, key), _peak(run, lo, key))
            lines.append(
                f"- onnxq {method} peak RSS flat from {lo} to {hi} samples: @{hi} ÷ @{lo} "
                + _verdict(ratio, FLAT_TOLERANCE)
            )
    return "\n".join(lines)


def render_methods_notes(run: MethodsRun, n: int) -> str:
    """Footnotes of one sample count: per-worker setup, CPU, load, onnxq summary, errors."""
    cell = run.by_samples[n]
    notes = []
    for key, d in cell["quantize"].items():
        if "quantize_s" in d:
            notes.append(
                f"- {_tool_label(key)}: imports + data {d['setup_s']:.1f} s, "
                f"whole worker {d['process_s']:.1f} s, "
                f"RSS before quantize {d['rss_before'] / MB:.0f} MB, CPU {d['cpu_s']:.1f} s "
                f"({d['cpu_s'] / d['quantize_s']:.2f} cores busy), load avg before / after "
                f"{'/'.join(map(str, d.get('load_before', [])))} → "
                f"{'/'.join(map(str, d.get('load_after', [])))}"
            )
    s = cell["quantize"].get("onnxq:MinMax", {}).get("onnxq_summary")
    if s:
        notes.append(
            f"- onnxq summary (MinMax): {sum(s['quantized_nodes'].values())} nodes quantized "
            f"({', '.join(f'{k} {v}' for k, v in s['quantized_nodes'].items())}), {s['float_nodes']} left "
            f"in float; onnxq's time includes its own fidelity check on {s['fidelity_samples']} samples"
        )
    if cell.get("first_output"):
        notes.append(
            f"- fidelity on output `{cell['first_output']}` over {run.eval_samples} held-out samples; "
            "ORT = quantize_static U8S8 per-channel QDQ with its default calibrator options"
            + (
                f", every QDQ op type but {', '.join(run.ort_excluded_op_types)} (--ort-exclude-op-types)"
                if run.ort_excluded_op_types
                else ""
            )
        )
    for key, err in cell["errors"].items():
        notes.append(f"- **{key} failed**: `{err}`")
    return "\n".join(notes)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(dict.fromkeys(values))


def _method_list(text: str) -> list[str]:
    by_lower = {m.lower(): m for m in METHODS}
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item.lower() not in by_lower:
            raise argparse.ArgumentTypeError(f"unknown method {item!r}; choose from {', '.join(METHODS)}")
        out.append(by_lower[item.lower()])
    if not out:
        raise argparse.ArgumentTypeError("no method given")
    return list(dict.fromkeys(out))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (driver and workers)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="minmax",
        help="minmax: onnxq default vs ORT MinMax S8S8/U8S8 with latency (default, `make bench`); "
        "methods: every calibration method of onnxq vs ORT's same method, at every --samples count; "
        "dynamic: onnxq Dynamic() vs ORT quantize_dynamic (tools/bench_dynamic.py); weight-only: onnxq "
        "int4/int8 weight-only vs ORT's MatMulNBits quantizer (tools/bench_weight_only.py)",
    )
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated recipe names")
    p.add_argument(
        "--samples",
        type=_int_list,
        default=[32],
        metavar="N[,N...]",
        help="calibration sample counts, e.g. 32,512; each is a separate measurement (default 32)",
    )
    p.add_argument(
        "--methods",
        type=_method_list,
        default=list(CALIBRATION_METHODS),
        metavar="M[,M...]",
        help=f"--mode methods: calibration methods (default {','.join(CALIBRATION_METHODS)}; also "
        f"{','.join(WEIGHT_ONLY_METHODS)}: weight-only int4 block 128; {','.join(ALGORITHM_METHODS)}: the "
        "default with one accuracy algorithm changed)",
    )
    p.add_argument(
        "--ort-max-samples",
        type=int,
        default=DEFAULT_ORT_MAX_SAMPLES,
        metavar="N",
        help="--mode methods: run ORT only at sample counts <= N, print 'skipped' above (its histogram "
        "calibrators keep every activation in memory) (default %(default)s)",
    )
    p.add_argument(
        "--ort-exclude-op-types",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        default=["Where"],
        metavar="OP[,OP...]",
        help="--mode methods: op types ORT does not quantize (nor calibrate), for all its methods; '' "
        "quantizes all of them as ORT does by default. Default Where: BERT's attention mask is a "
        "Where between 0 and float32 min, and ORT's Percentile / Entropy fail on it in np.histogram "
        "('Too many bins for data range')",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration samples")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out samples for fidelity")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out samples")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="--mode minmax: latency rounds")
    p.add_argument("--iters", type=int, default=20, help="--mode minmax: timed runs per model per round")
    p.add_argument("--warmup", type=int, default=5, help="--mode minmax: untimed runs per model first")
    p.add_argument("--json", metavar="OUT.json", help="write every number here")
    p.add_argument("-v", "--verbose", action="store_true")
    # worker-only options
    p.add_argument("--worker", choices=[*CONTENDERS, "latency", "fidelity"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--op-types", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--models-json", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {args.worker or 'bench'}: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if args.worker == "latency":
        return run_latency_worker(args)
    if args.worker == "fidelity":
        return run_fidelity_worker(args)
    if args.worker:
        return run_quantize_worker(args)

    if args.mode in ("dynamic", "weight-only"):  # their own tools, same measurement rules
        import importlib

        tool = importlib.import_module("bench_dynamic" if args.mode == "dynamic" else "bench_weight_only")
        forwarded = ["--models", args.models] if args.models != DEFAULT_MODELS else []
        return tool.main(forwarded + (["--json", args.json] if args.json else []))

    t0 = time.perf_counter()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    info = machine_info()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = load_average()
    methods_mode = args.mode == "methods"
    print(
        "# onnxq vs ONNX Runtime quantize_static"
        + (": calibration methods side by side\n" if methods_mode else "\n")
    )
    print(f"command: `{command}`  ")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores ({info['cpus_usable']} usable), "
        f"{info['mem_total_gb']} GB RAM, Python {info['python']}  "
    )
    print(
        f"versions: onnxruntime {info['onnxruntime']}, onnx {info['onnx']}, onnxq {info['onnxq']}, "
        f"numpy {info['numpy']}; git {info['git'].get('head', '?')} "
        f"({info['git'].get('onnxq_modified_files', '?')} modified files under onnxq/)  "
    )
    print(f"started {started}, load average (1/5/15 min) {'/'.join(map(str, load_start))}  ")
    counts = ", ".join(map(str, args.samples))
    if methods_mode:
        print(
            f"setup: seq len {args.seq_len}, {counts} calibration samples (seed {args.seed}), "
            f"{args.eval_samples} held-out samples (seed {args.eval_seed}); each quantization in a fresh "
            f"process; methods {', '.join(args.methods)}; onnxq = default config with that calibration; "
            "ORT = quantize_static U8S8 (QUInt8 activations, QInt8 weights), QDQ, per-channel, that "
            "calibrate_method"
            + (
                f", not quantizing {', '.join(args.ort_exclude_op_types)}"
                if args.ort_exclude_op_types
                else ""
            )
            + f"; ORT runs only up to {args.ort_max_samples} samples; MB = 10^6 bytes\n",
            flush=True,
        )
    else:
        print(
            f"setup: seq len {args.seq_len}, {counts} calibration samples (seed {args.seed}), "
            f"{args.eval_samples} held-out samples (seed {args.eval_seed}); each quantization in a fresh "
            "process; ORT = quantize_static MinMax, QDQ, per-channel; MB = 10^6 bytes\n",
            flush=True,
        )
    runs: list[ModelRun] = []
    method_runs: list[MethodsRun] = []
    with tempfile.TemporaryDirectory(prefix="bench_quantize.") as tmp:
        for name in names:
            if methods_mode:
                mrun = bench_methods(name, args, Path(tmp))
                method_runs.append(mrun)
                for n in args.samples:
                    print(f"## {name} (fp32 {mrun.fp32_size / MB:.1f} MB), {n} calibration samples\n")
                    print(render_methods_table(mrun, n))
                    print()
                    print(render_methods_notes(mrun, n))
                    print(flush=True)
                if len(args.samples) > 1:
                    print(f"## {name}: time and peak RSS by number of calibration samples\n")
                    print(render_scaling_table(mrun))
                    print()
                print(f"## {name}: targets (onnxq)\n")
                print(render_targets(mrun))
                print(flush=True)
                continue
            for n in args.samples:
                run = bench_model(name, n, args, Path(tmp))
                runs.append(run)
                suffix = f", {n} calibration samples" if len(args.samples) > 1 else ""
                print(f"## {name} (fp32 {run.fp32_size / MB:.1f} MB){suffix}\n")
                print(render_table(run))
                print()
                print(render_notes(run))
                print(flush=True)
    total = time.perf_counter() - t0
    load_end = load_average()
    print(
        f"total runtime: {total:.0f} s; finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
        f"load average (1/5/15 min) {'/'.join(map(str, load_end))}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "args": vars(args),
                    "machine": info,
                    "started": started,
                    "load_average_start": load_start,
                    "load_average_end": load_end,
                    "total_s": total,
                    "models": [asdict(r) for r in runs] + [asdict(r) for r in method_runs],
                },
                indent=2,
            )
        )
        log.info("wrote %s", args.json)
    failed = any(r.errors for r in runs) or any(
        c["errors"] for r in method_runs for c in r.by_samples.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
