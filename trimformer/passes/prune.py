"""prune — remove attention heads and MLP neurons physically, by importance (lossy).

Paper: "Efficient LLMs with AMP: Attention Heads and MLP Pruning" (Mugnaini et al., IJCNN 2025,
arXiv 2504.21174). The paper recovers quality with LoRA afterwards; this pass is the training-free
part: score, choose, cut.

Importance (AMP §III, "projecting the input data onto the weights"), in fp32, averaged over every
non-pad calibration token t (the paper averages per prompt, then over prompts):

    head h of an attention site, with z_{t,h} ∈ R^d the head's slice of the o-projection input
    and W_O,h = W_O[:, h·d:(h+1)·d] that head's columns of the o-projection weight:
        I_h = mean_t ‖W_O,h z_{t,h}‖₁                 (the head's actual output contribution)
    neuron j of an MLP, with a_{t,j} the input of the down projection:
        I_j = mean_t |a_{t,j}|

The least important heads / neurons of each block go. GQA (num_kv_heads < num_heads), which AMP
itself does not handle, has two modes:
- "groups": remove whole key/value groups (a group's importance is the sum over its query heads);
  k/v projections shrink too and the repeat factor stays;
- "query": remove the same number of query heads inside every group, keeping K/V; the repeat
  factor shrinks.
With plain multi-head attention (num_kv_heads == num_heads) both modes remove heads with their k/v.

Config (`PruneConfig`): `heads` and `neurons` are each a uniform ratio in [0, 1) or a mapping
{block index: count removed | [indices removed]}. Head indices are query-head indices (o-proj
input order). Ratios and counts are turned into explicit index lists by `plan` (which reads
calibration batches); `apply` does the same when handed a ratio or a count and records the
resolved config in its changes (`resolved`), so a recipe replays exactly, without calibration.
Kept neuron counts are rounded to a multiple of `round_to` (never below it, never to zero).

Surgery (B batch, S sequence, H→H' heads, d head size, I→I' neurons), e.g. Llama with GQA:

    before                                         after ("groups": KV→KV', rep = H/KV kept)
    q = linear(x, Wq[H·d, D])  view(B,S,-1,d)      q = linear(x, Wq[H'·d, D])   (rows sliced)
    k = linear(x, Wk[KV·d, D]) ...                 k = linear(x, Wk[KV'·d, D])
    expand(k5, [B, KV, rep, S, d])                 expand(k5, [B, KV', rep, S, d])
    reshape(.., [B, H, S, d]) -> sdpa              reshape(.., [B, H', S, d]) -> sdpa
    o = linear(attn, Wo[D, H·d])                   o = linear(attn, Wo[D, H'·d]) (columns sliced)
    down(act(gate(x)) * up(x)), W[I, D], Wd[D, I]  same with W[I', D], Wd[D, I']

GPT-2's fused `c_attn` (Conv1D, weight [in, out]) loses the right column segments of each of its
q/k/v thirds, and its `split` sizes and the concrete widths in the views around every `addmm`
are rewritten. Every concrete size in a view/reshape/expand whose input changed is recomputed
while the graph is re-run under FakeTensorMode, which also refreshes `meta["val"]`, so
`discover(gm)` reports the new head counts and widths (checked before the pass returns).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import fx

from trimformer.errors import PassError
from trimformer.graph import ops
from trimformer.graph.rewrite import (
    args_of,
    finish,
    get_param,
    is_op,
    set_arg,
    set_param,
    tap,
    token_mask,
)
from trimformer.graph.shapes import refresh_shapes, shape_snapshot
from trimformer.graph.structure import MLP, Attention, Linear, Structure, discover
from trimformer.passes import compensate
from trimformer.passes.base import Context, PassConfig, PassSpec

aten = torch.ops.aten

Amount = float | dict[int, int | list[int]]
Edit = tuple[fx.Node, Callable[[], None]]  # a node and the change to make to it, made later


class PruneConfig(PassConfig):
    heads: Amount = Field(
        0.0,
        description="ratio of query heads removed per block, or {block: count | [head indices]}",
    )
    neurons: Amount = Field(
        0.0, description="ratio of MLP neurons removed per block, or {block: count | [indices]}"
    )
    round_to: int = Field(8, ge=1, description="kept neuron counts are a multiple of this")
    gqa_mode: Literal["groups", "query"] = Field(
        "groups", description="GQA: remove whole key/value groups, or query heads inside groups"
    )
    compensate: Literal["none", "bias", "lstsq"] = Field(
        "none",
        description="refit the o/down projection on calibration data for what was cut: 'bias' "
        "adds the removed features' mean output, 'lstsq' refits kept columns and bias",
    )
    ridge: float = Field(0.1, ge=0.0, description="lstsq ridge, relative to the mean moment")

    @field_validator("heads", "neurons")
    @classmethod
    def _amount(cls, v: Amount) -> Amount:
        if isinstance(v, float):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"a ratio must be in [0, 1), got {v}")
            return v
        out: dict[int, int | list[int]] = {}
        for block, what in sorted(v.items()):
            if block < 0:
                raise ValueError(f"block index {block} is negative")
            if isinstance(what, int):
                if what < 0:
                    raise ValueError(f"block {block}: count {what} is negative")
            elif (len(set(what)) != len(what)) or any(i < 0 for i in what):
                raise ValueError(f"block {block}: indices must be distinct and >= 0")
            out[block] = what if isinstance(what, int) else sorted(what)
        return out

    @property
    def explicit(self) -> bool:
        """True when nothing needs calibration data: only index lists (or nothing at all)."""
        return all(
            (a == 0.0) if isinstance(a, float) else all(isinstance(x, list) for x in a.values())
            for a in (self.heads, self.neurons)
        )


# ----------------------------------------------------------------------------- importance


def _head_contributions(z: torch.Tensor, o: Linear, w: torch.Tensor, heads: int) -> torch.Tensor:
    """Σ_t ‖W_O,h z_{t,h}‖₁ for each head: z (N, H·d), w the o-projection weight -> (H,)."""
    w_oi = (w.t() if o.transposed else w).float()  # (D_out, H·d)
    d = w_oi.shape[1] // heads
    w3 = w_oi.reshape(w_oi.shape[0], heads, d)  # (D_out, H, d)
    total = torch.zeros(heads, dtype=torch.float64)
    step = max(1, (1 << 24) // (heads * w3.shape[0]))  # bound the (N, H, D_out) intermediate
    for i in range(0, z.shape[0], step):
        zh = z[i : i + step].float().reshape(-1, heads, d)
        total += torch.einsum("nhd,ohd->nho", zh, w3).abs().sum(dim=(0, 2)).double()
    return total


def score(gm: fx.GraphModule, structure: Structure, ctx: Context) -> dict[str, Any]:
    """AMP importance of every head ({block: [I_h]}) and MLP neuron ({block: [I_j]})."""
    if not ctx.batches:
        raise PassError(
            "prune: importance needs calibration batches and none were given; pass calibration "
            "text, or give explicit head/neuron index lists in the recipe"
        )
    atts = [(b.index, b.attention.site) for b in structure.blocks if b.attention is not None]
    mlps = [(b.index, b.mlp.site) for b in structure.blocks if b.mlp is not None]
    nodes = [a.o.input for _, a in atts] + [m.down.input for _, m in mlps]  # type: ignore[union-attr]
    if not nodes:
        return {"heads": {}, "neurons": {}}
    probe = tap(gm, nodes)
    o_weights = [get_param(gm, a.o.weight).detach() for _, a in atts]  # type: ignore[union-attr]
    sums = [torch.zeros(a.num_heads, dtype=torch.float64) for _, a in atts]  # type: ignore[union-attr]
    sums += [torch.zeros(m.down.in_features, dtype=torch.float64) for _, m in mlps]  # type: ignore[union-attr]
    tokens = [0] * len(nodes)
    with torch.no_grad():
        for batch in ctx.batches:
            for i, value in enumerate(probe(**batch)):
                mask = token_mask(batch, value)
                tokens[i] += int(mask.sum())
                if i < len(atts):
                    a: Attention = atts[i][1]  # type: ignore[assignment]
                    sums[i] += _head_contributions(value[mask], a.o, o_weights[i], a.num_heads)
                else:
                    sums[i] += value[mask].float().abs().sum(dim=0).double()
    means = [(s / max(t, 1)).tolist() for s, t in zip(sums, tokens, strict=True)]
    return {
        "heads": {b: means[i] for i, (b, _) in enumerate(atts)},
        "neurons": {b: means[len(atts) + j] for j, (b, _) in enumerate(mlps)},
    }


# ----------------------------------------------------------------------------- resolution


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _check_attention(block: int, a: Attention) -> None:
    """Head-major projections of the sizes the head counts imply, or a PassError."""
    h, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    if (
        (kv < 1)
        or (h % kv != 0)
        or (a.q.size != h * d)
        or (a.k.size != kv * d)
        or (a.v.size != kv * d)
        or (a.o.in_features != h * d)
    ):
        raise PassError(
            f"prune: block {block} attention ({a.o.name}) has projections that are not "
            f"{h} query / {kv} key-value heads of size {d} (q {a.q.size}, k {a.k.size}, "
            f"v {a.v.size}, o in {a.o.in_features}); leave this block out of `heads`"
        )


def _check_mlp(block: int, m: MLP) -> None:
    width = m.down.in_features
    if (m.up.out_features != width) or ((m.gate is not None) and (m.gate.out_features != width)):
        raise PassError(
            f"prune: block {block} MLP ({m.down.name}): up/gate produce "
            f"{m.up.out_features} features but down reads {width} (a fused gate/up projection?); "
            "leave this block out of `neurons`"
        )


def _by_groups(a: Attention, mode: str) -> bool:
    return (mode == "groups") or (a.num_kv_heads == a.num_heads)


def _check_head_list(block: int, a: Attention, removed: list[int], mode: str) -> None:
    h, kv = a.num_heads, a.num_kv_heads
    rep = h // kv
    where = f"prune: block {block} ({a.o.name}, {h} heads, {kv} key/value heads)"
    if any(i >= h for i in removed) or len(removed) >= h:
        raise PassError(f"{where}: cannot remove heads {removed}; keep at least one of 0..{h - 1}")
    per_group = [sum(1 for i in removed if i // rep == g) for g in range(kv)]
    if _by_groups(a, mode):
        if any(c not in (0, rep) for c in per_group):
            raise PassError(
                f"{where}: gqa_mode 'groups' removes whole groups of {rep} query heads; "
                f"{removed} splits a group (use gqa_mode 'query', or whole groups)"
            )
    elif len(set(per_group)) != 1 or per_group[0] >= rep:
        raise PassError(
            f"{where}: gqa_mode 'query' removes the same number (< {rep}) of query heads from "
            f"every key/value group; {removed} removes {per_group} per group"
        )


def _heads_to_remove(
    block: int, a: Attention, request: float | int | list[int], scores: list[float], mode: str
) -> list[int]:
    """Query-head indices removed from one attention site."""
    h, kv = a.num_heads, a.num_kv_heads
    rep = h // kv
    if isinstance(request, list):
        _check_head_list(block, a, request, mode)
        return sorted(request)
    where = f"prune: block {block} ({a.o.name}, {h} heads, {kv} key/value heads)"
    if _by_groups(a, mode):
        if isinstance(request, float):
            n = min(_round_half_up(request * kv), kv - 1)
        elif request % rep != 0 or request // rep >= kv:
            raise PassError(
                f"{where}: gqa_mode 'groups' removes whole groups of {rep} heads and keeps one; "
                f"{request} heads is not a multiple of {rep} below {h}"
            )
        else:
            n = request // rep
        group_score = [sum(scores[g * rep : (g + 1) * rep]) for g in range(kv)]
        groups = sorted(range(kv), key=lambda g: (group_score[g], g))[:n]
        return sorted(g * rep + i for g in groups for i in range(rep))
    if isinstance(request, float):
        per = min(_round_half_up(request * rep), rep - 1)
    elif request % kv != 0 or request // kv >= rep:
        raise PassError(
            f"{where}: gqa_mode 'query' removes the same number of query heads from each of "
            f"the {kv} groups and keeps one per group; {request} is not a multiple of {kv} "
            f"below {h}"
        )
    else:
        per = request // kv
    removed = []
    for g in range(kv):
        group = range(g * rep, (g + 1) * rep)
        removed += sorted(group, key=lambda i: (scores[i], i))[:per]
    return sorted(removed)


def _kept_width(width: int, removed: int, round_to: int) -> int:
    if removed <= 0:
        return width
    kept = width - removed
    if round_to > 1:
        kept = max(round_to, _round_half_up(kept / round_to) * round_to)
    return min(width, max(1, kept))


def _neurons_to_remove(
    block: int, m: MLP, request: float | int | list[int], scores: list[float], round_to: int
) -> list[int]:
    width = m.down.in_features
    if isinstance(request, list):
        if any(i >= width for i in request) or len(request) >= width:
            raise PassError(
                f"prune: block {block} MLP ({m.down.name}, {width} neurons): cannot remove "
                f"{len(request)} neurons with indices up to {max(request)}; keep at least one"
            )
        return sorted(request)
    if isinstance(request, int) and request >= width:
        raise PassError(
            f"prune: block {block} MLP ({m.down.name}) has {width} neurons; cannot remove {request}"
        )
    n = _round_half_up(request * width) if isinstance(request, float) else request
    kept = _kept_width(width, n, round_to)
    return sorted(sorted(range(width), key=lambda j: (scores[j], j))[: width - kept])


def _requests(
    amount: Amount, present: dict[int, Any], what: str
) -> dict[int, float | int | list[int]]:
    if isinstance(amount, float):
        return {b: amount for b in present} if amount > 0.0 else {}
    for b in amount:
        if b not in present:
            site = "MLP" if what == "neurons" else "attention"
            raise PassError(
                f"prune: `{what}` names block {b}, which has no {site} sub-layer (blocks with "
                f"one: {sorted(present)}); see `trimformer inspect`"
            )
    return dict(amount)


CACHE_KEY = "prune.score"


def _cached_scores(
    ctx: Context, atts: dict[int, Any], mlps: dict[int, Any]
) -> dict[str, Any] | None:
    """Scores a caller left in ctx.cache[CACHE_KEY], if they fit this graph's sites and sizes.

    The caller owns the cache: it must drop the entry when the graph's weights change.
    """
    cached = ctx.cache.get(CACHE_KEY)
    if not isinstance(cached, dict):
        return None
    heads, neurons = cached.get("heads", {}), cached.get("neurons", {})
    fits = (
        (set(heads) == set(atts))
        and (set(neurons) == set(mlps))
        and all(len(heads[b]) == a.num_heads for b, a in atts.items())
        and all(len(neurons[b]) == m.down.in_features for b, m in mlps.items())
    )
    return cached if fits else None


def plan(
    gm: fx.GraphModule, structure: Structure, ctx: Context, config: PruneConfig
) -> tuple[PruneConfig, dict[str, Any]]:
    """Resolve ratios and counts into explicit index lists; returns that config and the scores.

    Reads calibration batches only when something is not already an explicit list, and not
    even then when the caller put this graph's `score(...)` in ctx.cache["prune.score"].
    """
    atts = {b.index: b.attention.site for b in structure.blocks if b.attention is not None}
    mlps = {b.index: b.mlp.site for b in structure.blocks if b.mlp is not None}
    head_req = _requests(config.heads, atts, "heads")
    neuron_req = _requests(config.neurons, mlps, "neurons")
    scores: dict[str, Any] = {"heads": {}, "neurons": {}}
    if not config.explicit:
        scores = _cached_scores(ctx, atts, mlps) or score(gm, structure, ctx)
    heads: dict[int, int | list[int]] = {}
    for b, req in head_req.items():
        a: Attention = atts[b]  # type: ignore[assignment]
        _check_attention(b, a)
        removed = _heads_to_remove(b, a, req, scores["heads"].get(b, []), config.gqa_mode)
        if removed:
            heads[b] = removed
    neurons: dict[int, int | list[int]] = {}
    for b, req in neuron_req.items():
        m: MLP = mlps[b]  # type: ignore[assignment]
        _check_mlp(b, m)
        removed = _neurons_to_remove(b, m, req, scores["neurons"].get(b, []), config.round_to)
        if removed:
            neurons[b] = removed
    resolved = config.model_copy(update={"heads": heads, "neurons": neurons})
    return resolved, scores


# ----------------------------------------------------------------------------- surgery


def _keep_out(gm: fx.GraphModule, lin: Linear, keep: list[int]) -> None:
    """Keep output features `keep` of a linear (weight rows; columns of a Conv1D [in, out])."""
    idx = torch.tensor(keep, dtype=torch.long)
    w = get_param(gm, lin.weight)
    set_param(gm, lin.weight, w.index_select(1 if lin.transposed else 0, idx))
    if lin.bias is not None:
        set_param(gm, lin.bias, get_param(gm, lin.bias).index_select(0, idx))


def _head_features(start: int, heads: list[int], d: int) -> set[int]:
    return {start + h * d + i for h in heads for i in range(d)}


def _feature_splits(lin: Linear) -> list[fx.Node]:
    """`split` nodes that cut a (fused) linear's output along its feature dimension."""
    found = []
    todo = deque([lin.node])
    seen: set[fx.Node] = set()
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            val = n.meta.get("val")
            whole = isinstance(val, torch.Tensor) and (val.shape[-1] == lin.out_features)
            if is_op(u, ops.SPLIT) and whole:
                found.append(u)
            elif is_op(u, ops.SHAPE - {aten.transpose.int, aten.permute.default}):
                todo.append(u)
    return found


def _split_edit(split: fx.Node, removed: set[int], width: int) -> Edit:
    """Shrink each segment of a feature split by the features removed from it.

    before: split(qkv[B, S, 3·H·d], H·d, -1)   after: split(qkv[B, S, 3·H'·d], H'·d, -1)
    Unequal segments (GQA fused q/k/v) become split_with_sizes.
    """
    a = args_of(split)
    val = a["self"].meta.get("val")
    dim = int(a.get("dim", 0))
    if not isinstance(val, torch.Tensor) or dim not in (-1, val.dim() - 1):
        raise PassError(
            f"prune: split {split.name} of a pruned fused projection is not along the feature "
            "dimension; this layout is not supported"
        )
    size = a.get("split_size", a.get("split_sizes"))
    sizes = [size] * math.ceil(width / size) if isinstance(size, int) else list(size)
    sizes[-1] = width - sum(sizes[:-1])
    new_sizes, start = [], 0
    for s in sizes:
        new_sizes.append(s - sum(1 for f in range(start, start + s) if f in removed))
        start += s

    def edit() -> None:
        if is_op(split, {aten.split.Tensor}) and len(set(new_sizes)) == 1:
            set_arg(split, "split_size", new_sizes[0])
            return
        split.target = aten.split_with_sizes.default
        split.args = (a["self"], new_sizes, dim)
        split.kwargs = {}

    return split, edit


def _kv_paths(a: Attention) -> list[fx.Node]:
    """Nodes between the k/v projections and the attention core (where GQA repeats K/V)."""
    stop = ops.LINEAR | ops.ADDMM | ops.SDPA | ops.MATMUL | ops.SOFTMAX
    out: list[fx.Node] = []
    seen: set[fx.Node] = set()
    todo = deque([a.k.linear.output, a.v.linear.output])
    while todo:
        n = todo.popleft()
        if n in seen or n is a.core:
            continue
        seen.add(n)
        out.append(n)
        for u in n.users:
            if (u.op == "call_function") and (u.target not in stop):
                todo.append(u)
    return out


def _repeat_edits(a: Attention, old_rep: int, new_rep: int) -> list[Edit]:
    """GQA repeat of K/V: expand([B, KV, rep, S, d]) or repeat_interleave(x, rep, 1)."""
    edits: list[Edit] = []
    for n in _kv_paths(a):
        if is_op(n, {aten.expand.default}):
            src = args_of(n)["self"].meta.get("val")
            size = list(args_of(n)["size"])
            if not isinstance(src, torch.Tensor):
                continue
            off = len(size) - src.dim()
            for k in range(off, len(size)):
                if (src.shape[k - off] == 1) and isinstance(size[k], int) and (size[k] == old_rep):
                    size[k] = new_rep
                    edits.append((n, functools.partial(set_arg, n, "size", size)))
                    break
        elif is_op(n, {aten.repeat_interleave.self_int}) and args_of(n)["repeats"] == old_rep:
            edits.append((n, functools.partial(set_arg, n, "repeats", new_rep)))
    if not edits and not args_of(a.core).get("enable_gqa", False):
        raise PassError(
            f"prune: attention {a.o.name} repeats K/V {old_rep}x but no expand/repeat_interleave "
            "with that count was found; gqa_mode 'query' cannot rewrite it (use 'groups')"
        )
    return edits


# ----------------------------------------------------------------------------- apply


def prune_heads_and_neurons(
    gm: fx.GraphModule, structure: Structure, config: PruneConfig, ctx: Context
) -> dict[str, Any]:
    """Remove heads and neurons from gm in place; changes include the resolved config."""
    resolved, scores = plan(gm, structure, ctx, config)
    head_lists, neuron_lists = _lists(resolved.heads), _lists(resolved.neurons)
    blocks = {b.index: b for b in structure.blocks}
    old = shape_snapshot(gm)
    out_cut: dict[Linear, set[int]] = {}
    in_cut: dict[Linear, set[int]] = {}
    expect: dict[int, dict[str, int]] = {}
    edits: list[Edit] = []

    for b, removed in sorted(head_lists.items()):
        a: Attention = blocks[b].attention.site  # type: ignore[union-attr,assignment]
        h, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
        rep = h // kv
        gone = set(removed)
        kv_gone = sorted({i // rep for i in gone}) if _by_groups(a, resolved.gqa_mode) else []
        out_cut.setdefault(a.q.linear, set()).update(_head_features(a.q.start, sorted(gone), d))
        for p in (a.k, a.v):
            out_cut.setdefault(p.linear, set()).update(_head_features(p.start, kv_gone, d))
        in_cut.setdefault(a.o, set()).update(_head_features(0, sorted(gone), d))
        new_h, new_kv = h - len(gone), kv - len(kv_gone)
        if new_h // new_kv != rep:
            edits += _repeat_edits(a, rep, new_h // new_kv)
        expect[b] = {"heads": new_h, "kv_heads": new_kv}

    for b, removed in sorted(neuron_lists.items()):
        m: MLP = blocks[b].mlp.site  # type: ignore[union-attr,assignment]
        gone = set(removed)
        for lin in (m.up, m.gate):
            if lin is not None:
                out_cut.setdefault(lin, set()).update(gone)
        in_cut.setdefault(m.down, set()).update(gone)
        expect.setdefault(b, {})["width"] = m.down.in_features - len(gone)

    if not out_cut and not in_cut:
        return {"resolved": resolved.model_dump(mode="json"), "heads_kept": {}, "neurons_kept": {}}

    out_cut = {lin: gone for lin, gone in out_cut.items() if gone}
    for lin, gone in out_cut.items():
        edits += [_split_edit(n, gone, lin.out_features) for n in _feature_splits(lin)]
    _check_not_shared(gm, [*out_cut, *in_cut])

    moments = {}
    if resolved.compensate != "none":  # activations of the unpruned graph
        moments = compensate.input_moments(gm, list(in_cut), ctx)

    # Everything is checked: from here on the graph changes.
    for _, edit in edits:
        edit()
    for lin, gone in out_cut.items():
        _keep_out(gm, lin, [f for f in range(lin.out_features) if f not in gone])
    params = {t for lin in [*out_cut, *in_cut] for t in (lin.weight, lin.bias) if t is not None}
    for lin, gone in in_cut.items():
        keep = [f for f in range(lin.in_features) if f not in gone]
        added = compensate.reduce_inputs(
            gm, lin, keep, moments.get(lin.weight), resolved.compensate, resolved.ridge
        )
        if added is not None:
            params.add(added)
    edited = {n for n, _ in edits}
    edited |= {n for n in gm.graph.nodes if (n.op == "get_attr") and (n.target in params)}
    rewritten = [n.name for n, _ in edits] + refresh_shapes(gm, old, edited)
    finish(gm)
    _check_result(gm, expect)

    heads_kept = {
        b: [i for i in range(e["heads"] + len(head_lists[b])) if i not in head_lists[b]]
        for b, e in expect.items()
        if b in head_lists
    }
    changes: dict[str, Any] = {
        "resolved": resolved.model_dump(mode="json"),
        "heads_kept": heads_kept,
        "kv_heads_kept": {b: e["kv_heads"] for b, e in expect.items() if "kv_heads" in e},
        "neurons_kept": {b: e["width"] for b, e in expect.items() if "width" in e},
        "heads_removed": sum(len(r) for r in head_lists.values()),
        "neurons_removed": sum(len(r) for r in neuron_lists.values()),
        "shape_args_rewritten": rewritten,
    }
    if scores["heads"]:
        changes["head_importance"] = {
            b: [round(x, 6) for x in v] for b, v in scores["heads"].items()
        }
    return changes


def _lists(amount: Amount) -> dict[int, list[int]]:
    """The index lists of a resolved amount (plan returns only lists)."""
    if isinstance(amount, float):
        return {}
    return {b: v for b, v in amount.items() if isinstance(v, list)}


def _check_not_shared(gm: fx.GraphModule, linears: list[Linear]) -> None:
    """A sliced weight must be read by its own linear only (no tying with another op)."""
    targets = {t: lin for lin in linears for t in (lin.weight, lin.bias) if t is not None}
    for n in gm.graph.nodes:
        if (n.op == "get_attr") and (n.target in targets):
            lin = targets[n.target]
            others = [u.name for u in n.users if u is not lin.node]
            if others:
                raise PassError(
                    f"prune: {n.target} of {lin.name} is also read by {others}; a shared "
                    "weight cannot be sliced for one user — leave this block out"
                )


def _check_result(gm: fx.GraphModule, expect: dict[int, dict[str, int]]) -> None:
    """The pruned graph's structure, re-discovered, has the head counts and widths planned."""
    found = {b.index: b for b in discover(gm).blocks}
    for b, want in expect.items():
        blk = found.get(b)
        got: dict[str, int] = {}
        if blk is not None and blk.attention is not None:
            a: Attention = blk.attention.site  # type: ignore[assignment]
            got |= {"heads": a.num_heads, "kv_heads": a.num_kv_heads}
        if blk is not None and blk.mlp is not None:
            got["width"] = blk.mlp.site.down.in_features  # type: ignore[union-attr]
        if any(got.get(k) != v for k, v in want.items()):
            raise PassError(
                f"prune: after pruning, block {b} is found with {got} instead of {want}; "
                "the graph's structure no longer matches the plan"
            )


SPEC = PassSpec(
    name="prune",
    summary="remove the least important attention heads and MLP neurons (AMP projection scores)",
    exactness="lossy",
    config=PruneConfig,
    knobs={
        "heads": "ratio of query heads removed per block, or {block: count | [indices]}",
        "neurons": "ratio of MLP neurons removed per block, or {block: count | [indices]}",
        "round_to": "kept neuron counts are a multiple of this (hardware-friendly widths)",
        "gqa_mode": "GQA: 'groups' removes whole key/value groups, 'query' query heads only",
        "compensate": "none | bias (mean of the cut features) | lstsq (refit o/down projections)",
        "ridge": "lstsq regularization towards the original weights",
    },
    apply=prune_heads_and_neurons,
    score=score,
    paper="Efficient LLMs with AMP: Attention Heads and MLP Pruning (2025)",
)
