"""Device profile: microbenchmarks of the matmul-like ops a graph contains, cached on disk.

Keyed by device (CPU model, core count), runtime (torch eager or onnxruntime) and thread count.
Each entry is the median time in ms of one op at one concrete shape:

    linear:M:K:N          y[M,N] = x[M,K] @ W[K,N] + b
    sdpa:B:H:S:T:D        softmax(q k^T / sqrt(D) + mask) v with q[B,H,S,D], k/v[B,H,T,D]
    local:B:H:N:D:W:S:C   trimformer::local_attention over q/k/v[B,H,N,D], window W (at N),
                          S sinks, causal C (0/1); torch times the op (the chunked PyTorch form
                          on CPU), onnxruntime its exported ONNX form
    eltwise:N             one elementwise op over N elements (N a power of two), per-op overhead
                          included: what every other node costs

torch entries time `F.linear` / `F.scaled_dot_product_attention` (with a boolean mask, as the
captured graphs call it); onnxruntime entries time a one-node MatMul+Add model and the
MatMul -> Softmax -> MatMul chain the exporter emits. Missing entries are measured on demand
and the cache is written back, so a profile grows with the shapes the user's models need.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RUNTIMES = ("torch", "onnxruntime")


def cache_dir() -> Path:
    root = os.environ.get("TRIMFORMER_CACHE") or Path.home() / ".cache" / "trimformer"
    return Path(root) / "profiles"


def device_id() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tag = hashlib.sha1(f"{cpu}|{os.cpu_count()}|{torch.__version__}".encode()).hexdigest()[:10]
    return f"cpu-{tag}"


def _median_ms(fn: Callable[[], object], budget_s: float = 0.1, min_runs: int = 5) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class DeviceProfile:
    """Timings of op signatures for one device/runtime/threads; measured lazily, cached."""

    def __init__(self, runtime: str, threads: int, path: Path | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r} not in {RUNTIMES}")
        self.runtime = runtime
        self.threads = threads
        self.path = path or cache_dir() / f"{device_id()}-{runtime}-t{threads}.json"
        self.entries: dict[str, float] = {}
        self.measured = 0
        if self.path.is_file():
            try:
                self.entries = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (json.JSONDecodeError, OSError, AttributeError, ValueError):
                self.entries = {}  # a corrupt cache is re-measured, never trusted

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
        os.replace(tmp, self.path)

    def time(self, key: str) -> float:
        if key not in self.entries:
            self.entries[key] = self._measure(key)
            self.measured += 1
        return self.entries[key]

    # ------------------------------------------------------------------ microbenchmarks

    def _measure(self, key: str) -> float:
        kind, *dims = key.split(":")
        d = [int(x) for x in dims]
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            if self.runtime == "torch":
                return self._torch(kind, d)
            return self._ort(kind, d)
        finally:
            torch.set_num_threads(saved)

    def _torch(self, kind: str, d: list[int]) -> float:
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            if kind == "linear":
                m, k, n = d
                x = torch.randn(m, k, generator=g)
                w = torch.randn(n, k, generator=g)
                b = torch.randn(n, generator=g)
                return _median_ms(lambda: torch.nn.functional.linear(x, w, b))
            if kind == "sdpa":
                bb, h, s, t, dd = d
                q = torch.randn(bb, h, s, dd, generator=g)
                k = torch.randn(bb, h, t, dd, generator=g)
                v = torch.randn(bb, h, t, dd, generator=g)
                mask = torch.ones(bb, 1, s, t, dtype=torch.bool)
                f = torch.nn.functional.scaled_dot_product_attention
                return _median_ms(lambda: f(q, k, v, attn_mask=mask))
            if kind == "local":
                from trimformer.kernels import LOCAL_ATTENTION

                bb, h, n, dd, w, sink, causal = d
                q, k, v = (torch.randn(bb, h, n, dd, generator=g) for _ in range(3))
                win = [float(w)]
                return _median_ms(
                    lambda: LOCAL_ATTENTION(q, k, v, None, sink, win, [0.0], bool(causal), None)
                )
            if kind == "eltwise":
                x = torch.randn(d[0], generator=g)
                return _median_ms(lambda: x * 1.0001)
        raise ValueError(f"unknown op kind {kind!r}")

    def _ort(self, kind: str, d: list[int]) -> float:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        rng = np.random.default_rng(0)
        if kind == "linear":
            m, k, n = d
            w = helper.make_tensor(
                "W", TensorProto.FLOAT, [k, n], rng.standard_normal((k, n)).astype(np.float32)
            )
            b = helper.make_tensor("B", TensorProto.FLOAT, [n], np.zeros(n, np.float32))
            nodes = [
                helper.make_node("MatMul", ["x", "W"], ["xw"]),
                helper.make_node("Add", ["xw", "B"], ["y"]),
            ]
            inputs = {"x": rng.standard_normal((m, k)).astype(np.float32)}
            graph = helper.make_graph(
                nodes,
                "linear",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                [w, b],
            )
        elif kind == "sdpa":
            bb, h, s, t, dd = d
            scale = helper.make_tensor("c", TensorProto.FLOAT, [], [1.0 / dd**0.5])
            nodes = [
                helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", ["q", "kt"], ["qk"]),
                helper.make_node("Mul", ["qk", "c"], ["qks"]),
                helper.make_node("Softmax", ["qks"], ["p"], axis=-1),
                helper.make_node("MatMul", ["p", "v"], ["y"]),
            ]
            inputs = {
                "q": rng.standard_normal((bb, h, s, dd)).astype(np.float32),
                "k": rng.standard_normal((bb, h, t, dd)).astype(np.float32),
                "v": rng.standard_normal((bb, h, t, dd)).astype(np.float32),
            }
            graph = helper.make_graph(
                nodes,
                "sdpa",
                [
                    helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
                    for n, a in inputs.items()
                ],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [bb, h, s, dd])],
                [scale],
            )
        elif kind == "eltwise":
            (numel,) = d
            scale = helper.make_tensor("c", TensorProto.FLOAT, [], [1.0001])
            nodes = [helper.make_node("Mul", ["x", "c"], ["y"])]
            inputs = {"x": rng.standard_normal(numel).astype(np.float32)}
            graph = helper.make_graph(
                nodes,
                "eltwise",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [numel])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [numel])],
                [scale],
            )
        elif kind == "local":
            return self._ort_local(d)
        else:
            raise ValueError(f"unknown op kind {kind!r}")
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(
            model.SerializeToString(),
            opts,
            providers=["CPUExecutionProvider"],
        )
        return _median_ms(lambda: sess.run(None, inputs))

    def _ort_local(self, d: list[int]) -> float:
        """trimformer::local_attention's ONNX form (kernels.local_attention_onnx), exported
        from a one-op module, timed in onnxruntime."""
        import contextlib
        import io
        import tempfile
        import warnings

        import onnxruntime as ort

        from trimformer.kernels import LOCAL_ATTENTION, onnx_translation_table

        bb, h, n, dd, w, sink, causal = d

        class _Local(torch.nn.Module):
            def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return LOCAL_ATTENTION(q, k, v, None, sink, [float(w)], [0.0], bool(causal), None)

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(bb, h, n, dd, generator=g) for _ in range(3))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "local.onnx"
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _Local(),
                    (q, k, v),
                    path,
                    dynamo=True,
                    custom_translation_table=onnx_translation_table(),
                )
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feeds = dict(zip(names, (t.numpy() for t in (q, k, v)), strict=True))
        return _median_ms(lambda: sess.run(None, feeds))
