"""sparse-attention — replace each attention core with sliding-window + sink attention (lossy).

Papers: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024) for sinks + a recent window; MoA (Fu et al., "Mixture of Attention Spans",
arXiv 2406.14909) for per-head elastic windows chosen under a density budget by a 0/1 program.

Rewrite, per attention sub-layer whose core is an SDPA node:

    q, k, v, mask ─▶ aten.scaled_dot_product_attention(scale) ─▶ out
    after:
    q, k, v, mask ─▶ trimformer.local_attention(sink, alpha[h], beta[h], causal, scale) ─▶ out

Same operands and output; the model's own mask (padding, causal) is passed through and combined
with the local pattern inside the op, so its semantics are kept. Query i sees the first `sink`
tokens and a window of w_h(N) = clamp(floor(alpha_h + beta_h * N), 1, N) tokens: the w_h most
recent ones (causal) or w_h - 1 on either side (bidirectional, e.g. BERT); N is the run-time
sequence length (see `trimformer.kernels.local_attention` for the exact pattern). A window of N
(alpha = 0, beta = 1) leaves the model unchanged. Eager attention (matmul → softmax → matmul) and
attention with dropout are reported in `skipped` and left alone.

Calibration. For head h and candidate (alpha, beta), the share of attention mass the pattern
keeps, from the probabilities the model computes on calibration text (q and k tapped at the
SDPA, A = softmax(scale q k^T + mask)):

    kept_h(alpha, beta; N) = (1 / |R|) sum_{i in R} sum_{j in P_h(i)} A_h[i, j]

over the real (non-pad) query rows R at length N, with P_h(i) the pattern's keys for row i.
MoA scores a pattern by the loss change it causes (a gradient profile); kept mass is the
forward-only stand-in. The density of a candidate is the pairs its pattern computes over the
pairs dense attention computes (the causal triangle, or the square), exactly, at each length.

`plan` chooses one candidate per head with `scipy.optimize.milp` (HiGHS), as MoA does with Gurobi:

    minimize   sum_h sum_c lost[h, c] x[h, c]              lost = mean over lengths of 1 - kept
    subject to sum_c x[h, c] = 1                            every head gets one candidate
               sum_{h, c} density[c, N] x[h, c] <= budget_N * heads     at every profiled N
               x[h, c] <= y[l(h), c],  sum_c y[l, c] <= K   at most K distinct windows per layer
               x, y in {0, 1}

K (MoA uses 2) bounds how many head groups the op runs per layer. The uniform baseline is the
single candidate with the least loss whose density fits the budget at every length; it is a
feasible point of the program, so the plan never loses more mass than it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import fx

from trimformer.errors import PassError
from trimformer.graph.rewrite import args_of, finish, tap
from trimformer.graph.structure import Attention, Structure
from trimformer.kernels.local_attention import (
    LOCAL_ATTENTION,
    dense_pairs,
    pattern_pairs,
    window_size,
)
from trimformer.passes.base import Context, PassConfig, PassSpec

Window = tuple[float, float]  # (alpha, beta): w(N) = clamp(floor(alpha + beta * N), 1, N)

# MoA's search grid, scaled to sequences of a few thousand tokens: offsets and length shares.
DEFAULT_ALPHAS = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
DEFAULT_BETAS = (0.0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)


class SparseAttentionConfig(PassConfig):
    sink: int = Field(4, ge=0, description="first positions every query may see (sinks)")
    alpha: float = Field(0.0, description="uniform window w = alpha + beta * N: the offset")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="uniform window: the share of N")
    heads: dict[int, list[tuple[float, float]]] = Field(
        default_factory=dict,
        description="block -> per-head [alpha, beta] (one pair per query head); overrides the "
        "uniform window for that block",
    )
    blocks: list[int] | None = Field(
        None, description="blocks whose attention is rewritten (default: all)"
    )


# ----------------------------------------------------------------------------- rewrite


def _windows(config: SparseAttentionConfig, block: int, att: Attention) -> list[Window]:
    pairs = config.heads.get(block)
    if pairs is None:
        return [(config.alpha, config.beta)]
    if len(pairs) != att.num_heads:
        raise PassError(
            f"sparse-attention: heads[{block}] lists {len(pairs)} (alpha, beta) pairs but block "
            f"{block} ({att.o.name}) has {att.num_heads} query heads; give one pair per head"
        )
    return [(float(a), float(b)) for a, b in pairs]


def _replace_core(gm: fx.GraphModule, core: fx.Node, args: tuple[Any, ...]) -> fx.Node:
    """Insert local_attention(args) where `core` is, with its meta, and remove `core`."""
    with gm.graph.inserting_before(core):
        new = gm.graph.call_function(LOCAL_ATTENTION, args)
    new.meta.update({k: v for k, v in core.meta.items() if k != "val"})
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    try:
        new.meta["val"] = LOCAL_ATTENTION(*vals)  # the fake implementation on the fake inputs
    except Exception:  # no fake values on the inputs: keep the original's (same shape)
        new.meta["val"] = core.meta.get("val")
    new.meta["trimformer"] = {"pass": "sparse-attention", "replaces": core.name}
    core.replace_all_uses_with(new)
    gm.graph.erase_node(core)
    return new


def _seq_len(ctx: Context) -> int | None:
    for batch in ctx.batches:
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return int(ids.shape[1])
    return None


def sparsify_attention(
    gm: fx.GraphModule, structure: Structure, config: SparseAttentionConfig, ctx: Context
) -> dict[str, Any]:
    n = len(structure.blocks)
    wanted = set(range(n)) if config.blocks is None else set(config.blocks)
    for i in sorted(wanted | set(config.heads)):
        if not 0 <= i < n:
            raise PassError(
                f"sparse-attention: block {i} is out of range (the graph has {n} blocks, "
                f"0..{n - 1}); see `trimformer inspect`"
            )
    length = _seq_len(ctx)
    rewritten, skipped = [], []
    for b in structure.blocks:
        if b.attention is None or b.index not in wanted:
            continue
        att: Attention = b.attention.site  # type: ignore[assignment]
        name = b.attention.name
        if att.form == "eager":
            skipped.append(
                {
                    "block": b.index,
                    "name": name,
                    "reason": "eager attention (matmul -> softmax -> matmul); load the model "
                    "with attn_implementation='sdpa' to rewrite it",
                }
            )
            continue
        a = args_of(att.core)
        if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
            skipped.append({"block": b.index, "name": name, "reason": "attention dropout > 0"})
            continue
        windows = _windows(config, b.index, att)
        mask = a.get("attn_mask")
        causal = bool(att.causal or a.get("is_causal"))
        args = (
            a["query"],
            a["key"],
            a["value"],
            mask,
            config.sink,
            [w[0] for w in windows],
            [w[1] for w in windows],
            causal,
            a.get("scale"),
        )
        _replace_core(gm, att.core, args)
        entry: dict[str, Any] = {
            "block": b.index,
            "name": name,
            "causal": causal,
            "heads": att.num_heads,
            "windows": [list(w) for w in windows],
        }
        if length is not None:
            entry["seq_len"] = length
            entry["density"] = round(
                _density(windows, att.num_heads, config.sink, causal, length), 4
            )
        rewritten.append(entry)
    finish(gm)
    return {
        "rewritten": rewritten,
        "skipped": skipped,
        "attention_rewritten": len(rewritten),
        "sink": config.sink,
    }


def _density(windows: Sequence[Window], heads: int, sink: int, causal: bool, n: int) -> float:
    per_head = list(windows) * heads if len(windows) == 1 else list(windows)
    pairs = sum(pattern_pairs(n, window_size(a, b, n), sink, causal) for a, b in per_head)
    return pairs / (len(per_head) * dense_pairs(n, causal))


# ----------------------------------------------------------------------------- calibration


def _crop(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first n positions of every (batch, seq, ...) input."""
    seq = batch["input_ids"].shape[1]
    return {k: (v[:, :n] if (v.dim() >= 2 and v.shape[1] == seq) else v) for k, v in batch.items()}


def _cores(structure: Structure) -> list[tuple[int, Attention]]:
    out = []
    for b in structure.blocks:
        if b.attention is None:
            continue
        att: Attention = b.attention.site  # type: ignore[assignment]
        if att.form != "eager":
            out.append((b.index, att))
    return out


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float | None
) -> torch.Tensor:
    """softmax(scale q k^T + mask) as SDPA computes it, (B, H, N, N), fp32; 0 on empty rows."""
    q, k = q.float(), k.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    n = q.shape[-2]
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
    elif causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num_(0.0)


def _kept_mass(
    p: torch.Tensor, rows: torch.Tensor, windows: list[int], sink: int, causal: bool
) -> torch.Tensor:
    """Mass kept per head for each window: (H, len(windows)), summed over the real rows.

    With M(d) the mass at distance d = |i - j| (summed over rows), the band keeps
    sum_{d < w} M(d); each sink column t adds its mass on the rows whose band misses it.
    """
    b, h, n, _ = p.shape
    p = p * rows.view(b, 1, n, 1)  # pad rows weigh nothing
    i = torch.arange(n).view(n, 1)
    d = torch.arange(n).view(1, n)
    back = (i - d).clamp(min=0).expand(b, h, n, n)  # A[i, i - d]
    by_dist = (p.gather(3, back) * (i >= d)).sum(dim=(0, 2))  # (H, N)
    if not causal:
        fwd = (i + d).clamp(max=n - 1).expand(b, h, n, n)  # A[i, i + d], d > 0
        by_dist = by_dist + (p.gather(3, fwd) * ((i + d) < n) * (d > 0)).sum(dim=(0, 2))
    band = torch.cumsum(by_dist, dim=1).double()  # (H, N): mass within distance < w at w - 1
    w = torch.tensor(windows, dtype=torch.int64)
    kept = band[:, w - 1]  # (H, C)
    s = min(sink, n)
    col = p[..., :s].sum(0).double()  # (H, N rows, s)
    below = torch.flip(torch.cumsum(torch.flip(col, [1]), 1), [1])  # mass on rows >= r
    above = torch.cumsum(col, 1)  # mass on rows <= r
    for t in range(s):
        start = t + w  # rows i >= t + w miss sink t in their band
        kept += below[:, start.clamp(max=n - 1), t] * (start < n)
        if not causal:  # and rows i <= t - w
            stop = t - w
            kept += above[:, stop.clamp(min=0), t] * (stop >= 0)
    return kept


def default_candidates() -> list[Window]:
    return [(a, b) for a in DEFAULT_ALPHAS for b in DEFAULT_BETAS]


def score(
    gm: fx.GraphModule,
    structure: Structure,
    ctx: Context,
    *,
    sink: int = 4,
    lengths: Sequence[int] | None = None,
    candidates: Sequence[Window] | None = None,
    min_window: int = 16,
) -> dict[str, Any]:
    """Kept attention mass of every head for every candidate window, at each length.

    Lengths default to the calibration batches' length N and N // 2 (batches are cropped to
    shorter lengths). Candidates whose window is under `min_window` tokens at the shortest
    length are left out (MoA floors every span at 128 tokens): kept mass cannot see that a head
    which puts its mass on the sinks and itself still needs the rest.

    Returns {"lengths", "candidates", "sink", "causal", "blocks", "heads",
    "kept": {block: [head][length][candidate]}, "density": [length][candidate]}.
    """
    if not ctx.batches:
        raise PassError("sparse-attention: scoring needs calibration batches (ctx.batches)")
    cores = _cores(structure)
    if not cores:
        raise PassError("sparse-attention: the graph has no SDPA attention core to score")
    full = int(ctx.batches[0]["input_ids"].shape[1])
    lengths = sorted({int(x) for x in (lengths or (full, full // 2)) if 2 <= int(x) <= full})
    if not lengths:
        raise PassError(f"sparse-attention: no usable calibration length (batches have {full})")
    shortest = lengths[0]
    cands = [
        c
        for c in (candidates or default_candidates())
        if window_size(c[0], c[1], shortest) >= min(min_window, shortest)
    ]
    if not cands:
        raise PassError(
            f"sparse-attention: no candidate window reaches min_window={min_window} tokens at "
            f"N = {shortest}; lower min_window or pass larger candidates"
        )
    causal = {bi: bool(att.causal or args_of(att.core).get("is_causal")) for bi, att in cores}
    nodes: list[fx.Node] = []
    for _, att in cores:
        a = args_of(att.core)
        nodes += [a["query"], a["key"]] + ([a["attn_mask"]] if a.get("attn_mask") else [])
    probe = tap(gm, list(dict.fromkeys(nodes)))
    where = {node: i for i, node in enumerate(dict.fromkeys(nodes))}

    kept = {
        bi: torch.zeros(att.num_heads, len(lengths), len(cands), dtype=torch.float64)
        for bi, att in cores
    }
    rows_total = torch.zeros(len(lengths), dtype=torch.float64)
    with torch.no_grad():
        for li, n in enumerate(lengths):
            windows = [window_size(a, b, n) for a, b in cands]
            for batch in ctx.batches:
                if int(batch["input_ids"].shape[1]) < n:
                    continue
                inputs = _crop(batch, n)
                vals = probe(**inputs)
                am = inputs.get("attention_mask")
                rows = am.float() if am is not None else torch.ones(inputs["input_ids"].shape)
                rows_total[li] += float(rows.sum())
                for bi, att in cores:
                    a = args_of(att.core)
                    mask = vals[where[a["attn_mask"]]] if a.get("attn_mask") else None
                    p = _probabilities(
                        vals[where[a["query"]]],
                        vals[where[a["key"]]],
                        mask,
                        causal[bi],
                        a.get("scale"),
                    )
                    kept[bi][:, li] += _kept_mass(p, rows, windows, sink, causal[bi])
    any_causal = next(iter(causal.values()))
    return {
        "lengths": lengths,
        "candidates": [list(c) for c in cands],
        "sink": sink,
        "causal": any_causal,
        "blocks": [bi for bi, _ in cores],
        "heads": {bi: att.num_heads for bi, att in cores},
        "kept": {bi: (kept[bi] / rows_total.view(1, -1, 1)).tolist() for bi in kept},
        "density": [
            [
                pattern_pairs(n, window_size(a, b, n), sink, any_causal)
                / dense_pairs(n, any_causal)
                for a, b in cands
            ]
            for n in lengths
        ],
    }


def _score_spec(gm: fx.GraphModule, structure: Structure, ctx: Context) -> dict[str, Any]:
    return score(gm, structure, ctx)


# ----------------------------------------------------------------------------- planning


def uniform_choice(scores: dict[str, Any], budget: Sequence[float]) -> tuple[int, float] | None:
    """(candidate index, total lost mass) of the best single window within `budget` per length."""
    dens = np.asarray(scores["density"])  # (lengths, candidates)
    lost = _lost_matrix(scores)  # (heads, candidates)
    best = None
    for c in range(dens.shape[1]):
        if all(dens[li, c] <= budget[li] + 1e-12 for li in range(dens.shape[0])):
            total = float(lost[:, c].sum())
            if best is None or total < best[1]:
                best = (c, total)
    return best


def _lost_matrix(scores: dict[str, Any]) -> np.ndarray:
    """(all heads in block order, candidates): 1 - kept, averaged over lengths."""
    rows = []
    for bi in scores["blocks"]:
        kept = np.asarray(scores["kept"][bi])  # (heads, lengths, candidates)
        rows.append(1.0 - kept.mean(axis=1))
    return np.concatenate(rows, axis=0)


def _budgets(scores: dict[str, Any], density: float | Sequence[float]) -> list[float]:
    n = len(scores["lengths"])
    if isinstance(density, (int, float)):
        return [float(density)] * n
    if len(density) != n:
        raise PassError(
            f"sparse-attention: {len(density)} density budgets for {n} lengths {scores['lengths']}"
        )
    return [float(x) for x in density]


def plan(
    gm: fx.GraphModule,
    structure: Structure,
    ctx: Context,
    *,
    density: float | Sequence[float] = 0.5,
    sink: int = 4,
    lengths: Sequence[int] | None = None,
    candidates: Sequence[Window] | None = None,
    max_windows_per_layer: int | None = 2,
    min_window: int = 16,
    scores: dict[str, Any] | None = None,
    time_limit: float = 30.0,
) -> tuple[SparseAttentionConfig, dict[str, Any]]:
    """Per-head windows with the least lost mass whose mean density is within `density` (a
    share of dense attention's pairs, one value or one per length) at every profiled length.

    Returns the resolved config and a report: the scores, the plan's and the best uniform
    window's lost mass and densities.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    if scores is None:
        scores = score(
            gm,
            structure,
            ctx,
            sink=sink,
            lengths=lengths,
            candidates=candidates,
            min_window=min_window,
        )
    budget = _budgets(scores, density)
    lost = _lost_matrix(scores)  # (H, C)
    dens = np.asarray(scores["density"])  # (L, C)
    cands = [tuple(c) for c in scores["candidates"]]
    n_heads, n_c = lost.shape
    blocks = scores["blocks"]
    layer_of = [li for li, bi in enumerate(blocks) for _ in range(scores["heads"][bi])]
    n_layers = len(blocks)
    use_y = max_windows_per_layer is not None and max_windows_per_layer < n_c
    n_x = n_heads * n_c
    n_var = n_x + (n_layers * n_c if use_y else 0)

    rows: list[tuple[dict[int, float], float, float]] = []
    for h in range(n_heads):  # one candidate per head
        rows.append(({h * n_c + c: 1.0 for c in range(n_c)}, 1.0, 1.0))
    for li in range(len(budget)):  # mean density within budget at every length
        rows.append(
            (
                {h * n_c + c: dens[li, c] for h in range(n_heads) for c in range(n_c)},
                -np.inf,
                budget[li] * n_heads,
            )
        )
    if use_y:
        for h in range(n_heads):
            for c in range(n_c):
                rows.append(({h * n_c + c: 1.0, n_x + layer_of[h] * n_c + c: -1.0}, -np.inf, 0.0))
        for li in range(n_layers):
            rows.append(
                (
                    {n_x + li * n_c + c: 1.0 for c in range(n_c)},
                    -np.inf,
                    float(max_windows_per_layer),
                )
            )
    a = lil_matrix((len(rows), n_var))
    lb, ub = np.empty(len(rows)), np.empty(len(rows))
    for r, (coef, lo, hi) in enumerate(rows):
        for col, val in coef.items():
            a[r, col] = val
        lb[r], ub[r] = lo, hi
    cost = np.concatenate([lost.reshape(-1), np.zeros(n_var - n_x)])
    res = milp(
        cost,
        constraints=LinearConstraint(a.tocsr(), lb, ub),
        integrality=np.ones(n_var),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit},
    )
    if res.x is None:
        raise PassError(
            f"sparse-attention: no per-head plan fits density {budget} at lengths "
            f"{scores['lengths']} ({res.message}); raise the budget or add smaller windows"
        )
    choice = np.asarray(res.x[:n_x]).reshape(n_heads, n_c).argmax(axis=1)
    heads: dict[int, list[tuple[float, float]]] = {}
    k = 0
    for bi in blocks:
        heads[bi] = [cands[int(choice[k + j])] for j in range(scores["heads"][bi])]
        k += scores["heads"][bi]
    config = SparseAttentionConfig(sink=int(scores["sink"]), heads=heads)

    uniform = uniform_choice(scores, budget)
    report: dict[str, Any] = {
        "budget": budget,
        "lengths": scores["lengths"],
        "plan": {
            "lost": float(lost[np.arange(n_heads), choice].sum() / n_heads),
            "density": [float(dens[li, choice].mean()) for li in range(len(budget))],
        },
        "uniform": None,
        "scores": scores,
    }
    if uniform is not None:
        c, total = uniform
        report["uniform"] = {
            "alpha": cands[c][0],
            "beta": cands[c][1],
            "lost": total / n_heads,
            "density": [float(dens[li, c]) for li in range(len(budget))],
        }
    return config, report


SPEC = PassSpec(
    name="sparse-attention",
    summary="replace attention with sliding-window + sink attention, per-head elastic windows "
    "(StreamingLLM / MoA)",
    exactness="lossy",
    config=SparseAttentionConfig,
    knobs={
        "sink": "tokens at the start every query may see",
        "alpha, beta": "uniform window w = alpha + beta * N",
        "heads": "per block, per head (alpha, beta), e.g. from plan() under a density budget",
        "blocks": "which blocks are rewritten",
    },
    apply=sparsify_attention,
    score=_score_spec,
    paper="MoA: Mixture of Sparse Attention (2024); StreamingLLM (2024)",
)
