"""Recipes and the driver that applies them.

A recipe is plain YAML: where the model came from (with a digest, checked when replayed), the
shape the latency numbers refer to, and the passes in order, every knob resolved:

    model: ./my-llama
    model_sha256: 3f1c...
    shape: 8x128
    passes:
      - name: cleanup
      - name: drop
        attention: [2, 3]

The driver runs a flat list of (pass, config) steps. After every pass it lints and recompiles
the graph, runs it on a sample batch, checks the output shape and that it is finite, and
re-discovers the structure for the next pass. A failure names the pass and what ran before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import fx

from trimformer.errors import PassError, RecipeError
from trimformer.graph.flops import count_flops
from trimformer.graph.rewrite import count_parameters
from trimformer.graph.structure import Structure, discover
from trimformer.passes import PASSES
from trimformer.passes.base import Context, PassConfig, PassRecord, PassSpec


def parse_shape(text: str) -> tuple[int, int]:
    """'8x128' -> (8, 128)."""
    try:
        b, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise RecipeError(f"shape {text!r} is not BATCHxSEQ (e.g. 8x128)") from None
    if b < 1 or s < 1:
        raise RecipeError(f"shape {text!r} needs a positive batch and sequence length")
    return b, s


class Calibration(BaseModel):
    """The calibration text a run used: passes that read data replay only on the same data."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None  # a text file; None is Python's documentation (the default split)
    seq_len: int = Field(128, ge=1)
    batch_size: int = Field(4, ge=1)
    batches: int = Field(4, ge=1)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    model_sha256: str | None = None
    shape: str = "8x128"
    calibration: Calibration = Calibration()
    passes: list[dict[str, Any]] = []

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        try:
            parse_shape(v)
        except RecipeError as e:
            raise ValueError(str(e)) from None
        return v


@dataclass(frozen=True)
class Step:
    spec: PassSpec
    config: PassConfig
    importance: dict[str, Any] | None = None  # scores the planner chose this config by

    def to_entry(self) -> dict[str, Any]:
        return {"name": self.spec.name, **self.config.model_dump(mode="json")}


def resolve_steps(entries: list[dict[str, Any]], where: str = "recipe") -> list[Step]:
    """Validate recipe entries against the pass table; one clear line per problem."""
    steps = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise RecipeError(f"{where}: passes[{i}] needs a `name` (one of {', '.join(PASSES)})")
        name = entry["name"]
        spec = PASSES.get(name)
        if spec is None:
            raise RecipeError(
                f"{where}: passes[{i}] names unknown pass {name!r}; known passes: "
                f"{', '.join(PASSES)} (see `trimformer passes`)"
            )
        body = {k: v for k, v in entry.items() if k != "name"}
        try:
            config = spec.config.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "(config)"
            known = ", ".join(spec.config.model_fields) or "none"
            raise RecipeError(
                f"{where}: passes[{i}] ({name}) key {loc!r}: {err['msg']}; "
                f"keys this pass takes: {known}"
            ) from None
        steps.append(Step(spec, config))
    return steps


def load_recipe(path: Path) -> tuple[Recipe, list[Step]]:
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with `passes:` (see `trimformer passes`)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise RecipeError(f"{path}: {loc!r}: {err['msg']}") from None
    return recipe, resolve_steps(recipe.passes, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- driver


def verify_graph(gm: fx.GraphModule, sample: dict[str, torch.Tensor], expect: torch.Size) -> None:
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        out = gm(**sample)
    if not isinstance(out, torch.Tensor):
        raise PassError(f"the graph returns {type(out).__name__}, expected one tensor")
    if out.shape != expect:
        raise PassError(
            f"output shape {tuple(out.shape)} differs from the original {tuple(expect)}"
        )
    if not torch.isfinite(out).all():
        raise PassError("output has NaN or inf values")


def run_steps(
    gm: fx.GraphModule,
    steps: list[Step],
    ctx: Context,
    sample: dict[str, torch.Tensor],
    shape_inputs: dict[str, torch.Tensor],
    on_step: Callable[[str], None] | None = None,
) -> tuple[Structure, list[PassRecord]]:
    """Apply steps to gm in place, verifying after each; returns the final structure and records."""
    with torch.no_grad():
        expect = gm(**sample).shape
    structure = discover(gm)
    records: list[PassRecord] = []
    for i, step in enumerate(steps):
        if on_step is not None:
            on_step(step.spec.name)
        before = (count_parameters(gm), count_flops(gm, shape_inputs), len(gm.graph.nodes))
        t0 = time.perf_counter()
        ran = ", ".join(s.spec.name for s in steps[:i]) or "nothing"
        try:
            changes = step.spec.apply(gm, structure, step.config, ctx)
            verify_graph(gm, sample, expect)
            structure = discover(gm)
        except PassError as e:
            raise PassError(f"pass {step.spec.name} (after {ran}): {e}") from None
        except Exception as e:  # a graph the pass left broken: still name the pass
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise PassError(
                f"pass {step.spec.name} (after {ran}) left a graph that does not run "
                f"({type(e).__name__}: {first}); report this with the recipe"
            ) from None
        seconds = time.perf_counter() - t0
        records.append(
            PassRecord(
                name=step.spec.name,
                exactness=step.spec.exactness,
                config=step.config.model_dump(mode="json"),
                changes=changes,
                importance=step.importance or {},
                params_before=before[0],
                params_after=count_parameters(gm),
                flops_before=before[1],
                flops_after=count_flops(gm, shape_inputs),
                nodes_before=before[2],
                nodes_after=len(gm.graph.nodes),
                seconds=seconds,
            )
        )
    return structure, records
