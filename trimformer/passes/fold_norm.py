"""fold-norm — fold the elementwise affine of normalizations into the linears they feed (exact).

A per-channel affine `s ⊙ x + t` whose every reader is a linear `y = W x + c` (W is [out, C]) is
absorbed by those linears (the fold SLAB uses to merge RepBN at inference: Guo et al., "SLAB",
ICML 2024, arXiv 2405.11582; the same algebra as folding BatchNorm into a convolution):

    W' = W · diag(s)          c' = c + W t          (GPT-2 Conv1D, W stored [in, out]:
                                                       W' = diag(s) W,  c' = c + t W)

Which affines (C = the channel axis, always the last one):
- LayerNorm  `γ ⊙ (x − μ)/σ + β`:  s = γ, t = β; the layer_norm stays, without weight and bias;
- RMSNorm    `γ ⊙ x / rms(x)`:     s = γ, t = 0; the final `mul(weight, ·)` is removed;
- eval-mode BatchNorm on (N, C) tokens: s = w / sqrt(var + eps), t = b − mean · s; the BN goes;
- a per-channel affine `x * a (+ b)` with parameter vectors a, b (what `repbn` leaves behind).

A reader counts as a linear when it is `aten.linear` / `aten.addmm` taking the tensor as its
input, reached directly or through ops that keep the channel axis last and the values unchanged
(view/reshape to [..., C], eval-mode dropout, same-dtype casts, metadata asserts). The fold runs
in float64 and is cast back, so the outputs match the unfolded graph up to float rounding.

Where the shift goes (t ≠ 0). When every reader has a bias, into the biases (c' = c + W t: free).
When some reader has none (Llama's q/k/v/gate/up after `repbn`), giving each a bias costs one
add per reader on its *output* (onnxruntime runs MatMul + Add; 5 readers of a 256-channel
norm in the sample add 1,888 channels per token per block). With `shift_on_input` (default)
and no zero in s, the shift is added once on the C-channel input instead:

    W (s ⊙ n + t) = (W · diag(s)) (n + t / s)      one add over C channels, no new biases

Surgery, Llama pre-norm q/k/v (GPT-2: the same with layer_norm(x, [C], None, None) left behind):

    before                                    after
    r = x * rsqrt(mean(x^2, -1) + eps)        r = x * rsqrt(mean(x^2, -1) + eps)
    n = mul(γ, r)                             q = linear(r, Wq·diag(γ))
    q = linear(n, Wq); k = ...; v = ...       k = linear(r, Wk·diag(γ)); v = ...

Kept as is, with the reason in the record:
- a reader is not a linear: BERT's post-norm output is also the residual stream (the next
  sub-layer's residual add), and the last norm is often the model output itself;
- a reader's weight is shared (GPT-2 / Llama lm_head tied to the embedding): folding would change
  the other user too. `untie_shared` gives that linear its own folded copy instead (the record
  counts the parameters this adds).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import Field
from torch import fx

from trimformer.graph import ops
from trimformer.graph.rewrite import (
    add_param,
    annotate,
    args_of,
    finish,
    get_param,
    is_op,
    module_path,
    param_target,
    set_arg,
    set_param,
    tensor_meta,
)
from trimformer.graph.structure import Structure, match_norm
from trimformer.passes.base import Context, PassConfig, PassSpec

aten = torch.ops.aten
Node = fx.Node

BATCH_NORM = {aten.batch_norm.default}
# Ops a reader may be reached through: they keep the channel axis last and the values as they are.
_THROUGH = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.to.dtype,
    aten._to_copy.default,
    *ops.DROPOUT,
}
# The provenance note `repbn` puts on the affine nodes it leaves behind (see annotate).
REPBN_NOTE = "repbn: eval-mode RepBN as a per-channel affine"


class FoldNormConfig(PassConfig):
    untie_shared: bool = Field(
        False,
        description="also fold into linears whose weight is shared (tied lm_head), giving them "
        "their own folded copy (adds parameters)",
    )
    shift_on_input: bool = Field(
        True,
        description="when a reading linear has no bias, add the shift once on the input "
        "(x + t/s) instead of giving every reader a bias",
    )


@dataclass(frozen=True)
class Site:
    """One per-channel affine `scale ⊙ x + shift` the pass may fold."""

    kind: str  # "layer_norm" | "rms_norm" | "batch_norm" | "affine"
    node: Node  # the output the readers read
    bare: Node  # what the readers read after the fold (the node itself for layer_norm)
    scale: torch.Tensor | None  # [C]
    shift: torch.Tensor | None  # [C]
    params: tuple[str, ...]  # targets of the parameters the affine reads
    channels: int

    @property
    def name(self) -> str:
        return module_path(self.node) or self.node.name


# ----------------------------------------------------------------------------- matching


def _vector(gm: fx.GraphModule, node: Any, channels: int) -> torch.Tensor | None:
    """A parameter read by `node` that is a per-channel vector ([C] or [1, .., 1, C])."""
    target = param_target(node)
    if target is None:
        return None
    t = get_param(gm, target)
    if (t.numel() != channels) or (t.dim() == 0) or (t.shape[-1] != channels):
        return None
    return t.detach().reshape(channels)


def _channels(node: Any) -> int | None:
    v = tensor_meta(node)
    if v is None or v.dim() == 0 or not isinstance(v.shape[-1], int):
        return None
    return int(v.shape[-1])


def _norm_site(gm: fx.GraphModule, n: Node) -> Site | None:
    norm = match_norm(n)
    if norm is None or (norm.weight is None and norm.bias is None):
        return None
    c = _channels(n)
    if c is None:
        return None
    scale = get_param(gm, norm.weight).detach().reshape(-1) if norm.weight else None
    shift = get_param(gm, norm.bias).detach().reshape(-1) if norm.bias else None
    if any(t is not None and t.numel() != c for t in (scale, shift)):
        return None  # normalized over more than the channel axis
    params = tuple(p for p in (norm.weight, norm.bias) if p is not None)
    if norm.kind == "layer_norm":
        return Site("layer_norm", n, n, scale, shift, params, c)
    a = args_of(n)  # mul(weight, normalized) in either order
    bare = a["other"] if param_target(a["self"]) == norm.weight else a["self"]
    # HF writes `weight * x.to(input_dtype)`; in a float32 model that cast is a no-op, and
    # skipping it leaves the bare `x * rsqrt(...)` that structure discovery still reads as a norm.
    if is_op(bare, {aten.to.dtype, aten._to_copy.default}):
        src = bare.all_input_nodes[0]
        bv, sv = tensor_meta(bare), tensor_meta(src)
        if bv is not None and sv is not None and bv.dtype == sv.dtype:
            bare = src
    return Site("rms_norm", n, bare, scale, None, params, c)


def _batch_norm_site(gm: fx.GraphModule, n: Node) -> Site | None:
    if not is_op(n, BATCH_NORM):
        return None
    a = args_of(n)
    x, c = a["input"], _channels(a["input"])
    xv = tensor_meta(x)
    if a.get("training") or c is None or xv is None or xv.dim() != 2:
        return None  # channel-last (N, C) only; (N, C, L) normalizes a middle axis
    mean, var = _vector(gm, a["running_mean"], c), _vector(gm, a["running_var"], c)
    if mean is None or var is None:
        return None
    w, b = _vector(gm, a.get("weight"), c), _vector(gm, a.get("bias"), c)
    inv = torch.rsqrt(var.double() + float(a["eps"]))
    scale = inv if w is None else w.double() * inv
    shift = -mean.double() * scale if b is None else b.double() - mean.double() * scale
    names = ("weight", "bias", "running_mean", "running_var")
    params = tuple(t for t in (param_target(a.get(k)) for k in names) if t is not None)
    return Site("batch_norm", n, x, scale, shift, params, c)


def _affine_site(gm: fx.GraphModule, n: Node) -> Site | None:
    """`add(mul(x, a), b)`, `mul(x, a)` or `add(x, b)` with per-channel parameter vectors."""
    c = _channels(n)
    if c is None or not is_op(n, ops.MUL | ops.ADD):
        return None
    a = args_of(n)
    if is_op(n, ops.MUL):
        users = list(n.users)
        if len(users) == 1 and _affine_site(gm, users[0]) is not None:
            return None  # the add after this mul is the site
    for x, p in ((a["self"], a["other"]), (a["other"], a["self"])):
        vec = _vector(gm, p, c)
        if vec is None or not isinstance(x, Node) or param_target(x) is not None:
            continue
        if _channels(x) != c:
            continue  # x is broadcast against the vector, not one value per channel
        if is_op(n, ops.MUL):
            return Site("affine", n, x, vec, None, (param_target(p),), c)  # type: ignore[arg-type]
        if is_op(x, ops.MUL) and len(x.users) == 1:
            inner = args_of(x)
            for xx, pp in ((inner["self"], inner["other"]), (inner["other"], inner["self"])):
                s = _vector(gm, pp, c)
                if (
                    (s is not None)
                    and isinstance(xx, Node)
                    and (param_target(xx) is None)
                    and (_channels(xx) == c)
                ):
                    params = (param_target(pp), param_target(p))
                    return Site("affine", n, xx, s, vec, params, c)  # type: ignore[arg-type]
        return Site("affine", n, x, None, vec, (param_target(p),), c)  # type: ignore[arg-type]
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every foldable-in-principle affine in graph order (readers are checked separately)."""
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        site = _norm_site(gm, n) or _batch_norm_site(gm, n) or _affine_site(gm, n)
        if site is not None:
            sites.append(site)
    return sites


# ----------------------------------------------------------------------------- readers


def _is_linear_reader(u: Node, n: Node, channels: int) -> bool:
    if is_op(u, ops.LINEAR):
        a = args_of(u)
        w = tensor_meta(a["weight"])
        bias = a.get("bias")
        return (
            (a["input"] is n)
            and (param_target(a["weight"]) is not None)
            and (bias is None or param_target(bias) is not None)
            and (w is not None and w.dim() == 2 and w.shape[1] == channels)
        )
    if is_op(u, ops.ADDMM):
        a = args_of(u)
        w = tensor_meta(a["mat2"])
        return (
            (a["mat1"] is n)
            and (param_target(a["mat2"]) is not None)
            and (param_target(a["self"]) is not None)
            and (w is not None and w.shape[0] == channels)
        )
    return False


def _keeps_channels(u: Node, n: Node, channels: int) -> bool:
    if not is_op(u, _THROUGH):
        return False
    if is_op(u, ops.DROPOUT) and args_of(u).get("train", False):
        return False
    uv, nv = tensor_meta(u), tensor_meta(n)
    if uv is None or nv is None or uv.dtype != nv.dtype or _channels(u) != channels:
        return False
    if is_op(u, {aten.view.default, aten.reshape.default, aten._unsafe_view.default}):
        size = args_of(u).get("size", args_of(u).get("shape"))
        return isinstance(size, (list, tuple)) and size[-1] == channels
    return True


def _describe(u: Node, residual_adds: set[Node]) -> str:
    if u.op == "output":
        return "it is the model output"
    if u in residual_adds:
        return f"it is the residual stream too (read by residual add {u.name})"
    op = getattr(u.target, "__name__", str(u.target))
    return f"read by {u.name} ({op}), which is not a linear"


def linear_readers(site: Site, residual_adds: set[Node]) -> list[Node] | str:
    """The linears reading the site's output, or why not every reader is one."""
    readers: list[Node] = []
    todo, seen = [site.node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if is_op(u, ops.METADATA_ASSERTS):
                continue
            if _is_linear_reader(u, n, site.channels):
                readers.append(u)
            elif _keeps_channels(u, n, site.channels):
                todo.append(u)
            else:
                return _describe(u, residual_adds)
    return readers if readers else "no linear reads it"


# ----------------------------------------------------------------------------- folding


def _weight_arg(lin: Node) -> tuple[str, str]:
    return ("mat2", "self") if is_op(lin, ops.ADDMM) else ("weight", "bias")


def _shared(gm: fx.GraphModule, node: Any, names_of: dict[int, list[str]]) -> str | None:
    """The other name under which the parameter read by `node` is used, if any."""
    target = param_target(node)
    if target is None:
        return None
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    if len(readers) > 1 or len(node.users) > 1:
        return target
    others = [m for m in names_of.get(id(get_param(gm, target)), []) if m != target]
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    others = [m for m in others if m in used]
    return others[0] if others else None


def _fold_into(
    gm: fx.GraphModule, lin: Node, site: Site, untie: bool
) -> tuple[int, bool]:  # (bias parameters added, weight untied)
    w_arg, b_arg = _weight_arg(lin)
    a = args_of(lin)
    w_node, b_node = a[w_arg], a.get(b_arg)
    w = get_param(gm, w_node.target).detach()
    wd = w.double()
    transposed = is_op(lin, ops.ADDMM)  # Conv1D: [in, out]
    new_w = wd
    if site.scale is not None:
        s = site.scale.double()
        new_w = wd * s[:, None] if transposed else wd * s[None, :]
    delta = None
    if site.shift is not None and bool((site.shift != 0).any()):
        t = site.shift.double()
        delta = t @ wd if transposed else wd @ t  # from the original W: W (s n + t)
    if untie:
        set_arg(lin, w_arg, add_param(gm, w_node.target, new_w.to(w.dtype), before=lin))
    else:
        set_param(gm, w_node.target, new_w.to(w.dtype))
    added = 0
    if delta is not None:
        if param_target(b_node) is not None:
            b = get_param(gm, b_node.target).detach()
            new_b = (b.double() + delta).to(b.dtype)
            if untie:
                set_arg(lin, b_arg, add_param(gm, b_node.target, new_b, before=lin))
            else:
                set_param(gm, b_node.target, new_b)
        else:
            prefix = w_node.target.rpartition(".")[0]
            target = f"{prefix}.bias" if prefix else "bias"
            set_arg(lin, b_arg, add_param(gm, target, delta.to(w.dtype), before=lin))
            added = delta.numel()
    return added, untie


def _detach_affine(site: Site) -> None:
    """Leave the bare normalization (or nothing) where the affine was."""
    if site.kind == "layer_norm":
        set_arg(site.node, "weight", None)
        set_arg(site.node, "bias", None)
    else:
        site.node.replace_all_uses_with(site.bare)


def _wants_input_shift(site: Site, readers: list[Node]) -> bool:
    """Shift once on the input: some reader lacks a bias, and s has no zero to divide by."""
    if site.shift is None or not bool((site.shift != 0).any()):
        return False
    if site.scale is not None and not bool((site.scale != 0).all()):
        return False
    return any(param_target(args_of(lin).get(_weight_arg(lin)[1])) is None for lin in readers)


def _detach_with_input_shift(gm: fx.GraphModule, site: Site) -> int:
    """`_detach_affine`, but the readers read `bare + t/s` (one add); returns the params added.

        before                        after (readers' weights already W·diag(s))
        n = bare normalization        n = bare normalization
        y = s ⊙ n + t                 m = add(n, t/s)
        q = linear(y, W)              q = linear(m, W·diag(s))

    Only the affine's own readers are rewired: `bare` may have other users (the residual add).
    """
    if site.shift is None:
        raise ValueError("_detach_with_input_shift needs a site with a shift")
    t = site.shift.double()
    value = t / site.scale.double() if site.scale is not None else t
    users = list(site.node.users)
    if site.kind == "layer_norm":
        set_arg(site.node, "weight", None)
        set_arg(site.node, "bias", None)
        n = site.node
    else:
        n = site.bare
    meta = tensor_meta(site.node)
    dtype = meta.dtype if meta is not None else torch.float32
    prefix = site.params[0].rpartition(".")[0]
    target = f"{prefix}.folded_shift" if prefix else "folded_shift"
    p = add_param(gm, target, value.to(dtype), before=site.node)
    with gm.graph.inserting_after(site.node):
        add = gm.graph.call_function(aten.add.Tensor, (n, p))
    annotate(add, site.node, "fold-norm: the folded shift t/s, added once on the input")
    for u in users:
        u.replace_input_with(site.node, add)
    return int(value.numel())


def _record(site: Site, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": site.name, "node": site.node.name, "kind": site.kind}
    out.update(extra)
    return out


def fold_sites(
    gm: fx.GraphModule,
    sites: list[Site],
    residual_adds: set[Node],
    untie_shared: bool = False,
    report_affines: bool = False,
    shift_on_input: bool = True,
) -> dict[str, Any]:
    """Fold each site whose readers are all linears; returns the pass record's changes.

    Affines that are not norms are only listed as kept when `report_affines` (or when `repbn`
    left them), so a model's own layer-scale multiplies do not clutter the record.
    """
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        names_of[id(t)].append(name)
    numel = {p: get_param(gm, p).numel() for s in sites for p in s.params}

    folded, kept = [], []
    biases_added = untied = untied_params = shift_params = 0
    for site in sites:
        readers = linear_readers(site, residual_adds)
        if isinstance(readers, str):
            if site.kind != "affine" or report_affines or site.node.meta.get("trimformer"):
                kept.append(_record(site, reason=readers))
            continue
        shared = {}
        for lin in readers:
            w_arg, b_arg = _weight_arg(lin)
            for arg in (w_arg, b_arg):
                other = _shared(gm, args_of(lin).get(arg), names_of)
                if other is not None:
                    shared[lin] = other
        if shared and not untie_shared:
            lin, other = next(iter(shared.items()))
            reason = (
                f"the weight of {module_path(lin) or lin.name} is shared with {other} (tied); "
                "set untie_shared to fold into a copy"
            )
            kept.append(_record(site, reason=reason))
            continue
        on_input = shift_on_input and _wants_input_shift(site, readers)
        scale_only = replace(site, shift=None) if on_input else site
        into = []
        for lin in readers:
            added, was_untied = _fold_into(gm, lin, scale_only, untie=lin in shared)
            biases_added += added
            if was_untied:
                untied += 1
                untied_params += get_param(gm, args_of(lin)[_weight_arg(lin)[0]].target).numel()
            into.append(module_path(lin) or lin.name)
        if on_input:
            shift_params += _detach_with_input_shift(gm, site)
        else:
            _detach_affine(site)
        folded.append(_record(site, into=into, shift="input" if on_input else "biases"))

    finish(gm)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed_params = {p for s in sites for p in s.params if p not in still_read}
    for rec in folded:
        site = next(s for s in sites if s.node.name == rec["node"])
        rec["params_removed"] = sum(numel[p] for p in site.params if p in removed_params)
    return {
        "folded": folded,
        "kept": kept,
        "folded_count": len(folded),
        "kept_count": len(kept),
        "norm_params_removed": sum(numel[p] for p in removed_params),
        "bias_params_added": biases_added,
        "shift_params_added": shift_params,
        "weights_untied": untied,
        "untied_params_added": untied_params,
    }


def fold_norm(
    gm: fx.GraphModule, structure: Structure, config: FoldNormConfig, ctx: Context
) -> dict[str, Any]:
    """Fold every norm / BN / per-channel affine read only by linears into those linears."""
    adds = {s.add for s in structure.sublayers()}
    return fold_sites(
        gm,
        find_sites(gm),
        adds,
        untie_shared=config.untie_shared,
        shift_on_input=config.shift_on_input,
    )


SPEC = PassSpec(
    name="fold-norm",
    summary="fold norm weight/bias (and eval BatchNorm / per-channel affines) into the linears "
    "that read them",
    exactness="exact",
    config=FoldNormConfig,
    knobs={
        "untie_shared": "also fold into tied linears by giving them a copy (more params)",
        "shift_on_input": "shift added once on the input when a reader has no bias",
    },
    apply=fold_norm,
    paper="SLAB: Efficient Transformers with Simplified Linear Attention and Progressive "
    "Re-parameterized Batch Normalization (ICML 2024), merge step",
)
