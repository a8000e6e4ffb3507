"""Benchmark onnxq weight-only quantization against ONNX Runtime's MatMulNBits quantizer.

For each model (default random-weight ``bert-base``):

1. every contender quantizes the fp32 model in its own fresh subprocess (``--worker NAME``, run in a
   temporary working directory): wall time of the quantize call, the process's peak RSS (VmHWM),
   its RSS after imports (the runtime's own footprint), file size;
2. one more subprocess loads fp32 and every quantized model on ORT's CPU EP (2 threads,
   ``session.intra_op.allow_spinning=0``) and times them in blocks (all runs of one model, then the
   next) for ``--rounds`` rounds: latency ratio = median over rounds of (model median ÷ fp32 median
   of the same round); cosine of the first output vs fp32 on ``--eval-samples`` held-out inputs.

Contenders: onnxq int4 block 32 / block 128 and int8 block 128 (``QuantConfig.weight_only``, the
blocked-DequantizeLinear form ORT fuses into MatMulNBits), ORT ``MatMulNBitsQuantizer`` (4 bits,
block 128, symmetric, RTN: its defaults). ``--no-latency`` only quantizes (e.g. SmolLM2 for memory).
Not in the default set: ``onnxq-int4-b128-awq`` / ``onnxq-int4-b128-awq-integer`` /
``onnxq-int4-b128-awq-rows4pct`` — AWQ with its 8 float rows / without (``float_rows=0``) / with
4 % of each weight's input features float (``float_rows=0.04``), tables left float, calibrated on
``--calib-samples`` seeded inputs of ``--calib-seq-len`` tokens (default ``--seq-len``; seed 0,
apart from the evaluation seed): what the float rows' extra Gather/MatMul/Add cost in latency
(GPTQ's graph is the same).

    .venv/bin/python tools/bench_weight_only.py [--models bert-base] [--rounds 3] [--json out.json]
    .venv/bin/python tools/bench_weight_only.py --models smollm2-135m --no-latency \
        --contenders onnxq-int4-b128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTENDERS = {
    "onnxq-int4-b32": "onnxq int4 block 32",
    "onnxq-int4-b128": "onnxq int4 block 128",
    "onnxq-int8-b128": "onnxq int8 block 128",
    "ort-nbits-b128": "ORT MatMulNBits (4 bit, block 128, RTN)",
}
EXTRA = {
    "onnxq-int4-b128-awq": "onnxq int4 block 128, AWQ (8 float rows)",
    "onnxq-int4-b128-awq-integer": "onnxq int4 block 128, AWQ, integer weights only",
    "onnxq-int4-b128-awq-rows4pct": "onnxq int4 block 128, AWQ, 4 % of each K float",
}
LABELS = {**CONTENDERS, **EXTRA}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def file_size(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def run_worker(args: argparse.Namespace) -> int:
    name, model, output = args.worker, Path(args.model), Path(args.output)
    t_imp = time.perf_counter()
    if name.startswith("onnxq"):
        import onnxq
        from onnxq.config import QuantConfig
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    imports_s = time.perf_counter() - t_imp
    rss_before = _status_kb("VmRSS:") * 1024
    t0 = time.perf_counter()
    notes: dict = {}
    if name.startswith("onnxq"):
        parts = name.split("-")
        dtype, block = parts[1], int(parts[2][1:])
        config, calib = QuantConfig.weight_only(dtype, block), None
        if "awq" in parts:
            data = np.load(args.calib)
            calib = [{k: v[i] for k, v in data.items()} for i in range(len(next(iter(data.values()))))]
            algorithm = onnxq.AWQ(float_rows=0 if "integer" in parts else 0.04 if "rows4pct" in parts else 8)
            config = QuantConfig.weight_only(dtype, block, algorithm=algorithm, exclude_op_types=("Gather",))
        result = onnxq.quantize(model, calib, config=config, output=output, progress=False)
        notes = {
            "quantized": result.summary.quantized_nodes,
            "float": len(result.summary.float_nodes),
            "notes": list(result.summary.notes),
        }
    else:
        proto = onnx.load(str(model))
        quant = MatMulNBitsQuantizer(proto, block_size=128, is_symmetric=True)
        quant.process()
        quant.model.save_model_to_file(str(output), use_external_data_format=False)
    seconds = time.perf_counter() - t0
    out = {
        "seconds": seconds,
        "imports_s": imports_s,
        "rss_before": rss_before,
        "peak_rss": _status_kb("VmHWM:") * 1024,
        "size": file_size(output),
        **notes,
    }
    Path(args.result).write_text(json.dumps(out))
    return 0


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_latency(args: argparse.Namespace) -> int:
    spec = json.loads(args.models_json)
    data = np.load(args.inputs)
    n = len(next(iter(data.values())))
    feeds = [{k: v[i] for k, v in data.items()} for i in range(n)]
    sessions = {k: _session(Path(p)) for k, p in spec.items()}
    out: dict = {k: {} for k in spec}
    ref = [sessions["fp32"].run(None, f)[0] for f in feeds]
    for key, sess in sessions.items():
        got = [sess.run(None, f)[0] for f in feeds]
        a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
        out[key]["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        out[key]["max_abs"] = float(np.abs(a - b).max())
    one = feeds[0]
    ratios: dict[str, list[float]] = {k: [] for k in spec}
    medians: dict[str, list[float]] = {k: [] for k in spec}
    for _ in range(args.rounds):
        this = {}
        for key, sess in sessions.items():
            for _ in range(3):
                sess.run(None, one)
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                sess.run(None, one)
                times.append(time.perf_counter() - t)
            this[key] = statistics.median(times)
        for key in spec:
            medians[key].append(this[key])
            ratios[key].append(this[key] / this["fp32"])
    for key in spec:
        out[key]["latency_ms"] = 1000 * statistics.median(medians[key])
        out[key]["ratio"] = statistics.median(ratios[key])
        out[key]["ratio_range"] = [min(ratios[key]), max(ratios[key])]
    Path(args.result).write_text(json.dumps(out))
    return 0


def bench(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    import models

    fp32 = models.build(name)
    run: dict = {"model": name, "fp32_size": file_size(fp32), "rows": {}}
    outputs = {"fp32": str(fp32)}
    calib = tmp / "calib.npz"
    if any("awq" in key for key in args.contenders):
        calib_len = args.calib_seq_len or args.seq_len
        samples = models.sample_inputs(name, args.calib_samples, seed=0, seq_len=calib_len)
        np.savez(calib, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    for key in args.contenders:
        folder = tmp / key
        folder.mkdir()
        result = folder / "result.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            key,
            "--model",
            str(fp32),
            "--output",
            str(folder / "model.onnx"),
            "--result",
            str(result),
            "--calib",
            str(calib),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
        if proc.returncode != 0:
            run["rows"][key] = {"error": proc.stderr.strip().splitlines()[-1:]}
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        run["rows"][key] = {**json.loads(result.read_text()), "worker_s": time.perf_counter() - t0}
        outputs[key] = str(folder / "model.onnx")
        print(
            f"{name}/{key}: {run['rows'][key]['seconds']:.1f} s, peak RSS "
            f"{run['rows'][key]['peak_rss'] / 1e6:.0f} MB",
            file=sys.stderr,
        )
    if args.latency:
        inputs = tmp / "inputs.npz"
        samples = models.sample_inputs(name, args.eval_samples, seed=args.eval_seed, seq_len=args.seq_len)
        np.savez(inputs, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
        result = tmp / "latency.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "latency",
            "--models-json",
            json.dumps(outputs),
            "--inputs",
            str(inputs),
            "--result",
            str(result),
            "--rounds",
            str(args.rounds),
            "--runs",
            str(args.runs),
        ]
        subprocess.run(argv, cwd=tmp, check=True)
        lat = json.loads(result.read_text())
        run["fp32"] = lat.pop("fp32")
        for key, values in lat.items():
            run["rows"][key].update(values)
    return run


def render(run: dict, rounds: int, runs: int) -> str:
    fp = run["fp32_size"]
    lines = [
        f"#### {run['model']} (fp32 {fp / 1e6:.1f} MB)",
        "",
        "| model | quantize (s) | peak RSS (MB) | RSS after imports (MB) | size (MB) | size % of fp32 "
        "| latency (ms) | latency ÷ fp32 (min–max) | cosine | max abs err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if "fp32" in run:
        f = run["fp32"]
        lines.append(
            f"| fp32 | — | — | — | {fp / 1e6:.1f} | 100.0% | {f['latency_ms']:.1f} | 1.000 | 1.000000 | 0 |"
        )
    for key, r in run["rows"].items():
        if "error" in r:
            lines.append(f"| {LABELS[key]} | failed: {r['error']} |")
            continue
        lat = (
            (
                f"{r['latency_ms']:.1f} | {r['ratio']:.3f} "
                f"({r['ratio_range'][0]:.3f}–{r['ratio_range'][1]:.3f}) | "
                f"{r['cosine']:.6f} | {r['max_abs']:.4f}"
            )
            if "ratio" in r
            else "— | — | — | —"
        )
        lines.append(
            f"| {LABELS[key]} | {r['seconds']:.1f} | {r['peak_rss'] / 1e6:.0f} | "
            f"{r['rss_before'] / 1e6:.0f} | {r['size'] / 1e6:.1f} | {100 * r['size'] / fp:.1f}% | {lat} |"
        )
    lines.append("")
    lines.append(
        f"latency: batch 1, median of {rounds} rounds × {runs} runs per block, 2 threads, no spinning"
    )
    for key, r in run["rows"].items():
        if r.get("notes"):
            lines.append(f"- {key}: {'; '.join(r['notes'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker")
    p.add_argument("--model")
    p.add_argument("--output")
    p.add_argument("--result")
    p.add_argument("--models-json")
    p.add_argument("--inputs")
    p.add_argument("--models", default="bert-base")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--no-latency", dest="latency", action="store_false")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration sample (default --seq-len)")
    p.add_argument("--calib")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.worker == "latency":
        return run_latency(args)
    if args.worker:
        return run_worker(args)
    args.contenders = args.contenders.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_wo.") as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            runs.append(bench(name, args, folder))
            print(render(runs[-1], args.rounds, args.runs))
            print()
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
