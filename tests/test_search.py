"""Cost model and search: behaviour, not speed (timings here are too noisy to assert on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trimformer.cost_model.predict import CostModel, Plan, branch_nodes, node_costs
from trimformer.cost_model.profile import DeviceProfile
from trimformer.graph.capture import dynamic_shapes, load_checkpoint
from trimformer.optimizer.pipeline import resolve_steps
from trimformer.optimizer.run import RunOptions, prepare, shape_inputs
from trimformer.optimizer.search import Builder, Measurer, describe, search, step_down


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    monkeypatch.setenv("TRIMFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def sample():
    loaded = load_checkpoint(None)
    opts = RunOptions(out=Path("."), shape="2x64", calib_batches=2, eval_batches=1, seq_len=64)
    return loaded, prepare(loaded, opts, lambda m: None)


def test_ladder_goes_prune_then_drop() -> None:
    allow = {"drop", "prune"}
    p = step_down(Plan(), 3, "mlp", allow)
    assert p.neurons(3) == 0.75
    p = step_down(p, 3, "mlp", allow)
    assert p.neurons(3) == 0.5
    p = step_down(p, 3, "mlp", allow)
    assert 3 in p.mlp_dropped and p.neurons(3) == 1.0
    assert step_down(p, 3, "mlp", allow) is None


def test_ladder_respects_allowed_passes() -> None:
    assert step_down(Plan(), 0, "attention", {"drop"}).attention_dropped == frozenset({0})
    assert step_down(Plan(), 0, "attention", {"prune"}).heads(0) == 0.75
    assert step_down(Plan(heads_kept=((0, 0.5),)), 0, "attention", {"prune"}) is None


def test_branch_nodes_exclude_the_residual_stream(sample) -> None:
    _, prep = sample
    gm, structure = prep.gm, prep.structure
    total = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    for b in structure.blocks:
        for s in b.sublayers:
            dead = branch_nodes(gm, s)
            assert s.residual not in dead
            assert s.add in dead
            assert len(dead) < total / len(structure.blocks)


def test_cost_model_predicts_savings_without_building(sample, tmp_path: Path) -> None:
    loaded, prep = sample
    at = shape_inputs(loaded, "2x64")
    model = CostModel(
        node_costs(prep.gm, prep.structure, at), DeviceProfile("torch", 1, tmp_path / "p.json")
    )
    model.anchor(10.0)
    assert model.predict(Plan()) == pytest.approx(10.0)
    dropped = model.predict(Plan(attention_dropped=frozenset({0, 1})))
    pruned = model.predict(Plan(neurons_kept=((0, 0.5), (1, 0.5))))
    assert dropped < 10.0 and pruned < 10.0
    assert model.predict(Plan(mlp_dropped=frozenset({0}))) < model.predict(
        Plan(neurons_kept=((0, 0.5),))
    )
    model.profile.save()
    assert DeviceProfile("torch", 1, tmp_path / "p.json").entries == model.profile.entries


def test_builder_plan_matches_structure(sample) -> None:
    _, prep = sample
    builder = Builder(prep.gm, prep.structure, prep.ctx)
    plan = Plan(frozenset({1}), frozenset({4}), ((2, 0.5),), ((0, 0.75),))
    gm = builder.build(plan)
    from trimformer.graph.structure import discover

    s = discover(gm)
    assert s.block(1).attention is None and s.block(4).mlp is None
    before = prep.structure.block(2).attention.site.num_heads
    assert s.block(2).attention.site.num_heads == before // 2
    width = prep.structure.block(0).mlp.site.down.in_features
    kept = s.block(0).mlp.site.down.in_features
    assert kept % 8 == 0 and abs(kept - width * 0.75) <= 4  # widths round to multiples of 8
    # The steps are a valid, replayable recipe.
    entries = [st.to_entry() for st in builder.steps(plan)]
    assert [st.spec.name for st in resolve_steps(entries)] == ["cleanup", "prune", "drop"]


def test_dry_run_search_meets_the_predicted_goal(sample, tmp_path: Path) -> None:
    loaded, prep = sample
    x = prep.calib[0].inputs
    measurer = Measurer(
        "torch",
        prep.gm,
        x,
        dynamic_shapes(loaded, x),
        shape_inputs(loaded, "2x64"),
        "2x64",
        1,
        tmp_path,
        repeats=2,
        rounds=1,
    )
    torch.manual_seed(0)
    res = search(
        loaded.kind,
        prep.gm,
        prep.structure,
        prep.ctx,
        prep.calib,
        prep.evaluation,
        measurer,
        1.2,
        {"drop"},  # prune builds are covered above; drop-only keeps this test quick
        lambda m: None,
        max_verify=0,
    )
    assert res.chosen.plan != Plan()
    assert res.chosen.predicted_ms <= res.goal_ms * 1.0001
    assert res.candidates and all(c.proxy is not None for c in res.candidates)
    assert describe(res.chosen.plan) == res.chosen.label
    assert res.to_dict()["chosen"]["measured_ms"] is None  # a dry run measures nothing built
