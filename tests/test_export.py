"""Export to .pt2 and ONNX on tiny random-weight Hugging Face models, and the checks failing."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.export import Dim
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from trimformer.errors import TrimformerError, VerificationError
from trimformer.export.onnx import OnnxExport, export_onnx, verify_onnx
from trimformer.export.pt2 import export_program, load_pt2, save_pt2

TRACED = (2, 8)  # batch x seq the programs are captured at; every check runs at other shapes


class TextModel(torch.nn.Module):
    """forward(input_ids, attention_mask) -> one tensor, the calling convention trimformer uses."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return getattr(out, self.output)


@dataclass
class Tiny:
    name: str
    eager: torch.nn.Module
    dynamic_shapes: dict
    program: torch.export.ExportedProgram


def text_inputs(batch: int, seq: int, pad_row: int | None = None, seed: int = 0) -> dict:
    """Random token ids; `pad_row` gets its last third masked out (right padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_row is not None:
        mask[pad_row, seq - max(1, seq // 3) :] = 0
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=g), "attention_mask": mask}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "bert":
        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
            max_position_embeddings=64,
        )
        return TextModel(BertModel(config), "last_hidden_state").eval()
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: exported as explicit expand/reshape
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return TextModel(LlamaForCausalLM(config), "logits").eval()


def dims() -> dict:
    batch, seq = Dim("batch", min=1, max=16), Dim("seq", min=2, max=64)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


@pytest.fixture(scope="module", params=["bert", "llama"])
def tiny(request: pytest.FixtureRequest) -> Tiny:
    eager = build(request.param)
    shapes = dims()
    return Tiny(request.param, eager, shapes, export_program(eager, text_inputs(*TRACED), shapes))


@pytest.fixture(scope="module")
def onnx_export(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    path = tmp_path_factory.mktemp(f"onnx_{tiny.name}") / "model.onnx"
    # The exported GraphModule, as passes would leave it, not the eager model.
    return export_onnx(tiny.program.module(), text_inputs(*TRACED), tiny.dynamic_shapes, path)


@pytest.fixture(scope="module")
def onnx_path(onnx_export: OnnxExport) -> Path:
    return onnx_export.path


def unseen_inputs() -> list[dict]:
    return [text_inputs(3, 11, pad_row=1, seed=1), text_inputs(1, 5, seed=2)]


def test_pt2_round_trip_matches_eager_at_untraced_shape(tiny: Tiny, tmp_path: Path) -> None:
    save_pt2(tiny.program, tmp_path / "model.pt2")
    loaded = load_pt2(tmp_path / "model.pt2").module()
    inputs = text_inputs(3, 11, pad_row=1, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), tiny.eager(**inputs))


def test_reexport_of_exported_module_keeps_outputs_and_dynamic_dims(tiny: Tiny) -> None:
    module = tiny.program.module()
    # ep.module() carries a `_guards_fn` call_module node that re-export must trace through.
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in module.graph.nodes)
    again = export_program(module, text_inputs(*TRACED), tiny.dynamic_shapes).module()
    for inputs in unseen_inputs():
        with torch.no_grad():
            assert torch.equal(again(**inputs), tiny.eager(**inputs))


def test_export_program_wraps_capture_failure() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if input_ids.sum() > 0:  # branches on tensor values: torch.export cannot capture it
                return input_ids * 2
            return attention_mask

    with pytest.raises(TrimformerError, match="torch.export failed on DataDependent"):
        export_program(DataDependent().eval(), text_inputs(*TRACED), dims())


def test_export_program_refuses_eager_module_in_training_mode() -> None:
    with pytest.raises(TrimformerError, match="training mode"):
        export_program(build("bert").train(), text_inputs(*TRACED), dims())


def test_load_pt2_missing_or_corrupt_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TrimformerError, match="no exported program"):
        load_pt2(tmp_path / "absent.pt2")
    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(TrimformerError, match="not a .pt2 archive"):
        load_pt2(tmp_path / "bad.pt2")


class _MakesDirOnUnpickle:
    """Unpickling this runs os.mkdir(path): a stand-in for code a crafted file would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.path),))


def test_load_pt2_refuses_archive_that_needs_unpickling(tiny: Tiny, tmp_path: Path) -> None:
    save_pt2(tiny.program, tmp_path / "model.pt2")
    marker = tmp_path / "code_ran"
    payload = io.BytesIO()
    torch.save(_MakesDirOnUnpickle(marker), payload)
    # Swap the stored example inputs (which plain torch.export.load reads with a
    # weights_only=False fallback) for a pickle that runs code.
    with (
        zipfile.ZipFile(tmp_path / "model.pt2") as src,
        zipfile.ZipFile(tmp_path / "crafted.pt2", "w") as dst,
    ):
        for member in src.namelist():
            data = src.read(member)
            dst.writestr(member, payload.getvalue() if "sample_inputs/" in member else data)
    with pytest.raises(TrimformerError, match="could not load"):
        load_pt2(tmp_path / "crafted.pt2")
    assert not marker.exists()


def test_onnx_export_records_files_and_ops(onnx_export: OnnxExport) -> None:
    record, onnx_path = onnx_export, onnx_export.path
    assert record.files == (onnx_path, onnx_path.with_name("model.onnx.data"))
    assert all(f.is_file() for f in record.files)
    ops = dict(record.op_histogram)
    assert ops["MatMul"] > 0
    assert record.node_count == sum(ops.values())
    assert record.export_seconds > 0


def test_onnx_verifies_at_unseen_shapes_with_padding(tiny: Tiny, onnx_path: Path) -> None:
    check = verify_onnx(onnx_path, tiny.eager, unseen_inputs())
    assert [s.shape for s in check.shapes] == ["3x11", "1x5"]
    assert check.max_abs_diff < 1e-4


def test_verify_onnx_fails_when_reference_differs(tiny: Tiny, onnx_path: Path) -> None:
    def shifted(**inputs: torch.Tensor) -> torch.Tensor:
        return tiny.eager(**inputs) + 1.0

    with pytest.raises(VerificationError, match=r"at input shape 3x11: max abs diff 1"):
        verify_onnx(onnx_path, shifted, unseen_inputs())


def test_verify_onnx_fails_on_nan_the_reference_lacks(tiny: Tiny, onnx_path: Path) -> None:
    def with_nan(**inputs: torch.Tensor) -> torch.Tensor:
        out = tiny.eager(**inputs).clone()
        out[0, 0, 0] = float("nan")
        return out

    with pytest.raises(VerificationError, match="non-finite"):
        verify_onnx(onnx_path, with_nan, unseen_inputs())


def test_verify_onnx_fails_on_onnx_of_another_model(tmp_path: Path) -> None:
    other = build("bert", seed=1)  # same architecture, different weights
    path = tmp_path / "other.onnx"
    export_onnx(other, text_inputs(*TRACED), dims(), path)
    verify_onnx(path, other, unseen_inputs())  # its own reference passes
    with pytest.raises(VerificationError, match="disagrees with the PyTorch program"):
        verify_onnx(path, build("bert", seed=0), unseen_inputs())
