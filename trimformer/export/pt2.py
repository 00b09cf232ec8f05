"""Capture a module with `torch.export` and write/read the `.pt2` program.

Contract:
- `export_program(module, example_inputs, dynamic_shapes)` captures `module(**example_inputs)`
  (keyword tensors only, one tensor out) with `torch.export.export(strict=False)` under
  `torch.no_grad()`. The module may be an eager `nn.Module` (in eval mode) or a GraphModule from
  `ExportedProgram.module()`, edited by passes or not: re-exporting such a module works as is, its
  `_guards_fn` node (the input-shape guard check) is traced through and re-created.
- `save_pt2(program, path)` writes `torch.export.save` output; the file runs with plain torch:
  `torch.export.load(path).module()(**inputs)`.
- `load_pt2(path)` reads it back, refusing archives that would need unrestricted unpickling.
Every failure is a `TrimformerError` saying what failed, where, and what to do next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import trimformer.kernels  # noqa: F401  registers trimformer's custom ops, which programs may hold
from trimformer.errors import TrimformerError

logger = logging.getLogger(__name__)

# Payload file names inside a .pt2 whose loaders call `pickle.loads` / the torchbind unpickler
# directly (torch/export/pt2_archive/_package.py); nothing trimformer writes contains them.
_UNPICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


def export_program(
    module: torch.nn.Module,
    example_inputs: Mapping[str, Tensor],
    dynamic_shapes: Mapping[str, Any] | None,
) -> torch.export.ExportedProgram:
    """Capture `module(**example_inputs)` as an ExportedProgram with the given dynamic dims.

    `dynamic_shapes` maps each input name to `{axis: torch.export.Dim}` (or None for a static
    input). An eager module must be in eval mode: capture fixes dropout and batch-norm behaviour
    into the graph. A GraphModule from `ep.module()` reports `training=True` but its ops were
    fixed at its own capture, so it is accepted as is.
    """
    name = type(module).__name__
    if module.training and not isinstance(module, torch.fx.GraphModule):
        raise TrimformerError(
            f"cannot export {name}: it is in training mode, which would bake dropout into the "
            "graph; call module.eval() before exporting"
        )
    try:
        with torch.no_grad():
            return torch.export.export(
                module,
                (),
                dict(example_inputs),
                strict=False,
                dynamic_shapes=dict(dynamic_shapes) if dynamic_shapes is not None else None,
            )
    except Exception as exc:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in example_inputs.items())
        raise TrimformerError(
            f"torch.export failed on {name} with inputs ({shapes}): "
            f"{type(exc).__name__}: {_first_line(exc)}; check that forward takes exactly these "
            "keyword tensors, returns one tensor, and that the dynamic Dim ranges are ones the "
            "model supports (seq max <= max_position_embeddings, min >= 2)"
        ) from exc


def save_pt2(
    program: torch.export.ExportedProgram, path: Path, extra_files: dict[str, str] | None = None
) -> None:
    """Write `program` to `path` (parents created); the file needs only torch to run, plus
    `import trimformer.kernels` before `torch.export.load` when the program holds trimformer's
    custom ops (sparse-attention's `trimformer::local_attention`).

    `extra_files` are small text entries stored in the archive (trimformer's metadata).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.export.save(program, path, extra_files=extra_files)
    except Exception as exc:
        raise TrimformerError(
            f"could not write the exported program to {path}: {type(exc).__name__}: "
            f"{_first_line(exc)}; check that the folder is writable and has free space"
        ) from exc
    logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)


def load_pt2(path: Path, extra_files: dict[str, str] | None = None) -> torch.export.ExportedProgram:
    """Read a `.pt2` written by `save_pt2` (or `torch.export.save`).

    Entries named in `extra_files` are filled in place with their stored text (or left as given).

    Raises TrimformerError when the file is missing, is not a .pt2 archive, is corrupt, or holds
    payloads that could only be read by unpickling arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise TrimformerError(
            f"no exported program at {path}; pass the model.pt2 of a run folder, or re-export it "
            "with `trimformer export <run>`"
        )
    if not zipfile.is_zipfile(path):
        raise TrimformerError(
            f"{path} is not a .pt2 archive (not a zip file); it may be truncated or another "
            "format — re-export it with `trimformer export <run>`"
        )
    _refuse_pickled_payloads(path)
    # torch.export.load is NOT pickle-free: tensor subclasses, the stored example inputs and old
    # archive formats go through torch.load(weights_only=False) (directly, or as a fallback when
    # weights_only=True fails). Forcing weights-only here makes every one of those loads use the
    # restricted unpickler (tensors and containers only), so a crafted file raises instead of
    # running code. Custom/opaque objects, read with plain pickle, were refused above.
    try:
        with _forced_weights_only(), _quiet_logger("torch.export"):
            return torch.export.load(path, extra_files=extra_files)
    except Exception as exc:
        raise TrimformerError(
            f"could not load the exported program {path}: {type(exc).__name__}: "
            f"{_first_line(exc)}; the file may be corrupt, from another torch version, or hold "
            "objects that are not plain tensors — re-export it with this torch "
            f"({torch.__version__})"
        ) from exc


def _refuse_pickled_payloads(path: Path) -> None:
    """Raise when the archive stores objects that torch would read with an unrestricted pickle."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                base = member.rsplit("/", 1)[-1]
                if "/data/constants/" in f"/{member}" and base.startswith(_UNPICKLED_PREFIXES):
                    raise TrimformerError(
                        f"{path} holds a pickled Python object ({member}); trimformer does not "
                        "unpickle files — load it with torch.export.load only if you trust it"
                    )
                if member.endswith("_config.json") and "/data/" in f"/{member}":
                    config = json.loads(archive.read(member)).get("config", {})
                    pickled = [k for k, v in config.items() if v.get("use_pickle")]
                    if pickled:
                        raise TrimformerError(
                            f"{path} stores {pickled[0]} as a pickled tensor subclass; trimformer "
                            "loads plain tensors only — convert it to a plain tensor and re-export"
                        )
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as exc:
        raise TrimformerError(
            f"{path} is a corrupt .pt2 archive ({type(exc).__name__}: {_first_line(exc)}); "
            "re-export it"
        ) from exc


@contextlib.contextmanager
def _forced_weights_only() -> Iterator[None]:
    """Make every `torch.load` inside the block weights-only (torch reads the variable per call).

    The environment is process-wide: a torch.load on another thread meanwhile is forced too.
    """
    saved = {
        k: os.environ.get(k)
        for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    # torch raises if both are set; the forcing-off one must go for the block.
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a library logger's warnings (it logs a traceback before we raise our own error)."""
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
