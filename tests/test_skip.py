"""The skip pass: the unified schedule, and the graph equal to the eager model with the skipped
blocks deleted from its layer list by hand."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from pydantic import ValidationError
from torch import fx, nn
from transformers import LlamaConfig, LlamaForCausalLM

from trimformer.errors import PassError
from trimformer.graph.capture import Loaded, TextModel, capture
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters
from trimformer.graph.structure import discover
from trimformer.optimizer.pipeline import resolve_steps
from trimformer.passes import PASSES
from trimformer.passes.base import Context
from trimformer.passes.skip import SkipConfig, kept_blocks, skip_layers

if TYPE_CHECKING:
    from conftest import Model

TOL = 1e-5


def _ids(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 3 :] = 0
    return {"input_ids": torch.randint(1, 100, (batch, seq), generator=g), "attention_mask": mask}


class Deep:
    """A 6-block Llama, so that the schedule has room to space blocks out."""

    def __init__(self) -> None:
        torch.manual_seed(2)
        config = LlamaConfig(
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        )
        self.loaded = Loaded(
            module=TextModel(LlamaForCausalLM(config).eval(), "causal-lm").eval(),
            kind="causal-lm",
            source=Path("<tiny llama, 6 blocks>"),
            config=config,
            max_seq=64,
            vocab_size=100,
        )
        self.inputs = _ids(2, 8, 0)
        self.check_inputs = _ids(3, 11, 1)
        self.gm = capture(self.loaded, self.inputs)

    def fresh(self) -> fx.GraphModule:
        return copy.deepcopy(self.gm)


@pytest.fixture(scope="module")
def deep() -> Deep:
    return Deep()


def run(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs)


def skipped(m: Deep | Model, config: SkipConfig) -> tuple[fx.GraphModule, dict]:
    gm = m.fresh()
    changes = skip_layers(gm, discover(gm), config, Context("x", []))
    return gm, changes


def hand_skip(wrapper: nn.Module, kept: list[int]) -> nn.Module:
    """A copy of the eager wrapper whose layer list holds only the kept blocks."""
    wrapper = copy.deepcopy(wrapper)
    hf = wrapper.model
    if hasattr(hf, "encoder"):  # BERT
        hf.encoder.layer = nn.ModuleList([hf.encoder.layer[i] for i in kept])
    else:  # Llama: forward runs layers[: config.num_hidden_layers]
        hf.model.layers = nn.ModuleList([hf.model.layers[i] for i in kept])
    hf.config.num_hidden_layers = len(kept)
    return wrapper


# ----------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("layers", "speedup", "kept"),
    [
        (30, 2, [0, *range(2, 27, 2), 29]),
        (30, 3, [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]),
        (30, 5, [0, 6, 12, 18, 24, 29]),
        (30, 10, [0, 15, 29]),
        (32, 5, [0, 6, 12, 18, 24, 31]),
    ],
)
def test_schedule_matches_the_papers_examples(layers: int, speedup: int, kept: list[int]) -> None:
    assert kept_blocks(layers, speedup=speedup) == kept


def test_schedule_keeps_the_count_asked_with_first_and_last() -> None:
    for layers in range(3, 65):
        for keep in range(2, layers + 1):
            kept = kept_blocks(layers, keep=keep)
            assert len(kept) == keep and kept[0] == 0 and kept[-1] == layers - 1


def test_speedup_keeps_at_least_first_and_last() -> None:
    assert kept_blocks(6, speedup=100.0) == [0, 5]


# ----------------------------------------------------------------------------- the rewrite


def test_skip_equals_deleting_the_blocks_by_hand_on_llama(deep: Deep) -> None:
    gm, changes = skipped(deep, SkipConfig(speedup=2.0))
    assert changes["kept"] == [0, 3, 5] and changes["removed"] == [1, 2, 4]
    want = run(hand_skip(deep.loaded.module, [0, 3, 5]), deep.check_inputs)
    assert float((run(gm, deep.check_inputs) - want).abs().max()) <= TOL


def test_skip_equals_deleting_the_blocks_by_hand_on_post_norm_bert(bert: Model) -> None:
    gm, changes = skipped(bert, SkipConfig(keep=2))
    assert changes["kept"] == [0, 2]
    want = run(hand_skip(bert.loaded.module, [0, 2]), bert.check_inputs)
    assert float((run(gm, bert.check_inputs) - want).abs().max()) <= TOL


def test_skip_leaves_the_kept_blocks_found_and_lowers_params_and_flops(deep: Deep) -> None:
    gm, _ = skipped(deep, SkipConfig(keep=4))
    assert len(discover(gm).blocks) == 4
    assert count_parameters(gm) < count_parameters(deep.gm)
    assert count_flops(gm, deep.check_inputs) < count_flops(deep.gm, deep.check_inputs)


def test_keeping_every_block_is_the_identity(deep: Deep) -> None:
    gm, changes = skipped(deep, SkipConfig(keep=6))
    assert changes["removed"] == []
    assert torch.equal(run(gm, deep.check_inputs), run(deep.gm, deep.check_inputs))


def test_keeping_more_blocks_than_exist_raises(deep: Deep) -> None:
    gm = deep.fresh()
    with pytest.raises(PassError, match="cannot keep 7 blocks of 6"):
        skip_layers(gm, discover(gm), SkipConfig(keep=7), Context("x", []))


@pytest.mark.parametrize(
    "body", [{}, {"speedup": 2.0, "keep": 3}, {"speedup": 1.0}, {"keep": 0}, {"ratio": 2}]
)
def test_bad_config_is_rejected(body: dict) -> None:
    with pytest.raises(ValidationError):
        SkipConfig.model_validate(body)


def test_recipe_entry_resolves_to_the_skip_pass() -> None:
    (step,) = resolve_steps([{"name": "skip", "speedup": 2}])
    assert step.spec is PASSES["skip"] and step.config == SkipConfig(speedup=2.0)
    assert list(PASSES).index("skip") > list(PASSES).index("drop")
