"""int8 — dynamic int8 quantization of the exported ONNX program (lossy; an export stage).

This entry does not edit the graph: it marks the run so that, after the structural passes, the
ONNX program is exported with attention lowered to matmul -> softmax -> matmul (no masking
detour for onnxruntime) and quantized with onnxruntime's dynamic quantization (int8 weights,
per-channel by default; activations quantized at run time). The quantized program is written as
`model.int8.onnx`, verified against the PyTorch program by per-token cosine, and its quality and
latency are measured in onnxruntime. The `.pt2` program stays fp32: torch-runtime int8 (torchao,
which needs torch.compile for its speed) is not implemented.

Composes with every structural pass: it comes last in a recipe.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import fx

from trimformer.graph.structure import Structure
from trimformer.passes.base import Context, PassConfig, PassSpec


class Int8Config(PassConfig):
    weight_type: Literal["qint8", "quint8"] = Field(
        "qint8", description="qint8 is fast on x86 CPUs; quint8 measured slower than fp32 here"
    )
    per_channel: bool = Field(True, description="one scale per output channel of each weight")


def mark_int8(gm: fx.GraphModule, structure: Structure, config: Int8Config, ctx: Context) -> dict:
    return {"stage": "export", "program": "model.int8.onnx", "graph_changed": False}


SPEC = PassSpec(
    name="int8",
    summary="dynamic int8 quantization of the ONNX export (onnxruntime; the .pt2 stays fp32)",
    exactness="lossy",
    config=Int8Config,
    knobs={"weight_type": "qint8 or quint8", "per_channel": "per-channel weight scales"},
    apply=mark_int8,
    paper="onnxruntime dynamic quantization (QInt8 per-channel)",
)
