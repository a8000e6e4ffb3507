"""Command line: ``python -m models list`` and ``python -m models build NAME [NAME ...]|all``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import build, cache, describe, names, recipes

logger = logging.getLogger("models")


def _size_mb(name: str) -> float:
    folder = cache.model_dir(name)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _list() -> int:
    """Print a table of recipes: name, cached or not, folder size, description."""
    width = max(len(n) for n in names())
    print(f"{'name':<{width}}  {'cached':<6}  {'MB':>7}  description")
    for name in names():
        built = cache.is_built(name)
        size = f"{_size_mb(name):7.1f}" if built else f"{'-':>7}"
        print(f"{name:<{width}}  {'yes' if built else 'no':<6}  {size}  {describe(name)}")
    print(f"\ncache: {cache.cache_root()}")
    return 0


def _build(targets: list[str], force: bool) -> int:
    """Build the named models (``all`` for every recipe); return a process exit status."""
    wanted = names() if "all" in targets else targets
    unknown = [t for t in wanted if t not in recipes.RECIPES]
    if unknown:
        logger.error("unknown model(s): %s; known: %s", ", ".join(unknown), ", ".join(names()))
        return 2
    failed = []
    for name in wanted:
        t0 = time.perf_counter()
        try:
            path = build(name, force=force)
        except Exception:
            logger.exception("%s: build failed", name)
            failed.append(name)
            continue
        metrics = path.parent / "metrics.json"
        extra = ""
        if metrics.is_file():
            values = json.loads(metrics.read_text())
            if "fp32_top1_accuracy" in values:
                extra = f", fp32 top-1 {values['fp32_top1_accuracy']:.4f}"
            elif "max_abs_logit_diff_vs_torch" in values:
                extra = f", ONNX vs torch max |logit diff| {values['max_abs_logit_diff_vs_torch']:.1e}"
        logger.info("%s: ready at %s (%.1f s%s)", name, path, time.perf_counter() - t0, extra)
    if failed:
        logger.error("failed: %s", ", ".join(failed))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the ``list`` or ``build`` command."""
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list recipes and whether they are cached")
    p_build = sub.add_parser("build", help="build models into the cache")
    p_build.add_argument("names", nargs="+", metavar="NAME", help="model names, or 'all'")
    p_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_build.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.cmd == "list":
        return _list()
    return _build(args.names, args.force)


if __name__ == "__main__":
    sys.exit(main())
