"""Small fx helpers shared by structure discovery and the passes."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

Node = fx.Node


def is_op(node: Any, ops: Iterable[Any]) -> bool:
    return isinstance(node, Node) and (node.op == "call_function") and (node.target in ops)


@functools.cache
def _schema_arg_names(target: Any) -> tuple[str, ...]:
    schema = getattr(target, "_schema", None)
    return tuple(a.name for a in schema.arguments) if schema is not None else ()


def args_of(node: Node) -> dict[str, Any]:
    """The node's arguments by schema name (ATen overloads), so no pass reads them by position."""
    names = _schema_arg_names(node.target)
    if names:
        out = dict(zip(names, node.args, strict=False))
        out.update(node.kwargs)
        return out
    norm = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    return dict(norm.kwargs) if norm is not None else dict(node.kwargs)


def set_arg(node: Node, name: str, value: Any) -> None:
    """Set one argument by schema name, wherever it currently sits (args or kwargs)."""
    names = _schema_arg_names(node.target)
    if name in node.kwargs or name not in names[: len(node.args)]:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs
        return
    args = list(node.args)
    args[names.index(name)] = value
    node.args = tuple(args)


def tensor_meta(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def module_path(node: Node) -> str:
    """Innermost module path from nn_module_stack, without the wrapper's `model.` prefix."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").removeprefix("model.")
    return path


def param_target(node: Any) -> str | None:
    return node.target if (isinstance(node, Node) and node.op == "get_attr") else None


def get_param(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return gm.get_parameter(target) if _is_param(gm, target) else gm.get_buffer(target)


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    mod_path, _, name = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    return name in mod._parameters


def set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a parameter (or buffer) tensor in place of the old one, keeping its kind."""
    mod_path, _, name = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    if name in mod._parameters:
        mod._parameters[name] = torch.nn.Parameter(value.detach().contiguous(), requires_grad=False)
    else:
        mod._buffers[name] = value.detach().contiguous()


def remove_unused_parameters(gm: fx.GraphModule) -> int:
    """Drop parameters and buffers no get_attr node reads; returns how many elements were freed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    freed = 0
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if name in used:
            continue
        mod_path, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_path) if mod_path else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
        else:
            continue
        freed += t.numel()
    return freed


def count_parameters(gm: fx.GraphModule) -> int:
    """Elements of the distinct parameters the graph reads (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        try:
            t = get_param(gm, n.target)
        except AttributeError:
            continue
        if isinstance(t, torch.nn.Parameter) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _impure(node: Node) -> bool:
    # fx treats SDPA, dropout and metadata asserts as side-effecting, which would keep a dropped
    # branch alive (and everything feeding it). At inference they are pure functions of inputs.
    from trimformer.graph import ops

    if is_op(node, ops.SDPA | ops.DROPOUT | ops.METADATA_ASSERTS):
        return False
    return node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove nodes whose values nothing reads, inference-pure ops included."""
    gm.graph.eliminate_dead_code(is_impure_node=_impure)


def finish(gm: fx.GraphModule) -> None:
    """After surgery: drop dead nodes and unread weights, lint, regenerate code."""
    eliminate_dead_code(gm)
    remove_unused_parameters(gm)
    gm.graph.lint()
    gm.recompile()


def token_mask(batch: dict[str, torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """Non-pad positions of a tapped value (B, S, F) or (B·S, F): index it as value[mask].

    Every position counts when the batch has no attention mask or the value is not per token.
    """
    mask = batch.get("attention_mask")
    lead = value.shape[:-1]
    if mask is None or mask.numel() != math.prod(lead):
        return torch.ones(lead, dtype=torch.bool)
    return mask.bool().reshape(lead)


def sum_over_tokens(
    gm: fx.GraphModule,
    pairs: list[tuple[Node, Node]],
    batches: Iterable[dict[str, torch.Tensor]],
    stat: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor], int]:
    """Σ over non-pad tokens of stat(x, y) (x, y: (T, F) in fp64) for each node pair, and T."""
    probe = tap(gm, [n for pair in pairs for n in pair])
    sums: list[torch.Tensor] = [torch.zeros((), dtype=torch.float64)] * len(pairs)
    count = 0
    with torch.no_grad():
        for batch in batches:
            vals = probe(**batch)
            mask = token_mask(batch, vals[0])
            for i in range(len(pairs)):
                x, y = vals[2 * i][mask].double(), vals[2 * i + 1][mask].double()
                sums[i] = sums[i] + stat(x, y).sum(dim=0)
            count += int(mask.sum())
    return sums, count


def tap(gm: fx.GraphModule, nodes: list[Node]) -> fx.GraphModule:
    """A GraphModule sharing gm's weights that returns the values of `nodes` (in order)."""
    graph = fx.Graph()
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[n] for n in nodes))
    probe = fx.GraphModule(gm, graph)
    eliminate_dead_code(probe)
    probe.recompile()
    return probe


def _fake_mode(gm: fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])


def add_param(gm: fx.GraphModule, target: str, value: torch.Tensor, *, before: Node) -> Node:
    """Register `value` as a new frozen parameter and return a get_attr node reading it.

    The name is `target` if free, else `target_1`, `target_2`, ... on the same submodule (which
    must exist). The node is inserted before `before` and carries a fake `meta["val"]`.
    """
    mod_path, _, base = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    name, i = base, 0
    while hasattr(mod, name):
        i += 1
        name = f"{base}_{i}"
    mod.register_parameter(
        name, torch.nn.Parameter(value.detach().contiguous(), requires_grad=False)
    )
    full = f"{mod_path}.{name}" if mod_path else name
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(full)
    mode = _fake_mode(gm)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(get_param(gm, full), static_shapes=True)
    return node


def annotate(node: Node, like: Node, note: str) -> None:
    """Give a new call_function node its fake `meta["val"]` (computed from its inputs' values),
    the module path of `like` (the node it replaces), and provenance in `meta["trimformer"]`."""
    from torch._guards import detect_fake_mode

    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["trimformer"] = note
    vals = [n.meta.get("val") for n in node.all_input_nodes]
    mode = detect_fake_mode([v for v in vals if v is not None])
    if mode is None or any(v is None for v in vals):
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]
