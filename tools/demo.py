"""`make demo`: quantize the real all-MiniLM-L6-v2 with calibration on real text, print the summary.

Builds the model from its offline PyPI package (models/ recipe ``minilm-real``), calibrates on 64
Amazon review snippets, writes the quantized model next to the fp32 one in the model cache, and
prints onnxq's summary (what was quantized, what stayed float and why, sizes, fidelity vs fp32).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models
import onnxq


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = models.build("minilm-real")
    calib = models.sample_inputs("minilm-real", 64)
    start = time.perf_counter()
    result = onnxq.quantize(path, calib, output=path.with_name("model.quant.onnx"))
    elapsed = time.perf_counter() - start
    print(result)
    print(f"quantized in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
