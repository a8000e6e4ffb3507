"""Quantization configuration: small typed frozen dataclasses that round-trip through JSON.

A config says *what* to quantize and *how*; the plan pass turns it into per-node decisions. The
fields whose best value depends on the runtime (``activations``, ``weights``, ``smoothing``) default
to the preset of ``config.target`` (:data:`PRESETS`); a value given explicitly always wins. A
constructed config holds concrete values only, so ``QuantConfig.from_dict(c.to_dict()) == c``.
The default target, ``"cpu"``, is the fast, accurate choice for ONNX Runtime's CPU execution
provider: uint8 asymmetric per-tensor activations with int8 symmetric per-channel weights (the pair
its VNNI/AVX2 kernels run fastest), calibrated with MinMax, with SmoothQuant.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from onnxq.errors import ConfigError
from onnxq.qmath import INT_TYPES


class _FromTarget:
    """The default of a target-dependent field: replaced by the target's preset on construction."""

    def __repr__(self) -> str:
        return "FROM_TARGET"


FROM_TARGET: Any = _FromTarget()

TARGETS = ("cpu", "qnn", "tensorrt", "openvino")


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel. ``axis=None`` picks the layout's channel axis for each weight:
    MatMul ``[K, N]`` → 1, Gemm ``transB=1`` → 0, Conv ``[M, C/g, kh, kw]`` → 0, ConvTranspose
    ``[C, M/g, kh, kw]`` → 1. 1-D and scalar tensors are always per-tensor."""

    axis: int | None = None


@dataclass(frozen=True)
class PerBlock:
    """One scale per block of ``size`` consecutive elements along the weight's reduction axis
    (MatMul ``[K, N]``: K; Gemm: K whichever ``transB``; an embedding table ``[V, H]``: H), the
    layout of opset-21 blocked DequantizeLinear and of ORT's ``MatMulNBits`` (which needs a power of
    two >= 16). Weight-only configs (``activations=None``) only."""

    size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 2:
            raise ConfigError("PerBlock(size=n) needs an integer n >= 2 (MatMulNBits: a power of two >= 16)")


Granularity = PerTensor | PerChannel | PerBlock

# Weight types of weight-only configs (``activations=None``); static and dynamic configs use INT_TYPES.
WEIGHT_ONLY_DTYPES = ("int8", "uint8", "int4", "uint4", "int2", "uint2", "float8e4m3fn", "float4e2m1")


@dataclass(frozen=True)
class Codebook:
    """Non-uniform weights for weight-only configs: every weight is an index into a small float
    codebook (``Gather``), times a per-block (``block_size``) or per-channel (``None``) scale.

    - ``"nf4"``: the 16 NormalFloat levels of QLoRA (normal quantiles), absmax scale; ``bits`` = 4.
    - ``"log"``: ``±2^-k`` levels (k = 0 .. 2^(bits-1) - 1), absmax scale.
    - ``"kmeans"``: ``2^bits`` centroids learnt per tensor by k-means over vectors of
      ``vector_size`` consecutive weights (vector quantization), per-channel scale.

    Indices are stored as uint4 (up to 16 codes) or uint8. Details: :mod:`onnxq.codebook`.
    """

    kind: Literal["nf4", "log", "kmeans"] = "nf4"
    block_size: int | None = 64
    bits: int = 4
    vector_size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("nf4", "log", "kmeans"):
            raise ConfigError(f"unknown codebook {self.kind!r}; use 'nf4', 'log' or 'kmeans'")
        if not 1 <= self.bits <= 8 or (self.kind == "nf4" and self.bits != 4):
            raise ConfigError("Codebook(bits=b) needs 1 <= b <= 8 (nf4: b = 4)")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError("Codebook(block_size=n) needs n >= 2, or None for per-channel scales")
        if self.vector_size < 1 or (self.vector_size > 1 and self.kind != "kmeans"):
            raise ConfigError("Codebook(vector_size=d) needs d >= 1, and d > 1 only with kind='kmeans'")


def _check_float_rows(owner: str, value: object) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, float) and 0.0 < value < 1.0
    )
    if not ok:
        raise ConfigError(
            f"{owner}(float_rows=...) takes a count n >= 0 (0: pure integer weights) or a fraction "
            f"0 < f < 1 of each weight's input features, not {value!r}"
        )


@dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al. 2022) for integer weight-only configs: each MatMul/Gemm weight is
    quantized one input feature (row of ``W [K, N]``) at a time and the rounding error is spread
    over the rows not yet quantized through the inverse Hessian ``H = XᵀX`` of the weight's
    activation input, gathered from the calibration data.

    - ``damp``: ``damp · mean(diag H)`` is added to the diagonal before inverting.
    - ``act_order``: quantize rows by ``diag H`` descending; scales are then computed beforehand
      from the original weight (AutoGPTQ's ``static_groups``), so blocks keep the original order.
    - ``block_size_columns``: rows updated together (lazy batch updates); no effect on the result
      beyond float rounding.
    - ``static_groups``: compute every block's scale before quantizing even without act-order
      (``None``: only with act-order; otherwise each block's scale is computed when reached, from
      the already error-corrected rows).
    - ``clip_grid`` / ``max_shrink``: each block's range may shrink to ``1 - i / clip_grid`` of its
      extremes (``i`` up to ``max_shrink · clip_grid``) where that lowers the Hessian-diagonal-
      weighted rounding error of the block (``clip_grid=0``: plain RTN scales).
    - ``awq``: run :class:`AWQ`'s scale search (and clip search) first, then GPTQ on the scaled
      weights with the Hessians of the scaled activations (statistics from the same single pass).
    - ``sequential`` (without ``awq``): quantize layer by layer, each layer's Hessians gathered on
      the outputs of the already quantized layers before it (two passes of the samples per layer);
      ``False``: every Hessian from the fp32 model in one pass (faster, less accurate).
    - ``float_rows``: per activation, the input features (rows of ``W``) with the largest energy
      ``Σx_k²`` (``diag H``) stay float, at most ``K // 16`` (OWQ, Lee et al. 2024): their weight
      rows are zero in the integer weight and ``X[..., rows] @ W[rows]`` (float16 rows for float32
      weights) is added beside the MatMul; GPTQ visits them first, so no error is spread into them.
      It targets the few channels whose activations are tens to thousands of times the others
      (normalisation outputs and "massive activations" of decoders), where a rounding error of the
      weight is multiplied by the outlier. 8 rows cost 8·16 bits per output column (0.22 bit a
      weight at K = 576) and an extra Gather/MatMul/Add per activation; SmolLM2-135M, int4 block
      128: perplexity +14.5 % → +7.5 %. ``0``: pure integer weights. A float ``0 < f < 1`` keeps
      that fraction of each weight's ``K`` instead (the same share of every weight's bytes: 0.04
      gives 23 rows at K = 576 and 61 at K = 1536: +6.0 % on SmolLM2, with a file 3.5 % larger than 8
      rows). With ``awq``, this field (not the AWQ's) is used.

    Details: :mod:`onnxq.weight_algorithms`.
    """

    damp: float = 0.01
    act_order: bool = True
    block_size_columns: int = 128
    static_groups: bool | None = None
    clip_grid: int = 20
    max_shrink: float = 0.2
    awq: AWQ | None = None
    sequential: bool = True
    float_rows: int | float = 8

    def __post_init__(self) -> None:
        _check_float_rows("GPTQ", self.float_rows)
        if self.awq is not None and not isinstance(self.awq, AWQ):
            raise ConfigError(f"GPTQ(awq=...) takes AWQ(...) or None, not {self.awq!r}")
        if self.awq is not None and self.awq.sequential:
            raise ConfigError(
                "GPTQ(awq=AWQ(sequential=True)) is not supported: AWQ runs in GPTQ's one pass there"
            )
        if self.clip_grid < 0 or not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError("GPTQ(clip_grid=n, max_shrink=m) needs n >= 0 and 0 <= m < 1")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError("GPTQ(damp=d) needs 0 <= d < 1 (a fraction of the mean Hessian diagonal)")
        if not isinstance(self.block_size_columns, int) or self.block_size_columns < 1:
            raise ConfigError("GPTQ(block_size_columns=n) needs an integer n >= 1")


@dataclass(frozen=True)
class AWQ:
    """AWQ (Lin et al. 2023) for integer weight-only configs: per activation shared by MatMuls
    with constant weights, a per-channel scale ``s = mean|X|^α`` (α on ``grid`` points in [0, 1))
    that minimises the error of the quantized MatMuls on sampled calibration rows; ``W`` rows are
    multiplied by ``s`` and ``1/s`` is folded into the activation's producer (a Mul by a constant,
    e.g. the RMSNorm/LayerNorm gamma, or the MatMul weight feeding a Mul such as the MLP's up
    projection) or applied by an inserted ``Mul``. Then, with ``clip``, each block's range is
    shrunk by the ratio (``clip_grid`` points down to ``1 - max_shrink``) that minimises the output
    error per block and output channel. ``max_rows``: activation rows sampled per tensor
    (deterministic reservoir). ``float_rows``: as :class:`GPTQ`'s, the rows with the largest
    ``Σx_k²`` stay float (taken after the scaling, left out of the searches). ``duo``: search
    ``s = mean|X|^α / mean|Ŵ|^(1-α)`` instead (``Ŵ``: weights relative to their block's extremum;
    AutoAWQ's ``duo_scaling``). ``loss``: what the scale search compares: ``"layer"`` (default)
    the group's own outputs on the sampled rows; ``"block"`` (as the AWQ paper and AutoAWQ do)
    the output of the block the group feeds (q/k/v → the attention's output projection, gate/up
    → the MLP's down projection; found in the graph, see
    :func:`onnxq.awq.find_block_regions`), run by ONNX Runtime on the first
    ``loss_samples`` calibration samples whole (groups without such a block — o, down, lm_head —
    keep their own outputs). ``sequential``: search layer by layer, each layer on the outputs of
    the quantized layers before it (as GPTQ's default; ``loss="layer"`` only; not inside
    ``GPTQ(awq=...)``, which runs AWQ in one pass). On SmolLM2-135M neither ``"block"`` nor
    ``sequential`` beat the defaults (README).
    Details: :mod:`onnxq.weight_algorithms`.
    """

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    max_rows: int = 512
    float_rows: int | float = 8
    duo: bool = False
    loss: Literal["block", "layer"] = "layer"
    loss_samples: int = 4
    sequential: bool = False

    def __post_init__(self) -> None:
        _check_float_rows("AWQ", self.float_rows)
        if self.loss not in ("block", "layer"):
            raise ConfigError(f"AWQ(loss={self.loss!r}) must be 'block' or 'layer'")
        if not isinstance(self.loss_samples, int) or self.loss_samples < 1:
            raise ConfigError("AWQ(loss_samples=n) needs an integer n >= 1")
        if self.sequential and self.loss == "block":
            raise ConfigError("AWQ(sequential=True) searches on each layer's own outputs: use loss='layer'")
        if self.grid < 1 or self.clip_grid < 1 or self.max_rows < 1:
            raise ConfigError("AWQ(grid, clip_grid, max_rows) must be positive integers")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError("AWQ(max_shrink=m) needs 0 <= m < 1")


WeightAlgorithm = GPTQ | AWQ


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: integer type, symmetric or not, and granularity.

    ``calibration`` (activations only) picks this tensor's calibration method; ``None`` uses the
    config's. Set it through ``QuantConfig.overrides`` to calibrate single tensors differently.
    """

    dtype: Literal["uint8", "int8", "uint16", "int16"] = "uint8"
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if self.dtype not in INT_TYPES and self.dtype not in WEIGHT_ONLY_DTYPES:
            raise ConfigError(
                f"unsupported quantization dtype {self.dtype!r}; use one of "
                f"{', '.join(dict.fromkeys((*INT_TYPES, *WEIGHT_ONLY_DTYPES)))}"
            )
        if not isinstance(self.granularity, PerTensor | PerChannel | PerBlock):
            raise ConfigError("granularity must be PerTensor(), PerChannel(axis=None|int) or PerBlock(size)")
        if self.calibration is not None:
            _check_calibration(self.calibration)
            if isinstance(self.calibration, Dynamic):
                raise ConfigError(
                    "Dynamic() applies to the whole model: use QuantConfig(calibration=Dynamic()), "
                    "not a per-tensor QuantSpec(calibration=...)"
                )


@dataclass(frozen=True)
class MinMax:
    """Calibration by the running minimum and maximum of each tensor over all samples.

    ``moving_average`` (0 < c < 1) replaces the global extremes by an exponential moving average of
    the per-sample extremes, which ignores rare spikes.
    """

    moving_average: float | None = None

    def __post_init__(self) -> None:
        if self.moving_average is not None and not 0.0 < self.moving_average < 1.0:
            raise ConfigError("MinMax(moving_average=c) needs 0 < c < 1")


@dataclass(frozen=True)
class Percentile:
    """Clip to the range holding ``percentile`` % of the values, from a streaming histogram.

    ``symmetric``: ``True`` takes the percentile of ``|x|`` (range ``±t``), ``False`` cuts
    ``(100 - percentile) / 2`` % from each tail, ``None`` follows the tensor's :class:`QuantSpec`.
    """

    percentile: float = 99.999
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError("Percentile(percentile=p) needs 50 < p <= 100")


@dataclass(frozen=True)
class Entropy:
    """TensorRT's calibration: the threshold on ``|x|`` minimising the KL divergence between the
    histogram and its quantized version, searched over ``candidates`` thresholds between 128 bins
    and the largest magnitude (a histogram of at least 2048 bins per side)."""

    candidates: int = 128

    def __post_init__(self) -> None:
        if self.candidates < 2:
            raise ConfigError("Entropy(candidates=n) needs n >= 2")


@dataclass(frozen=True)
class MSE:
    """The clipping range that minimises the expected squared quantization error (rounding plus
    clipping) over the tensor's histogram, searched over ``candidates`` points per end."""

    candidates: int = 100

    def __post_init__(self) -> None:
        if self.candidates < 2:
            raise ConfigError("MSE(candidates=n) needs n >= 2")


@dataclass(frozen=True)
class Dynamic:
    """No calibration: activations are quantized at run time. ``DynamicQuantizeLinear`` computes
    each activation's uint8 asymmetric per-tensor scale and zero point from its own min/max on every
    run, so no calibration data is needed; weights are quantized offline as ``config.weights`` says.
    What the rewrite emits per target is in :mod:`onnxq.passes.dynamic`."""


Calibration = MinMax | Percentile | Entropy | MSE | Dynamic


@dataclass(frozen=True)
class SmoothQuant:
    """Move activation outliers into the weights (SmoothQuant, Xiao et al. 2023), per MatMul input.

    For an activation ``X`` read only through DequantizeLinear by MatMuls with constant weights
    ``W``, ``X @ W == (X / s) @ (diag(s) W)`` with ``s_k = max|X_k|^α / max|W_k|^(1-α)``: ``W``'s
    rows are scaled, and ``1/s`` is folded into ``X``'s producer where those MatMuls are its only
    readers (a norm's gamma and beta, a gated MLP's up projection: no op added), else applied by a
    ``Mul`` inserted before the quantization of ``X`` (:mod:`onnxq.passes.smooth`). Channels
    whose magnitudes are all alike are left alone (``min_outlier_ratio``: the largest channel
    magnitude over the median one). ``alpha=None`` picks α per tensor from ``alphas`` (and "no
    smoothing") by the expected output error of the quantized MatMuls, computed from per-channel
    statistics gathered in the same calibration pass. A smoothed tensor's range is the exact
    MinMax range of ``X / s``, whatever the calibration method.

    Channels no smoothing factor can tame are computed in float instead (the static form of
    LLM.int8()'s decomposition): a channel whose largest magnitude exceeds ``float_channel_ratio``
    times that of the ``2·float_channels + 1``-th largest channel (the median one in narrow
    tensors; at most ``float_channels`` per activation, the largest) gets a zero row in the int8
    weight and its own small float ``Gather → MatMul → Add`` beside the quantized MatMul, when
    that divides the expected output error (the model that picks α) by ``float_channel_gain`` or
    more. Such channels are a decoder's "massive activations" (a few channels of the first token
    reaching thousands while every other value stays below ~50; smoothing them away would make
    their weight row dominate every column's int8 scale, leaving them would make them the
    whole tensor's range) and the outlier features of a norm's output (LLM.int8()'s case).
    ``float_channels=0`` turns this off; MatMuls inside If/Loop/Scan bodies never get it.
    """

    alpha: float | None = None
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    min_outlier_ratio: float = 4.0
    float_channels: int = 16
    float_channel_ratio: float = 3.0
    float_channel_gain: float = 1.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(self.alphas))
        for a in (self.alpha, *self.alphas):
            if a is not None and not 0.0 <= a <= 1.0:
                raise ConfigError("SmoothQuant alpha values must lie in [0, 1]")
        if self.alpha is None and not self.alphas:
            raise ConfigError("SmoothQuant(alpha=None) needs at least one candidate in alphas")
        if self.min_outlier_ratio < 1.0:
            raise ConfigError("SmoothQuant(min_outlier_ratio=r) needs r >= 1")
        if self.float_channels < 0 or min(self.float_channel_ratio, self.float_channel_gain) < 1:
            raise ConfigError(
                "SmoothQuant needs float_channels >= 0 and float_channel_ratio, float_channel_gain >= 1"
            )


@dataclass(frozen=True)
class CrossLayerEqualization:
    """Cross-layer equalization (Nagel et al. 2019): for consecutive Conv/Gemm layers joined only by
    positively homogeneous channel-wise ops (Relu, pooling, a 1:1 Flatten), output channel ``c`` of
    the first is divided by ``s_c = sqrt(r1_c / r2_c)`` and input channel ``c`` of the second
    multiplied by it (``r``: per-channel weight ranges), so both ranges become ``sqrt(r1_c r2_c)``
    and the float function is unchanged. Sweeps over the chains until no factor moves by more than
    ``tolerance`` (relative), at most ``max_iterations`` times. Data-free; runs after BatchNorm
    folding, before the plan. Details: :mod:`onnxq.passes.equalize`.
    """

    max_iterations: int = 20
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ConfigError("CrossLayerEqualization(max_iterations=n) needs an integer n >= 1")
        if not self.tolerance > 0.0:
            raise ConfigError("CrossLayerEqualization(tolerance=t) needs t > 0")


@dataclass(frozen=True)
class BiasCorrection:
    """Bias correction (Nagel et al. 2019; Finkelstein et al. 2019): the expected output shift of
    each quantized Conv/Gemm caused by weight rounding, ``(Ŵ - W) · E[x]`` per output channel with
    ``E[x]`` from the layer's fp32 input (gathered in the calibration pass), is
    subtracted from the float bias before it is quantized. For a Conv, ``E[x]`` is the mean input
    patch per channel and kernel tap (zero padding included, exact). ``ops``: the op types corrected
    (Conv, Gemm). Details: :mod:`onnxq.passes.bias_correction`.
    """

    ops: tuple[str, ...] = ("Conv", "Gemm")

    def __post_init__(self) -> None:
        if isinstance(self.ops, str):
            raise ConfigError("BiasCorrection(ops=...) must be a list of op types, not a single string")
        object.__setattr__(self, "ops", tuple(self.ops))
        unknown = sorted(set(self.ops) - {"Conv", "Gemm"})
        if unknown:
            raise ConfigError(f"BiasCorrection corrects Conv and Gemm only, not {unknown}")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what onnxq does to a model.

    - ``target``: the runtime the model ships to; picks the placement rules (``onnxq.plan.RULES``)
      and the defaults of the target-dependent fields (:data:`PRESETS`): ``"cpu"`` (ONNX Runtime's
      CPU EP), ``"qnn"`` (Qualcomm HTP through ORT's QNN EP), ``"tensorrt"`` (TensorRT's explicit
      quantization), ``"openvino"`` (OpenVINO's low-precision transformations).
    - ``activations`` / ``weights``: the default :class:`QuantSpec` of each kind of tensor
      (default: the target's preset).
    - ``calibration``: how activation ranges are measured.
    - ``smoothing``: :class:`SmoothQuant` outlier migration for MatMul inputs (``None``: off;
      default: the target's preset).
    - ``activation_matmuls``: quantize MatMuls whose both inputs are activations (attention's
      Q·Kᵀ and P·V). Default: the target's preset — float on ``cpu``, quantized elsewhere.
    - ``op_types``: restrict quantization to these op types (``None``: every op the target runs
      faster in integer).
    - ``exclude_nodes``: node names (``fnmatch`` patterns) left in float.
    - ``exclude_op_types``: op types left in float.
    - ``exclude_if``: a predicate on an ``onnx_ir.Node``; true leaves the node in float. Not
      serialisable: a config holding one cannot be written to JSON.
    - ``overrides``: tensor name → :class:`QuantSpec` for that tensor, or ``None`` to keep it float.
    - ``num_samples``: use at most this many calibration samples (``None``: all).
    - ``fidelity``: measure fp32 vs quantized outputs on the calibration inputs after quantizing.
    """

    target: Literal["cpu", "qnn", "tensorrt", "openvino"] = "cpu"
    activations: QuantSpec = FROM_TARGET  # type: ignore[assignment]
    weights: QuantSpec = FROM_TARGET  # type: ignore[assignment]
    calibration: Calibration = field(default_factory=MinMax)
    smoothing: SmoothQuant | None = FROM_TARGET  # type: ignore[assignment]
    activation_matmuls: bool = FROM_TARGET  # type: ignore[assignment]
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude_if: Callable[[Any], bool] | None = field(default=None, compare=False)
    overrides: Mapping[str, QuantSpec | None] = field(default_factory=dict)
    num_samples: int | None = None
    fidelity: bool = True
    weight_format: Literal["dequantize_linear", "matmul_nbits"] = "dequantize_linear"
    # Weight-only: GPTQ() / AWQ() instead of round-to-nearest (needs calibration data).
    algorithm: WeightAlgorithm | None = None
    # Conv chains: CrossLayerEqualization() / BiasCorrection() (None: off, the default).
    equalization: CrossLayerEqualization | None = None
    bias_correction: BiasCorrection | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; supported targets: {', '.join(TARGETS)}")
        preset = PRESETS[self.target]
        if isinstance(self.calibration, Dynamic):
            _dynamic_defaults(self)
        for name in TARGET_FIELDS:
            value = getattr(self, name)
            if self.activations is None and name == "smoothing" and value is FROM_TARGET:
                value = None  # weight-only: nothing to smooth
                object.__setattr__(self, name, None)
            if value is FROM_TARGET or (value is None and name not in ("smoothing", "activations")):
                object.__setattr__(self, name, getattr(preset, name))
        for name in ("activations", "weights"):
            if not isinstance(getattr(self, name), QuantSpec) and not (
                (name == "activations" and self.activations is None)
                or (name == "weights" and isinstance(self.weights, Codebook))
            ):
                raise ConfigError(f"{name} must be a QuantSpec(...), not {getattr(self, name)!r}")
        _check_weight_only(self)
        _check_calibration(self.calibration)
        if isinstance(self.calibration, Dynamic):
            _check_dynamic(self)
        if not isinstance(self.activation_matmuls, bool):
            raise ConfigError(f"activation_matmuls must be true or false, not {self.activation_matmuls!r}")
        if self.smoothing is not None and not isinstance(self.smoothing, SmoothQuant):
            raise ConfigError(f"smoothing must be SmoothQuant(...) or None, not {self.smoothing!r}")
        _check_conv_chain_options(self)
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError("num_samples must be a positive integer or None")
        for name in ("op_types", "exclude_nodes", "exclude_op_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(f"{name} must be a list of strings, not the single string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "overrides", dict(self.overrides))

    def with_changes(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (the config itself is immutable).

        Changing ``target`` moves the target-dependent fields that still hold the old target's
        preset to the new target's preset; values set to something else are kept.
        """
        target = changes.get("target", self.target)
        calibration = changes.get("calibration", self.calibration)
        if isinstance(self.calibration, Dynamic) != isinstance(calibration, Dynamic):
            for name in ("activations", "smoothing"):  # their defaults differ between the two modes
                changes.setdefault(name, FROM_TARGET)
        if target != self.target and target in PRESETS:
            old = PRESETS[self.target]
            for name in TARGET_FIELDS:
                if name not in changes and getattr(self, name) == getattr(old, name):
                    changes[name] = FROM_TARGET
        return replace(self, **changes)

    # --- JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``QuantConfig.from_dict(c.to_dict()) == c``."""
        if self.exclude_if is not None:
            raise ConfigError(
                "a config with an exclude_if predicate cannot be serialised; "
                "use exclude_nodes or exclude_op_types instead"
            )
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "exclude_if":
                continue
            value = getattr(self, f.name)
            if f.name in ("activations", "weights"):
                value = None if value is None else _spec_to_dict(value)
            elif f.name == "calibration":
                value = _calibration_to_dict(value)
            elif f.name == "smoothing":
                value = None if value is None else {**asdict(value), "alphas": list(value.alphas)}
            elif f.name == "overrides":
                value = {k: (None if v is None else _spec_to_dict(v)) for k, v in value.items()}
            elif f.name in ("equalization", "bias_correction"):
                value = (
                    None
                    if value is None
                    else {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()}
                )
            elif f.name == "algorithm":
                value = None if value is None else {"kind": type(value).__name__, **asdict(value)}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error that names them."""
        if not isinstance(data, Mapping):
            raise ConfigError("a config must be a JSON object")
        known = {f.name for f in fields(cls)} - {"exclude_if"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        kwargs: dict[str, Any] = dict(data)
        try:
            for key in ("activations", "weights"):
                if kwargs.get(key) is not None:
                    kwargs[key] = _spec_from_dict(kwargs[key])
            if "calibration" in kwargs:
                kwargs["calibration"] = _calibration_from_dict(kwargs["calibration"])
            if kwargs.get("smoothing") is not None:
                if not isinstance(kwargs["smoothing"], Mapping):
                    raise ConfigError('smoothing must be an object like {"alpha": 0.5} or null')
                _check_keys(kwargs["smoothing"], {f.name for f in fields(SmoothQuant)}, "smoothing")
                kwargs["smoothing"] = SmoothQuant(**kwargs["smoothing"])
            if "overrides" in kwargs:
                kwargs["overrides"] = {
                    k: (None if v is None else _spec_from_dict(v)) for k, v in kwargs["overrides"].items()
                }
            for key, cls_ in (("equalization", CrossLayerEqualization), ("bias_correction", BiasCorrection)):
                if kwargs.get(key) is not None:
                    if not isinstance(kwargs[key], Mapping):
                        raise ConfigError(f"{key} must be an object (e.g. {{}}) or null")
                    _check_keys(kwargs[key], {f.name for f in fields(cls_)}, key)
                    kwargs[key] = cls_(**kwargs[key])
            if kwargs.get("algorithm") is not None:
                kwargs["algorithm"] = _algorithm_from_dict(kwargs["algorithm"])
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"invalid config: {exc}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> QuantConfig:
        """Read a config from JSON text or from a ``.json`` file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text_or_path).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read config file {text_or_path}: {exc.strerror}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON ({exc.msg} at line {exc.lineno})") from None

    @classmethod
    def weight_only(
        cls,
        dtype: str = "int4",
        block_size: int | None = 128,
        *,
        symmetric: bool = True,
        codebook: Codebook | None = None,
        weight_format: str = "dequantize_linear",
        **changes: Any,
    ) -> QuantConfig:
        """Weight-only quantization, no calibration data: ``dtype`` weights (``PerBlock(block_size)``,
        or per channel when ``block_size`` is None) or a ``codebook``; activations stay float.
        ``weight_format``: ``"dequantize_linear"`` (opset-21 blocked DequantizeLinear, which ORT fuses
        into MatMulNBits) or ``"matmul_nbits"`` (``com.microsoft::MatMulNBits`` written directly).
        ``algorithm=GPTQ()`` or ``AWQ()`` (in ``changes``) replaces round-to-nearest and then needs
        calibration data."""
        weights: QuantSpec | Codebook = codebook or QuantSpec(
            dtype,
            symmetric,
            PerChannel() if block_size is None else PerBlock(block_size),  # type: ignore[arg-type]
        )
        return cls(activations=None, weights=weights, weight_format=weight_format, **changes)  # type: ignore[arg-type]

    @classmethod
    def for_target(cls, target: str, **changes: Any) -> QuantConfig:
        """The preset for a target runtime (see :data:`PRESETS`), with optional changes that win
        over it."""
        return cls(target=target, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TargetPreset:
    """The defaults of the target-dependent config fields for one runtime, and why."""

    activations: QuantSpec
    weights: QuantSpec
    smoothing: SmoothQuant | None
    why: str
    activation_matmuls: bool = True


# Config fields whose default comes from the target's preset.
TARGET_FIELDS = ("activations", "weights", "smoothing", "activation_matmuls")

_W8_PER_CHANNEL = QuantSpec("int8", True, PerChannel())

PRESETS: dict[str, TargetPreset] = {
    "cpu": TargetPreset(
        QuantSpec("uint8", False, PerTensor()),
        _W8_PER_CHANNEL,
        SmoothQuant(),
        "ORT's CPU EP runs uint8 activations x int8 weights fastest (VNNI/AVX2: 2.5x fp32 on "
        "BERT-base, int8 activations run slower than fp32); SmoothQuant keeps transformers' "
        "outlier channels inside the per-tensor uint8 range, and computes the few it cannot "
        "tame (a decoder's massive activations) in float beside the int8 MatMul. Attention's "
        "activation x activation MatMuls stay float: quantizing Q, K, V and the softmax output "
        "costs ORT as much time as the int8 MatMuls save, and 8-bit softmax probabilities cost "
        "decoders accuracy (SmolLM2: +4.07% -> +2.26% perplexity kept float).",
        activation_matmuls=False,
    ),
    "qnn": TargetPreset(
        QuantSpec("uint16", False, PerTensor()),
        _W8_PER_CHANNEL,
        None,
        "Qualcomm HTP runs every op quantized; A16W8 (uint16 asymmetric activations, int8 "
        "symmetric weights) is the mode its kernels support everywhere and keeps transformers "
        "accurate: 16-bit steps hold outlier channels and softmax inputs without help, so "
        "SmoothQuant is off (its Mul would itself run on the unsmoothed, quantized tensor).",
    ),
    "tensorrt": TargetPreset(
        QuantSpec("int8", True, PerTensor()),
        _W8_PER_CHANNEL,
        SmoothQuant(float_channels=0),
        "TensorRT's explicit quantization only accepts int8 with zero point 0: symmetric int8 "
        "activations per tensor, int8 symmetric weights per output channel; SmoothQuant as on CPU, "
        "without float channels (every MatMul input stays a Q/DQ pair, as TensorRT expects).",
    ),
    "openvino": TargetPreset(
        QuantSpec("uint8", False, PerTensor()),
        _W8_PER_CHANNEL,
        SmoothQuant(float_channels=0),
        "NNCF's 'mixed' preset (its default for transformers): int8 symmetric per-channel weights "
        "and uint8 asymmetric per-tensor activations, which OpenVINO's CPU plugin runs as u8s8 "
        "kernels with zero-point compensation; SmoothQuant as NNCF applies it to transformers "
        "(without float channels).",
    ),
}


_CALIBRATIONS: dict[str, type] = {c.__name__: c for c in (MinMax, Percentile, Entropy, MSE, Dynamic)}

# What DynamicQuantizeLinear computes at run time: the only activation spec a Dynamic() config has.
DYNAMIC_ACTIVATIONS = QuantSpec("uint8", False, PerTensor())


def _dynamic_defaults(config: QuantConfig) -> None:
    """A Dynamic() config's target-dependent defaults: run-time uint8 activations, no SmoothQuant
    (it needs calibration statistics)."""
    if config.activations is FROM_TARGET:
        object.__setattr__(config, "activations", DYNAMIC_ACTIVATIONS)
    if config.smoothing is FROM_TARGET:
        object.__setattr__(config, "smoothing", None)


def _check_dynamic(config: QuantConfig) -> None:
    """Settings a Dynamic() config cannot honour, each refused with the fix."""
    if config.target in ("qnn", "tensorrt"):
        runtime = "QNN-HTP" if config.target == "qnn" else "TensorRT's ONNX parser"
        raise ConfigError(
            f"target {config.target!r} cannot quantize at run time ({runtime} has no "
            f"DynamicQuantizeLinear); calibrate statically: QuantConfig(target={config.target!r}) "
            "with calibration data, or use Dynamic() with target 'cpu' or 'openvino'"
        )
    if config.activations != DYNAMIC_ACTIVATIONS:
        raise ConfigError(
            "Dynamic() quantizes activations to uint8 asymmetric per tensor at run time "
            "(DynamicQuantizeLinear); leave activations unset or use a static calibration such as MinMax()"
        )
    if not isinstance(config.weights, QuantSpec) or config.weights.dtype not in ("int8", "uint8"):
        raise ConfigError(
            "Dynamic() runs 8-bit integer MatMuls; use weights=QuantSpec('int8', True, PerChannel())"
        )
    if getattr(config, "weight_format", "dequantize_linear") != "dequantize_linear":
        raise ConfigError(
            "Dynamic() stores 8-bit weights for MatMulInteger; weight_format='matmul_nbits' belongs to "
            "weight-only quantization: drop weight_format or calibration=Dynamic()"
        )
    if config.smoothing is not None:
        raise ConfigError(
            "SmoothQuant needs calibration statistics; use smoothing=None with Dynamic(), "
            "or a static calibration such as MinMax()"
        )


def _check_conv_chain_options(config: QuantConfig) -> None:
    """Types of ``equalization`` / ``bias_correction``; bias correction needs calibrated activations."""
    if config.equalization is not None and not isinstance(config.equalization, CrossLayerEqualization):
        raise ConfigError(
            f"equalization must be CrossLayerEqualization(...) or None, not {config.equalization!r}"
        )
    bc = config.bias_correction
    if bc is not None and not isinstance(bc, BiasCorrection):
        raise ConfigError(f"bias_correction must be BiasCorrection(...) or None, not {bc!r}")
    if bc is not None and (config.activations is None or isinstance(config.calibration, Dynamic)):
        raise ConfigError(
            "BiasCorrection() needs the per-channel input means of a static calibration: use it with "
            "calibrated activations (not weight-only, not Dynamic())"
        )


def _check_calibration(value: object) -> None:
    if not isinstance(value, tuple(_CALIBRATIONS.values())):
        raise ConfigError(
            f"calibration must be one of {', '.join(f'{n}()' for n in _CALIBRATIONS)}, not {value!r}"
        )


def _calibration_to_dict(value: Calibration) -> dict[str, Any]:
    return {"method": type(value).__name__, **asdict(value)}


def _calibration_from_dict(data: Any) -> Calibration:
    if not isinstance(data, Mapping):
        raise ConfigError(f'a calibration must be an object like {{"method": "MinMax"}}, got {data!r}')
    cal = dict(data)
    method = cal.pop("method", "MinMax")
    if method not in _CALIBRATIONS:
        raise ConfigError(f"unknown calibration method {method!r}; use one of {', '.join(_CALIBRATIONS)}")
    cls = _CALIBRATIONS[method]
    _check_keys(cal, {f.name for f in fields(cls)}, f"{method} calibration")
    return cls(**cal)


def _check_keys(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; valid keys are {sorted(allowed)}")


def _check_weight_only(config: QuantConfig) -> None:
    """Low-bit types, blocks and codebooks are weight-only; weight-only configs take no activation
    settings that would be silently ignored."""
    if config.weight_format not in ("dequantize_linear", "matmul_nbits"):
        raise ConfigError(
            f"unknown weight_format {config.weight_format!r}; use 'dequantize_linear' or 'matmul_nbits'"
        )
    w = config.weights
    low_bit = isinstance(w, Codebook) or w.dtype not in INT_TYPES or isinstance(w.granularity, PerBlock)
    if config.activations is not None and low_bit:
        raise ConfigError(
            "low-bit, blocked and codebook weights are weight-only: use activations=None, e.g. "
            "QuantConfig.weight_only('int4', block_size=128)"
        )
    if config.activations is None and config.smoothing is not None:
        raise ConfigError("SmoothQuant needs calibrated activations; use smoothing=None for weight-only")
    if config.activations is None and config.equalization is not None:
        raise ConfigError(
            "CrossLayerEqualization() balances Conv/Gemm chains for 8-bit per-tensor weights of static "
            "or dynamic quantization; use equalization=None for weight-only"
        )
    _check_algorithm(config)


def _check_algorithm(config: QuantConfig) -> None:
    """GPTQ/AWQ replace round-to-nearest of integer weight-only configs only."""
    algo = config.algorithm
    if algo is None:
        return
    if not isinstance(algo, GPTQ | AWQ):
        raise ConfigError(f"algorithm must be GPTQ(...), AWQ(...) or None, not {algo!r}")
    w = config.weights
    if (
        config.activations is not None
        or isinstance(w, Codebook)
        or w.dtype not in ("int8", "uint8", "int4", "uint4", "int2", "uint2")
    ):
        raise ConfigError(
            f"{type(algo).__name__}() quantizes integer weights of weight-only configs: use e.g. "
            f"QuantConfig.weight_only('int4', 128, algorithm={type(algo).__name__}())"
        )


def _algorithm_from_dict(data: Any) -> WeightAlgorithm:
    if not isinstance(data, Mapping):
        raise ConfigError(f'algorithm must be an object like {{"kind": "GPTQ"}} or null, got {data!r}')
    algo = dict(data)
    kind = algo.pop("kind", None)
    classes = {"GPTQ": GPTQ, "AWQ": AWQ}
    if kind not in classes:
        raise ConfigError(f"unknown algorithm {kind!r}; use 'GPTQ' or 'AWQ'")
    _check_keys(algo, {f.name for f in fields(classes[kind])}, f"{kind} algorithm")
    if isinstance(algo.get("awq"), Mapping):
        _check_keys(algo["awq"], {f.name for f in fields(AWQ)}, "awq")
        algo["awq"] = AWQ(**algo["awq"])
    return classes[kind](**algo)


def _spec_to_dict(spec: QuantSpec | Codebook) -> dict[str, Any]:
    if isinstance(spec, Codebook):
        return {"codebook": asdict(spec)}
    gran = spec.granularity
    g: dict[str, Any] = (
        {"kind": "per_tensor"}
        if isinstance(gran, PerTensor)
        else {"kind": "per_block", "size": gran.size}
        if isinstance(gran, PerBlock)
        else {
            "kind": "per_channel",
            "axis": gran.axis,
        }
    )
    out = {"dtype": spec.dtype, "symmetric": spec.symmetric, "granularity": g}
    if spec.calibration is not None:
        out["calibration"] = _calibration_to_dict(spec.calibration)
    return out


def _spec_from_dict(data: Mapping[str, Any]) -> QuantSpec | Codebook:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a quantization spec must be an object, got {data!r}")
    if "codebook" in data:
        _check_keys(data, {"codebook"}, "codebook spec")
        _check_keys(data["codebook"], {f.name for f in fields(Codebook)}, "codebook")
        return Codebook(**data["codebook"])
    _check_keys(data, {"dtype", "symmetric", "granularity", "calibration"}, "quantization spec")
    gran = data.get("granularity", {"kind": "per_tensor"})
    if isinstance(gran, Mapping):
        _check_keys(gran, {"kind", "axis", "size"}, "granularity")
    kind = gran.get("kind") if isinstance(gran, Mapping) else gran
    if kind == "per_tensor":
        granularity: Granularity = PerTensor()
    elif kind == "per_channel":
        granularity = PerChannel(gran.get("axis") if isinstance(gran, Mapping) else None)
    elif kind == "per_block" and isinstance(gran, Mapping):
        granularity = PerBlock(gran.get("size", 128))
    else:
        raise ConfigError(f"unknown granularity {kind!r}; use 'per_tensor', 'per_channel' or 'per_block'")
    return QuantSpec(
        dtype=data.get("dtype", "uint8"),
        symmetric=bool(data.get("symmetric", False)),
        granularity=granularity,
        calibration=_calibration_from_dict(data["calibration"]) if data.get("calibration") else None,
    )
