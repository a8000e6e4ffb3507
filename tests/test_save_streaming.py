"""``save_model`` streams weights to the file: the bytes of ``ir.save``, deterministic, atomic, external
data past the protobuf limit, verification without loading the weights, and bounded memory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq import model_io
from onnxq.model_io import check_model_file, load_model, save_model, write_model_streamed

REPO = Path(__file__).resolve().parents[1]


def _old_save(model: ir.Model, path: Path) -> None:
    """What ``save_model`` did before streaming: file-backed weights copied in, ``ir.save``."""
    model_io._materialize_external(model)
    ir.save(model, path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _odd_model() -> ir.Model:
    """Every kind of initializer: float32 / bfloat16 / odd-sized int4 (PackedTensor and unpacked
    ir.Tensor) / string / small ones, a doc string and metadata on a tensor, an If whose branches
    hold their own initializers, model metadata and a function."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    big_then = numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "then_w")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["y", "then_w"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [32, 48])],
        [big_then],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [32, 48])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g),
        ],
        "main",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [32, 48])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32([1.5]), "tiny")],
        doc_string="main graph",
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], doc_string="odd")
    proto.ir_version = 10
    helper.set_model_props(proto, {"author": "tests"})
    model = ir.from_proto(proto)
    model.graph.initializers["w"].const_value = ir.Tensor(
        w, name="w", doc_string="the weight", metadata_props={"origin": "rng"}
    )

    def add(name: str, tensor: ir.TensorProtocol) -> None:
        model.graph.register_initializer(
            ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        )

    add("bf16", ir.Tensor(rng.standard_normal((40, 33)).astype(ml_dtypes.bfloat16), name="bf16"))
    codes = rng.integers(-8, 8, size=(37, 29)).astype(ml_dtypes.int4)
    add("int4_unpacked", ir.Tensor(codes, dtype=ir.DataType.INT4, name="int4_unpacked"))
    packed = ir.Tensor(codes, dtype=ir.DataType.INT4).tobytes()
    add(
        "int4_packed",
        ir.PackedTensor(
            np.frombuffer(packed, np.uint8), ir.DataType.INT4, shape=ir.Shape([37, 29]), name="int4_packed"
        ),
    )
    add("strings", ir.StringTensor([b"a", b"bc", b"def"], shape=ir.Shape([3]), name="strings"))
    add("empty", ir.Tensor(np.zeros((0, 4), np.float32), name="empty"))
    return model


def _models(model_path) -> dict[str, ir.Model]:
    out = {name: load_model(model_path(name)) for name in ("tiny-bert", "cnn-digits", "tiny-llama")}
    config = onnxq.QuantConfig.weight_only("int4", block_size=32)
    out["tiny-llama-int4"] = onnxq.quantize(model_path("tiny-llama"), config=config, progress=False).model
    out["odd"] = _odd_model()
    return out


def test_bytes_equal_ir_save(model_path, tmp_path) -> None:
    for name, model in _models(model_path).items():
        new, old = tmp_path / f"{name}.new.onnx", tmp_path / f"{name}.old.onnx"
        write_model_streamed(model, new)
        _old_save(model, old)
        assert new.read_bytes() == old.read_bytes(), name
        onnx.checker.check_model(str(new), full_check=True)


def test_packed_int4_weights_are_streamed(model_path, tmp_path) -> None:
    """The weight-only model holds 4-bit weights, and their bytes come through unchanged."""
    model = _models(model_path)["tiny-llama-int4"]
    int4 = {
        v.name: v.const_value.tobytes()
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype == ir.DataType.INT4
    }
    assert int4 and any(len(b) >= model_io.LAZY_THRESHOLD_BYTES for b in int4.values())
    save_model(model, tmp_path / "q.onnx", verify=check_model_file)
    saved = {t.name: t.raw_data for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert {name: saved[name] for name in int4} == int4


def test_deterministic_and_same_as_before(model_path, tmp_path) -> None:
    for i in range(2):
        save_model(load_model(model_path("tiny-bert")), tmp_path / f"{i}.onnx", verify=check_model_file)
    old = tmp_path / "old.onnx"
    _old_save(load_model(model_path("tiny-bert")), old)
    assert _sha(tmp_path / "0.onnx") == _sha(tmp_path / "1.onnx") == _sha(old)


def test_file_backed_weights_released_and_model_unchanged(model_path, tmp_path) -> None:
    src = tmp_path / "in.onnx"
    src.write_bytes(model_path("tiny-bert").read_bytes())
    model = load_model(src)
    before = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    save_model(model, tmp_path / "out.onnx")
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(src) not in maps.read_text()
    after = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    assert before.keys() == after.keys()
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array)


def test_overwriting_the_source_keeps_the_model_valid(model_path, tmp_path) -> None:
    """Saving over the file the weights come from: the model's weights then read the new file."""
    src = tmp_path / "model.onnx"
    src.write_bytes(model_path("tiny-bert").read_bytes())
    model = load_model(src)
    values = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    model.producer_name = "rewritten"  # the new file differs, so old offsets would be wrong
    model.graph.doc_string = "x" * 5000
    save_model(model, src, verify=check_model_file)
    for value in model.graph.initializers.values():
        np.testing.assert_array_equal(value.const_value.numpy(), values[value.name])
    reloaded = load_model(src)
    for value in reloaded.graph.initializers.values():
        np.testing.assert_array_equal(value.const_value.numpy(), values[value.name])


def test_external_data_over_the_limit(model_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT_BYTES", 100_000)
    model = load_model(model_path("tiny-bert"))
    expected = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old")
    save_model(model, out, verify=check_model_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert out.stat().st_size < 100_000 < (tmp_path / "q.onnx.data").stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    offsets = [
        int(e.value)
        for t in proto.graph.initializer
        for e in t.external_data
        if e.key == "offset" and int(next(x.value for x in t.external_data if x.key == "length")) > 2**20
    ]
    assert all(o % 65536 == 0 for o in offsets)
    onnx.checker.check_model(str(out), full_check=True)
    reloaded = load_model(out)
    for value in reloaded.graph.initializers.values():
        np.testing.assert_array_equal(value.const_value.numpy(), expected[value.name])
    # Saved again over itself (its weights read from q.onnx.data, which is replaced): still right.
    save_model(reloaded, out, verify=check_model_file)
    for value in reloaded.graph.initializers.values():
        np.testing.assert_array_equal(value.const_value.numpy(), expected[value.name])
    for value in load_model(out).graph.initializers.values():
        np.testing.assert_array_equal(value.const_value.numpy(), expected[value.name])


def test_failed_verify_writes_nothing(model_path, tmp_path) -> None:
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old")

    def refuse(path: Path) -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        save_model(load_model(model_path("cnn-digits")), out, verify=refuse)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]


def test_check_without_weights(model_path, tmp_path, monkeypatch) -> None:
    """Above the limit the check reads no weights but still catches graph errors and raw_data whose
    size does not match dims and data type."""
    monkeypatch.setattr(model_io, "FULL_CHECK_LIMIT_BYTES", 0)
    good = tmp_path / "good.onnx"
    save_model(load_model(model_path("tiny-bert")), good)
    check_model_file(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]  # the stripped copy is gone

    proto = onnx.load(str(good))
    proto.graph.node[0].input[0] = "nowhere"
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(onnx.checker.ValidationError):
        check_model_file(broken)

    proto = onnx.load(str(good))
    big = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    big.raw_data = big.raw_data[:-4]
    short = tmp_path / "short.onnx"
    onnx.save(proto, str(short))
    with pytest.raises(ValueError, match="raw_data"):
        check_model_file(short)


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from onnxq import model_io
    from onnxq.model_io import check_model_file, load_model, save_model

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    if sys.argv[3] == "external":
        model_io.PROTOBUF_LIMIT_BYTES = 2**20
    model = load_model(src)
    def status(key):
        line = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key)]
        return int(line[0].split()[1]) * 1024

    print(status("VmRSS"))
    save_model(model, out, verify=check_model_file)
    print(status("VmHWM"))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["single", "external"])
def test_saving_file_backed_weights_peaks_well_under_their_total(layout, tmp_path) -> None:
    n_mb, count = 16, 6
    n = n_mb * 2**20
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(n // 4).astype(np.float32), f"w{i}") for i in range(count)
    ]
    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n // 4])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [n // 4]) for i in range(count)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    src = tmp_path / "big.onnx"
    onnx.save(proto, str(src))
    del proto, inits, graph
    out = tmp_path / "out.onnx"
    # The peak is the child's own VmHWM: its ru_maxrss would include this (large) process's RSS,
    # which Linux carries over the fork and exec.
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(out), layout], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    base, peak = map(int, done.stdout.split())
    # 6 × 16 MB of file-backed weights copied in chunks (one file, past FULL_CHECK_LIMIT_BYTES, so
    # checked without them) or tensor by tensor into external data: the save adds a few MB (before
    # streaming, the single file cost about 4 × the total).
    assert peak < base + 3 * n, f"peak {peak / 2**20:.0f} MB, base {base / 2**20:.0f} MB"
    if layout == "single":
        assert out.stat().st_size > model_io.FULL_CHECK_LIMIT_BYTES
    else:
        assert Path(f"{out}.data").stat().st_size >= count * n
    saved = {t.name: t.raw_data for t in onnx.load(str(out)).graph.initializer}
    for tensor in onnx.load(str(src)).graph.initializer:
        assert saved.pop(tensor.name) == tensor.raw_data
