"""Latency measurement on a tiny random-weight BERT in torch and onnxruntime.

The machine is shared and noisy: only large effects (2x the work) are asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.export import Dim
from transformers import BertConfig, BertModel

from trimformer.cost_model.measure import (
    Latency,
    measure_interleaved,
    ort_runner,
    speedup,
    torch_runner,
)
from trimformer.errors import TrimformerError
from trimformer.export.onnx import export_onnx, ort_session


class Encoder(torch.nn.Module):
    """forward(input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
            max_position_embeddings=64,
        )
        self.bert = BertModel(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def inputs(batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 100, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return Encoder().eval()


@pytest.fixture(scope="module")
def onnx_path(encoder: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    batch, seq = Dim("batch", min=1, max=16), Dim("seq", min=2, max=64)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    path = tmp_path_factory.mktemp("measure") / "model.onnx"
    return export_onnx(encoder, inputs(), shapes, path).path


def test_measure_interleaved_reports_stats_and_conditions(
    encoder: torch.nn.Module, onnx_path: Path
) -> None:
    threads_before = torch.get_num_threads()
    result = measure_interleaved(
        {
            "torch": torch_runner(encoder, inputs()),
            "ort": ort_runner(ort_session(onnx_path, threads=2), inputs()),
        },
        warmup=2,
        repeats=5,
        rounds=2,
        threads=2,
        shape="2x16",
        runtime={"torch": "torch", "ort": "onnxruntime"},
    )
    assert torch.get_num_threads() == threads_before
    assert set(result) == {"torch", "ort"}
    for name, runtime in (("torch", "torch"), ("ort", "onnxruntime")):
        lat = result[name]
        assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
        assert (lat.runs, lat.shape, lat.threads, lat.runtime) == (10, "2x16", 2, runtime)
        assert lat.to_dict()["median_ms"] == lat.median_ms


def test_speedup_of_runner_doing_twice_the_work_is_clearly_below_one(
    encoder: torch.nn.Module,
) -> None:
    once = torch_runner(encoder, inputs())

    def twice() -> object:
        once()
        return once()

    result = measure_interleaved(
        {"once": once, "twice": twice},
        repeats=8,
        rounds=3,
        threads=1,
        shape="2x16",
        runtime="torch",
    )
    assert speedup(result["once"], result["twice"]) < 0.8
    assert speedup(result["twice"], result["once"]) > 1.25


def test_runners_take_turns_and_the_order_rotates_each_round() -> None:
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    measure_interleaved(
        runners, warmup=1, repeats=2, rounds=2, threads=1, shape="1x2", runtime="torch"
    )
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "b", "a"]


def test_speedup_refuses_latencies_from_different_conditions() -> None:
    a = Latency(10.0, 9.0, 11.0, 30, "8x128", 2, "torch")
    with pytest.raises(TrimformerError, match="cannot compare"):
        speedup(a, Latency(5.0, 4.0, 6.0, 30, "8x256", 2, "torch"))
    with pytest.raises(TrimformerError, match="cannot compare"):
        speedup(a, Latency(5.0, 4.0, 6.0, 30, "8x128", 4, "torch"))
    assert speedup(a, Latency(5.0, 4.0, 6.0, 30, "8x128", 2, "onnxruntime")) == 2.0


def test_measure_interleaved_rejects_bad_arguments() -> None:
    runners = {"a": lambda: None, "b": lambda: None}
    with pytest.raises(TrimformerError, match=r"no runtime given for runner\(s\) \['b'\]"):
        measure_interleaved(runners, shape="1x2", runtime={"a": "torch"})
    with pytest.raises(TrimformerError, match="unknown runtime"):
        measure_interleaved(runners, shape="1x2", runtime="tensorrt")
    with pytest.raises(TrimformerError, match="repeats >= 1"):
        measure_interleaved(runners, repeats=0, shape="1x2", runtime="torch")


def test_ort_runner_rejects_inputs_the_session_does_not_take(onnx_path: Path) -> None:
    with pytest.raises(TrimformerError, match="do not match the session's inputs"):
        ort_runner(ort_session(onnx_path), {"input_ids": inputs()["input_ids"]})
