"""Training-free compensation for what a lossy pass removes, fitted on calibration activations.

Pruning (heads, neurons) cuts input features of one linear layer: the attention output
projection or the MLP down projection. Its output over calibration tokens t was

    y_t = W x_t + b                     W (out, in), x_t (in,), b (out,) (zero if absent)

and after the cut it only sees the kept features K. Two ways to make the kept part stand in for
the whole, both from the second moments of [x; 1] over the calibration tokens, so any K costs
one small solve (the statistics are gathered once per layer):

- "bias" (FLAP, An et al. 2024): the removed features contribute their mean,
      b' = b + W[:, R] mean_t(x_R)
- "lstsq" (the layer-wise reconstruction of Kwon et al., "A Fast Post-Training Pruning
  Framework for Transformers", 2022): refit the kept columns and the bias to reproduce y,
      [W'_K, b'] = argmin Σ_t ‖W x_t + b - W'_K x_{t,K} - b'‖² + λ ‖[W'_K, b'] - [W_K, b]‖²
  a ridge regression towards the original weights, λ = ridge · mean diagonal of the moment
  matrix of [x_K; 1]. With G = Σ_t [x;1][x;1]ᵀ and Θ = [Wᵀ; bᵀ]:
      Θ'_K = (G_KK + λI)⁻¹ (G_K,: Θ + λ Θ_K)
  (the rows K plus the ones row; "+ λ Θ_K" pulls towards the original).

Dropping a sub-layer (drop pass) replaces it by the identity; "mean" compensation adds the
sub-layer's mean change of the residual stream instead, y := x + mean_t(y_t - x_t).

Statistics are fp64, over non-pad tokens. A layer's moment matrix has (in + 1)² entries; the
pass refuses "lstsq" above MAX_LSTSQ_FEATURES inputs (use "bias" there).
"""

from __future__ import annotations

import torch
from torch import fx

from trimformer.errors import PassError
from trimformer.graph.rewrite import (
    add_param,
    get_param,
    set_arg,
    set_param,
    sum_over_tokens,
    tap,
    token_mask,
)
from trimformer.graph.structure import Linear
from trimformer.passes.base import Context

MAX_LSTSQ_FEATURES = 16384
STATS_KEY = "compensate.moments"  # ctx.cache entry a caller may keep across builds of one graph


def input_moments(
    gm: fx.GraphModule, linears: list[Linear], ctx: Context
) -> dict[str, tuple[torch.Tensor, int]]:
    """{weight target: (Σ_t [x;1][x;1]ᵀ in fp64, token count)} for each linear's input.

    Reuses ctx.cache[STATS_KEY] entries (filled here) when the caller keeps one dict there for
    one graph; otherwise computes from ctx.batches.
    """
    cache = ctx.cache.get(STATS_KEY)
    out: dict[str, tuple[torch.Tensor, int]] = {}
    todo = []
    for lin in linears:
        hit = cache.get(lin.weight) if isinstance(cache, dict) else None
        if hit is not None and hit[0].shape[0] == lin.in_features + 1:
            out[lin.weight] = hit
        else:
            todo.append(lin)
    if not todo:
        return out
    if not ctx.batches:
        raise PassError(
            "compensation needs calibration batches and none were given; pass calibration text "
            "or set compensate to 'none'"
        )
    probe = tap(gm, [lin.input for lin in todo])
    sums = [
        torch.zeros(lin.in_features + 1, lin.in_features + 1, dtype=torch.float64) for lin in todo
    ]
    counts = [0] * len(todo)
    with torch.no_grad():
        for batch in ctx.batches:
            for i, value in enumerate(probe(**batch)):
                x = value[token_mask(batch, value)].double()
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
                sums[i] += x.t() @ x
                counts[i] += x.shape[0]
    for lin, g, n in zip(todo, sums, counts, strict=True):
        out[lin.weight] = (g, n)
        if isinstance(cache, dict):
            cache[lin.weight] = (g, n)
    return out


def _weight_out_in(gm: fx.GraphModule, lin: Linear) -> torch.Tensor:
    w = get_param(gm, lin.weight).detach()
    return (w.t() if lin.transposed else w).double()  # (out, in)


def _bias(gm: fx.GraphModule, lin: Linear, out_features: int) -> torch.Tensor:
    if lin.bias is None:
        return torch.zeros(out_features, dtype=torch.float64)
    return get_param(gm, lin.bias).detach().double()


def fit_kept_inputs(
    w: torch.Tensor,
    b: torch.Tensor,
    moments: tuple[torch.Tensor, int],
    keep: list[int],
    method: str,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (W'_K (out, |K|), b') for a linear reduced to input features `keep` (fp64)."""
    g, n = moments
    width = w.shape[1]
    keep_t = torch.tensor(keep, dtype=torch.long)
    if method == "bias":
        removed = torch.tensor(sorted(set(range(width)) - set(keep)), dtype=torch.long)
        mean = g[removed, width] / max(n, 1)  # Σ_t x_R, from the ones column
        return w[:, keep_t], b + w[:, removed] @ mean
    rows = torch.cat([keep_t, torch.tensor([width])])
    theta = torch.cat([w.t(), b[None, :]], dim=0)  # (in + 1, out)
    a = g[rows][:, rows]
    lam = ridge * float(a.diagonal().mean())
    rhs = g[rows] @ theta + lam * theta[rows]
    a = a + lam * torch.eye(len(rows), dtype=a.dtype)
    sol = torch.linalg.solve(a, rhs)  # (|K| + 1, out)
    return sol[:-1].t().contiguous(), sol[-1].contiguous()


def reduce_inputs(
    gm: fx.GraphModule,
    lin: Linear,
    keep: list[int],
    moments: tuple[torch.Tensor, int] | None,
    method: str,
    ridge: float,
) -> str | None:
    """Keep input features `keep` of a linear, compensating for the rest (method "none" slices).

    Adds a bias to a linear that had none when the compensation needs one, and returns that
    new parameter's target (None otherwise).
    """
    w = _weight_out_in(gm, lin)
    if method == "none" or moments is None:
        new_w, new_b = w[:, keep], None
    else:
        if method == "lstsq" and lin.in_features > MAX_LSTSQ_FEATURES:
            raise PassError(
                f"compensate 'lstsq': {lin.name} has {lin.in_features} inputs (more than "
                f"{MAX_LSTSQ_FEATURES}); use compensate 'bias' for this model"
            )
        new_w, new_b = fit_kept_inputs(w, _bias(gm, lin, w.shape[0]), moments, keep, method, ridge)
    dtype = get_param(gm, lin.weight).dtype
    set_param(gm, lin.weight, (new_w.t() if lin.transposed else new_w).to(dtype))
    if new_b is None:
        return None
    if lin.bias is not None:
        set_param(gm, lin.bias, new_b.to(dtype))
        return None
    owner = lin.weight.rpartition(".")[0]
    target = f"{owner}.bias" if owner else f"{lin.weight}_bias"
    node = add_param(gm, target, new_b.to(dtype), before=lin.node)
    set_arg(lin.node, "bias", node)
    return str(node.target)


def sublayer_mean_shift(
    gm: fx.GraphModule, pairs: list[tuple[fx.Node, fx.Node]], ctx: Context
) -> list[torch.Tensor]:
    """mean_t(y_t - x_t) over non-pad calibration tokens for each (input x, output y) pair."""
    if not ctx.batches:
        raise PassError(
            "drop compensation 'mean' needs calibration batches and none were given; pass "
            "calibration text or set compensate to 'none'"
        )
    sums, count = sum_over_tokens(gm, pairs, ctx.batches, lambda x, y: y - x)
    return [s / max(count, 1) for s in sums]
