"""The end-to-end job: checkpoint -> graph -> passes -> verify -> measure -> export -> report.

`optimize` and `apply` share it; they differ only in where the steps come from (a planner that
reads calibration scores, or a recipe file). Everything is written to a temporary folder next to
the output and moved into place at the end, so a failed run leaves nothing half-written, and
the checkpoint is only ever read.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from trimformer import __version__
from trimformer.errors import TrimformerError
from trimformer.graph.capture import PT2_META, Loaded, capture, checkpoint_digest, dynamic_shapes
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters
from trimformer.graph.structure import Structure, discover
from trimformer.optimizer import quality
from trimformer.optimizer.pipeline import (
    Calibration,
    Recipe,
    Step,
    dump_recipe,
    parse_shape,
    run_steps,
)
from trimformer.optimizer.text import TextSplit, load_text_file, python_docs_split
from trimformer.passes.base import Context

SCHEMA_VERSION = 1
Progress = Callable[[str], None]


@dataclass
class RunOptions:
    out: Path
    shape: str = "8x128"
    runtimes: tuple[str, ...] = ("torch", "onnxruntime")
    threads: int = 2
    text: Path | None = None
    calib_batches: int = 4
    eval_batches: int = 4
    batch_size: int = 4
    seq_len: int = 128
    onnx: bool = True
    force: bool = False
    repeats: int = 10
    rounds: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A captured model with its data, ready for passes."""

    loaded: Loaded
    gm: fx.GraphModule
    structure: Structure
    ctx: Context
    calib: list[quality.Batch]
    evaluation: list[quality.Batch]
    text: TextSplit | None


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise TrimformerError(
            f"output folder {out} already exists and is not empty; choose another --out or "
            "pass --force to replace it"
        )


def _text_batches(loaded: Loaded, docs: tuple[str, ...], opts: RunOptions, n: int) -> list:
    seq = min(opts.seq_len, loaded.max_seq)
    return quality.make_text_batches(
        loaded.tokenizer, docs, batch_size=opts.batch_size, seq_len=seq, max_batches=n
    )


def prepare(loaded: Loaded, opts: RunOptions, progress: Progress) -> Prepared:
    """Calibration and evaluation batches, capture, structure."""
    torch.manual_seed(0)
    split: TextSplit | None = None
    if loaded.kind == "image":
        calib = quality.make_image_batches(
            loaded.image_size,
            loaded.channels,
            batch_size=opts.batch_size,
            max_batches=opts.calib_batches,
            seed=0,
        )
        evaluation = quality.make_image_batches(
            loaded.image_size,
            loaded.channels,
            batch_size=opts.batch_size,
            max_batches=opts.eval_batches,
            seed=1,
        )
    else:
        if loaded.tokenizer is None:
            raise TrimformerError(
                f"{loaded.source}: no tokenizer to make calibration text from; optimize the "
                "Hugging Face folder instead of the bare .pt2"
            )
        split = load_text_file(opts.text) if opts.text else python_docs_split()
        calib = _text_batches(loaded, split.calibration, opts, opts.calib_batches)
        evaluation = _text_batches(loaded, split.heldout, opts, opts.eval_batches)
    progress(f"capturing {loaded.source} with torch.export")
    gm = capture(loaded, calib[0].inputs)
    structure = discover(gm)
    if not structure.blocks:
        detail = "; ".join(structure.unmatched[:3]) or "no attention or MLP sub-layers matched"
        raise TrimformerError(
            f"{loaded.source}: no transformer blocks found in the graph ({detail}); "
            "run `trimformer inspect` on it to see what was matched"
        )
    # The teacher is the captured graph itself: run() edits a deep copy, never `gm`.
    ctx = Context(
        kind=loaded.kind, batches=[b.inputs for b in calib], teacher=gm, progress=progress
    )
    return Prepared(loaded, gm, structure, ctx, calib, evaluation, split)


def shape_inputs(loaded: Loaded, shape: str) -> dict[str, torch.Tensor]:
    """Deterministic inputs at BATCHxSEQ for latency and FLOPs (images: BATCH images)."""
    b, s = parse_shape(shape)
    g = torch.Generator().manual_seed(0)
    if loaded.kind == "image":
        size = loaded.image_size
        return {"pixel_values": torch.randn(b, loaded.channels, size, size, generator=g)}
    if s > loaded.max_seq:
        raise TrimformerError(
            f"--shape {shape}: sequence {s} is longer than the model's context {loaded.max_seq}"
        )
    vocab = loaded.vocab_size or 1000
    ids = torch.randint(5, max(6, vocab), (b, s), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def verification_inputs(loaded: Loaded, traced: dict[str, torch.Tensor]) -> list[dict]:
    """Two shapes other than the traced one, one with a padded row."""
    g = torch.Generator().manual_seed(1)
    if loaded.kind == "image":
        size = loaded.image_size
        return [
            {"pixel_values": torch.randn(n, loaded.channels, size, size, generator=g)}
            for n in (1, 3)
        ]
    tb, ts = traced["input_ids"].shape
    vocab = loaded.vocab_size or 1000
    sets = []
    for b, s in ((tb + 1, max(3, ts // 2 - 3)), (2, min(loaded.max_seq, ts + 37))):
        ids = torch.randint(5, max(6, vocab), (b, s), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, s - s // 3 :] = 0
        sets.append({"input_ids": ids, "attention_mask": mask})
    return sets


def run(
    loaded: Loaded,
    prepared: Prepared,
    steps: list[Step],
    opts: RunOptions,
    progress: Progress,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply steps, measure, export and write the run folder; returns the report dict."""
    from trimformer.export.onnx import export_onnx, verify_onnx
    from trimformer.export.pt2 import export_program, save_pt2

    original = prepared.gm
    optimized = copy.deepcopy(original)
    sample = prepared.calib[0].inputs
    at_shape = shape_inputs(loaded, opts.shape)
    progress("applying passes: " + ", ".join(s.spec.name for s in steps))
    structure, records = run_steps(
        optimized, steps, prepared.ctx, sample, at_shape, on_step=lambda n: progress(f"  {n}")
    )

    progress("evaluating quality on held-out data")
    reference = quality.reference_outputs(original, prepared.evaluation)
    before = quality.evaluate(loaded.kind, original, prepared.evaluation, reference)
    after = quality.evaluate(loaded.kind, optimized, prepared.evaluation, reference)

    digest = checkpoint_digest(loaded.source) if loaded.source else None
    recipe = Recipe(
        model=str(loaded.source),
        model_sha256=digest,
        shape=opts.shape,
        calibration=Calibration(
            text=str(opts.text) if opts.text else None,
            seq_len=opts.seq_len,
            batch_size=opts.batch_size,
            batches=opts.calib_batches,
        ),
        passes=[s.to_entry() for s in steps],
    )
    dyn = dynamic_shapes(loaded, sample)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    try:
        progress("exporting model.pt2")
        program = export_program(optimized, sample, dyn)
        meta = {
            "kind": loaded.kind,
            "max_seq": loaded.max_seq,
            "image_size": loaded.image_size,
            "channels": loaded.channels,
            "vocab_size": loaded.vocab_size,
            "tokenizer_source": str(loaded.source) if loaded.tokenizer is not None else None,
            "trimformer": __version__,
        }
        save_pt2(program, tmp / "model.pt2", extra_files={PT2_META: json.dumps(meta)})
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp / "tokenizer")

        exports: dict[str, Any] = {"pt2": "model.pt2"}
        if opts.onnx:
            progress("exporting model.onnx and verifying it in onnxruntime")
            onnx_info = export_onnx(optimized, sample, dyn, tmp / "model.onnx")
            check = verify_onnx(
                tmp / "model.onnx",
                optimized,
                verification_inputs(loaded, sample),
                threads=opts.threads,
            )
            exports["onnx"] = {**_asdict(onnx_info), "verification": _asdict(check)}
        ort_program = tmp / "model.onnx" if opts.onnx else None
        int8_steps = [s for s in steps if s.spec.name == "int8"]
        int8_quality = None
        torch_int8: TorchInt8 | None = None
        if int8_steps:
            stage = Int8Stage(
                loaded, optimized, int8_steps[-1].config, sample, dyn, prepared, reference, tmp,
                opts, progress,
            )  # fmt: skip
        if int8_steps and opts.onnx:
            ort_program, int8_quality, exports["int8"] = _int8_stage(stage)
        if int8_steps and "torch" in opts.runtimes:
            torch_int8 = _torch_int8_stage(stage, meta, at_shape)
            exports["int8_torch"] = torch_int8.export
        if int8_steps and not opts.onnx and "torch" not in opts.runtimes:
            raise TrimformerError(
                "the int8 stage needs a runtime to quantize for: drop --no-onnx (onnxruntime) or "
                "use --runtime torch"
            )
        latency = measure_programs(
            original,
            torch_int8.served if torch_int8 is not None else optimized,
            ort_program,
            sample,
            dyn,
            at_shape,
            opts.runtimes,
            opts,
            progress,
            extra_torch=torch_int8.extra_runners if torch_int8 is not None else None,
        )
        report = build_report(
            loaded, prepared, structure, records, before, after, latency, exports, opts, digest
        )
        if search is not None:
            report["search"] = search
        if int8_quality is not None:
            # onnxruntime serves the int8 program: its quality is the one a user gets there.
            report["quality"]["after_int8_onnxruntime"] = int8_quality.to_dict()
            report["quality"]["delta_int8"] = quality.quality_delta(
                loaded.kind, before, int8_quality
            )
            if report["latency"]:
                report["latency"]["onnxruntime_program"] = "model.int8.onnx"
        if torch_int8 is not None:
            # torch serves model.int8.pt2; its quality is measured on that program (eager).
            report["quality"]["after_int8_torch"] = torch_int8.quality.to_dict()
            report["quality"]["delta_int8_torch"] = quality.quality_delta(
                loaded.kind, before, torch_int8.quality
            )
            if report["latency"]:
                report["latency"]["torch_program"] = torch_int8.program_label
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        from trimformer.report.html import render_html

        (tmp / "report.html").write_text(render_html(report))
        _move_into_place(tmp, opts.out, opts.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@dataclass
class Int8Stage:
    """What both int8 stages read: the edited graph, its int8 config, the run's data."""

    loaded: Loaded
    optimized: fx.GraphModule
    config: Any  # the int8 pass config
    sample: dict[str, torch.Tensor]
    dyn: dict[str, Any]
    prepared: Prepared
    reference: list[torch.Tensor]  # the original's outputs on the evaluation batches
    tmp: Path
    opts: RunOptions
    progress: Progress

    @property
    def verification(self) -> list[dict[str, torch.Tensor]]:
        return verification_inputs(self.loaded, self.sample)

    def evaluate(self, model: Any) -> quality.QualityResult:
        """The int8 program's quality on held-out data, against the original's outputs."""
        return quality.evaluate(self.loaded.kind, model, self.prepared.evaluation, self.reference)


def _int8_stage(st: Int8Stage) -> tuple[Path, quality.QualityResult, dict[str, Any]]:
    """Quantize the ONNX program, verify it (cosine), and measure its quality in onnxruntime."""
    from trimformer.export.int8 import OrtModule, export_int8, verify_int8

    st.progress("exporting model.int8.onnx (attention lowered, dynamic int8) and verifying it")
    path = st.tmp / "model.int8.onnx"
    c = st.config
    info = export_int8(
        st.optimized, st.sample, st.dyn, path, per_channel=c.per_channel, weight_type=c.weight_type
    )
    check = verify_int8(path, st.optimized, st.verification, threads=st.opts.threads)
    st.progress("evaluating the int8 program in onnxruntime on held-out data")
    q = st.evaluate(OrtModule(path, st.opts.threads))
    return path, q, {**_asdict(info), "verification": _asdict(check)}


@dataclass
class TorchInt8:
    """The torch int8 program of a run: what is timed (`served`), its quality, its record."""

    served: torch.nn.Module  # compiled when the config says so, else the eager program
    extra_runners: dict[str, Any]  # also timed: the eager program when `served` is compiled
    quality: quality.QualityResult
    export: dict[str, Any]
    program_label: str


def _torch_int8_stage(
    st: Int8Stage, meta: dict[str, Any], at_shape: dict[str, torch.Tensor]
) -> TorchInt8:
    """torchao int8 of the edited graph: export model.int8.pt2, reload, verify, evaluate, compile.

    Verification and quality run the program loaded back from the file, eager; the compiled
    program (static shape, the one timed) computes the same ops fused, up to rounding.
    """
    from trimformer.export.int8 import verify_int8
    from trimformer.export.int8_torch import (
        compile_for_shape,
        export_int8_program,
        load_int8_program,
    )
    from trimformer.export.pt2 import save_pt2

    config = st.config
    st.progress("exporting model.int8.pt2 (torchao int8 dynamic activation x int8 weight)")
    info = export_int8_program(st.optimized, st.sample, st.dyn, per_channel=config.per_channel)
    path = st.tmp / "model.int8.pt2"
    pt2_meta = {
        **meta,
        "int8": {"runtime": "torch", "library": "torchao", "compile": config.compile},
    }
    save_pt2(info.program, path, extra_files={PT2_META: json.dumps(pt2_meta)})
    record: dict[str, Any] = {"path": path.name, "files": [path.name], **info.to_dict()}
    del info  # the program is read back from the file: what ships is what is checked
    program = load_int8_program(path).module()
    check = verify_int8(path, st.optimized, st.verification, threads=st.opts.threads, model=program)
    st.progress("evaluating the torch int8 program on held-out data")
    q = st.evaluate(program)
    record.update(bytes=path.stat().st_size, compile=config.compile, verification=_asdict(check))
    served: torch.nn.Module = program
    extra: dict[str, Any] = {}
    label = "model.int8.pt2 (eager)"
    if config.compile:
        st.progress(f"torch.compile of the int8 program at {st.opts.shape} (its speed needs it)")
        compiled = compile_for_shape(program, at_shape)
        served, extra = compiled.module, {"int8-eager": program}
        record["compile_seconds"] = round(compiled.seconds, 1)
        label = "model.int8.pt2 (torch.compile)"
    return TorchInt8(served, extra, q, record, label)


def _asdict(obj: Any) -> dict[str, Any]:
    """JSON-ready dict of an export/verification record, with file paths made run-relative."""
    from dataclasses import asdict, is_dataclass

    if hasattr(obj, "to_dict"):
        d = obj.to_dict()
    elif is_dataclass(obj):
        d = asdict(obj)
    else:
        d = dict(obj)
    d = json.loads(json.dumps(d, default=str))
    if "path" in d:
        d["path"] = Path(d["path"]).name
    if "files" in d:
        d["files"] = [Path(f).name for f in d["files"]]
    return d


def run_search(
    loaded: Loaded,
    prepared: Prepared,
    opts: RunOptions,
    target: float,
    allow: set[str],
    quality_floor: float | None,
    dry_run: bool,
    progress: Progress,
    compensate: str = "lstsq",
) -> Any:
    """Search for a plan reaching `target` on the first runtime asked for (torch if both)."""
    from trimformer.optimizer.search import Measurer, search

    runtime = "torch" if "torch" in opts.runtimes else opts.runtimes[0]
    sample = prepared.calib[0].inputs
    floor = None
    if quality_floor is not None:
        floor = (
            ("kl", quality_floor) if loaded.kind == "causal-lm" else ("cosine", 1.0 - quality_floor)
        )
    work = Path(tempfile.mkdtemp(prefix="trimformer-search-"))
    try:
        measurer = Measurer(
            runtime,
            prepared.gm,
            sample,
            dynamic_shapes(loaded, sample),
            shape_inputs(loaded, opts.shape),
            opts.shape,
            opts.threads,
            work,
        )
        return search(
            loaded.kind,
            prepared.gm,
            prepared.structure,
            prepared.ctx,
            prepared.calib,
            prepared.evaluation,
            measurer,
            target,
            allow,
            progress,
            quality_floor=floor,
            max_verify=0 if dry_run else 5,
            compensate=compensate,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_programs(
    original: torch.nn.Module,
    optimized: torch.nn.Module,
    optimized_onnx: Path | None,
    sample: dict[str, torch.Tensor],
    dyn: dict[str, Any],
    at_shape: dict[str, torch.Tensor],
    runtimes: tuple[str, ...],
    opts: RunOptions,
    progress: Progress,
    extra_torch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Original vs optimized on each runtime, all runners interleaved in one measurement.

    onnxruntime needs the original as ONNX too; it is exported to a temporary folder (same
    exporter and settings as the optimized one) and deleted afterwards. `extra_torch` names more
    torch models timed in the same rounds (e.g. "int8-eager" beside the compiled int8 program);
    their speedups over torch/original go to `speedup_other`.
    """
    from trimformer.cost_model.measure import measure_interleaved, ort_runner, torch_runner
    from trimformer.export.onnx import export_onnx, ort_session

    runners: dict[str, Callable[[], object]] = {}
    runtime_of: dict[str, str] = {}
    if "torch" in runtimes:
        runners["torch/original"] = torch_runner(original, at_shape)
        runners["torch/optimized"] = torch_runner(optimized, at_shape)
        for name, module in (extra_torch or {}).items():
            runners[f"torch/{name}"] = torch_runner(module, at_shape)
    base_dir = None
    try:
        if "onnxruntime" in runtimes:
            if optimized_onnx is None:
                raise TrimformerError("onnxruntime latency needs the ONNX export; drop --no-onnx")
            progress("exporting the original to ONNX for the onnxruntime baseline")
            base_dir = Path(tempfile.mkdtemp(prefix="trimformer-baseline-"))
            export_onnx(original, sample, dyn, base_dir / "model.onnx")
            runners["onnxruntime/original"] = ort_runner(
                ort_session(base_dir / "model.onnx", opts.threads), at_shape
            )
            runners["onnxruntime/optimized"] = ort_runner(
                ort_session(optimized_onnx, opts.threads), at_shape
            )
        for name in runners:
            runtime_of[name] = name.split("/")[0]
        if not runners:
            return {}
        progress(f"measuring at {opts.shape}, {opts.threads} threads: {', '.join(runners)}")
        stats = measure_interleaved(
            runners,
            repeats=opts.repeats,
            rounds=opts.rounds,
            threads=opts.threads,
            shape=opts.shape,
            runtime=runtime_of,
        )
    finally:
        if base_dir is not None:
            shutil.rmtree(base_dir, ignore_errors=True)
    result: dict[str, Any] = {
        "shape": opts.shape,
        "threads": opts.threads,
        "runs": {name: lat.to_dict() for name, lat in stats.items()},
        "speedup": {},
    }
    for rt in runtimes:
        o, n = stats[f"{rt}/original"], stats[f"{rt}/optimized"]
        result["speedup"][rt] = round(o.median_ms / n.median_ms, 4)
    if extra_torch and "torch" in runtimes:
        o = stats["torch/original"]
        result["speedup_other"] = {
            f"torch/{name}": round(o.median_ms / stats[f"torch/{name}"].median_ms, 4)
            for name in extra_torch
        }
    return result


def _load_run(run_dir: Path) -> tuple[dict[str, Any], Loaded]:
    from trimformer.graph.capture import load_checkpoint
    from trimformer.report.render import load_report

    report = load_report(run_dir)
    return report, load_checkpoint(run_dir / "model.pt2")


def reexport_onnx(run_dir: Path, threads: int, progress: Progress) -> dict[str, Any]:
    """Export a run's model.pt2 to ONNX again, verify it, and replace model.onnx in the run."""
    from trimformer.export.onnx import export_onnx, verify_onnx

    report, loaded = _load_run(run_dir)
    module = loaded.module
    sample = _sample_inputs(loaded, report)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx.", dir=run_dir))
    try:
        progress(f"exporting {run_dir}/model.pt2 to ONNX")
        info = export_onnx(module, sample, dynamic_shapes(loaded, sample), tmp / "model.onnx")
        check = verify_onnx(
            tmp / "model.onnx", module, verification_inputs(loaded, sample), threads=threads
        )
        for f in run_dir.glob("model.onnx*"):
            f.unlink()
        for f in tmp.iterdir():
            os.replace(f, run_dir / f.name)
        report.setdefault("exports", {})["onnx"] = {
            **_asdict(info),
            "verification": _asdict(check),
        }
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _asdict(check)


def _sample_inputs(loaded: Loaded, report: dict[str, Any]) -> dict[str, torch.Tensor]:
    b, s = report.get("data", {}).get("batch_shape", [4, 64])[:2]
    if loaded.kind == "image":
        return shape_inputs(loaded, f"{max(2, b)}x1")
    return shape_inputs(loaded, f"{max(2, b)}x{max(2, min(s, loaded.max_seq))}")


def bench_run(
    run_dir: Path,
    runtimes: tuple[str, ...],
    shape: str,
    threads: int,
    repeats: int,
    rounds: int,
    progress: Progress,
) -> dict[str, Any]:
    """Latency of a run's program against the checkpoint it was made from, at any shape."""
    from trimformer.graph.capture import load_checkpoint

    report, optimized = _load_run(run_dir)
    source = Path(report["model"]["source"])
    original = load_checkpoint(source)
    opts = RunOptions(out=run_dir, shape=shape, threads=threads, repeats=repeats, rounds=rounds)
    prep = prepare(original, RunOptions(out=run_dir, calib_batches=1, eval_batches=1), progress)
    sample = prep.calib[0].inputs
    onnx_path = run_dir / "model.int8.onnx"
    if not onnx_path.is_file():
        onnx_path = run_dir / "model.onnx"
    at_shape = shape_inputs(original, shape)
    torch_program: torch.nn.Module = optimized.module
    extra: dict[str, Any] | None = None
    int8_pt2 = run_dir / "model.int8.pt2"
    if "torch" in runtimes and int8_pt2.is_file():
        # The run's torch program is the int8 one; timed compiled (as the run was) and eager.
        from trimformer.export.int8_torch import compile_for_shape, load_int8_program

        torch_program = load_int8_program(int8_pt2).module()
        if report.get("exports", {}).get("int8_torch", {}).get("compile", True):
            progress(f"torch.compile of model.int8.pt2 at {shape}")
            extra = {"int8-eager": torch_program}
            torch_program = compile_for_shape(torch_program, at_shape).module
    result = measure_programs(
        prep.gm,
        torch_program,
        onnx_path if onnx_path.is_file() else None,
        sample,
        dynamic_shapes(original, sample),
        at_shape,
        runtimes,
        opts,
        progress,
        extra_torch=extra,
    )
    if "torch" in runtimes and int8_pt2.is_file():
        result["torch_program"] = "model.int8.pt2" + (" (torch.compile)" if extra else "")
    return result


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force and any(out.iterdir()):
            raise TrimformerError(f"output folder {out} appeared while running; not replacing it")
        shutil.rmtree(out)
    os.replace(tmp, out)


def build_report(
    loaded: Loaded,
    prepared: Prepared,
    structure: Structure,
    records: list,
    before: quality.QualityResult,
    after: quality.QualityResult,
    latency: dict[str, Any],
    exports: dict[str, Any],
    opts: RunOptions,
    digest: str | None,
) -> dict[str, Any]:
    at_shape = shape_inputs(loaded, opts.shape)
    return {
        "schema_version": SCHEMA_VERSION,
        "trimformer": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "torch": torch.__version__,
            "threads": opts.threads,
            "device": "cpu",
            "cpu_count": os.cpu_count(),
        },
        "model": {
            "source": str(loaded.source),
            "sha256": digest,
            "kind": loaded.kind,
            **{k: v for k, v in loaded.meta.items() if k in ("model_type", "architectures")},
        },
        "data": {
            "text": prepared.text.source if prepared.text else "synthetic images",
            "calibration_batches": len(prepared.calib),
            "evaluation_batches": len(prepared.evaluation),
            "batch_shape": list(next(iter(prepared.calib[0].inputs.values())).shape),
        },
        "structure": {"before": prepared.structure.summary(), "after": structure.summary()},
        "baseline": {
            "params": count_parameters(prepared.gm),
            "flops": count_flops(prepared.gm, at_shape),
        },
        "passes": [r.to_dict() for r in records],
        "result": {
            "params": records[-1].params_after if records else count_parameters(prepared.gm),
            "flops": records[-1].flops_after if records else count_flops(prepared.gm, at_shape),
        },
        "quality": {
            "before": before.to_dict(),
            "after": after.to_dict(),
            "delta": quality.quality_delta(loaded.kind, before, after),
        },
        "latency": latency,
        "exports": exports,
        **({"options": opts.extra} if opts.extra else {}),
    }
