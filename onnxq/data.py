"""Calibration data: accept what users have, check it against the model before any work.

Accepted forms of ``calib_data`` (``onnxq quantize --calib`` takes the two path forms):

- an iterable (or generator) of ``{input_name: array}`` dicts, each one sample fed as is;
- a single array, or a list of arrays, for a single-input model (each array one sample);
- a ``.npz`` path: arrays named after the inputs (a single array may stand for the only input).
  Arrays with the inputs' ranks count samples on their first axis, and each sample keeps a batch axis
  of 1 (``a[i:i+1]``); arrays that are all one axis short of the inputs' ranks make the file one
  sample (a batch axis of 1 is added);
- a folder path of ``.npy``/``.npz`` files, read one file at a time in file-name order (plain string
  order: zero-pad numbers), hidden files and other suffixes skipped. Each ``.npy`` is one sample of
  a single-input model; each ``.npz`` follows the ``.npz`` rule above, so a per-sample file saved
  with or without its batch axis is one sample and a file of stacked samples gives all of them.
  Files may differ in shape where the model's axes are dynamic (e.g. sequence length);
- a Hugging Face ``datasets.Dataset`` or ``IterableDataset``: one sample per row from the columns
  named after the inputs (other columns, e.g. labels or raw text, are ignored);
  a ``DatasetDict`` is refused (pick a split). ``datasets`` is never imported by onnxq: a dataset is
  recognised only when its library is already loaded;
- :func:`from_texts` (texts + a tokenizer) and :func:`from_images` (an image folder + a preprocess
  function): re-iterable objects that can also be looped over directly.

Decisions:

- Batch axis: sources that yield one example per item (``.npy`` files, dataset rows, images, the
  unbatched ``.npz`` case) get a leading axis of 1 where the model's input has exactly one axis more;
  plain dicts and arrays are fed exactly as given.
- Dtypes: arrays a user hands over (dicts, lists, files, ``preprocess`` results) are never cast: a
  mismatch is an error naming the ``astype`` that fixes it. Sources that convert data themselves
  (dataset rows, :func:`from_texts`) cast to the input's dtype where nothing is lost (int64 → int32
  with a range check, float64 → float32); a lossy cast (float → int, text) is an error.
- Extra names: samples must hold exactly the model's inputs, except :func:`from_texts`, whose
  batches are reduced to the model's inputs by ``onnxq.quantize`` (a tokenizer returns
  ``token_type_ids`` whether or not the model takes them), and dataset rows, of which only the
  input columns are read. Sources implement :class:`~onnxq.sources.CalibrationSource`: the pipeline
  asks them for ``samples(model_inputs)``.
- ``num_samples`` counts samples as yielded: one per dict, array, ``.npz`` row, file, dataset row,
  image, or batch of :func:`from_texts`. Nothing past the limit is read.
- Validation: every sample, of every form, goes through :func:`check_sample` (names, dtype, rank,
  fixed dimensions, NaN/Inf). ``onnxq.quantize`` checks the source (missing, empty, no usable file) and
  its first sample before any heavy work; later samples are checked as they stream, and a bad one
  stops the run before anything is written.

Samples are streamed: nothing here holds more than one sample (one file, one batch of texts, one
image) at a time, except a single ``.npz`` file, which is read whole; :func:`from_texts` keeps the
list of texts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import CalibrationDataError
from onnxq.sources import (
    CalibrationSource,
    ImageFolder,
    TokenizedTexts,
    dataset_samples,
    folder_samples,
    from_images,
    from_texts,
    is_hf_dataset,
    is_hf_dataset_dict,
    npz_samples,
)

__all__ = [
    "CalibrationSource",
    "ImageFolder",
    "InputSpec",
    "Sample",
    "TokenizedTexts",
    "check_sample",
    "checked_samples",
    "from_images",
    "from_texts",
    "iter_samples",
    "model_inputs",
    "peek_samples",
]

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


def iter_samples(data: Any, inputs: list[InputSpec]) -> Iterator[Sample]:
    """Normalise any accepted form of calibration data into a stream of input dicts (unchecked)."""
    if data is None:
        raise CalibrationDataError(
            "static quantization needs calibration data; pass calib_data, or quantize without data: "
            "QuantConfig(calibration=Dynamic())"
        )
    if isinstance(data, CalibrationSource):
        yield from data.samples(inputs)
        return
    if is_hf_dataset_dict(data):
        raise CalibrationDataError(
            f"calib_data is a DatasetDict with splits {sorted(data)}; pass one split, e.g. ds['train']"
        )
    if is_hf_dataset(data):
        yield from dataset_samples(data, inputs)
        return
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if not path.exists():
            raise CalibrationDataError(f"calibration data {path} does not exist")
        if path.is_dir():
            yield from folder_samples(path, inputs)
            return
        if path.suffix != ".npz":
            raise CalibrationDataError(
                f"calibration data {path} must be a .npz file (np.savez) or a folder of .npy/.npz files"
            )
        yield from npz_samples(path, inputs)
        return
    if isinstance(data, np.ndarray):
        data = [data]
    if isinstance(data, Mapping):
        raise CalibrationDataError(
            "calib_data is a single dict; pass a list of dicts (one per sample) or an iterable"
        )
    if not isinstance(data, Iterable):
        raise CalibrationDataError(
            "calib_data must be an iterable of dicts, arrays, a .npz or folder path, a datasets.Dataset, "
            f"onnxq.data.from_texts(...) or onnxq.data.from_images(...), not {type(data).__name__}"
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
    """Stream of validated samples (at most ``limit``; nothing past it is read); an empty stream is an
    error."""
    count = 0
    for count, sample in enumerate(itertools.islice(iter_samples(data, inputs), limit), start=1):
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
