"""repbn on tiny models: the schedule, BN statistics, the exact fold, plain ATen afterwards."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import fx

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_fold_norm import Case, llama, text_case, text_inputs  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from trimformer.errors import PassError  # noqa: E402
from trimformer.graph import ops  # noqa: E402
from trimformer.graph.capture import dynamic_shapes  # noqa: E402
from trimformer.graph.rewrite import is_op, module_path  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.optimizer.pipeline import verify_graph  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.repbn import (  # noqa: E402
    HiddenTargets,
    LinearNorm,
    RepBNConfig,
    convert,
    fold_linear_norms,
    insert_linear_norms,
    repbn,
)

CFG = RepBNConfig(decay_steps=6, final_steps=2, batch_size=4, refresh_batches=4, fit_batches=2)
LAYERS, H = 2, 32


def context(kind: str) -> Context:
    batches = [text_inputs(4, 12, seed) for seed in range(10, 14)]
    return Context(kind, batches[:1], train_batches=batches)


@pytest.fixture(scope="module")
def tiny() -> Case:
    return llama(tied=True)


@pytest.fixture(scope="module")
def converted(tiny: Case) -> tuple[fx.GraphModule, fx.GraphModule, dict]:
    """(graph just before the fold, the same graph folded, the fold's changes)."""
    gm = copy.deepcopy(tiny.gm)
    structure = discover(gm)
    convert(gm, structure, CFG, context("causal-lm"))
    before = copy.deepcopy(gm)
    changes = fold_linear_norms(gm, structure)
    return before, gm, changes


def outputs(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return gm(**inputs)


def call_modules(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]


def test_lambda_schedule() -> None:
    cfg = RepBNConfig(warm_steps=2, decay_steps=4, final_steps=3)
    assert [cfg.lam(i) for i in range(cfg.steps)] == [1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0]


def test_fold_of_trained_bn_is_exact(converted: tuple, tiny: Case) -> None:
    before, after, _ = converted
    assert call_modules(before) and not call_modules(after)
    diff = (outputs(before, tiny.check) - outputs(after, tiny.check)).abs()
    real = tiny.check["attention_mask"].bool()
    assert float(diff[real].max()) <= 1e-5


def test_no_norm_left_inside_llama_blocks(converted: tuple) -> None:
    _, gm, changes = converted
    assert changes["folded_count"] == 2 * LAYERS and changes["kept"] == []
    # The BN shift goes once on each norm's 32-channel input (x + b/a), not into biases on
    # q(32)+k(16)+v(16) and gate(64)+up(64): the residual stream itself is left alone.
    assert changes["bias_params_added"] == 0
    assert changes["shift_params_added"] == 2 * LAYERS * H
    assert all(f["shift"] == "input" for f in changes["folded"])
    structure = discover(gm)
    assert len(structure.blocks) == LAYERS
    assert all(s.pre_norm is None for s in structure.sublayers())
    assert sum(is_op(n, ops.RMS_RSQRT) for n in gm.graph.nodes) == 1  # the final norm stays


def test_folded_graph_exports(converted: tuple, tiny: Case, tmp_path: Path) -> None:
    from trimformer.export.onnx import export_onnx, verify_onnx

    _, gm, _ = converted
    dyn = dynamic_shapes(tiny.loaded, tiny.inputs)
    program = torch.export.export(gm, (), dict(tiny.inputs), dynamic_shapes=dyn, strict=False)
    want = outputs(gm, tiny.check)
    assert torch.allclose(program.module()(**tiny.check), want, atol=1e-5)
    export_onnx(gm, tiny.inputs, dyn, tmp_path / "m.onnx")
    verify_onnx(tmp_path / "m.onnx", gm, [tiny.check])


def test_pass_records_schedule_and_changes_the_model(tiny: Case) -> None:
    gm = copy.deepcopy(tiny.gm)
    lines: list[str] = []
    ctx = context("causal-lm")
    ctx.progress = lines.append
    changes = repbn(gm, discover(gm), CFG, ctx)
    verify_graph(gm, tiny.inputs, outputs(tiny.gm, tiny.inputs).shape)
    curve = changes["training"]["curve"]
    assert [p["lam"] for p in curve][-1] == 0 and curve[0]["lam"] > 0.8
    assert changes["converted_count"] == 2 * LAYERS and len(changes["eta"]) == 2 * LAYERS
    assert lines and lines[0].startswith("repbn:")
    assert not torch.equal(outputs(gm, tiny.check), outputs(tiny.gm, tiny.check))


def test_post_norm_bert_keeps_a_mul_add() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=2 * H,
        vocab_size=64,
        max_position_embeddings=32,
    )
    case = text_case(BertModel(config, add_pooling_layer=False), "encoder")
    gm = copy.deepcopy(case.gm)
    structure = discover(gm)
    convert(gm, structure, CFG, context("encoder"))
    before = copy.deepcopy(gm)
    changes = fold_linear_norms(gm, structure)
    # 2 per block minus the last block's output norm (the model output, keep_final).
    assert changes["folded_count"] == 0 and changes["kept_count"] == 2 * LAYERS - 1
    assert all("residual" in k["reason"] for k in changes["kept"])
    assert sum(is_op(n, ops.LAYER_NORM) for n in gm.graph.nodes) == 2  # embeddings + final
    diff = (outputs(before, case.check) - outputs(gm, case.check)).abs()
    assert float(diff[case.check["attention_mask"].bool()].max()) <= 1e-5


# ----------------------------------------------------------------------------- LinearNorm


def test_bn_statistics_ignore_padding() -> None:
    m = LinearNorm("rms_norm", 4, 1e-6, torch.ones(4), None, momentum=0.1)
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    x[1, 3:] = 1e6  # pad positions: must not move the statistics
    m.mode, m.lam = "calibrate", 0.0
    m(x, mask)
    m.finish_calibration()
    real = x[mask.bool()]
    assert torch.allclose(m.running_mean, real.mean(0), atol=1e-5)
    assert torch.allclose(m.running_var, real.var(0), atol=1e-4)


def test_fit_init_approximates_the_norm() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 8, generator=g) * torch.linspace(0.5, 3, 8) + torch.linspace(-1, 1, 8)
    m = LinearNorm("layer_norm", 8, 1e-5, 1 + torch.rand(8, generator=g), torch.rand(8), 0.1)
    want = m.norm(x).detach()
    m.mode = "fit"
    m(x)
    m.finish_fit()
    m.mode, m.lam = "eval", 0.0
    with torch.no_grad():
        fitted = (m(x) - want).pow(2).mean()
        zero = want.pow(2).mean()  # SLAB's zero init: RepBN(x) = 0
    assert fitted < 0.2 * zero


def test_blocks_knob_converts_only_those_blocks(tiny: Case) -> None:
    gm = copy.deepcopy(tiny.gm)
    created = insert_linear_norms(gm, discover(gm), RepBNConfig(blocks=[1]))
    assert [module_path(n) for n, _ in created] == [
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    ]
    with pytest.raises(PassError, match="out of range"):
        insert_linear_norms(copy.deepcopy(tiny.gm), discover(gm), RepBNConfig(blocks=[7]))


# ----------------------------------------------------------------------------- training knobs


def test_hidden_targets_are_the_original_norm_outputs(tiny: Case) -> None:
    gm, teacher = copy.deepcopy(tiny.gm), copy.deepcopy(tiny.gm)
    created = insert_linear_norms(gm, discover(gm), CFG)
    targets = HiddenTargets(teacher, [m for _, m in created], weight=1.0)
    batch = tiny.check
    for m in targets.modules:
        m.mode, m.lam = "train", 1.0  # λ = 1: each LinearNorm is its norm
    outputs(gm, batch)
    assert float(targets(0, batch)) <= 1e-10
    for m in targets.modules:
        m.lam = 0.0  # zero-initialized RepBN outputs 0: far from every target
    outputs(gm, batch)
    assert float(targets(0, batch)) >= 0.5
    targets.close()
    assert all(m.output is None and not m.keep_output for m in targets.modules)


@pytest.mark.parametrize("scale", [1e-9, 1.0])
def test_model_lr_scale_slows_the_model_weights(tiny: Case, scale: float) -> None:
    gm = copy.deepcopy(tiny.gm)
    config = CFG.model_copy(update={"model_lr_scale": scale, "hidden_weight": 0.5})
    _, result, _ = convert(gm, discover(gm), config, context("causal-lm"))
    assert all("extra" in p for p in result.curve)
    before = dict(tiny.gm.named_parameters())
    moved = max(
        float((p.detach() - before[name].detach()).abs().max())
        for name, p in gm.named_parameters()
        if name in before and name.endswith("q_proj.weight")
    )
    assert (moved < 1e-6) if scale < 1e-6 else (moved > 1e-4)


def test_sublayers_knob_converts_only_attention_norms(tiny: Case) -> None:
    gm = copy.deepcopy(tiny.gm)
    created = insert_linear_norms(gm, discover(gm), RepBNConfig(sublayers=["attention"]))
    assert [module_path(n) for n, _ in created] == [
        f"model.layers.{i}.input_layernorm" for i in range(LAYERS)
    ]
