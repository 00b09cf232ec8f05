"""Predict the latency of a graph, and of any pass configuration of it, without building it.

Per node, from its shapes at the user's input shape and the device profile:

    linear / addmm       profile "linear:M:K:N"
    attention (SDPA)     profile "sdpa:B:H:S:T:D"
    local attention      profile "local:B:H:N:D:W:S:C" per group of heads sharing window W at
                         N (trimformer::local_attention: sink S, causal C; work ~ N * (W + S))
    everything else      profile "eltwise:<numel rounded to a power of two>" (+ a per-node cost)

A `Plan` says, per block, whether the attention / MLP sub-layer is dropped and what fraction of
heads / neurons pruning keeps. Each node is attributed to the sub-layer whose removal would make it
dead (its *branch*), and knows its role there (q/k/v/o, up/gate/down), so a plan's effect is
computed by dropping or re-shaping those nodes' entries — no graph is built.

Whole-model time is not the plain sum (framework overhead, caches, fusion in onnxruntime), so
the sum is calibrated with a few whole-model measurements: ms = a·matmul + b·other + c, fitted by
non-negative least squares (`calibrate`). Until calibrated, predictions are the raw sum scaled to
the measured baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.optimize import nnls
from torch import fx

from trimformer.cost_model.profile import DeviceProfile
from trimformer.graph import ops
from trimformer.graph.flops import _val_shapes
from trimformer.graph.rewrite import args_of, is_op
from trimformer.graph.structure import Attention, Structure, SubLayer
from trimformer.kernels.local_attention import head_groups, window_size

Role = Literal["q", "k", "v", "qkv", "o", "up", "gate", "down", "core", "other"]


@dataclass(frozen=True)
class Plan:
    """A configuration of the structural passes, in the units the search turns."""

    attention_dropped: frozenset[int] = frozenset()
    mlp_dropped: frozenset[int] = frozenset()
    heads_kept: tuple[tuple[int, float], ...] = ()  # (block, fraction of heads kept)
    neurons_kept: tuple[tuple[int, float], ...] = ()  # (block, fraction of neurons kept)
    int8: bool = False  # dynamic int8 (onnxruntime QInt8, or torchao under torch.compile)

    def heads(self, block: int) -> float:
        return dict(self.heads_kept).get(block, 1.0)

    def neurons(self, block: int) -> float:
        return dict(self.neurons_kept).get(block, 1.0)


@dataclass(frozen=True)
class NodeCost:
    kind: Literal["linear", "sdpa", "local", "other"]
    # linear (M, K, N); sdpa (B, H, S, T, D); local (B, H, N, D, sink, causal); other (numel,)
    dims: tuple[int, ...]
    owner: tuple[int, str] | None  # (block index, "attention" | "mlp")
    role: Role
    groups: tuple[tuple[int, int], ...] = ()  # local: (heads, window at N) per head group


def branch_nodes(gm: fx.GraphModule, s: SubLayer) -> set[fx.Node]:
    """Nodes that become dead when the sub-layer is bypassed (its add and norm included).

    The residual input stays alive: the bypass hands it the sub-layer's users.
    """
    dead: set[fx.Node] = {s.output}
    for n in reversed(list(gm.graph.nodes)):
        if n in dead or n is s.residual or n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.users and all(u in dead for u in n.users):
            dead.add(n)
    return dead


def _roles(s: SubLayer) -> dict[fx.Node, Role]:
    roles: dict[fx.Node, Role] = {}
    site = s.site
    if isinstance(site, Attention):
        fused = site.q.linear is site.k.linear
        for name, proj in (("q", site.q), ("k", site.k), ("v", site.v)):
            roles[proj.linear.node] = "qkv" if fused else name  # type: ignore[assignment]
        roles[site.o.node] = "o"
        roles[site.core] = "core"
    else:
        roles[site.up.node] = "up"
        if site.gate is not None:
            roles[site.gate.node] = "gate"
        roles[site.down.node] = "down"
    return roles


def node_costs(
    gm: fx.GraphModule, structure: Structure, inputs: dict[str, torch.Tensor]
) -> list[NodeCost]:
    """Every compute node of gm at the shapes of `inputs`, attributed to sub-layers."""
    shapes = _val_shapes(gm, inputs)
    owner: dict[fx.Node, tuple[int, str]] = {}
    role: dict[fx.Node, Role] = {}
    for b in structure.blocks:
        for s in b.sublayers:
            for n in branch_nodes(gm, s):
                owner[n] = (b.index, s.kind)
            role.update(_roles(s))
    costs: list[NodeCost] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n not in shapes:
            continue
        out = shapes[n]
        r = role.get(n, "other")
        if is_op(n, ops.LINEAR):
            a = args_of(n)
            w = tuple(a["weight"].meta["val"].shape)
            m = math.prod(out[:-1])
            costs.append(NodeCost("linear", (m, w[1], w[0]), owner.get(n), r))
        elif is_op(n, ops.ADDMM):
            k = shapes[args_of(n)["mat1"]][-1]
            costs.append(NodeCost("linear", (out[0], k, out[1]), owner.get(n), r))
        elif is_op(n, ops.SDPA):
            a = args_of(n)
            q, kk = shapes[a["query"]], shapes[a["key"]]
            costs.append(NodeCost("sdpa", (*q[:3], kk[2], q[3]), owner.get(n), "core"))
        elif is_op(n, ops.LOCAL_ATTENTION):
            a = args_of(n)
            b, h, length, d = shapes[a["query"]]
            groups = tuple(
                (len(heads), window_size(al, be, length))
                for al, be, heads in head_groups(a["window_alpha"], a["window_beta"], h)
            )
            dims = (b, h, length, d, int(a["sink"]), int(bool(a["is_causal"])))
            costs.append(NodeCost("local", dims, owner.get(n), "core", groups))
        elif out and math.prod(out) > 0 and not is_op(n, ops.SHAPE):
            costs.append(NodeCost("other", (math.prod(out),), owner.get(n), "other"))
    return costs


def _pow2(n: int) -> int:
    return 1 << max(0, round(math.log2(max(1, n))))


def _round_width(x: float, multiple: int = 8) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


@dataclass
class CostModel:
    """Latency of plans of one graph, at one shape, on one runtime."""

    costs: list[NodeCost]
    profile: DeviceProfile
    coef: np.ndarray = field(default_factory=lambda: np.array([1.0, 1.0, 0.0]))
    scale: float = 1.0  # until calibrated: measured baseline / raw predicted baseline
    points: list[tuple[np.ndarray, float]] = field(default_factory=list)
    # Measured int8 / fp32 latency of the baseline program on this runtime (torch: the
    # torch.compile'd torchao program over fp32 eager, so compiling is part of the factor).
    int8_factor: float = 1.0

    def entries(self, plan: Plan) -> Iterator[tuple[str, str]]:
        """(bucket, profile key) of every node the plan keeps; bucket "mm" or "other"."""
        for c in self.costs:
            f = 1.0
            if c.owner is not None:
                block, kind = c.owner
                if (kind == "attention" and block in plan.attention_dropped) or (
                    kind == "mlp" and block in plan.mlp_dropped
                ):
                    continue
                f = plan.heads(block) if kind == "attention" else plan.neurons(block)
            if c.kind == "linear":
                m, k, n = c.dims
                if f < 1.0 and c.role in ("q", "k", "v", "qkv", "up", "gate"):
                    n = _round_width(n * f)
                elif f < 1.0 and c.role in ("o", "down"):
                    k = _round_width(k * f)
                yield "mm", f"linear:{m}:{k}:{n}"
            elif c.kind == "sdpa":
                b, h, s, t, d = c.dims
                h = max(1, int(round(h * f)))
                yield "mm", f"sdpa:{b}:{h}:{s}:{t}:{d}"
            elif c.kind == "local":
                b, _, length, d, sink, causal = c.dims
                for heads, w in c.groups:
                    hg = max(1, int(round(heads * f)))
                    yield "mm", f"local:{b}:{hg}:{length}:{d}:{w}:{sink}:{causal}"
            else:
                numel = int(c.dims[0] * f)
                yield "other", f"eltwise:{_pow2(numel)}"

    def features(self, plan: Plan) -> np.ndarray:
        """[matmul-like ms, other ms, 1] of the plan, from the profile."""
        mm = other = 0.0
        for bucket, key in self.entries(plan):
            if bucket == "mm":
                mm += self.profile.time(key)
            else:
                other += self.profile.time(key)
        return np.array([mm, other, 1.0])

    def predict(self, plan: Plan) -> float:
        ms = float(self.features(plan) @ self.coef) * self.scale
        return ms * self.int8_factor if plan.int8 else ms

    def anchor(self, baseline_ms: float) -> None:
        """Scale raw predictions so the unmodified graph predicts its measured latency."""
        raw = float(self.features(Plan()) @ self.coef)
        self.scale = baseline_ms / raw if raw > 0 else 1.0
        self.add_point(Plan(), baseline_ms)

    def add_point(self, plan: Plan, measured_ms: float) -> None:
        # int8 points are stored as their fp32 equivalent so one fit serves both.
        fp32_ms = measured_ms / self.int8_factor if plan.int8 else measured_ms
        self.points.append((self.features(plan), fp32_ms))

    def calibrate(self) -> None:
        """Fit ms = a·matmul + b·other + c on the measured points (needs 3 or more)."""
        if len(self.points) < 3:
            return
        a = np.stack([p[0] for p in self.points])
        y = np.array([p[1] for p in self.points])
        coef, _ = nnls(a, y)
        if coef[0] > 0:
            self.coef, self.scale = coef, 1.0


def ladder_plans(blocks: list[int], fractions: tuple[float, ...] = (0.75, 0.5)) -> list[Plan]:
    """Plans that, together, touch every op shape the search's ladder can produce: the
    baseline and every block at each kept fraction of heads, then of neurons (drops only
    remove ops, so they add no shapes)."""
    plans = [Plan()]
    for f in fractions:
        pairs = tuple((b, f) for b in blocks)
        plans += [Plan(heads_kept=pairs), Plan(neurons_kept=pairs)]
    return plans


def build_profile(
    model: CostModel, blocks: list[int], advance: Callable[[int, int], None] | None = None
) -> tuple[int, int]:
    """Measure every profile entry the ladder needs that the cache lacks, then save it.

    Returns (entries needed, entries measured now); `advance(done, total)` reports progress.
    """
    needed = list(dict.fromkeys(k for p in ladder_plans(blocks) for _, k in model.entries(p)))
    missing = [k for k in needed if k not in model.profile.entries]
    for i, key in enumerate(missing):
        model.profile.time(key)
        if advance is not None:
            advance(i + 1, len(missing))
    model.profile.save()
    return len(needed), len(missing)
