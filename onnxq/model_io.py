"""Reading and writing models without copying their weights around.

``load_model`` reads a single-file ``.onnx`` model without holding its weights in memory: it scans
the protobuf wire format once, parses only the graph structure, and turns every large initializer
into an ``onnx_ir.ExternalTensor`` that points at its bytes inside the original file (memory-mapped
on first use). A 440 MB BERT-base loads in a fraction of a second at a few MB of memory instead of
twice its size. ``save_model`` writes beside the destination and renames, so a reader never sees a
half-written file; it streams the weights into the file one at a time (the bytes ``ir.save`` would
write, without building the model as one protobuf in memory), and ``check_model_file`` verifies a
large saved model without reading its weights.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import ModelLoadError, OutputError

log = logging.getLogger(__name__)

# Initializers whose raw data is at least this large stay in the file and are memory-mapped.
LAZY_THRESHOLD_BYTES = 1024
# save_model(release=True) hands weights of this size or more over to the written file.
RELEASE_BYTES = 2**20
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


def read_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """``path``'s ModelProto without reading its weight bytes: embedded initializers become
    references into ``path`` itself (ONNX Runtime resolves them against the file's folder), and
    external ones stay as they are."""
    return _lazy_model_proto(Path(path))


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
        return _sorted(ir.from_proto(ir.to_proto(model)))
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx_ir wraps tensors without copying; the caller's proto stays intact
        return _sorted(ir.from_proto(copy))
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
    return _sorted(loaded)


def _sorted(model: ir.Model) -> ir.Model:
    """``model`` with its main graph topologically sorted if its nodes are out of order (ONNX Runtime
    runs such graphs, e.g. from its own float16 converter; onnx's checker and the passes need the
    order). A sorted graph keeps its node order."""
    graph = model.graph
    seen = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        if any(v is not None and v.producer() is not None and id(v) not in seen for v in node.inputs):
            log.info("the model's nodes are not in topological order: sorting them")
            graph.sort()
            break
        seen.update(id(o) for o in node.outputs)
    return model


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
    model: ir.Model,
    output: str | os.PathLike,
    verify: Callable[[Path], None] | None = None,
    repoint_from: Sequence[Path] = (),
    release: bool = False,
) -> Path:
    """Write ``model`` to ``output`` atomically and return the path.

    The file is written beside the destination under a temporary name and renamed into place, so
    the destination holds either its old content or the complete new model. Models too large for a
    single protobuf go to ``<output>.data`` beside it (the old model is removed before its data file
    is replaced, so an interrupted save leaves the old pair, no model, or the new pair). Weights still
    referencing another file are copied in. ``verify`` is called on the complete temporary file before
    the rename; if it raises, nothing is written.

    Memory: the weights are never serialized into one in-memory protobuf. A single-file model is
    written by :func:`write_model_streamed` (one weight at a time, file-backed weights copied in
    chunks); external data is written tensor by tensor by ``onnx_ir``. Peak memory is the model
    without its weights plus the largest in-memory weight's byte form (none for file-backed ones).

    The model keeps its tensors, except that: file-backed weights are released (unmapped) once
    written; those backed by a file this save replaces (``output`` itself or its ``.data``) are
    pointed at the same bytes in the new file, and so are those backed by a file in ``repoint_from``
    (a temporary file the caller removes afterwards); file-backed weights of subgraphs (and, for external
    data, those of 256 bytes or less) are copied into memory, as before. With ``release``, every
    file-backed main-graph weight, and every in-memory one of :data:`RELEASE_BYTES` or more, is
    pointed at its bytes in the new file (and its memory freed): the model then reads those weights
    from ``output``, as a model loaded from it would.
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
    replaced = _replaced_tensors(model, [output, folder / data_name, *repoint_from])
    if release:
        replaced = [
            v
            for v in model.graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)
            or (v.const_value is not None and v.const_value.nbytes >= RELEASE_BYTES)
        ]
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=folder) as tmp:
        tmp_model = Path(tmp) / output.name
        try:
            if external:
                placed = _save_external(model, tmp_model, data_name)
                location = data_name
            else:
                _materialize_external(model, subgraphs_only=True)
                placed = write_model_streamed(model, tmp_model)
                location = output.name
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
    _repoint(replaced, placed, location, folder)
    return output


# -- single-file streaming writer -------------------------------------------------------------------

_COPY_CHUNK_BYTES = 4 * 2**20
_TENSOR_NAME = 8


class _Placeholder:
    """Stands in for a weight while the rest of the model is serialized: the tensor's header (name,
    dims, data type, doc string, metadata) with an empty ``raw_data``, filled in when writing."""

    def __init__(self, tensor: ir.TensorProtocol) -> None:
        self.tensor = tensor

    @property
    def name(self) -> str | None:
        return self.tensor.name

    @name.setter
    def name(self, value: str | None) -> None:
        self.tensor.name = value  # as ir.save does on the tensor itself

    @property
    def doc_string(self) -> str | None:
        return getattr(self.tensor, "doc_string", None)

    @property
    def dtype(self) -> ir.DataType:
        return self.tensor.dtype

    @property
    def shape(self) -> ir.Shape:
        return self.tensor.shape

    @property
    def metadata_props(self) -> dict[str, str]:
        return self.tensor.metadata_props

    def tobytes(self) -> bytes:
        return b""

    def __repr__(self) -> str:
        return f"_Placeholder({self.tensor!r})"


def _streams(tensor: ir.TensorProtocol) -> bool:
    """Whether a weight's ``raw_data`` is written straight from the tensor (file-backed ones always:
    serialized as they are they would stay references to the file they came from)."""
    if isinstance(tensor, ir.ExternalTensor):
        return True
    if isinstance(tensor, ir.StringTensor | ir.serde.TensorProtoTensor):
        return False  # string_data / the proto it wraps (already in memory) are serialized as is
    return tensor.nbytes >= LAZY_THRESHOLD_BYTES


class _Raw:
    """A streamed initializer: its serialized header around the ``raw_data`` field."""

    __slots__ = ("after", "before", "length", "value")

    def __init__(self, value: ir.Value, before: bytes, after: bytes, length: int) -> None:
        self.value, self.before, self.after, self.length = value, before, after, length

    def size(self) -> int:
        raw = len(_encode_varint(_TENSOR_RAW_DATA << 3 | 2)) + len(_encode_varint(self.length))
        return len(self.before) + raw + self.length + len(self.after)


def _layout(model: ir.Model) -> tuple[bytes, list[bytes | _Raw], bytes]:
    """``(fields before the graph, the graph's fields, fields after it)`` of ``model``'s ModelProto,
    exactly as ``ir.save`` serializes them, with large weights left as :class:`_Raw` slots."""
    initialized = [v for v in model.graph.initializers.values() if v.const_value is not None]
    streamed = {id(v) for v in initialized if _streams(v.const_value)}
    tensors = {id(v): v.const_value for v in initialized}
    try:
        for value in initialized:
            if id(value) in streamed:
                value.const_value = _Placeholder(value.const_value)
        data = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value in initialized:
            value.const_value = tensors[id(value)]
    buf = memoryview(data)
    head: list[bytes] = []
    tail: list[bytes] = []
    parts: list[bytes | _Raw] = []
    graph_seen = False
    for number, _w, fs, ps, pe in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            (tail if graph_seen else head).append(bytes(buf[fs:pe]))
            continue
        if graph_seen:
            raise ValueError("serialized model has two graph fields")
        graph_seen = True
        pending = iter(initialized)
        for gnum, _gw, gfs, gps, gpe in _fields(buf, ps, pe):
            if gnum != _GRAPH_INITIALIZER:
                parts.append(bytes(buf[gfs:gpe]))
                continue
            value = next(pending)
            if id(value) not in streamed:
                parts.append(bytes(buf[gfs:gpe]))
                continue
            parts.append(_split_raw(buf, gps, gpe, value))
        if next(pending, None) is not None:
            raise ValueError("serialized graph has fewer initializers than the model")
    if streamed and not graph_seen:
        raise ValueError("serialized model has no graph")
    return b"".join(head), parts, b"".join(tail)


def _split_raw(buf: memoryview, start: int, end: int, value: ir.Value) -> _Raw:
    """The placeholder TensorProto at ``buf[start:end]`` cut around its empty ``raw_data`` field."""
    raw = name = None
    for number, _w, fs, ps, pe in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            raw = (fs, pe, pe - ps)
        elif number == _TENSOR_NAME:
            name = bytes(buf[ps:pe]).decode()
    if raw is None or raw[2] != 0 or (name or "") != (value.name or ""):
        raise ValueError(f"serialized initializer {value.name!r} does not match its placeholder")
    return _Raw(value, bytes(buf[start : raw[0]]), bytes(buf[raw[1] : end]), value.const_value.nbytes)


def write_model_streamed(model: ir.Model, path: str | os.PathLike) -> dict[int, tuple[int, int]]:
    """Write ``model`` to ``path`` as one ModelProto without building it in memory.

    Everything but the weights is serialized once by ``onnx_ir`` (with each large weight's
    ``raw_data`` left empty), then the file is written field by field in that same order: the
    graph's length is computed in advance from its parts, and each weight's bytes are copied from
    the tensor (``tofile``, in chunks from the file for ``ExternalTensor``). The bytes are those of
    ``ir.save(model, path)`` with file-backed weights copied in, so identical models give identical
    files. Weights of subgraphs are serialized with the rest (materialize file-backed ones first).

    Returns ``{id(tensor): (offset, length)}``: where each streamed weight's bytes are in the file.
    File-backed weights are released once written.
    """
    head, parts, tail = _layout(model)
    graph_size = sum(len(p) if isinstance(p, bytes) else _field_size(p.size()) for p in parts)
    placed: dict[int, tuple[int, int]] = {}
    with open(path, "wb") as f:
        f.write(head)
        f.write(_encode_varint(_MODEL_GRAPH << 3 | 2) + _encode_varint(graph_size))
        for part in parts:
            if isinstance(part, bytes):
                f.write(part)
                continue
            tensor = part.value.const_value
            f.write(_encode_varint(_GRAPH_INITIALIZER << 3 | 2) + _encode_varint(part.size()))
            f.write(part.before)
            f.write(_encode_varint(_TENSOR_RAW_DATA << 3 | 2) + _encode_varint(part.length))
            start = f.tell()
            _write_raw(tensor, f, part.length)
            written = f.tell() - start
            if written != part.length:
                raise ValueError(
                    f"initializer {part.value.name!r} wrote {written} bytes, expected {part.length}"
                )
            placed[id(tensor)] = (start, part.length)
            f.write(part.after)
        f.write(tail)
    return placed


def _field_size(payload: int, number: int = _GRAPH_INITIALIZER) -> int:
    """Bytes of a length-delimited field ``number`` with ``payload`` bytes."""
    return len(_encode_varint(number << 3 | 2)) + len(_encode_varint(payload)) + payload


def _write_raw(tensor: ir.TensorProtocol, f, length: int) -> None:
    if isinstance(tensor, ir.ExternalTensor):
        # The bytes numpy() would map (offset, nbytes), copied in chunks without mapping the file.
        with open(tensor.path, "rb") as src:
            src.seek(tensor.offset or 0)
            chunk = memoryview(bytearray(min(_COPY_CHUNK_BYTES, max(length, 1))))
            left = length
            while left > 0:
                n = src.readinto(chunk[: min(left, len(chunk))])
                if not n:
                    raise OSError(errno.EIO, f"external data of {tensor.name!r} is truncated")
                f.write(chunk[:n])
                left -= n
        with contextlib.suppress(Exception):
            tensor.release()
    elif hasattr(tensor, "tofile"):
        tensor.tofile(f)
    else:
        f.write(tensor.tobytes())


# -- external data, in-place saves -------------------------------------------------------------------


def _save_external(model: ir.Model, path: Path, data_name: str) -> dict[int, tuple[int, int]]:
    """``ir.save`` with every weight above 256 bytes in ``data_name`` (64 KiB-aligned), written one
    tensor at a time; returns ``{id(tensor): (offset, length)}`` in the data file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= 256:
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=value.name)  # stays inline
    placed: dict[int, tuple[int, int]] = {}

    def record(tensor: ir.TensorProtocol, info) -> None:
        placed[id(tensor)] = (info.offset, tensor.nbytes)

    ir.save(model, path, external_data=data_name, alignment=65536, callback=record)
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                with contextlib.suppress(Exception):
                    value.const_value.release()
    return placed


def _replaced_tensors(model: ir.Model, targets: list[Path]) -> list[ir.Value]:
    """Initializers backed by one of ``targets`` (files this save replaces)."""
    existing = [t for t in targets if t.exists()]
    if not existing:
        return []
    found = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if (
                isinstance(tensor, ir.ExternalTensor)
                and Path(tensor.path).exists()
                and any(os.path.samefile(tensor.path, t) for t in existing)
            ):
                found.append(value)
    return found


def _repoint(values: list[ir.Value], placed: dict[int, tuple[int, int]], location: str, folder: Path) -> None:
    """Point weights whose file was just replaced at their bytes in the new file."""
    for value in values:
        tensor = value.const_value
        if id(tensor) not in placed:
            continue  # materialized before writing
        offset, length = placed[id(tensor)]
        with contextlib.suppress(Exception):
            tensor.release()
        value.const_value = ir.ExternalTensor(
            location,
            offset,
            length,
            tensor.dtype,
            shape=tensor.shape,
            name=value.name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
            base_dir=folder.resolve(),
        )


def _materialize_external(model: ir.Model, subgraphs_only: bool = False) -> None:
    """Replace external tensors by in-memory copies so the saved file stands alone."""
    for graph in model.graphs():
        if subgraphs_only and graph is model.graph:
            continue
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=value.name)
                with contextlib.suppress(Exception):
                    tensor.release()


# -- verification ------------------------------------------------------------------------------------

# Single-file models up to this size are checked whole; larger ones without their weight bytes.
FULL_CHECK_LIMIT_BYTES = 64 * 2**20


def check_model_file(path: str | os.PathLike) -> None:
    """``onnx.checker`` (``full_check=True``: shape inference included) on a saved model, without
    loading large weights into memory. Raises ``onnx.checker.ValidationError`` or ``ValueError``.

    - A ``.onnx`` file of at most :data:`FULL_CHECK_LIMIT_BYTES` (which a model with external data
      is): ``onnx.checker.check_model(path, full_check=True)``, which reads the file whole but not
      the external data.
    - A larger file: its protobuf wire format is walked through a memory map (every field
      and length prefix of the model, the graph and each initializer must be consistent), every
      initializer's ``raw_data`` must have exactly the size its dims and data type give, and the
      full check runs on a copy of the model whose weights of 1 KiB and more are references into
      the file: graph, nodes, attributes, opsets, types and shape inference are checked, the weight
      bytes themselves (which the checker never interprets) are not read.
    """
    path = Path(path)
    if path.stat().st_size <= FULL_CHECK_LIMIT_BYTES:
        onnx.checker.check_model(str(path), full_check=True)
        return
    proto = _lazy_model_proto(path)
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        if entries.get("location") != path.name or tensor.data_type == onnx.TensorProto.STRING:
            continue
        size = 1
        for d in tensor.dims:
            size *= d
        want = -(-size * ir.DataType(tensor.data_type).bitwidth // 8)
        if int(entries["length"]) != want:
            raise ValueError(
                f"initializer {tensor.name!r} has {entries['length']} bytes of raw_data, "
                f"its dims and data type need {want}"
            )
    fd, stripped = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check.onnx", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        del proto
        onnx.checker.check_model(stripped, full_check=True)
    finally:
        os.unlink(stripped)
