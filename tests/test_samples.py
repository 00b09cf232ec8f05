"""The bundled samples: both load through trimformer's loader, and the long-context one is what
its name says, a model trained at its configured context (1024 tokens).

`samples/tinyllama-py` was trained at 256 tokens; `samples/tinyllama-py-1k` is it continued at
1024 (samples/train_sample.py --init). The sparse-attention model benchmark at full context runs
on the second, because on the first, 1024 tokens is 4x its training length and cutting attention
there lowers perplexity by itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trimformer.graph.capture import load_checkpoint
from trimformer.optimizer import quality
from trimformer.optimizer.text import python_docs_split

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _heldout_perplexity(path: Path, seq: int) -> float:
    loaded = load_checkpoint(path)
    batches = quality.make_text_batches(
        loaded.tokenizer,
        python_docs_split().heldout,
        batch_size=1,
        seq_len=seq,
        max_batches=4096 // seq,
    )
    ref = quality.reference_outputs(loaded.module, batches)
    result = quality.evaluate(loaded.kind, loaded.module, batches, ref)
    return result.metrics["perplexity"]


@pytest.fixture(scope="module")
def perplexities() -> dict[tuple[str, int], float]:
    torch.manual_seed(0)
    return {
        (name, seq): _heldout_perplexity(SAMPLES / name, seq)
        for name in ("tinyllama-py", "tinyllama-py-1k")
        for seq in (256, 1024)
    }


def test_samples_have_one_architecture_and_tokenizer() -> None:
    base, long = (load_checkpoint(SAMPLES / n) for n in ("tinyllama-py", "tinyllama-py-1k"))
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
    ):
        assert getattr(base.config, key) == getattr(long.config, key), key
    assert base.config.max_position_embeddings == 1024
    text = python_docs_split().heldout[0][:400]
    assert base.tokenizer(text)["input_ids"] == long.tokenizer(text)["input_ids"]


def test_long_context_sample_uses_its_full_context(perplexities) -> None:
    base, long = perplexities[("tinyllama-py", 1024)], perplexities[("tinyllama-py-1k", 1024)]
    assert all(math.isfinite(p) and p > 1 for p in perplexities.values())
    # Trained at 1024, more context helps it; the base sample, trained at 256, gets worse there.
    assert long < perplexities[("tinyllama-py-1k", 256)]
    assert base > perplexities[("tinyllama-py", 256)]
    assert long < base
