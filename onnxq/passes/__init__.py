"""Graph passes, one per module. Each is an ``onnx_ir.passes`` pass that says what it guarantees."""
