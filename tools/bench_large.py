"""Quantize a synthetic Llama-shaped decoder with ≥ 14 GB of fp32 weights in external data.

The model (hidden 4096, MLP 11008, 32 heads, vocabulary 32000, `--layers` decoder blocks; 16 blocks
give 14.0 GB) is written tensor by tensor into `model.onnx` + `model.onnx.data` in `--workdir`,
never held in memory. Each quantization then runs in its own process, and its wall time and peak
RSS (that process's `ru_maxrss`) are reported with the largest single weight for scale:

- weight-only int4 (RTN, blocks of 128), which needs no calibration data;
- static int8 (onnxq's default) calibrated on `--samples` inputs of `--seq` tokens.

    .venv/bin/python tools/bench_large.py [--layers 16] [--workdir .cache/large] [--keep]
        [--modes int4,int8] [--samples 2] [--seq 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, MLP, HEADS, VOCAB = 4096, 11008, 32, 32000


class _Writer:
    """Appends weights to the external data file and returns initializers pointing at them."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.location = path.name
        self.rng = np.random.default_rng(0)
        self.largest = 0
        self.total = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.02) -> onnx.TensorProto:
        offset = self.file.tell()
        rows = shape[0]
        step = max(1, (64 * 2**20) // (4 * int(np.prod(shape[1:]))))  # 64 MB at a time
        for start in range(0, rows, step):
            n = min(step, rows - start)
            block = self.rng.standard_normal((n, *shape[1:]), dtype=np.float32)
            block *= scale
            self.file.write(block.tobytes())
        size = self.file.tell() - offset
        pad = (-self.file.tell()) % 4096
        self.file.write(b"\0" * pad)
        self.largest = max(self.largest, size)
        self.total += size
        init = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(size))):
            init.external_data.add(key=key, value=value)
        return init

    def small(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(array, name)

    def close(self) -> None:
        self.file.close()


def build(folder: Path, layers: int) -> dict[str, int]:
    """Write the decoder into ``folder``; returns its weight sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    w = _Writer(folder / "model.onnx.data")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        w.small("eps", np.array(1e-5, np.float32)),
        w.small("last_axis", np.array([-1], np.int64)),
        w.small("two", np.array(2.0, np.float32)),
        w.small("heads_shape", np.array([1, -1, HEADS, HIDDEN // HEADS], np.int64)),
        w.small("merge_shape", np.array([1, -1, HIDDEN], np.int64)),
        w.small("scale", np.array(1.0 / np.sqrt(HIDDEN // HEADS), np.float32)),
    ]

    def rmsnorm(x: str, prefix: str) -> str:
        inits.append(w.small(f"{prefix}.gamma", np.ones(HIDDEN, np.float32)))
        nodes.extend(
            [
                helper.make_node("Pow", [x, "two"], [f"{prefix}/sq"]),
                helper.make_node("ReduceMean", [f"{prefix}/sq", "last_axis"], [f"{prefix}/ms"], keepdims=1),
                helper.make_node("Add", [f"{prefix}/ms", "eps"], [f"{prefix}/mse"]),
                helper.make_node("Sqrt", [f"{prefix}/mse"], [f"{prefix}/rms"]),
                helper.make_node("Div", [x, f"{prefix}/rms"], [f"{prefix}/n"]),
                helper.make_node("Mul", [f"{prefix}/n", f"{prefix}.gamma"], [f"{prefix}/out"]),
            ]
        )
        return f"{prefix}/out"

    inits.append(w.weight("embed", (VOCAB, HIDDEN)))
    nodes.append(helper.make_node("Gather", ["embed", "input_ids"], ["h0"]))
    h = "h0"
    for i in range(layers):
        p = f"layers.{i}"
        x = rmsnorm(h, f"{p}.input_norm")
        for proj in ("q", "k", "v", "o"):
            inits.append(w.weight(f"{p}.{proj}", (HIDDEN, HIDDEN)))
        for proj in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [x, f"{p}.{proj}"], [f"{p}/{proj}"]))
            nodes.append(helper.make_node("Reshape", [f"{p}/{proj}", "heads_shape"], [f"{p}/{proj}h"]))
            perm = [0, 2, 3, 1] if proj == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [f"{p}/{proj}h"], [f"{p}/{proj}t"], perm=perm))
        nodes.extend(
            [
                helper.make_node("MatMul", [f"{p}/qt", f"{p}/kt"], [f"{p}/scores"]),
                helper.make_node("Mul", [f"{p}/scores", "scale"], [f"{p}/scaled"]),
                helper.make_node("Softmax", [f"{p}/scaled"], [f"{p}/probs"], axis=-1),
                helper.make_node("MatMul", [f"{p}/probs", f"{p}/vt"], [f"{p}/ctx"]),
                helper.make_node("Transpose", [f"{p}/ctx"], [f"{p}/ctxt"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [f"{p}/ctxt", "merge_shape"], [f"{p}/merged"]),
                helper.make_node("MatMul", [f"{p}/merged", f"{p}.o"], [f"{p}/attn"]),
                helper.make_node("Add", [h, f"{p}/attn"], [f"{p}/h1"]),
            ]
        )
        y = rmsnorm(f"{p}/h1", f"{p}.post_norm")
        inits.append(w.weight(f"{p}.gate", (HIDDEN, MLP)))
        inits.append(w.weight(f"{p}.up", (HIDDEN, MLP)))
        inits.append(w.weight(f"{p}.down", (MLP, HIDDEN)))
        nodes.extend(
            [
                helper.make_node("MatMul", [y, f"{p}.gate"], [f"{p}/gate"]),
                helper.make_node("Sigmoid", [f"{p}/gate"], [f"{p}/sig"]),
                helper.make_node("Mul", [f"{p}/gate", f"{p}/sig"], [f"{p}/silu"]),
                helper.make_node("MatMul", [y, f"{p}.up"], [f"{p}/up"]),
                helper.make_node("Mul", [f"{p}/silu", f"{p}/up"], [f"{p}/act"]),
                helper.make_node("MatMul", [f"{p}/act", f"{p}.down"], [f"{p}/mlp"]),
                helper.make_node("Add", [f"{p}/h1", f"{p}/mlp"], [f"{p}/h2"]),
            ]
        )
        h = f"{p}/h2"
    x = rmsnorm(h, "final_norm")
    inits.append(w.weight("lm_head", (HIDDEN, VOCAB)))
    nodes.append(helper.make_node("MatMul", [x, "lm_head"], ["logits"]))
    w.close()
    graph = helper.make_graph(
        nodes,
        "synthetic-llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(folder / "model.onnx"))
    return {"total": w.total, "largest": w.largest}


def run(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS bytes and exit code of ``cmd`` in a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "large")
    parser.add_argument("--modes", default="int4,int8")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the model and outputs")
    args = parser.parse_args()
    folder = args.workdir
    info_path = folder / "build.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("layers") == args.layers:
        info = json.loads(info_path.read_text())
    else:
        start = time.perf_counter()
        info = {**build(folder, args.layers), "layers": args.layers}
        info_path.write_text(json.dumps(info))
        seconds = time.perf_counter() - start
        print(f"built {folder / 'model.onnx'}: {info['total'] / 1e9:.1f} GB in {seconds:.0f} s")
    ids = np.random.default_rng(0).integers(0, VOCAB, (args.samples, args.seq), dtype=np.int64)
    np.savez(folder / "calib.npz", input_ids=ids)
    baseline = run([sys.executable, "-c", "import onnxq"])[1]
    rows = []
    for mode in args.modes.split(","):
        out = folder / f"model.{mode}.onnx"
        cli = [
            sys.executable,
            "-m",
            "onnxq",
            "quantize",
            str(folder / "model.onnx"),
            "-o",
            str(out),
            "--quiet",
        ]
        if mode == "int4":
            cmd = [*cli, "--weight-only", "int4", "--block-size", "128"]
        else:
            cmd = [*cli, "--calib", str(folder / "calib.npz")]
        wall, peak, code = run(cmd)
        size = sum(p.stat().st_size for p in folder.glob(f"model.{mode}.onnx*"))
        rows.append((mode, wall, peak, code, size))
        if not args.keep:
            for p in folder.glob(f"model.{mode}.onnx*"):
                p.unlink()
    print(
        f"\nsynthetic Llama, {args.layers} layers: {info['total'] / 1e9:.1f} GB fp32 weights, largest weight "
        f"{info['largest'] / 1e6:.0f} MB; `import onnxq` alone peaks at {baseline / 1e6:.0f} MB\n"
    )
    print(
        "| mode | exit | wall (s) | peak RSS (GB) | peak RSS − import (GB) | ÷ largest weight | output (GB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, wall, peak, code, size in rows:
        print(
            f"| {mode} | {code} | {wall:.0f} | {peak / 1e9:.2f} | {(peak - baseline) / 1e9:.2f} | "
            f"{(peak - baseline) / info['largest']:.1f}× | {size / 1e9:.2f} |"
        )
    if not args.keep:
        shutil.rmtree(folder)
    return 0 if all(code == 0 for *_, code, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
