"""Calibration data: accept what users have, check it against the model before any work.

Accepted forms: an iterable (or generator) of ``{input_name: array}`` dicts; a single array or a
list of arrays for a single-input model (each array one sample); a ``.npz`` file (arrays named after
the inputs, first axis = samples, or a single array for a single-input model). Samples are streamed:
nothing here holds more than one sample at a time, except an ``.npz`` which numpy maps lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import CalibrationDataError

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input as calibration data must feed it."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that need data (initializers listed as inputs are skipped)."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(
                d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape
            )
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _npz_samples(path: Path, inputs: list[InputSpec]) -> Iterator[Sample]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"cannot read calibration file {path}: {exc}") from None
    with archive:
        names = list(archive.files)
        if not names:
            raise CalibrationDataError(f"calibration file {path} holds no arrays")
        if len(names) == 1 and len(inputs) == 1 and names[0] not in {i.name for i in inputs}:
            arrays = {inputs[0].name: archive[names[0]]}
        else:
            arrays = {name: archive[name] for name in names}
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(
            f"arrays in {path} have different sample counts {counts}; the first axis must count samples"
        )
    n = next(iter(counts.values()))
    for i in range(n):
        yield {name: a[i : i + 1] for name, a in arrays.items()}


def iter_samples(data: Any, inputs: list[InputSpec]) -> Iterator[Sample]:
    """Normalise any accepted form of calibration data into a stream of input dicts (unchecked)."""
    if data is None:
        raise CalibrationDataError("static quantization needs calibration data; pass calib_data")
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if not path.exists():
            raise CalibrationDataError(f"calibration data {path} does not exist")
        if path.suffix != ".npz":
            raise CalibrationDataError(f"calibration data {path} must be a .npz file (np.savez)")
        yield from _npz_samples(path, inputs)
        return
    if isinstance(data, np.ndarray):
        data = [data]
    if isinstance(data, Mapping):
        raise CalibrationDataError(
            "calib_data is a single dict; pass a list of dicts (one per sample) or an iterable"
        )
    if not isinstance(data, Iterable):
        raise CalibrationDataError(
            f"calib_data must be an iterable of dicts, arrays or a .npz path, not {type(data).__name__}"
        )
    for item in data:
        if isinstance(item, Mapping):
            yield {str(k): v for k, v in item.items()}
        elif isinstance(item, np.ndarray | list | tuple) and len(inputs) == 1:
            yield {inputs[0].name: np.asarray(item)}
        elif isinstance(item, np.ndarray):
            raise CalibrationDataError(
                f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                "pass dicts {input_name: array} instead of bare arrays"
            )
        else:
            raise CalibrationDataError(
                f"each calibration sample must be a dict {{input_name: array}}, got {type(item).__name__}"
            )


def check_sample(sample: Sample, inputs: list[InputSpec], index: int) -> Sample:
    """``sample`` checked against the model's inputs; raises :class:`CalibrationDataError` naming the fix."""
    expected = {i.name for i in inputs}
    missing = sorted(expected - set(sample))
    extra = sorted(set(sample) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing inputs {missing}")
        if extra:
            parts.append(f"unknown inputs {extra}")
        raise CalibrationDataError(
            f"calibration sample {index}: {' and '.join(parts)}; the model's inputs are {sorted(expected)}"
        )
    out: Sample = {}
    for spec in inputs:
        value = sample[spec.name]
        if not isinstance(value, np.ndarray):
            value = np.asarray(value)
        if value.dtype != spec.dtype:
            raise CalibrationDataError(
                f"calibration sample {index}: input {spec.name!r} is {value.dtype} but the model expects "
                f"{spec.dtype}; convert it with array.astype(np.{spec.dtype.name})"
            )
        if spec.shape is not None:
            if value.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"calibration sample {index}: input {spec.name!r} has rank {value.ndim} "
                    f"(shape {value.shape}) but the model expects rank {len(spec.shape)} {list(spec.shape)}"
                )
            for axis, (got, want) in enumerate(zip(value.shape, spec.shape, strict=True)):
                if isinstance(want, int) and got != want:
                    raise CalibrationDataError(
                        f"calibration sample {index}: input {spec.name!r} has size {got} on axis {axis} "
                        f"but the model needs {want} (shape {list(spec.shape)})"
                    )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CalibrationDataError(
                f"calibration sample {index}: input {spec.name!r} contains NaN or Inf; clean the data"
            )
        out[spec.name] = value
    return out


def checked_samples(data: Any, inputs: list[InputSpec], limit: int | None = None) -> Iterator[Sample]:
    """Stream of validated samples (at most ``limit``); an empty stream is an error."""
    count = 0
    for count, sample in enumerate(iter_samples(data, inputs), start=1):
        if limit is not None and count > limit:
            count -= 1
            break
        yield check_sample(sample, inputs, count - 1)
    if count == 0:
        raise CalibrationDataError("calibration data is empty; provide at least one sample")


def peek_samples(data: Any, inputs: list[InputSpec], limit: int | None) -> tuple[Sample, Iterator[Sample]]:
    """Validate the first sample up front (before any expensive work) and return it with the rest."""
    stream = checked_samples(data, inputs, limit)
    first = next(stream)

    def chained() -> Iterator[Sample]:
        yield first
        yield from stream

    return first, chained()
