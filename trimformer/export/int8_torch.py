"""int8 for the torch runtime: torchao dynamic int8 activations x int8 per-channel weights.

Contract:
- `torchao_missing()` is None when torchao (0.18) imports, else one line saying why and how to
  install it. Every other function raises `TrimformerError` with that line when it is missing.
- `quantize_linears(gm, per_channel)` rewrites a captured graph in place: every linear whose
  weight is a parameter of the graph becomes a call of an `nn.Linear` submodule whose weight is
  torchao's `Int8Tensor` (symmetric int8, one scale per output channel, or one per tensor),
  carrying the recipe for its activations (symmetric int8, one scale per token, computed at run
  time). Returns a `QuantizedLinears` record. The fp32 weights the graph no longer reads are freed.
- `export_int8_program(gm, example_inputs, dynamic_shapes)` quantizes a deep copy of `gm` and
  re-exports it with `torch.export`: the result is an ExportedProgram made of plain tensors
  (int8 weights, fp32 scales) and ops (torchao's `choose_qparams_affine` / `quantize_affine`,
  `aten._int_mm`, rescaling). `gm` is not modified. It saves with `save_pt2` and loads with
  `load_int8_program`, which registers torchao's ops first and keeps `load_pt2`'s refusal of
  pickled payloads (the tensor subclass is unwrapped before export, so nothing is pickled).
- `compile_for_shape(module, inputs)` is `torch.compile` (inductor, static shapes) plus the first
  call, timed: the int8 program is only fast compiled, and compiling takes tens of seconds.

Why this route. Our graphs call `aten.linear` on `get_attr` parameters. Putting an `Int8Tensor`
straight into such a parameter runs in eager mode, but `torch.export` decomposes `aten.linear`
before the subclass sees it and fails; `F.linear` on an `nn.Linear` reaches the subclass's
`__torch_function__`, and torch's `unwrap_tensor_subclass_parameters` turns the subclass into
plain tensors behind a parametrization, so the exported program stores no subclass.

    before                                       after
    w = get_attr(layer.q.weight)  # fp32 [N,K]   int8_linear_3 = nn.Linear(K, N)
    y = aten.linear(x, w, b)                       .weight = Int8Tensor(qdata int8 [N,K], scale [N])
                                                 y = call_module(int8_linear_3, x)
    GPT-2 Conv1D: addmm(b, x2d, W[K,N]) -> call_module(int8_linear_i, x2d) with weight W^T

MiniLM at 8x128, 1 thread, fp32 eager = 1: the exported int8 program runs 1.37x eager and 2.3x
under torch.compile (fp32 compiled: 1.03x), with embedding cosine 0.996 to the original.
Activations at run time are quantized per token; attention matmuls (q @ k^T, p @ v) stay fp32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from trimformer.errors import TrimformerError
from trimformer.graph.ops import ADDMM, LINEAR
from trimformer.graph.rewrite import args_of, get_param, is_op

logger = logging.getLogger(__name__)

TORCHAO_VERSION = "0.18.0"
SUBMODULE_PREFIX = "int8_linear_"
# torchao's import logs a warning per CUDA-only kernel library it cannot load on a CPU build,
# and torch warns about the enums it registers; neither says anything about this model.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def torchao_missing() -> str | None:
    """None when torchao imports; otherwise why not and what to do."""
    try:
        with _quiet():
            import torchao  # noqa: F401
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return (
            f"torch-runtime int8 needs torchao ({type(exc).__name__}: {exc}); install it with "
            f"`pip install --no-deps torchao=={TORCHAO_VERSION}` or use --runtime onnxruntime"
        )
    return None


def _require_torchao() -> None:
    missing = torchao_missing()
    if missing:
        raise TrimformerError(missing)


@dataclass(frozen=True)
class QuantizedLinears:
    """What `quantize_linears` did to one graph."""

    linears: int  # aten.linear nodes now running int8
    conv1d: int  # GPT-2 addmm (Conv1D) nodes now running int8
    skipped: tuple[str, ...]  # linear-like nodes left fp32, with why
    per_channel: bool
    fp32_weight_bytes: int  # the weights replaced
    int8_weight_bytes: int  # their int8 data plus scales

    def to_dict(self) -> dict[str, Any]:
        return {
            "linears": self.linears,
            "conv1d": self.conv1d,
            "skipped": list(self.skipped),
            "per_channel": self.per_channel,
            "fp32_weight_bytes": self.fp32_weight_bytes,
            "int8_weight_bytes": self.int8_weight_bytes,
        }


def _quantized_weight(weight: Tensor, per_channel: bool) -> Tensor:
    """torchao's int8 weight tensor, with the dynamic per-token int8 recipe for activations."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        PerTensor,
    )
    from torchao.quantization.quant_api import (
        _int8_dynamic_activation_int8_weight_quantize_tensor as quantize_tensor,
    )

    # Activations are always per token (PerRow); weights per output channel or per tensor.
    granularity = [PerRow(), PerRow() if per_channel else PerTensor()]
    # set_inductor_config=False: torchao would otherwise change process-wide inductor settings.
    config = Int8DynamicActivationInt8WeightConfig(
        granularity=granularity, set_inductor_config=False
    )
    return quantize_tensor(weight.detach().float().contiguous(), config)


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Tensor | None, Any, str]:
    """(fp32 [N, K] weight, the input node, why not) of a linear-like node."""
    a = args_of(node)
    if is_op(node, LINEAR):
        w, x, bias = a["weight"], a["input"], a.get("bias")
    else:  # addmm(bias, mat1 [M, K], mat2 [K, N]) == linear(mat1, mat2^T, bias) when unscaled
        if (a.get("beta", 1) != 1) or (a.get("alpha", 1) != 1):
            return None, None, f"{node.name}: addmm with beta/alpha != 1"
        w, x, bias = a["mat2"], a["mat1"], a.get("input")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None, None, f"{node.name}: weight is computed, not a parameter"
    if (bias is not None) and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None, None, f"{node.name}: bias is computed, not a parameter"
    weight = get_param(gm, w.target)
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        return None, None, f"{node.name}: weight is {weight.dim()}-D {weight.dtype}"
    return (weight if is_op(node, LINEAR) else weight.t()), x, ""


def quantize_linears(gm: fx.GraphModule, per_channel: bool = True) -> QuantizedLinears:
    """Replace every parameter-weighted linear (and Conv1D addmm) with an int8 nn.Linear, in place.

    The graph stops being an ATen-only graph (call_module nodes): run it, export it, or compile
    it; do not run passes on it afterwards.
    """
    _require_torchao()
    linears = conv1d = 0
    skipped: list[str] = []
    replaced: set[str] = set()  # get_attr targets of the layers now int8
    fp32_bytes = int8_bytes = 0
    with _quiet():
        for i, node in enumerate(
            [n for n in gm.graph.nodes if is_op(n, LINEAR) or is_op(n, ADDMM)]
        ):
            weight, x, why = _weight_of(gm, node)
            if weight is None:
                skipped.append(why)
                continue
            a = args_of(node)
            bias_node = a.get("bias") if is_op(node, LINEAR) else a.get("input")
            weight_node = a["weight"] if is_op(node, LINEAR) else a["mat2"]
            replaced.update(n.target for n in (weight_node, bias_node) if n is not None)
            out_features, in_features = weight.shape
            linear = nn.Linear(in_features, out_features, bias=bias_node is not None)
            qweight = _quantized_weight(weight, per_channel)
            linear.weight = nn.Parameter(qweight, requires_grad=False)
            if bias_node is not None:
                bias = get_param(gm, bias_node.target).detach().float()
                linear.bias = nn.Parameter(bias.clone(), requires_grad=False)
            fp32_bytes += weight.numel() * weight.element_size()
            int8_bytes += qweight.qdata.numel() + qweight.scale.numel() * 4
            name = f"{SUBMODULE_PREFIX}{i}"
            gm.add_submodule(name, linear.eval())
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (x,))
            # Keep the shape value and module path: reports and profiles still name the layer.
            new.meta = dict(node.meta)
            new.meta["trimformer"] = f"int8 (torchao) of {node.name}"
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if is_op(node, LINEAR):
                linears += 1
            else:
                conv1d += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    _free_replaced(gm, replaced)
    if linears + conv1d == 0:
        raise TrimformerError(
            "int8 (torch): the graph has no linear layer with a parameter weight to quantize; "
            "run `trimformer inspect` on the model to see its linears"
        )
    logger.info(
        "int8 (torchao): %d linear + %d Conv1D layers quantized, %d left fp32",
        linears,
        conv1d,
        len(skipped),
    )
    return QuantizedLinears(linears, conv1d, tuple(skipped), per_channel, fp32_bytes, int8_bytes)


def _free_replaced(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the fp32 weights and biases of quantized layers that no get_attr reads any more.

    (Not `remove_unused_parameters`: the int8 submodules' own weights have no get_attr either.)
    A weight still read elsewhere (an embedding tied to the output head) stays.
    """
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still_read:
        mod_path, _, name = target.rpartition(".")
        mod = gm.get_submodule(mod_path) if mod_path else gm
        mod._parameters.pop(name, None)
        mod._buffers.pop(name, None)


@dataclass(frozen=True)
class TorchInt8Export:
    """The exported int8 program and how it was made."""

    program: torch.export.ExportedProgram
    quantized: QuantizedLinears
    op_counts: tuple[tuple[str, int], ...]  # int8 building blocks in the exported graph
    export_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized": self.quantized.to_dict(),
            "op_counts": dict(self.op_counts),
            "export_seconds": round(self.export_seconds, 3),
            "torchao": TORCHAO_VERSION,
        }


def export_int8_program(
    gm: fx.GraphModule,
    example_inputs: Mapping[str, Tensor],
    dynamic_shapes: Mapping[str, Any] | None,
    per_channel: bool = True,
) -> TorchInt8Export:
    """Quantize a copy of `gm` with torchao and export it as a plain-tensor ExportedProgram."""
    from torch._functorch._aot_autograd.subclass_parametrization import (
        unwrap_tensor_subclass_parameters,
    )

    from trimformer.export.pt2 import export_program

    _require_torchao()
    start = time.perf_counter()
    quantized = copy.deepcopy(gm)
    record = quantize_linears(quantized, per_channel)
    with _quiet():
        # Int8Tensor -> (qdata, scale) plain parameters behind a parametrization: export then
        # stores plain tensors, which load_pt2 reads without unpickling a subclass.
        unwrap_tensor_subclass_parameters(quantized)
        program = export_program(quantized, example_inputs, dynamic_shapes)
    counts: dict[str, int] = {}
    for n in program.graph.nodes:
        if n.op == "call_function":
            name = str(n.target)
            if name.startswith("torchao.") or name == "aten._int_mm.default":
                counts[name] = counts.get(name, 0) + 1
    if counts.get("aten._int_mm.default", 0) != record.linears + record.conv1d:
        raise TrimformerError(
            f"int8 (torch): the exported program holds {counts.get('aten._int_mm.default', 0)} "
            f"int8 matmuls for {record.linears + record.conv1d} quantized layers; torchao "
            f"{TORCHAO_VERSION} with torch {torch.__version__} is the tested pair — reinstall "
            "those or use --runtime onnxruntime"
        )
    return TorchInt8Export(
        program, record, tuple(sorted(counts.items())), time.perf_counter() - start
    )


def load_int8_program(path: Path) -> torch.export.ExportedProgram:
    """`load_pt2` for a program that calls torchao's quantization ops (registered first)."""
    from trimformer.export.pt2 import load_pt2

    _require_torchao()
    with _quiet():
        import torchao  # noqa: F401 - registers torch.ops.torchao.*

        return load_pt2(Path(path))


@dataclass(frozen=True)
class Compiled:
    module: Any  # the torch.compile'd callable
    seconds: float  # compile + first call


def compile_for_shape(module: nn.Module, inputs: Mapping[str, Tensor]) -> Compiled:
    """torch.compile (inductor, static shapes) and run once at `inputs`, timed.

    Static shapes: the program is measured and served at one shape; another shape recompiles.
    """
    start = time.perf_counter()
    try:
        with _quiet():
            compiled = torch.compile(module, dynamic=False)
            with torch.inference_mode():
                compiled(**inputs)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise TrimformerError(
            f"torch.compile failed on the int8 program: {type(exc).__name__}: "
            f"{text[0] if text else '(no message)'}; inductor needs a C++ compiler (gcc) on PATH "
            "— install one, or measure without compiling (int8 is slow then)"
        ) from exc
    return Compiled(compiled, time.perf_counter() - start)
