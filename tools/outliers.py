"""Where the largest values of a decoder's MatMul inputs sit: in which channels, at which token.

For every MatMul of the fp32 model whose node name contains ``--match`` (default: the MLP
down-projections), the tensor it reads is fetched on ``--windows`` 512-token windows of the Python
FAQ and one line is printed: the largest magnitude, the token position and channel holding it, the
largest magnitude at any *other* token position, and the median channel's largest magnitude. A
"massive activation" is a first-token value hundreds of times larger than anything at the other
positions; it is what the float outlier channels of ``SmoothQuant`` are for.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/outliers.py [--model smollm2-135m] [--match down_proj]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a causal-LM recipe of models/")
    p.add_argument("--match", default="down_proj", help="substring of the MatMul node names")
    p.add_argument("--windows", type=int, default=4, help="512-token windows of the Python FAQ")
    args = p.parse_args(argv)

    path = models.build(args.model)
    proto = onnx.load(str(path))
    inputs = [n.input[0] for n in proto.graph.node if n.op_type == "MatMul" and args.match in n.name]
    names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and args.match in n.name]
    for name in dict.fromkeys(inputs):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    del proto
    wanted = {i.name for i in session.get_inputs()}
    peaks: dict[str, np.ndarray] = {}  # input -> [windows, tokens, channels] |x| maxima kept per token
    for window in models.text_windows(args.model, "faq", args.windows, 512):
        feed = {k: v for k, v in models.causal_lm_feed(window[None, :]).items() if k in wanted}
        for name, value in zip(inputs, session.run(inputs, feed), strict=True):
            x = np.abs(value.reshape(-1, value.shape[-1]))
            peaks.setdefault(name, np.zeros((0, *x.shape), np.float32))
            peaks[name] = np.concatenate([peaks[name], x[None]])
    print(f"{'MatMul':<44} {'max |x|':>9} {'token':>5} {'channel':>7} {'other tokens':>12} {'median ch':>9}")
    for node, name in zip(names, inputs, strict=True):
        x = peaks[name]
        w, t, c = np.unravel_index(int(np.argmax(x)), x.shape)
        others = np.delete(x, t, axis=1).max()
        median = float(np.median(x.max(axis=(0, 1))))
        print(f"{node:<44} {x[w, t, c]:>9.1f} {t:>5} {c:>7} {others:>12.1f} {median:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
