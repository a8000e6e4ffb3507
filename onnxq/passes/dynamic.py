"""Dynamic quantization (``QuantConfig(calibration=Dynamic())``): activations quantized at run time.

No calibration: ``DynamicQuantizeLinear`` computes each activation's uint8 asymmetric per-tensor
scale and zero point from its own min/max on every run. Weights are quantized offline as
``config.weights`` says (default int8 symmetric per output channel). Two forms, by target:

- ``"cpu"`` (:data:`INTEGER`): every planned MatMul/Gemm ``Y = X @ W (+ b)`` becomes ::

      DynamicQuantizeLinear(X) -> X_q, X_scale, X_zp
      MatMulInteger(X_q, W_q, X_zp[, W_zp]) -> Cast(float) -> Mul(., Mul(X_scale, W_scale)) [-> Add(., b)]

  exactly the pattern ONNX Runtime's CPU EP fuses: ``MatMulIntegerToFloatFusion`` turns MatMulInteger
  → Cast → Mul (with the scale product as a ``Mul(X_scale, W_scale)`` node) → Add(constant 1-D bias
  as input 1) into ``MatMulIntegerToFloat``, and ``DynamicQuantizeMatMulFusion`` then folds the
  DynamicQuantizeLinear into ``DynamicQuantizeMatMul`` when its three outputs feed that one node only.
  An activation read by several MatMuls (Q/K/V) is quantized once, by one DynamicQuantizeLinear,
  and they become ``MatMulIntegerToFloat``; one DynamicQuantizeLinear per MatMul would not give
  three ``DynamicQuantizeMatMul`` either, as ORT's common-subexpression elimination merges the
  identical nodes back into one before fusing (``share_quantization=False`` shows it). Gemm becomes the
  same MatMul form (``transB`` folded into the stored weight, ``alpha`` into the weight scale,
  ``beta * C`` into the bias). Per-channel weight scales are a vector along N, which MatMulInteger's
  output Mul broadcasts; symmetric weights omit ``W_zp`` (zero).

  In both forms an embedding table (``Gather`` of a constant 2-D float table along axis 0) is
  stored as integers with one scale per row (the weights' type), and each Gather reads its rows'
  integers and scales (:mod:`onnxq.passes.gather_rows`), as in the static path: the table is most
  of a small transformer's file, and one scale for all its rows costs it 15-30 dB of SQNR.
- ``"openvino"`` (:data:`QDQ`): "dynamic QDQ", standard ONNX only ::

      DynamicQuantizeLinear(X) -> DequantizeLinear(X_q, X_scale, X_zp) --+
      DequantizeLinear(W_q, W_scale, W_zp, axis) ------------------------+--> MatMul [-> Add(., b)]

  OpenVINO's ONNX frontend reads DynamicQuantizeLinear and ORT's OpenVINO EP runs the whole graph
  (``tests/test_dynamic.py`` checks the placement when ``.venv-openvino`` exists); ORT's CPU EP runs
  it too, as float MatMuls on dequantized tensors (no fusion: use ``"cpu"`` there). ``"qnn"`` and
  ``"tensorrt"`` are refused by the config: neither HTP nor TensorRT's ONNX parser has
  DynamicQuantizeLinear, so every one would split the graph into runtime fallbacks.

What stays float, and why (each is a ``float_nodes`` reason in the summary):

- activation × activation MatMuls (attention's Q·Kᵀ and P·V): both sides would need run-time
  quantization and the product no fused kernel (ORT's ``quantize_dynamic`` leaves them float too,
  ``MatMulConstBOnly``); they are small next to the projections and carry the softmax's precision.
- Conv/ConvTranspose: ORT's ``ConvInteger`` is slower than its float Conv (no packed-weight integer
  convolution), so dynamic quantization would slow convolutional models down; quantize those
  statically (``QLinearConv``).
- MatMuls reading attention-mask sentinels (a constant with ``|v| >= 1e9`` within a few producers)
  or integers cast to float (positions): as in the static path, 8-bit steps would destroy them.
- MatMuls with a non-float32 input (DynamicQuantizeLinear reads float32 only) or a weight that is
  not 2-D.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxq.calibrate import CalibrationResult, make_session, session_options
from onnxq.config import DYNAMIC_ACTIVATIONS, PerTensor, QuantConfig, QuantSpec
from onnxq.data import Sample
from onnxq.errors import ConfigError
from onnxq.passes._util import Namer, add_initializer, constant_array, release
from onnxq.passes.cleanup import Cleanup
from onnxq.plan import (
    SENTINEL_MAGNITUDE,
    BodyPlan,
    NodePlan,
    Planner,
    QuantPlan,
    TensorPlan,
    bodies_of,
    from_integers,
)
from onnxq.qmath import channel_range, int_type, quantize, scale_zero_point
from onnxq.segments import SampleFailed, run_sample

Form = Literal["integer", "qdq"]
INTEGER: Form = "integer"
QDQ: Form = "qdq"
FORMS: dict[str, Form] = {"cpu": INTEGER, "openvino": QDQ}

DYNAMIC_OPS = ("MatMul", "Gemm")
CONV_OPS = ("Conv", "ConvTranspose")
CONV_REASON = "dynamic: Conv stays float (ORT's ConvInteger is slower than float Conv); quantize statically"
ATTENTION_REASON = "dynamic: activation x activation MatMul (attention) stays float"
# How far up the producers a MatMul input is searched for mask sentinel constants, and the ops a
# sentinel passes through unchanged in magnitude (a Softmax, normalisation or MatMul absorbs it).
SENTINEL_DEPTH = 6
SENTINEL_CARRIERS = {
    "Add", "Sub", "Mul", "Div", "Neg", "Where", "Min", "Max", "Cast", "Concat", "Expand", "Tile",
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Identity",
}  # fmt: skip


def _holds_sentinel(array: np.ndarray | None) -> bool:
    return (
        array is not None
        and array.dtype.kind == "f"
        and array.size > 0
        and float(np.max(np.abs(array))) >= SENTINEL_MAGNITUDE
    )


def reads_sentinels(value: ir.Value | None, depth: int = SENTINEL_DEPTH) -> bool:
    """Whether ``value`` is computed, within ``depth`` producers, from a constant holding a sentinel
    (``|v| >= SENTINEL_MAGNITUDE``, e.g. an attention mask's ``float32.min``). Without calibration
    there is no range to spot them by, so the graph is read instead."""
    todo, seen = [(value, 0)], set()
    while todo:
        v, d = todo.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        array = constant_array(v)
        if array is not None:
            if _holds_sentinel(array):
                return True
            continue
        node = v.producer()
        if node is None or d >= depth or node.op_type not in SENTINEL_CARRIERS | {"Constant"}:
            continue
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None and attr.value is not None and _holds_sentinel(attr.value.numpy()):
                return True
            continue
        todo.extend((i, d + 1) for i in node.inputs)
    return False


class DynamicPlanner(Planner):
    """Plans which MatMul/Gemm nodes get run-time activation quantization (see the module docstring).

    The plan has the static planner's shape, so the summary and ``onnxq inspect`` read it alike:
    one ``activation`` entry per quantized input (its range is never calibrated), one ``weight`` entry
    per (weight, spec), node decisions with the reason for each node left float.
    """

    def plan(self, model: ir.Model) -> QuantPlan:
        """The main graph's plan, with a plan per If/Loop/Scan body in ``bodies`` (node names are
        unique within a graph, not across a merged decoder's branches)."""
        plan = self._plan_graph(model.graph)
        plan.bodies = [
            BodyPlan(body, label, self._plan_graph(body)) for label, body in bodies_of(model.graph)
        ]
        return plan

    def _plan_graph(self, graph: ir.Graph) -> QuantPlan:
        plan = QuantPlan()
        for node in graph:
            name, op = node.name or "", node.op_type
            if node.domain not in ("", "ai.onnx"):
                plan.nodes[name] = NodePlan(name, op, False, f"custom-domain op ({node.domain})")
                continue
            if op in CONV_OPS:
                reason = self._excluded(node) or CONV_REASON
            elif op in DYNAMIC_OPS:
                reason = self._excluded(node) or self._plan_node(plan, node)
            elif op == "Gather" and _is_table(node.inputs[0]):
                reason = self._excluded(node) or self._plan_table(plan, node)
            else:
                reason = ""
            plan.nodes[name] = NodePlan(name, op, reason is None, reason or "")
        return plan

    def _plan_node(self, plan: QuantPlan, node: ir.Node) -> str | None:
        inputs = node.inputs
        if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
            return ""
        data, weight = inputs[0], inputs[1]
        w_const = weight.const_value if weight.is_initializer() else None
        if data.is_initializer():
            return "first input is a constant"
        if w_const is None:
            return ATTENTION_REASON if node.op_type == "MatMul" else "weight is not a constant"
        if data.dtype != ir.DataType.FLOAT or weight.dtype != ir.DataType.FLOAT:
            return "dynamic: DynamicQuantizeLinear reads float32 only"
        if len(w_const.shape) != 2:
            return "dynamic: weight is not 2-D"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "dynamic: Gemm with transA=1"
        bias = inputs[2] if node.op_type == "Gemm" and len(inputs) > 2 else None
        if bias is not None and not bias.is_initializer() and node.attributes.get_float("beta", 1.0) != 1.0:
            return "dynamic: Gemm with a computed C and beta != 1"
        if from_integers(data):
            return "reads integers cast to float (positions, ids): kept exact"
        if reads_sentinels(data):
            return "reads attention-mask sentinels (|v| >= 1e9): kept float"
        act = self.config.overrides.get(data.name, DYNAMIC_ACTIVATIONS)
        if act is None:
            return f"input {data.name} kept float by override"
        if act != DYNAMIC_ACTIVATIONS:
            raise ConfigError(
                f"override for activation {data.name!r}: Dynamic() quantizes activations to uint8 "
                "asymmetric per tensor at run time; use None (keep float) or drop the override"
            )
        w_spec = self.config.overrides.get(weight.name, self.config.weights)
        if w_spec is None:
            return f"weight {weight.name} kept float by override"
        axis = _column_axis(node, w_spec)
        tensor = plan.activations.setdefault(data.name, TensorPlan(data.name, act, "activation"))
        tensor.consumers.append((node.name or "", 0))
        key = f"{weight.name}|{axis}|{w_spec.dtype}|{w_spec.symmetric}"
        w = plan.weights.setdefault(key, TensorPlan(weight.name, w_spec, "weight", axis=axis))
        w.consumers.append((node.name or "", 1))
        return None

    def _plan_table(self, plan: QuantPlan, node: ir.Node) -> str | None:
        """An embedding table stored as integers, per tensor, gathered before dequantization (as the
        static path does): a quarter of the float table's size, for one DequantizeLinear of the rows
        gathered."""
        table = node.inputs[0]
        spec = self.config.overrides.get(table.name, self.config.weights)  # type: ignore[union-attr]
        if spec is None:
            return f"weight {table.name} kept float by override"  # type: ignore[union-attr]
        spec = QuantSpec(spec.dtype, spec.symmetric, PerTensor())
        key = f"{table.name}|None|{spec.dtype}|{spec.symmetric}"  # type: ignore[union-attr]
        w = plan.weights.setdefault(key, TensorPlan(table.name, spec, "weight"))  # type: ignore[union-attr]
        w.consumers.append((node.name or "", 0))
        return None


def _is_table(value: ir.Value | None) -> bool:
    """A constant float32 2-D table (an embedding)."""
    tensor = value.const_value if value is not None and value.is_initializer() else None
    return tensor is not None and value.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2


def _column_axis(node: ir.Node, spec: QuantSpec) -> int | None:
    """The weight's output-channel axis in its stored layout (None: per tensor). MatMulInteger can
    only scale its output per column, so per-channel weights must be per output channel."""
    if isinstance(spec.granularity, PerTensor):
        return None
    column = 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
    axis = spec.granularity.axis
    if axis is not None and axis % 2 != column:
        raise ConfigError(
            f"{node.op_type} {node.name!r}: dynamic quantization scales weights per output channel "
            f"only (axis {column} here); use PerChannel() or PerTensor() for the weights"
        )
    return column


def dynamic_references(model: ir.Model, samples: Iterable[Sample], keep: int) -> CalibrationResult:
    """What the static path's calibration hands the fidelity check, without any calibration: the
    first ``keep`` samples and the fp32 model's outputs on them. Every sample is read (and so
    validated); ``ranges`` is empty (activation ranges are measured at run time)."""
    kept: list[Sample] = []
    seen = 0
    for sample in samples:
        seen += 1
        if len(kept) < keep:
            kept.append(sample)
    outputs: list[dict[str, np.ndarray]] = []
    if kept:
        session = make_session(model, session_options())
        names = [o.name for o in session.get_outputs()]
        try:
            for index, sample in enumerate(kept):
                outputs.append(dict(zip(names, run_sample(session, names, sample, index), strict=True)))
        except SampleFailed as exc:  # ORT's own errors (wrong shapes, values out of range)
            raise exc.calibration_error() from None
    return CalibrationResult({}, seen, kept_inputs=kept, kept_outputs=outputs)


def dynamic_passes(plan: QuantPlan, config: QuantConfig) -> ir.passes.PassManager:
    """The rewrite of a dynamic plan: the target's form, then clean-up (unused values, sorting)."""
    return ir.passes.PassManager(
        [DynamicQuantize(plan, FORMS[config.target]), Cleanup(drop_data_movement=False)]
    )


class DynamicQuantize(ir.passes.InPlacePass):
    """Rewrite every planned MatMul/Gemm into the target's dynamic form (see the module docstring).

    Guarantees: the float function is unchanged up to 8-bit rounding; model inputs and outputs keep
    their names; weights are stored as integers (a weight shared by several nodes with the same spec
    is stored once) and a float weight nothing else reads is dropped.
    """

    def __init__(self, plan: QuantPlan, form: Form = INTEGER, share_quantization: bool = True) -> None:
        super().__init__()
        self.plan = plan
        self.form = form
        self.share = share_quantization

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        namer = Namer(model.graph)
        plans = {id(model.graph): self.plan, **{id(b.graph): b.plan for b in self.plan.bodies}}
        weights = {
            (graph, node): t
            for graph, p in plans.items()
            for t in p.weights.values()
            for node, _ in t.consumers
        }
        # Per graph: a node inside an If/Loop/Scan body gets its integer weight and its quantized
        # input in that body (ORT's fusions do not resolve outer-scope initializers).
        stored: dict[tuple[int, str, bool, float], tuple[ir.Value, ir.Value, ir.Value | None]] = {}
        shared: dict[tuple[int, str], tuple[ir.Value, ir.Value, ir.Value]] = {}
        modified = False
        nodes = [(g, n) for g in model.graphs() for n in list(g)]
        for graph, node in nodes:
            plan = plans.get(id(graph))
            decision = plan.nodes.get(node.name or "") if plan is not None else None
            wplan = weights.get((id(graph), node.name or ""))
            if decision is None or not decision.quantized or wplan is None:
                continue
            if node.op_type == "Gather":
                self._gather(graph, namer, node, wplan, stored)
                modified = True
                continue
            x, w = node.inputs[0], node.inputs[1]
            trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
            alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
            wkey = (
                id(graph),
                f"{w.name}|{wplan.axis}|{wplan.spec.dtype}|{wplan.spec.symmetric}",
                trans_b,
                alpha,
            )
            if wkey not in stored:
                stored[wkey] = self._store_weight(graph, namer, w, wplan, trans_b, alpha)
            w_q, w_scale, w_zp = stored[wkey]
            bias = self._bias(graph, namer, node)
            new: list[ir.Node] = []
            if self.share and (id(graph), x.name) in shared:
                xq = shared[id(graph), x.name]
            else:
                dql = ir.node(
                    "DynamicQuantizeLinear", [x], name=namer(f"{x.name}_DynamicQuantizeLinear"), num_outputs=3
                )
                for out, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point"), strict=True):
                    out.name = namer(f"{x.name}_{suffix}")
                new.append(dql)
                xq = (dql.outputs[0], dql.outputs[1], dql.outputs[2], dql.outputs[0])
                if self.form == QDQ:
                    dqx = ir.node("DequantizeLinear", xq[:3], name=namer(f"{x.name}_DequantizeLinear"))
                    dqx.outputs[0].name = namer(f"{x.name}_dequantized")
                    new.append(dqx)
                    xq = (*xq[:3], dqx.outputs[0])
                if self.share:
                    shared[id(graph), x.name] = xq
            base = node.name or "MatMul"
            if self.form == INTEGER:
                mmi_inputs = [xq[0], w_q, xq[2]] + ([w_zp] if w_zp is not None else [])
                mmi = ir.node("MatMulInteger", mmi_inputs, name=namer(f"{base}_MatMulInteger"))
                cast = ir.node(
                    "Cast", mmi.outputs, attributes={"to": ir.DataType.FLOAT}, name=namer(f"{base}_Cast")
                )
                scale = ir.node("Mul", [xq[1], w_scale], name=namer(f"{base}_scale_Mul"))
                y = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=namer(f"{base}_Mul"))
                new += [mmi, cast, scale, y]
            else:
                attrs = {"axis": 1} if wplan.axis is not None else {}  # [K, N]: output channels on 1
                w_in = [w_q, w_scale] + ([w_zp] if w_zp is not None else [])
                dqw = ir.node(
                    "DequantizeLinear", w_in, attributes=attrs, name=namer(f"{w.name}_DequantizeLinear")
                )
                y = ir.node("MatMul", [xq[3], dqw.outputs[0]], name=namer(f"{base}_MatMul"))
                new += [dqw, y]
            if bias is not None:
                y = ir.node("Add", [y.outputs[0], bias], name=namer(f"{base}_Add"))
                new.append(y)
            for n in new:
                for out in n.outputs:
                    if not out.name:
                        out.name = namer(f"{n.name}_output")
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], new, [node.outputs[0]], [y.outputs[0]]
            )
            modified = True
        for value in {t.name for p in plans.values() for t in p.weights.values()}:
            for graph in model.graphs():
                init = graph.initializers.get(value)
                if init is not None and not init.uses() and not init.is_graph_output():
                    graph.initializers.pop(value)
        return ir.passes.PassResult(model, modified)

    def _gather(self, graph: ir.Graph, namer: Namer, node: ir.Node, wplan: TensorPlan, stored: dict) -> None:
        """``Gather(table, ids)`` → ``Gather(DequantizeLinear(table_q, axis=0), ids)``: one scale per
        row, which :mod:`onnxq.passes.gather_rows` (in the clean-up) turns into a gather of the
        integer rows and their scales; other tables per tensor, the gathered rows dequantized."""
        table = node.inputs[0]
        axis = node.attributes.get_int("axis", 0)
        rows = axis == 0
        key = (id(graph), f"{table.name}|{0 if rows else None}|{wplan.spec.dtype}|{wplan.spec.symmetric}")
        if key not in stored:
            stored[key] = self._store_weight(
                graph, namer, table, wplan, False, 1.0, zero_point=not rows, axis=0 if rows else None
            )
        q, scale, zp = stored[key]
        if rows:
            dq = ir.node(
                "DequantizeLinear",
                [q, scale, *([zp] if zp is not None else [])],
                attributes={"axis": 0},
                name=namer(f"{node.name}_DequantizeLinear"),
            )
            graph.insert_before(node, dq)
            node.replace_input_with(0, dq.outputs[0])
            return
        gather = ir.node(
            "Gather", [q, node.inputs[1]], attributes={"axis": axis}, name=namer(f"{node.name}_q")
        )
        gather.outputs[0].name = namer(f"{node.outputs[0].name}_quantized")
        dq = ir.node(
            "DequantizeLinear", [gather.outputs[0], scale, zp], name=namer(f"{node.name}_DequantizeLinear")
        )
        ir.convenience.replace_nodes_and_values(graph, node, [node], [gather, dq], node.outputs, dq.outputs)

    @staticmethod
    def _store_weight(
        graph: ir.Graph,
        namer: Namer,
        w: ir.Value,
        wplan: TensorPlan,
        trans_b: bool,
        alpha: float,
        zero_point: bool = False,
        axis: int | str | None = "plan",
    ) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """``w`` as integers with its scale (times ``alpha``) and zero point (None when symmetric and
        zero, unless ``zero_point``); per channel along ``axis`` (``"plan"``: the plan's, i.e. the
        output channel of the ``[K, N]`` weight after ``trans_b``)."""
        array = constant_array(w).astype(np.float32, copy=False)  # type: ignore[union-attr]
        if trans_b:
            array = np.ascontiguousarray(array.T)
        if axis == "plan":
            axis = None if wplan.axis is None else 1  # [K, N] after the transpose
        qtype = int_type(wplan.spec.dtype)
        lo, hi = channel_range(array, axis)
        scale, zp = scale_zero_point(lo, hi, qtype, wplan.spec.symmetric)
        q = quantize(array, scale, zp, axis)
        del array
        release(w)
        base = w.name + ("_transposed" if trans_b else "")
        q_value = add_initializer(graph, namer(f"{base}_quantized"), q)
        scale_value = add_initializer(
            graph, namer(f"{base}_scale"), (scale * np.float32(alpha)).astype(np.float32)
        )
        zp_value = (
            None
            if wplan.spec.symmetric and not np.any(zp) and not zero_point
            else add_initializer(graph, namer(f"{base}_zero_point"), zp)
        )
        return q_value, scale_value, zp_value

    @staticmethod
    def _bias(graph: ir.Graph, namer: Namer, node: ir.Node) -> ir.Value | None:
        """Gemm's ``beta * C`` as a constant for the trailing Add (None: no bias)."""
        if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        c = node.inputs[2]
        beta = node.attributes.get_float("beta", 1.0)
        array = constant_array(c)
        if array is None or beta == 1.0:  # the planner keeps a computed C with beta != 1 float
            return c
        return add_initializer(
            graph, namer(f"{c.name}_scaled"), (array * np.float32(beta)).astype(array.dtype)
        )
