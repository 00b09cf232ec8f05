"""Small fx helpers shared by structure discovery and the passes."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
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


def tensor_inputs(node: Node) -> Iterator[Node]:
    for a in node.all_input_nodes:
        yield a


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


def finish(gm: fx.GraphModule) -> None:
    """After surgery: drop dead nodes and unread weights, lint, regenerate code."""
    gm.graph.eliminate_dead_code()
    remove_unused_parameters(gm)
    gm.graph.lint()
    gm.recompile()


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
    probe.graph.eliminate_dead_code()
    probe.recompile()
    return probe
