"""Random small, valid ONNX graphs built from the ops onnxq handles, for the fuzzing test.

A graph is grown step by step from one float input, each step appending an op whose inputs are
tensors already in the graph (with their shapes tracked, so every model is valid by construction).
Weights are random initializers or Constant nodes, and are sometimes shared between nodes. The
model is then mutated: opset, float16, a symbolic batch axis, an output that is also consumed
downstream. Everything is drawn from hypothesis strategies, so failures shrink to small graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

UNARY = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Identity", "Softmax", "Erf", "Neg", "Abs"]
MOVE = ["Transpose", "Reshape", "Flatten", "Unsqueeze"]


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)  # tensor name -> shape (tuple of ints)
    consts: list = field(default_factory=list)  # names of weights available for sharing
    count: int = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"


def _weight(draw, g: _Graph, shape: tuple[int, ...], as_constant: bool) -> str:
    """A float weight of ``shape``: an existing one of that shape (shared), an initializer or a
    Constant node."""
    shared = [c for c in g.consts if g.shapes[c] == shape]
    if shared and draw(st.booleans()):
        return draw(st.sampled_from(shared))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 30.0]))
    value = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    name = g.name("w")
    if as_constant:
        g.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
    else:
        g.inits.append(numpy_helper.from_array(value, name))
    g.shapes[name] = shape
    g.consts.append(name)
    return name


def _step(draw, g: _Graph, tensors: list[str]) -> str | None:
    """Append one op reading existing tensors; returns its output (None when the op did not apply)."""
    x = draw(st.sampled_from(tensors))
    shape = g.shapes[x]
    const = draw(st.booleans())
    kind = draw(
        st.sampled_from(
            [
                "MatMul",
                "Gemm",
                "Conv",
                "Add",
                "Mul",
                "Concat",
                "unary",
                "move",
                "Pool",
                "MatMulAct",
                "BatchNormalization",
                "Where",
            ]
        )
    )
    out = g.name(kind)
    if kind == "MatMul":
        n = draw(st.sampled_from([1, 3, 8]))
        w = _weight(draw, g, (shape[-1], n), const)
        g.nodes.append(helper.make_node("MatMul", [x, w], [out]))
        g.shapes[out] = (*shape[:-1], n)
    elif kind == "MatMulAct" and len(shape) >= 2:
        perm = list(range(len(shape)))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        t = g.name("T")
        g.nodes.append(helper.make_node("Transpose", [x], [t], perm=perm))
        g.nodes.append(helper.make_node("MatMul", [x, t], [out]))
        g.shapes[out] = (*shape[:-1], shape[-2])
    elif kind == "Gemm" and len(shape) == 2:
        n = draw(st.sampled_from([1, 4]))
        trans_b = draw(st.integers(0, 1))
        w = _weight(draw, g, (n, shape[1]) if trans_b else (shape[1], n), const)
        inputs = [x, w]
        if draw(st.booleans()):
            inputs.append(_weight(draw, g, (n,), const))
        g.nodes.append(helper.make_node("Gemm", inputs, [out], transB=trans_b))
        g.shapes[out] = (shape[0], n)
    elif kind == "Conv" and len(shape) == 4:
        m = draw(st.sampled_from([1, 2, 4]))
        group = shape[1] if draw(st.booleans()) and m % shape[1] == 0 and m >= shape[1] else 1
        w = _weight(draw, g, (m, shape[1] // group, 3, 3), const)
        inputs = [x, w] + ([_weight(draw, g, (m,), const)] if draw(st.booleans()) else [])
        g.nodes.append(helper.make_node("Conv", inputs, [out], pads=[1, 1, 1, 1], group=group))
        g.shapes[out] = (shape[0], m, shape[2], shape[3])
    elif kind == "BatchNormalization" and len(shape) == 4:
        c = shape[1]
        params = [_weight(draw, g, (c,), const) for _ in range(3)]
        var = g.name("var")
        variance = np.abs(np.random.default_rng(c).standard_normal(c)).astype(np.float32) + 0.5
        g.inits.append(numpy_helper.from_array(variance, var))
        g.shapes[var] = (c,)
        g.nodes.append(helper.make_node("BatchNormalization", [x, *params, var], [out]))
        g.shapes[out] = shape
    elif kind in ("Add", "Mul"):
        same = [t for t in tensors if g.shapes[t] == shape]
        other = draw(st.sampled_from(same)) if draw(st.booleans()) else _weight(draw, g, shape[-1:], const)
        g.nodes.append(helper.make_node(kind, [x, other], [out]))
        g.shapes[out] = shape
    elif kind == "Where":
        cond = g.name("cond")
        g.nodes.append(helper.make_node("Greater", [x, _weight(draw, g, (), True)], [cond]))
        g.nodes.append(helper.make_node("Where", [cond, x, _weight(draw, g, (), const)], [out]))
        g.shapes[out] = shape
    elif kind == "Concat":
        same = [t for t in tensors if g.shapes[t] == shape]
        y = draw(st.sampled_from(same))
        g.nodes.append(helper.make_node("Concat", [x, y], [out], axis=-1))
        g.shapes[out] = (*shape[:-1], 2 * shape[-1])
    elif kind == "unary":
        op = draw(st.sampled_from(UNARY))
        attrs = {"axis": -1} if op == "Softmax" else {}
        g.nodes.append(helper.make_node(op, [x], [out], **attrs))
        g.shapes[out] = shape
    elif kind == "move":
        op = draw(st.sampled_from(MOVE))
        if op == "Transpose":
            g.nodes.append(helper.make_node(op, [x], [out], perm=list(reversed(range(len(shape))))))
            g.shapes[out] = tuple(reversed(shape))
        elif op in ("Reshape", "Flatten") and len(shape) >= 2:
            flat = (shape[0], int(np.prod(shape[1:])))
            if op == "Reshape":
                s = g.name("shape")
                g.inits.append(numpy_helper.from_array(np.array(flat, np.int64), s))
                g.nodes.append(helper.make_node(op, [x, s], [out]))
            else:
                g.nodes.append(helper.make_node(op, [x], [out], axis=1))
            g.shapes[out] = flat
        else:
            axes = g.name("axes")
            g.inits.append(numpy_helper.from_array(np.array([0], np.int64), axes))
            g.nodes.append(helper.make_node("Unsqueeze", [x, axes], [out]))
            g.shapes[out] = (1, *shape)
    elif kind == "Pool" and len(shape) == 4:
        op = draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
        if op.startswith("Global"):
            g.nodes.append(helper.make_node(op, [x], [out]))
            g.shapes[out] = (shape[0], shape[1], 1, 1)
        else:
            g.nodes.append(helper.make_node(op, [x], [out], kernel_shape=[2, 2], pads=[0, 0, 1, 1]))
            g.shapes[out] = shape
    else:
        return None
    return out


@st.composite
def graphs(draw) -> tuple[onnx.ModelProto, np.ndarray]:
    """A valid random model and one input array for it."""
    g = _Graph()
    image = draw(st.booleans())
    shape = (1, draw(st.sampled_from([1, 3])), 6, 6) if image else (1, draw(st.sampled_from([2, 5])), 8)
    g.shapes["x"] = shape
    tensors = ["x"]
    for _ in range(draw(st.integers(1, 8))):
        out = _step(draw, g, tensors)
        if out is not None:
            tensors.append(out)
    outputs = [tensors[-1]]
    if len(tensors) > 2 and draw(st.booleans()):  # an output that is also read downstream
        outputs.append(draw(st.sampled_from(tensors[1:-1])))
    fp16 = draw(st.integers(0, 9)) == 0
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    symbolic = draw(st.booleans())
    dims = ["batch", *shape[1:]] if symbolic else list(shape)
    graph = helper.make_graph(
        g.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", elem, dims)],
        [helper.make_tensor_value_info(o, elem, [None] * len(g.shapes[o])) for o in dict.fromkeys(outputs)],
        g.inits,
    )
    opset = draw(st.sampled_from([13, 17, 19, 21]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 10
    if fp16:
        for init in model.graph.initializer:
            if init.data_type == TensorProto.FLOAT:
                init.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
                )
        for node in model.graph.node:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    half = numpy_helper.to_array(attr.t).astype(np.float16)
                    attr.t.CopyFrom(numpy_helper.from_array(half, attr.t.name))
    if "x" not in outputs and draw(st.integers(0, 4)) == 0:  # in both branches of an If (merged decoders)
        from models.merged import merge_into_if

        model = merge_into_if(model)
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 1.0, 1e4]))
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(
        np.float16 if fp16 else np.float32
    )
    return model, x
