"""Export a module to ONNX (dynamo exporter) and verify it with onnxruntime.

Contract:
- `export_onnx(module, example_inputs, dynamic_shapes, path)` writes `path` (the graph) and, with
  external data, `path` + ".data" (the weights); ship both. Inputs keep their keyword names, the
  one output is named "output". Returns an `OnnxExport` record.
- `verify_onnx(path, reference, input_sets)` runs the ONNX file in onnxruntime (CPU) on every input
  set and compares with `reference(**inputs)`; it raises `VerificationError` on the first input set
  whose outputs disagree beyond `atol + rtol * |reference|`, or that is NaN/inf where the
  reference is not (or the reverse). Returns an `OnnxCheck` with the differences per shape.
- `ort_session(path, threads)` builds the onnxruntime session the checks and benchmarks use.

The dynamo exporter decomposes `aten.scaled_dot_product_attention` into MatMul/Softmax plus
IsNaN/Where masking ops; it is correct, though not always faster in onnxruntime (measure it).
trimformer's own ops (`trimformer.kernels`, e.g. the sparse-attention pass's local attention) are
translated by the table `trimformer.kernels.onnx_translation_table()`, always passed to the
exporter; `custom_translation_table` adds to (or overrides) it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import Tensor

from trimformer.errors import TrimformerError, VerificationError
from trimformer.kernels import onnx_translation_table

logger = logging.getLogger(__name__)

OUTPUT_NAME = "output"

# Exporter noise that says nothing about the model being exported. Matched by message so any
# other warning still reaches the user; errors are exceptions and are never filtered.
_NOISY_WARNINGS = (
    # `ep.module()` GraphModules report training=True and refuse .eval(); their ops are fixed.
    # Eager modules in training mode are rejected before export, so this hides nothing.
    r"Exporting a model while it is in training mode",
    # pytree deprecation raised while the exporter copies treespecs.
    r".*isinstance\(treespec, LeafSpec\)",
    # Two inputs sharing one Dim give two identical axis names; one is kept.
    r".*The axis name: .* will not be used",
)
# "torchvision is not installed. Skipping torchvision::nms" and friends, one line per op.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the graph file, every file to ship, and the graph's make-up."""

    path: Path
    files: tuple[Path, ...]
    node_count: int
    op_histogram: tuple[tuple[str, int], ...]  # (op_type, count), most frequent first
    export_seconds: float

    def top_ops(self, n: int = 10) -> dict[str, int]:
        """The `n` most frequent op types with their counts."""
        return dict(self.op_histogram[:n])

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "node_count": self.node_count,
            "op_histogram": dict(self.op_histogram),
            "export_seconds": self.export_seconds,
        }


@dataclass(frozen=True)
class ShapeCheck:
    """Differences between onnxruntime and the reference at one input shape."""

    shape: str  # the first input's shape, e.g. "3x11"
    max_abs_diff: float
    max_rel_diff: float  # max |ort - ref| / max(|ref|, atol), so near-zero refs do not blow up


@dataclass(frozen=True)
class OnnxCheck:
    """A passed verification: the file, the tolerances, and the differences per input set."""

    path: Path
    atol: float
    rtol: float
    shapes: tuple[ShapeCheck, ...]

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.shapes), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "atol": self.atol,
            "rtol": self.rtol,
            "shapes": [
                {"shape": s.shape, "max_abs_diff": s.max_abs_diff, "max_rel_diff": s.max_rel_diff}
                for s in self.shapes
            ],
        }


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, Tensor],
    dynamic_shapes: Mapping[str, Any] | None,
    path: Path,
    custom_translation_table: Mapping[Callable[..., Any], Callable[..., Any]] | None = None,
) -> OnnxExport:
    """Export `module(**example_inputs)` to ONNX at `path` with the given dynamic dims.

    The module is an eval-mode `nn.Module` or a GraphModule from `ep.module()` (edited or not).
    Parent folders are created; an existing file at `path` is overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = type(module).__name__
    if module.training and not isinstance(module, torch.fx.GraphModule):
        raise TrimformerError(
            f"cannot export {name} to ONNX: it is in training mode, which would bake dropout "
            "into the graph; call module.eval() before exporting"
        )
    start = time.perf_counter()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                module,
                (),
                f=path,
                kwargs=dict(example_inputs),
                dynamo=True,
                dynamic_shapes=dict(dynamic_shapes) if dynamic_shapes is not None else None,
                input_names=list(example_inputs),
                output_names=[OUTPUT_NAME],
                external_data=True,
                verbose=False,
                custom_translation_table={
                    **onnx_translation_table(),
                    **dict(custom_translation_table or {}),
                },
            )
    except Exception as exc:
        raise TrimformerError(
            f"ONNX export of {name} to {path} failed: {type(exc).__name__}: {first_line(exc)}; "
            "check that the module exports with torch.export first (trimformer.export.pt2."
            "export_program) — an op without an ONNX translation needs a custom_translation_table"
        ) from exc
    seconds = time.perf_counter() - start

    graph = onnx.load(str(path), load_external_data=False)
    files = (path, *external_files(graph, path.parent))
    histogram = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in graph.graph.node
    )
    record = OnnxExport(
        path=path,
        files=files,
        node_count=len(graph.graph.node),
        op_histogram=tuple(histogram.most_common()),
        export_seconds=seconds,
    )
    logger.info(
        "exported %s to %s in %.1f s: %d nodes, top ops %s",
        name,
        path,
        seconds,
        record.node_count,
        record.top_ops(5),
    )
    return record


def ort_session(path: Path, threads: int = 2) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session: `threads` intra-op threads, one inter-op, sequential."""
    path = Path(path)
    if not path.is_file():
        raise TrimformerError(
            f"no ONNX file at {path}; export it first (`trimformer export <run> --format onnx`)"
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # Warnings only (e.g. unused initializers removed); errors still raise.
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise TrimformerError(
            f"onnxruntime cannot load {path}: {type(exc).__name__}: {first_line(exc)}; "
            "check that its .data file sits next to it, or re-export it"
        ) from exc


def verify_onnx(
    path: Path,
    reference: Callable[..., Tensor],
    input_sets: Sequence[Mapping[str, Tensor]],
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int = 2,
) -> OnnxCheck:
    """Check the ONNX file against `reference` on every input set; raise on any disagreement.

    Elementwise rule: |ort - ref| <= atol + rtol * |ref| wherever the reference is finite, and
    NaN/inf exactly where the reference has them. Input sets should include shapes other than
    the traced one and padded attention-mask rows.
    """
    if not input_sets:
        raise TrimformerError(
            f"verify_onnx({path}) was given no input sets; pass at least one, ideally at shapes "
            "other than the traced one"
        )
    path = Path(path)
    session = ort_session(path, threads)
    expected_names = [i.name for i in session.get_inputs()]
    checks = []
    for inputs in input_sets:
        shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
        if sorted(inputs) != sorted(expected_names):
            raise TrimformerError(
                f"input set at shape {shape} has inputs {sorted(inputs)} but {path} expects "
                f"{expected_names}; pass the same keyword names the model was exported with"
            )
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        try:
            got = session.run(None, feeds)[0]
        except Exception as exc:
            raise VerificationError(
                f"onnxruntime failed to run {path} at shape {shape}: {type(exc).__name__}: "
                f"{first_line(exc)}; the shape may be outside the exported dynamic range"
            ) from exc
        with torch.no_grad():
            want_t = reference(**inputs)
        if not isinstance(want_t, Tensor):
            raise TrimformerError(
                f"the reference for {path} returned {type(want_t).__name__}, not a tensor; "
                "wrap the model so forward returns one tensor"
            )
        want = want_t.detach().cpu().double().numpy()
        checks.append(_compare(np.asarray(got, dtype=np.float64), want, path, shape, atol, rtol))
        logger.info(
            "verified %s at %s: max abs diff %.3g, max rel diff %.3g",
            path.name,
            shape,
            checks[-1].max_abs_diff,
            checks[-1].max_rel_diff,
        )
    return OnnxCheck(path=path, atol=atol, rtol=rtol, shapes=tuple(checks))


def _compare(
    got: np.ndarray, want: np.ndarray, path: Path, shape: str, atol: float, rtol: float
) -> ShapeCheck:
    """Compare one output pair; raise VerificationError when they disagree."""
    if got.shape != want.shape:
        raise VerificationError(
            f"{path} at input shape {shape}: onnxruntime output shape {got.shape} != reference "
            f"{want.shape}; the ONNX file is not this model — re-export it"
        )
    # NaN where the reference has NaN, inf of the same sign where it has inf, and nowhere else.
    nan_mismatch = np.isnan(got) != np.isnan(want)
    inf_mismatch = (np.isinf(got) | np.isinf(want)) & (got != want)
    mismatch = nan_mismatch | inf_mismatch
    if mismatch.any():
        raise VerificationError(
            f"{path} at input shape {shape}: {int((~np.isfinite(got)).sum())} non-finite values "
            f"in the onnxruntime output vs {int((~np.isfinite(want)).sum())} in the reference, "
            f"{int(mismatch.sum())} in different places; inspect the masking ops (fully padded "
            "rows) in the exported graph"
        )
    finite = np.isfinite(want)
    diff = np.abs(got[finite] - want[finite])
    ref = np.abs(want[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(ref, atol)).max()) if diff.size else 0.0
    over = diff > atol + rtol * ref
    if over.any():
        raise VerificationError(
            f"{path} disagrees with the PyTorch program at input shape {shape}: max abs diff "
            f"{max_abs:.3g}, max rel diff {max_rel:.3g}, {int(over.sum())}/{diff.size} values "
            f"beyond atol={atol:g} rtol={rtol:g}; the export changed the computation — "
            "re-export, or compare with the eager model to find the pass at fault"
        )
    return ShapeCheck(shape=shape, max_abs_diff=max_abs, max_rel_diff=max_rel)


def external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """The external-data files the graph's initializers point at, in first-use order."""
    seen: dict[Path, None] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    seen[folder / entry.value] = None
    return list(seen)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Drop the exporter's known-harmless warnings and log lines for the duration of an export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        for message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
