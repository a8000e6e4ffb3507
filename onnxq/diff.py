"""Per-layer error localisation: where in the graph does a candidate model start to disagree?

:func:`diff` runs a reference (fp32) model and a candidate (its quantized version, or the same model
on a second provider) on the same inputs and compares every intermediate tensor the two graphs share.
For each matched tensor it reports the SQNR, cosine and largest error against the reference, and the
error the producing node *added* (``added_db``: the SQNR of its worst input minus the SQNR of its
output), so a single broken layer stands out from the error that merely flows through the graph.

Matching: a candidate tensor matches the reference tensor of the same name when both are produced by
nodes. Rewrites that absorb a node into its producer (BatchNormalization folded into a Conv, a removed
Identity) make the producer's output stand for the absorbed node's output; this is detected from the
node names the two graphs share, so such a tensor is compared with the reference value it really
holds (and reported under the candidate's tensor and node names).

Memory: activations are never all held. Tensors are fetched in chunks of bounded size
(:data:`CHUNK_BYTES` per model and sample, sized from shape inference on the first sample): for each
chunk both models are pruned to what the chunk needs, given the chunk's tensors as extra outputs,
and run on every sample; each fetched array is folded at once into float64 running sums
(Σref², Σ(ref−out)², Σref·out, Σout², Σ|ref−out|, max|ref−out|, count), from which every metric is
exact at the end. The input samples are held (they are small next to activations); each chunk costs
one pass of the pruned graphs over them. The model outputs get a pass of their own on the models as
they are, because extra outputs keep ONNX Runtime from fusing across them: output metrics are those of
the shipped model, while the per-layer numbers come from the candidate with its fusions broken at
every matched tensor (for a QDQ model on ``cpu``, close to QDQ as written).

``added_db`` arithmetic clips SQNRs to ±:data:`CLEAN_DB` (model inputs, constants and exact tensors
count as :data:`CLEAN_DB`); ``sqnr_db`` itself is reported unclipped (inf when exact).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxq import providers as registry
from onnxq.calibrate import release_freed_memory, return_large_blocks_promptly, serialize_for_ort
from onnxq.data import Sample, checked_samples, model_inputs
from onnxq.errors import CalibrationDataError, ConfigError
from onnxq.metrics import FOLD_BLOCK, RunningError
from onnxq.model_io import load_model

log = logging.getLogger(__name__)

__all__ = ["CHUNK_BYTES", "CLEAN_DB", "DiffReport", "LayerDiff", "OutputDiff", "diff"]

# Bytes of fetched tensors per model, sample and run.
CHUNK_BYTES = 64 * 2**20
# SQNR at or above which a tensor counts as clean in the added-error arithmetic: exact tensors
# (inf), model inputs and constants count as this, and higher SQNRs are clipped to it. 50 dB is the
# SQNR of ideal full-scale 8-bit rounding, above what int8/int4 layers reach (15-45 dB) and far below
# float rounding (≥ 100 dB): the first quantized layer of a model adds a finite, moderate error, and
# rounding differences between providers add none.
CLEAN_DB = 50.0
TOP = 20
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


# ----------------------------------------------------------------------------------------------------
# Running statistics


# ----------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class LayerDiff:
    """One matched tensor: its error against the reference and the error its node added."""

    index: int
    tensor: str
    node: str
    op_type: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    added_db: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tensor": self.tensor,
            "node": self.node,
            "op_type": self.op_type,
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "max_abs_error": self.max_abs_error,
            "added_db": self.added_db,
        }


@dataclass(frozen=True)
class OutputDiff:
    """One model output compared over all samples."""

    name: str
    cosine: float
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
        }


@dataclass(frozen=True)
class DiffReport:
    """What :func:`diff` found; ``to_dict()`` is the ``onnxq.diff`` document of ``docs/reports.md``."""

    reference: str
    candidate: str
    providers: tuple[str, str]
    samples: int
    threshold_db: float
    layers: tuple[LayerDiff, ...]
    ranking: tuple[str, ...]
    first_jump: LayerDiff | None
    outputs: tuple[OutputDiff, ...]
    matched: int = field(default=0)

    def layer(self, tensor: str) -> LayerDiff:
        """The layer of ``tensor`` (KeyError if it was not matched)."""
        for layer in self.layers:
            if layer.tensor == tensor:
                return layer
        raise KeyError(tensor)

    def to_dict(self) -> dict[str, Any]:
        jump = None
        if self.first_jump is not None:
            j = self.first_jump
            jump = {
                "index": j.index,
                "tensor": j.tensor,
                "node": j.node,
                "op_type": j.op_type,
                "sqnr_db": j.sqnr_db,
                "added_db": j.added_db,
            }
        return {
            "kind": "onnxq.diff",
            "version": 1,
            "reference": self.reference,
            "candidate": self.candidate,
            "providers": list(self.providers),
            "samples": self.samples,
            "matched": self.matched,
            "threshold_db": self.threshold_db,
            "layers": [layer.to_dict() for layer in self.layers],
            "ranking": list(self.ranking),
            "first_jump": jump,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def to_text(self, top: int = 10) -> str:
        """A short plain-text summary for a terminal: first jump, top layers by added error, outputs."""
        lines = [
            f"onnxq diff: {self.candidate} ({self.providers[1]}) against {self.reference} "
            f"({self.providers[0]}), {self.samples} samples, {self.matched} tensors matched",
        ]
        if self.first_jump is None:
            lines.append(f"first jump: none (no layer adds more than {self.threshold_db:g} dB)")
        else:
            j = self.first_jump
            lines.append(
                f"first jump: #{j.index} {j.tensor} ({j.op_type} {j.node}): "
                f"SQNR {_fmt(j.sqnr_db)} dB, added {_fmt(j.added_db)} dB"
            )
        by_name = {layer.tensor: layer for layer in self.layers}
        shown = [by_name[t] for t in self.ranking[:top]]
        if shown:
            lines.append("")
            lines.append(f"top {len(shown)} layers by added error:")
            lines.append(
                f"  {'#':>5} {'added dB':>9} {'SQNR dB':>8} {'cosine':>9} {'max err':>10}  op / tensor"
            )
            for layer in shown:
                lines.append(
                    f"  {layer.index:>5} {_fmt(layer.added_db):>9} {_fmt(layer.sqnr_db):>8} "
                    f"{layer.cosine:>9.6f} {layer.max_abs_error:>10.4g}  {layer.op_type} {layer.tensor}"
                )
        if self.outputs:
            lines.append("")
            lines.append("outputs:")
            lines.append(f"  {'cosine':>9} {'SQNR dB':>8} {'max err':>10} {'mean err':>10}  name")
            for o in self.outputs:
                lines.append(
                    f"  {o.cosine:>9.6f} {_fmt(o.sqnr_db):>8} {o.max_abs_error:>10.4g} "
                    f"{o.mean_abs_error:>10.4g}  {o.name}"
                )
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else str(value)


# ----------------------------------------------------------------------------------------------------
# Sessions: the one place a provider name becomes an ORT session


def make_provider_session(provider: str, model: bytes, folder: Path | None) -> ort.InferenceSession:
    """An in-process ORT session for ``provider`` on serialized ``model`` (external weights resolved
    against ``folder``), without weight pre-packing so weights are not copied. Unknown or unusable
    providers raise :class:`ConfigError` naming the valid ones."""
    chosen = registry.get_provider(provider)  # ConfigError listing the valid names
    if not isinstance(chosen, registry.OrtProvider):
        in_process = ", ".join(
            name
            for name, f in registry.PROVIDERS.items()
            if isinstance(f, type) and issubclass(f, registry.OrtProvider)
        )
        raise ConfigError(
            f"provider {provider!r} does not run in this process, which diff needs; choose from {in_process}"
        )
    reason = chosen.unavailable()
    if reason:
        raise ConfigError(f"provider {provider!r} cannot run here: {reason}")
    quantized = registry.is_quantized(onnx.ModelProto.FromString(model)) if provider == "qnn-htp" else True
    so = chosen.session_options(quantized)
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    eps = chosen.providers() or None
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        return ort.InferenceSession(model, so, providers=eps)
    except Exception as exc:
        raise CalibrationDataError(
            f"ONNX Runtime cannot load the model on {provider!r}: {str(exc).strip().splitlines()[0]}"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Matching


def _key(node: ir.Node) -> str:
    return node.name or f"{node.op_type}:{node.outputs[0].name if node.outputs else ''}"


def _unique_keys(graph: ir.Graph) -> dict[str, ir.Node]:
    seen: dict[str, ir.Node] = {}
    duplicate: set[str] = set()
    for node in graph:
        k = _key(node)
        if k in seen:
            duplicate.add(k)
        seen[k] = node
    return {k: n for k, n in seen.items() if k not in duplicate}


def _is_float(dtype: int | None) -> bool:
    return dtype is None or dtype in _FLOAT_TYPES


def _absorbed_into(value: ir.Value, cand_keys: set[str]) -> ir.Value:
    """The reference value that ``value`` stands for in the candidate: follows single consumers the
    candidate does not have (a folded BatchNormalization, a removed Identity)."""
    for _ in range(8):
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            return value
        consumer = uses[0][0]
        if _key(consumer) in cand_keys or not consumer.outputs or consumer.op_type == "Constant":
            return value
        value = consumer.outputs[0]
    return value


def _match(
    ref: ir.Model, cand: ir.Model, ref_types: dict[str, int], cand_types: dict[str, int]
) -> dict[str, tuple[str, ir.Node]]:
    """Reference tensor name → (candidate tensor name, candidate producer) for every float tensor both
    graphs compute (graph inputs, initializers and Constant outputs are not tensors of interest)."""
    ref_keys, cand_keys = _unique_keys(ref.graph), _unique_keys(cand.graph)
    ref_produced = {o.name for n in ref.graph if n.op_type != "Constant" for o in n.outputs if o.name}
    matches: dict[str, tuple[str, ir.Node]] = {}
    used_cand: set[str] = set()
    cand_key_set = set(cand_keys)
    cand_producer = {o.name: n for n in cand.graph if n.op_type != "Constant" for o in n.outputs if o.name}
    # 1. Through nodes both graphs have (by name): output i of the node, or what it absorbed. A node
    # whose output another node took over under the same name (an int8 MatMul whose float outlier
    # channels an Add sums in) stands for that complete output.
    for k, cnode in cand_keys.items():
        rnode = ref_keys.get(k)
        if rnode is None or rnode.op_type != cnode.op_type or rnode.op_type == "Constant":
            continue
        for rout, cout in zip(rnode.outputs, cnode.outputs, strict=False):
            if not rout.name or not cout.name:
                continue
            target = _absorbed_into(rout, cand_key_set)
            if target.name in matches or target.name not in ref_produced:
                continue
            taken_over = target is rout and cout.name != rout.name and rout.name in cand_producer
            cname = rout.name if taken_over else cout.name
            if not (_is_float(ref_types.get(target.name)) and _is_float(cand_types.get(cname))):
                continue
            matches[target.name] = (cname, cnode)
            used_cand.add(cname)
    # 2. Same tensor name, produced by nodes in both graphs, not yet involved in a match.
    for name in ref_produced:
        if name in matches or name in used_cand or name not in cand_producer:
            continue
        if _is_float(ref_types.get(name)) and _is_float(cand_types.get(name)):
            matches[name] = (name, cand_producer[name])
            used_cand.add(name)
    return matches


# ----------------------------------------------------------------------------------------------------
# Shapes, chunks and pruned copies


def _infer(proto: onnx.ModelProto, sample: Sample) -> tuple[dict[str, int], dict[str, int]]:
    """(elem type, byte size) per value name from ONNX shape inference with the input shapes fixed to
    those of ``sample``; values whose size is unknown are absent from the sizes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in copy.graph.input:
        if value.name in sample and value.type.HasField("tensor_type"):
            shape = sample[value.name].shape
            dims = value.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                for dim, size in zip(dims, shape, strict=True):
                    dim.Clear()
                    dim.dim_value = int(size)
    del copy.graph.value_info[:]
    try:
        copy = onnx.shape_inference.infer_shapes(copy, data_prop=True)
    except Exception as exc:  # the sizes only steer chunking; fall back to estimates
        log.debug("shape inference failed: %s", exc)
    types: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for value in [*copy.graph.value_info, *copy.graph.output, *copy.graph.input]:
        if not value.type.HasField("tensor_type"):
            continue
        tt = value.type.tensor_type
        if tt.elem_type:
            types[value.name] = tt.elem_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim) and tt.elem_type:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
            sizes[value.name] = int(np.prod([d.dim_value for d in tt.shape.dim])) * itemsize
    return types, sizes


def _chunks(names: Sequence[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """``names`` in order, cut into runs whose known sizes add up to at most ``budget``. An unknown
    size (shape inference could not tell) counts as the median known one: counting it as the
    largest (a decoder's logits, larger than the budget) would give every such tensor a pass of
    its own."""
    fallback = int(np.median(list(sizes.values()))) if sizes else budget // 16
    chunks: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name in names:
        size = sizes.get(name, fallback)
        if current and total + size > budget:
            chunks.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    if current:
        chunks.append(current)
    return chunks


def _subgraph_inputs(node: onnx.NodeProto) -> Iterable[str]:
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)


def _copy_field(target: Any, desc: Any, value: Any) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, desc.name).extend(value)
    elif hasattr(value, "CopyFrom"):  # a message
        getattr(target, desc.name).CopyFrom(value)
    else:
        setattr(target, desc.name, value)


def _pruned(proto: onnx.ModelProto, outputs: Sequence[str]) -> bytes:
    """``proto`` with ``outputs`` as its only outputs and every node they do not need removed."""
    producer = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    needed: set[str] = set()
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        index = producer.get(name)
        if index is not None and index not in keep:
            keep.add(index)
            node = proto.graph.node[index]
            stack.extend(i for i in node.input if i)
            stack.extend(_subgraph_inputs(node))
    # Built field by field: only the kept nodes and the initializers they use are copied.
    copy = onnx.ModelProto()
    for desc, value in proto.ListFields():
        if desc.name != "graph":
            _copy_field(copy, desc, value)
    graph = copy.graph
    skip = {"node", "initializer", "sparse_initializer", "value_info", "output"}
    for desc, value in proto.graph.ListFields():
        if desc.name not in skip:
            _copy_field(graph, desc, value)
    graph.node.extend(n for i, n in enumerate(proto.graph.node) if i in keep)
    graph.initializer.extend(t for t in proto.graph.initializer if t.name in needed)
    graph.sparse_initializer.extend(t for t in proto.graph.sparse_initializer if t.values.name in needed)
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    return copy.SerializeToString()


# ----------------------------------------------------------------------------------------------------
# The comparison


def _display(model: Any) -> str:
    if isinstance(model, str | os.PathLike):
        return str(model)
    return f"<in-memory {type(model).__name__}>"


def _check_inputs(ref: ir.Model, cand: ir.Model) -> None:
    ref_in = {s.name: s.dtype for s in model_inputs(ref)}
    cand_in = {s.name: s.dtype for s in model_inputs(cand)}
    if set(ref_in) != set(cand_in):
        raise ConfigError(
            f"the reference's inputs {sorted(ref_in)} differ from the candidate's {sorted(cand_in)}; "
            "pass the candidate quantized from this reference"
        )
    for name, dtype in ref_in.items():
        if cand_in[name] != dtype:
            raise ConfigError(
                f"input {name!r} is {dtype} in the reference but {cand_in[name]} in the candidate; "
                "pass the candidate quantized from this reference"
            )


def _clip(db: float) -> float:
    return min(max(db, -CLEAN_DB), CLEAN_DB) if not math.isnan(db) else -CLEAN_DB


def _first_jump(layers: Sequence[LayerDiff], threshold_db: float) -> LayerDiff | None:
    """The earliest layer (graph order) whose added error exceeds ``threshold_db`` and is within
    ``max(threshold_db, 6)`` dB of the largest added error: the first of the biggest jumps, so a
    smaller earlier jump (the first quantized layer) does not hide a broken layer further on."""
    if not layers:
        return None
    largest = max(layer.added_db for layer in layers)
    margin = max(threshold_db, 6.0)
    for layer in layers:
        if layer.added_db > threshold_db and layer.added_db >= largest - margin:
            return layer
    return None


def diff(
    reference: Any,
    candidate: Any,
    data: Any,
    *,
    providers: Sequence[str] = ("cpu", "cpu"),
    num_samples: int | None = None,
    threshold_db: float = 6.0,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> DiffReport:
    """Compare every tensor ``candidate`` shares with ``reference`` on ``data`` and locate where the
    error appears.

    ``reference``/``candidate``: a path (file or folder), ``onnx.ModelProto`` or ``onnx_ir.Model``;
    ``candidate=None`` compares the reference with itself on ``providers[1]``. ``data``: anything
    :func:`onnxq.data.checked_samples` accepts (at most ``num_samples`` samples are used).
    ``providers``: the reference's and the candidate's provider names.

    Guarantees: neither model is modified; activations are fetched ``chunk_bytes`` per model and
    sample at most, and folded at once, so memory does not grow with the number of samples or tensors;
    metrics are exact over all samples; user mistakes raise an :class:`onnxq.OnnxqError`.
    """
    if isinstance(providers, str) or len(providers) != 2:
        raise ConfigError(
            "providers must be two names: the reference's and the candidate's, e.g. ('cpu', 'cpu')"
        )
    providers = (str(providers[0]), str(providers[1]))
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, not {num_samples}")
    return_large_blocks_promptly()
    ref = load_model(reference)
    cand = ref if candidate is None else load_model(candidate)
    if cand is not ref:
        _check_inputs(ref, cand)
    inputs = model_inputs(ref)
    samples = list(checked_samples(data, inputs, num_samples))

    ref_bytes, ref_folder = serialize_for_ort(ref)
    ref_proto = onnx.ModelProto.FromString(ref_bytes)
    del ref_bytes
    if cand is ref:
        cand_proto, cand_folder = ref_proto, ref_folder
    else:
        cand_bytes, cand_folder = serialize_for_ort(cand)
        cand_proto = onnx.ModelProto.FromString(cand_bytes)
        del cand_bytes
    # HTP runs static shapes only: symbolic input dimensions take the first sample's sizes.
    if providers[0] == "qnn-htp":
        ref_proto = registry.fix_input_shapes(ref_proto, samples[0])[0]
    if providers[1] == "qnn-htp":
        cand_proto = registry.fix_input_shapes(cand_proto, samples[0])[0]
    ref_types, sizes = _infer(ref_proto, samples[0])
    cand_types = ref_types if cand is ref else _infer(cand_proto, samples[0])[0]

    matches = _match(ref, cand, ref_types, cand_types)
    if not matches:
        raise ConfigError(
            "the two models share no tensor names; was the candidate produced from this reference?"
        )
    order = [o.name for n in ref.graph for o in n.outputs if o.name in matches]
    ref_outputs = [v.name for v in ref.graph.outputs]
    cand_output_names = {v.name for v in cand.graph.outputs}
    output_names = [n for n in ref_outputs if n in cand_output_names]
    if not output_names:
        raise ConfigError(
            f"the models have no output in common (reference {ref_outputs}, candidate "
            f"{sorted(cand_output_names)}); was the candidate produced from this reference?"
        )
    cand_name = {r: c for r, (c, _) in matches.items()} | {n: n for n in output_names}
    # The model outputs get passes of their own, on the models as they are (extra outputs stop some
    # ORT fusions, so output metrics from the augmented copies could differ from what ships).
    passes = [(chunk, False) for chunk in _chunks(order, sizes, chunk_bytes)]
    passes += [(chunk, True) for chunk in _chunks(output_names, sizes, chunk_bytes)]
    log.info(
        "diff: %d tensors matched, %d passes of at most %.0f MB per model over %d samples",
        len(matches),
        len(passes),
        chunk_bytes / 2**20,
        len(samples),
    )
    stats: dict[str, RunningError] = {name: RunningError() for name in order}
    output_stats: dict[str, RunningError] = {name: RunningError() for name in output_names}
    invalid: set[tuple[str, bool]] = set()
    scratch = np.empty((3, FOLD_BLOCK), np.float64)
    bar = tqdm(total=len(passes) * len(samples), desc="diff", unit="run", disable=not progress, leave=False)
    for chunk, is_output in passes:
        cand_chunk = [cand_name[n] for n in chunk]
        target = output_stats if is_output else stats
        ref_session = make_provider_session(providers[0], _pruned(ref_proto, chunk), ref_folder)
        cand_session = make_provider_session(providers[1], _pruned(cand_proto, cand_chunk), cand_folder)
        for i, sample in enumerate(samples):
            ref_arrays = _run(ref_session, chunk, sample, i, "reference")
            cand_arrays = _run(cand_session, cand_chunk, sample, i, "candidate")
            for name, a, b in zip(chunk, ref_arrays, cand_arrays, strict=True):
                key = (name, is_output)
                if key in invalid:
                    continue
                if a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f":
                    log.debug(
                        "diff: %s is not comparable (%s%s vs %s%s)", name, a.dtype, a.shape, b.dtype, b.shape
                    )
                    invalid.add(key)
                    continue
                target[name].fold(a, b, scratch)
            del ref_arrays, cand_arrays
            bar.update()
        del ref_session, cand_session
        release_freed_memory()
    bar.close()

    layers = _layers(ref, matches, stats, {n for n, out in invalid if not out}, ref_types)
    if not layers:
        raise ConfigError(
            "no float tensor of the reference could be compared with the candidate; "
            "was the candidate produced from this reference?"
        )
    ranked = sorted(layers, key=lambda layer: (-layer.added_db, layer.index))
    outputs = []
    for name in output_names:
        if (name, True) in invalid:
            continue
        s = output_stats[name]
        outputs.append(OutputDiff(name, s.cosine(), s.sqnr_db(), s.max_err, s.mean_abs_error()))
    return DiffReport(
        reference=_display(reference),
        candidate=_display(reference if candidate is None else candidate),
        providers=providers,
        samples=len(samples),
        threshold_db=threshold_db,
        layers=tuple(layers),
        ranking=tuple(layer.tensor for layer in ranked[:TOP]),
        first_jump=_first_jump(layers, threshold_db),
        outputs=tuple(outputs),
        matched=len(layers),
    )


def _run(session: ort.InferenceSession, names: list[str], sample: Sample, index: int, which: str) -> list:
    try:
        return session.run(names, sample)
    except Exception as exc:
        raise CalibrationDataError(
            f"sample {index} failed in ONNX Runtime on the {which}: {str(exc).strip().splitlines()[0]}"
        ) from None


def _layers(
    ref: ir.Model,
    matches: dict[str, tuple[str, ir.Node]],
    stats: dict[str, RunningError],
    invalid: set[str],
    ref_types: dict[str, int],
) -> list[LayerDiff]:
    """The compared tensors in the reference's order, with ``added_db`` from a pass over the
    reference graph: each value's level is its clipped SQNR when compared, else the lowest level of
    its producer's float inputs (model inputs, initializers and constants are clean)."""
    level: dict[str, float] = {}
    for value in ref.graph.inputs:
        level[value.name] = CLEAN_DB
    layers: list[LayerDiff] = []
    for node in ref.graph:
        input_levels = [
            level.get(v.name, CLEAN_DB)
            for v in node.inputs
            if v is not None and _is_float(ref_types.get(v.name))
        ]
        worst_input = min(input_levels, default=CLEAN_DB)
        for out in node.outputs:
            name = out.name
            if name in matches and name not in invalid:
                s = stats[name]
                sqnr = s.sqnr_db()
                level[name] = _clip(sqnr)
                cand_tensor, cand_node = matches[name]
                layers.append(
                    LayerDiff(
                        index=len(layers),
                        tensor=cand_tensor,
                        node=cand_node.name or "",
                        op_type=cand_node.op_type,
                        sqnr_db=sqnr,
                        cosine=s.cosine(),
                        max_abs_error=s.max_err,
                        added_db=worst_input - level[name],
                    )
                )
            else:
                level[name] = CLEAN_DB if node.op_type == "Constant" else worst_input
    return layers
