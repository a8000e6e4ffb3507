"""The ``onnxq`` command line: ``quantize``, ``inspect``, ``export``, ``validate`` and ``diff``.

Errors a user can cause print one line (``onnxq: error: ...``) and exit with code 2; ``validate``
exits with 1 when a candidate breaks a tolerance (or fails to run on a requested provider), and
``quantize --min-cosine/--min-sqnr`` when the budget is not met (the report and the model with the
most nodes out of 8 bits it tried are still written).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import sys
from typing import TYPE_CHECKING, Any

from onnxq import __version__
from onnxq.config import (
    AWQ,
    GPTQ,
    MSE,
    TARGETS,
    BiasCorrection,
    Codebook,
    CrossLayerEqualization,
    Dynamic,
    Entropy,
    MinMax,
    Percentile,
    PerTensor,
    QuantConfig,
    SmoothQuant,
)
from onnxq.errors import ConfigError, OnnxqError

if TYPE_CHECKING:
    from onnxq.mixed_precision import MixedPrecision

WEIGHT_ONLY = (
    "int8",
    "uint8",
    "int4",
    "uint4",
    "int2",
    "uint2",
    "float8e4m3fn",
    "float4e2m1",
    "nf4",
    "log",
    "kmeans",
)
METHODS = {"minmax": MinMax, "percentile": Percentile, "entropy": Entropy, "mse": MSE, "dynamic": Dynamic}
# --algorithm: what replaces round-to-nearest for --weight-only integer weights
ALGORITHMS = {"gptq": GPTQ(), "awq": AWQ(), "awq-gptq": GPTQ(awq=AWQ())}
INTEGER_WEIGHTS = ("int8", "uint8", "int4", "uint4", "int2", "uint2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxq", description="Quantize ONNX models by rewriting their graphs."
    )
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every pass")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize", help="quantize: static (with calibration data), --method dynamic, or --weight-only TYPE"
    )
    q.add_argument("model", help="an .onnx file, or a folder holding one")
    q.add_argument(
        "--calib",
        help=".npz with one array per model input (first axis = samples), or a folder of .npy/.npz files "
        "(one sample per .npy for a single-input model; read in file-name order); with --method dynamic "
        "optional, for the fidelity check only",
    )
    q.add_argument("-o", "--output", help="output .onnx (default: <model>.quant.onnx beside the input)")
    q.add_argument("--config", help="a QuantConfig as JSON file")
    q.add_argument(
        "--target",
        choices=TARGETS,
        help="runtime preset: cpu (ORT CPU EP, default), qnn (Qualcomm HTP: every op in QDQ, 16-bit "
        "activations, static shapes), tensorrt, openvino",
    )
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights instead of per-channel")
    q.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="NAME_OR_OP",
        help="node names (fnmatch patterns) or op types to keep in float",
    )
    q.add_argument(
        "--method",
        choices=sorted(METHODS),
        help="calibration method (default minmax; percentile/entropy/mse build streaming histograms; "
        "dynamic: activations quantized at run time, no data needed)",
    )
    q.add_argument("--no-smoothing", action="store_true", help="turn SmoothQuant outlier migration off")
    q.add_argument(
        "--smooth-alpha",
        type=float,
        metavar="A",
        help="SmoothQuant with a fixed alpha in [0, 1] instead of one searched per tensor",
    )
    q.add_argument(
        "--equalize",
        action="store_true",
        help="cross-layer equalization of Conv/Gemm chains joined by Relu (for per-tensor weights)",
    )
    q.add_argument(
        "--bias-correction",
        action="store_true",
        help="subtract the expected output shift of weight rounding from Conv/Gemm biases",
    )
    q.add_argument(
        "--quantize-attention",
        action="store_true",
        help="quantize activation x activation MatMuls (attention's Q.K^T, P.V) too; the cpu target "
        "keeps them float by default",
    )
    q.add_argument(
        "--weight-only",
        choices=WEIGHT_ONLY,
        metavar="TYPE",
        help="weight-only quantization, no data needed: "
        + ", ".join(WEIGHT_ONLY)
        + " (nf4/log/kmeans are codebooks); activations stay float",
    )
    q.add_argument(
        "--block-size",
        type=int,
        default=128,
        help="weights per scale along K for --weight-only (0: per channel)",
    )
    q.add_argument(
        "--matmul-nbits",
        action="store_true",
        help="with --weight-only: write com.microsoft MatMulNBits directly",
    )
    q.add_argument(
        "--algorithm",
        choices=sorted(ALGORITHMS),
        help="with --weight-only and integer weights: GPTQ, AWQ, or AWQ's scaling then GPTQ instead of "
        "round-to-nearest (needs --calib)",
    )
    q.add_argument("--num-samples", type=int, help="use at most this many calibration samples")
    q.add_argument("--no-fidelity", action="store_true", help="skip the fp32 comparison")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    amp = q.add_argument_group(
        "mixed precision",
        "an accuracy budget on every output vs fp32 (the first --eval-samples calibration samples): "
        "the fewest nodes are kept out of 8 bits that meet it, and a report says which, why, and "
        "their cost in size and latency (onnxq.quantize_mixed); exit code 1 when it cannot be met",
    )
    amp.add_argument("--min-cosine", type=float, metavar="C", help="minimum output cosine, e.g. 0.999")
    amp.add_argument("--min-sqnr", type=float, metavar="DB", help="minimum output SQNR in dB")
    amp.add_argument(
        "--fallback",
        choices=("float", "int16"),
        help="where chosen nodes go: float (default) or 16-bit activations (minmax calibration only)",
    )
    amp.add_argument("--max-float-nodes", type=int, metavar="N", help="at most N nodes leave 8 bits")
    amp.add_argument(
        "--ranking",
        choices=("auto", "measured", "added_error"),
        help="order nodes leave 8 bits in: measured (each alone out of 8 bits, one quantization per "
        "node), added_error (onnxq diff's, no quantization), auto (default: measured for a cosine or "
        "SQNR budget of at most 64 nodes)",
    )
    amp.add_argument(
        "--eval-samples", type=int, metavar="N", help="calibration samples the budget is checked on (16)"
    )
    amp.add_argument(
        "--latency-threads",
        type=int,
        metavar="N",
        help="time the report's latency with N ORT intra-op threads (default: ORT's, one per core)",
    )
    amp.add_argument(
        "--latency-spinning",
        action="store_const",
        const=True,
        help="time it with spinning threads (ORT's default; off by default here)",
    )

    i = sub.add_parser("inspect", help="opset, inputs, outputs, op histogram, and the quantization plan")
    i.add_argument("model")
    i.add_argument("--plan", action="store_true", help="show what would be quantized and why not")
    i.add_argument("--config", help="a QuantConfig as JSON file (for --plan)")

    e = sub.add_parser(
        "export",
        help="export a transformers save_pretrained folder to ONNX (needs: pip install 'onnxq[export]')",
    )
    e.add_argument("model", help="a folder written by save_pretrained (config.json and weights)")
    e.add_argument(
        "-o", "--output", required=True, help="folder to create (model.onnx, config and tokenizer files)"
    )
    e.add_argument("--task", help="optimum task, e.g. feature-extraction (default: inferred from the model)")
    e.add_argument("--opset", type=int, help="ONNX opset (default: 18)")
    past = e.add_mutually_exclusive_group()
    past.add_argument(
        "--with-past",
        dest="with_past",
        action="store_true",
        default=None,
        help="export a decoder with its KV cache (past_key_values inputs); the default for decoders",
    )
    past.add_argument(
        "--no-past", dest="with_past", action="store_false", help="export a decoder without KV cache"
    )

    v = sub.add_parser(
        "validate",
        help="compare quantized models with their fp32 reference on execution providers",
        description="Run REF and every CAND on each provider with the same inputs; print a table and "
        "exit 1 when a candidate breaks a tolerance.",
    )
    v.add_argument("reference", help="the fp32 model (.onnx or a folder holding one)")
    v.add_argument("candidates", nargs="+", help="quantized models to check")
    v.add_argument(
        "--data", required=True, help="inputs: .npz (first axis = samples) or a folder of .npy/.npz"
    )
    v.add_argument(
        "--providers",
        default="cpu",
        help="comma-separated: cpu, cpu-unfused, reference, qnn-htp, openvino, cuda, tensorrt (default cpu)",
    )
    v.add_argument("--num-samples", type=int, default=16, help="inputs to use (default 16)")
    v.add_argument("--min-cosine", type=float, default=0.99, help="per-output cosine floor (default 0.99)")
    v.add_argument("--min-sqnr", type=float, help="per-output SQNR floor in dB")
    v.add_argument("--max-abs-error", type=float, help="per-output max abs error ceiling")
    v.add_argument("--min-top1", type=float, help="top-1 agreement floor on logits outputs (0..1)")
    v.add_argument("--no-latency", action="store_true", help="skip the latency blocks")
    _report_arguments(v)

    d = sub.add_parser(
        "diff",
        help="per-layer error localisation between an fp32 model and its quantized version",
        description="FP32 QUANT: rank the layers of QUANT by the error they add and name the first "
        "jump. With --providers a,b and one model: the same model on two providers.",
    )
    d.add_argument(
        "models", nargs="+", metavar="MODEL", help="FP32.onnx QUANT.onnx, or one model with --providers"
    )
    d.add_argument(
        "--data", required=True, help="inputs: .npz (first axis = samples) or a folder of .npy/.npz"
    )
    d.add_argument("--provider", default="cpu", help="provider both models run on (default cpu)")
    d.add_argument("--providers", help="two providers a,b: run the reference on a and the candidate on b")
    d.add_argument("--num-samples", type=int, default=16, help="inputs to use (default 16)")
    d.add_argument("--threshold", type=float, default=6.0, help="added error in dB that counts as a jump")
    _report_arguments(d)
    return parser


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report with plots")
    p.add_argument("--md", metavar="PATH", help="also write the Markdown report to a file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace) -> QuantConfig:
    config = QuantConfig.from_json(args.config) if getattr(args, "config", None) else QuantConfig()
    changes = {}
    if getattr(args, "weight_only", None):
        block = args.block_size or None
        if args.weight_only in ("nf4", "log", "kmeans"):
            codebook = Codebook(args.weight_only, block_size=block if args.weight_only != "kmeans" else None)
            config = QuantConfig.weight_only(codebook=codebook, target=config.target)
        else:
            fmt = "matmul_nbits" if args.matmul_nbits else "dequantize_linear"
            config = QuantConfig.weight_only(args.weight_only, block, weight_format=fmt, target=config.target)
    algorithm = getattr(args, "algorithm", None)
    if algorithm:
        if getattr(args, "weight_only", None) not in INTEGER_WEIGHTS:
            raise ConfigError(
                f"--algorithm {algorithm} replaces round-to-nearest of integer weight-only weights: add "
                f"--weight-only with one of {', '.join(INTEGER_WEIGHTS)}"
            )
        if getattr(args, "calib", None) is None:
            raise ConfigError(f"--algorithm {algorithm} needs calibration data: add --calib")
        changes["algorithm"] = ALGORITHMS[algorithm]
    if getattr(args, "target", None) and args.target != config.target:
        config = config.with_changes(target=args.target)
    if getattr(args, "per_tensor", False):
        w = config.weights
        changes["weights"] = type(w)(w.dtype, w.symmetric, PerTensor())
    excludes = getattr(args, "exclude", [])
    if excludes:
        op_like = tuple(e for e in excludes if e[:1].isupper() and e.isalnum())
        changes["exclude_op_types"] = config.exclude_op_types + op_like
        changes["exclude_nodes"] = config.exclude_nodes + tuple(e for e in excludes if e not in op_like)
    if getattr(args, "method", None):
        changes["calibration"] = METHODS[args.method]()
    if getattr(args, "no_smoothing", False):
        if getattr(args, "smooth_alpha", None) is not None:
            raise ConfigError("--smooth-alpha and --no-smoothing contradict each other: drop one")
        changes["smoothing"] = None
    elif getattr(args, "smooth_alpha", None) is not None:
        changes["smoothing"] = dataclasses.replace(config.smoothing or SmoothQuant(), alpha=args.smooth_alpha)
    if getattr(args, "equalize", False):
        changes["equalization"] = CrossLayerEqualization()
    if getattr(args, "bias_correction", False):
        changes["bias_correction"] = BiasCorrection()
    if getattr(args, "quantize_attention", False):
        changes["activation_matmuls"] = True
    if getattr(args, "num_samples", None):
        changes["num_samples"] = args.num_samples
    if getattr(args, "no_fidelity", False):
        changes["fidelity"] = False
    return config.with_changes(**changes) if changes else config


def _budget(args: argparse.Namespace) -> MixedPrecision | None:
    """The mixed-precision budget the flags ask for, or None; budget options without a budget
    are refused (they would be silently ignored)."""
    from onnxq.mixed_precision import MixedPrecision

    if args.min_cosine is None and args.min_sqnr is None:
        options = (
            "fallback",
            "max_float_nodes",
            "eval_samples",
            "ranking",
            "latency_threads",
            "latency_spinning",
        )
        given = [f for f in options if getattr(args, f) is not None]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ConfigError(f"{flags} only apply to mixed precision: add --min-cosine or --min-sqnr")
        return None
    extra: dict[str, Any] = {"eval_samples": args.eval_samples} if args.eval_samples is not None else {}
    if args.ranking is not None:
        extra["ranking"] = args.ranking
    return MixedPrecision(
        min_cosine=args.min_cosine,
        min_sqnr_db=args.min_sqnr,
        fallback=args.fallback or "float",
        max_float_nodes=args.max_float_nodes,
        latency_threads=args.latency_threads,
        latency_spinning=bool(args.latency_spinning),
        **extra,
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from onnxq.pipeline import quantize

    config, budget = _config(args), _budget(args)
    if budget is not None:
        from onnxq.mixed_precision import quantize_mixed

        mixed = quantize_mixed(
            args.model, args.calib, budget, config=config, output=args.output, progress=not args.quiet
        )
        print(mixed.to_text())
        if mixed.output_path is not None:
            print(f"written: {mixed.output_path}")
        return 0 if mixed.met else 1
    result = quantize(args.model, args.calib, config=config, output=args.output, progress=not args.quiet)
    print(result)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from onnxq.data import model_inputs
    from onnxq.model_io import load_model
    from onnxq.pipeline import make_plan, prepare_model

    model = load_model(args.model)
    print(f"model: {args.model}")
    print("opsets: " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(model.opset_imports.items())))
    print(f"producer: {model.producer_name} {model.producer_version}".rstrip())
    print("inputs:")
    for spec in model_inputs(model):
        print(f"  {spec.name}: {spec.dtype} {list(spec.shape) if spec.shape is not None else '?'}")
    print("outputs:")
    for value in model.graph.outputs:
        shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else "?"
        print(f"  {value.name}: {value.dtype} {shape}")
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    print(f"initializers: {len(model.graph.initializers)} ({size / 1e6:.2f} MB)")
    print("ops:")
    for op, n in collections.Counter(n.op_type for n in model.graph).most_common():
        print(f"  {op:<28} {n:>5}")
    if args.plan and _config(args).activations is None:  # weight-only: no activation plan
        from onnxq.passes.weight_only import WeightOnlyQuantize
        from onnxq.weight_only import describe, excluder

        config = _config(args)
        wo = WeightOnlyQuantize(config.weights, config.weight_format, excluder(config))
        wo.dry_run = True
        wo(model)
        print(f"plan: weight-only {describe(config)}; activations stay float, no calibration")
        for name, reason in wo.skipped.items():
            print(f"  {name:<48} {'weight':<18} float: {reason}")
        print("would quantize: " + ", ".join(f"{op} {n}" for op, n in sorted(wo.quantized.items())))
        return 0
    if args.plan:
        prepare_model(model)  # the histogram above shows the model as stored; the plan sees it prepared
        plan = make_plan(model, _config(args))
        print("plan (after constant folding, BatchNorm folding and Identity removal):")
        for node in plan.nodes.values():
            if node.quantized or node.reason:
                decision = "quantize" if node.quantized else f"float: {node.reason}"
                print(f"  {node.name:<48} {node.op_type:<18} {decision}")
        counts = plan.quantized_counts()
        print("would quantize: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
        if isinstance(_config(args).calibration, Dynamic):
            print("activations to calibrate: none (dynamic: quantized at run time)")
        else:
            print(f"activations to calibrate: {len(plan.calibration_tensors())}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from onnxq.export import export

    print(export(args.model, args.output, task=args.task, opset=args.opset, with_past=args.with_past))
    return 0


def _write_reports(doc: dict, args: argparse.Namespace) -> None:
    from onnxq.report import write_report

    for path in (args.json, args.html, args.md):
        if path:
            write_report(doc, path)


def _cmd_validate(args: argparse.Namespace) -> int:
    from onnxq.validate import Tolerances, validate

    tolerances = Tolerances(args.min_cosine, args.min_sqnr, args.max_abs_error, args.min_top1)
    report = validate(
        args.reference,
        args.candidates,
        args.data,
        providers=args.providers,
        tolerances=tolerances,
        num_samples=args.num_samples,
        timed=not args.no_latency,
        progress=not args.quiet,
    )
    doc = report.to_dict()
    _write_reports(doc, args)
    print(report.to_markdown())
    return 0 if report.passed else 1


def _cmd_diff(args: argparse.Namespace) -> int:
    from onnxq.diff import diff
    from onnxq.errors import ConfigError
    from onnxq.providers import parse_providers

    if args.providers:
        providers = parse_providers(args.providers)
        if len(providers) != 2:
            raise ConfigError("--providers takes exactly two providers, e.g. --providers cpu,qnn-htp")
    else:
        providers = parse_providers(args.provider) * 2
    if len(args.models) == 1 and args.providers:
        reference, candidate = args.models[0], None
    elif len(args.models) == 2:
        reference, candidate = args.models
    else:
        raise ConfigError("give FP32.onnx QUANT.onnx, or one model with --providers a,b")
    report = diff(
        reference,
        candidate,
        args.data,
        providers=tuple(providers),
        num_samples=args.num_samples,
        threshold_db=args.threshold,
        progress=not args.quiet,
    )
    _write_reports(report.to_dict(), args)
    print(report.to_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        for noisy in ("onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "quantize":
            return _cmd_quantize(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "diff":
            return _cmd_diff(args)
        return _cmd_inspect(args)
    except OnnxqError as exc:
        print(f"onnxq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
