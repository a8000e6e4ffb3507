"""Static QDQ inside If/Loop/Scan bodies, each body by its own plan.

Guarantees: every body with quantized nodes gets the main graph's rewrite — Q/DQ insertion,
integer weights, int32 biases, clean-up — with its own plan and calibrated ranges; names made
inside a body clash with nothing in the model; a weight the body reads from an outer graph is stored
as integers once, in that graph, however many bodies read it (ONNX Runtime fuses the QDQ groups of a
body that read it from there), and the float weight is dropped when nothing reads it any more.
The scales, zero points and biases made for a body live in the main graph too (one initializer for
equal ones, e.g. the scales of a weight both branches of a merged decoder read): ONNX Runtime's
MatMul+Add → Gemm rewrite inside a body mistypes a QuantizeLinear whose zero point is an
initializer of the body and then refuses the model.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.passes._util import OUTER_NAMES, SpillFile, names_in
from onnxq.passes.cleanup import Cleanup
from onnxq.passes.hoist_constants import Digest, move_to_main
from onnxq.passes.insert_qdq import InsertQDQ
from onnxq.passes.prequantize_weights import PrequantizeWeights
from onnxq.passes.quantize_bias import QuantizeBias
from onnxq.plan import RULES, BodyPlan, TargetRules, body_model


class QuantizeBodies(ir.passes.InPlacePass):
    """Apply each body's plan with ranges from ``ranges`` (body graph id → value → range)."""

    def __init__(
        self,
        bodies: list[BodyPlan],
        ranges: dict[int, dict[str, tuple[float, float]]],
        rules: TargetRules = RULES["cpu"],
    ) -> None:
        super().__init__()
        self.bodies = bodies
        self.ranges = ranges
        self.rules = rules
        self.spill: SpillFile | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        prequantize = PrequantizeWeights(self.spill)  # one instance: shared weights stored once
        moved: dict[Digest, ir.Value] = {}
        modified = False
        for body in self.bodies:
            if not body.plan.activations and not body.plan.weights:
                continue
            passes: list[ir.passes.PassBase] = [
                InsertQDQ(body.plan, self.ranges.get(id(body.graph), {})),
                prequantize,
            ]
            if self.rules.quantize_bias:
                passes.append(QuantizeBias(("Conv", "Gemm")))
            passes.append(Cleanup(drop_data_movement=self.rules.drop_data_movement_pairs))
            body.graph.meta[OUTER_NAMES] = names_in(model.graph)
            own = set(body.graph.initializers)
            try:
                ir.passes.PassManager(passes)(body_model(model, body.graph))
            finally:
                del body.graph.meta[OUTER_NAMES]
            made = [v for name, v in body.graph.initializers.items() if name not in own]  # in order
            for value in made:  # scales, zero points, int32 biases; equal ones (a shared weight's) once
                move_to_main(value, body.graph, model.graph, moved)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)  # outer float weights and biases now read by no body
        return ir.passes.PassResult(model, modified)
