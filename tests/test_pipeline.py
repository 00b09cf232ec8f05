"""Recipes (validation, round trip) and the driver that applies them, on small seeded models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import fx

from trimformer.errors import PassError, RecipeError
from trimformer.graph.capture import capture
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters, finish
from trimformer.graph.structure import Structure, discover
from trimformer.optimizer.pipeline import (
    Recipe,
    Step,
    dump_recipe,
    load_recipe,
    resolve_steps,
    run_steps,
)
from trimformer.passes import PASSES
from trimformer.passes.base import Context, PassConfig, PassRecord, PassSpec

if TYPE_CHECKING:
    from conftest import Model

STEPS = [{"name": "cleanup"}, {"name": "drop", "attention": [1], "mlp": [0]}]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def recipe_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- validation


def test_unknown_pass_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "passes:\n  - name: cleanup\n  - name: frobnicate\n")
    assert "passes[1]" in msg
    assert "unknown pass 'frobnicate'" in msg
    assert ", ".join(PASSES) in msg


def test_unknown_key_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "passes:\n  - name: drop\n    heads: [1]\n")
    assert "passes[0] (drop) key 'heads'" in msg
    assert "attention, mlp, blocks" in msg


def test_wrong_type_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "passes:\n  - name: drop\n    attention: first\n")
    assert "passes[0] (drop) key 'attention'" in msg


def test_wrong_element_type_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "passes:\n  - name: drop\n    mlp: [1, two]\n")
    assert "passes[0] (drop) key 'mlp.1'" in msg


def test_missing_name_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "passes:\n  - name: cleanup\n  - attention: [1]\n")
    assert "passes[1] needs a `name`" in msg


def test_bad_yaml_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model: x\npasses:\n  - name: [drop\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:")
    assert "not valid YAML" in msg


def test_non_mapping_is_rejected(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "- name: cleanup\n- name: drop\n")
    assert "a recipe is a mapping" in msg


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "model: x\nsteps: []\n")
    assert "'steps'" in msg


def test_bad_shape_is_named(tmp_path: Path) -> None:
    msg = recipe_error(tmp_path, "shape: 8by128\npasses: []\n")
    assert "'8by128'" in msg
    assert "BATCHxSEQ" in msg


def test_bad_shape_names_the_recipe_file(tmp_path: Path) -> None:
    path = write(tmp_path, "shape: 8by128\npasses: []\n")
    with pytest.raises(RecipeError, match=r"^" + re.escape(str(path))):
        load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolve_steps_keeps_the_order_and_configs() -> None:
    steps = resolve_steps(STEPS)
    assert [s.spec.name for s in steps] == ["cleanup", "drop"]
    assert steps[1].config.model_dump() == {
        "attention": [1],
        "mlp": [0],
        "blocks": [],
        "compensate": "none",
    }


def test_valid_recipe_round_trips(tmp_path: Path) -> None:
    steps = resolve_steps(STEPS)
    recipe = Recipe(
        model="./tiny", model_sha256="ab" * 32, shape="2x8", passes=[s.to_entry() for s in steps]
    )
    loaded, again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert loaded == recipe
    assert [(s.spec, s.config) for s in again] == [(s.spec, s.config) for s in steps]


# ----------------------------------------------------------------------------- driver


def run(
    model: Model, gm: fx.GraphModule, entries: list[dict[str, Any]]
) -> tuple[Structure, list[PassRecord]]:
    return run_steps(
        gm, resolve_steps(entries), model.ctx(), model.inputs, shape_inputs=model.check_inputs
    )


def test_records_hold_the_counts_before_and_after(llama: Model) -> None:
    gm = llama.fresh()
    params0, flops0 = count_parameters(gm), count_flops(gm, llama.check_inputs)
    _, records = run(llama, gm, [{"name": "drop", "mlp": [1]}])
    (record,) = records
    assert (record.params_before, record.flops_before) == (params0, flops0)
    assert (record.params_after, record.flops_after) == (
        count_parameters(gm),
        count_flops(gm, llama.check_inputs),
    )
    assert record.params_after < record.params_before
    assert record.flops_after < record.flops_before


@pytest.fixture(scope="module")
def ran(llama: Model) -> tuple[fx.GraphModule, Structure, list[PassRecord]]:
    """STEPS run once on a fresh copy of the Llama graph: (graph, final structure, records)."""
    gm = llama.fresh()
    structure, records = run(llama, gm, STEPS)
    return gm, structure, records


def test_records_chain_from_one_pass_to_the_next(ran: tuple) -> None:
    _, _, records = ran
    assert [r.name for r in records] == ["cleanup", "drop"]
    assert records[1].params_before == records[0].params_after
    assert records[1].flops_before == records[0].flops_after
    assert records[1].nodes_before == records[0].nodes_after


def test_record_holds_the_pass_changes(ran: tuple) -> None:
    _, _, records = ran
    assert records[1].changes["attention_removed"] == 1
    assert records[1].changes["mlp_removed"] == 1
    config = records[1].to_dict()["config"]
    assert config == {"attention": [1], "mlp": [0], "blocks": [], "compensate": "none"}


def test_final_structure_is_rediscovered(ran: tuple) -> None:
    gm, structure, _ = ran
    assert structure == discover(gm)
    assert sum(b.attention is not None for b in structure.blocks) == 2
    assert sum(b.mlp is not None for b in structure.blocks) == 2


def test_failing_pass_is_named_with_what_ran_before(llama: Model) -> None:
    entries = [{"name": "cleanup"}, {"name": "drop", "blocks": [7]}]
    with pytest.raises(PassError) as e:
        run(llama, llama.fresh(), entries)
    msg = str(e.value)
    assert msg.startswith("pass drop (after cleanup): ")
    assert "blocks index 7 is not a block of this graph" in msg


class _NoConfig(PassConfig):
    pass


def replace_output(gm: fx.GraphModule, make: Any) -> None:
    """The graph's single output x becomes make(graph, x)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args[0]  # export graphs return a 1-tuple that the module unflattens
    with gm.graph.inserting_before(out):
        new = make(gm.graph, value)
    out.args = ((new,),)
    finish(gm)


def _poison(gm: fx.GraphModule, structure: Structure, config: PassConfig, ctx: Context) -> dict:
    """Multiply the output by NaN: a graph that runs but fails the finiteness check."""
    replace_output(gm, lambda g, x: g.call_function(torch.ops.aten.mul.Tensor, (x, float("nan"))))
    return {}


def _break(gm: fx.GraphModule, structure: Structure, config: PassConfig, ctx: Context) -> dict:
    """mm of the 3-d output with itself: a graph that lints but no longer runs."""
    replace_output(gm, lambda g, x: g.call_function(torch.ops.aten.mm.default, (x, x)))
    return {}


def _spec(name: str, apply: Any) -> PassSpec:
    return PassSpec(
        name=name, summary="test", exactness="exact", config=_NoConfig, knobs={}, apply=apply
    )


def test_verification_failure_names_the_pass(llama: Model) -> None:
    steps = [*resolve_steps([{"name": "cleanup"}]), Step(_spec("poison", _poison), _NoConfig())]
    with pytest.raises(PassError) as e:
        run_steps(llama.fresh(), steps, llama.ctx(), llama.inputs, llama.check_inputs)
    msg = str(e.value)
    assert msg.startswith("pass poison (after cleanup): ")
    assert "NaN" in msg


def test_graph_that_no_longer_runs_names_the_pass(llama: Model) -> None:
    steps = [Step(_spec("break", _break), _NoConfig())]
    with pytest.raises(PassError, match=r"^pass break \(after nothing\)"):
        run_steps(llama.fresh(), steps, llama.ctx(), llama.inputs, llama.check_inputs)


@pytest.fixture(scope="module")
def replayed(llama: Model) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The same steps applied to two separate captures of the same model: (weights, output)."""
    out = []
    for _ in range(2):
        gm = capture(llama.loaded, llama.inputs)
        run(llama, gm, STEPS)
        with torch.no_grad():
            out.append((dict(gm.state_dict()), gm(**llama.check_inputs)))
    return out


def test_same_steps_on_fresh_captures_give_identical_weights(
    replayed: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
) -> None:
    (a, _), (b, _) = replayed
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_steps_on_fresh_captures_give_identical_outputs(
    replayed: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
) -> None:
    (_, a), (_, b) = replayed
    assert torch.equal(a, b)
