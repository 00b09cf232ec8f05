"""Honest latency measurement: warm-up, many interleaved runs, median and spread.

Contract:
- `measure_interleaved(runners, ...)` times every runner in one process, interleaved, with a
  fixed torch thread count, and returns one `Latency` per runner: median, p10 and p90 over all
  timed runs, with the shape, thread count and runtime written next to the numbers.
- A speedup is only ever `speedup(baseline, other)` of two `Latency`s from one such call (same
  shape and threads); numbers from different processes or machines are not comparable.
- `torch_runner` / `ort_runner` turn a model and its inputs into a no-argument callable; all
  input preparation (numpy feeds, no-grad context) is done once, outside the timed call.
onnxruntime sessions carry their own thread count: build them with
`trimformer.export.onnx.ort_session(path, threads)` using the same `threads` as here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trimformer.errors import TrimformerError

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class Latency:
    """Wall-clock latency of one runner, in milliseconds, and the conditions it was taken in."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int  # timed runs the statistics are over (warm-up excluded)
    shape: str  # e.g. "8x128" (batch x seq) or "8x3x224x224"
    threads: int
    runtime: str  # "torch" | "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_interleaved(
    runners: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 3,
    threads: int = 2,
    shape: str,
    runtime: str | Mapping[str, str],
) -> dict[str, Latency]:
    """Time each runner `rounds * repeats` times, interleaved, after `warmup` untimed calls each.

    Within a round the runners take turns one call at a time, and the order they go in rotates
    from round to round, so slow drift (thermal, other processes) and cache effects from the
    previous call hit every runner alike. `runtime` is one name for all runners or one per runner.
    torch's intra-op thread count is set to `threads` for the measurement and restored after.
    """
    names = list(runners)
    if not names:
        raise TrimformerError("measure_interleaved was given no runners; pass at least one")
    if warmup < 0 or repeats < 1 or rounds < 1 or threads < 1:
        raise TrimformerError(
            f"measure_interleaved needs warmup >= 0, repeats >= 1, rounds >= 1, threads >= 1; "
            f"got warmup={warmup}, repeats={repeats}, rounds={rounds}, threads={threads}"
        )
    runtimes = _runtimes(names, runtime)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name in names:
            for _ in range(warmup):
                runners[name]()
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for _ in range(repeats):
                for name in order:
                    start = time.perf_counter()
                    runners[name]()
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved_threads)

    result = {}
    for name in names:
        ms = np.asarray(times[name]) * 1e3
        result[name] = Latency(
            median_ms=float(np.median(ms)),
            p10_ms=float(np.percentile(ms, 10)),
            p90_ms=float(np.percentile(ms, 90)),
            runs=len(ms),
            shape=shape,
            threads=threads,
            runtime=runtimes[name],
        )
        logger.info(
            "%s (%s, %s, %d threads): median %.2f ms, p10 %.2f, p90 %.2f over %d runs",
            name,
            runtimes[name],
            shape,
            threads,
            result[name].median_ms,
            result[name].p10_ms,
            result[name].p90_ms,
            len(ms),
        )
    return result


def torch_runner(module: torch.nn.Module, inputs: Mapping[str, Tensor]) -> Callable[[], object]:
    """A callable running `module(**inputs)` under inference mode (no autograd bookkeeping)."""
    feeds = dict(inputs)

    def run() -> object:
        with torch.inference_mode():
            return module(**feeds)

    return run


def ort_runner(
    session: onnxruntime.InferenceSession,
    inputs: Mapping[str, Tensor],
) -> Callable[[], object]:
    """A callable running an onnxruntime session on `inputs`, converted to numpy once, here."""
    expected = sorted(i.name for i in session.get_inputs())
    if sorted(inputs) != expected:
        raise TrimformerError(
            f"ort_runner inputs {sorted(inputs)} do not match the session's inputs {expected}; "
            "pass the keyword names the model was exported with"
        )
    feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}

    def run() -> object:
        return session.run(None, feeds)

    return run


def speedup(baseline: Latency, other: Latency) -> float:
    """How many times faster `other` is than `baseline` (> 1 is faster), by median latency."""
    if (baseline.shape, baseline.threads) != (other.shape, other.threads):
        raise TrimformerError(
            f"cannot compare latencies taken at shape {baseline.shape} with {baseline.threads} "
            f"threads and shape {other.shape} with {other.threads} threads; measure both in one "
            "measure_interleaved call"
        )
    if other.median_ms <= 0:
        raise TrimformerError(
            f"latency median {other.median_ms} ms is not positive; the runner did no work"
        )
    return baseline.median_ms / other.median_ms


def _runtimes(names: list[str], runtime: str | Mapping[str, str]) -> dict[str, str]:
    """One runtime name per runner, each one of RUNTIMES."""
    chosen = {name: runtime for name in names} if isinstance(runtime, str) else dict(runtime)
    missing = [name for name in names if name not in chosen]
    if missing:
        raise TrimformerError(
            f"no runtime given for runner(s) {missing}; pass runtime as one of {RUNTIMES} or a "
            "dict naming every runner"
        )
    unknown = {name: chosen[name] for name in names if chosen[name] not in RUNTIMES}
    if unknown:
        raise TrimformerError(f"unknown runtime(s) {unknown}; use one of {RUNTIMES}")
    return {name: chosen[name] for name in names}
