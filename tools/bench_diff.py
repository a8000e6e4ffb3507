"""Peak memory and wall time of `onnxq diff` on a large model, measured from outside the process.

Builds the model (random-weight BERT-base by default), writes calibration and 16 held-out inputs to
.npz files, quantizes with `onnxq quantize` in one child process and runs `onnxq diff FP32 QUANT
--data inputs.npz` in another, and reports the diff's wall time, its peak RSS (that child's own
`ru_maxrss`, from `os.wait4`; this parent stays small so nothing inherited inflates it) and that peak
over the fp32 model file's size, with the layer the diff ranks first.

    .venv/bin/python tools/bench_diff.py [--model bert-base] [--samples 16] [--calib 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--calib", type=int, default=8, help="calibration samples for the quantized model")
    args = parser.parse_args()

    fp32 = models.build(args.model)
    feeds = models.sample_inputs(args.model, args.calib + args.samples, seed=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-diff-") as tmp:
        calib, npz = Path(tmp) / "calib.npz", Path(tmp) / "inputs.npz"
        for path, part in ((calib, feeds[: args.calib]), (npz, feeds[args.calib :])):
            np.savez(path, **{k: np.concatenate([f[k] for f in part]) for k in part[0]})
        quant, report = Path(tmp) / "model.quant.onnx", Path(tmp) / "diff.json"
        cli = [sys.executable, "-m", "onnxq"]
        subprocess.run(
            [*cli, "quantize", str(fp32), "--calib", str(calib), "-o", str(quant), "--quiet"],
            check=True,
            capture_output=True,
            env=env,
        )
        cmd = [*cli, "diff", str(fp32), str(quant), "--data", str(npz), "--num-samples", str(args.samples)]
        start = time.perf_counter()
        child = subprocess.Popen([*cmd, "--json", str(report), "--quiet"], env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            return child.returncode
        peak = usage.ru_maxrss * 1024
        doc = json.loads(report.read_text())
    size = fp32.stat().st_size + sum(p.stat().st_size for p in fp32.parent.glob("*.onnx.data"))
    first = doc["ranking"][0] if doc["ranking"] else "—"
    print("| model | inputs | matched | wall (s) | peak RSS (MB) | fp32 (MB) | RSS / fp32 | top layer |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {args.model} | {doc['samples']} | {doc['matched']} | {wall:.1f} | {peak / 1e6:.0f} "
        f"| {size / 1e6:.0f} | {peak / size:.2f}× | `{first}` |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
