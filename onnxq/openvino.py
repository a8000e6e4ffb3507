"""The ``openvino`` provider: ONNX Runtime's OpenVINO EP, run in a worker process.

``onnxruntime-openvino`` replaces the ``onnxruntime`` module, so it lives in its own virtual
environment and onnxq talks to it through :mod:`onnxq.openvino_worker`, exchanging inputs and
outputs as ``.npz`` files in a private temporary folder that is always removed. The interpreter is,
in order: the ``python=`` argument, the ``ONNXQ_OPENVINO_PYTHON`` environment variable, or the
``.venv-openvino`` that ``make providers`` creates beside the onnxq checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxq.data import Sample
from onnxq.providers import Provider, ProviderError, ProviderRun, profile_placement

EP = "OpenVINOExecutionProvider"
ENV_VAR = "ONNXQ_OPENVINO_PYTHON"
WORKER = Path(__file__).with_name("openvino_worker.py")
DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".venv-openvino" / "bin" / "python"
TIMEOUT_S = 1800


class OpenVinoProvider(Provider):
    name = "openvino"
    description = "ONNX Runtime OpenVINO EP (CPU device) in a second interpreter"

    def __init__(self, python: str | os.PathLike | None = None, device: str = "CPU") -> None:
        self.python = python or os.environ.get(ENV_VAR) or (DEFAULT_VENV if DEFAULT_VENV.exists() else None)
        self.device = device
        self._probe: str | bool | None = False  # False: not probed yet

    def unavailable(self, model=None) -> str | None:
        if self.python is None:
            return (
                f"no OpenVINO interpreter: run `make providers`, or set {ENV_VAR} to a python "
                "that has onnxruntime-openvino"
            )
        if self._probe is False:
            self._probe = self._check_interpreter()
        return self._probe  # type: ignore[return-value]

    def _check_interpreter(self) -> str | None:
        code = "import onnxruntime as o; print(o.__version__, ' '.join(o.get_available_providers()))"
        try:
            done = subprocess.run(
                [str(self.python), "-c", code], capture_output=True, text=True, timeout=120, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot start the OpenVINO interpreter {self.python}: {exc}"
        if done.returncode != 0:
            return f"{self.python} cannot import onnxruntime; install onnxruntime-openvino there"
        if EP not in done.stdout.split():
            return f"the onnxruntime at {self.python} has no {EP}; install onnxruntime-openvino there"
        return None

    def run(self, model: Path, samples: Sequence[Sample], *, timed: bool = True) -> ProviderRun:
        reason = self.unavailable()
        if reason:
            raise ProviderError(reason)
        with tempfile.TemporaryDirectory(prefix="onnxq-openvino-") as tmp:
            folder = Path(tmp)
            np.savez(
                folder / "inputs.npz",
                **{f"sample{i}/{name}": value for i, s in enumerate(samples) for name, value in s.items()},
            )
            request = {
                "model": str(Path(model).resolve()),
                "inputs": str(folder / "inputs.npz"),
                "outputs": str(folder / "outputs.npz"),
                "result": str(folder / "result.json"),
                "profile_prefix": str(folder / "profile"),
                "device": self.device,
                "timed": timed,
            }
            (folder / "request.json").write_text(json.dumps(request))
            try:
                done = subprocess.run(
                    [str(self.python), str(WORKER), str(folder / "request.json")],
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise ProviderError(f"the OpenVINO worker took longer than {TIMEOUT_S} s") from None
            if not (folder / "result.json").exists():
                tail = (done.stderr or "").strip().splitlines()
                raise ProviderError(f"the OpenVINO worker failed: {tail[-1] if tail else done.returncode}")
            result = json.loads((folder / "result.json").read_text())
            if "error" in result:
                raise ProviderError(f"OpenVINO: {result['error']}")
            outputs: dict[int, dict[str, np.ndarray]] = {}
            with np.load(folder / "outputs.npz", allow_pickle=False) as data:
                for key in data.files:
                    index, name = key.split("/", 1)
                    outputs.setdefault(int(index[len("sample") :]), {})[name] = data[key]
            placement = profile_placement(result["profile"], EP) if result.get("profile") else None
        return ProviderRun(
            [outputs[i] for i in sorted(outputs)],
            result.get("latency_ms"),
            placement,
            [f"onnxruntime-openvino {result.get('onnxruntime', '?')}, device {self.device}"],
        )
