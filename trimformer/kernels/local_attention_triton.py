"""Triton kernel for `trimformer::local_attention` (CUDA; CPU only through TRITON_INTERPRET=1).

Contract: `local_attention_triton(query, key, value, attn_mask, sink, window_alpha, window_beta,
is_causal, scale)` computes exactly what `kernels.local_attention` defines (same arguments, same
pattern, fully masked rows give 0) and returns (B, H, N, Dv) in the op's layout. Importing this
module imports triton; the op imports it only for CUDA tensors.

FlashAttention-2-style forward (Dao, "FlashAttention-2", 2023; the Triton tutorial
`06-fused-attention.py`): grid (cdiv(N, BLOCK_M), B * H); a program owns BLOCK_M queries of one
head and visits only the key blocks the pattern can reach,

    sink blocks    [0, cdiv(sink, BLOCK_N))
    window blocks  [max(lo // BLOCK_N, sink blocks), cdiv(hi, BLOCK_N))
                   lo = m0 - (w - 1),  hi = m0 + BLOCK_M (+ w - 1 when bidirectional)

so the work per query is O(sink + w + BLOCK), not O(N) (MoA's block-sparse prefill visits the
same two ranges, Fu et al. 2024). Each block visited applies the element-level pattern and mask,
so a block in both ranges is visited once. Online softmax in base 2 with a running max m, sum l
and fp32 accumulator; a row that has seen nothing yet keeps m = -inf, and the rescaling uses
m_safe = where(m == -inf, 0, m) so exp2(-inf - m_safe) = 0 instead of NaN; the epilogue divides
by where(l == 0, 1, l), giving 0 for fully masked rows.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernel runs on CPU tensors through
numpy: there the inputs are cast to fp32 before `tl.dot` (the interpreter has no bf16 dot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from trimformer.errors import TrimformerError
from trimformer.kernels.local_attention import _mask4, head_groups, window_size

_LOG2E = 1.4426950408889634

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _local_attention_fwd(
    Q,
    K,
    V,
    M,
    Out,
    WIN,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    smb,
    smh,
    smm,
    smn,
    sob,
    soh,
    som,
    H,
    KV_GROUP,
    N,
    SINK,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // KV_GROUP
    w = tl.load(WIN + h)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    right = 0
    if not CAUSAL:
        right = w - 1
    sink_blocks = tl.cdiv(SINK, BLOCK_N)
    lo = tl.maximum(m0 - (w - 1), 0)
    hi = tl.minimum(m0 + BLOCK_M + right, N)
    first_window = tl.maximum(lo // BLOCK_N, sink_blocks)
    last_window = tl.cdiv(hi, BLOCK_N)

    for phase in tl.static_range(2):
        if phase == 0:
            start = 0
            stop = sink_blocks
        else:
            start = first_window
            stop = last_window
        for kb in range(start, stop):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k_ptrs = K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :]
            k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits

            dist = offs_n[None, :] - offs_m[:, None]
            allowed = (dist > -w) & (dist <= right)
            sinks = offs_n[None, :] < SINK
            if CAUSAL:
                sinks = sinks & (dist <= 0)
            allowed = (allowed | sinks) & col_ok[None, :] & row_ok[:, None]
            if MASK_KIND != 0:
                m_ptrs = M + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn
                mv = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
                if MASK_KIND == 1:
                    allowed = allowed & (mv != 0)
                else:
                    s = s + mv.to(tl.float32) * 1.4426950408889634
            s = tl.where(allowed, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)

            v_ptrs = V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :]
            v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
    tl.store(
        o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    )


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def local_attention_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    sink: int,
    window_alpha: Sequence[float],
    window_beta: Sequence[float],
    is_causal: bool,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> Tensor:
    """Launch the kernel; same contract as the op. Blocks of 16+ rows (tl.dot's minimum)."""
    b, h, n, d = query.shape
    hk = key.shape[1]
    dv = value.shape[-1]
    if key.shape[-2] != n or h % hk != 0:
        raise TrimformerError(
            f"local_attention (triton): query {tuple(query.shape)} and key {tuple(key.shape)} "
            "need the same length and a head count that is a multiple of key's"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    windows = [0] * h
    for a, bt, heads in head_groups(window_alpha, window_beta, h):
        for i in heads:
            windows[i] = window_size(a, bt, n)
    win = torch.tensor(windows, dtype=torch.int32, device=query.device)

    q = query if query.stride(-1) == 1 else query.contiguous()
    k = key if key.stride(-1) == 1 else key.contiguous()
    v = value if value.stride(-1) == 1 else value.contiguous()
    out = torch.empty(b, n, h, dv, dtype=query.dtype, device=query.device).transpose(1, 2)

    mask = _mask4(attn_mask)
    if mask is None:
        kind, m, mstrides = MASK_NONE, q, (0, 0, 0, 0)
    else:
        m = mask.expand(b, h, n, n)
        if m.dtype == torch.bool:
            kind, m = MASK_BOOL, m.view(torch.uint8)
        else:
            kind = MASK_FLOAT
        mstrides = tuple(m.stride())

    grid = (triton.cdiv(n, block_m), b * h)
    _local_attention_fwd[grid](
        q,
        k,
        v,
        m,
        out,
        win,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *mstrides,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        h // hk,
        n,
        min(sink, n),
        scale * _LOG2E,
        HEAD_DIM=d,
        HEAD_DIM_V=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=is_causal,
        MASK_KIND=kind,
        UPCAST=_interpreting() or query.dtype == torch.float32,
    )
    return out
