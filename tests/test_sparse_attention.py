"""Sparse-attention substitution: the local_attention op (PyTorch, Triton, ONNX) and the pass.

The op is checked against a dense masked definition; the pass against the same local pattern
applied by hand to the eager Hugging Face model (its SDPA attention function swapped for the
dense reference), on tiny seeded random-weight Llama (causal, GQA) and BERT (bidirectional).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.export import Dim

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import HEADS, VOCAB, tiny_text_model  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from trimformer.errors import PassError  # noqa: E402
from trimformer.export.onnx import export_onnx, verify_onnx  # noqa: E402
from trimformer.graph import ops  # noqa: E402
from trimformer.graph.capture import Loaded, capture  # noqa: E402
from trimformer.graph.rewrite import is_op  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.kernels import (  # noqa: E402
    LOCAL_ATTENTION,
    local_attention_chunked,
    local_attention_reference,
    onnx_translation_table,
    triton_available,
)
from trimformer.kernels.local_attention import local_pattern, pattern_pairs  # noqa: E402
from trimformer.passes import PASSES  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.sparse_attention import (  # noqa: E402
    SparseAttentionConfig,
    _kept_mass,
    _loss_change,
    _next_token_loss,
    choose,
    plan,
    score,
    sparsify_attention,
)

TOL = 1e-5
LAYERS, MAX_POS = 2, 128

# ----------------------------------------------------------------------------- the op


def _qkv(b: int, h: int, hk: int, n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, x, n, d, generator=g) for x in (h, hk, hk))


def _mask(kind: str | None, b: int, h: int, n: int, seed: int = 0) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":  # a full (B, 1, N, N) keep-mask with a fully masked row
        m = torch.rand(b, 1, n, n, generator=g) > 0.3
        m[0, 0, 5] = False
        return m
    if kind == "float":  # additive, per head, with -inf columns
        m = torch.randn(b, h, n, n, generator=g)
        m[..., 1:3] = float("-inf")
        return m
    if kind == "padding":  # (B, 1, 1, N) key padding: the last row's final third
        m = torch.ones(b, 1, 1, n, dtype=torch.bool)
        m[-1, ..., n - n // 3 :] = False
        return m
    raise ValueError(kind)


CASES = list(
    itertools.product(
        [True, False],  # causal
        [0, 3],  # sink
        [(1.0, 0.0), (6.0, 0.0), (2.0, 0.25)],  # uniform (alpha, beta)
        [None, "bool", "float", "padding"],
    )
)


@pytest.mark.parametrize(("causal", "sink", "window", "mask"), CASES)
def test_op_matches_dense_reference(causal, sink, window, mask) -> None:
    q, k, v = _qkv(2, 4, 2, 70)
    m = _mask(mask, 2, 4, 70)
    want = local_attention_reference(q, k, v, m, sink, [window[0]], [window[1]], causal)
    for chunk in (None, 2, 4, 16):  # the heuristic, and forced chunks (body + edge routes)
        got = local_attention_chunked(
            q, k, v, m, sink, [window[0]], [window[1]], causal, None, chunk
        )
        assert (got - want).abs().max() <= TOL, chunk


@pytest.mark.parametrize("causal", [True, False])
def test_op_long_prefix_in_pieces_matches_reference(causal: bool) -> None:
    # w = 400 of N = 600: the rows before the body are computed in pieces of 256
    q, k, v = _qkv(1, 2, 2, 600)
    m = _mask("bool", 1, 2, 600)
    for alpha in (400.0, 600.0):
        want = local_attention_reference(q, k, v, m, 3, [alpha], [0.0], causal)
        got = LOCAL_ATTENTION(q, k, v, m, 3, [alpha], [0.0], causal, None)
        assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("causal", [True, False])
def test_op_per_head_windows_match_reference(causal: bool) -> None:
    q, k, v = _qkv(2, 4, 4, 90)
    m = _mask("bool", 2, 4, 90)
    alpha, beta = [1.0, 8.0, 1.0, 0.0], [0.0, 0.1, 0.0, 0.5]  # heads 0 and 2 share a window
    want = local_attention_reference(q, k, v, m, 2, alpha, beta, causal, 0.3)
    got = LOCAL_ATTENTION(q, k, v, m, 2, alpha, beta, causal, 0.3)
    assert (got - want).abs().max() <= TOL
    assert got.shape == (2, 4, 90, 16)


@pytest.mark.parametrize("causal", [True, False])
def test_op_full_window_equals_dense_sdpa(causal: bool) -> None:
    q, k, v = _qkv(2, 4, 4, 64)
    m = _mask("padding", 2, 4, 64)
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=m & torch.ones(64, 64, dtype=torch.bool).tril() if causal else m
    )
    for alpha, beta in ((0.0, 1.0), (1000.0, 0.0)):
        got = local_attention_chunked(q, k, v, m, 4, [alpha], [beta], causal, None, 8)
        assert (got - dense).abs().max() <= TOL


def test_op_fully_masked_rows_give_zero() -> None:
    q, k, v = _qkv(1, 2, 2, 40)
    m = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    m[..., 30, :] = False
    got = LOCAL_ATTENTION(q, k, v, m, 2, [4.0], [0.0], True, None)
    assert torch.isfinite(got).all()
    assert got[..., 30, :].abs().max() == 0


def test_pattern_pairs_counts_the_pattern() -> None:
    for n, w, s, causal in itertools.product([1, 9, 40], [1, 5, 40], [0, 3], [True, False]):
        want = int(local_pattern(n, min(w, n), s, causal).sum())
        assert pattern_pairs(n, min(w, n), s, causal) == want


# ----------------------------------------------------------------------------- Triton (interpreter)


TRITON_CHECK = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from trimformer.kernels.local_attention_triton import local_attention_triton
    from trimformer.kernels import local_attention_chunked
    g = torch.Generator().manual_seed(0)
    cases = [  # n, causal, sink, alpha, beta, mask, kv heads
        (40, True, 3, [5.0], [0.0], None, 2),
        (50, False, 2, [1.0, 8.0, 3.0, 0.0], [0.0, 0.1, 0.0, 0.5], "bool", 4),
        (33, True, 0, [2.0], [0.2], "float", 4),
    ]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        for n, causal, sink, al, be, kind, hk in cases:
            q = torch.randn(2, 4, n, 16, generator=g).to(dtype)
            k, v = (torch.randn(2, hk, n, 16, generator=g).to(dtype) for _ in range(2))
            m = None
            if kind == "bool":
                m = torch.rand(2, 1, n, n, generator=g) > 0.3
                m[0, 0, 7] = False
            elif kind == "float":
                m = torch.randn(2, 4, n, n, generator=g)
                m[..., :2] = float("-inf")
            got = local_attention_triton(q, k, v, m, sink, al, be, causal, None, 16, 16)
            want = local_attention_chunked(q.float(), k.float(), v.float(), m, sink, al, be, causal)
            err = (got.float() - want).abs().max().item()
            assert err <= tol, (dtype, n, causal, kind, err)
    print("ok")
    """
)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (extra: triton)")
def test_triton_kernel_matches_pytorch_in_interpreter() -> None:
    # A fresh interpreter: TRITON_INTERPRET must be set before triton is first imported.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- ONNX (op level)


class _OpModule(torch.nn.Module):
    def __init__(self, sink: int, alpha: list[float], beta: list[float], causal: bool) -> None:
        super().__init__()
        self.args = (sink, alpha, beta, causal)

    def forward(self, q, k, v, mask):
        return LOCAL_ATTENTION(q, k, v, mask, *self.args, None)


@pytest.mark.parametrize(
    ("causal", "mask", "alpha", "beta"),
    [(True, "bool", [8.0, 1.0, 30.0, 1.0], [0.0, 0.0, 0.25, 0.0]), (False, "float", [10.0], [0.1])],
)
def test_onnx_form_matches_pytorch_in_onnxruntime(tmp_path, causal, mask, alpha, beta) -> None:
    import onnxruntime

    mod = _OpModule(3, alpha, beta, causal)
    q, k, v = _qkv(2, 4, 2, 80)
    n = Dim("n", min=2, max=4096)
    inputs = (q, k, v, _mask(mask, 2, 4, 80))
    shapes = ({2: n}, {2: n}, {2: n}, {2: n, 3: n})
    with contextlib.redirect_stdout(None):
        torch.onnx.export(
            mod,
            inputs,
            tmp_path / "op.onnx",
            dynamo=True,
            dynamic_shapes=shapes,
            custom_translation_table=onnx_translation_table(),
        )
    session = onnxruntime.InferenceSession(str(tmp_path / "op.onnx"))
    names = [i.name for i in session.get_inputs()]
    for length in (7, 64, 150):  # shorter than a chunk, one chunk, several
        args = (*_qkv(2, 4, 2, length, seed=length), _mask(mask, 2, 4, length, seed=length))
        got = session.run(None, {a: t.numpy() for a, t in zip(names, args, strict=True)})[0]
        want = mod(*args).numpy()
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= TOL, length


# ----------------------------------------------------------------------------- models


@dataclass
class Tiny:
    name: str
    loaded: Loaded
    gm: fx.GraphModule
    causal: bool
    inputs: dict[str, torch.Tensor]
    check: dict[str, torch.Tensor]  # longer than a chunk, last row padded

    def fresh(self) -> fx.GraphModule:
        return copy.deepcopy(self.gm)

    def ctx(self) -> Context:
        return Context(kind=self.loaded.kind, batches=[self.check])

    def real(self) -> torch.Tensor:
        return self.check["attention_mask"].bool()


def _ids(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 3 :] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _tiny(name: str) -> Tiny:
    loaded = tiny_text_model(name, layers=LAYERS, max_pos=MAX_POS)
    causal = name == "llama"
    inputs = _ids(2, 8, seed=0)
    return Tiny(name, loaded, capture(loaded, inputs), causal, inputs, _ids(3, 70, seed=1))


@pytest.fixture(scope="module")
def llama() -> Tiny:
    return _tiny("llama")


@pytest.fixture(scope="module")
def bert() -> Tiny:
    return _tiny("bert")


@pytest.fixture
def tiny(request: pytest.FixtureRequest) -> Tiny:
    return request.getfixturevalue(request.param)


@contextlib.contextmanager
def hand_local_attention(
    sink: int, alpha: list[float], beta: list[float], causal: bool
) -> Iterator:
    """The eager model with its SDPA attention replaced by the dense local-attention reference."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        out = local_attention_reference(
            query, key, value, attention_mask, sink, alpha, beta, causal, scaling
        )
        return out.transpose(1, 2).contiguous(), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"]


def _run(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return gm(**inputs)


def _sparsified(t: Tiny, **config) -> tuple[fx.GraphModule, dict]:
    gm = t.fresh()
    changes = sparsify_attention(gm, discover(gm), SparseAttentionConfig(**config), t.ctx())
    return gm, changes


BOTH = ["llama", "bert"]


@pytest.mark.parametrize("tiny", BOTH, indirect=True)
def test_full_window_equals_original_model(tiny: Tiny) -> None:
    gm, _ = _sparsified(tiny, sink=4, alpha=0.0, beta=1.0)
    want = _run(tiny.gm, tiny.check)
    got = _run(gm, tiny.check)
    assert (got - want)[tiny.real()].abs().max() <= TOL


@pytest.mark.parametrize("tiny", BOTH, indirect=True)
def test_pass_matches_local_attention_done_by_hand(tiny: Tiny) -> None:
    alpha, beta = [3.0, 12.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.125]
    pairs = list(zip(alpha, beta, strict=True))
    gm, _ = _sparsified(tiny, sink=2, heads={0: pairs, 1: pairs})
    with hand_local_attention(2, alpha, beta, tiny.causal), torch.no_grad():
        want = tiny.loaded.module(**tiny.check)
    got = _run(gm, tiny.check)
    # The edit must matter, or the comparison proves nothing.
    assert (_run(tiny.gm, tiny.check) - want)[tiny.real()].abs().max() > 1e-3
    assert (got - want)[tiny.real()].abs().max() <= TOL


@pytest.mark.parametrize("tiny", BOTH, indirect=True)
def test_pass_rewrites_every_core_and_structure_is_found(tiny: Tiny) -> None:
    gm, changes = _sparsified(tiny, sink=4, alpha=8.0, beta=0.0)
    nodes = list(gm.graph.nodes)
    assert sum(is_op(n, ops.SDPA) for n in nodes) == 0
    assert sum(is_op(n, ops.LOCAL_ATTENTION) for n in nodes) == LAYERS
    assert changes["attention_rewritten"] == LAYERS and not changes["skipped"]
    assert all(r["causal"] == tiny.causal for r in changes["rewritten"])
    found = discover(gm)
    assert len(found.blocks) == LAYERS and not found.unmatched
    assert all(b.attention.site.form == "local" for b in found.blocks)
    # Re-running the pass on its own output re-configures the local cores.
    again = sparsify_attention(gm, found, SparseAttentionConfig(alpha=0, beta=1.0), tiny.ctx())
    assert again["attention_rewritten"] == LAYERS
    assert (_run(gm, tiny.check) - _run(tiny.gm, tiny.check))[tiny.real()].abs().max() <= TOL


def test_pass_only_touches_the_blocks_asked(llama: Tiny) -> None:
    gm, changes = _sparsified(llama, blocks=[1])
    assert [r["block"] for r in changes["rewritten"]] == [1]
    assert sum(is_op(n, ops.SDPA) for n in gm.graph.nodes) == 1


def test_pass_rejects_a_wrong_number_of_head_windows(llama: Tiny) -> None:
    with pytest.raises(PassError, match="one pair per head"):
        _sparsified(llama, heads={0: [(4.0, 0.0)] * (HEADS - 1)})
    with pytest.raises(PassError, match="is not in the graph"):
        _sparsified(llama, blocks=[LAYERS])


def test_pass_after_a_removed_block_keeps_the_captured_block_indices(llama: Tiny) -> None:
    # drop-blocks / skip leave the captured model's block numbers; windows are keyed by them
    gm, ctx = llama.fresh(), llama.ctx()
    PASSES["drop"].apply(gm, discover(gm), PASSES["drop"].config(blocks=[0]), ctx)
    structure = discover(gm)
    assert [b.index for b in structure.blocks] == [1]
    changes = sparsify_attention(
        gm, structure, SparseAttentionConfig(sink=2, heads={1: [(4.0, 0.0)] * HEADS}), ctx
    )
    assert [r["block"] for r in changes["rewritten"]] == [1]
    with pytest.raises(PassError, match="is not in the graph"):
        sparsify_attention(gm, structure, SparseAttentionConfig(blocks=[0]), ctx)


def test_rewritten_graph_exports_to_onnx_and_matches(llama: Tiny, tmp_path) -> None:
    gm, _ = _sparsified(
        llama, sink=2, heads={0: [(5.0, 0.0)] * HEADS, 1: [(3.0, 0.0), (9.0, 0.0)] * 2}
    )
    seq, batch = Dim("seq", min=2, max=MAX_POS), Dim("batch", min=1, max=64)
    shapes = {k: {0: batch, 1: seq} for k in llama.inputs}
    export_onnx(gm, llama.inputs, shapes, tmp_path / "model.onnx")
    check = verify_onnx(tmp_path / "model.onnx", gm, [llama.check, _ids(1, 33, seed=3)])
    assert check.max_abs_diff <= 1e-4


# ----------------------------------------------------------------------------- calibration


def test_kept_mass_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for causal in (True, False):
        n = 30
        scores = torch.randn(2, 3, n, n, generator=g)
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
        p = torch.softmax(scores, -1)
        rows = torch.ones(2, n)
        rows[1, 20:] = 0
        windows = [1, 4, 17, 30]
        got = _kept_mass(p, rows, windows, 3, causal)
        for c, w in enumerate(windows):
            pat = local_pattern(n, w, 3, causal)
            want = (p * pat * rows.view(2, 1, n, 1)).sum(dim=(0, 2, 3))
            assert torch.allclose(got[:, c].float(), want, atol=1e-5)


def test_loss_change_equals_brute_force_first_order_sum() -> None:
    g = torch.Generator().manual_seed(1)
    for causal, around in ((True, None), (True, 6), (False, None), (False, 6)):
        n, sink = 24, 2
        scores = torch.randn(2, 3, n, n, generator=g)
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
        p = torch.softmax(scores, -1)
        grad = torch.randn(2, 3, n, n, generator=g)
        rows = torch.ones(2, n)
        rows[0, 18:] = 0
        windows = [1, 3, 6, 24]

        def restricted(p: torch.Tensor, w: int, causal: bool) -> torch.Tensor:
            kept = p * local_pattern(24, w, 2, causal)  # A on the pattern, renormalized per row
            return kept / kept.sum(-1, keepdim=True)

        base = p if around is None else restricted(p, around, causal)
        got = _loss_change(p, grad, rows, windows, sink, causal, around)
        for c, w in enumerate(windows):
            want = (grad * (restricted(p, w, causal) - base)).sum(-1)  # (B, H, N)
            want = (want * rows.view(2, 1, n)).sum(dim=(0, 2))
            assert torch.allclose(got[:, c].float(), want, atol=1e-5), (causal, around, w)
        if around is not None:
            assert got[:, windows.index(around)].abs().max() < 1e-9


def test_loss_score_of_the_whole_window_is_zero_and_of_a_tiny_one_is_not(llama: Tiny) -> None:
    scores = score(
        llama.gm,
        discover(llama.gm),
        llama.ctx(),
        sink=2,
        lengths=[70],
        candidates=[(0.0, 1.0), (4.0, 0.0)],
        min_window=4,
    )
    assert scores["objective"] == "loss"  # "auto" on a causal LM
    loss = np.asarray([scores["loss"][b] for b in scores["blocks"]])  # (blocks, H, L, C)
    assert np.abs(loss[..., 0]).max() < 1e-9  # the full window changes nothing
    assert np.abs(loss[..., 1]).max() > 1e-6


def test_first_order_loss_estimate_matches_the_real_change_for_a_small_cut(llama: Tiny) -> None:
    # Window 60 of 70 tokens: only the last rows lose keys, so first order should be close.
    ctx = llama.ctx()
    scores = score(
        llama.gm, discover(llama.gm), ctx, sink=2, lengths=[70], candidates=[(60.0, 0.0)]
    )
    estimate = sum(float(np.sum(scores["loss"][b])) for b in scores["blocks"])
    gm, _ = _sparsified(llama, sink=2, alpha=60.0, beta=0.0)
    with torch.no_grad():
        before = _next_token_loss(llama.gm(**llama.check), llama.check)
        after = _next_token_loss(gm(**llama.check), llama.check)
    actual = float(after - before)
    assert abs(actual) > 1e-5
    assert abs(estimate - actual) <= 0.1 * abs(actual)


def test_milp_plan_beats_uniform_window_at_equal_density(llama: Tiny) -> None:
    config, report = plan(
        llama.gm,
        discover(llama.gm),
        llama.ctx(),
        density=0.5,
        sink=2,
        lengths=[35, 70],
        min_window=4,
    )
    assert report["uniform"] is not None
    assert report["plan"]["cost"] < report["uniform"]["cost"]
    assert all(0.9 * 0.5 - 1e-9 <= d <= 0.5 + 1e-9 for d in report["plan"]["density"])
    assert all(len(config.heads[b]) == HEADS for b in range(LAYERS))
    for pairs in config.heads.values():  # at most 2 distinct windows per layer (MoA's limit)
        assert len(set(pairs)) <= 2
    # the plan is a config the pass applies
    gm = llama.fresh()
    changes = sparsify_attention(gm, discover(gm), config, llama.ctx())
    assert changes["attention_rewritten"] == LAYERS


def _four_batches(t: Tiny) -> Context:
    return Context(kind=t.loaded.kind, batches=[_ids(2, 70, seed=10 + s) for s in range(4)])


def test_choose_keeps_the_plan_with_the_least_measured_validation_loss(llama: Tiny) -> None:
    ctx = _four_batches(llama)
    config, report = choose(
        llama.gm, discover(llama.gm), ctx, density=0.5, sink=2, lengths=[35, 70], min_window=4
    )
    plans = report["plans"]
    assert report["profile_batches"] == 3 and report["validation_batches"] == 1
    assert plans[0]["label"].startswith("uniform")  # the baseline is always validated
    assert any(p["label"].startswith("per-head") for p in plans)
    assert any(p["label"].startswith("per-layer") for p in plans)
    best = min(plans, key=lambda p: p["validation_loss"])
    assert report["chosen"] == best["label"]
    assert SparseAttentionConfig.model_validate(best["config"]) == config
    # equal density: every plan spends within [0.97, 1] x the uniform window's density
    uniform = report["uniform"]["density"]
    for p in plans:
        assert all(
            0.97 * u - 1e-9 <= d <= u + 1e-9 for d, u in zip(p["density"], uniform, strict=True)
        )
    # the validation value is the measured KL(dense || plan) of the next-token distributions on
    # the held-back batch, over positions whose next token is real: recomputed here for the
    # chosen plan and for the uniform window
    held = ctx.batches[-1]
    real = held["attention_mask"].bool()
    valid = real[:, :-1] & real[:, 1:]

    def log_probs(g: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = g(**held)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return torch.log_softmax(out.double(), -1)

    log_dense = log_probs(llama.gm)
    for p in (best, plans[0]):
        gm = llama.fresh()
        sparsify_attention(gm, discover(gm), SparseAttentionConfig.model_validate(p["config"]), ctx)
        kl = (log_dense.exp() * (log_dense - log_probs(gm))).sum(-1)[:, :-1][valid].mean()
        assert float(kl) == pytest.approx(p["validation_loss"], rel=1e-6)
        assert p["validation_loss"] > 0.0  # a window shorter than the sequence changes outputs
    # distinct plans only, told apart by what every head computes
    assert len({json.dumps(p["config"], sort_keys=True) for p in plans}) == len(plans)


def test_choose_for_an_encoder_and_the_uniform_and_bad_budgets(bert: Tiny) -> None:
    ctx = _four_batches(bert)
    structure = discover(bert.gm)
    common = dict(sink=2, lengths=[35, 70], min_window=4)
    config, report = choose(bert.gm, structure, ctx, density=0.5, **common)
    assert all(p["validation_loss"] >= 0.0 for p in report["plans"])  # 1 - cosine with dense
    config, report = choose(bert.gm, structure, ctx, density=0.5, windows="uniform", **common)
    assert not config.heads and len(report["plans"]) == 1
    assert (config.alpha, config.beta) == (report["uniform"]["alpha"], report["uniform"]["beta"])
    with pytest.raises(PassError, match="density budget"):
        choose(bert.gm, structure, ctx, density=1.5, **common)
    with pytest.raises(PassError, match="no candidate window fits density"):
        choose(bert.gm, structure, ctx, density=0.01, **common)


# ----------------------------------------------------------------------------- cost model, .pt2


def test_cost_model_prediction_falls_when_the_window_shrinks(tmp_path) -> None:
    from trimformer.cost_model.predict import CostModel, Plan, node_costs
    from trimformer.cost_model.profile import DeviceProfile

    loaded = tiny_text_model("llama", layers=1, max_pos=2048)
    gm = capture(loaded, _ids(2, 16, seed=0))
    at = _ids(1, 2048, seed=1)
    profile = DeviceProfile("torch", 1, tmp_path / "profile.json")
    predicted = {}
    for label, windows in (("wide", [(512.0, 0.0)] * 4), ("narrow", [(32.0, 0.0)] * 4)):
        g = copy.deepcopy(gm)
        config = SparseAttentionConfig(sink=4, heads={0: windows})
        sparsify_attention(g, discover(g), config, Context(kind="causal-lm", batches=[at]))
        costs = node_costs(g, discover(g), at)
        local = [c for c in costs if c.kind == "local"]
        assert len(local) == 1 and local[0].groups == ((4, int(windows[0][0])),)
        assert local[0].owner == (0, "attention")
        predicted[label] = CostModel(costs, profile).predict(Plan())
    assert predicted["narrow"] < predicted["wide"]
    assert any(k.startswith("local:1:4:2048:16:32:4:1") for k in profile.entries)


def test_pt2_holding_the_op_loads_with_trimformers_loader_in_a_fresh_process(tmp_path) -> None:
    from trimformer.export.pt2 import save_pt2

    class Local(torch.nn.Module):
        def forward(self, q, k, v):
            return LOCAL_ATTENTION(q, k, v, None, 2, [8.0], [0.0], True, None)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    save_pt2(torch.export.export(Local(), (q, k, v)), tmp_path / "local.pt2")
    torch.save((q, k, v), tmp_path / "qkv.pt")
    # A fresh interpreter that imports only the loader (not trimformer.kernels itself).
    code = textwrap.dedent(
        """
        import sys, torch
        from trimformer.export.pt2 import load_pt2
        program = load_pt2(sys.argv[1])
        q, k, v = torch.load(sys.argv[2])
        torch.save(program.module()(q, k, v), sys.argv[3])
        """
    )
    root = Path(__file__).resolve().parents[1]
    args = [tmp_path / "local.pt2", tmp_path / "qkv.pt", tmp_path / "out.pt"]
    subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=root, check=True)
    want = local_attention_reference(q, k, v, None, 2, [8.0], [0.0], True)
    assert (torch.load(tmp_path / "out.pt") - want).abs().max() <= TOL
