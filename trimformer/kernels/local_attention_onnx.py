"""ONNX form of `trimformer::local_attention`: the same block-local math in standard ONNX ops.

Contract: `local_attention_onnx(query, key, value, attn_mask, sink, window_alpha, window_beta,
is_causal, scale)` is the translation the dynamo ONNX exporter calls for each op node (it is
registered through `custom_translation_table`; `trimformer.export.onnx.export_onnx` passes
`trimformer.kernels.onnx_translation_table()`). It emits opset-18 ops that compute exactly what
the op defines (see `kernels.local_attention`) at any sequence length: the window
w(N) = clamp(floor(alpha + beta * N), 1, N) is computed in the graph from the run-time N.
Head counts and head dims must be static (they are in every captured transformer).

Per group of heads sharing (alpha, beta), with chunk length C (static) and
left = w - 1, right = 0 (causal) or w - 1, L = C + left + right, s = min(sink, N):

    cols  (nC, s + L)        = [0, s) ++ [cC - left, cC + C + right)   key positions per chunk
    K, V  (B, H, N, D)       -> Gather(cols, axis 2) -> (B, H, nC, s + L, D)
    Q     (B, H, N, D)       -> Pad to nC*C rows -> Reshape (B, H, nC, C, D)
    S = Q K^T (B, H, nC, C, s + L); S = where(pattern & mask, S (+ float mask), -inf)
    P = Softmax(S); O = P V (B, H, nC, C, Dv) -> Reshape (B, H, nC*C, Dv) -> first N rows

So the work is N * (s + L) scores per head, as in the PyTorch form, instead of N^2. The pattern
is built from Range/compare ops; a sink column inside the band is off (the span has it). With a
mask, rows that may see nothing are set to 0 (Softmax of an all -inf row is NaN in ORT). The
mask is read at the gathered positions only (a flat Gather), so it is never broadcast to N^2
here (the model may still build its own N x N mask upstream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from onnxscript import ir
from onnxscript import opset18 as op

from trimformer.errors import TrimformerError
from trimformer.kernels.local_attention import head_groups

# Query chunk length of the ONNX form; onnxruntime's batched MatMul is fastest near 64 on CPU
# (benchmarks/bench_sparse_attention.py).
ONNX_CHUNK = 64

_INT64 = ir.DataType.INT64


def _static(value: Any, axis: int, what: str) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise TrimformerError(
            f"local_attention ONNX export: the {what} (axis {axis} of {value.name}) must be "
            "static; only batch and sequence length may be dynamic"
        )
    return dim


def _i64(*values: int) -> Any:
    return op.Constant(value_ints=list(values))


def _scalar(v: int) -> Any:
    return op.Constant(value_int=v)


def _repeat_kv(x: Any, heads: int, kv_heads: int, dim: int) -> Any:
    """(B, Hk, N, D) -> (B, H, N, D), key/value head h // (H // Hk) for query head h."""
    rep = heads // kv_heads
    x = op.Expand(op.Unsqueeze(x, _i64(2)), _i64(1, 1, rep, 1, 1))  # (B, Hk, rep, N, D)
    return op.Reshape(x, _i64(0, heads, -1, dim))


def local_attention_onnx(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any,
    sink: int,
    window_alpha: Sequence[float],
    window_beta: Sequence[float],
    is_causal: bool,
    scale: float | None = None,
) -> Any:
    """Translation of `trimformer::local_attention` (see the module docstring)."""
    h = _static(query, 1, "number of query heads")
    d = _static(query, 3, "query head dim")
    hk = _static(key, 1, "number of key/value heads")
    dv = _static(value, 3, "value head dim")
    if h % hk != 0:
        raise TrimformerError(
            f"local_attention ONNX export: {h} query heads cannot share {hk} key/value heads"
        )
    if hk != h:
        key = _repeat_kv(key, h, hk, d)
        value = _repeat_kv(value, h, hk, dv)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = op.Mul(query, op.CastLike(op.Constant(value_float=scale), query))
    n = op.Gather(op.Shape(query), _scalar(2))  # scalar int64

    mask = attn_mask
    if mask is not None:
        rank = len(mask.shape)
        if rank < 4:
            mask = op.Unsqueeze(mask, _i64(*range(4 - rank)))
        dims = list(mask.shape) if rank == 4 else [1] * (4 - rank) + list(mask.shape)
        mask_heads = dims[1] if isinstance(dims[1], int) else h
        per_key = dims[2] == 1  # (.., 1, N): the same keys masked for every query
        per_query = dims[3] == 1  # (.., N, 1)
        is_bool = mask.dtype == ir.DataType.BOOL
        # (Bm, Hm, Qm, Km) -> (Bm, Hm, Qm * Km): read at the gathered positions with one Gather.
        mask = op.Reshape(mask, _i64(0, 0, -1))

    groups = head_groups(window_alpha, window_beta, h)
    outs = []
    order: list[int] = []
    for alpha, beta, heads in groups:
        if len(groups) == 1:
            qg, kg, vg, mg = q, key, value, mask
        else:
            idx = _i64(*heads)
            qg, kg, vg = (op.Gather(t, idx, axis=1) for t in (q, key, value))
            mg = mask
            if (mask is not None) and (mask_heads > 1):
                mg = op.Gather(mask, idx, axis=1)
        spec = None if mask is None else (per_key, per_query, is_bool)
        outs.append(_group(qg, kg, vg, mg, spec, n, alpha, beta, sink, is_causal, d, dv))
        order.extend(heads)
    if len(outs) == 1:
        return outs[0]
    out = op.Concat(*outs, axis=1)
    if order == list(range(h)):
        return out
    inverse = [order.index(i) for i in range(h)]
    return op.Gather(out, _i64(*inverse), axis=1)


def _group(
    q: Any,
    k: Any,
    v: Any,
    mask: Any,
    spec: tuple[bool, bool, bool] | None,
    n: Any,
    alpha: float,
    beta: float,
    sink: int,
    causal: bool,
    d: int,
    dv: int,
) -> Any:
    """Heads sharing (alpha, beta): (B, Hg, N, D) -> (B, Hg, N, Dv)."""
    c = ONNX_CHUNK
    zero, one = _scalar(0), _scalar(1)
    nf = op.Cast(n, to=ir.DataType.FLOAT)
    w = op.Cast(
        op.Floor(
            op.Add(
                op.Mul(nf, op.Constant(value_float=float(beta))),
                op.Constant(value_float=float(alpha)),
            )
        ),
        to=_INT64,
    )
    w = op.Max(op.Min(w, n), one)  # w(N) = clamp(floor(alpha + beta N), 1, N)
    left = op.Sub(w, one)
    right = zero if causal else left
    s = op.Min(_scalar(sink), n)
    nc = op.Div(op.Add(n, _scalar(c - 1)), _scalar(c))
    span = op.Add(op.Add(_scalar(c), left), right)
    width = op.Add(s, span)

    # Positions: rows i (nC, C, 1); columns j (nC, 1, s + L), sinks first.
    chunk0 = op.Mul(op.Range(zero, nc, one), _scalar(c))  # (nC,) first row of each chunk
    rows = op.Add(
        op.Unsqueeze(chunk0, _i64(1, 2)), op.Reshape(op.Range(zero, _scalar(c), one), _i64(1, c, 1))
    )
    window_cols = op.Add(
        op.Unsqueeze(op.Sub(chunk0, left), _i64(1)),
        op.Unsqueeze(op.Range(zero, span, one), _i64(0)),
    )
    sink_cols = op.Expand(
        op.Unsqueeze(op.Range(zero, s, one), _i64(0)),
        op.Concat(op.Unsqueeze(nc, _i64(0)), op.Unsqueeze(s, _i64(0)), axis=0),
    )
    cols2 = op.Concat(sink_cols, window_cols, axis=1)  # (nC, s + L)
    cols = op.Unsqueeze(cols2, _i64(1))  # (nC, 1, s + L)
    dist = op.Sub(cols, rows)  # (nC, C, s + L)
    band = op.And(op.GreaterOrEqual(dist, op.Neg(left)), op.LessOrEqual(dist, right))
    is_sink = op.Less(op.Range(zero, width, one), s)  # (s + L,)
    sink_ok = op.And(is_sink, op.Not(band))
    if causal:
        sink_ok = op.And(sink_ok, op.LessOrEqual(dist, zero))
    in_seq = op.And(op.GreaterOrEqual(cols, zero), op.Less(cols, n))
    allowed = op.And(op.Or(op.And(op.Not(is_sink), band), sink_ok), in_seq)

    # Gather each chunk's keys: (B, Hg, N, D) -> (B, Hg, nC, s + L, D).
    last = op.Sub(n, one)
    idx = op.Min(op.Max(cols2, zero), last)
    kc = op.Gather(k, idx, axis=2)
    vc = op.Gather(v, idx, axis=2)
    # Queries: (B, Hg, N, D) -> pad to nC*C rows -> (B, Hg, nC, C, D).
    pad_rows = op.Sub(op.Mul(nc, _scalar(c)), n)
    pads = op.Concat(_i64(0, 0, 0, 0, 0, 0), op.Unsqueeze(pad_rows, _i64(0)), _i64(0), axis=0)
    qc = op.Reshape(op.Pad(q, pads), _i64(0, 0, -1, c, d))
    scores = op.MatMul(qc, op.Transpose(kc, perm=[0, 1, 2, 4, 3]))  # (B, Hg, nC, C, s + L)

    if spec is not None:
        per_key, per_query, is_bool = spec
        rows_in = op.Min(rows, last)
        cols_in = op.Min(op.Max(cols, zero), last)
        if per_key and per_query:
            flat = op.Mul(op.Add(rows_in, cols_in), zero)
        elif per_key:
            flat = cols_in  # (nC, 1, s + L)
        elif per_query:
            flat = rows_in  # (nC, C, 1)
        else:
            flat = op.Add(op.Mul(rows_in, n), cols_in)  # (nC, C, s + L)
        g = op.Gather(mask, flat, axis=2)  # (Bm, Hm, nC, C | 1, s + L | 1)
        if is_bool:
            allowed = op.And(allowed, g)
        else:
            scores = op.Add(scores, op.CastLike(g, scores))
            allowed = op.And(allowed, op.Not(op.IsInf(g, detect_positive=0)))
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), scores)
    probs = op.Softmax(op.Where(allowed, scores, neg_inf), axis=-1)
    out = op.MatMul(probs, vc)  # (B, Hg, nC, C, Dv)
    if spec is not None:
        # Rows that may see nothing: Softmax gave NaN; the op's contract says 0.
        seen = op.Cast(
            op.ReduceMax(op.Cast(allowed, to=ir.DataType.UINT8), _i64(-1), keepdims=1),
            to=ir.DataType.BOOL,
        )
        out = op.Where(seen, out, op.CastLike(op.Constant(value_float=0.0), out))
    out = op.Reshape(out, _i64(0, 0, -1, dv))  # (B, Hg, nC*C, Dv)
    return op.Slice(out, _i64(0), op.Unsqueeze(n, _i64(0)), _i64(2))
