"""int8 for onnxruntime: lower attention to plain ops, export, quantize weights, check the result.

Contract:
- `lower_attention(gm)` is an exact rewrite, used only on a copy of the graph right before ONNX
  export: every `aten.scaled_dot_product_attention` becomes matmul -> scale -> (+ bias) ->
  softmax -> matmul. Outputs agree with the SDPA graph to fp32 rounding (1e-5 on small models)
  at every position whose attention row keeps at least one key. Returns how many it lowered.
- `export_int8(gm, example_inputs, dynamic_shapes, path)` lowers attention on a deep copy of
  `gm`, exports it to ONNX (`export_onnx`) in a temporary folder, quantizes it with
  onnxruntime's dynamic quantization (weights int8 once, activations uint8 per call; QInt8
  per-channel by default), and moves the result into place as `path`, plus `path` + ".data"
  when the weights go to external data (by default only when the fp32 export reaches 2 GiB, the
  protobuf limit). `gm` is not modified. Returns an `Int8Export` listing every file to ship.
- `OrtModule(path, threads)` is an `nn.Module` whose `forward(**inputs)` runs the ONNX file in
  onnxruntime and returns one torch tensor, so `quality.evaluate` and `measure` take it like any
  model: the quality of an int8 model is measured in onnxruntime, never assumed.
- `verify_int8(path, reference, input_sets)` compares int8 outputs with the fp32 reference by
  per-token cosine (positions with attention_mask 1) and relative L2 error, and raises
  `VerificationError` when the mean cosine is below `min_cosine` or an output is NaN/inf.
  int8 cannot meet `verify_onnx`'s elementwise tolerances; this is the check for it.

Why lower attention first: the dynamo exporter translates SDPA with a bool mask into MatMul and
Softmax plus IsNaN/Where masking ops that cost about 20 ms per run in onnxruntime at 8x128
(MiniLM, 2 threads); explicit ops with one additive bias per mask avoid them. MatMuls between
two activations (q @ k^T, p @ v) stay fp32: dynamic quantization only quantizes MatMuls with a
constant weight (onnxruntime's MatMulConstBOnly default).

The lowering, for one attention with a bool padding mask:

    before                                   after
    mask: bool[B,1,L,S]                      bias = mul(to_float(logical_not(mask)), finfo.min)
    out = sdpa(q, k, v, mask, scale=s)             # once per mask node, shared by all layers
                                             scores = mul(matmul(q, transpose(k, -2, -1)), s)
                                             p = softmax(add(scores, bias), -1)
                                             out = matmul(p, v)

  - a float mask is added as it is; `is_causal=True` adds the bias of `arange(S) <= arange(L)`
    (top-left aligned, like SDPA) built from the graph's symbolic L and S and combined with the
    mask (logical_and for a bool mask, where for a float one) before it becomes a bias;
  - `enable_gqa=True` repeats each k/v head `H / H_kv` times (unsqueeze -> expand -> flatten,
    the same layout as `repeat_interleave(dim=-3)`);
  - `scale=None` means 1/sqrt(head_dim), as in SDPA.

Masked positions get `finfo(dtype).min` (a large finite negative), not -inf. A row with at least
one key kept is unchanged: exp(min - max) is exactly 0. A row with every key masked (e.g. left
padding under a causal mask) differs from SDPA: torch's SDPA returns zeros there (older backends
NaN), the lowered graph returns the mean of v over all keys — finite, so it cannot spread NaN.
Such rows are padding queries, which no metric reads.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch._guards import detect_fake_mode

from trimformer.errors import TrimformerError, VerificationError
from trimformer.export.onnx import export_onnx, external_files, first_line, ort_session
from trimformer.graph.ops import SDPA
from trimformer.graph.rewrite import args_of, finish, is_op

logger = logging.getLogger(__name__)

aten = torch.ops.aten

WEIGHT_TYPES = ("qint8", "quint8")
# Quantized op types counted in the record (dynamic quantization's building blocks).
_INT8_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger")
# A protobuf cannot exceed 2 GiB; an fp32 export under it quantizes to a single file.
_PROTO_LIMIT = 2**31
# onnxruntime's quantizer logs this on every call; it says nothing about this model.
_QUANTIZER_NOISE = "Please consider to run pre-processing before quantization"
# Provenance notes (meta["trimformer"]) of the nodes lower_attention adds.
LOWERED_FROM = "lower_attention: lowered from "
BIAS_OF = "lower_attention: additive bias of "


# ----------------------------------------------------------------------------- lowering


class _Emitter:
    """Inserts ATen nodes before `site`, each with its fake meta["val"], the module path of `like`
    and a provenance note in meta["trimformer"].

    Unlike `graph.rewrite.annotate`, it takes the fake mode from the graph once, so nodes whose
    only inputs are SymInts (arange of a sequence length) get a value too.
    """

    def __init__(self, graph: fx.Graph, mode: Any, site: fx.Node) -> None:
        self.graph = graph
        self.mode = mode
        self.site = site  # insert before this node
        self.like = site  # copy the module path of this node
        self.note = ""

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.site):
            node = self.graph.call_function(target, args, kwargs)
        vals_args, vals_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.mode:
            node.meta["val"] = target(*vals_args, **vals_kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        node.meta["trimformer"] = self.note
        return node

    def at(self, site: fx.Node) -> _Emitter:
        """Emit the next nodes before `site`, as part of the attention `site` computes."""
        self.site = self.like = site
        self.note = f"{LOWERED_FROM}{site.name}"
        return self


def _int(value: Any, what: str, site: fx.Node) -> int:
    """A size that must be static (head counts, head_dim)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt) and value.node.is_constant():
        return int(value)
    raise TrimformerError(
        f"lower_attention: {site.name} has a symbolic {what} ({value}); only batch and sequence "
        "may be dynamic — capture with static head counts and head_dim"
    )


def _repeat_heads(emit: _Emitter, x: fx.Node, times: int) -> fx.Node:
    """[..., Hkv, S, D] -> [..., Hkv * times, S, D], each head repeated in place (GQA)."""
    if times == 1:
        return x
    nd = x.meta["val"].dim()
    x = emit(aten.unsqueeze.default, x, nd - 2)  # [..., Hkv, 1, S, D]
    sizes = [-1] * (nd + 1)
    sizes[nd - 2] = times
    x = emit(aten.expand.default, x, sizes)  # [..., Hkv, times, S, D]
    return emit(aten.flatten.using_ints, x, nd - 3, nd - 2)  # [..., Hkv * times, S, D]


def _bias_from_keep(emit: _Emitter, keep: fx.Node, dtype: torch.dtype) -> fx.Node:
    """bool keep-mask -> additive bias: 0 where kept, finfo(dtype).min where masked."""
    masked = emit(aten.logical_not.default, keep)
    as_float = emit(aten._to_copy.default, masked, dtype=dtype)
    return emit(aten.mul.Tensor, as_float, torch.finfo(dtype).min)


def _causal_keep(emit: _Emitter, q: fx.Node, k: fx.Node) -> fx.Node:
    """[L, S] bool, True where key j <= query i (SDPA's top-left aligned causal mask)."""
    q_len = emit(aten.sym_size.int, q, q.meta["val"].dim() - 2)
    k_len = emit(aten.sym_size.int, k, k.meta["val"].dim() - 2)
    device = q.meta["val"].device
    rows = emit(aten.arange.default, q_len, dtype=torch.int64, device=device)  # [L]
    cols = emit(aten.arange.default, k_len, dtype=torch.int64, device=device)  # [S]
    rows = emit(aten.unsqueeze.default, rows, 1)  # [L, 1]
    return emit(aten.le.Tensor, cols, rows)  # [L, S]


class _Biases:
    """One additive bias per distinct (mask node, causal, dtype), built at its first use."""

    def __init__(self, emit: _Emitter) -> None:
        self.emit = emit
        self.cache: dict[tuple[Any, ...], fx.Node | None] = {}

    def get(self, mask: Any, causal: bool, q: fx.Node, k: fx.Node) -> fx.Node | None:
        dtype = q.meta["val"].dtype
        # Causal biases of layers with the same symbolic (L, S) are one bias.
        sizes = (str(q.meta["val"].shape[-2]), str(k.meta["val"].shape[-2])) if causal else None
        key = (mask, sizes, dtype)
        if key not in self.cache:
            # Shared by every layer: named after the mask (where it was built), not one layer.
            emit = self.emit
            like, note = emit.like, emit.note
            if isinstance(mask, fx.Node):
                emit.like = mask
            emit.note = f"{BIAS_OF}{mask.name if isinstance(mask, fx.Node) else 'causal mask'}"
            try:
                self.cache[key] = self._build(mask, causal, q, k, dtype)
            finally:
                emit.like, emit.note = like, note
        return self.cache[key]

    def _build(
        self, mask: Any, causal: bool, q: fx.Node, k: fx.Node, dtype: torch.dtype
    ) -> fx.Node | None:
        emit = self.emit
        is_bool = isinstance(mask, fx.Node) and (mask.meta["val"].dtype == torch.bool)
        if not causal:
            if mask is None:
                return None
            return _bias_from_keep(emit, mask, dtype) if is_bool else mask
        keep = _causal_keep(emit, q, k)
        if mask is None:
            return _bias_from_keep(emit, keep, dtype)
        if is_bool:
            return _bias_from_keep(emit, emit(aten.logical_and.default, mask, keep), dtype)
        # where, not add: adding two finfo.min biases would overflow to -inf.
        return emit(aten.where.ScalarOther, keep, mask, torch.finfo(dtype).min)


def lower_attention(gm: fx.GraphModule) -> int:
    """Replace every SDPA node with explicit matmul/softmax ops, in place; returns the count.

    The graph must come from torch.export (nodes carry meta["val"]). See the module docstring
    for the exact semantics, including rows whose keys are all masked.
    """
    sites = [n for n in gm.graph.nodes if is_op(n, SDPA)]
    if not sites:
        return 0
    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    if mode is None:
        raise TrimformerError(
            "lower_attention: the graph's inputs carry no fake values (meta['val']); capture it "
            "with torch.export (trimformer.graph.capture) before lowering attention"
        )
    emit = _Emitter(gm.graph, mode, sites[0])
    biases = _Biases(emit)
    for site in sites:
        emit.at(site)
        a = args_of(site)
        q, k, v = a["query"], a["key"], a["value"]
        if float(a.get("dropout_p", 0.0)) != 0.0:
            raise TrimformerError(
                f"lower_attention: {site.name} has dropout_p={a['dropout_p']}; the graph was "
                "captured in training mode — call model.eval() and capture again"
            )
        q_val, k_val = q.meta["val"], k.meta["val"]
        head_dim = _int(q_val.shape[-1], "head_dim", site)
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        bias = biases.get(a.get("attn_mask"), bool(a.get("is_causal", False)), q, k)
        if a.get("enable_gqa", False):
            heads = _int(q_val.shape[-3], "query head count", site)
            kv_heads = _int(k_val.shape[-3], "key/value head count", site)
            k = _repeat_heads(emit, k, heads // kv_heads)
            v = _repeat_heads(emit, v, heads // kv_heads)

        # [..., L, D] @ [..., D, S] -> [..., L, S] -> softmax over S -> @ [..., S, Dv]
        scores = emit(aten.matmul.default, q, emit(aten.transpose.int, k, -2, -1))
        scores = emit(aten.mul.Tensor, scores, scale)
        if bias is not None:
            scores = emit(aten.add.Tensor, scores, bias)
        probs = emit(aten.softmax.int, scores, -1)
        out = emit(aten.matmul.default, probs, v)
        site.replace_all_uses_with(out)
        gm.graph.erase_node(site)
    finish(gm)
    logger.info("lowered %d scaled_dot_product_attention node(s) to matmul/softmax", len(sites))
    return len(sites)


# ----------------------------------------------------------------------------- export


@dataclass(frozen=True)
class Int8Export:
    """What `export_int8` wrote: the files to ship and what the quantized graph is made of."""

    path: Path
    files: tuple[Path, ...]
    weight_type: str  # "qint8" | "quint8"
    per_channel: bool
    lowered_attention: int  # SDPA nodes lowered before export
    node_count: int
    op_histogram: tuple[tuple[str, int], ...]  # (op_type, count), most frequent first
    fp32_bytes: int  # the fp32 ONNX export, graph + weights
    int8_bytes: int  # the quantized files, together
    export_seconds: float
    quantize_seconds: float

    @property
    def seconds(self) -> float:
        return self.export_seconds + self.quantize_seconds

    def count(self, op_type: str) -> int:
        """How many nodes of `op_type` (e.g. "MatMulInteger") the quantized graph holds."""
        return dict(self.op_histogram).get(op_type, 0)

    @property
    def int8_ops(self) -> dict[str, int]:
        """Counts of DynamicQuantizeLinear, MatMulInteger and ConvInteger."""
        return {op: self.count(op) for op in _INT8_OPS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "lowered_attention": self.lowered_attention,
            "node_count": self.node_count,
            "op_histogram": dict(self.op_histogram),
            "int8_ops": self.int8_ops,
            "fp32_bytes": self.fp32_bytes,
            "int8_bytes": self.int8_bytes,
            "export_seconds": self.export_seconds,
            "quantize_seconds": self.quantize_seconds,
        }


def export_int8(
    gm: fx.GraphModule,
    example_inputs: Mapping[str, Tensor],
    dynamic_shapes: Mapping[str, Any] | None,
    path: Path,
    per_channel: bool = True,
    weight_type: str = "qint8",
    external_data: bool | None = None,
) -> Int8Export:
    """Lower attention on a copy of `gm`, export it to ONNX, quantize it dynamically to `path`.

    Everything is written in a temporary folder next to `path` and moved into place at the end,
    so a failure leaves no half-written model. `weight_type` "quint8" exists for comparison (it
    suits CPUs without VNNI; on this project's machines it is slower than fp32). `external_data`
    None decides by size (external from 2 GiB of fp32 weights on); True/False force it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in WEIGHT_TYPES:
        raise TrimformerError(
            f"export_int8: unknown weight_type {weight_type!r}; use one of {WEIGHT_TYPES} "
            "(qint8 per-channel is the accurate, fast default)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lowered = copy.deepcopy(gm)
    count = lower_attention(lowered)

    with tempfile.TemporaryDirectory(prefix=".trimformer-int8-", dir=path.parent) as tmp:
        fp32 = export_onnx(lowered, example_inputs, dynamic_shapes, Path(tmp) / "fp32.onnx")
        del lowered
        fp32_bytes = sum(f.stat().st_size for f in fp32.files)
        staged = Path(tmp) / path.name  # external data, if any, is named after this file
        external = (fp32_bytes >= _PROTO_LIMIT) if external_data is None else external_data
        start = time.perf_counter()
        try:
            with _quiet_quantizer():
                quantize_dynamic(
                    fp32.path,
                    staged,
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8 if weight_type == "qint8" else QuantType.QUInt8,
                    use_external_data_format=external,
                )
        except Exception as exc:
            raise TrimformerError(
                f"onnxruntime could not quantize the ONNX export of {path.name}: "
                f"{type(exc).__name__}: {first_line(exc)}; export fp32 with "
                "`trimformer.export.onnx.export_onnx` and check it loads in onnxruntime"
            ) from exc
        quantize_seconds = time.perf_counter() - start
        graph = onnx.load(str(staged), load_external_data=False)
        staged_files = [staged, *external_files(graph, staged.parent)]
        missing = [f.name for f in staged_files if not f.is_file()]
        if missing:
            raise TrimformerError(
                f"the quantized model of {path.name} references {missing}, which the quantizer "
                "did not write; re-run export_int8 (report it if it repeats)"
            )
        files = []
        for f in staged_files:
            os.replace(f, path.parent / f.name)
            files.append(path.parent / f.name)

    histogram = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in graph.graph.node
    )
    record = Int8Export(
        path=path,
        files=tuple(files),
        weight_type=weight_type,
        per_channel=per_channel,
        lowered_attention=count,
        node_count=len(graph.graph.node),
        op_histogram=tuple(histogram.most_common()),
        fp32_bytes=fp32_bytes,
        int8_bytes=sum(f.stat().st_size for f in files),
        export_seconds=fp32.export_seconds,
        quantize_seconds=quantize_seconds,
    )
    logger.info(
        "int8 (%s%s) export to %s: %.1f MB -> %.1f MB in %.1f s, %s",
        weight_type,
        " per-channel" if per_channel else "",
        path,
        fp32_bytes / 1e6,
        record.int8_bytes / 1e6,
        record.seconds,
        record.int8_ops,
    )
    return record


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's per-call pre-processing advice (logged on the root logger)."""
    root = logging.getLogger()
    drop = _DropMessage(_QUANTIZER_NOISE)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ----------------------------------------------------------------------------- running


class OrtModule(torch.nn.Module):
    """An ONNX file run by onnxruntime behind the model calling convention: forward(**inputs).

    Inputs are torch tensors with the names the model was exported with; the first output comes
    back as a CPU torch tensor. There are no parameters and nothing to train: it is always in
    eval mode, and it cannot be deep-copied (the session holds native state).
    """

    def __init__(self, path: Path, threads: int = 2) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = threads
        self.session = ort_session(self.path, threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name
        self.train(False)

    def forward(self, **inputs: Tensor) -> Tensor:
        if sorted(inputs) != sorted(self.input_names):
            raise TrimformerError(
                f"{self.path.name} takes inputs {list(self.input_names)}, got {sorted(inputs)}; "
                "pass the keyword names the model was exported with"
            )
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        try:
            out = self.session.run([self.output_name], feeds)[0]
        except Exception as exc:
            shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
            raise TrimformerError(
                f"onnxruntime failed to run {self.path} at input shape {shape}: "
                f"{type(exc).__name__}: {first_line(exc)}; the shape may be outside the "
                "exported dynamic range"
            ) from exc
        return torch.from_numpy(np.ascontiguousarray(out))

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}"


# ----------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Int8ShapeCheck:
    """Agreement of int8 outputs with the reference at one input shape, over real tokens."""

    shape: str  # the first input's shape, e.g. "3x11"
    tokens: int  # positions compared (attention_mask 1, or all)
    cosine_min: float
    cosine_mean: float
    rel_l2: float  # ||int8 - ref|| / ||ref|| over the compared positions


@dataclass(frozen=True)
class Int8Check:
    """A passed int8 verification: the file, the threshold, and the agreement per input set."""

    path: Path
    min_cosine: float  # the threshold the mean per-token cosine had to reach
    shapes: tuple[Int8ShapeCheck, ...]

    @property
    def cosine_mean(self) -> float:
        """Mean per-token cosine over all compared tokens of all input sets."""
        tokens = sum(s.tokens for s in self.shapes)
        return sum(s.cosine_mean * s.tokens for s in self.shapes) / max(tokens, 1)

    @property
    def cosine_min(self) -> float:
        return min((s.cosine_min for s in self.shapes), default=1.0)

    @property
    def rel_l2(self) -> float:
        """The worst input set's relative L2 error."""
        return max((s.rel_l2 for s in self.shapes), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "min_cosine": self.min_cosine,
            "cosine_mean": self.cosine_mean,
            "cosine_min": self.cosine_min,
            "rel_l2": self.rel_l2,
            "shapes": [
                {
                    "shape": s.shape,
                    "tokens": s.tokens,
                    "cosine_min": s.cosine_min,
                    "cosine_mean": s.cosine_mean,
                    "rel_l2": s.rel_l2,
                }
                for s in self.shapes
            ],
        }


def verify_int8(
    path: Path,
    reference: Callable[..., Tensor],
    input_sets: Sequence[Mapping[str, Tensor]],
    min_cosine: float = 0.95,
    threads: int = 2,
    model: Callable[..., Tensor] | None = None,
) -> Int8Check:
    """Check an int8 program against the fp32 `reference` on every input set; raise if it drifts.

    The program is the ONNX file at `path` run in onnxruntime, or `model` when given (the torch
    int8 program loaded from `path`; `path` then only names it in messages).
    Per input set: the per-token cosine (over the last dim) between the int8 output and
    `reference(**inputs)` at the positions where `attention_mask` is 1 (every position when
    there is no mask), and the relative L2 error there. Raises `VerificationError` on the first
    set whose mean cosine is below `min_cosine`, whose shape differs, or whose int8 output holds
    NaN/inf anywhere (pad positions included: a mean pool would spread them).
    """
    if not input_sets:
        raise TrimformerError(
            f"verify_int8({path}) was given no input sets; pass at least one, ideally at shapes "
            "other than the traced one"
        )
    path = Path(path)
    if model is None:
        model = OrtModule(path, threads)
    checks = []
    for inputs in input_sets:
        shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
        with torch.no_grad():
            got = model(**inputs).double()
        with torch.no_grad():
            want_t = reference(**inputs)
        if not isinstance(want_t, Tensor):
            raise TrimformerError(
                f"the reference for {path} returned {type(want_t).__name__}, not a tensor; "
                "wrap the model so forward returns one tensor"
            )
        want = want_t.detach().cpu().double()
        checks.append(_agreement(got, want, inputs.get("attention_mask"), path, shape))
        check = checks[-1]
        if check.cosine_mean < min_cosine:
            raise VerificationError(
                f"{path} at input shape {shape}: int8 vs reference per-token cosine mean "
                f"{check.cosine_mean:.4f} < {min_cosine} (min {check.cosine_min:.4f}, rel L2 "
                f"{check.rel_l2:.3g}, {check.tokens} tokens); the file is not this model or "
                "quantization broke it — re-export it from this model (export_int8 with "
                "qint8 per-channel, or export_int8_program for torch), or ship fp32"
            )
        logger.info(
            "verified int8 %s at %s: cosine mean %.4f min %.4f, rel L2 %.3g",
            path.name,
            shape,
            check.cosine_mean,
            check.cosine_min,
            check.rel_l2,
        )
    return Int8Check(path=path, min_cosine=min_cosine, shapes=tuple(checks))


def _agreement(
    got: Tensor, want: Tensor, mask: Tensor | None, path: Path, shape: str
) -> Int8ShapeCheck:
    """Per-token cosine and relative L2 of one output pair; raise on shape or NaN/inf trouble."""
    if got.shape != want.shape:
        raise VerificationError(
            f"{path} at input shape {shape}: int8 output shape {tuple(got.shape)} != "
            f"reference {tuple(want.shape)}; the file is not this model — re-export it"
        )
    bad = int((~torch.isfinite(got)).sum())
    if bad:
        raise VerificationError(
            f"{path} at input shape {shape}: {bad} NaN/inf values in the int8 output; the "
            "quantized graph is broken — re-export it with export_int8 and check the fp32 export "
            "with verify_onnx"
        )
    tokens_got = got.reshape(-1, got.shape[-1]) if got.dim() > 1 else got.reshape(1, -1)
    tokens_want = want.reshape(tokens_got.shape)
    if (mask is not None) and (got.dim() >= 3) and (tuple(mask.shape) == tuple(got.shape[:2])):
        keep = mask.reshape(-1).bool()
        tokens_got, tokens_want = tokens_got[keep], tokens_want[keep]
    if not bool(torch.isfinite(tokens_want).all()):
        raise VerificationError(
            f"{path} at input shape {shape}: the reference output holds NaN/inf at real "
            "positions; fix the reference model before comparing int8 with it"
        )
    if tokens_got.shape[0] == 0:
        raise TrimformerError(
            f"input set at shape {shape} has no real tokens (attention_mask all 0); pass inputs "
            "with at least one real token per set"
        )
    cos = F.cosine_similarity(tokens_got, tokens_want, dim=-1)
    rel = float(torch.linalg.vector_norm(tokens_got - tokens_want)) / max(
        float(torch.linalg.vector_norm(tokens_want)), 1e-30
    )
    return Int8ShapeCheck(
        shape=shape,
        tokens=int(cos.numel()),
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        rel_l2=rel,
    )
