"""The quantization plan: per node, what gets quantized and how — and why not, for the report.

The plan is decided before any rewrite, from the graph and the config alone, so it can be inspected
(``onnxq inspect --plan``). Calibration then measures only the tensors the plan needs, and the
rewrite passes apply it. Where QDQ goes depends on the runtime: ``config.target`` picks one of the
:class:`TargetRules` in :data:`RULES` (their docstrings say what each guarantees and why).

For ``"cpu"`` (the default), placement follows ONNX Runtime's CPU fusion rules so that every
quantized node becomes an integer kernel:

- MatMul / Gemm / Conv / ConvTranspose read their float inputs through DequantizeLinear, weights as
  int8 per output channel. MatMul and Gemm outputs stay float (``MatMulIntegerToFloat``/``QGemm``
  with float output, no requantization); Conv outputs are quantized (``QLinearConv``), after a
  following Relu when there is one (ORT removes a Relu that the Q's zero point already clips).
- Element-wise and pooling ops with an integer kernel (Add, Mul, Concat, pooling, Softmax, Sigmoid,
  LeakyRelu, Where) are quantized only where all their inputs are already quantized, so they extend
  an integer region instead of adding conversions.
- MatMuls reading integers cast to float (rotary embeddings' positions × inverse frequencies) stay
  float: 8-bit steps over positions 0..n would break them.
- MatMuls of two activations (attention's Q·Kᵀ and P·V) stay float (``activation_matmuls``): on
  ORT's CPU EP the QuantizeLinear of Q, K, V and the softmax output cost as much as the int8
  MatMuls save, and 8-bit softmax probabilities cost decoders accuracy.
- Data-movement ops (Reshape, Transpose, MaxPool, Gather, ...) on a quantized tensor pass it
  through with the same scale, so they run on the integers. An embedding Gather (axis 0 of a 2-D
  table) reads an int8 table with one scale per row, whatever the weights' granularity (one scale
  for all rows costs a table 15-30 dB of SQNR; :mod:`onnxq.passes.gather_rows`), and its output is
  float; an override of the table with ``PerTensor()`` granularity keeps the per-tensor form, whose
  output stays int8 for the integer ops after it.

``"tensorrt"`` and ``"openvino"`` put QDQ on the inputs of MatMul/Gemm/Conv/ConvTranspose only
(their compilers fuse the rest themselves); ``"qnn"`` quantizes every op, model inputs and outputs
included, because anything HTP sees in float falls back to the CPU.

If/Loop/Scan bodies get plans of their own (``QuantPlan.bodies``), made by the same rules with the
values a body reads from outer scopes taken as its inputs; ``"qnn"`` leaves bodies float (HTP does
not run control flow, so they fall back to the CPU whole).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import onnx_ir as ir

from onnxq.config import PerChannel, PerTensor, QuantConfig, QuantSpec

COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
ISLAND_OPS = {
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "Softmax",
    "Sigmoid",
    "LeakyRelu",
    "Where",
}
DATA_MOVEMENT_OPS = {
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "MaxPool",
    "GlobalMaxPool",
    "Gather",
    "Slice",
    "Resize",
    "Expand",
    "Tile",
    "DepthToSpace",
    "SpaceToDepth",
    "Identity",
}
# Ops that quantize their output exclusively (all consumers read the DQ) so ORT can fuse them.
OUTPUT_QUANTIZED_OPS = {"Conv"}
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulNBits",
    "QGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}

# Float inputs that are parameters, not data: never quantized, even by targets that quantize every op.
PARAMETER_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}

# Activations whose calibrated range reaches this magnitude hold sentinels (e.g. attention masks of
# float32.min) rather than data; they stay in float.
SENTINEL_MAGNITUDE = 1e9


@dataclass(frozen=True)
class TargetRules:
    """Where one runtime wants QuantizeLinear/DequantizeLinear, and what the rewrite must do for it.

    - ``every_op``: every float input of every op is read through DequantizeLinear and every float
      output (model outputs included) goes through QuantizeLinear→DequantizeLinear; constants that
      are not weights or biases get the activation type with their own range. Otherwise only the
      rules below place QDQ.
    - ``output_quantized``: compute ops whose output is quantized too (fused requantization).
    - ``islands``: ops quantized where all their inputs already are (extending integer regions).
    - ``data_movement``: data-movement ops pass quantized tensors through (same scale), and an
      embedding Gather reads an integer table (one scale per row).
    - ``drop_data_movement_pairs``: the clean-up removes DQ→op→Q pairs around data movement.
    - ``quantize_bias``: Conv/Gemm (and, with ``every_op``, LayerNormalization) biases become int32.
    - ``per_tensor_weights``: ops whose weights are quantized per tensor whatever the config says.
    - ``static_shapes``: symbolic input dimensions are fixed from the first calibration sample and
      shape computations are folded into constants.
    - ``finite_mask``: sentinel constants (``|v| >= SENTINEL_MAGNITUDE``, e.g. attention masks'
      float32.min) are replaced by ``±finite_mask`` before calibration, so they can be quantized.
    - ``fixed_outputs``: ``(op type, dtype) → (scale, zero point)`` the runtime requires.
    - ``fuse_gelu``: erf-GELU subgraphs become one ``Gelu`` op (the runtime has no ``Erf``).
    - ``min_opset``: the lowest default-domain opset the target's rewrite needs.
    """

    every_op: bool = False
    output_quantized: frozenset[str] = frozenset()
    islands: frozenset[str] = frozenset()
    data_movement: bool = False
    drop_data_movement_pairs: bool = False
    quantize_bias: bool = True
    per_tensor_weights: frozenset[str] = frozenset()
    static_shapes: bool = False
    finite_mask: float | None = None
    fixed_outputs: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    fuse_gelu: bool = False
    min_opset: int = 13


CPU_RULES = TargetRules(
    output_quantized=frozenset({"Conv"}),
    islands=frozenset(ISLAND_OPS),
    data_movement=True,
    drop_data_movement_pairs=True,
)
"""ONNX Runtime's CPU EP: QDQ exactly where its graph transformer fuses integer kernels (see the
module docstring); pairs around data movement are removed, so any runtime runs those on integers."""

QNN_RULES = TargetRules(
    every_op=True,
    static_shapes=True,
    finite_mask=1e4,
    fuse_gelu=True,
    min_opset=21,
    fixed_outputs={
        ("Sigmoid", "uint16"): (1.0 / 65536.0, 0),
        ("Sigmoid", "int16"): (1.0 / 32768.0, 0),
        ("Tanh", "uint16"): (1.0 / 32768.0, 32768),
        ("Tanh", "int16"): (1.0 / 32768.0, 0),
    },
)
"""Qualcomm HTP through ORT's QNN EP. HTP runs only quantized ops: every float tensor an op reads
or writes is in QDQ form, model inputs and outputs included (an op left in float, or a data-movement
op whose pair was cleaned up, falls back to the CPU). HTP compiles static shapes only, so symbolic
input dimensions are fixed from the first calibration sample and shape arithmetic is folded away.
Attention masks' float32.min sentinels become -1e4 (finite, still masking: exp(-1e4) is 0), so the
mask and the Add/Softmax reading it can be quantized. 16-bit Sigmoid/Tanh get the fixed output
scales HTP requires. ORT's QNN EP has no Erf: erf-GELU becomes ONNX Gelu (opset 20; opset 21 is
used, which also carries 16-bit QDQ). HTP's LayerNorm rejects a signed gamma next to an int32 bias,
so LayerNorm gammas are unsigned asymmetric 8-bit (the weight type's unsigned twin)."""

TENSORRT_RULES = TargetRules(quantize_bias=False)
"""TensorRT's explicit quantization: QDQ on the inputs of Conv/ConvTranspose/MatMul/Gemm only (its
builder propagates the quantization through the rest and fuses the output scales itself), biases
stay float (TensorRT folds them into its int32 accumulation; it has no int32 DequantizeLinear)."""

OPENVINO_RULES = TargetRules(quantize_bias=False)
"""OpenVINO's low-precision transformations: like NNCF's default placement, QDQ on the inputs of
Conv/ConvTranspose/MatMul/Gemm (OpenVINO propagates the precision through data movement itself, and
quantizing residual Adds costs transformers accuracy for little speed); biases stay float."""

RULES: dict[str, TargetRules] = {
    "cpu": CPU_RULES,
    "qnn": QNN_RULES,
    "tensorrt": TENSORRT_RULES,
    "openvino": OPENVINO_RULES,
}


@dataclass
class TensorPlan:
    """How one tensor is quantized.

    ``kind``: ``activation`` (range from calibration), ``weight`` (range from the constant itself),
    ``inherit`` (same scale and zero point as ``source``: the output of a data-movement op),
    ``fixed`` (the scale and zero point in ``fixed``, which the runtime requires).
    ``consumers``: the (node name, input index) uses that read it through DequantizeLinear;
    ``exclusive``: every use does (the producer then feeds only the QuantizeLinear).
    """

    name: str
    spec: QuantSpec
    kind: Literal["activation", "weight", "inherit", "fixed"]
    axis: int | None = None
    source: str | None = None
    exclusive: bool = False
    consumers: list[tuple[str, int]] = field(default_factory=list)
    fixed: tuple[float, int] | None = None


@dataclass
class NodePlan:
    """The decision for one node: quantized or not, and why not."""

    name: str
    op_type: str
    quantized: bool
    reason: str = ""


@dataclass
class QuantPlan:
    """Per-tensor and per-node decisions. Weights are keyed ``(tensor, node, input index)``-free:
    a weight used with different axes by several nodes gets one entry per (tensor, axis, spec).
    ``bodies``: the plans of the If/Loop/Scan bodies (at any depth), each applied to its own graph."""

    activations: dict[str, TensorPlan] = field(default_factory=dict)
    weights: dict[str, TensorPlan] = field(default_factory=dict)
    nodes: dict[str, NodePlan] = field(default_factory=dict)
    bodies: list[BodyPlan] = field(default_factory=list)

    def calibration_tensors(self) -> list[str]:
        """The activation tensors whose range calibration must measure."""
        return [n for n, t in self.activations.items() if t.kind == "activation"]

    def quantized_counts(self) -> dict[str, int]:
        """Quantized nodes per op type, bodies included."""
        plans = [self, *(b.plan for b in self.bodies)]
        counts = Counter(n.op_type for p in plans for n in p.nodes.values() if n.quantized)
        return dict(sorted(counts.items()))

    def float_nodes(self) -> list[NodePlan]:
        """Nodes left in float with a reason worth reporting (ops onnxq could quantize); a node inside
        a body is named ``<owner node>/<attribute>/<node>``."""
        found = [n for n in self.nodes.values() if not n.quantized and n.reason]
        for body in self.bodies:
            found += [
                NodePlan(f"{body.label}/{n.name}", n.op_type, False, n.reason)
                for n in body.plan.nodes.values()
                if not n.quantized and n.reason
            ]
        return found

    def drop_activation(self, name: str, reason: str) -> None:
        """Keep tensor ``name`` (and what inherits from it) in float; the nodes reading it go float."""
        todo = [name]
        while todo:
            tensor = self.activations.pop(todo.pop(), None)
            if tensor is None:
                continue
            for node_name, _ in tensor.consumers:
                node = self.nodes.get(node_name)
                if node is not None and node.quantized:
                    node.quantized, node.reason = False, reason
                    for key, w in list(self.weights.items()):
                        w.consumers = [c for c in w.consumers if c[0] != node_name]
                        if not w.consumers:
                            del self.weights[key]
                    for other in self.activations.values():
                        other.consumers = [c for c in other.consumers if c[0] != node_name]
            todo.extend(n for n, t in self.activations.items() if t.source == tensor.name)


@dataclass
class BodyPlan:
    """The plan of one If/Loop/Scan body: ``graph`` is the body itself, ``label`` its place
    (``<owner node>/<attribute>``, nested bodies joined by ``/``)."""

    graph: ir.Graph
    label: str
    plan: QuantPlan


def bodies_of(graph: ir.Graph, prefix: str = "") -> list[tuple[str, ir.Graph]]:
    """Every subgraph held by a node of ``graph`` (If/Loop/Scan bodies), at any depth, outer ones
    first, each with its label."""
    found = []
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                label = f"{prefix}{node.name or node.op_type}/{attr.name}"
                found.append((label, attr.as_graph()))
                found += bodies_of(attr.as_graph(), f"{label}/")
    return found


def body_model(model: ir.Model, graph: ir.Graph) -> ir.Model:
    """A model whose graph is the body ``graph`` (the same object, not a copy), for passes written
    for ``model.graph``. Values the body reads from outer scopes stay what they are."""
    return ir.Model(graph, ir_version=model.ir_version, producer_name=model.producer_name)


def weight_axis(node: ir.Node, input_index: int, rank: int, spec: QuantSpec) -> int | None:
    """The per-channel axis of a weight for its consumer's layout (None: per-tensor)."""
    if isinstance(spec.granularity, PerTensor) or rank < 2:
        return None
    if spec.granularity.axis is not None:
        return spec.granularity.axis % rank
    op = node.op_type
    if op == "MatMul":
        return rank - 1
    if op == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return 0 if trans_b else 1
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    return None


INTEGER_TYPES = {
    ir.DataType.INT64,
    ir.DataType.INT32,
    ir.DataType.INT16,
    ir.DataType.INT8,
    ir.DataType.UINT64,
    ir.DataType.UINT32,
    ir.DataType.UINT16,
    ir.DataType.UINT8,
    ir.DataType.BOOL,
}


def from_integers(value: ir.Value | None) -> bool:
    """Whether ``value`` is integer data (position ids, indices, masks) cast to float, possibly
    through data-movement ops. Such tensors hold exact integers over a wide range (positions 0..n),
    which 8-bit steps would destroy — rotary embeddings' ``positions × inv_freq`` MatMul is the case."""
    seen = 0
    while value is not None and seen < 16:
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Cast":
            source = node.inputs[0]
            if source is not None and source.dtype in INTEGER_TYPES:
                return True
        elif node.op_type not in DATA_MOVEMENT_OPS:
            return False
        value = node.inputs[0]
        seen += 1
    return False


def _unsigned(dtype: str) -> str:
    """The unsigned type of the same width (``int8`` → ``uint8``)."""
    return dtype if dtype.startswith("u") else "u" + dtype


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    return value.const_value if value is not None and value.is_initializer() else None


class Planner:
    """Builds a :class:`QuantPlan` for a model under a config (see the module docstring)."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.rules = RULES[config.target]

    def _excluded(self, node: ir.Node) -> str | None:
        cfg = self.config
        if cfg.op_types is not None and node.op_type not in cfg.op_types:
            return "op type not in config.op_types"
        if node.op_type in cfg.exclude_op_types:
            return "op type excluded by config"
        if any(fnmatch.fnmatchcase(node.name or "", pat) for pat in cfg.exclude_nodes):
            return "excluded by name"
        if cfg.exclude_if is not None and cfg.exclude_if(node):
            return "excluded by predicate"
        return None

    def _act_spec(self, name: str) -> QuantSpec | None:
        return self.config.overrides.get(name, self.config.activations)

    def plan(self, model: ir.Model) -> QuantPlan:
        """The plan of the main graph and, unless the target quantizes every op, of each If/Loop/Scan
        body (a body's nodes are planned by the same rules, reading outer-scope values as inputs)."""
        plan = self._plan_graph(model.graph)
        if self.rules.every_op:
            for label, body in bodies_of(model.graph):
                body_plan = QuantPlan()
                for node in body:
                    if node.op_type in COMPUTE_OPS:
                        reason = "inside an If/Loop/Scan body (this target quantizes the main graph only)"
                        body_plan.nodes[node.name or ""] = NodePlan(
                            node.name or "", node.op_type, False, reason
                        )
                plan.bodies.append(BodyPlan(body, label, body_plan))
            return plan
        plan.bodies = [
            BodyPlan(body, label, self._plan_graph(body)) for label, body in bodies_of(model.graph)
        ]
        return plan

    def _plan_graph(self, graph: ir.Graph) -> QuantPlan:
        plan = QuantPlan()
        exclusive: set[str] = set()  # tensors whose producer feeds only a Q
        for node in graph:  # graph iteration is topological for valid models
            name = node.name or ""
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                plan.nodes[name] = NodePlan(name, op, False, f"custom-domain op ({node.domain})")
                continue
            if op in QUANTIZED_OPS:
                continue
            if self.rules.every_op:
                reason = self._excluded(node)
                if reason is None:
                    reason = self._plan_every_op(plan, node)
                plan.nodes[name] = NodePlan(name, op, reason is None, reason or "")
                continue
            rules = self.rules
            handled = (
                op in COMPUTE_OPS or op in rules.islands or (rules.data_movement and op in DATA_MOVEMENT_OPS)
            )
            if not handled:
                plan.nodes[name] = NodePlan(name, op, False, "")
                continue
            reason = self._excluded(node)
            if reason is None and op in COMPUTE_OPS:
                reason = self._plan_compute(plan, node, exclusive)
            elif reason is None and op in rules.islands:
                reason = self._plan_island(plan, node, exclusive)
            elif reason is None:
                reason = self._plan_data_movement(plan, node, exclusive)
            if op in DATA_MOVEMENT_OPS and reason == "input not quantized":
                reason = ""  # a float data-movement op is unremarkable
            plan.nodes[name] = NodePlan(name, op, reason is None, reason or "")
        return plan

    # --- rules -----------------------------------------------------------------------------------
    def _add_activation(self, plan: QuantPlan, value: ir.Value, node: ir.Node, index: int) -> bool:
        spec = self._act_spec(value.name)
        if spec is None:
            return False
        tensor = plan.activations.get(value.name)
        if tensor is None:
            tensor = plan.activations[value.name] = TensorPlan(value.name, spec, "activation")
        tensor.consumers.append((node.name or "", index))
        return True

    def _add_weight(
        self, plan: QuantPlan, value: ir.Value, node: ir.Node, index: int, spec: QuantSpec
    ) -> None:
        const = value.const_value
        rank = len(const.shape) if const is not None else 0
        axis = weight_axis(node, index, rank, spec)
        key = f"{value.name}|{axis}|{spec.dtype}|{spec.symmetric}"
        tensor = plan.weights.get(key)
        if tensor is None:
            tensor = plan.weights[key] = TensorPlan(value.name, spec, "weight", axis=axis)
        tensor.consumers.append((node.name or "", index))

    def _weight_spec(self, node: ir.Node, spec: QuantSpec) -> QuantSpec:
        if node.op_type in self.rules.per_tensor_weights and not isinstance(spec.granularity, PerTensor):
            return QuantSpec(spec.dtype, spec.symmetric, PerTensor(), spec.calibration)
        return spec

    def _plan_compute(self, plan: QuantPlan, node: ir.Node, exclusive: set[str]) -> str | None:
        inputs = node.inputs
        if len(inputs) < 2 or not all(_is_float(v) for v in inputs[:2]):
            return ""
        data, weight = inputs[0], inputs[1]
        if _constant(data) is not None:
            return "first input is a constant"
        if from_integers(data) or (_constant(weight) is None and from_integers(weight)):
            return "reads integers cast to float (positions, ids): kept exact"
        if self._act_spec(data.name) is None:
            return f"input {data.name} kept float by override"
        w_const = _constant(weight)
        w_spec = self.config.overrides.get(weight.name, self.config.weights)
        if w_spec is None:
            return f"weight {weight.name} kept float by override"
        if w_const is None:
            if node.op_type != "MatMul":
                return "weight is not a constant"
            if not self.config.activation_matmuls:
                return "activation x activation MatMul (attention): float on this target (activation_matmuls)"
            if self._act_spec(weight.name) is None:
                return f"input {weight.name} kept float by override"
        out = node.outputs[0]
        if node.op_type in self.rules.output_quantized and _is_float(out):
            target = out
            users = out.consumers()
            if (
                len(users) == 1
                and users[0].op_type == "Relu"
                and not out.is_graph_output()
                and self._excluded(users[0]) is None
            ):
                target = users[0].outputs[0]
            if target.is_graph_output() or self._act_spec(target.name) is None:
                target = None  # keep model outputs exact; QLinearConv is then not formed
        else:
            target = None
        self._add_activation(plan, data, node, 0)
        if w_const is None:
            self._add_activation(plan, weight, node, 1)
        else:
            self._add_weight(plan, weight, node, 1, self._weight_spec(node, w_spec))
        if target is not None:
            t = plan.activations.setdefault(
                target.name,
                TensorPlan(target.name, self._act_spec(target.name), "activation"),  # type: ignore[arg-type]
            )
            t.exclusive = True
            exclusive.add(target.name)
        return None

    def _plan_island(self, plan: QuantPlan, node: ir.Node, exclusive: set[str]) -> str | None:
        data_inputs = [v for v in node.inputs if v is not None]
        if node.op_type == "Where":
            data_inputs = data_inputs[1:]
        if not data_inputs or not all(_is_float(v) for v in data_inputs):
            return ""
        if not all(v.name in exclusive for v in data_inputs):
            return "inputs not quantized upstream"
        out = node.outputs[0]
        if out.is_graph_output() or self._act_spec(out.name) is None:
            return "output is a model output"
        for index, value in enumerate(node.inputs):
            if value is not None and value.name in exclusive:
                plan.activations[value.name].consumers.append((node.name or "", index))
        t = plan.activations.setdefault(
            out.name, TensorPlan(out.name, self._act_spec(out.name), "activation")
        )  # type: ignore[arg-type]
        t.exclusive = True
        exclusive.add(out.name)
        return None

    def _plan_data_movement(self, plan: QuantPlan, node: ir.Node, exclusive: set[str]) -> str | None:
        if not node.inputs or not _is_float(node.inputs[0]) or len(node.outputs) != 1:
            return "input not quantized"
        data, out = node.inputs[0], node.outputs[0]
        if out.is_graph_output():
            return "input not quantized"
        if node.op_type == "Gather" and _constant(data) is not None:
            spec = self.config.overrides.get(data.name, self.config.weights)
            if spec is None:
                return f"weight {data.name} kept float by override"
            per_tensor = data.name in self.config.overrides and isinstance(spec.granularity, PerTensor)
            rows = node.attributes.get_int("axis", 0) == 0 and len(data.const_value.shape) == 2  # type: ignore[union-attr]
            if rows and not per_tensor:
                # One scale per row, gathered with the rows (onnxq.passes.gather_rows); the
                # output is float, so what reads it is planned as after any float op.
                self._add_weight(plan, data, node, 0, QuantSpec(spec.dtype, spec.symmetric, PerChannel(0)))
                return None
            spec = QuantSpec(spec.dtype, spec.symmetric, PerTensor())
            self._add_weight(plan, data, node, 0, spec)
            key = f"{data.name}|None|{spec.dtype}|{spec.symmetric}"
            t = plan.activations.setdefault(out.name, TensorPlan(out.name, spec, "inherit", source=key))
            t.exclusive = True
            exclusive.add(out.name)
            return None
        if data.name not in exclusive:
            return "input not quantized"
        source = plan.activations[data.name]
        source.consumers.append((node.name or "", 0))
        t = plan.activations.setdefault(
            out.name, TensorPlan(out.name, source.spec, "inherit", source=data.name)
        )
        t.exclusive = True
        exclusive.add(out.name)
        return None

    # --- every op (QNN-HTP) ----------------------------------------------------------------------
    def _constant_spec(self, node: ir.Node, index: int, value: ir.Value) -> tuple[QuantSpec | None, str]:
        """How a float constant input of ``node`` is quantized under ``every_op``: ``("weight", spec)``
        for weights, ``("bias", None)`` for biases left to QuantizeBias, the activation type with the
        constant's own range otherwise."""
        cfg = self.config
        op = node.op_type
        override = cfg.overrides.get(value.name, cfg.weights)
        if op in COMPUTE_OPS and index == 1:
            return (None if override is None else self._weight_spec(node, override)), "weight"
        if op in ("Conv", "Gemm", "ConvTranspose", "LayerNormalization") and index == 2:
            return None, "bias"
        if op == "LayerNormalization" and index == 1:
            if override is None:
                return None, "weight"
            if value.name in cfg.overrides:
                return QuantSpec(override.dtype, override.symmetric, PerTensor()), "weight"
            return QuantSpec(_unsigned(override.dtype), False, PerTensor()), "weight"
        spec = cfg.overrides.get(value.name, cfg.activations)
        if spec is None:
            return None, "constant"
        return QuantSpec(spec.dtype, spec.symmetric, PerTensor()), "constant"

    def _plan_every_op(self, plan: QuantPlan, node: ir.Node) -> str | None:
        """Every float input through DQ, every float output through Q→DQ (see ``TargetRules``)."""
        skip = PARAMETER_INPUTS.get(node.op_type, set())
        inputs = [(i, v) for i, v in enumerate(node.inputs) if _is_float(v) and i not in skip]
        outputs = [v for v in node.outputs if _is_float(v)]
        if not inputs and not outputs:
            return ""
        op = node.op_type
        constants: list[tuple[int, ir.Value, QuantSpec]] = []
        for index, value in inputs:
            if _constant(value) is not None:
                spec, role = self._constant_spec(node, index, value)
                if spec is None and role != "bias":
                    return f"{role} {value.name} kept float by override"
                if spec is not None:
                    constants.append((index, value, spec))
            elif self._act_spec(value.name) is None:
                return f"input {value.name} kept float by override"
        for value in outputs:
            if self._act_spec(value.name) is None:
                return f"output {value.name} kept float by override"
        for index, value, spec in constants:
            self._add_weight(plan, value, node, index, spec)
        source: str | None = None
        if op in DATA_MOVEMENT_OPS and len(outputs) == 1 and inputs and inputs[0][0] == 0:
            data = inputs[0][1]
            const = _constant(data)
            if const is not None:
                spec, _ = self._constant_spec(node, 0, data)
                source = f"{data.name}|None|{spec.dtype}|{spec.symmetric}"  # type: ignore[union-attr]
            else:
                source = data.name
        for index, value in inputs:
            if _constant(value) is None:
                tensor = plan.activations.get(value.name)
                if tensor is None:
                    spec = self._act_spec(value.name)
                    assert spec is not None
                    tensor = plan.activations[value.name] = TensorPlan(value.name, spec, "activation")
                tensor.exclusive = True
                tensor.consumers.append((node.name or "", index))
        for value in outputs:
            spec = self._act_spec(value.name)
            assert spec is not None
            fixed = self.rules.fixed_outputs.get((op, spec.dtype))
            if value.name in plan.activations:
                continue
            if fixed is not None:
                tensor = TensorPlan(value.name, spec, "fixed", fixed=fixed)
            elif source is not None:
                source_spec = plan.activations[source].spec if source in plan.activations else spec
                tensor = TensorPlan(value.name, source_spec, "inherit", source=source)
            else:
                tensor = TensorPlan(value.name, spec, "activation")
            tensor.exclusive = True
            plan.activations[value.name] = tensor
        return None
