"""Calibration / evaluation feeds that match each built model's ONNX inputs exactly."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import digits, recipes

logger = logging.getLogger(__name__)

DEFAULT_PAST_LEN = 8
DATA_DIR = Path(__file__).resolve().parent / "data"
VADER_TEXT = DATA_DIR / "vader_amazon_snippets.tsv"
VADER_FILES = {
    "amazon": VADER_TEXT,  # 400 of the 3,708 Amazon snippets
    "movie": DATA_DIR / "vader_movie_snippets.tsv",
    "nyt": DATA_DIR / "vader_nyt_snippets.tsv",
}
PYTHON_DOCS = {
    "tutorial": DATA_DIR / "python-tutorial.txt",  # evaluation text (perplexity)
    "faq": DATA_DIR / "python-faq.txt",  # calibration text
}
_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."


@functools.lru_cache(maxsize=4)
def vader_snippets(which: str = "amazon") -> tuple[tuple[str, float], ...]:
    """Return ``(text, sentiment)`` of every VADER snippet in ``models/data`` for ``which``, in file order.

    ``which`` is ``"amazon"`` (400-snippet subset), ``"movie"`` (10,605 Rotten Tomatoes snippets) or
    ``"nyt"`` (5,190 editorial snippets); sentiment is the mean human rating in [-4, 4].
    """
    if which not in VADER_FILES:
        raise KeyError(f"unknown VADER file {which!r}; known: {', '.join(VADER_FILES)}")
    lines = VADER_FILES[which].read_text(encoding="utf-8").splitlines()[1:]
    rows = (line.split("\t", 2) for line in lines if line.count("\t") >= 2)
    return tuple((text.strip(), float(score)) for _, score, text in rows)


@functools.lru_cache(maxsize=1)
def vader_sentences() -> tuple[str, ...]:
    """Return the review snippets in ``models/data`` (real English text, file order)."""
    lines = VADER_TEXT.read_text(encoding="utf-8").splitlines()[1:]
    return tuple(line.split("\t", 2)[2] for line in lines if line.count("\t") >= 2)


def python_docs_text(which: str) -> str:
    """Return the Python documentation text ``"tutorial"`` (evaluation) or ``"faq"`` (calibration)."""
    if which not in PYTHON_DOCS:
        raise KeyError(f"unknown text {which!r}; known: {', '.join(PYTHON_DOCS)}")
    return PYTHON_DOCS[which].read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _doc_token_ids(tokenizer_dir: str, which: str) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tokenizer(python_docs_text(which), add_special_tokens=False)["input_ids"]
    out = np.asarray(ids, dtype=np.int64)
    out.flags.writeable = False
    return out


def text_windows(name: str, which: str, n: int | None = None, seq_len: int = 512) -> np.ndarray:
    """Return the first ``n`` non-overlapping ``seq_len``-token windows of a Python docs text.

    The text (``"tutorial"`` or ``"faq"``) is tokenized whole, without special tokens, with the
    tokenizer saved beside model ``name`` (built first if needed), then cut into consecutive
    windows; a partial last window is dropped. ``n=None`` gives every full window. Returns int64
    ``[n, seq_len]``; ``ValueError`` if the text has fewer than ``n`` windows.
    """
    from . import build

    ids = _doc_token_ids(str(build(name).parent), which)
    available = len(ids) // seq_len
    n = available if n is None else n
    if n > available:
        raise ValueError(f"{which} text has {available} windows of {seq_len} tokens, {n} requested")
    return ids[: n * seq_len].reshape(n, seq_len).copy()


def causal_lm_feed(ids: np.ndarray, spec: list[dict[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """Return the feed of a no-past causal LM for ``ids`` ``[batch, seq]``: mask ones, positions 0..seq-1.

    With ``spec`` (the model's inputs), only the inputs the model has are kept.
    """
    ids = np.asarray(ids, dtype=np.int64)
    full = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy(),
    }
    return full if spec is None else {s["name"]: full[s["name"]] for s in spec}


def _signature(model_path: Path) -> list[dict[str, Any]]:
    """Return the model's graph inputs, from ``build_info.json`` when present."""
    info_path = model_path.parent / recipes.BUILD_INFO_FILE
    if info_path.is_file():
        return json.loads(info_path.read_text())["inputs"]
    return recipes.io_signature(model_path)["inputs"]


def _check_feed(feed: dict[str, np.ndarray], spec: list[dict[str, Any]], name: str) -> None:
    """Raise ``ValueError`` unless ``feed`` has exactly the inputs in ``spec`` with their dtypes/ranks."""
    if set(feed) != {s["name"] for s in spec}:
        raise ValueError(f"{name}: feed names {sorted(feed)} != inputs {[s['name'] for s in spec]}")
    for s in spec:
        arr = feed[s["name"]]
        if arr.dtype != np.dtype(s["dtype"]) or arr.ndim != len(s["shape"]):
            raise ValueError(f"{name}: {s['name']} is {arr.dtype}{arr.shape}, model wants {s}")
        for got, want in zip(arr.shape, s["shape"], strict=True):
            if isinstance(want, int) and want > 0 and got != want:
                raise ValueError(f"{name}: {s['name']} has shape {arr.shape}, model wants {s['shape']}")


def _config(model_path: Path) -> dict[str, Any]:
    path = model_path.parent / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _random_ids(rng: np.random.Generator, vocab: int, length: int, avoid: int | None) -> np.ndarray:
    """Return ``[1, length]`` int64 ids uniform over the vocab, never equal to ``avoid``."""
    ids = rng.integers(0, vocab, size=(1, length), dtype=np.int64)
    if avoid is not None:
        ids[ids == avoid] = (avoid + 1) % vocab
    return ids


def _encoder_feeds(
    model_path: Path, spec: list[dict[str, Any]], n: int, rng: np.random.Generator, seq_len: int
) -> list[dict[str, np.ndarray]]:
    """Random-id feeds for a BERT-like encoder; about a quarter get padding at the end."""
    cfg = _config(model_path)
    vocab = int(cfg.get("vocab_size", 1000))
    pad_id = int(cfg.get("pad_token_id") or 0)
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in spec}
    feeds = []
    for _ in range(n):
        ids = _random_ids(rng, vocab, seq_len, avoid=pad_id)
        mask = np.ones((1, seq_len), dtype=np.int64)
        if seq_len > 2 and rng.random() < 0.25:
            n_pad = int(rng.integers(1, max(2, seq_len // 2)))
            mask[:, seq_len - n_pad :] = 0
            ids[:, seq_len - n_pad :] = pad_id
        full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds.append(_select(full, dtypes, model_path))
    return feeds


def _select(
    full: dict[str, np.ndarray], dtypes: dict[str, np.dtype], model_path: Path
) -> dict[str, np.ndarray]:
    """Keep the model's inputs from ``full``, cast to the model's dtypes; error on unknown inputs."""
    missing = set(dtypes) - set(full)
    if missing:
        raise ValueError(f"{model_path}: don't know how to make inputs {sorted(missing)}")
    return {k: full[k].astype(dt, copy=False) for k, dt in dtypes.items()}


def _text_feeds(
    model_path: Path, spec: list[dict[str, Any]], n: int, rng: np.random.Generator, seq_len: int
) -> list[dict[str, np.ndarray]]:
    """Feeds from real review snippets tokenized with the tokenizer saved beside the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, local_files_only=True)
    sentences = vader_sentences()
    picks = rng.choice(len(sentences), size=n, replace=n > len(sentences))
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in spec}
    feeds = []
    for i in picks:
        enc = tokenizer(
            sentences[int(i)], padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
        )
        feeds.append(_select(dict(enc), dtypes, model_path))
    return feeds


def _decoder_feeds(
    model_path: Path,
    spec: list[dict[str, Any]],
    n: int,
    rng: np.random.Generator,
    seq_len: int,
    past_len: int,
) -> list[dict[str, np.ndarray]]:
    """Feeds for a causal LM with past KV inputs.

    The past is real: a random prefix of ``past_len`` tokens is run through the model itself (with
    an empty past) and its ``present.*`` outputs become the ``past_key_values.*`` inputs. The
    attention mask is all ones over ``past_len + seq_len``; position ids continue after the past.
    """
    import onnxruntime as ort

    vocab = int(_config(model_path).get("vocab_size", 1000))
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in spec}
    past_specs = [s for s in spec if s["name"].startswith(_PAST_PREFIX)]
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]) if past_len else None
    empty = {
        s["name"]: np.zeros((1, s["shape"][1], 0, s["shape"][3]), dtype=dtypes[s["name"]]) for s in past_specs
    }
    wanted = [_PRESENT_PREFIX + s["name"][len(_PAST_PREFIX) :] for s in past_specs]
    feeds = []
    for _ in range(n):
        ids = _random_ids(rng, vocab, seq_len, avoid=None)
        past = empty
        if sess is not None:
            prefix = _random_ids(rng, vocab, past_len, avoid=None)
            warmup = {
                "input_ids": prefix,
                "attention_mask": np.ones((1, past_len), dtype=np.int64),
                "position_ids": np.arange(past_len, dtype=np.int64)[None, :],
                **empty,
            }
            outputs = sess.run(wanted, _select(warmup, dtypes, model_path))
            past = dict(zip([s["name"] for s in past_specs], outputs, strict=True))
        full = {
            "input_ids": ids,
            "attention_mask": np.ones((1, past_len + seq_len), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + seq_len, dtype=np.int64)[None, :],
            **past,
        }
        feeds.append(_select(full, dtypes, model_path))
    return feeds


def _doc_window_feeds(
    name: str, model_path: Path, spec: list[dict[str, Any]], n: int, rng: np.random.Generator, seq_len: int
) -> list[dict[str, np.ndarray]]:
    """Feeds of a no-past causal LM: ``n`` random non-overlapping ``seq_len``-token FAQ windows."""
    if any(s["name"].startswith(_PAST_PREFIX) for s in spec):
        raise ValueError(f"{name}: text windows are for models without past key values")
    windows = text_windows(name, "faq", None, seq_len)
    picks = rng.choice(len(windows), size=n, replace=n > len(windows))
    dtypes = {s["name"]: np.dtype(s["dtype"]) for s in spec}
    return [_select(causal_lm_feed(windows[int(i) : int(i) + 1]), dtypes, model_path) for i in picks]


def _image_feeds(n: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """``n`` single held-out digit images (distinct while ``n`` <= 397)."""
    _, _, x_test, _ = digits.digits_split()
    picks = rng.choice(len(x_test), size=n, replace=n > len(x_test))
    return [{"input": x_test[int(i) : int(i) + 1].copy()} for i in picks]


def sample_inputs(
    name: str,
    n: int,
    *,
    seed: int = 0,
    seq_len: int | None = None,
    past_len: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Return ``n`` feeds (batch size 1 each) for model ``name``, building it first if needed.

    Each feed has exactly the model's ONNX input names, dtypes and ranks, and runs in ONNX Runtime.
    The same ``(name, n, seed, seq_len, past_len)`` always gives the same arrays.

    - encoders with random weights: ``input_ids`` uniform over the vocab (never the pad id),
      ``attention_mask`` ones (about 1 in 4 feeds padded at the end), ``token_type_ids`` zeros;
    - ``minilm-real``: real review snippets tokenized and padded/truncated to ``seq_len``;
    - decoders: ``seq_len`` new tokens after a real past of ``past_len`` tokens (default 8);
    - ``smollm2-135m`` (no past): random non-overlapping ``seq_len``-token windows of the Python FAQ
      text (``past_len`` is ignored);
    - CNNs: single images from the held-out digits split (``seq_len`` is ignored).

    ``seq_len`` defaults to the recipe's (16 for tiny models, 128 for the bigger ones).
    """
    from . import build

    recipe = recipes.get(name)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    model_path = build(name)
    spec = _signature(model_path)
    rng = np.random.default_rng(seed)
    if recipe.kind == "image":
        feeds = _image_feeds(n, rng)
    else:
        seq_len = seq_len or recipe.default_seq_len or 16
        if recipe.kind == "decoder" and recipe.text == "python-docs":
            feeds = _doc_window_feeds(name, model_path, spec, n, rng, seq_len)
        elif recipe.kind == "decoder":
            past = DEFAULT_PAST_LEN if past_len is None else past_len
            feeds = _decoder_feeds(model_path, spec, n, rng, seq_len, past)
        elif recipe.text == "vader":
            feeds = _text_feeds(model_path, spec, n, rng, seq_len)
        else:
            feeds = _encoder_feeds(model_path, spec, n, rng, seq_len)
    for feed in feeds:
        _check_feed(feed, spec, name)
    return feeds
