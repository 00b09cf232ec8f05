"""recover after a lossy drop on tiny models: the loss goes down, LoRA merges exactly."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import fx

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_fold_norm import Case, text_case, text_inputs  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from trimformer.errors import PassError  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.optimizer.pipeline import verify_graph  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.drop import DropConfig, drop_layers  # noqa: E402
from trimformer.passes.recover import RecoverConfig, add_lora, merge_lora, recover  # noqa: E402

LAYERS, H = 2, 32


@pytest.fixture(scope="module")
def tiny() -> Case:
    """A tiny GQA Llama with a wider init, so its next-token distributions are not flat."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * H,
        vocab_size=64,
        max_position_embeddings=32,
        initializer_range=0.15,
    )
    return text_case(LlamaForCausalLM(config), "causal-lm")


@pytest.fixture(scope="module")
def gpt2() -> Case:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=H, n_layer=LAYERS, n_head=4, vocab_size=64, n_positions=32)
    return text_case(GPT2LMHeadModel(config), "causal-lm")


def context(case: Case, teacher: fx.GraphModule | None) -> Context:
    batches = [text_inputs(4, 12, seed) for seed in range(20, 26)]
    return Context(case.loaded.kind, batches[:1], teacher=teacher, train_batches=batches)


def dropped(case: Case) -> fx.GraphModule:
    gm = copy.deepcopy(case.gm)
    drop_layers(gm, discover(gm), DropConfig(attention=[1]), context(case, None))
    return gm


def outputs(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return gm(**inputs)


def user_modules(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recover_reduces_the_distillation_loss_after_a_drop(tiny: Case, method: str) -> None:
    gm = dropped(tiny)
    config = RecoverConfig(
        method=method,
        steps=40,
        lr=1e-2 if method == "lora" else 3e-3,
        batch_size=0,
        eval_every=10,
        heldout_fraction=0.34,
    )
    changes = recover(gm, discover(gm), config, context(tiny, tiny.gm))
    before, after = changes["heldout_loss_before"], changes["heldout_loss_after"]
    assert after < 0.9 * before
    assert changes["training"]["best_step"] > 0
    assert user_modules(gm) == []  # LoRA merged: plain ATen again
    verify_graph(gm, tiny.inputs, outputs(tiny.gm, tiny.inputs).shape)
    if method == "lora":
        assert (
            changes["lora_merged"] == LAYERS * 7 - 4
        )  # block 1 lost q, k, v, o with its attention


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_lora_merge_is_exact(name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(name)
    gm = copy.deepcopy(case.gm)
    added, skipped = add_lora(gm, discover(gm), RecoverConfig(rank=4))
    assert skipped == []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in added:
            module.b.copy_(0.05 * torch.randn(module.b.shape, generator=g))
    unmerged = outputs(gm, case.check)
    assert (unmerged - outputs(case.gm, case.check)).abs().max() > 1e-3  # the adapters matter
    assert merge_lora(gm) == len(added) == LAYERS * (7 if name == "tiny" else 4)
    assert user_modules(gm) == []
    real = case.check["attention_mask"].bool()
    assert float((outputs(gm, case.check) - unmerged).abs()[real].max()) <= 1e-5


def test_recover_needs_the_original_model(tiny: Case) -> None:
    gm = dropped(tiny)
    with pytest.raises(PassError, match="teacher"):
        recover(gm, discover(gm), RecoverConfig(steps=2), context(tiny, None))


def test_early_stop_keeps_the_best_parameters(tiny: Case) -> None:
    """A learning rate far too high only makes things worse: the untrained graph is kept."""
    gm = dropped(tiny)
    want = outputs(gm, tiny.check)
    config = RecoverConfig(
        method="full",
        steps=20,
        lr=3.0,
        batch_size=0,
        eval_every=2,
        patience=2,
        heldout_fraction=0.34,
    )
    changes = recover(gm, discover(gm), config, context(tiny, tiny.gm))
    assert changes["training"]["best_step"] == 0 and changes["training"]["stopped_early"]
    assert torch.equal(outputs(gm, tiny.check), want)
