"""Benchmark onnxq's dynamic quantization against ONNX Runtime's ``quantize_dynamic``.

For each model (default random-weight ``bert-base`` and ``minilm-random``, sequence length 128):

1. each contender quantizes the fp32 model in its own fresh subprocess (``--worker NAME``) whose
   working directory is a scratch folder (ORT's quantizer may drop temp files there), reporting the
   wall time of the quantize call only, the process's peak RSS and the output size:

   - ``onnxq``: ``onnxq.quantize(path, config=QuantConfig(calibration=Dynamic()))`` (int8 symmetric
     per-channel weights, the default);
   - ``onnxq-per-tensor``: the same with per-tensor weights;
   - ``ort``: ``quantize_dynamic(path, out)`` with its defaults (QInt8 per-tensor weights);
   - ``ort-per-channel``: ``quantize_dynamic(..., per_channel=True)``;

2. one more subprocess per model loads fp32 and every quantized model as ORT CPU sessions (2
   intra-op threads, ``session.intra_op.allow_spinning=0``, default graph optimizations), measures
   cosine and max abs error of the first output against fp32 on ``--eval-samples`` held-out inputs
   (seed ``--eval-seed``, all positions concatenated, float64), warms every session up and times
   them in blocks (all ``--iters`` runs of one model, then the next: A A A ... B B B ...) for
   ``--rounds`` rounds, reversing the block order every other round; the latency ratio is taken
   within each round against that round's fp32 block, and the median over rounds is reported.

A Markdown table per model goes to stdout, progress to stderr; ``--json OUT`` writes every number.
MB = 10^6 bytes.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_dynamic.py [--models bert-base,minilm-random]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MB = 1e6
CONTENDERS = ("onnxq", "onnxq-per-tensor", "ort", "ort-per-channel")
TARGET_RATIO = 0.45  # dynamic BERT-base latency / fp32 on ORT's CPU EP
WORKER_TIMEOUT_S = 1800

log = logging.getLogger("bench_dynamic")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def file_size(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.data"))


def session_options() -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


# --- workers (each in a fresh process) -------------------------------------------------------------
def run_quantize_worker(args: argparse.Namespace) -> int:
    model, output = Path(args.model), Path(args.output)
    out: dict[str, Any] = {"contender": args.worker}
    try:
        if args.worker.startswith("onnxq"):
            import onnxq
            from onnxq.config import Dynamic, PerTensor, QuantConfig, QuantSpec

            config = QuantConfig(calibration=Dynamic())
            if args.worker == "onnxq-per-tensor":
                config = config.with_changes(weights=QuantSpec("int8", True, PerTensor()))
            t0 = time.perf_counter()
            onnxq.quantize(model, config=config, output=output, progress=False)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            t0 = time.perf_counter()
            quantize_dynamic(
                model, output, weight_type=QuantType.QInt8, per_channel=args.worker == "ort-per-channel"
            )
        out["quantize_s"] = time.perf_counter() - t0
        out["peak_rss"] = peak_rss_bytes()
        out["size"] = file_size(output)
    except Exception as exc:  # reported in the table
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    Path(args.result).write_text(json.dumps(out))
    return 0


def _first_output(session: Any, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    name = session.get_outputs()[0].name
    return np.concatenate([session.run([name], s)[0].astype(np.float64).ravel() for s in samples])


def run_latency_worker(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    import models

    spec: dict[str, str] = json.loads(args.models_json)
    evals = models.sample_inputs(args.model, args.eval_samples, seed=args.eval_seed, seq_len=args.seq_len)
    sessions = {
        k: ort.InferenceSession(p, session_options(), providers=["CPUExecutionProvider"])
        for k, p in spec.items()
    }
    out: dict[str, Any] = {"fidelity": {}, "latency": {}}
    ref = _first_output(sessions["fp32"], evals)
    for key, sess in sessions.items():
        got = ref if key == "fp32" else _first_output(sess, evals)
        cos = float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got)))
        out["fidelity"][key] = {"cosine": cos, "max_abs_err": float(np.max(np.abs(ref - got)))}
        log.info("  %-18s cosine %.6f  max abs err %.4g", key, cos, out["fidelity"][key]["max_abs_err"])
    feed = evals[0]
    for sess in sessions.values():
        for _ in range(args.warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(args.rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            block = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                sessions[key].run(None, feed)
                block.append((time.perf_counter() - t0) * 1e3)
            times[key].append(statistics.median(block))
        log.info("  round %d: %s", r + 1, ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items()))
    for key, per_round in times.items():
        ratios = [q / f for q, f in zip(per_round, times["fp32"], strict=True)]
        out["latency"][key] = {
            "median_ms": statistics.median(per_round),
            "per_round_ms": per_round,
            "ratio_vs_fp32": statistics.median(ratios),
        }
    Path(args.result).write_text(json.dumps(out, indent=2))
    return 0


# --- driver --------------------------------------------------------------------------------------
def _spawn(argv: list[str], cwd: Path) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=sys.stderr, timeout=WORKER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return -1
    return proc.returncode


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import models

    fp32 = models.build(name)
    run: dict[str, Any] = {"model": name, "fp32_size": file_size(fp32), "quantize": {}, "errors": {}}
    outputs = {"fp32": str(fp32)}
    for contender in args.contenders:
        folder = tmp / name / contender
        (folder / "cwd").mkdir(parents=True)
        output, result = folder / "model.onnx", folder / "result.json"
        log.info("%s / %s: quantizing ...", name, contender)
        argv = ["--worker", contender, "--model", str(fp32), "--output", str(output), "--result", str(result)]
        code = _spawn(argv, folder / "cwd")
        data = json.loads(result.read_text()) if result.is_file() else {}
        if code != 0 or "error" in data or not data:
            run["errors"][contender] = data.get("error", f"worker exit {code}")
            log.error("%s / %s failed: %s", name, contender, data.get("traceback", run["errors"][contender]))
            continue
        log.info(
            "  %.1f s, peak RSS %.0f MB, %.1f MB",
            data["quantize_s"],
            data["peak_rss"] / MB,
            data["size"] / MB,
        )
        run["quantize"][contender] = data
        outputs[contender] = str(output)
        shutil.rmtree(folder / "cwd", ignore_errors=True)
    result = tmp / name / "latency.json"
    log.info("%s: fidelity and latency ...", name)
    argv = [
        "--worker",
        "latency",
        "--model",
        name,
        "--models-json",
        json.dumps(outputs),
        "--result",
        str(result),
    ]
    argv += ["--rounds", str(args.rounds), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    argv += ["--eval-samples", str(args.eval_samples), "--eval-seed", str(args.eval_seed)]
    argv += ["--seq-len", str(args.seq_len)]
    code = _spawn(argv, tmp)
    if result.is_file():
        run.update(json.loads(result.read_text()))
    else:
        run["errors"]["latency"] = f"worker exit {code}"
    return run


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render(run: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"### {run['model']} (fp32 {run['fp32_size'] / MB:.1f} MB, seq {args.seq_len}, "
        f"{args.eval_samples} held-out inputs, {args.rounds} rounds x {args.iters} runs)",
        "",
        "| contender | quantize s | peak RSS MB | size MB | latency ms | × fp32 | cosine | max abs err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ["fp32", *args.contenders]:
        q = run["quantize"].get(key, {})
        lat = run.get("latency", {}).get(key, {})
        fid = run.get("fidelity", {}).get(key, {})
        if key in run["errors"]:
            lines.append(f"| {key} | failed: {run['errors'][key]} | | | | | | |")
            continue
        size = run["fp32_size"] if key == "fp32" else q.get("size")
        lines.append(
            f"| {key} | {_f(q.get('quantize_s'), '.1f')} | "
            f"{_f(q['peak_rss'] / MB if q else None, '.0f')} | {_f(size / MB if size else None, '.1f')} | "
            f"{_f(lat.get('median_ms'), '.1f')} | {_f(lat.get('ratio_vs_fp32'), '.3f')} | "
            f"{_f(fid.get('cosine'), '.6f')} | {_f(fid.get('max_abs_err'), '.4g')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert-base,minilm-random")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--models-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("onnxq").setLevel(logging.WARNING)
    if args.worker == "latency":
        return run_latency_worker(args)
    if args.worker:
        return run_quantize_worker(args)
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    log.info("load average at start: %s", os.getloadavg())
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-dynamic-") as tmp:
        for name in args.models.split(","):
            runs.append(bench_model(name, args, Path(tmp)))
            print(render(runs[-1], args) + "\n", flush=True)
    log.info("load average at end: %s", os.getloadavg())
    for run in runs:
        ratio = run.get("latency", {}).get("onnxq", {}).get("ratio_vs_fp32")
        if run["model"] == "bert-base" and ratio is not None:
            ort_cos = run.get("fidelity", {}).get("ort", {}).get("cosine", math.nan)
            cos = run.get("fidelity", {}).get("onnxq", {}).get("cosine", math.nan)
            print(
                f"targets (bert-base): latency {ratio:.3f}x fp32 (<= {TARGET_RATIO}: "
                f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); cosine {cos:.6f} vs ORT {ort_cos:.6f} "
                f"({'met' if cos >= ort_cos else 'NOT met'})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
