"""The drop pass against the same edit done by hand on the eager model, and the cleanup pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from torch import fx

from trimformer.errors import PassError
from trimformer.graph import ops
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters
from trimformer.graph.structure import discover
from trimformer.passes.base import Context
from trimformer.passes.cleanup import CleanupConfig, cleanup
from trimformer.passes.drop import DropConfig, drop_layers, plan, score

if TYPE_CHECKING:
    from conftest import Model

ALL = ["bert", "minilm", "gpt2", "llama", "vit"]
TINY = ["bert", "gpt2", "llama", "vit"]  # MiniLM is slower; the tiny BERT covers post-norm
TOL = 1e-5


def dropped(model: Model, **config: list[int]) -> fx.GraphModule:
    gm = model.fresh()
    drop_layers(gm, discover(gm), DropConfig(**config), model.ctx())
    return gm


def max_diff_on_tokens(model: Model, got: torch.Tensor, want: torch.Tensor) -> float:
    mask = model.token_mask(model.check_inputs, want)
    return float((got - want)[mask].abs().max())


def assert_matches_hand_edit(model: Model, unit: str, index: int) -> None:
    gm = dropped(model, **{unit: [index]})
    with model.hand_drop(unit, index):
        want = model.eager(model.check_inputs)
    with torch.no_grad():
        got = gm(**model.check_inputs)
    # The edit must matter, or the comparison below proves nothing.
    assert max_diff_on_tokens(model, model.eager(model.check_inputs), want) > 1e-3
    assert max_diff_on_tokens(model, got, want) <= TOL


def middle(model: Model) -> int:
    return model.hf.config.num_hidden_layers // 2


# ----------------------------------------------------------------------------- equals the hand edit


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_attention_drop_matches_hand_edit(model: Model) -> None:
    assert_matches_hand_edit(model, "attention", middle(model))


@pytest.mark.parametrize("model", TINY, indirect=True)
def test_mlp_drop_matches_hand_edit(model: Model) -> None:
    assert_matches_hand_edit(model, "mlp", middle(model))


@pytest.mark.parametrize("model", TINY, indirect=True)
def test_block_drop_matches_hand_edit(model: Model) -> None:
    assert_matches_hand_edit(model, "blocks", middle(model))


@pytest.mark.parametrize("model", ["bert", "llama"], indirect=True)
def test_first_and_last_attention_drop_match_hand_edit(model: Model) -> None:
    last = model.hf.config.num_hidden_layers - 1
    gm = dropped(model, attention=[0, last])
    with model.hand_drop("attention", 0), model.hand_drop("attention", last):
        want = model.eager(model.check_inputs)
    with torch.no_grad():
        got = gm(**model.check_inputs)
    assert max_diff_on_tokens(model, got, want) <= TOL


@pytest.mark.parametrize("model", ["bert", "llama"], indirect=True)
def test_attention_and_mlp_of_adjacent_blocks_match_hand_edit(model: Model) -> None:
    gm = dropped(model, mlp=[0], attention=[1])
    with model.hand_drop("mlp", 0), model.hand_drop("attention", 1):
        want = model.eager(model.check_inputs)
    with torch.no_grad():
        got = gm(**model.check_inputs)
    assert max_diff_on_tokens(model, got, want) <= TOL


# ----------------------------------------------------------------------------- what goes with it


def attention_flops(model: Model, inputs: dict[str, torch.Tensor]) -> int:
    """q/k/v/o projections (2·tokens·in·out each) and SDPA (4·B·H·S·S·D), by hand."""
    c = model.hf.config
    b, s = model.eager(inputs).shape[:2]
    h = c.hidden_size
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    d = h // heads
    t = b * s
    return 2 * t * h * (2 * heads * d + 2 * kv_heads * d) + 4 * b * heads * s * s * d


@pytest.mark.parametrize(
    "model",
    [
        "bert",
        "minilm",
        "gpt2",
        "llama",
        "vit",
    ],
    indirect=True,
)
def test_attention_drop_removes_exactly_its_parameters(model: Model) -> None:
    i = middle(model)
    before = count_parameters(model.gm)
    after = count_parameters(dropped(model, attention=[i]))
    assert before - after == model.branch_parameters("attention", i)


@pytest.mark.parametrize("model", ["bert", "llama"], indirect=True)
def test_mlp_drop_removes_exactly_its_parameters(model: Model) -> None:
    i = middle(model)
    before = count_parameters(model.gm)
    after = count_parameters(dropped(model, mlp=[i]))
    assert before - after == model.branch_parameters("mlp", i)


@pytest.mark.parametrize(
    "model",
    ["bert", "llama"],
    indirect=True,
)
def test_block_drop_removes_exactly_its_parameters(model: Model) -> None:
    i = middle(model)
    before = count_parameters(model.gm)
    after = count_parameters(dropped(model, blocks=[i]))
    assert before - after == model.branch_parameters("blocks", i)


@pytest.mark.parametrize(
    "model",
    [
        "bert",
        "gpt2",
        "llama",
        "vit",
    ],
    indirect=True,
)
def test_attention_drop_removes_exactly_its_flops(model: Model) -> None:
    gm = dropped(model, attention=[middle(model)])
    saved = count_flops(model.gm, model.check_inputs) - count_flops(gm, model.check_inputs)
    assert saved == attention_flops(model, model.check_inputs)


@pytest.mark.parametrize(
    "model",
    ["bert", "llama"],
    indirect=True,
)
def test_no_attention_core_is_left_after_its_drop(model: Model) -> None:
    gm = dropped(model, attention=[1])
    cores = [n for n in gm.graph.nodes if (n.op == "call_function") and (n.target in ops.SDPA)]
    assert len(cores) == model.hf.config.num_hidden_layers - 1


def test_drop_leaves_the_other_blocks_found(llama: Model) -> None:
    gm = dropped(llama, attention=[1])
    s = discover(gm)
    assert [(b.attention is not None, b.mlp is not None) for b in s.blocks] == [
        (True, True),
        (False, True),
        (True, True),
    ]
    assert s.unmatched == ()


def test_partners_of_dropped_sublayers_stay_separate_blocks(llama: Model) -> None:
    s = discover(dropped(llama, mlp=[0], attention=[1]))
    assert [(b.attention is not None, b.mlp is not None) for b in s.blocks] == [
        (True, False),
        (False, True),
        (True, True),
    ]


# ----------------------------------------------------------------------------- importance


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_score_gives_one_importance_in_0_2_per_unit(model: Model) -> None:
    n = model.hf.config.num_hidden_layers
    scores = score(model.gm, discover(model.gm), model.ctx())
    assert set(scores) == {"attention", "mlp", "blocks"}
    for unit in ("attention", "mlp", "blocks"):
        assert sorted(scores[unit]) == list(range(n))
        assert all(0.0 <= v <= 2.0 for v in scores[unit].values()), scores[unit]


def test_score_ignores_padded_positions(bert: Model) -> None:
    batch = dict(bert.check_inputs)
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    structure = discover(bert.gm)
    a = score(bert.gm, structure, Context(kind="encoder", batches=[batch]))
    b = score(bert.gm, structure, Context(kind="encoder", batches=[other]))
    # The pad ids do change the hidden states at the pad positions ...
    with torch.no_grad():
        assert not torch.equal(bert.gm(**batch), bert.gm(**other))
    # ... but not the importance, which averages over real tokens only.
    assert a == b


def test_block_score_of_a_lone_mlp_equals_its_mlp_score(llama: Model) -> None:
    # After dropping attention 1, block 1 is its MLP alone: its block score is the MLP's score.
    gm = dropped(llama, attention=[1])
    scores = score(gm, discover(gm), llama.ctx())
    assert 1 not in scores["attention"]
    assert scores["blocks"][1] == pytest.approx(scores["mlp"][1], abs=1e-6)


def test_score_leaves_the_graph_unchanged(llama: Model) -> None:
    gm = llama.fresh()
    code = gm.code
    score(gm, discover(gm), llama.ctx())
    assert gm.code == code


@pytest.mark.parametrize("model", ["bert", "llama"], indirect=True)
def test_one_shot_plan_picks_the_two_lowest(model: Model) -> None:
    scores = score(model.gm, discover(model.gm), model.ctx())
    lowest = sorted(sorted(scores["attention"], key=lambda i: scores["attention"][i])[:2])
    config, _ = plan(model.gm, discover(model.gm), model.ctx(), {"attention": 2})
    assert config == DropConfig(attention=lowest)


@pytest.mark.parametrize("model", ["bert", "llama"], indirect=True)
def test_iterative_plan_returns_distinct_valid_indices(model: Model) -> None:
    n = model.hf.config.num_hidden_layers
    gm = model.fresh()
    config, _ = plan(gm, discover(gm), model.ctx(), {"attention": 2}, mode="iterative")
    assert len(config.attention) == 2
    assert len(set(config.attention)) == 2
    assert all(0 <= i < n for i in config.attention)
    assert (config.mlp, config.blocks) == ([], [])


def test_iterative_plan_leaves_the_graph_unchanged(llama: Model) -> None:
    gm = llama.fresh()
    code = gm.code
    plan(gm, discover(gm), llama.ctx(), {"blocks": 1}, mode="iterative")
    assert gm.code == code


def test_plan_for_more_units_than_exist_raises(llama: Model) -> None:
    with pytest.raises(PassError, match=r"asked to drop 4 attention but the graph has 3"):
        plan(llama.gm, discover(llama.gm), llama.ctx(), {"attention": 4})


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("unit", ["attention", "mlp", "blocks"])
@pytest.mark.parametrize("index", [3, -1])
def test_out_of_range_index_raises(llama: Model, unit: str, index: int) -> None:
    gm = llama.fresh()
    with pytest.raises(PassError) as e:
        drop_layers(gm, discover(gm), DropConfig(**{unit: [index]}), llama.ctx())
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{unit} index {index} is not a block of this graph" in msg
    assert "blocks: 0, 1, 2" in msg


def test_out_of_range_index_leaves_the_graph_unchanged(llama: Model) -> None:
    gm = llama.fresh()
    code = gm.code
    with pytest.raises(PassError):
        drop_layers(gm, discover(gm), DropConfig(attention=[0, 9]), llama.ctx())
    assert gm.code == code


@pytest.mark.parametrize("model", ["bert", "llama"], indirect=True)
def test_dropping_a_dropped_attention_raises(model: Model) -> None:
    gm = dropped(model, attention=[1])
    with pytest.raises(PassError, match=r"^drop: block 1 has no attention sub-layer left to drop"):
        drop_layers(gm, discover(gm), DropConfig(attention=[1]), model.ctx())


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="heads"):
        DropConfig(heads=[1])  # type: ignore[call-arg]


# ----------------------------------------------------------------------------- cleanup


def count_dropouts(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if (n.op == "call_function") and (n.target in ops.DROPOUT))


@pytest.mark.parametrize("model", ["bert", "minilm", "gpt2", "vit"], indirect=True)
def test_cleanup_is_exact(model: Model) -> None:
    gm = model.fresh()
    cleanup(gm, discover(gm), CleanupConfig(), model.ctx())
    with torch.no_grad():
        assert torch.equal(gm(**model.check_inputs), model.gm(**model.check_inputs))


@pytest.mark.parametrize("model", ["bert", "minilm", "gpt2", "vit"], indirect=True)
def test_cleanup_removes_every_dropout(model: Model) -> None:
    gm = model.fresh()
    n = count_dropouts(gm)
    assert n > 0
    changes = cleanup(gm, discover(gm), CleanupConfig(), model.ctx())
    assert count_dropouts(gm) == 0
    assert changes["dropout_removed"] == n


def test_cleanup_keeps_the_structure(bert: Model) -> None:
    gm = bert.fresh()
    cleanup(gm, discover(gm), CleanupConfig(), bert.ctx())
    before, after = discover(bert.gm).summary(), discover(gm).summary()
    assert after == before
