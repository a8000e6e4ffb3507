"""Weight-only quantization of MatMul, Gemm and Gather weights, one weight at a time.

Guarantees: every 2-D float initializer read only as a MatMul weight (input 1, directly or through
``Transpose(perm=[1, 0])``), a Gemm weight (input 1) or a Gather table (input 0, ``axis=0``) is
replaced by a quantized initializer and the nodes that decode it; the float initializer is dropped.
A weight with any other use, a 3-D weight, or uses that need blocks along different axes is left
float and listed in ``skipped`` with the reason. Weights are read (memory-mapped when file-backed),
quantized and released one at a time, so memory holds about one float weight at once.

What is emitted (``K`` = the reduction axis: MatMul ``[K, N]`` axis 0, Gemm ``transB=1`` axis 1, a
table ``[V, H]`` read by Gather axis 1):

- MatMul / Gemm, ``weight_format="dequantize_linear"``: ``DequantizeLinear(q, scale[, zero_point],
  axis=K, block_size=B)`` (per channel: ``axis`` = the output channel, 1-D scale) feeding the node.
  A weight read through ``Transpose`` is stored transposed, so the DequantizeLinear feeds the MatMul
  directly — the pattern ONNX Runtime fuses into ``MatMulNBits`` (int8/4/2, ``block_size`` a power of
  two >= 16).
- MatMul / Gemm, ``weight_format="matmul_nbits"`` (integer types, power-of-two blocks >= 16):
  ``com.microsoft::MatMulNBits`` with ``accuracy_level=4`` (what ORT's own fusion writes); a Gemm
  with ``alpha=1``, no ``transA`` and a 1-D bias with ``beta=1`` takes the bias as input 5. Anything
  else falls back to the DequantizeLinear form.
- Gather tables: the table is stored as bytes ``[V, H·bits/8]`` (sub-byte values packed, integer
  values as unsigned offsets ``q + 2^(bits-1)``), and each Gather reads only its rows:
  ``Gather(bytes) → Cast → Gather(decode table [256, 8/bits]) → Reshape`` then
  ``DequantizeLinear(axis=-1, block_size=B)`` with the gathered scales (float types: ``Mul``).
  Standard ONNX, and the whole table is never dequantized at run time.
- A table shared with a transposed MatMul (tied embedding / lm_head) is stored once: the lm_head
  reads the same bytes, decoded and transposed (``dequantize_linear``; ORT folds the integer chain
  into a constant at load) or reshaped as ``MatMulNBits``'s ``B`` (``matmul_nbits``).
- :class:`onnxq.config.Codebook` weights: indices (uint4 or uint8) + ``Cast → Gather(codebook) →
  Mul(scale) → Reshape`` into the float weight, for every use.

Readers inside If/Loop/Scan bodies (a merged decoder's two branches): the quantized weight stays in
the graph that owns the float one, stored once however many bodies read it, and the decoding nodes
(``MatMulNBits``, a table's row decoding) go into each body — except for the ``dequantize_linear``
form of MatMul/Gemm weights, whose integers are copied into each body that reads them, because ONNX
Runtime fuses a DequantizeLinear into ``MatMulNBits`` only when its weight is an initializer of the
same graph (``weight_format="matmul_nbits"`` stores such weights once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq import codebook as cb
from onnxq.config import Codebook, PerBlock, PerChannel, QuantSpec
from onnxq.lowbit import WEIGHT_TYPES, WeightType, decode_table, n_blocks, pack, quantize_blocks
from onnxq.passes._util import FLOAT_ROWS, Namer, SpillFile, release

log = logging.getLogger(__name__)

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
NBITS_BITS = (2, 4, 8)


@dataclass
class Uses:
    """How the nodes of a graph read one initializer."""

    matmul: list[ir.Node] = field(default_factory=list)  # MatMul input 1 (weight [K, N])
    gemm: list[ir.Node] = field(default_factory=list)  # Gemm input 1
    gather: list[ir.Node] = field(default_factory=list)  # Gather input 0, axis 0
    transposed: list[tuple[ir.Node, list[ir.Node]]] = field(default_factory=list)  # Transpose → MatMuls
    other: str = ""


def _uses(value: ir.Value) -> Uses:
    uses = Uses()
    for node, index in value.uses():
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        inside = node.graph is not value.graph
        table = op == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0
        transpose = op == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]
        if inside and not ((op in ("MatMul", "Gemm") and index == 1) or table or transpose):
            uses.other = f"read by {op} inside a subgraph (If/Loop/Scan body), which is left float"
        elif op == "MatMul" and index == 1:
            uses.matmul.append(node)
        elif op == "Gemm" and index == 1:
            uses.gemm.append(node)
        elif op == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0:
            uses.gather.append(node)
        elif transpose:
            out = node.outputs[0]
            readers = [n for n, i in out.uses() if n.op_type == "MatMul" and i == 1]
            if out.is_graph_output() or len(readers) != len(out.uses()):
                uses.other = "read by a Transpose whose output is not only MatMul weights"
            uses.transposed.append((node, readers))
        else:
            uses.other = f"also read by {op} (input {index})"
    if value.is_graph_output():
        uses.other = "a model output"
    return uses


def _const(
    graph: ir.Graph, namer: Namer, base: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    """A new initializer; ``dtype`` given for packed sub-byte data (``array`` = the packed bytes)."""
    name = namer(base)
    if dtype is None:
        tensor: ir.TensorProtocol = ir.Tensor(array, name=name)
        shape = array.shape
    else:
        tensor, shape = array, array.shape  # type: ignore[assignment]
    value = ir.Value(name=name, const_value=tensor)
    value.shape = ir.Shape(shape)
    value.dtype = tensor.dtype
    graph.register_initializer(value)
    return value


def _typed(graph: ir.Graph, namer: Namer, base: str, q: np.ndarray, wtype: WeightType) -> ir.Value:
    """An initializer of ``wtype`` holding ``q`` (sub-byte types stored packed)."""
    name = namer(base)
    if wtype.bits < 8:
        tensor: ir.TensorProtocol = ir.PackedTensor(
            pack(q, wtype.bits), wtype.ir_dtype, shape=q.shape, name=name
        )
    else:
        tensor = ir.Tensor(q, dtype=wtype.ir_dtype, name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.shape = ir.Shape(q.shape)
    value.dtype = wtype.ir_dtype
    graph.register_initializer(value)
    return value


class _Builder:
    """Inserts nodes before ``anchor`` (topological order is kept)."""

    def __init__(self, graph: ir.Graph, namer: Namer, anchor: ir.Node) -> None:
        self.graph, self.namer, self.anchor = graph, namer, anchor

    def op(
        self, op_type: str, inputs: list[ir.Value | None], base: str, domain: str = "", **attrs
    ) -> ir.Value:
        node = ir.node(
            op_type,
            inputs,
            attributes=attrs,
            domain=domain,
            name=self.namer(f"{base}/{op_type}"),
            num_outputs=1,
        )
        node.outputs[0].name = self.namer(f"{base}_{op_type.lower()}")
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def ints(self, base: str, values: list[int]) -> ir.Value:
        return _const(self.graph, self.namer, base, np.array(values, np.int64))


def _take_over(graph: ir.Graph, node: ir.Node, out: ir.Value, dtype: ir.DataType) -> None:
    """``out`` replaces ``node``'s only output (keeping its name when it is a model output) and
    ``node`` is removed."""
    old = node.outputs[0]
    out.shape, out.dtype = old.shape, old.dtype or dtype
    name = old.name
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if out.is_graph_output():
        old.name = None
        out.name = name


def _matmul_nbits(
    graph: ir.Graph,
    namer: Namer,
    node: ir.Node,
    weight_inputs: list,
    base: str,
    k: int,
    n: int,
    bits: int,
    block: int,
    dtype: ir.DataType,
) -> None:
    """Replace MatMul ``node`` by ``com.microsoft::MatMulNBits`` over ``weight_inputs`` (packed
    weight, scales, [zero points, [g_idx, bias]]), with ``accuracy_level=4`` as ORT's own fusion.
    The new node goes where ``node`` is (``graph`` or, for a reader inside an If/Loop/Scan body, that
    body); ``weight_inputs`` may live in an outer graph (ORT's kernel pre-packs them from there)."""
    graph = node.graph if node.graph is not None else graph
    out = _Builder(graph, namer, node).op(
        "MatMulNBits",
        [node.inputs[0], *weight_inputs],
        base,
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=4,
    )
    _take_over(graph, node, out, dtype)


def _first_use(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The first node of ``graph`` that is one of ``nodes`` or holds one in its If/Loop/Scan bodies
    (new nodes go before it, so they run before every reader)."""
    wanted = {id(n) for n in nodes}
    for top in graph:
        inner = (
            n
            for attr in top.attributes.values()
            if attr.type == ir.AttributeType.GRAPH
            for n in ir.traversal.RecursiveGraphIterator(attr.as_graph())
        )
        if id(top) in wanted or any(id(n) in wanted for n in inner):
            return top
    raise ValueError(f"none of {[n.name for n in nodes]} is in graph {graph.name}")


class WeightOnlyQuantize(ir.passes.InPlacePass):
    """Replace MatMul/Gemm/Gather weights by ``spec`` weights (see the module docstring)."""

    def __init__(
        self, spec: QuantSpec | Codebook, weight_format: str = "dequantize_linear", exclude=None
    ) -> None:
        super().__init__()
        self.spec = spec
        self.nbits = weight_format == "matmul_nbits"
        self.exclude = exclude or (lambda node: None)
        self.quantized: dict[str, int] = {}  # op type → nodes
        self.readers: dict[str, list[tuple[str, str]]] = {}  # quantized weight → (node, op type) readers
        self.skipped: dict[str, str] = {}  # weight → reason
        self.largest_weight = 0
        # Optional hook (name, w, wtype, axis, block, symmetric) -> (q, scale, zero_point) | None that
        # replaces round-to-nearest for MatMul/Gemm weights (GPTQ: onnxq.gptq).
        self.precomputed = None
        # Optional file the quantized weights are written to as they are made (then held as
        # file-backed tensors): memory holds one weight at a time however big the model.
        self.spill: SpillFile | None = None
        self.dry_run = False  # decide and count only (``onnxq inspect --plan``): nothing is changed

    # --- driver ----------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.namer = Namer(graph)
        modified = False
        for name in list(graph.initializers):
            value = graph.initializers[name]
            self._cache = None
            const = value.const_value
            if const is None or value.dtype not in FLOAT_TYPES or value.meta.get(FLOAT_ROWS):
                continue  # float rows (add_float_channels) stay float by design
            uses = _uses(value)
            readers = [*uses.matmul, *uses.gemm, *uses.gather, *(m for _, ms in uses.transposed for m in ms)]
            if not readers:
                continue
            reason = uses.other or (f"{len(const.shape)}-D weight" if len(const.shape) != 2 else "")
            if not reason:
                reason = next((r for r in map(self.exclude, readers) if r), "")
            if not reason and (uses.matmul or uses.gemm) and (uses.gather or uses.transposed):
                reason = "read both as [K, N] and as [N, K]: blocks would need two layouts"
            if not reason and uses.matmul and any(g.attributes.get_int("transB", 0) for g in uses.gemm):
                reason = "read by MatMul and by Gemm(transB=1): blocks would need two layouts"
            if not reason and not isinstance(self.spec, Codebook) and uses.gather:
                reason = self._table_problem(const.shape[1])
            if reason:
                self.skipped[name] = reason
                continue
            self.largest_weight = max(self.largest_weight, const.nbytes)
            self.readers[name] = [(node.name or "", node.op_type) for node in readers]
            if self.dry_run:
                for node in readers:
                    self.quantized[node.op_type] = self.quantized.get(node.op_type, 0) + 1
                continue
            w = const.numpy()
            before = set(graph.initializers)
            try:
                self._quantize(graph, value, np.asarray(w), uses)
            finally:
                del w
                release(value)
            if self.spill is not None:
                for new in set(graph.initializers) - before:
                    self.spill.take(graph.initializers[new])
            for node in readers:
                self.quantized[node.op_type] = self.quantized.get(node.op_type, 0) + 1
            for t, _ in uses.transposed:
                if not t.outputs[0].uses():
                    (t.graph if t.graph is not None else graph).remove(t, safe=True)
            if not value.uses():
                graph.initializers.pop(name)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _quantize(self, graph: ir.Graph, value: ir.Value, w: np.ndarray, uses: Uses) -> None:
        dtype = value.dtype
        if isinstance(self.spec, Codebook):
            self._codebook(graph, value, w, uses, dtype)
            return
        wtype = WEIGHT_TYPES[self.spec.dtype]
        if uses.gather:
            self._table(graph, value, w, uses, wtype, dtype)
            return
        if uses.transposed:  # stored transposed: the DQ then feeds the MatMul directly
            w = np.ascontiguousarray(w.T)
            for _t, matmuls in uses.transposed:
                uses.matmul.extend(matmuls)
        axis = 1 if uses.gemm and uses.gemm[0].attributes.get_int("transB", 0) else 0
        for node in [*uses.matmul, *uses.gemm]:
            self._matmul(graph, value, w, node, axis, wtype, dtype)

    # --- shared helpers --------------------------------------------------------------------------
    def _block(self, length: int) -> int | None:
        gran = self.spec.granularity  # type: ignore[union-attr]
        if isinstance(gran, PerBlock):
            return gran.size if gran.size < length else None
        if isinstance(gran, PerChannel):
            return None
        raise ValueError("weight-only quantization needs PerBlock(size) or PerChannel() granularity")

    def _table_block(self, cols: int) -> int | None:
        """A table's block: the configured one if it divides the row, else the largest power of two
        below it that does (at least 16), else one scale per row."""
        block = self._block(cols)
        while block is not None and cols % block:
            block = block // 2 if block // 2 >= 16 and not block & (block - 1) else None
        return block

    def _table_problem(self, cols: int) -> str:
        wtype = WEIGHT_TYPES[self.spec.dtype]  # type: ignore[union-attr]
        block = self._table_block(cols)
        bsize = cols if block is None else block
        if cols % bsize or (cols * wtype.bits) % 8:
            return f"table width {cols} is not a whole number of blocks of {bsize}"
        return ""

    def _scale(self, graph: ir.Graph, base: str, scale: np.ndarray, dtype: ir.DataType) -> ir.Value:
        return _const(graph, self.namer, base, scale.astype(dtype.numpy()))

    # --- MatMul / Gemm weights -------------------------------------------------------------------
    def _matmul(
        self,
        graph: ir.Graph,
        value: ir.Value,
        w: np.ndarray,
        node: ir.Node,
        axis: int,
        wtype: WeightType,
        dtype: ir.DataType,
    ) -> None:
        """Quantize ``w`` (blocks along ``axis``) for ``node`` (MatMul, or Gemm) and rewire it."""
        key = (id(w), axis)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            block = self._block(w.shape[axis])
            hook = self.precomputed and self.precomputed(
                value.name, w, wtype, axis, block, wtype.signed or wtype.is_float
            )
            q, scale, zp = hook or quantize_blocks(w, wtype, axis, block, wtype.signed or wtype.is_float)
            self._cache = (key, block, q, scale, zp, {})
        _, block, q, scale, zp, made = self._cache
        home = node.graph if node.graph is not None else graph  # a reader inside an If/Loop/Scan body
        # MatMulNBits reads its packed weight from the graph that owns the float one, once for every
        # body that reads it (ORT pre-packs outer-scope initializers for the kernel too).
        if self.nbits and self._try_nbits(graph, value, node, axis, block, q, scale, zp, wtype, dtype, made):
            return
        # The integer weight, scale and zero point of a DequantizeLinear are initializers of the
        # graph that reads them: ONNX Runtime's DequantizeLinear → MatMulNBits fusion does not find
        # outer-scope ones, so a weight read inside If/Loop/Scan bodies gets a copy per body.
        key = ("dq", id(home))
        if key not in made:
            per_channel = block is None
            q_v = _typed(home, self.namer, f"{value.name}_q", q, wtype)
            s_v = self._scale(home, f"{value.name}_scale", scale.reshape(-1) if per_channel else scale, dtype)
            z_v = None
            if zp is not None:
                z_v = _typed(
                    home, self.namer, f"{value.name}_zp", zp.reshape(-1) if per_channel else zp, wtype
                )
            inputs = [q_v, s_v, z_v] if z_v else [q_v, s_v]
            b = _Builder(home, self.namer, _first_use(home, [node]))
            if per_channel:  # per-axis DQ over the output channel
                made[key] = b.op("DequantizeLinear", inputs, value.name, axis=1 - axis)
            else:
                made[key] = b.op("DequantizeLinear", inputs, value.name, axis=axis, block_size=block)
            made[key].shape, made[key].dtype = ir.Shape(q.shape), dtype
        node.replace_input_with(1, made[key])

    def _try_nbits(
        self, graph, value, node, axis, block, q, scale, zp, wtype: WeightType, dtype, made
    ) -> bool:
        """``com.microsoft::MatMulNBits`` for ``node`` when the type, block and node allow it."""
        k = q.shape[axis]
        bsize = k if block is None else block
        if wtype.is_float or wtype.bits not in NBITS_BITS or bsize < 16 or bsize & (bsize - 1):
            return False
        bias = None
        if node.op_type == "Gemm":
            a = node.attributes
            if a.get_float("alpha", 1.0) != 1.0 or a.get_int("transA", 0):
                return False
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = node.inputs[2]
                if a.get_float("beta", 1.0) != 1.0 or bias.shape is None or len(bias.shape) != 1:
                    return False
        if "nbits" not in made:
            qt = q if axis == 1 else q.T  # [N, K]
            st = scale if axis == 1 else scale.T  # [N, k_blocks]
            n = qt.shape[0]
            nb = n_blocks(k, bsize)
            offset = 1 << (wtype.bits - 1) if wtype.signed else 0
            fields = np.zeros((n, nb * bsize), np.uint8)
            fields[:, :k] = (qt.astype(np.int16) + offset).astype(np.uint8)
            if k < nb * bsize:
                fields[:, k:] = (1 << (wtype.bits - 1)) if zp is None else 0
            blob = bsize * wtype.bits // 8
            packed = pack(fields, wtype.bits).reshape(n, nb, blob)
            inputs = [
                _const(graph, self.namer, f"{value.name}_nbits", packed),
                self._scale(graph, f"{value.name}_scale", np.ascontiguousarray(st).reshape(-1), dtype),
            ]
            if zp is not None:
                zt = zp if axis == 1 else zp.T
                zbytes = [pack(row.astype(np.uint8), wtype.bits) for row in np.asarray(zt).view(np.uint8)]
                inputs.append(_const(graph, self.namer, f"{value.name}_zp", np.stack(zbytes).reshape(-1)))
            made["nbits"] = (inputs, n, k)
        inputs, n, k = made["nbits"]
        ins = list(inputs)
        if bias is not None:
            ins += [None] * (4 - len(ins)) + [bias]
        _matmul_nbits(graph, self.namer, node, ins, node.name or value.name, k, n, wtype.bits, bsize, dtype)
        return True

    # --- Gather tables (and a tied lm_head) ------------------------------------------------------
    def _table(self, graph, value, w, uses: Uses, wtype: WeightType, dtype) -> None:
        rows, cols = w.shape
        block = self._table_block(cols)
        bsize = cols if block is None else block
        table, scale, zp = _table_bytes(w, wtype, block)
        per = 8 // wtype.bits
        lut = decode_table(wtype)  # unsigned offset fields for integer types → add -offset
        if not wtype.is_float:
            lut = (lut if not wtype.signed else _offset_lut(wtype)).astype(
                np.int8 if wtype.signed else np.uint8
            )
        else:
            lut = lut.astype(dtype.numpy())
        t_v = _const(graph, self.namer, f"{value.name}_packed", table)
        s_v = self._scale(graph, f"{value.name}_scale", scale, dtype)
        z_v = (
            None
            if zp is None
            else _const(graph, self.namer, f"{value.name}_zp", np.asarray(zp).view(np.uint8))
        )
        lut_v = _const(graph, self.namer, f"{value.name}_decode", lut.reshape(256, per))
        for node in uses.gather:  # the rows are decoded where the Gather is (a body, maybe)
            home = node.graph if node.graph is not None else graph
            ids = node.inputs[1]
            b = _Builder(home, self.namer, node)
            base = node.name or value.name
            ids_shape = b.op("Shape", [ids], base)

            def shape(*tail: int, b=b, base=base, ids_shape=ids_shape) -> ir.Value:
                return b.op("Concat", [ids_shape, b.ints(f"{base}_tail", list(tail))], base, axis=0)

            g = b.op("Gather", [t_v, ids], base, axis=0)
            vals = b.op("Gather", [lut_v, b.op("Cast", [g], base, to=ir.DataType.INT32)], base, axis=0)
            sg = b.op("Gather", [s_v, ids], base, axis=0)
            if wtype.is_float:
                vals = b.op("Reshape", [vals, shape(cols // bsize, bsize)], base)
                out = b.op("Mul", [vals, b.op("Unsqueeze", [sg, b.ints(f"{base}_axes", [-1])], base)], base)
                out = b.op("Reshape", [out, shape(cols)], base)
            else:
                vals = b.op("Reshape", [vals, shape(cols)], base)
                ins = [vals, sg] + ([b.op("Gather", [z_v, ids], base, axis=0)] if z_v is not None else [])
                out = b.op("DequantizeLinear", ins, base, axis=-1, block_size=bsize)
            _take_over(home, node, out, dtype)
        for t, matmuls in uses.transposed:  # the tied lm_head reads the same bytes
            self._tied(
                graph, value, t, matmuls, t_v, s_v, z_v, lut_v, scale, zp, rows, cols, bsize, wtype, dtype
            )

    def _tied(
        self, graph, value, t, matmuls, t_v, s_v, z_v, lut_v, scale, zp, rows, cols, bsize, wtype, dtype
    ):
        # The lm_head's weight is made from constants only: in ``graph``, before the node that is
        # or holds the Transpose (an If whose branch has it), so ORT folds it at load either way.
        b = _Builder(graph, self.namer, _first_use(graph, [t]))
        base = f"{value.name}_tied"
        if (
            self.nbits
            and not wtype.is_float
            and wtype.bits in NBITS_BITS
            and bsize >= 16
            and not bsize & (bsize - 1)
        ):
            nb = cols // bsize
            packed = b.op(
                "Reshape", [t_v, b.ints(f"{base}_shape", [rows, nb, bsize * wtype.bits // 8])], base
            )
            ins = [packed, self._scale(graph, f"{base}_scale", scale.reshape(-1), dtype)]
            if zp is not None:
                zb = np.stack([pack(row, wtype.bits) for row in np.asarray(zp).view(np.uint8)])
                ins.append(_const(graph, self.namer, f"{base}_zp", zb.reshape(-1)))
            for mm in matmuls:
                _matmul_nbits(
                    graph, self.namer, mm, ins, mm.name or base, cols, rows, wtype.bits, bsize, dtype
                )
            return
        vals = b.op("Gather", [lut_v, b.op("Cast", [t_v], base, to=ir.DataType.INT32)], base, axis=0)
        if wtype.is_float:
            vals = b.op("Reshape", [vals, b.ints(f"{base}_shape", [rows, cols // bsize, bsize])], base)
            s3 = _const(graph, self.namer, f"{base}_scale", scale.reshape(rows, -1, 1).astype(dtype.numpy()))
            vals = b.op("Mul", [vals, s3], base)
            wt = b.op(
                "Transpose",
                [b.op("Reshape", [vals, b.ints(f"{base}_shape", [rows, cols])], base)],
                base,
                perm=[1, 0],
            )
        else:
            vals = b.op("Reshape", [vals, b.ints(f"{base}_shape", [rows, cols])], base)
            vt = b.op("Transpose", [vals], base, perm=[1, 0])
            ins = [vt, self._scale(graph, f"{base}_scale", np.ascontiguousarray(scale.T), dtype)]
            if zp is not None:
                ins.append(
                    _const(
                        graph, self.namer, f"{base}_zp", np.ascontiguousarray(np.asarray(zp).view(np.uint8).T)
                    )
                )
            wt = b.op("DequantizeLinear", ins, base, axis=0, block_size=bsize)
        wt.shape, wt.dtype = ir.Shape([cols, rows]), dtype
        for mm in matmuls:
            mm.replace_input_with(1, wt)

    # --- codebooks -------------------------------------------------------------------------------
    def _codebook(self, graph, value, w, uses: Uses, dtype) -> None:
        spec: Codebook = self.spec  # type: ignore[assignment]
        axis = (
            1
            if (uses.gather or uses.transposed or any(g.attributes.get_int("transB", 0) for g in uses.gemm))
            else 0
        )
        enc = cb.encode(w, spec, axis)
        anchor = _first_use(graph, [n for n, _ in value.uses()])
        b = _Builder(graph, self.namer, anchor)
        base = f"{value.name}_codebook"
        idx_type = ir.DataType.UINT4 if enc.index_bits == 4 else ir.DataType.UINT8
        if enc.index_bits == 4:
            name = self.namer(f"{value.name}_idx")
            tensor = ir.PackedTensor(pack(enc.indices, 4), idx_type, shape=enc.indices.shape, name=name)
            idx = ir.Value(name=name, const_value=tensor)
            idx.shape, idx.dtype = ir.Shape(enc.indices.shape), idx_type
            graph.register_initializer(idx)
        else:
            idx = _const(graph, self.namer, f"{value.name}_idx", enc.indices.astype(np.uint8))
        book = _const(graph, self.namer, f"{value.name}_levels", enc.codebook.astype(dtype.numpy()))
        vals = b.op("Gather", [book, b.op("Cast", [idx], base, to=ir.DataType.INT32)], base, axis=0)
        scale = _const(graph, self.namer, f"{value.name}_scale", enc.scale.astype(dtype.numpy()))
        shape = b.ints(f"{base}_shape", list(w.shape))
        if enc.codebook.ndim == 2:
            out = b.op("Mul", [b.op("Reshape", [vals, shape], base), scale], base)
        else:
            out = b.op("Reshape", [b.op("Mul", [vals, scale], base), shape], base)
        out.shape, out.dtype = ir.Shape(w.shape), dtype
        value.replace_all_uses_with(out)


def _table_bytes(w: np.ndarray, wtype: WeightType, block: int | None):
    """A table ``[V, H]`` quantized along H as bytes ``[V, H·bits/8]`` (integer values as unsigned
    offsets), its scales ``[V, H/B]`` and zero points, computed a slice of rows at a time."""
    rows, cols = w.shape
    table = np.empty((rows, cols * wtype.bits // 8), np.uint8)
    scales, zps = [], []
    step = max(1, (1 << 20) // cols)
    offset = 1 << (wtype.bits - 1) if wtype.signed and not wtype.is_float else 0
    for r in range(0, rows, step):
        q, scale, zp = quantize_blocks(w[r : r + step], wtype, 1, block, wtype.signed or wtype.is_float)
        fields = np.ascontiguousarray(q).view(np.uint8).copy()
        if offset:
            fields += np.uint8(offset)  # two's complement + offset, modulo 256
        table[r : r + step] = pack(fields, wtype.bits).reshape(len(fields), -1)
        scales.append(scale)
        zps.append(zp)
    zp_all = None if zps[0] is None else np.concatenate(zps)
    return table, np.concatenate(scales), zp_all


def _offset_lut(wtype: WeightType) -> np.ndarray:
    """The decode table of unsigned-offset fields (``q + 2^(bits-1)``) back to signed ``q``."""
    unsigned = WEIGHT_TYPES[f"u{wtype.name}"]
    return decode_table(unsigned) - (1 << (wtype.bits - 1))
