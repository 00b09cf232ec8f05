"""Parameters and FLOPs of a graph at a concrete input shape.

Shapes come from running the graph once under FakeTensorMode (no real compute), so the count is
right after passes that change widths. Matmul-like ops only: linear/addmm (2·M·K·N), attention
(QK^T and PV: 4·B·H·S·T·D), matmul/bmm, conv; elementwise work is small beside them and left out.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from trimformer.graph import ops
from trimformer.graph.rewrite import args_of, is_op


def _val_shapes(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> dict[fx.Node, tuple]:
    shapes: dict[fx.Node, tuple] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):  # noqa: ANN201 - fx signature
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(int(s) for s in out.shape)
            return out

    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with mode, torch.no_grad():
        fake = {k: mode.from_tensor(v) for k, v in inputs.items()}
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        Recorder(gm).run(*[fake[p] for p in placeholders])
    return shapes


def count_flops(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> int:
    """Multiply-accumulate work ×2 of the matmul-like ops at the shapes of `inputs`."""
    shapes = _val_shapes(gm, inputs)
    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n not in shapes:
            continue
        out = shapes[n]
        if is_op(n, ops.LINEAR):
            w = shapes.get(args_of(n)["weight"]) or tuple(args_of(n)["weight"].meta["val"].shape)
            total += 2 * math.prod(out) * w[1]
        elif is_op(n, ops.ADDMM):
            m1 = shapes[args_of(n)["mat1"]]
            total += 2 * math.prod(out) * m1[-1]
        elif is_op(n, ops.SDPA):
            a = args_of(n)
            q, k = shapes[a["query"]], shapes[a["key"]]
            total += 4 * math.prod(q[:-1]) * k[-2] * q[-1]
        elif is_op(n, ops.LOCAL_ATTENTION):
            # sink + window keys per query (trimformer::local_attention), averaged over heads
            a = args_of(n)
            q = shapes[a["query"]]
            length = q[2]
            alpha, beta = list(a["window_alpha"]), list(a["window_beta"])
            if len(beta) < len(alpha):
                beta = beta * len(alpha)
            windows = [
                min(length, max(1, int(al + be * length)) + int(a["sink"]))
                for al, be in zip(alpha, beta, strict=False)
            ]
            keys = sum(windows) / len(windows)
            total += int(4 * math.prod(q[:-1]) * keys * q[-1])
        elif is_op(n, ops.MATMUL):
            a = args_of(n)
            lhs = shapes[a["self"]]
            total += 2 * math.prod(out) * lhs[-1]
        elif is_op(n, ops.CONV):
            w = shapes.get(args_of(n)["weight"])
            if w is not None:
                total += 2 * math.prod(out) * math.prod(w[1:])
    return total
