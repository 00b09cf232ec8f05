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

Calibration. For head h and candidate (alpha, beta), on calibration text at two or more lengths
N (q, k, v tapped at the SDPA, A = softmax(scale q k^T + mask), P_h(i) the pattern's keys for
query row i, R the real (non-pad) rows):

- kept mass (objective "mass", forward only; the default for encoders):

    kept_h(alpha, beta; N) = (1 / |R|) sum_{i in R} sum_{j in P_h(i)} A_h[i, j]

- first-order loss change (objective "loss", the default for causal LMs; MoA's gradient
  profile, Fu et al. 2024): keeping only P_h(i) renormalizes row i, A' = A / K_i on P_h(i);
  with G = dL/dA = dL/dout v^T from one backward pass of the next-token loss,

    dL_h ~ sum_{i in R} ( sum_{j in P_h(i)} G[i, j] A[i, j] / K_i  -  sum_j G[i, j] A0[i, j] )

  where A0 is the expansion point: dense attention, or (`around`) the model with every head at
  one uniform window, whose window the plan then redistributes. The estimate is signed (a cut
  the loss is better without counts as a gain), additive over heads (first order), and only
  trusted near the expansion point: `trust_region` keeps candidates within a factor of its
  window. On the sample at 1024 tokens, expanding at dense attention and allowing any window
  chose plans that were worse than the uniform window they were estimated to beat
  (benchmarks/RESULTS-sparse-attention.md).

The density of a candidate is the pairs its pattern computes over the pairs dense attention
computes (the causal triangle, or the square), exactly, at each length.

`plan` chooses one candidate per head with `scipy.optimize.milp` (HiGHS), as MoA does with Gurobi:

    minimize   sum_h sum_c cost[h, c] x[h, c]       cost = mean over lengths of dL (or 1 - kept)
    subject to sum_c x[h, c] = 1                            every head gets one candidate
               floor * budget_N * heads <= sum_{h, c} density[c, N] x[h, c] <= budget_N * heads
                                                            at every profiled N
               x[h, c] <= y[l(h), c],  sum_c y[l, c] <= K   at most K distinct windows per layer
               x, y in {0, 1}

K (MoA uses 2) bounds how many head groups the op runs per layer. The uniform baseline is the
single candidate that fills the budget best (`uniform_choice`); with the budget set to its
density it is a feasible point of the program, so the plan's estimated cost is never higher.

`choose` (what `trimformer optimize --sparse-attention DENSITY` runs) adds MoA's last step:
it solves a family of plans on three quarters of the calibration batches and keeps the one,
the uniform window included, closest to the dense model on the held-back quarter (KL of the
next-token distributions; 1 - cosine for encoders).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import fx

from trimformer.errors import PassError
from trimformer.graph.rewrite import args_of, finish, tap
from trimformer.graph.structure import Attention, Structure, discover
from trimformer.kernels.local_attention import (
    LOCAL_ATTENTION,
    dense_pairs,
    local_pattern,
    pattern_pairs,
    window_size,
)
from trimformer.optimizer import quality
from trimformer.passes.base import Context, PassConfig, PassSpec

Window = tuple[float, float]  # (alpha, beta): w(N) = clamp(floor(alpha + beta * N), 1, N)
Objective = Literal["auto", "loss", "mass"]

# MoA's search grid, scaled to sequences of a few thousand tokens: offsets and length shares.
DEFAULT_ALPHAS = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
DEFAULT_BETAS = (0.0, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 3 / 4, 1.0)


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
    # Block indices are the captured model's and stay so after skip / drop-blocks: check
    # against the indices the graph has, not 0..n-1.
    present = [b.index for b in structure.blocks]
    wanted = set(present) if config.blocks is None else set(config.blocks)
    for i in sorted(wanted | set(config.heads)):
        if i not in present:
            raise PassError(
                f"sparse-attention: block {i} is not in the graph (its blocks: "
                f"{', '.join(map(str, present))}); see `trimformer inspect`"
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
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    pattern: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T + mask) as SDPA computes it, (B, H, N, N), fp32; 0 on empty rows.

    `pattern` (N, N) bool, if given, is a local pattern applied on top (the local op's math)."""
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
    if pattern is not None:
        s = s.masked_fill(~pattern, -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def _row_sums(x: torch.Tensor, windows: list[int], sink: int, causal: bool) -> torch.Tensor:
    """Per query row, the sum of x[i, j] over the keys j each window's pattern keeps.

    x (B, H, N, N) -> (B, H, N, len(windows)), in float64. With X(i, d) = x[i, i - d] the row's
    band sum for window w is sum_{d < w} X(i, d) (a cumulative sum over the distance d); each
    sink column t adds x[i, t] on the rows whose band misses it (i >= t + w, or i <= t - w when
    bidirectional).
    """
    b, h, n, _ = x.shape
    x = x.double()
    i = torch.arange(n).view(n, 1)
    d = torch.arange(n).view(1, n)
    back = (i - d).clamp(min=0).expand(b, h, n, n)  # x[i, i - d]
    by_dist = x.gather(3, back) * (i >= d)
    if not causal:
        fwd = (i + d).clamp(max=n - 1).expand(b, h, n, n)  # x[i, i + d], d > 0
        by_dist = by_dist + x.gather(3, fwd) * (((i + d) < n) & (d > 0))
    w = torch.tensor(windows, dtype=torch.int64)
    sums = torch.cumsum(by_dist, dim=3)[..., w - 1]  # (B, H, N, C)
    ww = w.view(1, -1)
    for t in range(min(sink, n)):
        missed = i >= t + ww
        if not causal:
            missed = missed | (i <= t - ww)
        sums = sums + x[..., t : t + 1] * missed
    return sums


def _kept_mass(
    p: torch.Tensor, rows: torch.Tensor, windows: list[int], sink: int, causal: bool
) -> torch.Tensor:
    """Mass kept per head for each window: (H, len(windows)), summed over the real rows."""
    b, _, n, _ = p.shape
    kept = _row_sums(p, windows, sink, causal)  # (B, H, N, C)
    return (kept * rows.view(b, 1, n, 1).double()).sum(dim=(0, 2))


def _loss_change(
    p: torch.Tensor,
    grad_p: torch.Tensor,
    rows: torch.Tensor,
    windows: list[int],
    sink: int,
    causal: bool,
    around: int | None = None,
) -> torch.Tensor:
    """First-order change of the loss per head for each window: (H, len(windows)).

    Keeping only the pattern P(i) of row i renormalizes it: A'[i, j] = A[i, j] / K_i on P(i)
    (K_i = sum_{j in P(i)} A[i, j]) and 0 elsewhere. With G = dL/dA, to first order

        dL ~ sum_i sum_j G[i, j] (A'[i, j] - A[i, j])
           = sum_i ( sum_{j in P(i)} G[i, j] A[i, j] / K_i  -  sum_j G[i, j] A[i, j] )

    MoA (Fu et al. 2024, section 4) estimates the same first-order change from dL/dA, entry by
    entry, and sums absolute values; here the whole pattern is taken at once and the sign is
    kept, so a window that cuts attention the loss is better without counts as a gain.

    With `around` = w0, the expansion point is the model with every head at window w0 (G taken
    there, p still the dense probabilities): the change is from A_w0 to A_w, i.e. the term
    sum_j G A on the right is the pattern-w0 row sum. Linearizing at the baseline a plan must
    beat is more accurate for windows near it than linearizing at dense attention.
    """
    b, _, n, _ = p.shape
    ga = grad_p.double() * p.double()
    kept = _row_sums(p, windows, sink, causal)  # (B, H, N, C)
    kept_ga = _row_sums(ga, windows, sink, causal)
    if around is None:
        base = ga.sum(-1, keepdim=True)  # (B, H, N, 1)
    else:
        k0 = _row_sums(p, [around], sink, causal)
        base = _row_sums(ga, [around], sink, causal) / k0.clamp(min=1e-300)
    change = torch.where(kept > 0, kept_ga / kept.clamp(min=1e-300) - base, 0.0)
    return (change * rows.view(b, 1, n, 1).double()).sum(dim=(0, 2))


def _grad_probe(
    gm: fx.GraphModule,
    cores: list[tuple[int, Attention]],
    causal: dict[int, bool],
    sink: int,
    around: Window | None,
) -> tuple[fx.GraphModule, dict[int, tuple[torch.Tensor, ...]]]:
    """A GraphModule sharing gm's weights whose attention outputs can be differentiated.

    After each core (block bi) it adds a zero leaf z (requires_grad) to the core's output, and
    records (z, q, k, v, mask); dL/dz is then dL/d(attention output) through every path:

        q, k, v, mask -> sdpa -> out                 before
        q, k, v, mask -> sdpa -> out + z -> ...      after (z = 0, so values are unchanged)

    With `around` = (alpha, beta) every core's output is replaced by local attention at that
    window (the op's math, computed densely so autograd sees it), so gradients are taken at the
    uniform-window model instead of the dense one.
    """
    saved: dict[int, tuple[torch.Tensor, ...]] = {}
    scales = {bi: args_of(att.core).get("scale") for bi, att in cores}

    def grab(bi: int, out: torch.Tensor, q, k, v, mask):  # type: ignore[no-untyped-def]
        if around is not None:
            n = q.shape[-2]
            pattern = local_pattern(n, window_size(*around, n), sink, causal[bi], q.device)
            p = _probabilities(q, k, mask, causal[bi], scales[bi], pattern)
            rep = q.shape[1] // v.shape[1]
            vv = v if rep == 1 else v.repeat_interleave(rep, dim=1)
            out = (p @ vv.float()).to(out.dtype)
        z = torch.zeros_like(out, requires_grad=True)
        saved[bi] = (z, q.detach(), k.detach(), v.detach(), mask)
        return out + z

    by_core = {att.core: bi for bi, att in cores}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda x: env[x])
        if node in by_core:
            a = args_of(node)
            operands = tuple(env[a[x]] for x in ("query", "key", "value"))
            mask = env[a["attn_mask"]] if a.get("attn_mask") is not None else None
            new = graph.call_function(grab, (by_core[node], new, *operands, mask))
        env[node] = new
    probe = fx.GraphModule(gm, graph)
    probe.recompile()
    return probe, saved


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _next_token_loss(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of logits at t against the token at t + 1, real positions only."""
    logits = _first_tensor(logits)  # a graph's outputs come as a sequence of one
    ids = inputs["input_ids"]
    real = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    valid = real[:, :-1] & real[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


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
    objective: Objective = "auto",
    around: Window | None = None,
) -> dict[str, Any]:
    """Kept attention mass, and the first-order loss change, of every head for every candidate
    window, at each length.

    Lengths default to the calibration batches' length N and N // 2 (batches are cropped to
    shorter lengths). Candidates whose window is under `min_window` tokens at the shortest
    length are left out (MoA floors every span at 128 tokens): kept mass cannot see that a head
    which puts its mass on the sinks and itself still needs the rest.

    `objective` is what `plan` minimizes: "loss" (the first-order change of the next-token loss,
    `_loss_change`; causal LMs only, one backward pass per batch and length), "mass" (the
    attention mass lost; forward only), or "auto" ("loss" for causal LMs, else "mass").
    `around` = (alpha, beta) takes the loss expansion at the model with that uniform window
    instead of at dense attention (`_loss_change`); costs are then changes relative to it.

    Returns {"lengths", "candidates", "sink", "causal", "blocks", "heads", "objective",
    "kept": {block: [head][length][candidate]}, "loss": same shape or None (objective "mass"),
    "density": [length][candidate]}.
    """
    if not ctx.batches:
        raise PassError("sparse-attention: scoring needs calibration batches (ctx.batches)")
    cores = _cores(structure)
    if not cores:
        raise PassError("sparse-attention: the graph has no SDPA attention core to score")
    if objective == "auto":
        objective = "loss" if ctx.kind == "causal-lm" else "mass"
    if objective == "loss" and ctx.kind != "causal-lm":
        raise PassError(
            f"sparse-attention: objective 'loss' needs a causal LM (next-token loss); this "
            f"model is {ctx.kind!r}: use objective 'mass'"
        )
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
    if objective == "loss":
        grad_probe, saved = _grad_probe(gm, cores, causal, sink, around)
    else:
        nodes: list[fx.Node] = []
        for _, att in cores:
            a = args_of(att.core)
            nodes += [a["query"], a["key"]] + ([a["attn_mask"]] if a.get("attn_mask") else [])
        probe = tap(gm, list(dict.fromkeys(nodes)))
        where = {node: i for i, node in enumerate(dict.fromkeys(nodes))}

    def shape() -> dict[int, torch.Tensor]:
        return {
            bi: torch.zeros(att.num_heads, len(lengths), len(cands), dtype=torch.float64)
            for bi, att in cores
        }

    kept, loss = shape(), shape()
    rows_total = torch.zeros(len(lengths), dtype=torch.float64)
    batches_seen = torch.zeros(len(lengths), dtype=torch.float64)
    for li, n in enumerate(lengths):
        windows = [window_size(a, b, n) for a, b in cands]
        for batch in ctx.batches:
            if int(batch["input_ids"].shape[1]) < n:
                continue
            inputs = _crop(batch, n)
            am = inputs.get("attention_mask")
            rows = am.float() if am is not None else torch.ones(inputs["input_ids"].shape)
            rows_total[li] += float(rows.sum())
            batches_seen[li] += 1
            if objective == "loss":
                with torch.enable_grad():
                    saved.clear()
                    logits = grad_probe(**inputs)
                    leaves = [saved[bi][0] for bi, _ in cores]
                    grads = torch.autograd.grad(_next_token_loss(logits, inputs), leaves)
                operands = {
                    bi: (*saved[bi][1:], g) for (bi, _), g in zip(cores, grads, strict=True)
                }
            else:
                with torch.no_grad():
                    vals = probe(**inputs)
            with torch.no_grad():
                for bi, att in cores:
                    a = args_of(att.core)
                    if objective == "loss":
                        q, k, v, mask, grad_out = operands[bi]
                    else:
                        q, k = vals[where[a["query"]]], vals[where[a["key"]]]
                        mask = vals[where[a["attn_mask"]]] if a.get("attn_mask") else None
                    p = _probabilities(q, k, mask, causal[bi], a.get("scale"))
                    kept[bi][:, li] += _kept_mass(p, rows, windows, sink, causal[bi])
                    if objective == "loss":
                        # dL/dA[i, j] = dL/dout[i] . v[j] (out = A v), per query head
                        v = v.float()
                        if v.shape[1] != q.shape[1]:
                            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
                        grad_p = grad_out.float() @ v.transpose(-1, -2)
                        w0 = None if around is None else window_size(*around, n)
                        loss[bi][:, li] += _loss_change(
                            p, grad_p, rows, windows, sink, causal[bi], w0
                        )
    any_causal = next(iter(causal.values()))
    return {
        "lengths": lengths,
        "candidates": [list(c) for c in cands],
        "sink": sink,
        "causal": any_causal,
        "blocks": [bi for bi, _ in cores],
        "heads": {bi: att.num_heads for bi, att in cores},
        "objective": objective,
        "around": None if around is None else list(around),
        "kept": {bi: (kept[bi] / rows_total.view(1, -1, 1)).tolist() for bi in kept},
        # the loss is a mean per batch, so its change is averaged over batches
        "loss": (
            {bi: (loss[bi] / batches_seen.view(1, -1, 1)).tolist() for bi in loss}
            if objective == "loss"
            else None
        ),
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
    """(candidate index, total cost over heads) of the uniform baseline at `budget`: the single
    window that spends the most of the budget (highest mean density over the lengths) while
    fitting it at every length; ties go to the least cost (`_cost_matrix`).

    It fills the budget rather than minimizing the cost: a loss estimate can favour windows far
    below the budget (the sample's perplexity at 1024 tokens improves when attention is cut),
    and the baseline must cost what the plan it is compared with costs.
    """
    dens = np.asarray(scores["density"])  # (lengths, candidates)
    cost = _cost_matrix(scores).sum(axis=0)  # (candidates,)
    fits = [
        c
        for c in range(dens.shape[1])
        if all(dens[li, c] <= budget[li] + 1e-12 for li in range(dens.shape[0]))
    ]
    if not fits:
        return None
    best = max(fits, key=lambda c: (round(float(dens[:, c].mean()), 9), -float(cost[c])))
    return best, float(cost[best])


def _lost_matrix(scores: dict[str, Any]) -> np.ndarray:
    """(all heads in block order, candidates): 1 - kept, averaged over lengths."""
    rows = []
    for bi in scores["blocks"]:
        kept = np.asarray(scores["kept"][bi])  # (heads, lengths, candidates)
        rows.append(1.0 - kept.mean(axis=1))
    return np.concatenate(rows, axis=0)


def _cost_matrix(scores: dict[str, Any]) -> np.ndarray:
    """(all heads, candidates): what `plan` minimizes. The estimated loss change averaged over
    lengths when the scores have it (objective "loss"), else the lost mass."""
    if scores.get("loss") is None:
        return _lost_matrix(scores)
    return np.concatenate(
        [np.asarray(scores["loss"][bi]).mean(axis=1) for bi in scores["blocks"]], axis=0
    )


def trust_region(scores: dict[str, Any], trust: float) -> dict[str, Any]:
    """The scores restricted to candidates whose window is within [w0 / trust, w0 * trust] of
    the expansion point's window w0 (`score(around=...)`) at every length.

    A first-order estimate is only trustworthy near the point it was taken at: far from it
    (a 16-token head next to a 1024-token one when the expansion point has 128) the estimate
    and the real change can even differ in sign.
    """
    around = scores.get("around")
    if around is None:
        raise PassError("sparse-attention: a trust region needs scores taken with around=")
    keep = [
        c
        for c, (a, b) in enumerate(scores["candidates"])
        if all(
            window_size(*around, n) / trust
            <= window_size(a, b, n)
            <= window_size(*around, n) * trust
            for n in scores["lengths"]
        )
    ]
    if not keep:
        raise PassError(f"sparse-attention: no candidate within a trust region of {trust}x")

    def pick(per_block: dict[int, Any] | None) -> dict[int, Any] | None:
        if per_block is None:
            return None
        return {b: np.asarray(v)[..., keep].tolist() for b, v in per_block.items()}

    return {
        **scores,
        "candidates": [scores["candidates"][c] for c in keep],
        "kept": pick(scores["kept"]),
        "loss": pick(scores.get("loss")),
        "density": np.asarray(scores["density"])[:, keep].tolist(),
        "trust": trust,
    }


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
    objective: Objective = "auto",
    floor: float = 0.9,
    around: Window | Literal["uniform"] | None = "uniform",
    trust: float | None = 2.0,
    scores: dict[str, Any] | None = None,
    time_limit: float = 30.0,
) -> tuple[SparseAttentionConfig, dict[str, Any]]:
    """Per-head windows with the least cost (the scores' objective: estimated loss change or
    lost mass) whose mean density lies in [floor * budget, budget] at every profiled length;
    `density` is the budget, a share of dense attention's pairs, one value or one per length.
    The floor (MoA uses 0.9) keeps the plan from spending less than it is given, so a plan and
    a uniform window compared at one budget really cost the same.

    With the loss objective, `around` is where the loss is expanded (see `score`): "uniform"
    (the default) is the uniform window that fills the budget (`uniform_choice`), a window
    names one, None is dense attention; `trust` then limits candidates to `trust_region`
    (ignored for scores without an expansion point). Given `scores`, they are used as they are.

    Returns the resolved config and a report: the scores, the plan's and the best uniform
    window's cost, lost mass and densities.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    if scores is None:
        common = dict(sink=sink, lengths=lengths, candidates=candidates, min_window=min_window)
        mass = score(gm, structure, ctx, objective="mass", **common)  # type: ignore[arg-type]
        scores = mass
        if around == "uniform":
            uni = uniform_choice(mass, _budgets(mass, density))
            around = None
            if uni is not None:
                a0, b0 = mass["candidates"][uni[0]]
                around = (float(a0), float(b0))
        if (objective == "loss") or (objective == "auto" and ctx.kind == "causal-lm"):
            scores = score(
                gm,
                structure,
                ctx,
                objective="loss",
                around=around,
                **common,  # type: ignore[arg-type]
            )
    if (trust is not None) and (scores.get("around") is not None):
        scores = trust_region(scores, trust)
    budget = _budgets(scores, density)
    lost = _cost_matrix(scores)  # (H, C)
    mass = _lost_matrix(scores)
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
    for li in range(len(budget)):  # mean density within [floor, 1] x budget at every length
        rows.append(
            (
                {h * n_c + c: dens[li, c] for h in range(n_heads) for c in range(n_c)},
                floor * budget[li] * n_heads,
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
            f"sparse-attention: no per-head plan has density in [{floor} x, 1 x] {budget} at "
            f"lengths {scores['lengths']} ({res.message}); change the budget, lower the floor "
            "or add candidate windows"
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
        "objective": scores.get("objective", "mass"),
        "plan": {
            "cost": float(lost[np.arange(n_heads), choice].sum()),
            "lost": float(mass[np.arange(n_heads), choice].sum() / n_heads),
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
            "cost": total,
            "lost": float(mass[:, c].sum() / n_heads),
            "density": [float(dens[li, c]) for li in range(len(budget))],
        }
    return config, report


# ----------------------------------------------------------------------------- validation

PlanKind = Literal["auto", "per-head", "per-layer", "uniform"]


def validation_loss(
    gm: fx.GraphModule,
    kind: str,
    batches: Sequence[dict[str, torch.Tensor]],
    refs: Sequence[torch.Tensor],
) -> float:
    """How far a plan's outputs are from the dense model's (`refs`) on `batches`, measured with
    `quality.evaluate`: causal LMs, its `kl`, the mean KL(dense || plan) of the next-token
    distributions over real positions (MoA validates against the dense model's own responses,
    "model alignment"; the KL is the soft form of that loss, paired with the dense model token
    by token, so it varies less between plans than the text's own next-token loss, whose
    token-to-token spread dwarfs the 0.1-0.5% that separates plans); otherwise 1 - its
    `token_cosine` (per-token cosine with the dense output over the real tokens)."""
    wrapped = [quality.Batch(b, 0) for b in batches]
    metrics = quality.evaluate(kind, gm, wrapped, refs).metrics
    return metrics["kl"] if kind == "causal-lm" else 1.0 - metrics["token_cosine"]


def _split(batches: list[dict[str, torch.Tensor]]) -> tuple[list, list]:
    """(profile, validation): the last quarter of the batches (at least one) validates; a
    single batch does both."""
    if len(batches) < 2:
        return batches, batches
    v = max(1, len(batches) // 4)
    return batches[:-v], batches[-v:]


def choose(
    gm: fx.GraphModule,
    structure: Structure,
    ctx: Context,
    *,
    density: float,
    sink: int = 4,
    windows: PlanKind = "auto",
    lengths: Sequence[int] | None = None,
    candidates: Sequence[Window] | None = None,
    min_window: int = 16,
    floor: float = 0.97,
    trusts: Sequence[float | None] = (1.5, 2.0, 4.0),
) -> tuple[SparseAttentionConfig, dict[str, Any]]:
    """Windows under a density budget, chosen as MoA chooses: profile, solve, then validate.

    1. Profile on the first three quarters of the calibration batches (`score`): kept mass,
       and for causal LMs the first-order loss change expanded at the uniform window w0 that
       fills `density` (`uniform_choice`).
    2. Solve `plan` for a family of plans at the uniform window's own density (within
       [floor, 1] x it at every profiled length): objective loss (causal LMs) and mass, trust
       regions `trusts` around w0, one window per layer (K = 1) and MoA's two (K = 2).
    3. Measure every distinct plan, and the uniform window itself, on the held-back quarter
       (`validation_loss`: KL from the dense model's next-token distributions, or 1 - cosine
       with the dense output for encoders) and keep the lowest. MoA validates its Pareto plans
       the same way (loss on the dense model's own responses, on a held-out split) because the
       first-order estimate is only a guide: it can rank plans that are worse than uniform as
       better (benchmarks/RESULTS-sparse-attention.md).

    `windows`: "auto" (every family member and uniform), "per-head" (K = 2 plans only),
    "per-layer" (K = 1 only) or "uniform" (the uniform window, nothing solved or validated).
    Returns the config and a report: the budget, the uniform window, every validated plan
    (label, density, estimated cost, validation KL or 1 - cosine) and the chosen label.
    """
    if not 0.0 < density <= 1.0:
        raise PassError(f"sparse-attention: density budget {density} is not in (0, 1]")
    if windows not in ("auto", "per-head", "per-layer", "uniform"):
        raise PassError(
            f"sparse-attention: windows {windows!r}: use auto, per-head, per-layer or uniform"
        )
    profile, held = _split(list(ctx.batches))
    pctx = Context(kind=ctx.kind, batches=profile)
    common: dict[str, Any] = dict(
        sink=sink, lengths=lengths, candidates=candidates, min_window=min_window
    )
    mass = score(gm, structure, pctx, objective="mass", **common)
    budget = _budgets(mass, density)
    uni = uniform_choice(mass, budget)
    if uni is None:
        smallest = float(np.asarray(mass["density"]).max(axis=0).min())
        raise PassError(
            f"sparse-attention: no candidate window fits density {density} at lengths "
            f"{mass['lengths']} (the sparsest needs {smallest:.3f}); raise the budget, lower "
            "min_window or calibrate on longer sequences (--seq-len)"
        )
    cands = [tuple(c) for c in mass["candidates"]]
    alpha, beta = cands[uni[0]]
    matched = [float(d[uni[0]]) for d in mass["density"]]
    family: dict[str, tuple[SparseAttentionConfig, dict[str, Any]]] = {
        f"uniform {alpha:g}+{beta:g}N": (
            SparseAttentionConfig(sink=sink, alpha=alpha, beta=beta),
            {"density": matched, "estimate": 0.0},
        )
    }
    if windows != "uniform":
        sources = [("mass", {**mass, "around": [alpha, beta]})]
        if ctx.kind == "causal-lm":
            loss = score(gm, structure, pctx, objective="loss", around=(alpha, beta), **common)
            sources.insert(0, ("loss", loss))
        ks = {"auto": (1, 2), "per-head": (2,), "per-layer": (1,)}[windows]
        # plans are told apart by the windows they give every head (a per-head plan whose
        # heads all got the uniform window is the uniform window)
        seen = {_canonical(SparseAttentionConfig(sink=sink, alpha=alpha, beta=beta), mass["heads"])}
        for objective, scores in sources:
            # kept mass is not an expansion, so it is also solved without a trust region
            for trust in trusts if objective == "loss" else (*trusts, None):
                for k in ks:
                    try:
                        config, rep = plan(
                            gm,
                            structure,
                            pctx,
                            density=matched,
                            scores=scores,
                            trust=trust,
                            max_windows_per_layer=k,
                            floor=floor,
                        )
                    except PassError:
                        continue  # no plan in this trust region at this density
                    key = _canonical(config, mass["heads"])
                    if key in seen:
                        continue
                    seen.add(key)
                    label = (
                        f"{'per-layer' if k == 1 else 'per-head'} ({objective}, "
                        f"trust {trust if trust is not None else 'none'})"
                    )
                    family[label] = (
                        config,
                        {"density": rep["plan"]["density"], "estimate": rep["plan"]["cost"]},
                    )
        if windows != "auto":
            family = {k: v for k, v in family.items() if not k.startswith("uniform")} or family
    refs = quality.reference_outputs(gm, [quality.Batch(b, 0) for b in held])
    validated = []
    for label, (config, info) in family.items():
        g = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        sparsify_attention(g, discover(g), config, pctx)
        validated.append(
            {
                "label": label,
                **info,
                "validation_loss": validation_loss(g, ctx.kind, held, refs),
                "config": config,
            }
        )
    best = min(validated, key=lambda r: r["validation_loss"])
    report = {
        "budget": density,
        "lengths": mass["lengths"],
        "profile_batches": len(profile),
        "validation_batches": len(held),
        "validated_on_profile_batches": held is profile,
        "uniform": {"alpha": alpha, "beta": beta, "density": matched},
        "plans": [
            {k: v for k, v in r.items() if k != "config"}
            | {"windows": _describe(r["config"]), "config": r["config"].model_dump(mode="json")}
            for r in validated
        ],
        "chosen": best["label"],
    }
    return best["config"], report


def _canonical(config: SparseAttentionConfig, heads: dict[int, int]) -> tuple:
    """Every head's (alpha, beta), block by block: equal for configs that compute the same."""
    uniform = (float(config.alpha), float(config.beta))
    return tuple(
        tuple(tuple(map(float, w)) for w in config.heads.get(b, [uniform] * n))
        for b, n in sorted(heads.items())
    )


def _describe(config: SparseAttentionConfig) -> dict[str, list[str]] | str:
    """Windows per block as text, e.g. {0: ['0+0.125N', '16+0.25N']} (or the uniform one)."""
    if not config.heads:
        return f"{config.alpha:g}+{config.beta:g}N"
    return {
        str(b): sorted({f"{a:g}+{bt:g}N" for a, bt in pairs}) for b, pairs in config.heads.items()
    }


SPEC = PassSpec(
    name="sparse-attention",
    summary="replace attention with sliding-window + sink attention, per-head elastic windows "
    "(StreamingLLM / MoA)",
    exactness="lossy",
    config=SparseAttentionConfig,
    knobs={
        "sink": "tokens at the start every query may see",
        "alpha, beta": "uniform window w = alpha + beta * N",
        "heads": "per block, per head (alpha, beta): from choose() under a density budget "
        "(CLI --sparse-attention DENSITY --sparse-windows auto|per-head|per-layer|uniform)",
        "blocks": "which blocks are rewritten",
    },
    apply=sparsify_attention,
    score=_score_spec,
    paper="MoA: Mixture of Sparse Attention (2024); StreamingLLM (2024)",
)
