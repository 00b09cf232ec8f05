"""The prune pass against the same heads/neurons cut by hand from the eager model.

The hand cut slices the Hugging Face modules' weights (nn.Linear rows/columns; GPT-2's Conv1D is
[in, out]) and fixes the few attributes the eager forward reads (GPT-2 `split_size`, Llama
`num_key_value_groups`); the graph pass must give the same outputs. Importance is checked on the
real all-MiniLM-L6-v2 with Python's documentation as text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from pydantic import ValidationError
from torch import fx, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from trimformer.errors import PassError
from trimformer.export.onnx import export_onnx, verify_onnx
from trimformer.graph.capture import Loaded, TextModel, capture, dynamic_shapes
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters, finish
from trimformer.graph.structure import discover
from trimformer.optimizer.pipeline import Step, resolve_steps, run_steps
from trimformer.optimizer.quality import make_text_batches
from trimformer.optimizer.text import python_docs_split
from trimformer.passes import PASSES
from trimformer.passes.base import Context
from trimformer.passes.prune import PruneConfig, plan, prune_heads_and_neurons, score

if TYPE_CHECKING:
    from conftest import Model

TOL = 1e-5


# ----------------------------------------------------------------------------- a wider GQA model


@dataclass
class Wide:
    """A Llama with 8 query heads in 2 key/value groups (repeat 4), so 'query' mode keeps a
    repeat above 1; shaped like conftest's `Model` where the helpers below need it."""

    name: str
    loaded: Loaded
    inputs: dict[str, torch.Tensor]
    check_inputs: dict[str, torch.Tensor]
    gm: fx.GraphModule

    @property
    def hf(self) -> nn.Module:
        return self.loaded.module.model

    def fresh(self) -> fx.GraphModule:
        return copy.deepcopy(self.gm)

    def ctx(self) -> Context:
        return Context(kind="causal-lm", batches=[self.inputs, self.check_inputs])


def _ids(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 3 :] = 0
    return {"input_ids": torch.randint(1, 100, (batch, seq), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module")
def llama8() -> Wide:
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=100,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    loaded = Loaded(
        module=TextModel(model, "causal-lm").eval(),
        kind="causal-lm",
        source=Path("<tiny llama8>"),
        config=config,
        max_seq=64,
        vocab_size=100,
    )
    inputs = _ids(2, 8, 0)
    return Wide("llama8", loaded, inputs, _ids(3, 11, 1), capture(loaded, inputs))


# ----------------------------------------------------------------------------- the hand cut


def _features(heads: list[int], d: int, offset: int = 0) -> list[int]:
    return [offset + h * d + i for h in heads for i in range(d)]


def _cut_out(lin: nn.Module, keep: list[int]) -> None:
    idx = torch.tensor(keep)
    if isinstance(lin, Conv1D):  # weight [in, out]
        lin.weight = nn.Parameter(lin.weight.data[:, idx].clone())
        lin.nf = len(keep)
    else:
        lin.weight = nn.Parameter(lin.weight.data[idx].clone())
        lin.out_features = len(keep)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[idx].clone())


def _cut_in(lin: nn.Module, keep: list[int]) -> None:
    idx = torch.tensor(keep)
    if isinstance(lin, Conv1D):
        lin.weight = nn.Parameter(lin.weight.data[idx].clone())
    else:
        lin.weight = nn.Parameter(lin.weight.data[:, idx].clone())
        lin.in_features = len(keep)


def _modules(name: str, hf: nn.Module, i: int) -> dict[str, Any]:
    """The attention and MLP modules of block i, by role."""
    if name in ("bert", "minilm"):
        layer = hf.encoder.layer[i]
        s = layer.attention.self
        return dict(
            attn=s,
            q=s.query,
            k=s.key,
            v=s.value,
            o=layer.attention.output.dense,
            up=layer.intermediate.dense,
            gate=None,
            down=layer.output.dense,
        )
    if name == "vit":
        layer = hf.layers[i]
        a = layer.attention
        return dict(
            attn=a, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, up=layer.mlp.fc1, gate=None
        ) | {"down": layer.mlp.fc2}
    if name == "gpt2":
        blk = hf.transformer.h[i]
        return dict(attn=blk.attn, qkv=blk.attn.c_attn, o=blk.attn.c_proj, up=blk.mlp.c_fc) | {
            "gate": None,
            "down": blk.mlp.c_proj,
        }
    layer = hf.model.layers[i]
    a = layer.self_attn
    return dict(attn=a, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, up=layer.mlp.up_proj) | {
        "gate": layer.mlp.gate_proj,
        "down": layer.mlp.down_proj,
    }


def hand_prune(
    m: Any, heads: dict[int, list[int]], neurons: dict[int, list[int]], mode: str = "groups"
) -> nn.Module:
    """A copy of the eager wrapper with the same heads and neurons cut by hand."""
    wrapper = copy.deepcopy(m.loaded.module)
    cfg = wrapper.model.config
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    d = cfg.hidden_size // h
    rep = h // kv
    for i, removed in heads.items():
        mods = _modules(m.name, wrapper.model, i)
        keep_q = [x for x in range(h) if x not in removed]
        gone_kv = {x // rep for x in removed} if (mode == "groups" or rep == 1) else set()
        keep_kv = [g for g in range(kv) if g not in gone_kv]
        if "qkv" in mods:  # GPT-2: q | k | v thirds of one Conv1D
            e = h * d
            keep = _features(keep_q, d) + _features(keep_kv, d, e) + _features(keep_kv, d, 2 * e)
            _cut_out(mods["qkv"], keep)
            mods["attn"].split_size = len(keep_q) * d
        else:
            _cut_out(mods["q"], _features(keep_q, d))
            _cut_out(mods["k"], _features(keep_kv, d))
            _cut_out(mods["v"], _features(keep_kv, d))
        _cut_in(mods["o"], _features(keep_q, d))
        if hasattr(mods["attn"], "num_key_value_groups"):
            mods["attn"].num_key_value_groups = len(keep_q) // len(keep_kv)
    for i, removed in neurons.items():
        mods = _modules(m.name, wrapper.model, i)
        width = mods["down"].weight.shape[0 if isinstance(mods["down"], Conv1D) else 1]
        keep = [j for j in range(width) if j not in removed]
        for lin in (mods["up"], mods["gate"]):
            if lin is not None:
                _cut_out(lin, keep)
        _cut_in(mods["down"], keep)
    return wrapper


def pruned(m: Any, config: PruneConfig, ctx: Context | None = None) -> tuple[fx.GraphModule, dict]:
    gm = m.fresh()
    changes = prune_heads_and_neurons(gm, discover(gm), config, ctx or m.ctx())
    return gm, changes


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def run(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs)


# Per model: (heads removed per block, neurons removed per block, gqa mode). Blocks differ so
# that a mix-up between blocks shows. conftest models have 4 heads (Llama: 2 groups of 2).
CASES: dict[str, tuple[dict[int, list[int]], dict[int, list[int]], str]] = {
    "bert": ({0: [1, 2], 2: [3]}, {0: list(range(0, 128, 3)), 1: [5, 6, 100]}, "groups"),
    "minilm": ({1: [0, 5, 11], 4: [2]}, {0: list(range(0, 1536, 2)), 5: [7]}, "groups"),
    "gpt2": ({0: [0, 3], 1: [2]}, {1: list(range(0, 256, 4)), 2: [9]}, "groups"),
    "vit": ({1: [0], 2: [1, 2, 3]}, {0: [1, 2, 3], 2: list(range(64))}, "groups"),
    "llama": ({0: [2, 3], 2: [0, 1]}, {1: list(range(0, 128, 2))}, "groups"),
    "llama-query": ({0: [0, 3], 1: [1, 2]}, {2: [4, 5]}, "query"),
    "llama8": ({0: [4, 5, 6, 7]}, {1: list(range(40))}, "groups"),
    "llama8-query": ({0: [0, 5], 1: [1, 2, 3, 4, 6, 7]}, {0: [0]}, "query"),
}


def fixture_of(case: str) -> str:
    return case.split("-")[0]


@pytest.fixture(scope="module")
def cut(request: pytest.FixtureRequest) -> tuple[Any, fx.GraphModule, dict, nn.Module, str]:
    """(model, pruned graph, changes, hand-pruned eager, case) for one entry of CASES."""
    case = request.param
    m = request.getfixturevalue(fixture_of(case))
    heads, neurons, mode = CASES[case]
    gm, changes = pruned(m, PruneConfig(heads=heads, neurons=neurons, gqa_mode=mode))
    return m, gm, changes, hand_prune(m, heads, neurons, mode), case


ALL_CASES = list(CASES)


# ----------------------------------------------------------------------------- equals the hand cut


@pytest.mark.parametrize("cut", ALL_CASES, indirect=True)
def test_prune_matches_hand_cut(cut: tuple) -> None:
    m, gm, _, hand, _ = cut
    want = run(hand, m.check_inputs)
    assert max_diff(run(m.loaded.module, m.check_inputs), want) > 1e-3  # the cut matters
    assert max_diff(run(gm, m.check_inputs), want) <= TOL


@pytest.mark.parametrize("cut", ALL_CASES, indirect=True)
def test_discovery_reports_the_new_head_counts_and_widths(cut: tuple) -> None:
    m, gm, _, hand, case = cut
    heads, neurons, _ = CASES[case]
    found = {b.index: b for b in discover(gm).blocks}
    for i in range(len(found)):
        mods = _modules(m.name, hand.model, i)
        a, mlp = found[i].attention.site, found[i].mlp.site
        d = a.head_dim
        assert a.num_heads * d == mods["o"].weight.shape[0 if isinstance(mods["o"], Conv1D) else 1]
        if "k" in mods:
            assert a.num_kv_heads * d == mods["k"].weight.shape[0]
        down = mods["down"]
        assert mlp.down.in_features == down.weight.shape[0 if isinstance(down, Conv1D) else 1]
    h = m.hf.config.num_attention_heads
    assert {b: found[b].attention.site.num_heads for b in heads} == {
        b: h - len(r) for b, r in heads.items()
    }
    width = {b: found[b].mlp.site.down.in_features for b in neurons}
    original = {b.index: b.mlp.site.down.in_features for b in discover(m.gm).blocks}
    assert width == {b: original[b] - len(r) for b, r in neurons.items()}


@pytest.mark.parametrize("cut", ALL_CASES, indirect=True)
def test_prune_removes_exactly_the_hand_cut_parameters_and_lowers_flops(cut: tuple) -> None:
    m, gm, _, hand, _ = cut
    before = m.fresh()
    finish(before)  # as the pass does: MiniLM's unused pooler weights leave the graph
    eager_removed = sum(p.numel() for p in m.loaded.module.parameters()) - sum(
        p.numel() for p in hand.parameters()
    )
    assert count_parameters(before) - count_parameters(gm) == eager_removed > 0
    assert count_flops(gm, m.check_inputs) < count_flops(before, m.check_inputs)


@pytest.mark.parametrize("cut", ["llama-query", "llama8-query"], indirect=True)
def test_query_mode_keeps_key_value_heads(cut: tuple) -> None:
    m, gm, changes, _, _ = cut
    kv = m.hf.config.num_key_value_heads
    assert all(a.attention.site.num_kv_heads == kv for a in discover(gm).blocks)
    assert set(changes["kv_heads_kept"].values()) == {kv}


@pytest.mark.parametrize("cut", ["llama", "llama8"], indirect=True)
def test_groups_mode_removes_key_value_groups(cut: tuple) -> None:
    m, gm, changes, _, _ = cut
    assert discover(gm).blocks[0].attention.site.num_kv_heads == 1
    assert changes["kv_heads_kept"][0] == 1


def test_gpt2_split_sizes_follow_the_kept_heads(gpt2: Model) -> None:
    gm, _ = pruned(gpt2, PruneConfig(heads={0: [1]}))
    d = gpt2.hf.config.n_embd // gpt2.hf.config.n_head
    splits = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split.Tensor]
    assert splits[0].args[1] == 3 * d  # block 0: 3 heads of d in each of q, k, v
    assert splits[1].args[1] == 4 * d  # block 1 untouched


# ----------------------------------------------------------------------------- nothing, replay


@pytest.mark.parametrize("model", ["bert", "gpt2", "llama", "vit"], indirect=True)
def test_pruning_nothing_is_the_identity(model: Model) -> None:
    gm, changes = pruned(model, PruneConfig(heads=0.0, neurons={}), Context("x", []))
    assert torch.equal(run(gm, model.check_inputs), run(model.gm, model.check_inputs))
    assert count_parameters(gm) == count_parameters(model.gm)
    assert changes["heads_kept"] == {} and changes["neurons_kept"] == {}


@pytest.mark.parametrize("mode", ["groups", "query"])
def test_ratio_resolves_to_indices_that_replay_without_calibration(llama8: Wide, mode: str) -> None:
    gm, changes = pruned(llama8, PruneConfig(heads=0.5, neurons=0.25, gqa_mode=mode))
    resolved = PruneConfig.model_validate(changes["resolved"])  # the JSON round trip of a recipe
    assert resolved.explicit
    again, _ = pruned(llama8, resolved, Context("causal-lm", []))
    assert torch.equal(run(again, llama8.check_inputs), run(gm, llama8.check_inputs))


def test_ratio_in_groups_mode_removes_half_the_groups(llama8: Wide) -> None:
    resolved, scores = plan(
        llama8.gm, discover(llama8.gm), llama8.ctx(), PruneConfig(heads=0.5, gqa_mode="groups")
    )
    for b, removed in resolved.heads.items():
        group_score = [sum(scores["heads"][b][g * 4 : g * 4 + 4]) for g in range(2)]
        weakest = min(range(2), key=lambda g: group_score[g])
        assert removed == list(range(weakest * 4, weakest * 4 + 4))


def test_ratio_in_query_mode_removes_the_weakest_heads_of_each_group(llama8: Wide) -> None:
    resolved, scores = plan(
        llama8.gm, discover(llama8.gm), llama8.ctx(), PruneConfig(heads=0.5, gqa_mode="query")
    )
    for b, removed in resolved.heads.items():
        s = scores["heads"][b]
        for g in range(2):
            group = list(range(g * 4, g * 4 + 4))
            assert sorted(x for x in removed if x in group) == sorted(
                sorted(group, key=s.__getitem__)[:2]
            )


def test_neuron_ratio_keeps_a_multiple_of_round_to(llama: Model) -> None:
    resolved, _ = plan(llama.gm, discover(llama.gm), llama.ctx(), PruneConfig(neurons=0.3))
    # 128 neurons, 38 removed -> 90 kept -> rounded to 88
    assert {len(v) for v in resolved.neurons.values()} == {128 - 88}


def test_counts_pick_the_least_important(bert: Model) -> None:
    resolved, scores = plan(
        bert.gm, discover(bert.gm), bert.ctx(), PruneConfig(heads={1: 2}, neurons={0: 16})
    )
    s = scores["heads"][1]
    assert resolved.heads == {1: sorted(sorted(range(4), key=s.__getitem__)[:2])}
    n = scores["neurons"][0]
    assert resolved.neurons == {0: sorted(sorted(range(128), key=n.__getitem__)[:16])}


def test_plan_reuses_scores_the_caller_cached(llama: Model) -> None:
    structure = discover(llama.gm)
    cached = {
        "heads": {b.index: [4.0, 3.0, 2.0, 1.0] for b in structure.blocks},
        "neurons": {b.index: [float(-j) for j in range(128)] for b in structure.blocks},
    }
    ctx = Context("causal-lm", [], cache={"prune.score": cached})  # no batches: must not score
    request = PruneConfig(heads=0.5, neurons={0: 8})
    resolved, scores = plan(llama.gm, structure, ctx, request)
    assert scores is cached
    assert resolved.heads == {b.index: [2, 3] for b in structure.blocks}  # the weaker group
    assert resolved.neurons == {0: list(range(120, 128))}


def test_plan_ignores_cached_scores_of_another_shape(llama: Model) -> None:
    cached = {"heads": {0: [1.0, 2.0]}, "neurons": {}}
    ctx = Context("causal-lm", [], cache={"prune.score": cached})
    with pytest.raises(PassError, match="calibration"):
        plan(llama.gm, discover(llama.gm), ctx, PruneConfig(heads=0.5))


def test_score_leaves_the_graph_unchanged(llama: Model) -> None:
    gm = llama.fresh()
    code = gm.code
    scores = score(gm, discover(gm), llama.ctx())
    assert gm.code == code
    assert all(len(v) == 4 and min(v) > 0 for v in scores["heads"].values())


# ----------------------------------------------------------------------------- importance


@dataclass
class TextData:
    calib: list[dict[str, torch.Tensor]]
    heldout: dict[str, torch.Tensor]
    reference: torch.Tensor  # the unpruned model's mean-pooled embeddings of `heldout`


def mean_pooled(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (run(module, batch) * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def minilm_text(minilm: Model) -> TextData:
    split = python_docs_split()
    tok = minilm.loaded.tokenizer
    calib = make_text_batches(tok, split.calibration, batch_size=8, seq_len=32, max_batches=2)
    (heldout,) = make_text_batches(tok, split.heldout, batch_size=8, seq_len=48, max_batches=1)
    return TextData(
        [b.inputs for b in calib], heldout.inputs, mean_pooled(minilm.gm, heldout.inputs)
    )


@pytest.fixture(scope="module")
def minilm_scores(minilm: Model, minilm_text: TextData) -> dict:
    return score(minilm.gm, discover(minilm.gm), Context("encoder", minilm_text.calib))


@pytest.mark.parametrize(("unit", "count"), [("heads", 4), ("neurons", 768)])
def test_removing_the_least_important_hurts_less_than_the_most(
    minilm: Model, minilm_text: TextData, minilm_scores: dict, unit: str, count: int
) -> None:
    def cosine_after_cut(weakest: bool) -> float:
        chosen = {}
        for b, s in minilm_scores[unit].items():
            order = sorted(range(len(s)), key=s.__getitem__, reverse=not weakest)
            chosen[b] = sorted(order[:count])
        gm, _ = pruned(minilm, PruneConfig(**{unit: chosen}), Context("encoder", []))
        got = mean_pooled(gm, minilm_text.heldout)
        return float(torch.nn.functional.cosine_similarity(got, minilm_text.reference).mean())

    least, most = cosine_after_cut(weakest=True), cosine_after_cut(weakest=False)
    assert least > most + 0.05, (least, most)


def test_ratio_on_minilm_prunes_every_block(minilm: Model) -> None:
    gm, changes = pruned(minilm, PruneConfig(heads=0.25, neurons=0.25), minilm.ctx())
    summary = discover(gm).summary()["blocks"]
    assert {b["attention"]["heads"] for b in summary} == {9}
    assert {b["mlp"]["width"] for b in summary} == {1152}
    assert len(changes["head_importance"]) == 6


# ----------------------------------------------------------------------------- ONNX, pipeline


def test_pruned_graph_exports_to_onnx_and_matches_onnxruntime(llama8: Wide, tmp_path: Path) -> None:
    # GQA 'query' mode: the rewritten expand/reshape sizes must survive re-export.
    m = llama8
    heads, neurons, mode = CASES["llama8-query"]
    gm, _ = pruned(m, PruneConfig(heads=heads, neurons=neurons, gqa_mode=mode))
    path = tmp_path / "model.onnx"
    export_onnx(gm, m.inputs, dynamic_shapes(m.loaded, m.inputs), path)
    check = verify_onnx(path, gm, [m.check_inputs, _ids(1, 5, 3)])
    assert check.max_abs_diff <= 1e-4


def test_recipe_entry_validates_and_the_pipeline_verifies_the_pass(llama: Model) -> None:
    (step,) = resolve_steps([{"name": "prune", "heads": {0: [0, 1]}, "neurons": 0.25}])
    assert isinstance(step, Step) and PASSES["prune"] is step.spec
    gm = llama.fresh()
    _, (record,) = run_steps(gm, [step], llama.ctx(), llama.check_inputs, llama.check_inputs)
    assert record.params_after < record.params_before
    assert record.flops_after < record.flops_before


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (PruneConfig(heads={0: 1}), "multiple of 2"),  # groups mode: whole groups of 2
        (PruneConfig(heads={0: [0]}), "splits a group"),
        (PruneConfig(heads={0: [0, 1]}, gqa_mode="query"), "same number"),
        (PruneConfig(heads={0: [0, 1, 2, 3]}), "keep at least one"),
        (PruneConfig(heads={7: [0, 1]}), "block 7"),
        (PruneConfig(neurons={0: 128}), "cannot remove"),
    ],
)
def test_impossible_requests_raise_and_leave_the_graph_unchanged(
    llama: Model, config: PruneConfig, match: str
) -> None:
    gm = llama.fresh()
    code = gm.code
    with pytest.raises(PassError, match=match):
        prune_heads_and_neurons(gm, discover(gm), config, llama.ctx())
    assert gm.code == code


def test_ratio_without_calibration_batches_raises(llama: Model) -> None:
    gm = llama.fresh()
    with pytest.raises(PassError, match="calibration"):
        prune_heads_and_neurons(gm, discover(gm), PruneConfig(heads=0.5), Context("x", []))


@pytest.mark.parametrize(
    "body",
    [{"heads": 1.0}, {"neurons": -0.1}, {"heads": {0: [1, 1]}}, {"round_to": 0}, {"ratio": 0.5}],
)
def test_bad_config_is_rejected(body: dict) -> None:
    with pytest.raises(ValidationError):
        PruneConfig.model_validate(body)
