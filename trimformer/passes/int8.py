"""int8 — dynamic int8 quantization of the exported programs (lossy; an export stage).

This entry does not edit the graph: it marks the run so that, after the structural passes, each
runtime gets an int8 program of the edited graph, verified against it by per-token cosine, with
its quality and latency measured in that runtime:

- onnxruntime (`model.int8.onnx`): the ONNX export with attention lowered to matmul -> softmax
  -> matmul (no masking detour), quantized by onnxruntime's dynamic quantization (int8 weights,
  per-channel by default; activations quantized at run time).
- torch (`model.int8.pt2`): torchao's int8 dynamic activation x int8 weight on every linear,
  exported as a plain-tensor program (`export/int8_torch.py`). Its speed needs `torch.compile`
  (inductor, a C++ compiler): eager it is about 1.4x fp32 on MiniLM, compiled about 2.3x. The
  run times it compiled (and eager, reported beside it); `model.pt2` stays fp32.

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
        "qint8",
        description="onnxruntime only: qint8 is fast on x86 CPUs; quint8 measured slower than "
        "fp32 here (torch always uses symmetric int8 weights)",
    )
    per_channel: bool = Field(
        True, description="one weight scale per output channel (else one per tensor)"
    )
    compile: bool = Field(
        True, description="torch: time and serve the int8 program under torch.compile"
    )


def mark_int8(gm: fx.GraphModule, structure: Structure, config: Int8Config, ctx: Context) -> dict:
    return {
        "stage": "export",
        "programs": {"onnxruntime": "model.int8.onnx", "torch": "model.int8.pt2"},
        "graph_changed": False,
    }


SPEC = PassSpec(
    name="int8",
    summary="dynamic int8 of the exported programs: onnxruntime QInt8 (model.int8.onnx), "
    "torchao + torch.compile (model.int8.pt2)",
    exactness="lossy",
    config=Int8Config,
    knobs={
        "weight_type": "qint8 or quint8 (onnxruntime)",
        "per_channel": "per-channel weight scales",
        "compile": "torch.compile the torch int8 program",
    },
    apply=mark_int8,
    paper="onnxruntime dynamic quantization (QInt8 per-channel); torchao "
    "Int8DynamicActivationInt8WeightConfig",
)
