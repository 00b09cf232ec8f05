"""trimformer's command line. Thin: parse, call the library, print.

torch and transformers are imported inside commands so that `trimformer --help` is instant.
Results go to stdout, progress and errors to stderr. Exit codes: 0 success, 1 error, 2 usage.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Make a trained transformer faster by compiling it: capture the graph, find its blocks, "
        "rewrite it with passes from research papers, verify, export (.pt2 + ONNX) and report.\n\n"
        "Examples:\n\n"
        "  trimformer inspect samples/tinyllama-py\n\n"
        "  trimformer optimize --drop-attention 2 --out runs/demo\n\n"
        "  trimformer inspect runs/demo"
    ),
)
out = Console()
err = Console(stderr=True)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _setup(quiet: bool) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not os.environ.get("TRIMFORMER_DEBUG"):
        import warnings

        warnings.filterwarnings("ignore")
        import logging

        logging.getLogger("torch").setLevel(logging.ERROR)
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        # transformers imports torchao while loading any model; torchao then warns about its
        # CUDA-only libraries and torch about its enums (children with their own levels).
        logging.getLogger("torchao").setLevel(logging.ERROR)
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    def progress(msg: str) -> None:
        if not quiet:
            err.print(f"[dim]{msg}[/dim]")

    return progress


def _fail(msg: str, code: int = 1) -> None:
    err.print(f"[bold red]Error:[/bold red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""


def _guard(fn: Any) -> Any:
    """Turn library errors into one line on stderr and exit 1; no tracebacks for users."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from trimformer.errors import TrimformerError

        try:
            return fn(*args, **kwargs)
        except TrimformerError as e:
            _fail(str(e))
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as e:  # an internal bug: still one line, with a way to get details
            if os.environ.get("TRIMFORMER_DEBUG"):
                raise
            _fail(
                f"internal error ({type(e).__name__}: {_first_line(e)})"
                "; rerun with TRIMFORMER_DEBUG=1 for the traceback and report it"
            )

    return wrapper


# ----------------------------------------------------------------------------- passes


@app.command()
@_guard
def passes(as_json: AsJson = False) -> None:
    """List every pass: what it does, its knobs, and if it is exact, lossy or needs training."""
    from trimformer.passes import PASSES

    rows = [
        {
            "name": s.name,
            "exactness": s.exactness,
            "summary": s.summary,
            "knobs": s.knobs,
            "paper": s.paper,
        }
        for s in PASSES.values()
    ]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table

    t = Table(title="trimformer passes")
    for c in ("pass", "exactness", "what it does", "knobs"):
        t.add_column(c)
    for r in rows:
        knobs = "\n".join(f"{k}: {v}" for k, v in r["knobs"].items()) or "-"
        t.add_row(r["name"], r["exactness"], r["summary"], knobs)
    out.print(t)


# ----------------------------------------------------------------------------- inspect


@app.command()
@_guard
def inspect(
    path: Annotated[
        Path | None, typer.Argument(help="A checkpoint folder, a .pt2, or a run folder.")
    ] = None,
    shape: Annotated[str, typer.Option(help="BATCHxSEQ the FLOPs refer to.")] = "1x128",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Show the transformer structure found in a checkpoint, or the report of a run.

    Examples:

      trimformer inspect samples/tinyllama-py

      trimformer inspect runs/demo --json
    """
    progress = _setup(quiet)
    from trimformer.report.render import print_report, print_structure

    if path is not None and (path / "report.json").is_file():
        from trimformer.report.render import load_report

        report = load_report(path)
        if as_json:
            out.print_json(json.dumps(report))
        else:
            print_report(out, report)
        return
    from trimformer.graph.capture import load_checkpoint
    from trimformer.graph.flops import count_flops
    from trimformer.graph.rewrite import count_parameters
    from trimformer.optimizer.run import RunOptions, prepare, shape_inputs

    loaded = load_checkpoint(path, trust_remote_code=trust_remote_code)
    prep = prepare(loaded, RunOptions(out=Path("."), calib_batches=1, eval_batches=1), progress)
    info = {
        "source": str(loaded.source),
        "kind": loaded.kind,
        "params": count_parameters(prep.gm),
        "flops": count_flops(prep.gm, shape_inputs(loaded, shape)),
        "flops_shape": shape,
        "structure": prep.structure.summary(),
    }
    if as_json:
        out.print_json(json.dumps(info))
    else:
        print_structure(out, info)


# ----------------------------------------------------------------------------- optimize


def _run_options(**kw: Any) -> Any:
    from trimformer.optimizer.run import RunOptions

    runtime = kw.pop("runtime")
    runtimes = ("torch", "onnxruntime") if runtime == "both" else (runtime,)
    return RunOptions(runtimes=runtimes, **kw)


def _finish(report: dict, out_dir: Path, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(report))
        return
    from trimformer.report.render import print_summary

    print_summary(out, report, out_dir)


def manual_steps(
    prep: Any,
    counts: dict[str, int],
    drop_mode: str,
    prune_heads: float,
    prune_neurons: float,
    gqa_mode: str,
    skip: float,
    int8: bool,
    progress: Any,
    compensate: str = "lstsq",
    *,
    fold_norm: bool = False,
    repbn: bool = False,
    repbn_steps: int | None = None,
    recover: str | None = None,
    recover_steps: int | None = None,
    sparse: float | None = None,
    sparse_windows: str = "auto",
    sink: int = 4,
) -> list[Any]:
    """Resolve the manual pass flags into steps, in this order: cleanup, prune, drop, skip,
    sparse-attention (windows planned on the graph the passes before it leave), repbn
    (trains), recover (trains; after the lossy passes, so it repairs them), fold-norm (exact,
    last graph edit: it folds what the others left), int8 (an export stage)."""
    from trimformer.optimizer.pipeline import Step
    from trimformer.passes import PASSES
    from trimformer.passes import drop as drop_pass
    from trimformer.passes import prune as prune_pass

    steps = [Step(PASSES["cleanup"], PASSES["cleanup"].config())]
    if prune_heads or prune_neurons:
        progress("scoring heads and neurons (AMP importance)")
        request = prune_pass.PruneConfig(
            heads=prune_heads, neurons=prune_neurons, gqa_mode=gqa_mode, compensate=compensate
        )
        config, scores = prune_pass.plan(prep.gm, prep.structure, prep.ctx, request)
        steps.append(Step(PASSES["prune"], config, importance=scores))
    if counts:
        progress(f"scoring sub-layers on {len(prep.calib)} calibration batches ({drop_mode})")
        config, scores = drop_pass.plan(prep.gm, prep.structure, prep.ctx, counts, drop_mode)
        shift = "none" if compensate == "none" else "mean"
        config = config.model_copy(update={"compensate": shift})
        steps.append(Step(PASSES["drop"], config, importance=scores))
    if skip:
        steps.append(Step(PASSES["skip"], PASSES["skip"].config(speedup=skip)))
    if sparse:
        from trimformer.passes import sparse_attention

        progress(
            f"choosing attention windows at density {sparse:g} ({sparse_windows}; profile, "
            "solve, validate)"
        )
        gm, structure = prep.gm, prep.structure
        if len(steps) > 1:
            # Windows are per head and block of the graph they rewrite: plan them on the graph
            # the earlier passes leave (pruned heads, dropped attention), as `apply` replays it.
            # This applies those passes twice (here on a copy, then for real): the price of
            # planning before the run.
            from trimformer.optimizer.pipeline import run_steps

            gm = copy.deepcopy(prep.gm)
            sample = prep.calib[0].inputs
            structure, _ = run_steps(gm, steps, prep.ctx, sample, sample)
        config, chosen = sparse_attention.choose(
            gm, structure, prep.ctx, density=sparse, sink=sink, windows=sparse_windows
        )
        steps.append(Step(PASSES["sparse-attention"], config, importance=chosen))
    if repbn:
        conf = PASSES["repbn"].config()
        if repbn_steps:  # λ decays over the first 3/4 of the steps, as in the defaults
            decay = max(1, round(0.75 * repbn_steps))
            conf = conf.model_copy(
                update={"warm_steps": 0, "decay_steps": decay, "final_steps": repbn_steps - decay}
            )
        steps.append(Step(PASSES["repbn"], conf))
    if recover:
        update = {"method": recover, **({"steps": recover_steps} if recover_steps else {})}
        steps.append(Step(PASSES["recover"], PASSES["recover"].config(**update)))
    if fold_norm:
        steps.append(Step(PASSES["fold-norm"], PASSES["fold-norm"].config()))
    if int8:
        steps.append(Step(PASSES["int8"], PASSES["int8"].config()))
    return steps


@app.command()
@_guard
def optimize(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Hugging Face model folder or .pt2 (default: sample).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to write.")] = Path(
        "runs/latest"
    ),
    target_speedup: Annotated[
        float | None,
        typer.Option(help="Search for the plan that reaches this measured speedup (e.g. 1.5)."),
    ] = None,
    passes_: Annotated[
        str, typer.Option("--passes", help="Passes the search may use (comma list).")
    ] = "drop,prune,int8",
    no_int8: Annotated[
        bool, typer.Option("--no-int8", help="Forbid int8 in the search (either runtime).")
    ] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Quantize to int8 (manual): onnxruntime QInt8 of the ONNX program "
            "(model.int8.onnx) and, on runtime torch, torchao int8 (model.int8.pt2). torch int8 "
            "is only fast under torch.compile (needs gcc; tens of seconds to compile): it is "
            "timed compiled, and eager beside it.",
        ),
    ] = False,
    quality_floor: Annotated[
        float | None,
        typer.Option(
            help="Search constraint on calibration data: minimum cosine (encoders, images) or "
            "maximum KL in nats/token (causal LMs)."
        ),
    ] = None,
    drop_attention: Annotated[
        int, typer.Option(help="Drop the N most redundant attention sub-layers.")
    ] = 0,
    drop_mlp: Annotated[int, typer.Option(help="Drop the N most redundant MLP sub-layers.")] = 0,
    drop_blocks: Annotated[int, typer.Option(help="Drop the N most redundant whole blocks.")] = 0,
    drop_mode: Annotated[
        str, typer.Option(help="one-shot, or iterative (re-score after each drop).")
    ] = "one-shot",
    prune_heads: Annotated[
        float, typer.Option(help="Prune this fraction of attention heads per block (AMP).")
    ] = 0.0,
    prune_neurons: Annotated[
        float, typer.Option(help="Prune this fraction of MLP neurons per block (AMP).")
    ] = 0.0,
    gqa_mode: Annotated[
        str, typer.Option(help="GQA head pruning: groups (remove K/V groups) or query.")
    ] = "groups",
    compensate: Annotated[
        str,
        typer.Option(
            help="Refit what pruning cuts on calibration data: lstsq (o/down projections "
            "refit by ridge least squares), bias (mean of the cut features) or none; drops keep "
            "their mean residual change unless none."
        ),
    ] = "lstsq",
    skip: Annotated[
        float, typer.Option(help="Unified layer skipping: keep int(L / SKIP) evenly spaced blocks.")
    ] = 0.0,
    fold_norm: Annotated[
        bool,
        typer.Option(
            "--fold-norm", help="Fold norm weight/bias into the linears that read them (exact)."
        ),
    ] = False,
    repbn: Annotated[
        bool,
        typer.Option(
            "--repbn",
            help="Replace the norms inside the blocks by BatchNorm (SLAB PRepBN, trained by "
            "distillation), then fold them.",
        ),
    ] = False,
    repbn_steps: Annotated[
        int | None,
        typer.Option(help="repbn training steps (default 300: the sample in a few minutes)."),
    ] = None,
    recover: Annotated[
        str | None,
        typer.Option(
            help="After the lossy passes, distill from the original: lora (merged back) or full."
        ),
    ] = None,
    recover_steps: Annotated[
        int | None, typer.Option(help="Most recover steps (default 100; early stop).")
    ] = None,
    sparse_attention: Annotated[
        float | None,
        typer.Option(
            help="Replace attention by sink + sliding-window attention keeping this share of "
            "the attention pairs (e.g. 0.25); windows per head are profiled on the calibration "
            "text at --seq-len, and the plan closest to the dense model on held-back text, the "
            "uniform window included, is kept (MoA). Pays off at long "
            "sequences: give --seq-len and --shape at the length you serve."
        ),
    ] = None,
    sparse_windows: Annotated[
        str, typer.Option(help="auto (validated best), per-head, per-layer or uniform.")
    ] = "auto",
    sink: Annotated[int, typer.Option(help="sparse-attention: first tokens every query sees.")] = 4,
    shape: Annotated[str, typer.Option(help="BATCHxSEQ to measure latency at.")] = "8x128",
    runtime: Annotated[
        str, typer.Option(help="torch, onnxruntime, or both (the search targets torch then).")
    ] = "both",
    threads: Annotated[int, typer.Option(help="Threads for every measurement.")] = 2,
    text: Annotated[
        Path | None, typer.Option(help="Calibration/evaluation text (.txt or .jsonl).")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed runs per round.")] = 10,
    rounds: Annotated[int, typer.Option(help="Interleaved measurement rounds.")] = 3,
    no_onnx: Annotated[bool, typer.Option("--no-onnx", help="Skip the ONNX export.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved recipe; build nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Optimize a checkpoint with the passes asked for; write recipe, .pt2, ONNX and report.

    Examples:

      trimformer optimize --drop-attention 2 --out runs/demo

      trimformer optimize ./my-bert --drop-blocks 1 --drop-mode iterative --shape 8x128

      trimformer optimize ./my-bert --int8 --runtime torch --shape 8x128
    """
    progress = _setup(quiet)
    if drop_mode not in ("one-shot", "iterative"):
        _fail(f"--drop-mode {drop_mode!r}: use one-shot or iterative", 2)
    if compensate not in ("lstsq", "bias", "none"):
        _fail(f"--compensate {compensate!r}: use lstsq, bias or none", 2)
    if runtime not in ("torch", "onnxruntime", "both"):
        _fail(f"--runtime {runtime!r}: use torch, onnxruntime or both", 2)
    if runtime != "torch" and no_onnx:
        _fail("--no-onnx needs --runtime torch (onnxruntime measures the ONNX program)", 2)
    counts = {
        k: v
        for k, v in (("attention", drop_attention), ("mlp", drop_mlp), ("blocks", drop_blocks))
        if v
    }
    if any(v < 0 for v in counts.values()):
        _fail("drop counts must be >= 0", 2)
    if not (0.0 <= prune_heads < 1.0 and 0.0 <= prune_neurons < 1.0):
        _fail("--prune-heads and --prune-neurons are fractions in [0, 1)", 2)
    if skip and skip <= 1.0:
        _fail(f"--skip {skip}: the skip ratio must be above 1 (e.g. 1.5 keeps 2/3 of blocks)", 2)
    if recover is not None and recover not in ("lora", "full"):
        _fail(f"--recover {recover!r}: use lora or full", 2)
    for flag, steps_, on in (("repbn", repbn_steps, repbn), ("recover", recover_steps, recover)):
        if steps_ is not None and not on:
            _fail(f"--{flag}-steps needs --{flag}", 2)
        if steps_ is not None and steps_ < 1:
            _fail(f"--{flag}-steps {steps_}: give at least 1 step", 2)
    manual = bool(counts) or bool(prune_heads) or bool(prune_neurons) or bool(skip) or int8
    manual = manual or fold_norm or repbn or bool(recover) or sparse_attention is not None
    if sparse_attention is not None:
        if not 0.0 < sparse_attention <= 1.0:
            _fail(f"--sparse-attention {sparse_attention}: give a density in (0, 1], e.g. 0.25", 2)
        if sparse_windows not in ("auto", "per-head", "per-layer", "uniform"):
            _fail(
                f"--sparse-windows {sparse_windows!r}: use auto, per-head, per-layer or uniform", 2
            )
        if sink < 0:
            _fail(f"--sink {sink}: give 0 or more tokens", 2)
    if manual and target_speedup is not None:
        _fail("give either --target-speedup or manual pass flags, not both", 2)
    if not manual and target_speedup is None:
        target_speedup = 1.5  # the default job: search for a 1.5x plan
    allow = {p.strip() for p in passes_.split(",") if p.strip()}
    from trimformer.passes import PASSES

    if no_int8:
        allow.discard("int8")
    unknown = allow - {"drop", "prune", "int8"}
    if unknown:
        _fail(
            f"--passes: the search can turn drop, prune and int8, not {', '.join(sorted(unknown))}",
            2,
        )
    allow &= set(PASSES)
    from trimformer.graph.capture import load_checkpoint
    from trimformer.optimizer.pipeline import Recipe, dump_recipe, parse_shape
    from trimformer.optimizer.run import check_out_dir, prepare, run

    parse_shape(shape)
    if not dry_run:
        check_out_dir(out_dir, force)
    loaded = load_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
    opts = _run_options(
        out=out_dir,
        shape=shape,
        runtime=runtime,
        threads=threads,
        text=text,
        seq_len=seq_len,
        onnx=not no_onnx,
        force=force,
        repeats=repeats,
        rounds=rounds,
    )
    prep = prepare(loaded, opts, progress)
    search_result = None
    if target_speedup is not None:
        from trimformer.optimizer.run import run_search

        search_result = run_search(
            loaded,
            prep,
            opts,
            target_speedup,
            allow,
            quality_floor,
            dry_run,
            progress,
            compensate,
        )
        steps = search_result.steps
    else:
        steps = manual_steps(
            prep,
            counts,
            drop_mode,
            prune_heads,
            prune_neurons,
            gqa_mode,
            skip,
            int8,
            progress,
            compensate,
            fold_norm=fold_norm,
            repbn=repbn,
            repbn_steps=repbn_steps,
            recover=recover,
            recover_steps=recover_steps,
            sparse=sparse_attention,
            sparse_windows=sparse_windows,
            sink=sink,
        )
    if dry_run:
        recipe = Recipe(model=str(loaded.source), shape=shape, passes=[s.to_entry() for s in steps])
        out.print(dump_recipe(recipe), end="")
        if search_result is not None:
            c = search_result.chosen
            err.print(
                f"predicted: {c.predicted_ms:.1f} ms vs baseline {search_result.baseline_ms:.1f} "
                f"ms ({search_result.baseline_ms / c.predicted_ms:.3f}x), calibration-loss "
                f"{c.proxy if c.proxy is not None else 0:.4f}"
            )
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = run(
        loaded,
        prep,
        steps,
        opts,
        progress,
        search=search_result.to_dict() if search_result is not None else None,
    )
    _finish(report, out_dir, as_json)
    if search_result is not None and not search_result.reached:
        err.print(f"[yellow]target not reached:[/yellow] {search_result.reason}")
        raise typer.Exit(3)


# ----------------------------------------------------------------------------- apply


@app.command()
@_guard
def apply(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe.yaml to replay.")],
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint (default: the recipe's `model`).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder to write.")] = Path(
        "runs/applied"
    ),
    shape: Annotated[str | None, typer.Option(help="Override the recipe's shape.")] = None,
    runtime: Annotated[str, typer.Option(help="torch, onnxruntime, or both.")] = "both",
    threads: Annotated[int, typer.Option()] = 2,
    text: Annotated[Path | None, typer.Option(help="Calibration/evaluation text.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per round.")] = 10,
    rounds: Annotated[int, typer.Option(help="Interleaved measurement rounds.")] = 3,
    no_onnx: Annotated[bool, typer.Option("--no-onnx")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out; apply even if the model digest differs.")
    ] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Replay a recipe exactly (no search) on a checkpoint.

    Example:

      trimformer apply runs/demo/recipe.yaml --out runs/again
    """
    progress = _setup(quiet)
    if runtime not in ("torch", "onnxruntime", "both"):
        _fail(f"--runtime {runtime!r}: use torch, onnxruntime or both", 2)
    from trimformer.graph.capture import checkpoint_digest, load_checkpoint
    from trimformer.optimizer.pipeline import load_recipe
    from trimformer.optimizer.run import check_out_dir, prepare, run

    recipe, steps = load_recipe(recipe_path)
    check_out_dir(out_dir, force)
    source = checkpoint or (Path(recipe.model) if recipe.model else None)
    loaded = load_checkpoint(source, trust_remote_code=trust_remote_code)
    if recipe.model_sha256 and not force:
        digest = checkpoint_digest(loaded.source)
        if digest != recipe.model_sha256:
            _fail(
                f"{loaded.source} is not the checkpoint {recipe_path} was made from (sha256 "
                f"{digest[:12]} != {recipe.model_sha256[:12]}); pass --force to apply anyway"
            )
    calib = recipe.calibration  # the data the recipe was made with, so data-fitted passes replay
    opts = _run_options(
        out=out_dir,
        shape=shape or recipe.shape,
        runtime=runtime,
        threads=threads,
        text=text or (Path(calib.text) if calib.text else None),
        seq_len=calib.seq_len,
        batch_size=calib.batch_size,
        calib_batches=calib.batches,
        onnx=not no_onnx,
        force=force,
        repeats=repeats,
        rounds=rounds,
    )
    prep = prepare(loaded, opts, progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = run(loaded, prep, steps, opts, progress)
    _finish(report, out_dir, as_json)


# ----------------------------------------------------------------------------- export


@app.command()
@_guard
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder with model.pt2.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    threads: Annotated[int, typer.Option()] = 2,
    quiet: Quiet = False,
) -> None:
    """(Re)export a run's program to ONNX and verify it in onnxruntime at unseen shapes.

    Example:

      trimformer export runs/demo --format onnx
    """
    progress = _setup(quiet)
    if fmt != "onnx":
        _fail(f"--format {fmt!r}: only onnx can be re-exported (model.pt2 is the source)", 2)
    from trimformer.optimizer.run import reexport_onnx

    check = reexport_onnx(run_dir, threads, progress)
    out.print(f"wrote {run_dir}/model.onnx; verified in onnxruntime: {check}")


# ----------------------------------------------------------------------------- bench


@app.command()
@_guard
def bench(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder.")],
    runtime: Annotated[str, typer.Option(help="torch, onnxruntime, or both.")] = "both",
    shape: Annotated[str, typer.Option(help="BATCHxSEQ.")] = "8x128",
    threads: Annotated[int, typer.Option()] = 2,
    repeats: Annotated[int, typer.Option(help="Runs per round.")] = 10,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds.")] = 3,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Measure a run's program against its original checkpoint, interleaved, in one process.

    Example:

      trimformer bench runs/demo --runtime onnxruntime --shape 1x128
    """
    progress = _setup(quiet)
    if runtime not in ("torch", "onnxruntime", "both"):
        _fail(f"--runtime {runtime!r}: use torch, onnxruntime or both", 2)
    from trimformer.optimizer.run import bench_run

    runtimes = ("torch", "onnxruntime") if runtime == "both" else (runtime,)
    result = bench_run(run_dir, runtimes, shape, threads, repeats, rounds, progress)
    if as_json:
        out.print_json(json.dumps(result))
        return
    from trimformer.report.render import latency_table

    out.print(latency_table(result))


@app.command()
@_guard
def profile(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Hugging Face model folder or .pt2 (default: sample).")
    ] = None,
    shape: Annotated[str, typer.Option(help="BATCHxSEQ the search will measure at.")] = "8x128",
    runtime: Annotated[str, typer.Option(help="torch, onnxruntime, or both.")] = "both",
    threads: Annotated[int, typer.Option()] = 2,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Build the device profile the cost model needs for this model and shape (cached).

    Times every op shape the search can produce (linears at each kept width, attention at each
    head count, elementwise sizes) on this machine, per runtime and thread count, and caches
    them (~/.cache/trimformer/profiles, or $TRIMFORMER_CACHE). `optimize` measures whatever is
    missing itself; this command does it ahead of time.

    Example:

      trimformer profile ./my-bert --shape 8x128 --runtime both --threads 4
    """
    _setup(quiet)
    if runtime not in ("torch", "onnxruntime", "both"):
        _fail(f"--runtime {runtime!r}: use torch, onnxruntime or both", 2)
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from trimformer.cost_model.predict import CostModel, build_profile, node_costs
    from trimformer.cost_model.profile import DeviceProfile
    from trimformer.graph.capture import load_checkpoint
    from trimformer.optimizer.pipeline import parse_shape
    from trimformer.optimizer.run import RunOptions, prepare, shape_inputs

    loaded = load_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
    parse_shape(shape)
    opts = RunOptions(out=Path("."), shape=shape, threads=threads, calib_batches=1, eval_batches=1)
    prep = prepare(loaded, opts, lambda m: None)
    costs = node_costs(prep.gm, prep.structure, shape_inputs(loaded, shape))
    blocks = [b.index for b in prep.structure.blocks]
    rows = []
    for rt in ("torch", "onnxruntime") if runtime == "both" else (runtime,):
        prof = DeviceProfile(rt, threads)
        t0 = time.perf_counter()
        with Progress(
            TextColumn(f"profiling {rt} ({threads} threads)"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            disable=quiet,
            transient=True,
        ) as bar:
            task = bar.add_task(rt, total=None)
            needed, measured = build_profile(
                CostModel(costs, prof),
                blocks,
                lambda done, total, t=task: bar.update(t, completed=done, total=total),
            )
        secs = time.perf_counter() - t0
        rows.append(
            {
                "runtime": rt,
                "threads": threads,
                "shape": shape,
                "entries_needed": needed,
                "entries_measured": measured,
                "seconds": round(secs, 1),
                "path": str(prof.path),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for r in rows:
        out.print(
            f"{r['runtime']}: {r['entries_needed']} op timings needed at {shape}, "
            f"{r['entries_measured']} measured now in {r['seconds']} s; cached in {r['path']}"
        )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
