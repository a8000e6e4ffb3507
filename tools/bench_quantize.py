"""Benchmark onnxq against ONNX Runtime's ``quantize_static`` on the same models and calibration data.

For each model (random-weight ``bert-base`` and ``minilm-random``, sequence length 128):

1. the calibration samples (``--samples``, seed ``--seed``) are written once to an ``.npz`` that every
   contender reads, and ``--eval-samples`` held-out inputs are drawn with seed ``--eval-seed``;
2. each contender quantizes the fp32 model in its own fresh subprocess (``--worker NAME``), whose
   working directory is a scratch folder (ORT may leave temp files there):

   - ``onnxq``: ``onnxq.quantize(path, calib, output=...)`` with the default config;
   - ``ort-default``: ``quantize_static`` MinMax, QDQ, per-channel, QInt8 activations / QInt8 weights;
   - ``ort-u8s8``: the same with QUInt8 activations / QInt8 weights;

   the worker reports the wall time of the quantize call only, the process's peak RSS
   (``ru_maxrss``) and the RSS measured just before the call;
3. one more subprocess per model (``--worker latency``) loads fp32 and every quantized model as ORT CPU
   sessions (2 intra-op threads, no spinning, default graph optimizations), measures fidelity of the
   first output (cosine, max abs error over all held-out samples concatenated, float64), warms every
   session up and times them in blocks (all runs of one model, then the next) for ``--rounds``
   rounds, the block order reversed every other round to cancel linear drift.

Ratios are always taken between numbers measured in the same run. The tables go to stdout (Markdown),
progress to stderr; ``--json OUT.json`` writes every number. MB = 10^6 bytes.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_quantize.py [--models bert-base,minilm-random]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import resource
import shlex
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


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory and library versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    import onnx
    import onnxruntime

    try:
        import onnxq

        onnxq_version = onnxq.__version__
    except Exception as exc:  # another engineer may be mid-edit: report, don't die here
        onnxq_version = f"import failed: {type(exc).__name__}: {exc}"
    git = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxq"], cwd=REPO, capture_output=True, text=True
        ).stdout.split("\n")
        git = {"head": head, "onnxq_modified_files": sum(1 for line in dirty if line.strip())}
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_gb": round(mem / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnxq": onnxq_version,
        "numpy": np.__version__,
        "git": git,
    }


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


def _quantize_onnxq(model: Path, calib: list[dict[str, np.ndarray]], output: Path) -> dict[str, Any]:
    import onnxq

    t0 = time.perf_counter()
    result = onnxq.quantize(model, calib, output=output, progress=False)
    elapsed = time.perf_counter() - t0
    s = result.summary
    return {
        "quantize_s": elapsed,
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
    model: Path, calib: list[dict[str, np.ndarray]], output: Path, u8s8: bool
) -> dict[str, Any]:
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
        calibrate_method=CalibrationMethod.MinMax,
    )
    return {"quantize_s": time.perf_counter() - t0}


def run_quantize_worker(args: argparse.Namespace) -> int:
    """``--worker onnxq|ort-default|ort-u8s8``: quantize once, write a JSON result."""
    result_path = Path(args.result)
    out: dict[str, Any] = {"contender": args.worker}
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
        if args.worker == "onnxq":
            out.update(_quantize_onnxq(model, calib, output))
        else:
            out.update(_quantize_ort(model, calib, output, u8s8=args.worker == "ort-u8s8"))
        out["peak_rss"] = peak_rss_bytes()
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
        cos = float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        err = ref - got
        sqnr = float(10 * np.log10(np.sum(ref**2) / np.sum(err**2))) if np.any(err) else math.inf
        out["fidelity"][key] = {"cosine": cos, "max_abs_err": float(np.max(np.abs(err))), "sqnr_db": sqnr}
        log.info(
            "  fidelity %-12s cosine %.6f  max abs err %.4g", key, cos, out["fidelity"][key]["max_abs_err"]
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
    """Everything measured for one model."""

    name: str
    fp32_path: str
    fp32_size: int
    calib_samples: int
    eval_samples: int
    quantize: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _spawn(argv: list[str], cwd: Path, what: str) -> int:
    """Run this script as a worker in a fresh interpreter; stderr passes through for progress."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    log.debug("running %s", shlex.join(cmd))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, timeout=WORKER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        log.error("%s timed out after %d s", what, WORKER_TIMEOUT_S)
        return -1
    log.info("%s: exit %d after %.1f s", what, proc.returncode, time.perf_counter() - t0)
    return proc.returncode


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> ModelRun:
    """Quantize ``name`` with every contender, then time and compare all of them."""
    import models

    fp32 = models.build(name)
    root = tmp / name
    root.mkdir()
    calib = models.sample_inputs(name, args.samples, seed=args.seed, seq_len=args.seq_len)
    evals = models.sample_inputs(name, args.eval_samples, seed=args.eval_seed, seq_len=args.seq_len)
    calib_npz, eval_npz = root / "calib.npz", root / "eval.npz"
    save_samples(calib, calib_npz)
    save_samples(evals, eval_npz)
    run = ModelRun(name, str(fp32), file_size(fp32), len(calib), len(evals))
    log.info(
        "%s: fp32 %.1f MB, %d calibration / %d eval samples", name, run.fp32_size / MB, len(calib), len(evals)
    )

    outputs: dict[str, str] = {"fp32": str(fp32)}
    for contender in CONTENDERS:
        work, out_dir = root / contender / "cwd", root / contender / "out"
        work.mkdir(parents=True)
        out_dir.mkdir()
        output, result = out_dir / "model.onnx", root / contender / "result.json"
        log.info("%s: quantizing with %s ...", name, contender)
        code = _spawn(
            [
                "--worker",
                contender,
                "--model",
                str(fp32),
                "--calib",
                str(calib_npz),
                "--output",
                str(output),
                "--result",
                str(result),
            ],
            work,
            f"{name}/{contender}",
        )
        data = json.loads(result.read_text()) if result.is_file() else {}
        if code != 0 or "error" in data:
            run.errors[contender] = data.get("error") or f"worker exited with code {code} and no result"
            if "traceback" in data:
                log.error("%s/%s traceback:\n%s", name, contender, data["traceback"])
        else:
            outputs[contender] = str(output)
            log.info(
                "%s/%s: %.1f s, peak RSS %.0f MB (+%.0f MB), %.1f MB",
                name,
                contender,
                data["quantize_s"],
                data["peak_rss"] / MB,
                data["peak_delta"] / MB,
                data["size"] / MB,
            )
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (driver and workers)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated recipe names")
    p.add_argument("--samples", type=int, default=32, help="calibration samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration samples")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out samples for fidelity")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out samples")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="latency rounds")
    p.add_argument("--iters", type=int, default=20, help="timed runs per model per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per model first")
    p.add_argument("--json", metavar="OUT.json", help="write every number here")
    p.add_argument("-v", "--verbose", action="store_true")
    # worker-only options
    p.add_argument("--worker", choices=[*CONTENDERS, "latency"], help=argparse.SUPPRESS)
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
    if args.worker:
        return run_quantize_worker(args)

    t0 = time.perf_counter()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    info = machine_info()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print("# onnxq vs ONNX Runtime quantize_static\n")
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
    print(
        f"setup: seq len {args.seq_len}, {args.samples} calibration samples (seed {args.seed}), "
        f"{args.eval_samples} held-out samples (seed {args.eval_seed}); each quantization in a fresh "
        "process; ORT = quantize_static MinMax, QDQ, per-channel; MB = 10^6 bytes\n",
        flush=True,
    )
    runs: list[ModelRun] = []
    with tempfile.TemporaryDirectory(prefix="bench_quantize.") as tmp:
        for name in names:
            run = bench_model(name, args, Path(tmp))
            runs.append(run)
            print(f"## {name} (fp32 {run.fp32_size / MB:.1f} MB)\n")
            print(render_table(run))
            print()
            print(render_notes(run))
            print(flush=True)
    total = time.perf_counter() - t0
    print(f"total runtime: {total:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "args": vars(args),
                    "machine": info,
                    "total_s": total,
                    "models": [asdict(r) for r in runs],
                },
                indent=2,
            )
        )
        log.info("wrote %s", args.json)
    return 1 if any(r.errors for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
