"""A small CNN trained on scikit-learn's 8x8 digits, exported with BatchNormalization kept as nodes.

The data ships with scikit-learn (no download). The split, the initial weights and the training
order are all seeded, and training runs single-threaded, so rebuilding gives the same weights.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

N_TEST = 397
"""Size of the held-out split (the remaining 1,400 images are for training)."""
SPLIT_SEED = 0
TRAIN_SEED = 0
EPOCHS = 20
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
STATE_FILE = "state_dict.npz"
METRICS_FILE = "metrics.json"


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``: the fixed, stratified digits split.

    Images are float32 ``[N, 1, 8, 8]`` scaled from the raw 0..16 pixel range to [-1, 1] (the
    normalisation the CNN recipes were trained with); labels are int64 ``[N]``. 1,400 train and
    397 test images. The arrays are shared between calls and read-only; copy before writing.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=N_TEST, random_state=SPLIT_SEED, stratify=y
    )
    arrays = tuple(np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test))
    for a in arrays:
        a.flags.writeable = False
    return arrays  # type: ignore[return-value]


def onnx_top1(model_path: Path | str, x: np.ndarray, y: np.ndarray, *, batch_size: int = 128) -> float:
    """Return the top-1 accuracy of the ONNX classifier at ``model_path`` on ``(x, y)`` (CPU EP).

    The model must take one input ``[N, 1, 8, 8]`` and give logits ``[N, 10]`` as first output.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = sess.run(None, {in_name: x[start : start + batch_size]})[0]
        correct += int((logits.argmax(axis=1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def _make_net() -> Any:
    """Return the (untrained) torch CNN; torch is imported lazily."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _train() -> tuple[Any, dict[str, Any]]:
    """Train the CNN on the training split; return ``(net in eval mode, training stats)``."""
    import torch

    x_train, y_train, _, _ = digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float reductions on every machine
    try:
        torch.manual_seed(TRAIN_SEED)
        net = _make_net()
        opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
        xt, yt = torch.from_numpy(x_train.copy()), torch.from_numpy(y_train.copy())
        gen = torch.Generator().manual_seed(TRAIN_SEED)
        loss_fn = torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        net.train()
        loss = torch.zeros(())
        for epoch in range(EPOCHS):
            perm = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), BATCH_SIZE):
                idx = perm[start : start + BATCH_SIZE]
                opt.zero_grad()
                loss = loss_fn(net(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
            sched.step()
            logger.debug("epoch %d: last batch loss %.4f", epoch + 1, loss.item())
        train_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    net.eval()
    logger.info("cnn-digits: trained %d epochs in %.1f s (last loss %.4f)", EPOCHS, train_s, loss.item())
    return net, {"epochs": EPOCHS, "train_seconds": round(train_s, 2), "final_batch_loss": loss.item()}


def _export(net: Any, path: Path, opset: int) -> None:
    """Export ``net`` (eval mode) to ``path`` with BatchNormalization kept as nodes."""
    import warnings

    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    model = onnx.load(str(path))
    n_bn = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    if n_bn != 3:
        raise RuntimeError(f"expected 3 BatchNormalization nodes in the export, found {n_bn}")


def _load_trained_net(state_path: Path) -> Any:
    """Return the CNN with the weights saved by the ``cnn-digits`` build, in eval mode."""
    import torch

    with np.load(state_path) as npz:
        state = {k: torch.from_numpy(npz[k]) for k in npz.files}
    net = _make_net()
    net.load_state_dict(state)
    return net.eval()


def _write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def build_cnn_digits(out_dir: Path) -> None:
    """Train the CNN and write ``model.onnx`` (opset 13), its weights and ``metrics.json``.

    Guarantees: input ``input`` float32 ``[batch, 1, 8, 8]``, output ``logits`` float32
    ``[batch, 10]``, three BatchNormalization nodes, fp32 test accuracy recorded as
    ``fp32_top1_accuracy`` (measured with ONNX Runtime on the exported file).
    """
    import torch

    net, stats = _train()
    np.savez(out_dir / STATE_FILE, **{k: v.detach().numpy() for k, v in net.state_dict().items()})
    _export(net, out_dir / "model.onnx", opset=13)
    _, _, x_test, y_test = digits_split()
    with torch.no_grad():
        torch_acc = float((net(torch.from_numpy(x_test.copy())).argmax(1).numpy() == y_test).mean())
    acc = onnx_top1(out_dir / "model.onnx", x_test, y_test)
    logger.info("cnn-digits: fp32 test top-1 %.4f (torch %.4f)", acc, torch_acc)
    if acc < 0.9:
        raise RuntimeError(f"cnn-digits trained to only {acc:.3f} test accuracy (expected > 0.9)")
    _write_metrics(
        out_dir,
        {
            "fp32_top1_accuracy": acc,
            "torch_top1_accuracy": torch_acc,
            "n_train": 1797 - N_TEST,
            "n_test": N_TEST,
            "normalisation": "pixel / 8 - 1 (raw 0..16 -> [-1, 1])",
            **stats,
        },
    )


def _same_function(reference: Path, path: Path, tolerance: float, what: str) -> tuple[float, float]:
    """Test-split top-1 of ``path`` and its largest logit difference to ``reference``, which must be
    within ``tolerance`` (the variants are the same function stored differently)."""
    import onnxruntime as ort

    _, _, x_test, y_test = digits_split()
    ref = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = float(np.abs(ref.run(None, {"input": x_test})[0] - new.run(None, {"input": x_test})[0]).max())
    if diff > tolerance:
        raise RuntimeError(f"{what} differs from cnn-digits by {diff}")
    return onnx_top1(path, x_test, y_test), diff


def initializers_to_constants(model: Any) -> Any:
    """Return ``model`` with every graph initializer replaced by a ``Constant`` node (in place).

    The Constant nodes are put first in the graph and keep the initializer names as outputs, so the
    graph computes exactly the same values.
    """
    from onnx import helper

    graph = model.graph
    consts = [
        helper.make_node("Constant", [], [init.name], name=f"Constant_{init.name}", value=init)
        for init in graph.initializer
    ]
    names = {init.name for init in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name not in names]
    nodes = consts + list(graph.node)
    del graph.initializer[:]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def build_cnn_digits_constants(out_dir: Path, trained_dir: Path) -> None:
    """Write the trained CNN from ``trained_dir`` at opset 11 with every weight in a Constant node.

    Guarantees: same input/output names and shapes as ``cnn-digits``, no initializers, BN kept,
    and logits within 1e-4 of the ``cnn-digits`` model on the test split.
    """
    import onnx

    net = _load_trained_net(trained_dir / STATE_FILE)
    path = out_dir / "model.onnx"
    _export(net, path, opset=11)
    model = initializers_to_constants(onnx.load(str(path)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))

    acc, diff = _same_function(trained_dir / "model.onnx", path, 1e-4, "opset-11 constants export")
    logger.info("cnn-digits-opset11-constants: fp32 test top-1 %.4f (max |diff| %.2e)", acc, diff)
    _write_metrics(
        out_dir,
        {"fp32_top1_accuracy": acc, "n_test": N_TEST, "max_abs_diff_vs_cnn_digits": diff},
    )


UNBALANCE_SEED = 0
UNBALANCE_DECADES = 2.0
"""Channel factors of ``cnn-digits-unbalanced`` are ``10 ** uniform(-2, 2)``: 0.01 .. 100."""


def unbalance_channels(model: Any, seed: int = UNBALANCE_SEED, decades: float = UNBALANCE_DECADES) -> Any:
    """Return ``model`` (the ``cnn-digits`` graph, an ``onnx.ModelProto``) with the output channels of
    its first two Conv+BN blocks scaled by ``f_c = 10 ** uniform(-decades, decades)`` (through the BN
    ``gamma`` and ``beta``) and the matching input channels of the next Conv by ``1 / f_c``, in place.

    Relu and MaxPool commute with positive per-channel factors, so the float function is unchanged
    (up to float32 rounding); the weight ranges of the scaled Convs then span ``10 ** (2 decades)``,
    which per-tensor weight quantization cannot hold. Returns ``{bn_name: factors}`` too.
    """
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    convs = [n for n in nodes if n.op_type == "Conv"]
    factors: dict[str, np.ndarray] = {}
    for first, second in [(convs[0], convs[1]), (convs[1], convs[2])]:
        bn = next(n for n in nodes if n.op_type == "BatchNormalization" and n.input[0] == first.output[0])
        channels = numpy_helper.to_array(inits[bn.input[1]]).shape[0]
        f = 10.0 ** rng.uniform(-decades, decades, size=channels)
        for name in bn.input[1:3]:  # gamma, beta
            arr = numpy_helper.to_array(inits[name]).astype(np.float64) * f
            inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
        w = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64) / f[None, :, None, None]
        inits[second.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), second.input[1]))
        factors[bn.name] = f
    return model, factors


def build_cnn_digits_unbalanced(out_dir: Path, trained_dir: Path) -> None:
    """Write ``cnn-digits`` with deliberately unbalanced channel ranges (:func:`unbalance_channels`).

    Guarantees: same interface as ``cnn-digits``, logits within 1e-3 of it on the test split (float32
    rounding of the scaled weights), same fp32 top-1.
    """
    import onnx

    model, _ = unbalance_channels(onnx.load(str(trained_dir / "model.onnx")))
    path = out_dir / "model.onnx"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    acc, diff = _same_function(trained_dir / "model.onnx", path, 1e-3, "unbalanced cnn-digits")
    logger.info("cnn-digits-unbalanced: fp32 test top-1 %.4f (max |diff| %.2e)", acc, diff)
    _write_metrics(
        out_dir,
        {
            "fp32_top1_accuracy": acc,
            "n_test": N_TEST,
            "max_abs_diff_vs_cnn_digits": diff,
            "channel_factors": f"10 ** uniform(-{UNBALANCE_DECADES}, {UNBALANCE_DECADES}), "
            f"seed {UNBALANCE_SEED}",
        },
    )
