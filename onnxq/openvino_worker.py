"""Runs a model on ONNX Runtime's OpenVINO EP for onnxq, inside the interpreter that has it.

``onnxruntime-openvino`` ships its own ``onnxruntime`` module, which cannot share an interpreter with
the standard package, so onnxq starts this file with a second interpreter:
``python openvino_worker.py REQUEST.json``. It imports only numpy, onnxruntime and the standard
library (onnxq itself is not installed there). The request names the model, an ``.npz`` of inputs
(``sample<i>/<input name>``), where to write the outputs (``sample<i>/<output name>``) and a result
``.json`` (latency, the ORT profile of the first run, or the error), and whether to time the runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

EP = "OpenVINOExecutionProvider"


def _samples(path: str) -> list[dict[str, np.ndarray]]:
    samples: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            samples.setdefault(int(index[len("sample") :]), {})[name] = data[key]
    return [samples[i] for i in sorted(samples)]


def _timed(session: ort.InferenceSession, samples: list[dict[str, np.ndarray]]) -> float:
    session.run(None, samples[0])
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 8 or time.perf_counter() - start < 1.0:
        t = time.perf_counter()
        session.run(None, samples[len(times) % len(samples)])
        times.append(time.perf_counter() - t)
        if len(times) >= 80:
            break
    return 1000.0 * statistics.median(times)


def main(request_path: str) -> int:
    with open(request_path) as f:
        request = json.load(f)
    result: dict[str, object] = {"onnxruntime": ort.__version__}
    try:
        if EP not in ort.get_available_providers():
            raise RuntimeError(f"this onnxruntime ({ort.__version__}) has no {EP}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = request["profile_prefix"]
        session = ort.InferenceSession(
            request["model"], so, providers=[EP], provider_options=[{"device_type": request["device"]}]
        )
        samples = _samples(request["inputs"])
        names = [o.name for o in session.get_outputs()]
        arrays: dict[str, np.ndarray] = {}
        for i, sample in enumerate(samples):
            for name, value in zip(names, session.run(names, sample), strict=True):
                arrays[f"sample{i}/{name}"] = value
            if i == 0:
                result["profile"] = session.end_profiling()
        np.savez(request["outputs"], **arrays)
        if request.get("timed"):
            result["latency_ms"] = _timed(session, samples)
    except Exception as exc:  # reported to onnxq as the row's reason
        result["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    with open(request["result"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
