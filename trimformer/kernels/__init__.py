"""Attention kernels: one custom op per kernel, with a plain-PyTorch form, a Triton kernel for CUDA
and an ONNX translation.

- `local_attention` (`torch.ops.trimformer.local_attention`): sliding-window + sink attention,
  see `kernels.local_attention` for the contract. Importing this package registers the op.
- `onnx_translation_table()`: the ONNX translations of trimformer's ops, for
  `torch.onnx.export(..., custom_translation_table=...)`.

Triton is optional (the `triton` extra); it is imported only when a CUDA tensor reaches the op.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

from trimformer.kernels.local_attention import (
    LOCAL_ATTENTION,
    local_attention,
    local_attention_chunked,
    local_attention_reference,
)

__all__ = [
    "LOCAL_ATTENTION",
    "local_attention",
    "local_attention_chunked",
    "local_attention_reference",
    "onnx_translation_table",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """Whether `triton` can be imported (it is not a hard dependency)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. no matching driver) counts as absent
        return False
    return True


def onnx_translation_table() -> dict[Any, Callable[..., Any]]:
    """{torch op overload: onnxscript translation} for every trimformer custom op."""
    from trimformer.kernels.local_attention_onnx import local_attention_onnx

    return {LOCAL_ATTENTION: local_attention_onnx}
