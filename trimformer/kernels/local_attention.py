"""`trimformer::local_attention`: sliding-window attention with attention sinks, one custom op.

Contract
--------
    out = torch.ops.trimformer.local_attention(
        query, key, value, attn_mask, sink, window_alpha, window_beta, is_causal, scale)

- `query` (B, H, N, D); `key` (B, Hk, N, D) and `value` (B, Hk, N, Dv) with H % Hk == 0 (GQA:
  key/value head h // (H // Hk) serves query head h). Queries and keys have the same length N.
- `attn_mask`: None, or an SDPA-style mask broadcastable to (B, H, N, N): bool (True = may
  attend) or float (added to the scores). It is combined with the local pattern (AND / added),
  so padding and any other masking the model does are kept.
- `sink`: the first `sink` positions are keys every query may see (attention sinks).
- `window_alpha`, `window_beta`: per head (length H) or uniform (length 1) coefficients of the
  elastic window, computed at run time from the sequence length N (MoA):

      w_h(N) = clamp(floor(alpha_h + beta_h * N), 1, N)

- `is_causal`: the direction of the pattern (below). `scale`: score scale, None = 1/sqrt(D).
- Returns (B, H, N, Dv) as a (B, N, H, Dv) buffer seen through transpose(1, 2), the layout the
  SDPA CPU kernel returns (so a following transpose + view stays a view).

Pattern: query i may see key j iff the mask allows (i, j) and

    causal:         i - w_h < j <= i        (the w_h most recent keys, itself included)
                 or j < sink and j <= i
    bidirectional:  |i - j| < w_h           (w_h - 1 keys on either side, and itself)
                 or j < sink                 (sinks are global keys, not global queries)

A query row that may see nothing gives 0, as SDPA does on CPU for fully masked rows. With
w_h = N (alpha = 0, beta = 1, or alpha >= N) the pattern is the whole causal triangle (the whole
square when bidirectional), so the op equals dense attention under the same mask.

Sources: sinks plus a recent window, StreamingLLM (Xiao et al., "Efficient Streaming Language
Models with Attention Sinks", ICLR 2024); per-head elastic spans alpha_h + beta_h * N, MoA (Fu et
al., "Mixture of Attention Spans", arXiv 2406.14909).

Implementations of the one op, chosen by device at run time:
- CUDA tensors with `triton` importable: the FlashAttention-style kernel in
  `kernels.local_attention_triton` (visits only the sink and window key blocks);
- everything else: `local_attention_chunked`, plain PyTorch whose work grows as N * window;
- ONNX: `kernels.local_attention_onnx` translates the op into standard ONNX ops with the same
  block-local math (used by `trimformer.export.onnx.export_onnx`).
`local_attention_reference` is the dense masked definition all three are tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trimformer.errors import TrimformerError

# ----------------------------------------------------------------------------- the pattern


def window_size(alpha: float, beta: float, n: int) -> int:
    """The elastic window w(N) = clamp(floor(alpha + beta * N), 1, N) (MoA, Fu et al. 2024)."""
    return max(1, min(int(n), int(math.floor(alpha + beta * n))))


def head_groups(
    window_alpha: Sequence[float], window_beta: Sequence[float], num_heads: int
) -> list[tuple[float, float, list[int]]]:
    """Heads grouped by identical (alpha, beta), in order of first appearance.

    Heads of one group always share a window, whatever N is, so each group runs as one batched
    computation; a uniform configuration is one group of every head.
    """
    if len(window_alpha) != len(window_beta) or len(window_alpha) not in (1, num_heads):
        raise TrimformerError(
            f"local_attention: window_alpha has {len(window_alpha)} values and window_beta "
            f"{len(window_beta)}; both need 1 (uniform) or one per head ({num_heads})"
        )
    if len(window_alpha) == 1:
        return [(float(window_alpha[0]), float(window_beta[0]), list(range(num_heads)))]
    groups: dict[tuple[float, float], list[int]] = {}
    for h, (a, b) in enumerate(zip(window_alpha, window_beta, strict=True)):
        groups.setdefault((float(a), float(b)), []).append(h)
    return [(a, b, heads) for (a, b), heads in groups.items()]


def local_pattern(
    n: int, window: int, sink: int, is_causal: bool, device: torch.device | str = "cpu"
) -> Tensor:
    """(N, N) bool: may query i see key j under the local pattern (mask not included)."""
    i = torch.arange(n, device=device).view(n, 1)
    j = torch.arange(n, device=device).view(1, n)
    d = j - i
    right = 0 if is_causal else window - 1
    band = (d > -window) & (d <= right)
    sinks = j < sink
    if is_causal:
        sinks = sinks & (d <= 0)
    return band | sinks


def pattern_pairs(n: int, window: int, sink: int, is_causal: bool) -> int:
    """Number of (query, key) pairs the pattern allows at length N, without a mask (exact)."""
    i = torch.arange(n, dtype=torch.int64)
    s = min(sink, n)
    if is_causal:
        band = torch.clamp(i + 1, max=window)
        # sinks t < s, t <= i, outside the band (t <= i - window)
        extra = torch.clamp(torch.clamp(i - window + 1, max=s), min=0)
    else:
        band = torch.clamp(i + window, max=n) - torch.clamp(i - window + 1, min=0)
        extra = torch.clamp(torch.clamp(i - window + 1, max=s), min=0)
        extra = extra + torch.clamp(s - (i + window), min=0)
    return int((band + extra).sum())


def dense_pairs(n: int, is_causal: bool) -> int:
    """Pairs dense attention computes: the causal triangle, or the full square."""
    return n * (n + 1) // 2 if is_causal else n * n


# ----------------------------------------------------------------------------- reference


def _repeat_kv(key: Tensor, value: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    hk = key.shape[1]
    if hk == num_heads:
        return key, value
    if num_heads % hk != 0:
        raise TrimformerError(
            f"local_attention: {num_heads} query heads cannot share {hk} key/value heads evenly"
        )
    rep = num_heads // hk
    return key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)


def _mask4(attn_mask: Tensor | None) -> Tensor | None:
    """The mask as a 4-D view (leading dims of size 1 added, nothing copied)."""
    if attn_mask is None:
        return None
    if attn_mask.dim() > 4:
        raise TrimformerError(
            f"local_attention: attn_mask has {attn_mask.dim()} dims; it must broadcast to "
            "(batch, heads, N, N)"
        )
    return attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def local_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    sink: int,
    window_alpha: Sequence[float],
    window_beta: Sequence[float],
    is_causal: bool,
    scale: float | None = None,
) -> Tensor:
    """Dense masked definition of the op (O(N^2) memory), in float64; for tests only."""
    b, h, n, d = query.shape
    key, value = _repeat_kv(key, value, h)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = (t.double() for t in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, N)
    allowed = torch.zeros(h, n, n, dtype=torch.bool, device=query.device)
    for a, bt, heads in head_groups(window_alpha, window_beta, h):
        pattern = local_pattern(n, window_size(a, bt, n), sink, is_causal, query.device)
        allowed[heads] = pattern
    allowed = allowed.expand(b, h, n, n)
    mask = _mask4(attn_mask)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # fully masked rows give 0
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------- chunked PyTorch


def chunk_size(window: int) -> int:
    """Query chunk length C for window w.

    A chunk scores C * (C + w - 1) pairs of which about C * w are in its band (causal), so small
    chunks waste less: C = w / 8 wastes 1/8. CPU SDPA splits queries into blocks of 32 rows (of
    64 from 192 rows on), so below 32 rows each block's matmuls get thin and the per-block
    overhead wins. C ~ w / 8 within [16, 64] was the fastest at w = 256 on a 2-core CPU (8k
    tokens, 1 thread: C = 16 / 32 / 64 took 93 / 88 / 94 ms; benchmarks/bench_sparse_attention.py).
    """
    return int(min(64, max(16, 2 ** round(math.log2(max(window, 1) / 8)))))


def local_attention_chunked(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    sink: int,
    window_alpha: Sequence[float],
    window_beta: Sequence[float],
    is_causal: bool,
    scale: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """The op in plain PyTorch: work grows as N * (sink + chunk + window), not N^2.

    Query chunk c (rows [cC, cC + C)) needs only the sinks [0, s) and the span
    [cC - left, cC + C + right) of keys, with left = w - 1 and right = 0 (causal) or w - 1. For
    the body chunks (span after the sinks, inside the sequence) the spans are overlapping strided
    views of K and V, so nothing is copied; the chunks are folded into the batch dimension and
    run through one 4-D SDPA with a shared float additive band bias (the fast CPU form, feasibility
    study section 7):

        q rows [lo*C, hi*C) (H, R, D)     -> view (nb, H, C, D)
        k, v  (H, N, D)                    -> view (nb, H, C + left + right, D)   (overlapping)
        bias  (1 | nb, 1 | Hm, C, C + left + right): 0 (or the mask's value) in the band, -inf off
        SDPA (with log-sum-exp)            -> (nb, H, C, Dv), lse (nb, H, C)

    Every body row may see all s sinks (they lie before its band); one batched matmul scores the
    few sink keys, and `_merge_sinks` merges them with the band by log-sum-exp, which is softmax
    over the union (FlashAttention's rescaling, Dao et al. 2022). The SDPA that
    returns the log-sum-exp is ATen's `_scaled_dot_product_flash_attention_for_cpu` (the kernel
    behind CPU SDPA; private, so pinned torch versions matter). The first and last few chunks
    (span reaching before the sinks or past the end) and short sequences are computed exactly by
    masked SDPA over the keys they can see (a long prefix in up to 4 pieces, each over the keys
    up to its last row). `chunk` forces C.

    On devices other than CPU (the log-sum-exp kernel used here is CPU's), and when value's head
    dim differs from query's, every row takes the masked-SDPA route: exact, but O(N^2). CUDA uses
    the Triton kernel instead.
    """
    b, h, n, d = query.shape
    if key.shape[-2] != n or value.shape[-2] != n:
        raise TrimformerError(
            f"local_attention: query length {n} differs from key/value length "
            f"{key.shape[-2]}; the op covers self-attention over one sequence (no KV cache)"
        )
    key, value = _repeat_kv(key, value, h)
    mask = _mask4(attn_mask)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    groups = head_groups(window_alpha, window_beta, h)
    if len(groups) == 1:
        w = window_size(groups[0][0], groups[0][1], n)
        return _local_group(query, key, value, mask, w, sink, is_causal, scale, chunk).transpose(
            1, 2
        )
    out = query.new_empty(b, n, h, value.shape[-1])
    for a, bt, heads in groups:
        if heads == list(range(heads[0], heads[-1] + 1)):  # a run of heads: views, no copies
            sel: slice | Tensor = slice(heads[0], heads[-1] + 1)
            qg, kg, vg = (t[:, sel] for t in (query, key, value))
        else:
            sel = torch.tensor(heads, device=query.device)
            qg, kg, vg = (t.index_select(1, sel) for t in (query, key, value))
        mg = mask[:, sel] if (mask is not None and mask.shape[1] > 1) else mask
        w = window_size(a, bt, n)
        out[:, :, sel] = _local_group(qg, kg, vg, mg, w, sink, is_causal, scale, chunk)
    return out.transpose(1, 2)


def _local_group(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    w: int,
    sink: int,
    causal: bool,
    scale: float,
    chunk: int | None,
) -> Tensor:
    """Heads sharing window w; returns (B, N, H, Dv)."""
    b, h, n, _ = q.shape
    s = min(sink, n)
    left = w - 1
    right = 0 if causal else w - 1
    c = chunk if chunk is not None else chunk_size(w)
    # Body chunks [lo, hi): span starts at or after the sinks and ends inside the sequence.
    lo = -(-(s + left) // c)
    hi = (n - right) // c
    out = q.new_empty(b, n, h, v.shape[-1])
    # The strided route needs CPU's log-sum-exp SDPA kernel, which wants equal q/k/v head dims.
    if (q.device.type != "cpu") or (q.shape[-1] != v.shape[-1]) or (hi <= lo):
        lo = hi = n // c
    else:
        for bi in range(b):
            _body(q, k, v, mask, bi, lo, hi, c, w, s, causal, scale, out)
    # The rows before the body see a prefix of the keys: cut into up to 4 pieces, each seeing
    # the keys up to its own last row, a long prefix costs ~5/8 of the square instead of all.
    head = lo * c if hi > lo else n
    piece = max(256, -(-head // 4))
    for r0 in range(0, head, piece):
        _rows(q, k, v, mask, r0, min(head, r0 + piece), w, s, causal, scale, out)
    if hi > lo:
        _rows(q, k, v, mask, hi * c, n, w, s, causal, scale, out)
    return out


def _pairs(i: Tensor, j: Tensor, w: int, s: int, causal: bool) -> Tensor:
    """Bool: may query positions i see key positions j (broadcast), mask not included."""
    dist = j - i
    band = (dist > -w) & (dist <= (0 if causal else w - 1))
    sinks = j < s
    if causal:
        sinks = sinks & (dist <= 0)
    return band | sinks


@functools.lru_cache(maxsize=256)
def _edge_pattern(
    r0: int, r1: int, n: int, w: int, s: int, causal: bool, dtype: torch.dtype, device: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [r0, r1): the key columns they can see (sinks, then the span), the pattern over
    them as bool (R, K), and as a float bias (0 / -inf). Cached: the edges repeat every layer."""
    k0 = max(0, r0 - (w - 1))
    k1 = min(n, r1 + (0 if causal else w - 1))
    if k0 <= s:  # the sinks touch the span: keys [0, max(k1, s))
        cols = torch.arange(max(k1, s), device=device)
    else:
        cols = torch.cat([torch.arange(s, device=device), torch.arange(k0, k1, device=device)])
    rows = torch.arange(r0, r1, device=device).view(-1, 1)
    allowed = _pairs(rows, cols.view(1, -1), w, s, causal)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
    return cols, allowed, bias


def _rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    r0: int,
    r1: int,
    w: int,
    s: int,
    causal: bool,
    scale: float,
    out: Tensor,
) -> None:
    """Rows [r0, r1) exactly: one masked SDPA over the keys they can see; writes into `out`."""
    if r1 <= r0:
        return
    n = q.shape[-2]
    cols, allowed, bias = _edge_pattern(r0, r1, n, w, s, causal, q.dtype, str(q.device))
    k1 = int(cols[-1]) + 1
    if cols.numel() == k1:  # contiguous keys [0, k1)
        kk, vv = k[:, :, :k1], v[:, :, :k1]
    else:
        kk, vv = k.index_select(2, cols), v.index_select(2, cols)
    if mask is not None:
        g = mask if mask.shape[-2] == 1 else mask[:, :, r0:r1]
        if g.shape[-1] > 1:  # (bm, hm, R | 1, K)
            g = g[..., :k1] if cols.numel() == k1 else g.index_select(3, cols)
        if g.dtype == torch.bool:
            bias = torch.where(g & allowed, 0.0, -math.inf).to(q.dtype)
        else:
            bias = g.to(q.dtype).masked_fill(~allowed, -math.inf)
    res = F.scaled_dot_product_attention(q[:, :, r0:r1], kk, vv, attn_mask=bias, scale=scale)
    out[:, r0:r1] = res.transpose(1, 2)


@functools.lru_cache(maxsize=64)
def _band(c: int, left: int, right: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(C, C + left + right) band of a body chunk as bool, and as a float bias (0 / -inf)."""
    r = torch.arange(c).view(c, 1)
    col = torch.arange(c + left + right).view(1, -1)
    band = (col >= r) & (col <= r + left + right)
    bias = torch.zeros(band.shape, dtype=dtype).masked_fill_(~band, -math.inf)
    return band, bias


def _body(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bi: int,
    lo: int,
    hi: int,
    c: int,
    w: int,
    s: int,
    causal: bool,
    scale: float,
    out: Tensor,
) -> None:
    """Body chunks [lo, hi) of batch row `bi` on strided views; writes rows [lo*C, hi*C)."""
    _, h, n, _ = q.shape
    nb = hi - lo
    left = w - 1
    right = 0 if causal else w - 1
    span = c + left + right
    r0, r1 = lo * c, hi * c
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    # (H, R, D) -> (nb, H, C, D); K, V (H, N, D) -> overlapping spans (nb, H, span, D).
    qb = q[bi, :, r0:r1].unflatten(1, (nb, c)).transpose(0, 1)
    kw, vw = (
        t[bi].as_strided(
            (nb, h, span, t.shape[-1]),
            (c * t.stride(2), t.stride(1), t.stride(2), t.stride(3)),
            t[bi].storage_offset() + (r0 - left) * t.stride(2),
        )
        for t in (k, v)
    )
    # Rows [r0, r1) of out (B, N, H, Dv), seen as (nb, H, C, Dv).
    dest = out[bi, r0:r1].unflatten(0, (nb, c)).transpose(1, 2)
    band, band_bias = _band(c, left, right, q.dtype)
    if mask is None:
        ow, lw = flash(qb, kw, vw, attn_mask=band_bias.view(1, 1, c, span), scale=scale)
        if s == 0:
            dest.copy_(ow)
            return
        _merge_sinks(q[bi, :, r0:r1], k[bi, :, :s], v[bi, :, :s], None, scale, ow, lw, dest)
        return

    m = mask[bi if mask.shape[0] > 1 else 0].expand(mask.shape[1], n, n)
    g = m.as_strided(
        (nb, m.shape[0], c, span),
        (c * (m.stride(1) + m.stride(2)), m.stride(0), m.stride(1), m.stride(2)),
        m.storage_offset() + r0 * m.stride(1) + (r0 - left) * m.stride(2),
    )
    bias, seen = _mask_bias(g, band, q.dtype)
    ow, lw = flash(qb, kw, vw, attn_mask=bias, scale=scale)
    if s == 0:
        dest.copy_(ow)
        return
    # The kernel reports lse 0 for a row that saw nothing; make it -inf so it weighs nothing.
    lw = lw.masked_fill(~seen, -math.inf)
    _merge_sinks(q[bi, :, r0:r1], k[bi, :, :s], v[bi, :, :s], m[:, r0:r1, :s], scale, ow, lw, dest)


def _merge_sinks(
    q: Tensor,
    ks: Tensor,
    vs: Tensor,
    g: Tensor | None,
    scale: float,
    ow: Tensor,
    lw: Tensor,
    dest: Tensor,
) -> None:
    """Add the s sink keys to body rows that already attended their band.

    q (H, R, D) are the body rows, ks / vs (H, s, D) the sinks, g (Hm, R, s) the mask there or
    None; ow (nb, H, C, Dv) and lw (nb, H, C) the band's output and log-sum-exp (R = nb * C).
    With s a handful of keys, one batched matmul scores them (a flash call would cost a kernel
    launch per row block for 4 keys); the union's softmax is a log-sum-exp merge:

        out = lerp(out_sink, out_band, sigmoid(lse_band - lse_sink))

    (FlashAttention's rescaling, Dao et al. 2022). Writes `dest` (nb, H, C, Dv).
    """
    nb, h, c, _ = ow.shape
    scores = torch.matmul(q, ks.transpose(-1, -2)).mul_(scale)  # (H, R, s)
    if g is not None:
        if g.dtype == torch.bool:
            scores = scores.masked_fill(~g, -math.inf)
        else:
            scores = scores + g.to(scores.dtype)
    ls = torch.logsumexp(scores, dim=-1)  # (H, R); -inf where no sink is seen
    p = torch.exp(scores - ls.unsqueeze(-1)).nan_to_num_(0.0)
    os_ = torch.matmul(p, vs)  # (H, R, Dv)
    # (H, R, .) -> (nb, H, C, .), the layout of the band's results
    os_ = os_.unflatten(1, (nb, c)).transpose(0, 1)
    ls = ls.unflatten(1, (nb, c)).transpose(0, 1)
    share = torch.sigmoid(lw - ls).nan_to_num_(0.0)  # NaN: neither part saw anything -> 0
    torch.lerp(os_, ow, share.unsqueeze(-1).to(ow.dtype), out=dest)


def _mask_bias(g: Tensor, band: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Float bias from mask values g (bool keep-mask or additive) within `band`, and which rows
    see anything: (bias like g, seen (.., C) bool)."""
    if g.dtype == torch.bool:
        allowed = g if band is None else (g & band)
        bias = torch.where(allowed, 0.0, -math.inf).to(dtype)
    else:
        bias = g.to(dtype)
        if band is not None:
            bias = bias.masked_fill(~band, -math.inf)
        allowed = bias > -math.inf
    return bias, allowed.any(-1)


# ----------------------------------------------------------------------------- the op


def _check(query: Tensor, key: Tensor, value: Tensor, sink: int) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise TrimformerError(
            "local_attention: query, key and value must be (batch, heads, seq, head_dim); got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if sink < 0:
        raise TrimformerError(f"local_attention: sink must be >= 0, got {sink}")


@torch.library.custom_op("trimformer::local_attention", mutates_args=())
def local_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    sink: int,
    window_alpha: list[float],
    window_beta: list[float],
    is_causal: bool,
    scale: float | None = None,
) -> Tensor:
    """Sliding-window + sink attention; see the module docstring for the contract."""
    _check(query, key, value, sink)
    if query.device.type == "cuda":
        from trimformer.kernels import triton_available

        if triton_available():
            from trimformer.kernels.local_attention_triton import local_attention_triton

            return local_attention_triton(
                query, key, value, attn_mask, sink, window_alpha, window_beta, is_causal, scale
            )
    return local_attention_chunked(
        query, key, value, attn_mask, sink, window_alpha, window_beta, is_causal, scale
    )


@local_attention.register_fake
def _local_attention_fake(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    sink: int,
    window_alpha: list[float],
    window_beta: list[float],
    is_causal: bool,
    scale: float | None = None,
) -> Tensor:
    b, h, n, _ = query.shape
    return query.new_empty(b, n, h, value.shape[-1]).transpose(1, 2)


LOCAL_ATTENTION = torch.ops.trimformer.local_attention.default
