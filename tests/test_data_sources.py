"""Calibration data from folders, Hugging Face datasets, texts and images: end to end through
``onnxq.quantize`` on the tiny recipe models, and one-line errors for every malformed kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import models
import onnxq
from onnxq import CalibrationDataError, QuantConfig
from onnxq.cli import main
from onnxq.data import from_images, from_texts

BERT = "tiny-bert"
CNN = "cnn-digits"
BERT_INPUTS = ["attention_mask", "input_ids", "token_type_ids"]


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(model_path) -> Path:
    return model_path(BERT)


@pytest.fixture(scope="module")
def cnn(model_path) -> Path:
    return model_path(CNN)


@pytest.fixture(scope="module")
def bert_feeds(calib_feeds) -> list[dict[str, np.ndarray]]:
    """Six tiny-bert feeds cut to six different sequence lengths."""
    return [{k: v[:, : 16 - i] for k, v in feed.items()} for i, feed in enumerate(calib_feeds(BERT, 6))]


@pytest.fixture(scope="module")
def digit_images() -> np.ndarray:
    """Six held-out digits, float32 ``[6, 1, 8, 8]`` in the CNN's [-1, 1] scale."""
    _, _, x_test, _ = models.digits.digits_split()
    return x_test[:6].copy()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(models.inputs.vader_sentences()[:10])


@pytest.fixture(scope="module")
def tokenizer():
    """A real BERT-style tokenizer built offline: lower-cased WordLevel over the repository's review
    snippets (ids below tiny-bert's vocabulary of 1000), ``[CLS] ... [SEP]`` template, ``[PAD]`` = 0."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers import models as tok_models

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for t in models.inputs.vader_sentences()[:200] for w in t.lower().split()})[:900]
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _quantize(model, data, tmp_path: Path, name: str = "q.onnx", **config):
    return onnxq.quantize(model, data, config=QuantConfig(**config), output=tmp_path / name, progress=False)


def _same_model_as_list(model, data, reference: list, tmp_path: Path) -> int:
    """Quantize with ``data`` and with the plain list ``reference``; the files must be identical."""
    got = _quantize(model, data, tmp_path, "source.onnx")
    want = _quantize(model, reference, tmp_path, "list.onnx")
    assert got.output_path.read_bytes() == want.output_path.read_bytes()
    assert got.summary.calibration_samples == len(reference)
    return got.summary.calibration_samples


# --- folders of .npy / .npz -------------------------------------------------------------------------
def test_folder_of_npy_for_a_cnn(cnn, digit_images, tmp_path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, image in enumerate(digit_images):
        # with and without the batch axis: both are one sample
        np.save(folder / f"sample_{i:02d}.npy", image[None] if i % 2 else image)
    (folder / "README.txt").write_text("other files are skipped")
    reference = [{"input": image[None]} for image in digit_images]
    _same_model_as_list(cnn, folder, reference, tmp_path)


def test_folder_of_npz_with_different_lengths(bert, bert_feeds, tmp_path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", **bert_feeds[0])  # [1, L]: one sample
    np.savez(folder / "b.npz", **{k: v[0] for k, v in bert_feeds[1].items()})  # [L]: one sample
    np.savez(  # stacked on the first axis, as a single .npz path: two samples
        folder / "c.npz",
        **{k: np.concatenate([bert_feeds[2][k][:, :8], bert_feeds[3][k][:, :8]]) for k in BERT_INPUTS},
    )
    np.savez(folder / "d.npz", **bert_feeds[4])
    reference = [bert_feeds[0], bert_feeds[1]]
    reference += [{k: f[k][:, :8] for k in BERT_INPUTS} for f in bert_feeds[2:4]]
    reference += [bert_feeds[4]]
    _same_model_as_list(bert, str(folder), reference, tmp_path)


def test_folder_respects_num_samples(cnn, digit_images, tmp_path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, image in enumerate(digit_images[:3]):
        np.save(folder / f"{i}.npy", image[None])
    (folder / "9.npy").write_bytes(b"not numpy at all")  # sorted last: never read within the limit
    result = _quantize(cnn, folder, tmp_path, num_samples=3)
    assert result.summary.calibration_samples == 3
    with pytest.raises(CalibrationDataError, match=r"cannot read calibration file .*9\.npy"):
        _quantize(cnn, folder, tmp_path)


# --- Hugging Face datasets --------------------------------------------------------------------------
@pytest.mark.parametrize("iterable", [False, True], ids=["Dataset", "IterableDataset"])
def test_hf_dataset_rows_of_different_lengths(bert, bert_feeds, tmp_path, iterable: bool) -> None:
    datasets = pytest.importorskip("datasets")
    columns = {k: [f[k][0].tolist() for f in bert_feeds] for k in BERT_INPUTS}
    ds = datasets.Dataset.from_dict({**columns, "label": list(range(6)), "text": ["x"] * 6})
    if iterable:
        ds = ds.to_iterable_dataset()
    _same_model_as_list(bert, ds, bert_feeds, tmp_path)


def test_hf_dataset_casts_lossless_and_adds_the_batch_axis(cnn, digit_images, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input": [image.tolist() for image in digit_images]})  # float64 [1,8,8]
    reference = [{"input": image[None]} for image in digit_images]
    _same_model_as_list(cnn, ds, reference, tmp_path)
    assert _quantize(cnn, ds, tmp_path, num_samples=2).summary.calibration_samples == 2


# --- texts ------------------------------------------------------------------------------------------
def test_from_texts_each_sample_its_own_length(bert, tokenizer, texts, tmp_path) -> None:
    data = from_texts(tokenizer, texts)
    first = list(data)
    assert first and len(first) == len(data) == len(texts)
    assert {tuple(s) for s in first} == {("input_ids", "token_type_ids", "attention_mask")}
    assert all(a.dtype == np.int64 and a.shape[0] == 1 for s in first for a in s.values())
    lengths = [s["input_ids"].shape[1] for s in first]
    assert len(set(lengths)) > 3, lengths
    again = list(data)  # re-iterable
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    result = _quantize(bert, data, tmp_path)
    assert result.summary.calibration_samples == len(texts)
    assert result.summary.fidelity[0].cosine > 0.9


def test_from_texts_pads_within_a_batch(bert, tokenizer, texts, tmp_path) -> None:
    data = from_texts(tokenizer, texts, batch_size=4, max_length=24)
    batches = list(data)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # each batch padded to its own longest
    assert all(b["input_ids"].shape[1] <= 24 for b in batches)
    assert any((b["attention_mask"] == 0).any() for b in batches)
    assert all((b["input_ids"][b["attention_mask"] == 0] == 0).all() for b in batches)
    assert _quantize(bert, data, tmp_path).summary.calibration_samples == 3
    assert _quantize(bert, data, tmp_path, num_samples=2).summary.calibration_samples == 2


def test_from_texts_max_length_padding(tokenizer, texts) -> None:
    shapes = {s["input_ids"].shape for s in from_texts(tokenizer, texts, max_length=20, padding="max_length")}
    assert shapes == {(1, 20)}


def test_from_texts_drops_outputs_the_model_does_not_take(bert, tokenizer, texts, tmp_path) -> None:
    def with_extra(batch, **kwargs):
        encoding = dict(tokenizer(batch, **kwargs))
        encoding["special_tokens_mask"] = np.zeros_like(encoding["input_ids"], dtype=np.int32)
        return encoding

    data = from_texts(with_extra, texts[:3])
    assert "special_tokens_mask" in next(iter(data))
    assert _quantize(bert, data, tmp_path).summary.calibration_samples == 3
    only = from_texts(with_extra, texts[:3], input_names=["input_ids", "attention_mask"])
    assert set(next(iter(only))) == {"input_ids", "attention_mask"}


def test_from_texts_with_the_real_minilm_tokenizer(tmp_path) -> None:
    if not models.is_built("minilm-real"):
        pytest.skip("minilm-real is not built (python -m models build minilm-real)")
    transformers = pytest.importorskip("transformers")
    folder = models.model_dir("minilm-real")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = list(models.inputs.vader_sentences()[20:26])
    result = _quantize(folder / "model.onnx", from_texts(tok, texts, batch_size=2), tmp_path)
    assert result.summary.calibration_samples == 3
    assert result.summary.fidelity[0].cosine > 0.95


# --- images -----------------------------------------------------------------------------------------
def _write_digits(folder: Path, images: np.ndarray) -> None:
    """PNG files whose pixel value ``v * 15`` (``v`` in 0..16) decodes back exactly."""
    image_mod = pytest.importorskip("PIL.Image")
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        raw = np.rint((image[0] + 1.0) * 8.0 * 15.0).astype(np.uint8)
        image_mod.fromarray(raw, mode="L").save(folder / f"digit_{i:02d}.png")


def _digit_preprocess(image) -> np.ndarray:
    return (np.asarray(image, np.float32) / 15.0 / 8.0 - 1.0)[None]  # [1, 8, 8]: batch axis added


def test_from_images_for_a_cnn(cnn, digit_images, tmp_path) -> None:
    _write_digits(tmp_path / "images", digit_images)
    (tmp_path / "images" / "notes.txt").write_text("skipped")
    data = from_images(tmp_path / "images", _digit_preprocess)
    assert len(data) == len(digit_images)
    assert next(iter(data)).shape == (1, 8, 8)
    reference = [{"input": image[None]} for image in digit_images]
    _same_model_as_list(cnn, data, reference, tmp_path)
    as_dict = from_images(tmp_path / "images", lambda im: {"input": _digit_preprocess(im)[None]})
    assert _quantize(cnn, as_dict, tmp_path).summary.calibration_samples == len(digit_images)


# --- errors through the API -------------------------------------------------------------------------
def _fails(model, data, tmp_path: Path, match: str) -> str:
    out = tmp_path / "bad.onnx"
    with pytest.raises(CalibrationDataError, match=match) as info:
        onnxq.quantize(model, data, output=out, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists()
    return message


def _npy_folder(tmp_path: Path, *arrays: np.ndarray, name: str = "calib") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, a in enumerate(arrays):
        np.save(folder / f"{i:02d}.npy", a)
    return folder


def test_folder_errors(cnn, bert, bert_feeds, digit_images, tmp_path) -> None:
    good = digit_images[0][None]
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(cnn, empty, tmp_path, r"holds no \.npy or \.npz files; save one sample per file")
    (empty / "a.png").write_bytes(b"")
    _fails(cnn, empty, tmp_path, r"from_images")

    folder = _npy_folder(tmp_path, good)
    (folder / "01.npy").write_bytes(b"\x93NUMPY broken")
    _fails(cnn, folder, tmp_path, r"cannot read calibration file .*01\.npy.*re-save it")
    (folder / "01.npy").unlink()
    (folder / "02.npz").write_bytes(b"PK\x03\x04 truncated zip")
    _fails(cnn, folder, tmp_path, r"cannot read calibration file .*02\.npz")
    (folder / "02.npz").unlink()

    np.save(folder / "03.npy", good.astype(np.float64))
    _fails(cnn, folder, tmp_path, r"calibration sample 1: input 'input' is float64.*astype\(np\.float32\)")
    np.save(folder / "03.npy", good[0, 0])  # [8, 8] for a rank-4 input
    _fails(cnn, folder, tmp_path, r"sample 1: input 'input' has rank 2 .* expects rank 4")
    bad = good.copy()
    bad[0, 0, 1, 1] = np.nan
    np.save(folder / "03.npy", bad)
    _fails(cnn, folder, tmp_path, r"sample 1: input 'input' contains NaN or Inf")

    npy_for_bert = _npy_folder(tmp_path, bert_feeds[0]["input_ids"], name="npy_for_bert")
    _fails(bert, npy_for_bert, tmp_path, r"is a \.npy .* the model has 3 inputs.*save each sample as \.npz")

    missing = tmp_path / "missing"
    missing.mkdir()
    np.savez(missing / "a.npz", **{k: v for k, v in bert_feeds[0].items() if k != "token_type_ids"})
    _fails(bert, missing, tmp_path, r"missing inputs \['token_type_ids'\]")
    extra = tmp_path / "extra"
    extra.mkdir()
    np.savez(extra / "a.npz", **bert_feeds[0], labels=np.zeros((1,), np.int64))
    _fails(bert, extra, tmp_path, r"unknown inputs \['labels'\]")


def test_dataset_errors(bert, cnn, bert_feeds, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    columns = {k: [f[k][0].tolist() for f in bert_feeds] for k in BERT_INPUTS}
    no_types = datasets.Dataset.from_dict({k: v for k, v in columns.items() if k != "token_type_ids"})
    _fails(bert, no_types, tmp_path, r"no column \['token_type_ids'\].*rename_column")
    _fails(bert, no_types.to_iterable_dataset(), tmp_path, r"no column \['token_type_ids'\]")
    _fails(bert, datasets.Dataset.from_dict({k: [] for k in BERT_INPUTS}), tmp_path, r"dataset is empty")
    _fails(bert, datasets.DatasetDict({"train": no_types}), tmp_path, r"DatasetDict .*ds\['train'\]")
    floats = datasets.Dataset.from_dict({**columns, "input_ids": [[0.5] * 4] * 6})
    _fails(bert, floats, tmp_path, r"column 'input_ids' is float(32|64) .*int64; cast the column")
    text = datasets.Dataset.from_dict({**columns, "input_ids": ["hello world"] * 6})
    _fails(bert, text, tmp_path, r"holds text: tokenize it first")
    nan = datasets.Dataset.from_dict({"input": [np.full((1, 8, 8), np.nan).tolist()]})
    _fails(cnn, nan, tmp_path, r"NaN or Inf")
    flat = datasets.Dataset.from_dict({"input": [np.zeros((8, 8)).tolist()]})
    _fails(cnn, flat, tmp_path, r"rank 2 .* expects rank 4")


def test_text_errors(bert, tokenizer, texts, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="no texts"):
        from_texts(tokenizer, [])
    with pytest.raises(CalibrationDataError, match="single string"):
        from_texts(tokenizer, "one text")
    with pytest.raises(CalibrationDataError, match=r"text 1 is int, not str"):
        from_texts(tokenizer, ["a", 3])
    with pytest.raises(CalibrationDataError, match="batch_size must be a positive integer"):
        from_texts(tokenizer, texts, batch_size=0)
    with pytest.raises(CalibrationDataError, match="max_length must be a positive integer"):
        from_texts(tokenizer, texts, max_length=0)
    with pytest.raises(CalibrationDataError, match="needs padding"):
        from_texts(tokenizer, texts, batch_size=2, padding=False)
    with pytest.raises(CalibrationDataError, match="padding must be one of"):
        from_texts(tokenizer, texts, padding="shortest")
    with pytest.raises(CalibrationDataError, match="callable"):
        from_texts("bert-base-uncased", texts)
    no_pad = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(CalibrationDataError, match=r"no pad token.*pad_token = tokenizer\.eos_token"):
        from_texts(no_pad, texts, batch_size=2)
    assert len(list(from_texts(no_pad, texts[:2]))) == 2  # batch_size=1 needs no pad token

    def without_types(batch, **kwargs):
        return {k: v for k, v in tokenizer(batch, **kwargs).items() if k != "token_type_ids"}

    _fails(bert, from_texts(without_types, texts), tmp_path, r"model also needs \['token_type_ids'\]")

    def broken(batch, **kwargs):
        raise RuntimeError("vocabulary file missing")

    _fails(bert, from_texts(broken, texts), tmp_path, r"tokenizer failed on texts 0\.\.0: vocabulary file")
    with pytest.raises(CalibrationDataError, match=r"returns .*not 'pixel_values'"):
        list(from_texts(tokenizer, texts, input_names=["pixel_values"]))


def test_image_errors(cnn, bert, digit_images, tmp_path, monkeypatch) -> None:
    _write_digits(tmp_path / "images", digit_images[:2])
    with pytest.raises(CalibrationDataError, match="does not exist or is not a folder"):
        from_images(tmp_path / "nope", _digit_preprocess)
    with pytest.raises(CalibrationDataError, match=r"holds no \.jpg files"):
        from_images(tmp_path / "images", _digit_preprocess, extensions=("jpg",))
    (tmp_path / "images" / "digit_01.png").write_bytes(b"\x89PNG broken")
    _fails(
        cnn, from_images(tmp_path / "images", _digit_preprocess), tmp_path, r"cannot read image .*digit_01"
    )
    _write_digits(tmp_path / "images", digit_images[:2])

    as_float64 = from_images(tmp_path / "images", lambda im: _digit_preprocess(im).astype(np.float64))
    _fails(cnn, as_float64, tmp_path, r"float64.*astype\(np\.float32\)")
    _fails(cnn, from_images(tmp_path / "images", lambda im: 1 / 0), tmp_path, r"preprocess failed on .*Zero")
    _fails(cnn, from_images(tmp_path / "images", lambda im: None), tmp_path, r"returned None")
    _fails(bert, from_images(tmp_path / "images", _digit_preprocess), tmp_path, r"return a dict")

    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(CalibrationDataError, match=r"needs Pillow.*pip install pillow"):
        from_images(tmp_path / "images", _digit_preprocess)


# --- command line -----------------------------------------------------------------------------------
def test_cli_folder(cnn, digit_images, tmp_path, capsys) -> None:
    folder = _npy_folder(tmp_path, *[image[None] for image in digit_images])
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(cnn), "--calib", str(folder), "-o", str(out), "--quiet"]) == 0
    assert "calibration samples: 6" in capsys.readouterr().out
    assert out.is_file()


@pytest.mark.parametrize("kind", ["empty", "corrupt", "float64", "missing"])
def test_cli_bad_folder(cnn, digit_images, tmp_path, capsys, kind: str) -> None:
    folder = tmp_path / "calib"
    if kind != "missing":
        folder.mkdir()
    if kind == "corrupt":
        (folder / "a.npy").write_bytes(b"garbage")
    if kind == "float64":
        np.save(folder / "a.npy", digit_images[:1].astype(np.float64))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(cnn), "--calib", str(folder), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxq: error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_optional_libraries_are_not_imported_with_onnxq() -> None:
    code = (
        "import sys, onnxq, onnxq.data; print(sorted({'datasets', 'PIL', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
