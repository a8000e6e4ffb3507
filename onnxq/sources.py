"""Calibration sources beyond in-memory arrays: files, folders, Hugging Face datasets, texts, images.

Every reader here turns its source into ``{input_name: array}`` samples for one model and leaves the
checks to :func:`onnxq.data.check_sample`; the rules each source follows are listed in the docstring
of :mod:`onnxq.data`. Optional libraries (``datasets``, Pillow, a tokenizer's library) are never
imported when onnxq is imported: a dataset is recognised only if ``datasets`` is already loaded,
and Pillow is imported by :func:`from_images` itself.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxq.errors import CalibrationDataError

if TYPE_CHECKING:
    from onnxq.data import InputSpec, Sample

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_PADDING = ("longest", "max_length", "do_not_pad", True, False)
# What numpy raises on a corrupt, truncated or non-numpy file.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class CalibrationSource(abc.ABC):
    """A source that knows how to feed a given model: ``onnxq.quantize`` calls :meth:`samples`."""

    @abc.abstractmethod
    def samples(self, inputs: list[InputSpec]) -> Iterator[Sample]:
        """One ``{input_name: array}`` dict per sample, holding the model's inputs (checked later)."""


# --- shared helpers ---------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fit_rank(value: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``value`` with a leading batch axis of 1 added when it is exactly one axis short of the input's
    rank; otherwise ``value`` unchanged (a remaining mismatch is reported by ``check_sample``)."""
    if spec.shape is not None and value.ndim == len(spec.shape) - 1:
        return value[np.newaxis]
    return value


def cast_to_input(value: Any, spec: InputSpec, what: str, fix: str) -> np.ndarray:
    """``value`` as an array of the input's dtype, cast only where no information is lost (integers
    to integers whose range holds the values, integers or floats to floats, bool to bool). Anything
    else raises :class:`CalibrationDataError` naming ``what`` and ``fix``."""
    array = np.asarray(value)
    if array.dtype == spec.dtype:
        return array
    src, dst = array.dtype, spec.dtype
    castable = (
        (dst.kind in "iu" and src.kind in "biu")
        or (dst.kind == "f" and src.kind in "biuf")
        or (dst.kind == "b" and src.kind == "b")
    )
    if not castable:
        hint = "; it holds text: tokenize it first (onnxq.data.from_texts)" if src.kind in "USO" else ""
        raise CalibrationDataError(f"{what} is {src} but the model input {spec.name!r} is {dst}{hint}; {fix}")
    if dst.kind in "iu" and array.size:
        info = np.iinfo(dst)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise CalibrationDataError(
                f"{what} holds values in [{lo}, {hi}], outside {dst} of the model input {spec.name!r}; {fix}"
            )
    return array.astype(dst)


# --- .npy / .npz files and folders ------------------------------------------------------------------
def max_file_bytes() -> int:
    """The most a single calibration file may unpack to: half the machine's memory, so a file whose
    headers declare huge arrays is refused before anything is allocated."""
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return 8 * 2**30


def _declared_bytes(path: Path) -> int:
    """Bytes the arrays of a ``.npy``/``.npz`` would take, from their headers alone."""

    def header_bytes(f: Any) -> int:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        return int(np.prod(shape, dtype=object)) * dtype.itemsize

    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            f.seek(0)
            return header_bytes(f)
    with zipfile.ZipFile(path) as archive:
        total = 0
        for member in archive.namelist():
            with archive.open(member) as f:
                total += header_bytes(f)
        return total


def _load_arrays(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a ``.npy`` or the arrays of a ``.npz`` (read by content, not by suffix); a file
    declaring more than :func:`max_file_bytes` is refused before anything is allocated."""
    try:
        declared = _declared_bytes(path)
    except _READ_ERRORS as exc:
        raise CalibrationDataError(
            f"cannot read calibration file {path}: {_first_line(exc)}; re-save it with np.save / np.savez"
        ) from None
    limit = max_file_bytes()
    if declared > limit:
        raise CalibrationDataError(
            f"calibration file {path} declares {declared / 2**30:.1f} GiB of arrays, more than the "
            f"{limit / 2**30:.1f} GiB onnxq reads from one file; split it into a folder of smaller .npz files"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except _READ_ERRORS as exc:
        raise CalibrationDataError(
            f"cannot read calibration file {path}: {_first_line(exc)}; re-save it with np.save / np.savez"
        ) from None


def npz_samples(path: Path, inputs: list[InputSpec]) -> Iterator[Sample]:
    """The samples of one ``.npz``: arrays named after the inputs (a single array may stand for the
    only input). Arrays with the inputs' ranks count samples on their first axis (each sample keeps a
    batch axis of 1); arrays all one axis short of them make the whole file one sample."""
    arrays = _load_arrays(path)
    if isinstance(arrays, np.ndarray):
        raise CalibrationDataError(f"calibration file {path} is a .npy, not a .npz; save it with np.savez")
    if not arrays:
        raise CalibrationDataError(f"calibration file {path} holds no arrays")
    specs = {i.name: i for i in inputs}
    if len(arrays) == 1 and len(inputs) == 1 and next(iter(arrays)) not in specs:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    unbatched = all(
        name in specs and specs[name].shape is not None and a.ndim == len(specs[name].shape) - 1
        for name, a in arrays.items()
    )
    if unbatched:
        yield {name: a[np.newaxis] for name, a in arrays.items()}
        return
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(
            f"arrays in {path} have different sample counts {counts}; the first axis must count samples"
        )
    n = next(iter(counts.values()))
    for i in range(n):
        yield {name: a[i : i + 1] for name, a in arrays.items()}


def folder_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files directly in ``folder`` whose suffix (any case) is one of ``suffixes``, hidden files
    skipped, sorted by name."""
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise CalibrationDataError(f"cannot list folder {folder}: {_first_line(exc)}") from None
    wanted = tuple(s.lower() for s in suffixes)
    files = [p for p in entries if p.suffix.lower() in wanted and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: p.name)


def folder_samples(folder: Path, inputs: list[InputSpec]) -> Iterator[Sample]:
    """Samples from the ``.npy``/``.npz`` files in ``folder``, in name order, one file read at a time:
    a ``.npy`` is one sample of a single-input model; a ``.npz`` follows :func:`npz_samples`."""
    files = folder_files(folder, ARRAY_SUFFIXES)
    if not files:
        raise CalibrationDataError(
            f"calibration folder {folder} holds no .npy or .npz files; save one sample per file with "
            "np.save / np.savez (for images use onnxq.data.from_images)"
        )
    npy = [p for p in files if p.suffix.lower() == ".npy"]
    if npy and len(inputs) != 1:
        raise CalibrationDataError(
            f"{npy[0]} is a .npy (one array) but the model has {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)}); save each sample as .npz with arrays named after them"
        )
    for path in files:
        if path.suffix.lower() == ".npz":
            yield from npz_samples(path, inputs)
            continue
        array = _load_arrays(path)
        if isinstance(array, dict):
            raise CalibrationDataError(f"calibration file {path} is a .npz archive; rename it to .npz")
        yield {inputs[0].name: fit_rank(array, inputs[0])}


# --- Hugging Face datasets --------------------------------------------------------------------------
def _datasets_types(*names: str) -> tuple[type, ...]:
    module = sys.modules.get("datasets")  # a user holding a dataset has imported it; onnxq never does
    return tuple(t for t in (getattr(module, n, None) for n in names) if isinstance(t, type))


def is_hf_dataset(obj: Any) -> bool:
    """True for a ``datasets.Dataset`` or ``datasets.IterableDataset``."""
    types = _datasets_types("Dataset", "IterableDataset")
    return bool(types) and isinstance(obj, types)


def is_hf_dataset_dict(obj: Any) -> bool:
    """True for a ``datasets.DatasetDict`` or ``datasets.IterableDatasetDict`` (several splits)."""
    types = _datasets_types("DatasetDict", "IterableDatasetDict")
    return bool(types) and isinstance(obj, types)


def dataset_samples(dataset: Any, inputs: list[InputSpec]) -> Iterator[Sample]:
    """One sample per row of a Hugging Face dataset: the columns named after the inputs (others are
    ignored), as numpy arrays cast to the inputs' dtypes where lossless, with a batch axis of 1 added
    where the input's rank needs it."""
    names = [i.name for i in inputs]
    columns = dataset.column_names
    rename = "add or rename them with ds.rename_column(old, new)"
    if columns is not None:
        missing = [n for n in names if n not in columns]
        if missing:
            raise CalibrationDataError(
                f"the dataset has no column {missing} for the model's inputs; its columns are "
                f"{list(columns)}: {rename}"
            )
        dataset = dataset.select_columns(names)
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise CalibrationDataError("the dataset is empty (0 rows); calibration needs at least one row")
    count = 0
    for count, row in enumerate(dataset.with_format("numpy"), start=1):
        sample = {}
        for spec in inputs:
            if spec.name not in row:
                raise CalibrationDataError(
                    f"dataset row {count - 1} has no column {spec.name!r} for the model's inputs; {rename}"
                )
            fix = f"cast the column with ds.cast_column({spec.name!r}, datasets.Value({spec.dtype.name!r}))"
            value = cast_to_input(row[spec.name], spec, f"dataset row {count - 1}, column {spec.name!r}", fix)
            sample[spec.name] = fit_rank(value, spec)
        yield sample
    if count == 0:
        raise CalibrationDataError("the dataset is empty (0 rows); calibration needs at least one row")


# --- texts ------------------------------------------------------------------------------------------
class TokenizedTexts(CalibrationSource):
    """Texts tokenized batch by batch on every iteration (see :func:`from_texts`); re-iterable."""

    def __init__(
        self,
        tokenizer: Callable[..., Any],
        texts: tuple[str, ...],
        *,
        max_length: int,
        batch_size: int,
        padding: bool | str,
        input_names: tuple[str, ...] | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        self.max_length = max_length
        self.batch_size = batch_size
        self.padding = padding
        self.input_names = input_names

    def __len__(self) -> int:
        """Number of samples (batches) one iteration yields."""
        return math.ceil(len(self.texts) / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"TokenizedTexts({len(self.texts)} texts, batch_size={self.batch_size}, "
            f"max_length={self.max_length}, padding={self.padding!r})"
        )

    def _encode(self, start: int) -> Sample:
        batch = list(self.texts[start : start + self.batch_size])
        padding = self.padding
        if len(batch) == 1 and padding in ("longest", True):
            padding = False  # nothing to pad to; also works for tokenizers without a pad token
        try:
            encoding = self.tokenizer(
                batch, padding=padding, truncation=True, max_length=self.max_length, return_tensors="np"
            )
            sample = {str(k): np.asarray(v) for k, v in dict(encoding).items()}
        except Exception as exc:
            raise CalibrationDataError(
                f"the tokenizer failed on texts {start}..{start + len(batch) - 1}: {_first_line(exc)}; "
                "pass a Hugging Face tokenizer (a callable taking a list of texts)"
            ) from exc
        out: Sample = {}
        for name in self.input_names or tuple(sample):
            if name not in sample:
                raise CalibrationDataError(
                    f"the tokenizer returns {sorted(sample)}, not {name!r}; pass input_names among those"
                )
            value = sample[name]
            if value.dtype.kind not in "biu":
                raise CalibrationDataError(
                    f"the tokenizer returned {value.dtype} for {name!r}, expected integers; "
                    "use a Hugging Face tokenizer"
                )
            out[name] = value.astype(np.int64, copy=False)
        return out

    def __iter__(self) -> Iterator[Sample]:
        """One dict of int64 ``[batch, length]`` arrays per batch: every tokenizer output (or those in
        ``input_names``)."""
        for start in range(0, len(self.texts), self.batch_size):
            yield self._encode(start)

    def samples(self, inputs: list[InputSpec]) -> Iterator[Sample]:
        """The batches reduced to the model's inputs (tokenizer outputs the model does not take are
        dropped), cast to the inputs' integer dtypes."""
        for index, sample in enumerate(self):
            missing = [i.name for i in inputs if i.name not in sample]
            if missing:
                raise CalibrationDataError(
                    f"the tokenizer returns {sorted(sample)} but the model also needs {missing}; "
                    "build those inputs yourself and pass dicts {input_name: array}"
                )
            fix = "pass dicts {input_name: array} with the model's dtypes"
            yield {
                i.name: cast_to_input(sample[i.name], i, f"text batch {index} {i.name!r}", fix)
                for i in inputs
            }


def from_texts(
    tokenizer: Callable[..., Any],
    texts: Sequence[str] | Iterator[str],
    *,
    max_length: int = 128,
    batch_size: int = 1,
    padding: bool | str = "longest",
    input_names: Sequence[str] | None = None,
) -> TokenizedTexts:
    """Calibration data from raw texts, tokenized lazily: a re-iterable object that yields one dict of
    int64 ``[batch_size, length]`` arrays per batch of ``batch_size`` texts, keyed by what the
    tokenizer returns (``input_ids``, ``attention_mask``, ``token_type_ids`` ...).

    ``tokenizer``: a Hugging Face tokenizer (any callable with its call signature). Texts are
    truncated to ``max_length`` tokens. ``padding="longest"`` (default) pads only within a batch, so
    with ``batch_size=1`` every sample keeps its own length (models with dynamic axes calibrate on
    realistic lengths); ``"max_length"`` pads every batch to ``max_length`` (for fixed-shape models);
    ``False`` pads nothing (``batch_size=1`` only). ``input_names`` keeps only those outputs when
    iterating; ``onnxq.quantize`` always keeps just the model's inputs. Bad arguments raise
    :class:`CalibrationDataError` here, before any tokenization.
    """
    if isinstance(texts, str | bytes):
        raise CalibrationDataError("texts is a single string; pass a list of strings")
    if not callable(tokenizer):
        raise CalibrationDataError(
            f"tokenizer must be a callable Hugging Face tokenizer, not {type(tokenizer).__name__}"
        )
    try:
        items = tuple(texts)
    except TypeError:
        raise CalibrationDataError(f"texts must be a list of strings, not {type(texts).__name__}") from None
    if not items:
        raise CalibrationDataError("from_texts got no texts; pass at least one string")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise CalibrationDataError(f"text {i} is {type(text).__name__}, not str; pass a list of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationDataError(f"batch_size must be a positive integer, not {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise CalibrationDataError(f"max_length must be a positive integer, not {max_length!r}")
    if padding not in _PADDING:
        raise CalibrationDataError(f"padding must be one of {list(_PADDING)}, not {padding!r}")
    pads = padding not in (False, "do_not_pad")
    if not pads and batch_size > 1:
        raise CalibrationDataError("batch_size > 1 needs padding; use padding='longest' or batch_size=1")
    if pads and (batch_size > 1 or padding == "max_length") and getattr(tokenizer, "pad_token", "") is None:
        raise CalibrationDataError(
            "the tokenizer has no pad token, needed to pad batches; set tokenizer.pad_token = "
            "tokenizer.eos_token or use batch_size=1"
        )
    names = None
    if input_names is not None:
        if isinstance(input_names, str):
            raise CalibrationDataError("input_names is a single string; pass a list of names")
        names = tuple(str(n) for n in input_names)
    return TokenizedTexts(
        tokenizer, items, max_length=max_length, batch_size=batch_size, padding=padding, input_names=names
    )


# --- images -----------------------------------------------------------------------------------------
class ImageFolder(CalibrationSource):
    """Images of a folder passed through ``preprocess`` on every iteration (see :func:`from_images`)."""

    def __init__(self, folder: Path, files: list[Path], preprocess: Callable[[Any], Any]) -> None:
        self.folder = folder
        self.files = files
        self.preprocess = preprocess

    def __len__(self) -> int:
        """Number of images (samples)."""
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.folder)!r}, {len(self.files)} images)"

    def __iter__(self) -> Iterator[Any]:
        """``preprocess(image)`` for every image, in file-name order (an array or a dict each)."""
        from PIL import Image

        for path in self.files:
            try:
                with Image.open(path) as image:
                    image.load()
                    result = self._preprocess(image, path)
            except (OSError, Image.DecompressionBombError) as exc:
                raise CalibrationDataError(
                    f"cannot read image {path}: {_first_line(exc)}; remove or re-save it"
                ) from None
            yield result

    def _preprocess(self, image: Any, path: Path) -> Any:
        try:
            result = self.preprocess(image)
        except CalibrationDataError:
            raise
        except Exception as exc:
            raise CalibrationDataError(
                f"preprocess failed on {path}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        if result is None:
            raise CalibrationDataError(f"preprocess returned None for {path}; return an array or a dict")
        if isinstance(result, Mapping):
            return {str(k): np.asarray(v) for k, v in result.items()}
        return np.asarray(result)

    def samples(self, inputs: list[InputSpec]) -> Iterator[Sample]:
        """One sample per image: an array feeds a single-input model, a dict is keyed by input names;
        a batch axis of 1 is added where the input's rank needs it."""
        specs = {i.name: i for i in inputs}
        for result in self:
            if isinstance(result, dict):
                yield {k: fit_rank(v, specs[k]) if k in specs else v for k, v in result.items()}
            elif len(inputs) == 1:
                yield {inputs[0].name: fit_rank(result, inputs[0])}
            else:
                raise CalibrationDataError(
                    f"preprocess returned an array but the model has {len(inputs)} inputs "
                    f"({', '.join(specs)}); return a dict {{input_name: array}}"
                )


def from_images(
    folder: str | os.PathLike,
    preprocess: Callable[[Any], Any],
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolder:
    """Calibration data from the image files directly in ``folder`` (extensions matched in any case,
    name order): a re-iterable object yielding ``preprocess(PIL.Image.Image)`` per image. ``preprocess``
    returns an array (single-input models) or a dict ``{input_name: array}`` with the model's dtype;
    a missing leading batch axis is added for the model. Needs Pillow; the folder is listed here, so
    a missing folder, no matching image or missing Pillow raise :class:`CalibrationDataError` now."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise CalibrationDataError(
            "onnxq.data.from_images needs Pillow to read images; install it with pip install pillow"
        ) from None
    if not callable(preprocess):
        raise CalibrationDataError(f"preprocess must be a callable, not {type(preprocess).__name__}")
    if isinstance(extensions, str):
        extensions = (extensions,)
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    path = Path(folder)
    if not path.is_dir():
        raise CalibrationDataError(f"image folder {path} does not exist or is not a folder")
    files = folder_files(path, suffixes)
    if not files:
        raise CalibrationDataError(
            f"image folder {path} holds no {'/'.join(suffixes)} files; check the folder or pass extensions="
        )
    return ImageFolder(path, files, preprocess)
