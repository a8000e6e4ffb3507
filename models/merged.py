"""The layout of merged decoder exports: one ``If`` whose two branches are whole decoders.

Decoder exports that merge the first-token (no past) and next-token (with past) graphs into one
file put both graphs in the branches of an ``If`` on a boolean ``use_cache_branch`` input, with the
weights in the main graph, read by both branches. :func:`merge_into_if` gives any model that layout
(both branches compute the model itself), so the tools can check quantization inside subgraphs on
real models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

BRANCH_INPUT = "use_cache_branch"


def branch_feed(feed: dict[str, Any], index: int) -> dict[str, Any]:
    """``feed`` plus the branch flag of a merged model: an even ``index`` runs the then branch, an odd
    one the else branch, so a run over numbered samples sends half through each."""
    return {**feed, BRANCH_INPUT: np.array([index % 2 == 0])}


def merge_into_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its nodes moved into both branches of one ``If`` on a new boolean input
    ``use_cache_branch`` (shape ``[1]``); initializers stay in the main graph, shared; the outputs
    keep their names (the branches' own outputs get a ``/then``/``/else`` suffix)."""
    source = model.graph
    outputs = [o.name for o in source.output]
    produced = {name for node in source.node for name in node.output}
    if not set(outputs) <= produced:
        raise ValueError("every output must be computed by a node to become an output of the If")

    def branch(suffix: str) -> onnx.GraphProto:
        renamed = {name: f"{name}/{suffix}" for name in outputs}
        nodes = []
        for node in source.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for i, name in enumerate(copy.output):
                copy.output[i] = renamed.get(name, name)
            for i, name in enumerate(copy.input):
                copy.input[i] = renamed.get(name, name)
            nodes.append(copy)
        branch_outputs = []
        for out in source.output:
            info = onnx.ValueInfoProto()
            info.CopyFrom(out)
            info.name = renamed[out.name]
            branch_outputs.append(info)
        return helper.make_graph(nodes, suffix, [], branch_outputs)

    merged = helper.make_node(
        "If",
        [BRANCH_INPUT],
        outputs,
        name="merged_decoder",
        then_branch=branch("then"),
        else_branch=branch("else"),
    )
    graph = helper.make_graph(
        [merged],
        source.name,
        [*source.input, helper.make_tensor_value_info(BRANCH_INPUT, TensorProto.BOOL, [1])],
        list(source.output),
        list(source.initializer),
    )
    result = helper.make_model(graph, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result
