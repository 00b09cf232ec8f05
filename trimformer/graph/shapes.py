"""Keep a graph's concrete sizes true after a pass changed tensor widths.

A pass that slices weights (prune: heads, neurons) changes the widths flowing through the
graph, but views, reshapes and expands downstream still hold the old concrete sizes. Given every
node's shape from before the edit (`shape_snapshot`), `refresh_shapes` re-runs the graph under
its fake mode from the edited nodes on, recomputes each concrete size whose input dims changed
(dims are grouped by equal products, so [B, S, 192] -> [B, S, 3, 64] becomes [B, S, 96] ->
[B, S, 3, 32]...), and refreshes `meta["val"]`, so `discover(gm)` sees the new sizes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from trimformer.errors import PassError
from trimformer.graph.rewrite import args_of, is_op, set_arg

aten = torch.ops.aten


_RESHAPE_ARG = {
    aten.view.default: "size",
    aten.reshape.default: "shape",
    aten._unsafe_view.default: "size",
}


def _hints(shape: Any) -> list[int]:
    return [
        optimization_hint(s, fallback=2) if isinstance(s, torch.SymInt) else int(s) for s in shape
    ]


def _align(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of two shapes with equal products, in order: [2,8,64] / [16,64] ->
    ([0,1],[0]), ([2],[1])."""
    if (0 in a) or (0 in b):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while (i < len(a)) and (j < len(b)):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if (pa < pb) and (i < len(a)):
                pa, i = pa * a[i], i + 1
                gi.append(i - 1)
            elif (pb < pa) and (j < len(b)):
                pb, j = pb * b[j], j + 1
                gj.append(j - 1)
            else:
                return None
        groups.append((gi, gj))
    if groups and all(x == 1 for x in a[i:]) and all(x == 1 for x in b[j:]):
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
        return groups
    return groups if (i == len(a)) and (j == len(b)) else None


def _new_view_size(
    n: fx.Node, size: list[Any], old_in: list[int], new_in: list[int], old_out: list[int]
) -> list[Any]:
    """A view's size list with the concrete entry of every resized dim group recomputed.

    before: view(x[B, S, 192], [B, S, 192])      after: view(x[B, S, 96], [B, S, 96])
    A group holding -1 adapts by itself; else the leftmost concrete entry (heads come before
    head_dim in every layout) takes the change.
    """
    groups = _align(old_in, old_out)
    if groups is None:
        raise PassError(f"cannot relate the dims of {n.name} ({old_in} -> {old_out})")
    size = list(size)
    for gi, gj in groups:
        old_p, new_p = math.prod(old_in[k] for k in gi), math.prod(new_in[k] for k in gi)
        if old_p == new_p or any(size[k] == -1 for k in gj):
            continue
        for k in gj:
            if isinstance(size[k], int) and (size[k] * new_p) % old_p == 0:
                size[k] = size[k] * new_p // old_p
                break
        else:
            raise PassError(
                f"{n.name} reshapes a pruned dimension with symbolic sizes {size}; "
                "this layout is not supported"
            )
    return size


def _signature(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (v.dtype, tuple(str(s) for s in v.shape))
    if isinstance(v, (list, tuple)):
        return tuple(_signature(x) for x in v)
    return str(v) if isinstance(v, torch.SymInt) else type(v).__name__


class _ShapeFixer(FakeTensorProp):
    """Re-run the graph under its fake mode, rewriting concrete sizes whose input dims changed.

    Only nodes downstream of an edit are re-run (an `edited` node, or one reading a node whose
    value changed shape); the others keep their `meta["val"]`, which stays right.
    """

    def __init__(
        self, gm: fx.GraphModule, mode: Any, old: dict[fx.Node, list[int]], edited: set[fx.Node]
    ) -> None:
        super().__init__(gm, mode)
        self.old = old
        self.edited = edited
        self.changed: set[fx.Node] = set()
        self.rewritten: list[str] = []

    def fetch_attr(self, target: str) -> Any:
        t = super().fetch_attr(target)
        if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
            return self._mode.from_tensor(t, static_shapes=True)
        return t

    def run_node(self, n: fx.Node) -> Any:
        before = n.meta.get("val")
        stale = (n in self.edited) or any(i in self.changed for i in n.all_input_nodes)
        if (n.op not in ("placeholder", "output")) and (not stale) and (before is not None):
            return before
        if is_op(n, set(_RESHAPE_ARG) | {aten.expand.default}):
            self._fix(n)
        try:
            result = super().run_node(n)
        except Exception as e:  # any op error here means a size this pass did not rewrite
            raise PassError(
                f"the edited graph does not run at node {n.name} ({n.target}): "
                f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            ) from None
        if _signature(result) != _signature(before):
            self.changed.add(n)
        return result

    def _fix(self, n: fx.Node) -> None:
        src = args_of(n)["self"]
        val = self.env.get(src)
        if (src not in self.old) or (n not in self.old) or not isinstance(val, torch.Tensor):
            return
        old_in, new_in, old_out = self.old[src], _hints(val.shape), self.old[n]
        if old_in == new_in:
            return
        name = _RESHAPE_ARG.get(n.target, "size")  # type: ignore[arg-type]
        size = list(args_of(n)[name])
        if n.target is aten.expand.default:
            new = list(size)
            off = len(size) - len(new_in)
            for d in range(len(new_in)):
                k = d + off
                if (new_in[d] != old_in[d]) and isinstance(new[k], int) and (new[k] != -1):
                    new[k] = new_in[d]
        else:
            new = _new_view_size(n, size, old_in, new_in, old_out)
        if new != size:
            set_arg(n, name, new)
            self.rewritten.append(n.name)


def refresh_shapes(
    gm: fx.GraphModule, old: dict[fx.Node, list[int]], edited: set[fx.Node]
) -> list[str]:
    """After `edited` nodes (parameters, splits, ...) changed, fix the concrete sizes downstream
    and refresh meta["val"]; returns the names of the nodes whose sizes were rewritten.

    `old` holds every node's shape (as integer hints) from before the edits.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode(vals)
    if mode is None or any(not isinstance(v, torch.Tensor) for v in vals):
        raise PassError(
            "the graph's inputs carry no fake values (meta['val']); capture it with "
            "torch.export (trimformer.graph.capture) before editing shapes"
        )
    fixer = _ShapeFixer(gm, mode, old, edited)
    fixer.propagate_dont_convert_inputs(*vals)
    return fixer.rewritten


def shape_snapshot(gm: fx.GraphModule) -> dict[fx.Node, list[int]]:
    return {
        n: _hints(n.meta["val"].shape)
        for n in gm.graph.nodes
        if isinstance(n.meta.get("val"), torch.Tensor)
    }
