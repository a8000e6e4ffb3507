"""transformers → ONNX export (``onnxq.export`` / ``onnxq export``): tiny random BERT, GPT-2 and Llama
built here from configs, exported through optimum-onnx, run in ONNX Runtime against torch."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq.cli import main
from onnxq.errors import ExportError, MissingDependencyError, ModelLoadError, OutputError

HAS_EXPORT_DEPS = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "optimum"))
needs_export = pytest.mark.skipif(not HAS_EXPORT_DEPS, reason='needs pip install "onnxq[export]"')

VOCAB = 1000
ATOL = 1e-4
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
export_module = sys.modules["onnxq.export"]  # `onnxq.export` is the function


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, mtime and content hash."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def names_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def input_names(path: Path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def word_level_tokenizer():
    """A fast tokenizer over the words ``w0 .. w996``, built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "<eos>": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>"
    )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A seeded random BertModel (hidden 32, 2 layers) with a WordPiece tokenizer, save_pretrained."""
    pytest.importorskip("optimum.exporters.onnx")
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("src") / "bert"
    folder.mkdir()
    vocab_file = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    vocab_file.write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A seeded random GPT2LMHeadModel (n_embd 32, 2 layers) with a word-level tokenizer."""
    pytest.importorskip("optimum.exporters.onnx")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("src") / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    word_level_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def check_decoder(path: Path, model, with_past: bool, num_kv_heads: int, head_dim: int) -> None:
    """The ONNX decoder's logits (and KV cache, over two steps) match torch's to ``ATOL``."""
    import torch

    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    past_names = sorted(n for n in names if n.startswith("past_key_values."))
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9), dtype=np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    if not with_past:
        assert not past_names and not any(o.name.startswith("present") for o in sess.get_outputs())
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.tile(np.arange(9), (2, 1)),
        }
        np.testing.assert_allclose(sess.run(["logits"], {k: feed[k] for k in names})[0], want, atol=ATOL)
        return
    layers = model.config.num_hidden_layers
    assert past_names == sorted(f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))
    # step 1: six tokens, empty cache; step 2: three more tokens reading the cache step 1 returned
    outputs = [o.name for o in sess.get_outputs()]
    empty = np.zeros((2, num_kv_heads, 0, head_dim), dtype=np.float32)
    feed = {"input_ids": ids[:, :6], "attention_mask": np.ones((2, 6), np.int64)}
    feed |= {"position_ids": np.tile(np.arange(6), (2, 1))} | dict.fromkeys(past_names, empty)
    first = dict(zip(outputs, sess.run(None, {k: feed[k] for k in names}), strict=True))
    np.testing.assert_allclose(first["logits"], want[:, :6], atol=ATOL)
    feed = {"input_ids": ids[:, 6:], "attention_mask": np.ones((2, 9), np.int64)}
    feed |= {"position_ids": np.tile(np.arange(6, 9), (2, 1))}
    feed |= {n: first[n.replace("past_key_values", "present")] for n in past_names}
    second = dict(zip(outputs, sess.run(None, {k: feed[k] for k in names}), strict=True))
    np.testing.assert_allclose(second["logits"], want[:, 6:], atol=ATOL)
    assert second["present.0.key"].shape == (2, num_kv_heads, 9, head_dim)


@needs_export
def test_bert_folder_matches_torch_and_carries_its_tokenizer(bert_dir, tmp_path) -> None:
    import torch
    from transformers import AutoTokenizer, BertModel

    before = snapshot(bert_dir)
    out = tmp_path / "bert-onnx"
    path = onnxq.export(bert_dir, out)
    assert path == out / "model.onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["bert-onnx"]  # no temporary folder left
    assert snapshot(bert_dir) == before  # the input folder is never written to
    assert {"model.onnx", "config.json", "vocab.txt"} | TOKENIZER_FILES <= names_in(out)
    for name in TOKENIZER_FILES | {"vocab.txt"}:  # copied verbatim
        assert (out / name).read_bytes() == (bert_dir / name).read_bytes()
    proto = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert input_names(path) == ["input_ids", "attention_mask", "token_type_ids"]

    # the folder stands alone: its tokenizer feeds the model, which matches torch
    enc = AutoTokenizer.from_pretrained(out, local_files_only=True)(
        ["w1 w2 w3 w4 w5 w6", "w7 w8 w9"], padding=True, return_tensors="np"
    )
    feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert feed["attention_mask"].min() == 0  # a padded row
    got = session(path).run(["last_hidden_state"], feed)[0]
    model = BertModel.from_pretrained(bert_dir, local_files_only=True).eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, atol=ATOL)


@needs_export
@pytest.mark.parametrize("with_past", [True, None, False], ids=["with-past", "default", "no-past"])
def test_gpt2_folder_kv_cache_follows_with_past(gpt2_dir, tmp_path, with_past) -> None:
    from transformers import GPT2LMHeadModel

    before = snapshot(gpt2_dir)
    path = onnxq.export(gpt2_dir, tmp_path / "out", with_past=with_past)
    assert snapshot(gpt2_dir) == before
    assert TOKENIZER_FILES | {"config.json", "generation_config.json"} <= names_in(path.parent)
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir, local_files_only=True).eval()
    # None is optimum's default for decoders: text-generation-with-past
    check_decoder(path, model, with_past=with_past is not False, num_kv_heads=2, head_dim=16)


@needs_export
@pytest.mark.parametrize("with_past", [True, False], ids=["with-past", "no-past"])
def test_in_memory_llama_with_tokenizer(tmp_path, with_past) -> None:
    from transformers import AutoTokenizer

    model = tiny_llama()
    tokenizer = word_level_tokenizer()
    use_cache = model.config.use_cache
    path = onnxq.export(model, tmp_path / "llama", with_past=with_past, tokenizer=tokenizer)
    assert path == tmp_path / "llama" / "model.onnx"
    assert model.config.use_cache == use_cache  # the caller's model is left as it was
    assert TOKENIZER_FILES | {"config.json", "generation_config.json"} <= names_in(path.parent)
    saved = AutoTokenizer.from_pretrained(path.parent, local_files_only=True)
    assert saved("w5 w6 nope")["input_ids"] == tokenizer("w5 w6 nope")["input_ids"] == [8, 9, 0]
    check_decoder(path, model, with_past=with_past, num_kv_heads=2, head_dim=16)


@needs_export
def test_cli_export_then_quantize_the_folder(bert_dir, tmp_path, capsys) -> None:
    out = tmp_path / "bert-onnx"
    assert main(["export", str(bert_dir), "-o", str(out), "--opset", "18"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "model.onnx")
    assert captured.err == ""  # torch / optimum export warnings are silenced at the default log level

    # optimum's folder (model.onnx beside config and tokenizer files) is what `onnxq quantize` accepts
    ids = np.random.default_rng(1).integers(5, VOCAB, size=(8, 16), dtype=np.int64)
    npz = tmp_path / "calib.npz"
    np.savez(npz, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    assert main(["quantize", str(out), "--calib", str(npz), "--quiet"]) == 0
    assert "quantized nodes" in capsys.readouterr().out
    quantized = out / "model.quant.onnx"
    onnx.checker.check_model(str(quantized), full_check=True)
    ops = {n.op_type for n in onnx.load(str(quantized)).graph.node}
    assert "DequantizeLinear" in ops
    feed = {
        "input_ids": ids[:2],
        "attention_mask": np.ones_like(ids[:2]),
        "token_type_ids": np.zeros_like(ids[:2]),
    }
    want = session(out / "model.onnx").run(["last_hidden_state"], feed)[0].ravel()
    got = session(quantized).run(["last_hidden_state"], feed)[0].ravel()
    assert float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.99


@needs_export
@pytest.mark.parametrize(("flag", "has_past"), [("--with-past", True), ("--no-past", False)])
def test_cli_past_flags(gpt2_dir, tmp_path, capsys, flag, has_past) -> None:
    out = tmp_path / "gpt2-onnx"
    assert main(["export", str(gpt2_dir), "-o", str(out), flag]) == 0
    assert capsys.readouterr().err == ""
    names = input_names(out / "model.onnx")
    assert any(n.startswith("past_key_values.") for n in names) is has_past
    if not has_past:  # a decoder without KV cache quantizes from input ids alone
        rng = np.random.default_rng(2)
        calib = [
            {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12)[None, :]}
            for ids in rng.integers(3, VOCAB, size=(6, 1, 12), dtype=np.int64)
        ]
        result = onnxq.quantize(out, calib, output=tmp_path / "q.onnx", progress=False)
        assert result.output_path.is_file()


def bad_input(kind: str, tmp_path: Path, bert_dir: Path) -> tuple[list[str], type[Exception], str]:
    """CLI arguments for a user error, the exception the API raises for it, and a word of its message."""
    out = str(tmp_path / "out")
    if kind == "missing folder":
        return [str(tmp_path / "nope"), "-o", out], ModelLoadError, "does not exist"
    if kind == "no config.json":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
        return [str(tmp_path / "empty"), "-o", out], ModelLoadError, "config.json"
    if kind == "bad task":
        return [str(bert_dir), "-o", out, "--task", "summarise"], ExportError, "fill-mask"
    if kind == "no kv cache":
        return [str(bert_dir), "-o", out, "--with-past"], ExportError, "no KV cache"
    if kind == "output not empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        return [str(bert_dir), "-o", out], OutputError, "not empty"
    if kind == "output is the input":
        return [str(bert_dir), "-o", str(bert_dir)], OutputError, "not empty"
    if kind == "opset too high":
        return [str(bert_dir), "-o", out, "--opset", "99"], ExportError, "opset 99"
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing folder",
    "no config.json",
    "bad task",
    "no kv cache",
    "output not empty",
    "output is the input",
    "opset too high",
]


@needs_export
@pytest.mark.parametrize("kind", BAD_INPUTS)
@pytest.mark.parametrize("via", ["api", "cli"])
def test_user_errors_are_one_line(bert_dir, tmp_path, capsys, kind, via) -> None:
    argv, error, needle = bad_input(kind, tmp_path, bert_dir)
    before_src, before_tmp = snapshot(bert_dir), snapshot(tmp_path)
    entries = sorted(tmp_path.rglob("*"))  # folders too: a temporary export folder would show here
    if via == "api":
        kwargs = {"task": "summarise"} if "--task" in argv else {}
        kwargs |= {"with_past": True} if "--with-past" in argv else {}
        kwargs |= {"opset": 99} if "--opset" in argv else {}
        with pytest.raises(error) as info:
            onnxq.export(argv[0], argv[2], **kwargs)
        message = str(info.value)
    else:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("onnxq: error: ") and err.count("\n") == 1
        message = err
    assert needle in message and "\n" not in message.strip()
    assert snapshot(bert_dir) == before_src and snapshot(tmp_path) == before_tmp  # nothing written
    assert sorted(tmp_path.rglob("*")) == entries


@needs_export
def test_unknown_task_lists_the_valid_ones(bert_dir, tmp_path) -> None:
    listed = r"unknown task 'summarise'; valid tasks for bert: feature-extraction, fill-mask, "
    with pytest.raises(ExportError, match=listed):
        onnxq.export(bert_dir, tmp_path / "out", task="summarise")
    # synonyms are optimum's: masked-lm is fill-mask
    path = onnxq.export(bert_dir, tmp_path / "out", task="masked-lm")
    assert [o.name for o in session(path).get_outputs()] == ["logits"]


@needs_export
def test_failed_export_leaves_nothing(bert_dir, tmp_path, capfd) -> None:
    """opset 9 gets past the checks, then torch's exporter fails after optimum wrote config.json."""
    with pytest.raises(ExportError, match=r"optimum could not export .* for feature-extraction") as info:
        onnxq.export(bert_dir, tmp_path / "out", opset=9)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    assert "Torch IR graph" not in capfd.readouterr().err  # torch's IR dump is silenced


@needs_export
def test_export_is_offline_and_restores_the_hub_settings(bert_dir, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hub_constants
    import optimum.exporters.onnx as optimum_onnx

    real = optimum_onnx.main_export
    seen = {}

    def spy(*args, **kwargs):
        seen.update(offline=hub_constants.HF_HUB_OFFLINE, env=export_module.os.environ.get("HF_HUB_OFFLINE"))
        seen.update(local_files_only=kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optimum_onnx, "main_export", spy, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    onnxq.export(bert_dir, tmp_path / "out")
    assert seen == {"offline": True, "env": "1", "local_files_only": True}
    assert hub_constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in export_module.os.environ


def test_missing_dependencies_name_the_extra(tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import fails as if not installed
    hint = r'install the export extra: pip install "onnxq\[export\]"'
    with pytest.raises(MissingDependencyError, match=hint):
        onnxq.export(folder, tmp_path / "out")
    assert main(["export", str(folder), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "onnxq[export]"' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_in_memory_model_must_be_a_transformers_model(tmp_path) -> None:
    if not HAS_EXPORT_DEPS:
        pytest.skip('needs pip install "onnxq[export]"')
    with pytest.raises(ModelLoadError, match=r"transformers\.PreTrainedModel, not dict"):
        onnxq.export({"not": "a model"}, tmp_path / "out")


def test_importing_onnxq_stays_cheap() -> None:
    code = (
        "import sys, onnxq, onnxq.cli, onnxq.export\n"
        "assert callable(onnxq.export), onnxq.export\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
