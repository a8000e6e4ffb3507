"""Quantize a real model for several targets and validate every result on every provider.

MiniLM (all-MiniLM-L6-v2): calibration on NYT/Amazon VADER snippets, validation on 16 held-out movie
snippets, all padded to a fixed 128 tokens (HTP runs static shapes). The digits CNN: its own
calibration and held-out images. Prints the validation table and the wall time of `onnxq.validate`
(the quantization time is not included).

    .venv/bin/python tools/validate_providers.py [--model minilm|cnn] [--targets cpu,qnn]
        [--providers cpu,cpu-unfused,qnn-htp,openvino] [--samples 16] [--html report.html]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models
import onnxq
from onnxq.report import write_report

SEQ = 128
log = logging.getLogger("validate_providers")


def minilm_data(samples: int) -> tuple[Path, list[dict], list[dict]]:
    from transformers import AutoTokenizer

    path = models.build("minilm-real")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, local_files_only=True)

    def encode(texts: list[str]) -> list[dict]:
        out = []
        for text in texts:
            enc = tokenizer(text, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
            out.append({k: v.astype(np.int64) for k, v in enc.items()})
        return out

    pool = [t for t, _ in models.vader_snippets("nyt")] + [t for t, _ in models.vader_snippets("amazon")]
    calib_idx = np.random.default_rng(1).choice(len(pool), 32, replace=False)
    movie = [t for t, _ in models.vader_snippets("movie")]
    test_idx = np.random.default_rng(2).choice(len(movie), samples, replace=False)
    return path, encode([pool[int(i)] for i in calib_idx]), encode([movie[int(i)] for i in test_idx])


def cnn_data(samples: int) -> tuple[Path, list[dict], list[dict]]:
    path = models.build("cnn-digits")
    feeds = models.sample_inputs("cnn-digits", 32 + samples, seed=0)
    return path, feeds[:32], feeds[32:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "cnn"), default="minilm")
    parser.add_argument("--targets", default="cpu,qnn")
    parser.add_argument("--providers", default="cpu,cpu-unfused,qnn-htp,openvino")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--html", help="also write the HTML report here")
    parser.add_argument("--json", help="also write the JSON report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "onnxq"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    fp32, calib, held_out = (minilm_data if args.model == "minilm" else cnn_data)(args.samples)
    with tempfile.TemporaryDirectory(prefix="onnxq-validate-") as tmp:
        candidates = []
        for target in args.targets.split(","):
            out = Path(tmp) / f"{args.model}.{target}.quant.onnx"
            start = time.perf_counter()
            onnxq.quantize(fp32, calib, config=onnxq.QuantConfig(target=target), output=out, progress=False)
            log.info("quantized for %s in %.1f s", target, time.perf_counter() - start)
            candidates.append(out)
        start = time.perf_counter()
        report = onnxq.validate(
            fp32, candidates, held_out, providers=args.providers, num_samples=args.samples
        )
        seconds = time.perf_counter() - start
    print(report.to_markdown())
    print(
        f"\nonnxq.validate: {seconds:.1f} s for {len(candidates) + 1} models × {args.providers} "
        f"on {report.samples} inputs"
    )
    for path in (args.html, args.json):
        if path:
            write_report(report.to_dict(), path)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
