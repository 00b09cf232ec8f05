"""Structure discovery, FLOPs and parameter counts on small seeded real models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import fx, nn

from trimformer.graph.capture import Loaded, capture
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters
from trimformer.graph.structure import MLP, Attention, Structure, discover

if TYPE_CHECKING:
    from conftest import Model


def attention(s: Structure, i: int) -> Attention:
    sub = s.blocks[i].attention
    assert sub is not None
    assert isinstance(sub.site, Attention)
    return sub.site


def mlp(s: Structure, i: int) -> MLP:
    sub = s.blocks[i].mlp
    assert sub is not None
    assert isinstance(sub.site, MLP)
    return sub.site


# ----------------------------------------------------------------------------- matches


@pytest.mark.parametrize("model", ["bert", "minilm", "gpt2", "llama", "vit"], indirect=True)
def test_every_block_is_found_with_nothing_unmatched(model: Model) -> None:
    s = discover(model.gm)
    assert len(s.blocks) == model.hf.config.num_hidden_layers
    assert all((b.attention is not None) and (b.mlp is not None) for b in s.blocks)
    assert s.unmatched == ()
    assert s.hidden_size == model.hf.config.hidden_size


def test_minilm_attention_shape(minilm: Model) -> None:
    c = minilm.hf.config
    s = discover(minilm.gm)
    assert (len(s.blocks), c.num_attention_heads, c.hidden_size) == (6, 12, 384)
    for i in range(6):
        a = attention(s, i)
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (12, 12, 32)
        assert (a.form, a.causal, a.q.fused) == ("sdpa", False, False)


def test_minilm_is_post_norm_layer_norm(minilm: Model) -> None:
    s = discover(minilm.gm)
    assert s.norm_style == "post-norm"
    for sub in s.sublayers():
        assert sub.pre_norm is None
        assert sub.post_norm is not None
        assert sub.post_norm.kind == "layer_norm"
        assert sub.post_norm.eps == minilm.hf.config.layer_norm_eps


def test_minilm_mlp_is_gelu_of_intermediate_width(minilm: Model) -> None:
    s = discover(minilm.gm)
    for i in range(6):
        m = mlp(s, i)
        assert (m.activation, m.gate, m.down.in_features, m.up.in_features) == (
            "gelu",
            None,
            minilm.hf.config.intermediate_size,
            384,
        )
        assert m.down.in_features == 1536


def test_gpt2_fused_qkv_slices(gpt2: Model) -> None:
    h = gpt2.hf.config.n_embd
    a = attention(discover(gpt2.gm), 1)
    assert a.q.linear is a.k.linear is a.v.linear
    assert a.q.linear.transposed  # Conv1D stores [in, out]
    assert (a.q.linear.in_features, a.q.linear.out_features) == (h, 3 * h)
    assert [(p.start, p.size) for p in (a.q, a.k, a.v)] == [(0, h), (h, h), (2 * h, h)]
    assert a.q.fused


def test_gpt2_attention_is_causal_with_all_heads(gpt2: Model) -> None:
    c = gpt2.hf.config
    s = discover(gpt2.gm)
    for i in range(c.n_layer):
        a = attention(s, i)
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (
            c.n_head,
            c.n_head,
            c.n_embd // c.n_head,
        )
        assert a.causal


def test_gpt2_is_pre_norm_with_gelu_tanh(gpt2: Model) -> None:
    s = discover(gpt2.gm)
    assert s.norm_style == "pre-norm"
    assert all(sub.pre_norm.kind == "layer_norm" for sub in s.sublayers())  # type: ignore[union-attr]
    m = mlp(s, 0)
    assert (m.activation, m.gate, m.down.in_features) == (
        "gelu_tanh",
        None,
        4 * gpt2.hf.config.n_embd,
    )


def test_llama_gqa_head_counts(llama: Model) -> None:
    c = llama.hf.config
    assert c.num_key_value_heads < c.num_attention_heads
    s = discover(llama.gm)
    head_dim = c.hidden_size // c.num_attention_heads
    for i in range(c.num_hidden_layers):
        a = attention(s, i)
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (
            c.num_attention_heads,
            c.num_key_value_heads,
            head_dim,
        )
        assert (a.q.size, a.k.size, a.v.size) == (
            c.num_attention_heads * head_dim,
            c.num_key_value_heads * head_dim,
            c.num_key_value_heads * head_dim,
        )
        assert a.causal


def test_llama_swiglu_gate_is_the_silu_branch(llama: Model) -> None:
    s = discover(llama.gm)
    for i in range(llama.hf.config.num_hidden_layers):
        m = mlp(s, i)
        eager = llama.hf.model.layers[i].mlp
        assert m.gate is not None
        assert m.activation == "silu"
        assert torch.equal(llama.gm.get_parameter(m.gate.weight), eager.gate_proj.weight)
        assert torch.equal(llama.gm.get_parameter(m.up.weight), eager.up_proj.weight)
        assert torch.equal(llama.gm.get_parameter(m.down.weight), eager.down_proj.weight)
        assert m.down.in_features == llama.hf.config.intermediate_size


def test_llama_is_pre_rms_norm(llama: Model) -> None:
    s = discover(llama.gm)
    assert s.norm_style == "pre-norm"
    for sub in s.sublayers():
        assert sub.pre_norm is not None
        assert sub.pre_norm.kind == "rms_norm"
        assert sub.pre_norm.eps == pytest.approx(llama.hf.config.rms_norm_eps)


def test_vit_is_pre_norm_and_not_causal(vit: Model) -> None:
    c = vit.hf.config
    s = discover(vit.gm)
    assert s.norm_style == "pre-norm"
    for i in range(c.num_hidden_layers):
        a = attention(s, i)
        assert (a.num_heads, a.head_dim, a.causal) == (
            c.num_attention_heads,
            c.hidden_size // c.num_attention_heads,
            False,
        )
        assert mlp(s, i).down.in_features == c.intermediate_size


def test_bert_attention_is_not_causal(bert: Model) -> None:
    s = discover(bert.gm)
    assert [attention(s, i).causal for i in range(len(s.blocks))] == [False] * len(s.blocks)


# ----------------------------------------------------------------------------- no match


class _NoAttention(nn.Module):
    """embedding -> linear -> relu -> linear: no attention, no residual."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.down(torch.relu(self.up(x)))


class _ResidualLinear(nn.Module):
    """x + linear(x): a residual branch that is not an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        return x + self.proj(x)


class _UnprojectedAttention(nn.Module):
    """SDPA straight on the embeddings: an attention core without q/k/v projections."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids).view(input_ids.shape[0], input_ids.shape[1], 2, 8).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(x, x, x).transpose(1, 2)


def _capture_toy(module: nn.Module) -> fx.GraphModule:
    torch.manual_seed(0)
    module.eval()
    loaded = Loaded(module=module, kind="encoder", source=Path("<toy>"), max_seq=32)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    return capture(loaded, {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long)})


def test_model_without_attention_has_no_blocks() -> None:
    s = discover(_capture_toy(_NoAttention()))
    assert (s.blocks, s.unmatched, s.norm_style, s.hidden_size) == ((), (), "none", 0)


def test_residual_linear_that_is_not_an_mlp_is_reported() -> None:
    s = discover(_capture_toy(_ResidualLinear()))
    assert s.blocks == ()
    assert len(s.unmatched) == 1
    assert "proj" in s.unmatched[0]
    assert "not an MLP" in s.unmatched[0]


def test_attention_without_projections_is_reported() -> None:
    s = discover(_capture_toy(_UnprojectedAttention()))
    assert s.blocks == ()
    assert len(s.unmatched) == 1
    assert "q/k/v projections not found" in s.unmatched[0]


# ----------------------------------------------------------------------------- counts


def test_llama_flops_match_hand_count(llama: Model) -> None:
    c = llama.hf.config
    b, s = 3, 10  # not the captured shape: the count follows the inputs
    h, inter, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    d = h // heads
    t = b * s
    per_layer = (
        2 * t * h * (heads * d)  # q_proj
        + 2 * 2 * t * h * (kv_heads * d)  # k_proj, v_proj
        + 2 * t * (heads * d) * h  # o_proj
        + 4 * b * heads * s * s * d  # QK^T and PV
        + 3 * 2 * t * h * inter  # gate, up, down
    )
    expected = layers * per_layer + 2 * t * h * v  # lm_head
    ids = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}
    assert count_flops(llama.gm, inputs) == expected


def test_flops_scale_with_batch(bert: Model) -> None:
    # Every counted op is linear in the batch size.
    two = {k: v[:1].repeat(2, 1) for k, v in bert.inputs.items()}
    four = {k: v[:1].repeat(4, 1) for k, v in bert.inputs.items()}
    assert count_flops(bert.gm, four) == 2 * count_flops(bert.gm, two)


def test_tied_weights_are_counted_once(gpt2: Model) -> None:
    hf = gpt2.hf
    assert hf.lm_head.weight is hf.transformer.wte.weight
    distinct = sum(p.numel() for p in hf.parameters())
    with_duplicates = sum(p.numel() for _, p in hf.named_parameters(remove_duplicate=False))
    assert distinct < with_duplicates
    assert count_parameters(gpt2.gm) == distinct


def test_parameter_count_matches_eager_model(llama: Model) -> None:
    assert count_parameters(llama.gm) == sum(p.numel() for p in llama.hf.parameters())


def test_minilm_parameter_count_excludes_the_unused_pooler(minilm: Model) -> None:
    hf = minilm.hf
    used = sum(p.numel() for p in hf.parameters()) - sum(p.numel() for p in hf.pooler.parameters())
    assert count_parameters(minilm.gm) == used
