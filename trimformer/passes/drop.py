"""drop — remove attention sub-layers, MLP sub-layers or whole blocks (lossy).

Paper: "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024).

Importance of a sub-layer (the paper's similarity metric): with X the hidden state entering it
and Y the hidden state after its residual add (its norm counted as part of it),

    importance = 1 - cos(X, Y)        averaged over every non-pad calibration token, in fp32.

A low score means the sub-layer barely changes the residual stream; the n lowest are dropped,
either all at once (one-shot) or one at a time, re-scoring the graph after each drop (iterative).
A block's importance is the same measure across the whole block.

Realizing a drop:

    pre-norm (Llama, GPT-2, ViT)          post-norm (BERT)
      x ─┬─ norm ─ branch ─┐                x ─┬─ branch ─┐
         └──────────────── add ─▶ y            └────────── add ─ norm ─▶ y
    after: y := x                          after: y := x   (the norm goes with the sub-layer)

Post-norm rule: the norm after the residual add belongs to the sub-layer, so a dropped sub-layer
passes its input through unchanged. Its input is already the previous norm's output, and that is
what the importance score compares against, so the score and the drop measure the same thing.
Dead branch nodes and their weights are then removed from the graph.

Block indices are those of the captured model (`trimformer inspect` lists them); they stay the
same after earlier passes removed sub-layers or whole blocks.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import fx

from trimformer.errors import PassError
from trimformer.graph.rewrite import add_param, finish, module_path, sum_over_tokens
from trimformer.graph.structure import Block, Structure, SubLayer, discover
from trimformer.passes.base import Context, PassConfig, PassSpec
from trimformer.passes.compensate import sublayer_mean_shift


class DropConfig(PassConfig):
    attention: list[int] = Field(default_factory=list, description="blocks whose attention goes")
    mlp: list[int] = Field(default_factory=list, description="blocks whose MLP goes")
    blocks: list[int] = Field(default_factory=list, description="blocks removed whole")
    compensate: Literal["none", "mean"] = Field(
        "none",
        description="'mean': a dropped sub-layer leaves its mean change of the residual stream "
        "(over calibration tokens) as a constant add instead of nothing",
    )


# ----------------------------------------------------------------------------- importance


def similarity_importance(
    gm: fx.GraphModule, pairs: list[tuple[fx.Node, fx.Node]], ctx: Context
) -> list[float]:
    """1 - mean cosine(input, output) over non-pad tokens, for each (input, output) node pair."""

    def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).double()

    total, count = sum_over_tokens(gm, pairs, ctx.batches, cosine)
    return [float(1.0 - t / count) for t in total]


def score(gm: fx.GraphModule, structure: Structure, ctx: Context) -> dict:
    """Importance of every attention sub-layer, MLP sub-layer and block."""
    subs = structure.sublayers()
    blocks = list(structure.blocks)
    pairs = [(s.residual, s.output) for s in subs] + [(b.input, b.output) for b in blocks]
    values = similarity_importance(gm, pairs, ctx)
    out: dict[str, dict[int, float]] = {"attention": {}, "mlp": {}, "blocks": {}}
    k = 0
    for b in blocks:
        for s in b.sublayers:
            out[s.kind][b.index] = round(values[k], 6)
            k += 1
    for b in blocks:
        out["blocks"][b.index] = round(values[k], 6)
        k += 1
    return out


# ----------------------------------------------------------------------------- rewrite


def _out(s: SubLayer) -> fx.Node:
    return s.post_norm.output if s.post_norm is not None else s.add


def _bypass(gm: fx.GraphModule, s: SubLayer, shift: torch.Tensor | None = None) -> None:
    """Make the sub-layer's output its input (plus a constant shift); the branch becomes dead."""
    out = _out(s)
    if shift is None:
        out.replace_all_uses_with(s.residual)
        return
    val = out.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    owner = module_path(s.add).rpartition(".")[0]
    target = (owner + "." if owner and _has_module(gm, owner) else "") + f"{s.kind}_drop_shift"
    const = add_param(gm, target, shift.to(dtype), before=out)
    with gm.graph.inserting_before(out):
        shifted = gm.graph.call_function(torch.ops.aten.add.Tensor, (s.residual, const))
    shifted.meta = {k: v for k, v in out.meta.items() if k in ("val", "tensor_meta")}
    out.replace_all_uses_with(shifted)


def _has_module(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


SHIFT_KEY = "drop.shift"  # ctx.cache entry {(block, kind): shift} a caller may keep for one graph


def mean_shifts(
    gm: fx.GraphModule, structure: Structure, subs: list[SubLayer], ctx: Context
) -> dict[tuple[int, str], torch.Tensor]:
    """{(block, kind): mean change of the residual stream} for sub-layers of gm."""
    owner = {s: b.index for b in structure.blocks for s in b.sublayers}
    values = sublayer_mean_shift(gm, [(s.residual, _out(s)) for s in subs], ctx)
    return {(owner[s], s.kind): v for s, v in zip(subs, values, strict=True)}


def _shifts(
    gm: fx.GraphModule, structure: Structure, subs: list[SubLayer], ctx: Context
) -> dict[SubLayer, torch.Tensor]:
    """Each sub-layer's shift: from ctx.cache[SHIFT_KEY] when a caller put them there."""
    owner = {s: b.index for b in structure.blocks for s in b.sublayers}
    kept = ctx.cache.get(SHIFT_KEY)
    cache: dict = dict(kept) if isinstance(kept, dict) else {}
    todo = [s for s in subs if (owner[s], s.kind) not in cache]
    if todo:
        cache.update(mean_shifts(gm, structure, todo, ctx))
    return {s: cache[(owner[s], s.kind)] for s in subs}


def _resolve(structure: Structure, config: DropConfig) -> list[SubLayer]:
    chosen: list[SubLayer] = []
    for field_name in ("attention", "mlp", "blocks"):
        for i in getattr(config, field_name):
            b: Block | None = structure.block(i)
            if b is None:
                have = ", ".join(str(x.index) for x in structure.blocks)
                raise PassError(
                    f"drop: {field_name} index {i} is not a block of this graph (blocks: {have}); "
                    "see `trimformer inspect`"
                )
            if field_name == "blocks":
                chosen.extend(b.sublayers)
                continue
            s = b.attention if field_name == "attention" else b.mlp
            if s is None:
                raise PassError(f"drop: block {i} has no {field_name} sub-layer left to drop")
            chosen.append(s)
    return list(dict.fromkeys(chosen))


def drop_layers(gm: fx.GraphModule, structure: Structure, config: DropConfig, ctx: Context) -> dict:
    subs = _resolve(structure, config)
    shifts = _shifts(gm, structure, subs, ctx) if config.compensate == "mean" else {}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    # Later sub-layers first: each bypass rewires users of a node that earlier ones still see.
    for s in sorted(subs, key=lambda s: order[s.add], reverse=True):
        _bypass(gm, s, shifts.get(s))
    finish(gm)
    return {
        "removed": [
            {"block": b.index, "kind": s.kind, "name": s.name}
            for b in structure.blocks
            for s in b.sublayers
            if s in subs
        ],
        "attention_removed": sum(s.kind == "attention" for s in subs),
        "mlp_removed": sum(s.kind == "mlp" for s in subs),
    }


# ----------------------------------------------------------------------------- planning


Unit = Literal["attention", "mlp", "blocks"]


def plan(
    gm: fx.GraphModule,
    structure: Structure,
    ctx: Context,
    counts: dict[Unit, int],
    mode: Literal["one-shot", "iterative"] = "one-shot",
) -> tuple[DropConfig, dict]:
    """Choose the n most redundant units of each kind; returns the resolved config and scores."""
    scores = score(gm, structure, ctx)
    for unit, n in counts.items():
        avail = len(scores[unit])
        if n > avail:
            raise PassError(f"drop: asked to drop {n} {unit} but the graph has {avail}")
    if mode == "one-shot":
        chosen = {u: sorted(sorted(scores[u], key=scores[u].get)[:n]) for u, n in counts.items()}
        return DropConfig(**chosen), scores
    # Iterative: drop the single most redundant unit, re-score the smaller graph, repeat. Block
    # indices are stable across drops (structure tags), so picks are indices of `gm` too.
    work = copy.deepcopy(gm)
    work_structure = discover(work)
    chosen_it: dict[str, list[int]] = {u: [] for u in counts}
    for unit, n in counts.items():
        for _ in range(n):
            s = score(work, work_structure, ctx)
            pick = min(s[unit], key=s[unit].get)
            chosen_it[unit].append(pick)
            drop_layers(work, work_structure, DropConfig(**{unit: [pick]}), ctx)
            work_structure = discover(work)
    return DropConfig(**{u: sorted(v) for u, v in chosen_it.items()}), scores


SPEC = PassSpec(
    name="drop",
    summary="remove redundant attention/MLP sub-layers or whole blocks (LLM-Drop similarity)",
    exactness="lossy",
    config=DropConfig,
    knobs={
        "attention": "which blocks lose their attention sub-layer",
        "mlp": "which blocks lose their MLP sub-layer",
        "blocks": "which blocks are removed whole",
        "compensate": "none | mean (keep the dropped sub-layer's mean residual change)",
    },
    apply=drop_layers,
    score=score,
    paper="What Matters in Transformers? Not All Attention is Needed (2024)",
)
