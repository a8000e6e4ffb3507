"""Fuzz onnxq with many random graphs: `tests/test_fuzz.py` with a larger example count.

Every case must end in an onnxq error or a model that passes onnx.checker and runs on ORT's CPU EP;
hypothesis prints the outcome counts (quantized / refused, by error) at the end.

    .venv/bin/python tools/fuzz.py [--examples 10000] [--seed 0] [--segment-bytes N]

``--segment-bytes N`` runs calibration and the fidelity check in segments of at most N bytes of
weights (1: nearly every node its own segment) with every cut activation spilled to disk, to fuzz
``onnxq.segments`` on graphs far smaller than the default 128 MB budget.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segment-bytes", type=int, default=None)
    args = parser.parse_args()
    if args.segment_bytes is not None:  # read at call time by onnxq.segments.SegmentRunner
        sys.path.insert(0, str(ROOT))
        from onnxq import segments

        segments.SEGMENT_BYTES, segments.STORE_BYTES = args.segment_bytes, 0
    os.environ["ONNXQ_FUZZ_EXAMPLES"] = str(args.examples)
    os.chdir(ROOT)
    return pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_fuzz.py",
            f"--hypothesis-seed={args.seed}",
            "--hypothesis-show-statistics",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
