"""recover — a short distillation from the original model after lossy passes (needs-training).

The graph (student) is trained to match the original model (teacher, `Context.teacher`: the
model before any pass) on calibration text, with the loss of `optimizer/train.py`: KL of the
next-token distributions for causal LMs, MSE of the final hidden states for encoders and image
models (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).

Methods:
- "lora" (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): each
  targeted linear reads `W + (α/r)·B·A` (A: r×in, B: out×r, B = 0 at the start, so training
  starts from the graph as it came); only A and B train. At the end the update is merged:

      W' = W + (α/r)·B·A              (GPT-2 Conv1D, W stored [in, out]: W' = W + (α/r)·(B·A)ᵀ)

  and the graph is plain ATen again. A fused projection (GPT-2 `c_attn`) gets one LoRA over all
  of q, k and v when any of them is targeted. A linear whose weight is shared (tied) is skipped.
- "full": every parameter trains.

Early stop: the last `heldout_fraction` of the calibration batches is held out; its loss is
measured before training and every `eval_every` steps, training stops after `patience`
measurements without improvement, and the best parameters are kept (possibly the untrained
ones: recover never leaves the model further from the original on held-out text than it found it).

Surgery (LoRA on one projection, while training, then merged):

    w = get_attr(q_proj.weight)                 w = get_attr(q_proj.weight)   # W + (α/r)·B·A
    d = call_module(lora_i, w)   # W + s·B·A    q = linear(x, w)
    q = linear(x, d)
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, fx, nn

from trimformer.errors import PassError
from trimformer.graph.rewrite import args_of, finish, get_param, set_arg, set_param
from trimformer.graph.structure import MLP, Attention, Linear, Structure
from trimformer.optimizer.train import TrainConfig, distill, rebatch
from trimformer.passes.base import Context, PassConfig, PassSpec

Node = fx.Node
Target = Literal["q", "k", "v", "o", "up", "gate", "down"]
ALL_TARGETS: tuple[Target, ...] = ("q", "k", "v", "o", "up", "gate", "down")
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}


class RecoverConfig(PassConfig):
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters, or every weight")
    steps: int = Field(100, ge=1, description="at most this many optimizer steps")
    lr: float | None = Field(None, gt=0, description="learning rate (lora 1e-3, full 1e-4)")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scale α (update scaled by α/r)")
    targets: list[Target] = Field(
        default_factory=lambda: list(ALL_TARGETS), description="projections that get LoRA"
    )
    batch_size: int = Field(8, ge=0, description="sequences per step (0: as the batches come)")
    heldout_fraction: float = Field(0.15, ge=0, lt=1, description="batches held out")
    eval_every: int = Field(20, ge=1, description="steps between held-out measurements")
    patience: int = Field(3, ge=0, description="measurements without improvement before stop")
    threads: int = Field(
        1, ge=0, description="torch threads while training (0: leave torch's setting)"
    )
    seed: int = 0


# ----------------------------------------------------------------------------- LoRA


class LoRAWeight(nn.Module):
    """W ↦ W + (α/r)·B·A (transposed for weights stored [in, out])."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, t: bool):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # PEFT's init; B = 0 keeps W at first
        self.scale = alpha / rank
        self.transposed = t

    def delta(self) -> Tensor:
        d = self.scale * (self.b @ self.a)  # out×in
        return d.t() if self.transposed else d

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta().to(weight.dtype)


def _targets(structure: Structure, targets: list[Target]) -> list[Linear]:
    chosen: dict[Node, Linear] = {}
    for sub in structure.sublayers():
        site = sub.site
        if isinstance(site, Attention):
            named = {"q": site.q.linear, "k": site.k.linear, "v": site.v.linear, "o": site.o}
        else:
            m: MLP = site
            named = {"up": m.up, "gate": m.gate, "down": m.down}  # type: ignore[dict-item]
        for t in targets:
            lin = named.get(t)
            if lin is not None:
                chosen.setdefault(lin.node, lin)
    return list(chosen.values())


def _weight_node(lin: Linear) -> tuple[str, Node]:
    name = "mat2" if lin.transposed else "weight"
    return name, args_of(lin.node)[name]


def _is_shared(gm: fx.GraphModule, w: Node) -> bool:
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == w.target]
    if len(readers) > 1 or len(w.users) > 1:
        return True
    t = get_param(gm, w.target)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return any(
        (p is t) and (name != w.target) and (name in used)
        for name, p in gm.named_parameters(remove_duplicate=False)
    )


def add_lora(
    gm: fx.GraphModule, structure: Structure, config: RecoverConfig
) -> tuple[list[tuple[str, LoRAWeight]], list[str]]:
    """Put a LoRAWeight between each targeted linear and its weight.

    Returns (linear name, module) for each adapted linear, and why others were skipped.
    """
    torch.manual_seed(config.seed)
    added, skipped = [], []
    for i, lin in enumerate(_targets(structure, config.targets)):
        arg, w = _weight_node(lin)
        if w.op != "get_attr" or _is_shared(gm, w):
            skipped.append(f"{lin.name}: weight is shared (tied); not adapted")
            continue
        module = LoRAWeight(
            lin.out_features, lin.in_features, config.rank, config.alpha, lin.transposed
        )
        name = f"trimformer_lora_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(lin.node):
            node = gm.graph.call_module(name, (w,))
        node.meta["val"] = w.meta.get("val")
        node.meta["trimformer"] = "recover: LoRA (training only)"
        set_arg(lin.node, arg, node)
        added.append((lin.name, module))
    gm.graph.lint()
    gm.recompile()
    return added, skipped


def merge_lora(gm: fx.GraphModule) -> int:
    """W := W + ΔW for every LoRAWeight node, which then goes; returns how many were merged."""
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, LoRAWeight):
            continue
        w = node.args[0]
        old = get_param(gm, w.target).detach()
        with torch.no_grad():
            new = (old.double() + module.delta().double()).to(old.dtype)
        set_param(gm, w.target, new)
        node.replace_all_uses_with(w)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        merged += 1
    finish(gm)
    return merged


# ----------------------------------------------------------------------------- the pass


def _split(batches: list[dict[str, Tensor]], fraction: float) -> tuple[list, list]:
    if fraction <= 0 or len(batches) < 2:
        return batches, []
    n = min(len(batches) - 1, max(1, round(fraction * len(batches))))
    return batches[:-n], batches[-n:]


def recover(
    gm: fx.GraphModule, structure: Structure, config: RecoverConfig, ctx: Context
) -> dict[str, Any]:
    """Distill gm towards ctx.teacher (LoRA merged back, or full fine-tuning)."""
    if ctx.teacher is None:
        raise PassError(
            "recover: no original model to distill from (Context.teacher is None); the driver "
            "sets it to the graph captured before any pass"
        )
    start = time.perf_counter()
    batches = rebatch(ctx.train_batches or ctx.batches, config.batch_size)
    train, heldout = _split(batches, config.heldout_fraction)
    if not train:
        raise PassError("recover: no calibration batches to train on; pass calibration text")
    skipped: list[str] = []
    if config.method == "lora":
        added, skipped = add_lora(gm, structure, config)
        if not added:
            raise PassError(
                f"recover: none of the targets {config.targets} was found in the structure; "
                "see `trimformer inspect`"
            )
        params = [p for _, m in added for p in m.parameters()]
    else:
        added = []
        params = [p for p in gm.parameters() if p.is_floating_point()]
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.method]
    result = distill(
        gm,
        ctx.teacher,
        train,
        kind=ctx.kind,
        params=params,
        config=TrainConfig(
            steps=config.steps,
            lr=lr,
            warmup_steps=min(10, config.steps // 10),
            eval_every=config.eval_every,
            patience=config.patience,
            seed=config.seed,
            log_every=max(1, config.steps // 20),
            threads=config.threads,
        ),
        heldout=heldout,
        progress=ctx.progress,
    )
    merged = merge_lora(gm) if config.method == "lora" else 0
    record = result.to_dict()
    return {
        "method": config.method,
        "lr": lr,
        "trained_params": sum(p.numel() for p in params),
        "adapted": [name for name, _ in added],
        "lora_merged": merged,
        "skipped": skipped,
        "heldout_loss_before": record["heldout"][0]["loss"] if record["heldout"] else None,
        "heldout_loss_after": record["best_heldout"],
        "training": record,
        "train_batches": len(train),
        "heldout_batches": len(heldout),
        "seconds": round(time.perf_counter() - start, 2),
    }


SPEC = PassSpec(
    name="recover",
    summary="distill from the original model after lossy passes (LoRA merged back, or full)",
    exactness="needs-training",
    config=RecoverConfig,
    knobs={
        "method": "lora or full fine-tuning",
        "steps": "most optimizer steps (early stop on held-out loss)",
        "rank": "LoRA rank",
    },
    apply=recover,
    paper="LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022); knowledge "
    "distillation (Hinton et al., 2015)",
)
