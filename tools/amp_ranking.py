"""Mixed precision's two node orders side by side: measured (leave-one-out) vs added error.

For each model and cosine budget, ``onnxq.quantize_mixed`` runs once with ``ranking="measured"``
(each candidate alone kept float, ranked by the output SQNR it gains) and once with
``ranking="added_error"`` (``onnxq.diff``'s local added error), on the same calibration samples
(the first ``--samples`` of the recipe's seeded inputs, which are also the evaluation samples).
One row per run: budget met, nodes kept float, the file's size, quantizations built and wall time;
then per model the Spearman correlation between the two orders. Tables (Markdown) go to stdout,
progress to stderr.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/amp_ranking.py [--models minilm-real,cnn-digits] \\
        [--budgets 0.9993,0.9996] [--samples 16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from onnxq.mixed_precision import FloatChoice, MixedPrecision, quantize_mixed  # noqa: E402

log = logging.getLogger("amp_ranking")


def spearman(measured: tuple[FloatChoice, ...]) -> float:
    """Rank correlation of the measured order with the added-error order of the same candidates."""
    gain = np.argsort(np.argsort([-c.gain_db for c in measured], kind="stable"))  # type: ignore[operator]
    added = np.argsort(np.argsort([-c.added_db for c in measured], kind="stable"))
    return float(np.corrcoef(gain, added)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm-real,cnn-digits", help="comma-separated recipes")
    p.add_argument("--budgets", default="0.9993,0.9996", help="comma-separated minimum output cosines")
    p.add_argument("--samples", type=int, default=16, help="calibration (and evaluation) samples")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    print("| model | min cosine | ranking | met | float nodes | size (MB) | quantizations | time (s) |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    correlations: dict[str, float] = {}
    for name in args.models.split(","):
        path = models.build(name)
        feeds = models.sample_inputs(name, args.samples, seed=0)
        for target in (float(b) for b in args.budgets.split(",")):
            for ranking in ("measured", "added_error"):
                log.info("%s: cosine >= %g, %s ranking ...", name, target, ranking)
                budget = MixedPrecision(min_cosine=target, measure_latency=False, ranking=ranking)
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="onnxq-amp-ranking-") as tmp:
                    out = Path(tmp) / "amp.onnx"
                    result = quantize_mixed(path, feeds, budget, output=out, progress=False)
                seconds = time.perf_counter() - start
                if result.ranked_by == "measured":
                    correlations[name] = spearman(result.ranking)
                print(
                    f"| {name} | {target:g} | {ranking} | {'yes' if result.met else 'no'} | "
                    f"{len(result.chosen)} of {len(result.ranking)} | {result.size_after / 1e6:.2f} | "
                    f"{result.quantizations} | {seconds:.0f} |",
                    flush=True,
                )
    print()
    for name, rho in correlations.items():
        print(f"- {name}: Spearman correlation of the measured and added-error orders {rho:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
