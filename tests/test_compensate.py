"""Training-free compensation of pruning (bias / lstsq refit) and of drops (mean shift).

The math is checked on synthetic activations where the answer is known; the effect on the real
all-MiniLM-L6-v2 with Python's documentation (calibration and held-out text never overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import fx

from trimformer.export.onnx import export_onnx, verify_onnx
from trimformer.graph.capture import dynamic_shapes
from trimformer.graph.rewrite import count_parameters, tap
from trimformer.graph.structure import discover
from trimformer.optimizer.quality import make_text_batches
from trimformer.optimizer.text import python_docs_split
from trimformer.passes.base import Context
from trimformer.passes.compensate import fit_kept_inputs, input_moments
from trimformer.passes.drop import DropConfig, drop_layers
from trimformer.passes.prune import PruneConfig, prune_heads_and_neurons

if TYPE_CHECKING:
    from conftest import Model


def moments_of(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return x1.t() @ x1, x.shape[0]


# ----------------------------------------------------------------------------- the fits


def test_lstsq_keeping_every_feature_returns_the_original_weights() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64)
    new_w, new_b = fit_kept_inputs(w, b, moments_of(x), list(range(7)), "lstsq", ridge=0.1)
    assert torch.allclose(new_w, w, atol=1e-9) and torch.allclose(new_b, b, atol=1e-9)


def test_lstsq_recovers_the_output_when_cut_features_depend_linearly_on_kept_ones() -> None:
    g = torch.Generator().manual_seed(1)
    kept = torch.randn(300, 6, generator=g, dtype=torch.float64)
    cut = kept @ torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.5  # affine in kept
    x = torch.cat([kept, cut], dim=1)
    w, b = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = x @ w.t() + b
    new_w, new_b = fit_kept_inputs(w, b, moments_of(x), list(range(6)), "lstsq", ridge=1e-10)
    assert (kept @ new_w.t() + new_b - y).abs().max() < 1e-6
    sliced = kept @ w[:, :6].t() + b  # plain slicing is far off: the fit did the work
    assert (sliced - y).abs().max() > 0.1


def test_bias_adds_the_mean_contribution_of_the_cut_features() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 5, generator=g, dtype=torch.float64) + 1.0
    w, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    new_w, new_b = fit_kept_inputs(w, b, moments_of(x), [0, 2, 4], "bias", ridge=0.0)
    assert torch.equal(new_w, w[:, [0, 2, 4]])
    want = w[:, [1, 3]] @ x[:, [1, 3]].mean(0)
    assert torch.allclose(new_b, want, atol=1e-12)
    # On average over the calibration tokens the output is unchanged.
    full = (x @ w.t() + b).mean(0)
    assert torch.allclose((x[:, [0, 2, 4]] @ new_w.t() + new_b).mean(0), full, atol=1e-12)


def test_moments_count_only_non_pad_tokens(llama: Model) -> None:
    gm = llama.fresh()
    down = discover(gm).blocks[0].mlp.site.down  # type: ignore[union-attr]
    batch = llama.inputs
    (g, n) = input_moments(gm, [down], Context("causal-lm", [batch]))[down.weight]
    assert n == int(batch["attention_mask"].sum())
    (value,) = tap(gm, [down.input])(**batch)
    x = value[batch["attention_mask"].bool()].double()
    assert torch.allclose(g[:-1, -1], x.sum(0), atol=1e-6)


# ----------------------------------------------------------------------------- on real models


@dataclass
class Text:
    calib: list[dict[str, torch.Tensor]]
    heldout: dict[str, torch.Tensor]
    reference: torch.Tensor


def pooled(gm: fx.GraphModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = gm(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (out * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def text(minilm: Model) -> Text:
    split = python_docs_split()
    tok = minilm.loaded.tokenizer
    calib = make_text_batches(tok, split.calibration, batch_size=8, seq_len=64, max_batches=4)
    (held,) = make_text_batches(tok, split.heldout, batch_size=8, seq_len=64, max_batches=1)
    return Text([b.inputs for b in calib], held.inputs, pooled(minilm.gm, held.inputs))


def heldout_cosine(minilm: Model, text: Text, gm: fx.GraphModule) -> float:
    got = pooled(gm, text.heldout)
    return float(torch.nn.functional.cosine_similarity(got, text.reference).mean())


@pytest.fixture(scope="module")
def neuron_cut(minilm: Model, text: Text) -> dict[str, float]:
    out = {}
    for method in ("none", "bias", "lstsq"):
        gm = minilm.fresh()
        config = PruneConfig(neurons=0.5, compensate=method)
        prune_heads_and_neurons(gm, discover(gm), config, Context("encoder", text.calib))
        out[method] = heldout_cosine(minilm, text, gm)
    return out


def test_compensating_a_neuron_cut_raises_heldout_quality_on_minilm(neuron_cut: dict) -> None:
    assert neuron_cut["bias"] > neuron_cut["none"] + 0.02, neuron_cut
    assert neuron_cut["lstsq"] > neuron_cut["bias"] + 0.02, neuron_cut


def test_mean_shift_of_dropped_attention_raises_heldout_quality_on_minilm(
    minilm: Model, text: Text
) -> None:
    got = {}
    for method in ("none", "mean"):
        gm = minilm.fresh()
        config = DropConfig(attention=[0, 2, 4], compensate=method)
        drop_layers(gm, discover(gm), config, Context("encoder", text.calib))
        got[method] = heldout_cosine(minilm, text, gm)
    assert got["mean"] > got["none"] + 0.05, got


def test_lstsq_gives_a_bias_to_projections_without_one_and_exports(
    llama: Model, tmp_path: Path
) -> None:
    # Llama's o_proj and down_proj have no bias; the refit adds one (a few parameters).
    plain, fitted = llama.fresh(), llama.fresh()
    ctx = llama.ctx()
    for gm, method in ((plain, "none"), (fitted, "lstsq")):
        config = PruneConfig(heads={0: [0, 1]}, neurons={1: 64}, compensate=method)
        prune_heads_and_neurons(gm, discover(gm), config, ctx)
    hidden = llama.hf.config.hidden_size
    assert count_parameters(fitted) == count_parameters(plain) + 2 * hidden
    with torch.no_grad():
        diff = (fitted(**llama.check_inputs) - plain(**llama.check_inputs)).abs().max()
    assert diff > 1e-4  # the refit changed the weights
    path = tmp_path / "model.onnx"
    export_onnx(fitted, llama.inputs, dynamic_shapes(llama.loaded, llama.inputs), path)
    assert verify_onnx(path, fitted, [llama.check_inputs]).max_abs_diff <= 1e-4


def test_mean_shift_drop_exports_and_keeps_the_structure(gpt2: Model, tmp_path: Path) -> None:
    gm = gpt2.fresh()
    config = DropConfig(attention=[1], compensate="mean")
    drop_layers(gm, discover(gm), config, gpt2.ctx())
    blocks = discover(gm).blocks
    assert blocks[1].attention is None and blocks[1].mlp is not None
    path = tmp_path / "model.onnx"
    export_onnx(gm, gpt2.inputs, dynamic_shapes(gpt2.loaded, gpt2.inputs), path)
    assert verify_onnx(path, gm, [gpt2.check_inputs]).max_abs_diff <= 1e-4


def test_compensation_without_calibration_batches_says_so(llama: Model) -> None:
    from trimformer.errors import PassError

    gm = llama.fresh()
    config = PruneConfig(neurons={0: [0, 1, 2]}, compensate="lstsq")
    with pytest.raises(PassError, match="calibration"):
        prune_heads_and_neurons(gm, discover(gm), config, Context("causal-lm", []))
