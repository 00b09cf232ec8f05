"""Distillation from the original model, shared by the passes that need training (repbn, recover).

Contract:
- `distill(student, teacher, batches, kind=..., params=..., config=...)` trains `params` (and only
  those) of `student` so that `student(**batch)` matches `teacher(**batch)` on calibration
  batches, and returns a `TrainResult` (loss curve, held-out curve, early-stop record). The
  student and teacher are modules called with keyword tensors that return ONE tensor (the
  trimformer model contract, see `optimizer/quality.py`); fx GraphModules from `ep.module()`
  train with autograd like any module. `requires_grad` of every parameter is restored afterwards.
- The teacher never gets gradients; its outputs are cached per batch while they fit in
  `TrainConfig.cache_bytes`, else recomputed each step.
- Loss, over real positions only (attention_mask 1; every position for images):
    causal-lm: KL(teacher ‖ student) of the next-token distributions, nats per position;
    encoder / image: mean squared error of the final hidden states, per element.
  This is plain knowledge distillation on outputs (Hinton et al., 2015, temperature 1).
- Optimizer: AdamW, linear warm-up then cosine decay to `min_lr_ratio · lr`, gradient norm
  clipped. With `heldout` batches and `eval_every > 0` the held-out loss is measured before
  training and every `eval_every` steps; training stops after `patience` measurements without
  improvement, and the parameters of the best measurement are put back (`TrainResult.best_step`;
  0 means training did not help and the student is left as it came).
- `threads` > 0 sets torch's intra-op thread count while training (restored afterwards). On a
  shared, loaded 2-core machine 1 thread trained 6x faster than 2 (OpenMP oversubscription).
- `before_step(step)` (optional) runs before each step (repbn sets its blend there) and may
  return numbers to log next to the loss; `progress(message)` gets a line every `log_every` steps.
- `extra_loss(index, batch)` (optional) runs right after the student's forward on training batch
  `index` and returns a scalar added to the loss (repbn's per-norm hidden-state targets: the
  student's intermediate values are read from where its forward left them). It is logged as
  "extra" next to the loss; held-out measurements use the output loss only.
- `params` are plain parameters (all at `lr`) or `ParamGroup`s, each at `lr · lr_scale` (the
  same schedule, scaled).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trimformer.errors import TrimformerError

Batch = dict[str, Tensor]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained at `lr_scale` times the schedule's learning rate."""

    params: Sequence[nn.Parameter]
    lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: no held-out measurement, no early stop
    patience: int = 3
    log_every: int = 10
    seed: int = 0
    cache_bytes: int = 1 << 30  # teacher outputs kept in memory up to this size
    threads: int = 0  # torch intra-op threads while training (0: leave as set)


@dataclass
class TrainResult:
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", extras...}
    heldout: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"}
    steps_run: int = 0
    stopped_early: bool = False
    best_step: int | None = None
    best_heldout: float | None = None
    seconds: float = 0.0
    loss_name: str = ""

    def to_dict(self, max_points: int = 60) -> dict[str, Any]:
        """JSON-ready, the training curve thinned to at most `max_points` entries."""
        every = max(1, math.ceil(len(self.curve) / max_points))
        curve = self.curve[::every]
        if self.curve and curve[-1] is not self.curve[-1]:
            curve.append(self.curve[-1])
        return {
            "loss": self.loss_name,
            "steps_run": self.steps_run,
            "first_loss": round(self.curve[0]["loss"], 6) if self.curve else None,
            "last_loss": round(self.curve[-1]["loss"], 6) if self.curve else None,
            "curve": [{k: round(v, 6) for k, v in p.items()} for p in curve],
            "heldout": [{k: round(v, 6) for k, v in p.items()} for p in self.heldout],
            "stopped_early": self.stopped_early,
            "best_step": self.best_step,
            "best_heldout": None if self.best_heldout is None else round(self.best_heldout, 6),
            "seconds": round(self.seconds, 2),
        }


LOSS_NAMES = {"causal-lm": "kl(teacher||student) per position", "encoder": "mse", "image": "mse"}


def real_positions(batch: Batch, out: Tensor) -> Tensor:
    """Bool B×S mask of the positions the loss looks at."""
    mask = batch.get("attention_mask")
    if mask is None or tuple(mask.shape) != tuple(out.shape[:2]):
        return torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
    return mask.to(out.device).bool()


def distill_loss(kind: str, student: Tensor, teacher: Tensor, real: Tensor) -> Tensor:
    """Mean distillation loss over the real positions (see the module docstring)."""
    s, t = student[real].float(), teacher[real].float()  # N×V or N×H
    if s.numel() == 0:
        raise TrimformerError("distillation batch has no real positions; check attention_mask")
    if kind == "causal-lm":
        log_t = F.log_softmax(t, dim=-1)
        log_s = F.log_softmax(s, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return (s - t).pow(2).mean()


def rebatch(batches: Sequence[Batch], rows: int) -> list[Batch]:
    """The same rows regrouped into batches of `rows` (0: as given; so are ragged shapes)."""
    if rows <= 0 or not batches:
        return list(batches)
    keys = list(batches[0])
    trailing = {k: tuple(batches[0][k].shape[1:]) for k in keys}
    if any(
        (list(b) != keys) or any(tuple(b[k].shape[1:]) != trailing[k] for k in keys)
        for b in batches
    ):
        return list(batches)
    stacked = {k: torch.cat([b[k] for b in batches]) for k in keys}
    total = next(iter(stacked.values())).shape[0]
    return [{k: v[i : i + rows] for k, v in stacked.items()} for i in range(0, total, rows)]


class TeacherOutputs:
    """The teacher's outputs per batch index, cached while they fit in a byte budget."""

    def __init__(self, teacher: Callable[..., Tensor], budget: int) -> None:
        self.teacher = teacher
        self.budget = budget
        self.cache: dict[int, Tensor] = {}
        self.used = 0

    def __call__(self, index: int, batch: Batch) -> Tensor:
        hit = self.cache.get(index)
        if hit is not None:
            return hit
        with torch.no_grad():
            out = self.teacher(**batch)
        if not isinstance(out, Tensor):
            raise TrimformerError(
                f"the teacher returned {type(out).__name__}, not one tensor; wrap it so forward "
                "returns the logits or the last hidden state"
            )
        out = out.detach()
        size = out.numel() * out.element_size()
        if self.used + size <= self.budget:
            self.cache[index] = out
            self.used += size
        return out


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate_loss(
    student: Callable[..., Tensor],
    teacher: TeacherOutputs,
    batches: Sequence[Batch],
    kind: str,
    offset: int,
) -> float:
    """Mean distillation loss over `batches` (teacher cache indices start at `offset`)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            want = teacher(offset + i, batch)
            got = student(**batch)
            real = real_positions(batch, want)
            n = int(real.sum())
            total += float(distill_loss(kind, got, want, real)) * n
            count += n
    return total / max(1, count)


def distill(
    student: nn.Module,
    teacher: Callable[..., Tensor],
    batches: Sequence[Batch],
    *,
    kind: str,
    params: Sequence[nn.Parameter] | Sequence[ParamGroup],
    config: TrainConfig,
    heldout: Sequence[Batch] = (),
    before_step: Callable[[int], dict[str, float] | None] | None = None,
    extra_loss: Callable[[int, Batch], Tensor] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train `params` of `student` towards `teacher` on `batches`; see the module docstring."""
    if kind not in LOSS_NAMES:
        raise TrimformerError(f"distill: unknown model kind {kind!r}; one of {list(LOSS_NAMES)}")
    if not batches:
        raise TrimformerError("distill: no training batches; pass calibration text")
    if all(isinstance(g, ParamGroup) for g in params):
        groups = [g for g in params if isinstance(g, ParamGroup) and g.params]
    else:
        groups = [ParamGroup(list(params))]  # type: ignore[arg-type]
    params = [p for g in groups for p in g.params]
    if not params:
        raise TrimformerError("distill: no parameters to train")
    torch.manual_seed(config.seed)
    every_param = list(student.parameters())
    flags = {id(p): p.requires_grad for p in every_param}
    chosen = {id(p) for p in params}
    for p in every_param:
        p.requires_grad_(id(p) in chosen)
    for p in params:
        p.requires_grad_(True)
    teacher_out = TeacherOutputs(teacher, config.cache_bytes)
    optimizer = torch.optim.AdamW(
        [{"params": list(g.params), "lr_scale": g.lr_scale} for g in groups],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    result = TrainResult(loss_name=LOSS_NAMES[kind])
    best_state: list[Tensor] | None = None
    bad_evals = 0
    start = time.perf_counter()
    shuffle = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(batches), generator=shuffle)
    measure = bool(heldout) and config.eval_every > 0
    old_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        if measure:  # step 0: the untrained student is a candidate for "best" too
            held = evaluate_loss(student, teacher_out, heldout, kind, len(batches))
            result.heldout.append({"step": 0.0, "loss": held})
            result.best_heldout, result.best_step = held, 0
            best_state = [p.detach().clone() for p in params]
        for step in range(config.steps):
            extras = (before_step(step) if before_step is not None else None) or {}
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config) * group["lr_scale"]
            if step > 0 and step % len(batches) == 0:  # a new pass over the data, new order
                order = torch.randperm(len(batches), generator=shuffle)
            index = int(order[step % len(batches)])
            batch = batches[index]
            want = teacher_out(index, batch)
            got = student(**batch)
            loss = distill_loss(kind, got, want, real_positions(batch, want))
            value = float(loss.detach())  # the curve shows the output loss
            if extra_loss is not None:
                extra = extra_loss(index, batch)
                extras = {**extras, "extra": float(extra.detach())}
                loss = loss + extra
            if not math.isfinite(float(loss.detach())):
                raise TrimformerError(
                    f"distillation diverged at step {step} (loss {value}); lower the "
                    "learning rate or lengthen the schedule"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            result.steps_run = step + 1
            result.curve.append({"step": float(step), "loss": value, **extras})
            if progress is not None and (step % config.log_every == 0 or step + 1 == config.steps):
                more = "".join(f" {k} {v:.3f}" for k, v in extras.items())
                progress(f"step {step + 1}/{config.steps} loss {value:.4f}{more}")
            last = step + 1 == config.steps
            if measure and ((step + 1) % config.eval_every == 0 or last):
                held = evaluate_loss(student, teacher_out, heldout, kind, len(batches))
                result.heldout.append({"step": float(step + 1), "loss": held})
                if result.best_heldout is None or held < result.best_heldout:
                    result.best_heldout, result.best_step = held, step + 1
                    best_state = [p.detach().clone() for p in params]
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if config.patience > 0 and bad_evals >= config.patience:
                        result.stopped_early = True
                        if progress is not None:
                            progress(f"early stop at step {step + 1}: held-out loss rose")
                        break
        if best_state is not None and result.best_step != result.steps_run:
            with torch.no_grad():
                for p, saved in zip(params, best_state, strict=True):
                    p.copy_(saved)
    finally:
        torch.set_num_threads(old_threads)
        for p in every_param:
            p.requires_grad_(flags.get(id(p), False))
        for p in params:
            if id(p) not in flags:
                p.requires_grad_(False)
        result.seconds = time.perf_counter() - start
    return result
