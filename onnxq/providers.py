"""Where a model runs: ONNX Runtime execution providers (and ``onnx.reference``) behind one interface.

Every provider answers two questions: can it run here (:meth:`Provider.unavailable` gives the reason
when not: a missing package, no GPU, a model too large for the pure-Python reference), and what does
a model give on it (:meth:`Provider.run`: outputs for each input, median latency timed in a block
after one warm-up run, and placement — which ORT execution provider ran how many kernels, and which
nodes fell back to the CPU, read from ORT's own profiling of the first run).

Providers, by name:

- ``cpu``: ORT's CPU EP with every graph optimisation (the fused integer kernels users ship);
- ``cpu-unfused``: the CPU EP with graph optimisations off, so QDQ runs exactly as written — a
  second, independent numerical path;
- ``reference``: ``onnx.reference`` — golden values for small models (skipped above
  :data:`REFERENCE_MAX_BYTES` of weights, and for models with ONNX Runtime's own ops);
- ``qnn-htp``: Qualcomm's HTP NPU through the ``onnxruntime-qnn`` plugin (``pip install
  "onnxq[qnn]"``), which on x86 runs HTP's emulator. HTP needs static shapes: symbolic input
  dimensions are fixed to the shapes of the data (said in the row's notes). Float models run in
  HTP's fp16 (``soc_model=60``);
- ``openvino``: ``onnxruntime-openvino`` ships its own ``onnxruntime`` module, so it runs in a
  worker process of a second interpreter (``ONNXQ_OPENVINO_PYTHON``, or the ``.venv-openvino``
  that ``make providers`` creates), inputs and outputs exchanged as ``.npz`` files;
- ``cuda``, ``tensorrt``: ``onnxruntime-gpu`` on a machine with a GPU.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.data import Sample
from onnxq.errors import ConfigError
from onnxq.model_io import read_graph

log = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
REFERENCE_MAX_BYTES = 64 * 2**20
# Timed runs per model: at least this many, and at least this long in total (after one warm-up run).
MIN_TIMED_RUNS = 8
MIN_TIMED_SECONDS = 1.0


@dataclass(frozen=True)
class Placement:
    """Where the kernels of one run went: kernels per ORT execution provider, and the nodes that ran
    on the CPU although another provider was asked for (``(node name, op type)``)."""

    kernels: dict[str, int]
    fallback: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {
            "kernels": dict(sorted(self.kernels.items())),
            "fallback": [{"name": n, "op_type": op} for n, op in self.fallback],
        }


@dataclass
class ProviderRun:
    """What one model gave on one provider: an output dict per input sample, the median latency
    (ms, None when not timed) and the placement (None when the provider cannot tell)."""

    outputs: list[dict[str, np.ndarray]]
    latency_ms: float | None = None
    placement: Placement | None = None
    notes: list[str] = field(default_factory=list)


class ProviderError(RuntimeError):
    """A model could not run on a provider (reported as a failed row, not raised to the user)."""


class Provider(abc.ABC):
    """One place a model can run."""

    name: str = ""
    description: str = ""

    @property
    def emulated(self) -> str | None:
        """Why this provider's latency means nothing here (an emulator of other hardware), or None."""
        return None

    @abc.abstractmethod
    def unavailable(self, model: onnx.ModelProto | None = None) -> str | None:
        """Why this provider cannot run here (or cannot run ``model``); None when it can."""

    @abc.abstractmethod
    def run(self, model: Path, samples: Sequence[Sample], *, timed: bool = True) -> ProviderRun:
        """Run ``model`` on every sample; raises :class:`ProviderError` with one line on failure."""


def timed_runs(call: Callable[[Sample], object], samples: Sequence[Sample]) -> float:
    """Median milliseconds of ``call`` over the samples, cycled as a block until at least
    :data:`MIN_TIMED_RUNS` runs and :data:`MIN_TIMED_SECONDS` have passed (one warm-up run first)."""
    call(samples[0])
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < MIN_TIMED_RUNS or time.perf_counter() - start < MIN_TIMED_SECONDS:
        sample = samples[i % len(samples)]
        t = time.perf_counter()
        call(sample)
        times.append(time.perf_counter() - t)
        i += 1
        if len(times) >= 10 * MIN_TIMED_RUNS and time.perf_counter() - start >= MIN_TIMED_SECONDS:
            break
    return 1000.0 * statistics.median(times)


def profile_placement(profile_file: str, requested_ep: str) -> Placement:
    """Kernels per EP and CPU fallback nodes from an ORT profile (the file is removed)."""
    try:
        with open(profile_file) as f:
            events = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.remove(profile_file)
    kernels: Counter[str] = Counter()
    seen: set[str] = set()
    fallback: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        provider = args.get("provider", "")
        node = event["name"][: -len("_kernel_time")]
        if node in seen:
            continue
        seen.add(node)
        kernels[provider] += 1
        if requested_ep != CPU_EP and provider == CPU_EP:
            fallback[node] = args.get("op_name", "")
    return Placement(dict(kernels), tuple(sorted(fallback.items())))


def fix_input_shapes(model: onnx.ModelProto, sample: Sample) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose symbolic input dimensions take the sizes of ``sample`` (shape
    inference re-run), and a note per fixed input; ``model`` itself is returned when nothing is
    symbolic."""
    fixed: list[str] = []
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name not in sample:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = sample[value.name].shape
        if len(dims) != len(shape):
            continue
        changed = False
        for dim, size in zip(dims, shape, strict=True):
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = int(size)
                changed = True
        if changed:
            fixed.append(f"{value.name}={list(shape)}")
    if not fixed:
        return model, []
    for value in copy.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    del copy.graph.value_info[:]
    with contextlib.suppress(Exception):
        copy = onnx.shape_inference.infer_shapes(copy, data_prop=True)
    return copy, [f"static shapes fixed from the data: {', '.join(fixed)}"]


class OrtProvider(Provider):
    """A provider that is an ONNX Runtime execution provider in this process."""

    ep: str = CPU_EP

    def session_options(self, quantized: bool = True) -> ort.SessionOptions:
        """Quiet session options without spinning threads (which distort block timing); ``quantized``
        tells providers that run float and integer graphs differently which one this is."""
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def providers(self) -> list:
        """The ``providers=`` argument of ``InferenceSession`` (None when set on the options)."""
        return [self.ep] if self.ep == CPU_EP else [self.ep, CPU_EP]

    def unavailable(self, model: onnx.ModelProto | None = None) -> str | None:
        if self.ep not in ort.get_available_providers():
            return f"{self.ep} is not in this onnxruntime build"
        return None

    def prepare(self, model: onnx.ModelProto, samples: Sequence[Sample]) -> tuple[onnx.ModelProto, list[str]]:
        """The model as this provider must receive it, and notes on what was changed."""
        return model, []

    def make_session(
        self,
        model: onnx.ModelProto | str | Path,
        *,
        profile: bool = False,
        folder: Path | None = None,
        quantized: bool | None = None,
    ) -> ort.InferenceSession:
        """An ORT session on this provider for a model file or proto (``folder``: where a proto's
        external weights lie; ``quantized``: whether it is a QDQ model, read from it when None)."""
        if quantized is None:
            quantized = is_quantized(
                model
                if isinstance(model, onnx.ModelProto)
                else read_graph(model)
            )
        so = self.session_options(quantized)
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"onnxq_profile_{os.getpid()}")
        if folder is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(source, so, providers=self.providers())

    def run(self, model: Path, samples: Sequence[Sample], *, timed: bool = True) -> ProviderRun:
        proto = read_graph(model)  # the weights stay in the file
        prepared, notes = self.prepare(proto, samples)
        quantized = is_quantized(proto)
        try:
            if prepared is proto:
                session = self.make_session(model, profile=True, quantized=quantized)
            else:
                session = self.make_session(prepared, profile=True, folder=model.parent, quantized=quantized)
            names = [o.name for o in session.get_outputs()]
            outputs = [dict(zip(names, session.run(names, s), strict=True)) for s in samples[:1]]
            placement = profile_placement(session.end_profiling(), self.ep)
            outputs += [dict(zip(names, session.run(names, s), strict=True)) for s in samples[1:]]
            latency = timed_runs(lambda s: session.run(names, s), samples) if timed else None
        except Exception as exc:  # ORT raises its own types for unsupported models and inputs
            raise ProviderError(str(exc).strip().splitlines()[0]) from None
        return ProviderRun(outputs, latency, placement, notes)


class CpuProvider(OrtProvider):
    name = "cpu"
    description = "ONNX Runtime CPU EP with graph optimisations (fused integer kernels)"


class CpuUnfusedProvider(OrtProvider):
    name = "cpu-unfused"
    description = "ONNX Runtime CPU EP with graph optimisations off (QDQ run as written)"

    def session_options(self, quantized: bool = True) -> ort.SessionOptions:
        so = super().session_options(quantized)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return so


class QnnHtpProvider(OrtProvider):
    name = "qnn-htp"
    description = "Qualcomm HTP (NPU) through the onnxruntime-qnn plugin (an emulator on x86)"
    ep = "QNNExecutionProvider"
    _registered = False

    @property
    def emulated(self) -> str | None:
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            return "HTP is emulated on this x86 CPU"
        return None

    def _plugin(self):
        try:
            import onnxruntime_qnn
        except ImportError:
            return None
        return onnxruntime_qnn

    def unavailable(self, model: onnx.ModelProto | None = None) -> str | None:
        plugin = self._plugin()
        if plugin is None:
            return 'onnxruntime-qnn is not installed (pip install "onnxq[qnn]")'
        if not hasattr(ort, "register_execution_provider_library"):
            return f"onnxruntime {ort.__version__} cannot load EP plugins; onnxruntime-qnn needs >= 1.24.2"
        try:
            self._register(plugin)
        except Exception as exc:
            return f"the QNN plugin does not load: {str(exc).splitlines()[0]}"
        if not self._devices():
            return "the QNN plugin offers no device here"
        return None

    def _register(self, plugin) -> None:
        if not QnnHtpProvider._registered:
            ort.set_default_logger_severity(3)  # the plugin warns about Windows-only features at load
            ort.register_execution_provider_library(self.ep, plugin.get_library_path())
            QnnHtpProvider._registered = True

    def _devices(self) -> list:
        return [d for d in ort.get_ep_devices() if d.ep_name == self.ep]

    def providers(self) -> list:
        return []  # set on the session options through add_provider_for_devices

    def session_options(self, quantized: bool = True) -> ort.SessionOptions:
        so = super().session_options(quantized)
        plugin = self._plugin()
        # The EP would otherwise run a graph input's QuantizeLinear and a graph output's
        # DequantizeLinear on the CPU by choice; here the whole graph is asked of HTP, so the
        # placement report lists only what HTP really rejects.
        options = {"backend_path": plugin.get_qnn_htp_path(), "offload_graph_io_quantization": "0"}
        if not quantized:
            options["soc_model"] = "60"  # float graphs run on HTP in fp16 only with a named SoC
        so.add_provider_for_devices(self._devices(), options)
        return so

    def prepare(self, model: onnx.ModelProto, samples: Sequence[Sample]) -> tuple[onnx.ModelProto, list[str]]:
        return fix_input_shapes(model, samples[0])

    def run(self, model: Path, samples: Sequence[Sample], *, timed: bool = True) -> ProviderRun:
        if any(s[k].shape != samples[0][k].shape for s in samples for k in s):
            raise ProviderError("HTP runs static shapes: give inputs that all have the same shape")
        return super().run(model, samples, timed=timed)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


class GpuProvider(OrtProvider):
    """CUDA or TensorRT through onnxruntime-gpu."""

    def unavailable(self, model: onnx.ModelProto | None = None) -> str | None:
        if self.ep not in ort.get_available_providers():
            return f"{self.ep} needs onnxruntime-gpu and a GPU (this onnxruntime has no {self.ep})"
        return None


class CudaProvider(GpuProvider):
    name = "cuda"
    description = "ONNX Runtime CUDA EP (onnxruntime-gpu)"
    ep = "CUDAExecutionProvider"


class TensorRtProvider(GpuProvider):
    name = "tensorrt"
    description = "ONNX Runtime TensorRT EP (onnxruntime-gpu with TensorRT)"
    ep = "TensorrtExecutionProvider"

    def providers(self) -> list:
        return [self.ep, "CUDAExecutionProvider", CPU_EP]


def _reference_ops() -> list[type]:
    """Spec-exact implementations that ``onnx.reference`` lacks or gets wrong for older opsets:
    QuantizeLinear/DequantizeLinear before opset 19 (it has none), and BatchNormalization 9-13, which
    it computes from the batch's own statistics when the (inference-only) ``momentum`` attribute is
    present, as torch exports it."""
    from onnx.reference.op_run import OpRun

    from onnxq import qmath

    def _axis(x: np.ndarray, scale: np.ndarray, axis: int | None) -> int | None:
        return None if np.ndim(scale) == 0 else (1 if axis is None else axis) % x.ndim

    class QuantizeLinear(OpRun):
        op_domain = ""

        def _run(self, x, y_scale, y_zero_point=None, axis=None, **_):
            zp = np.zeros((), np.uint8) if y_zero_point is None else y_zero_point
            return (qmath.quantize(x, y_scale, zp, _axis(x, y_scale, axis)),)

    class DequantizeLinear(OpRun):
        op_domain = ""

        def _run(self, x, x_scale, x_zero_point=None, axis=None, **_):
            zp = np.zeros((), x.dtype) if x_zero_point is None else x_zero_point
            return (qmath.dequantize(x, x_scale, zp, _axis(x, x_scale, axis)),)

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=1e-5, training_mode=0, **_):
            if training_mode:
                raise NotImplementedError("BatchNormalization in training mode")
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
            return ((y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype),)

    return [QuantizeLinear, DequantizeLinear, BatchNormalization]


class ReferenceProvider(Provider):
    name = "reference"
    description = "onnx.reference (pure Python golden values; small models only)"

    def unavailable(self, model: onnx.ModelProto | None = None) -> str | None:
        if model is None:
            return None
        foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            return f"onnx.reference does not run ops of domain {', '.join(foreign)}"
        return None

    def run(self, model: Path, samples: Sequence[Sample], *, timed: bool = True) -> ProviderRun:
        from onnx.reference import ReferenceEvaluator

        size = _weight_bytes(model)
        if size > REFERENCE_MAX_BYTES:
            raise ProviderError(
                f"model has {size / 2**20:.0f} MiB of weights; onnx.reference is limited to "
                f"{REFERENCE_MAX_BYTES // 2**20} MiB (it is pure Python)"
            )
        try:
            proto = onnx.load(str(model))
            opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
            evaluator = ReferenceEvaluator(proto, new_ops=_reference_ops() if opset < 19 else None)
            names = list(evaluator.output_names)
            outputs = [dict(zip(names, evaluator.run(None, s), strict=True)) for s in samples]
            latency = timed_runs(lambda s: evaluator.run(None, s), samples[:2]) if timed else None
        except Exception as exc:
            raise ProviderError(f"onnx.reference failed: {str(exc).strip().splitlines()[0]}") from None
        return ProviderRun(outputs, latency, None)


def _weight_bytes(path: Path) -> int:
    """Bytes of the model file plus its external data files."""
    total = path.stat().st_size
    proto = read_graph(path)  # embedded weights read as references into the model file itself
    locations = {
        entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"
    } - {path.name}
    for location in locations:
        with contextlib.suppress(OSError):
            total += (path.parent / location).stat().st_size
    return total


def _openvino_provider() -> Provider:
    from onnxq.openvino import OpenVinoProvider

    return OpenVinoProvider()


PROVIDERS: dict[str, Callable[[], Provider]] = {
    "cpu": CpuProvider,
    "cpu-unfused": CpuUnfusedProvider,
    "reference": ReferenceProvider,
    "qnn-htp": QnnHtpProvider,
    "openvino": _openvino_provider,
    "cuda": CudaProvider,
    "tensorrt": TensorRtProvider,
}


def get_provider(name: str) -> Provider:
    """The provider called ``name``; :class:`ConfigError` listing the valid names otherwise."""
    factory = PROVIDERS.get(name.strip().lower())
    if factory is None:
        raise ConfigError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    return factory()


def parse_providers(text: str | Sequence[str]) -> list[str]:
    """Provider names from ``"cpu,qnn-htp"`` or a list, checked and without duplicates."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ConfigError(f"no provider given; choose from {', '.join(PROVIDERS)}")
    for name in names:
        get_provider(name)
    return list(dict.fromkeys(names))
