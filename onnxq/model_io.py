"""Reading and writing models without copying their weights around.

``load_model`` reads a single-file ``.onnx`` model without holding its weights in memory: it scans
the protobuf wire format once, parses only the graph structure, and turns every large initializer
into an ``onnx_ir.ExternalTensor`` that points at its bytes inside the original file (memory-mapped
on first use). A 440 MB BERT-base loads in a fraction of a second at a few MB of memory instead of
twice its size. ``save_model`` writes beside the destination and renames, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import ModelLoadError, OutputError

log = logging.getLogger(__name__)

# Initializers whose raw data is at least this large stay in the file and are memory-mapped.
LAZY_THRESHOLD_BYTES = 1024
# Protobuf refuses messages of 2 GiB and more: larger outputs go to external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**24

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int):
    """Yield ``(field_number, wire_type, field_start, payload_start, payload_end)`` of one message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos2 = _varint(buf, pos)
            payload = (pos, pos2)
            pos = pos2
        elif wire == 1:
            payload = (pos, pos + 8)
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            payload = (pos, pos + length)
            pos += length
        elif wire == 5:
            payload = (pos, pos + 4)
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")
        yield number, wire, field_start, payload[0], payload[1]


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint((number << 3) | 2) + _encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _length_delimited(
        _TENSOR_EXTERNAL_DATA,
        _length_delimited(1, key.encode()) + _length_delimited(2, value.encode()),
    )


def _strip_initializer(buf: memoryview, start: int, end: int, location: str) -> bytes | None:
    """The TensorProto at ``buf[start:end]`` with its raw data replaced by an external reference into
    the model file itself, or None when it has no large raw data."""
    raw: tuple[int, int] | None = None
    for number, _wire, _fs, ps, pe in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            raw = (ps, pe)
        elif number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None
    if raw is None or raw[1] - raw[0] < LAZY_THRESHOLD_BYTES:
        return None
    parts = [
        bytes(buf[fs:pe])
        for number, _w, fs, _ps, pe in _fields(buf, start, end)
        if number != _TENSOR_RAW_DATA
    ]
    parts.append(_entry("location", location))
    parts.append(_entry("offset", str(raw[0])))
    parts.append(_entry("length", str(raw[1] - raw[0])))
    parts.append(_encode_varint(_TENSOR_DATA_LOCATION << 3) + _encode_varint(1))
    return b"".join(parts)


def _lazy_model_proto(path: Path) -> onnx.ModelProto:
    """Parse ``path`` with every large initializer turned into an external reference to ``path``."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            model_parts: list[bytes] = []
            for number, _w, fs, ps, pe in _fields(buf, 0, len(buf)):
                if number != _MODEL_GRAPH:
                    model_parts.append(bytes(buf[fs:pe]))
                    continue
                graph_parts: list[bytes] = []
                for gnum, _gw, gfs, gps, gpe in _fields(buf, ps, pe):
                    stripped = (
                        _strip_initializer(buf, gps, gpe, path.name) if gnum == _GRAPH_INITIALIZER else None
                    )
                    if stripped is None:
                        graph_parts.append(bytes(buf[gfs:gpe]))
                    else:
                        graph_parts.append(_length_delimited(_GRAPH_INITIALIZER, stripped))
                model_parts.append(_length_delimited(_MODEL_GRAPH, b"".join(graph_parts)))
            data = b"".join(model_parts)
        finally:
            buf.release()
    return onnx.ModelProto.FromString(data)


def model_in_folder(folder: Path) -> Path:
    """The model file of a folder: its ``model.onnx``, else its only ``.onnx`` file that is not an
    onnxq output (``*.quant.onnx``); ``ModelLoadError`` naming the fix otherwise."""
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    candidates = sorted(p for p in folder.glob("*.onnx") if not p.name.endswith(".quant.onnx"))
    if len(candidates) != 1:
        raise ModelLoadError(
            f"{folder} is a folder with {len(candidates)} float .onnx files; pass the model file itself"
        )
    return candidates[0]


def load_model(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """An ``onnx_ir.Model`` for a path, a ``ModelProto`` or an ``onnx_ir.Model``.

    Guarantees: the source is never modified (an ``ir.Model`` argument is copied); weights of a model
    file stay on disk until used; any failure is a :class:`ModelLoadError` that says what is wrong.
    """
    if isinstance(model, ir.Model):
        return ir.from_proto(ir.to_proto(model))
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx_ir wraps tensors without copying; the caller's proto stays intact
        return ir.from_proto(copy)
    if not isinstance(model, str | os.PathLike):
        raise ModelLoadError(
            f"model must be a path, an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}"
        )
    path = Path(model)
    if path.is_dir():
        path = model_in_folder(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model file {path} is not readable; check its permissions")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty; re-export the model")
    try:
        proto = _lazy_model_proto(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a valid ONNX model ({exc}); re-export or re-download it"
        ) from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}); re-export or re-download it"
        ) from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{path} does not contain an ONNX graph; is it really an .onnx model?")
    try:
        loaded = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path} holds an ONNX model onnxq cannot read: {exc}") from None
    ir.external_data.set_base_dir(loaded.graph, path.parent.resolve())
    _check_external_data(loaded, path.parent.resolve())
    return loaded


def _check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Every external tensor must lie inside the model's folder (no absolute path, no ``..``, no
    symlink leaving it), exist, and fit in its file (reading past the end of a mapped file would
    crash the process instead of raising)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            location = Path(str(tensor.location))
            target = (base_dir / location).resolve()
            if location.is_absolute() or not target.is_relative_to(base_dir):
                raise ModelLoadError(
                    f"initializer {value.name!r} points outside the model folder ({location}); "
                    "refusing to read it"
                )
            if not target.exists():
                raise ModelLoadError(
                    f"external data file {location} of initializer {value.name!r} is missing; "
                    "copy it next to the model"
                )
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
            if end > target.stat().st_size:
                raise ModelLoadError(
                    f"initializer {value.name!r} needs bytes {tensor.offset or 0}..{end} of {location}, "
                    f"which has {target.stat().st_size}; the external data file is truncated or not "
                    "this model's"
                )


def save_model(
    model: ir.Model, output: str | os.PathLike, verify: Callable[[Path], None] | None = None
) -> Path:
    """Write ``model`` to ``output`` atomically and return the path.

    The file is written beside the destination under a temporary name and renamed into place, so
    the destination holds either its old content or the complete new model. Models too large for a
    single protobuf go to ``<output>.data`` beside it (the old model is removed before its data file
    is replaced, so an interrupted save leaves the old pair, no model, or the new pair). Weights still
    referencing another file are copied in. ``verify`` is called on the complete temporary file before
    the rename; if it raises, nothing is written.
    """
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another output path")
    total = sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value
    )
    external = total > PROTOBUF_LIMIT_BYTES
    data_name = output.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=folder) as tmp:
        tmp_model = Path(tmp) / output.name
        try:
            if external:
                ir.save(model, tmp_model, external_data=data_name, alignment=65536)
            else:
                _materialize_external(model)
                ir.save(model, tmp_model)
            if verify is not None:
                verify(tmp_model)
            if external:
                # Two files cannot be swapped at once: the old model goes first, so a crash between
                # the renames leaves no model rather than an old one reading the new weights.
                output.unlink(missing_ok=True)
                os.replace(Path(tmp) / data_name, folder / data_name)
            os.replace(tmp_model, output)
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {exc.strerror}") from None
    return output


def _materialize_external(model: ir.Model) -> None:
    """Replace external tensors by in-memory copies so the saved file stands alone."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=value.name)
                with contextlib.suppress(Exception):
                    tensor.release()
