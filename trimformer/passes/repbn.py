"""repbn — norms inside the blocks become BatchNorm, progressively, then fold (needs-training).

Paper: Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, arXiv 2405.11582 (RepBN, PRepBN).

Formulas (per norm, C channels, x a token's C-vector):

    RepBN(x)      = BN(x) + η·x                     η: one learnable scalar per norm
    BN(x)         = γ_bn ⊙ (x − μ)/sqrt(σ² + ε) + β_bn   μ, σ²: per channel, over non-pad tokens
    PRepBN(x)     = λ·Norm(x) + (1 − λ)·RepBN(x)     λ: 1 → 0 linearly over `decay_steps`
                                                     (after `warm_steps` at λ = 1), then
                                                     `final_steps` at λ = 0
    eval, λ = 0:  RepBN(x) = a ⊙ x + b,  with s = 1/sqrt(σ²_run + ε),
                  a = γ_bn·s + η,  b = β_bn − γ_bn·μ_run·s

SLAB trains PRepBN from scratch; converting a trained model after the fact is our extension:
the model is distilled from its own unconverted copy on calibration text while λ falls (KL on
next-token distributions for causal LMs, MSE on final hidden states otherwise; see
`optimizer/train.py`). Then, with every weight frozen, the BN statistics are refreshed over
calibration batches (SLAB recalibrates the same way), and each RepBN, now a per-channel affine,
is folded into the linears that read it with the exact `fold-norm` rule (W' = W·diag(a),
c' = c + W b). Where a reader is not a linear (BERT's post-norm output is also the residual
stream) the affine stays as one mul + add — still cheaper than a norm: no reductions.

Init (`init`): "fit" (default, ours) starts the BN at the least-squares per-channel affine fit of
the norm on calibration tokens (γ_bn = k·sqrt(σ² + ε), β_bn = mean Norm(x), η = 0 with
k = cov(x, Norm(x))/var(x) per channel), so RepBN approximates Norm before training;
"zero" is SLAB's LLaMA recipe (γ_bn = β_bn = η = 0: the RepBN branch starts at zero).

Which norms: every sub-layer's pre-norm (Llama, GPT-2, ViT) or post-norm (BERT) of the chosen
`blocks` (default all) and `sublayers` (default attention and mlp), except, with `keep_final`, a
post-norm whose output is the model output (the last BERT block's). Norms outside the blocks
(final norm, embedding norm) stay.

Training knobs beyond SLAB (ours): `hidden_weight` adds per-norm hidden-state targets (each
converted norm's output vs the original norm's, layer-wise distillation as in TinyBERT, Jiao et
al. 2020) to the output loss; `model_lr_scale` trains the model's own weights at a lower
learning rate than the new BN parameters.

Surgery (Llama pre-norm, one sub-layer):

    before:    n = mul(γ, x * rsqrt(mean(x^2, -1) + eps));  q = linear(n, Wq); k = ...; v = ...
    training:  n = call_module(LinearNorm_i, x, attention_mask);  q = linear(n, Wq); ...
    after:     q = linear(x, Wq·diag(a), Wq·b); k = ...; v = ...   (biases created, no norm left)

    BERT post-norm: h = add(x, attn)  →  h' = add(mul(h, a), b); q/k/v and the residual read h'.

The result is plain ATen again (no call_module), so torch.export and ONNX export still work.
The changes record holds the loss curve, λ, per-norm η and the folded / kept affines.

Defaults are sized for the bundled sample (tinyllama-py, 5.4M parameters, 12 norms): 300 steps of
8×128 tokens on 1 thread took 5 min on the shared 2-core machine, held-out perplexity +2.4%
(benchmarks/RESULTS-repbn-recover.md has the current numbers).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, fx, nn

from trimformer.errors import PassError
from trimformer.graph.rewrite import (
    add_param,
    annotate,
    eliminate_dead_code,
    finish,
    get_param,
    module_path,
    tap,
)
from trimformer.graph.structure import Norm, Structure
from trimformer.optimizer.train import (
    ParamGroup,
    TrainConfig,
    TrainResult,
    distill,
    real_positions,
    rebatch,
)
from trimformer.passes.base import Context, PassConfig, PassSpec
from trimformer.passes.fold_norm import REPBN_NOTE, find_sites, fold_sites

aten = torch.ops.aten


class RepBNConfig(PassConfig):
    warm_steps: int = Field(0, ge=0, description="steps at λ = 1 before the decay")
    decay_steps: int = Field(220, ge=1, description="steps over which λ falls from 1 to 0")
    final_steps: int = Field(80, ge=0, description="steps at λ = 0 after the decay")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (cosine decay to 10%)")
    batch_size: int = Field(8, ge=0, description="sequences per step (0: as the batches come)")
    train: Literal["all", "norms"] = Field(
        "all", description="all parameters, or only the new BN / η parameters"
    )
    init: Literal["fit", "zero"] = Field("fit", description="BN init: norm fit, or SLAB's zeros")
    momentum: float = Field(0.1, gt=0, le=1, description="BN running-statistics momentum")
    refresh_batches: int = Field(
        16, ge=1, description="calibration batches for the final BN statistics refresh"
    )
    fit_batches: int = Field(4, ge=1, description="calibration batches for init='fit'")
    keep_final: bool = Field(True, description="keep a post-norm that is the model output")
    blocks: list[int] | None = Field(
        None, description="blocks whose norms are converted (None: every block)"
    )
    sublayers: list[Literal["attention", "mlp"]] = Field(
        default_factory=lambda: ["attention", "mlp"],
        description="which sub-layers' norms are converted (post-norm BERT: converting only "
        "'attention' keeps one real norm per block on the residual stream)",
    )
    model_lr_scale: float = Field(
        1.0,
        gt=0,
        description="with train='all': the model's own weights train at lr · model_lr_scale "
        "(the new BN / η parameters at lr)",
    )
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the per-norm hidden-state targets added to the output loss: "
        "each converted norm's output vs the original norm's, MSE over the original's variance "
        "(0: output loss only)",
    )
    threads: int = Field(
        1, ge=0, description="torch threads while training (0: leave torch's setting)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _enough_steps(self) -> RepBNConfig:
        if self.warm_steps + self.decay_steps + self.final_steps < 1:
            raise ValueError("repbn needs at least one training step")
        return self

    @property
    def steps(self) -> int:
        return self.warm_steps + self.decay_steps + self.final_steps

    def lam(self, step: int) -> float:
        """The blend weight λ of the norm at `step` (0-based)."""
        if step < self.warm_steps:
            return 1.0
        return max(0.0, 1.0 - (step - self.warm_steps + 1) / self.decay_steps)


# ----------------------------------------------------------------------------- the module


class LinearNorm(nn.Module):
    """PRepBN on token tensors (B, S, C): λ·Norm(x) + (1 − λ)·(BN(x) + η·x).

    Modes (its own flag: `ep.module()` graphs refuse `.train()` / `.eval()`):
    - "train": BN normalizes with the batch's statistics over non-pad tokens and updates its
      running statistics (momentum); at λ = 1 the RepBN branch is skipped (SLAB's warm phase);
    - "fit": returns Norm(x) and accumulates the per-channel moments used by init "fit";
    - "calibrate": like "train" but the running statistics become the exact mean/variance over
      every token seen (weights frozen by the caller);
    - "eval": running statistics; at λ = 0 the output is the affine `affine()` describes.
    """

    def __init__(
        self,
        kind: str,
        channels: int,
        eps: float,
        weight: Tensor | None,
        bias: Tensor | None,
        momentum: float,
        owner: str = "",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.owner = owner  # module path of the norm it replaces, where the folded params go
        self.eps = eps
        self.bn_eps = max(eps, 1e-6)
        self.momentum = momentum
        self.norm_weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.norm_bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.bn_weight = nn.Parameter(torch.zeros(channels))
        self.bn_bias = nn.Parameter(torch.zeros(channels))
        self.eta = nn.Parameter(torch.zeros(1))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.lam = 1.0
        self.mode = "train"
        self._sums: dict[str, Tensor] = {}
        self.source = ""  # name of the norm's output node in the graph it was inserted into
        self.keep_output = False  # keep the last output in `self.output` (hidden targets)
        self.output: Tensor | None = None

    def norm(self, x: Tensor) -> Tensor:
        if self.kind == "layer_norm":
            return F.layer_norm(x, x.shape[-1:], self.norm_weight, self.norm_bias, self.eps)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.norm_weight if self.norm_weight is not None else y

    def _accumulate(self, **values: Tensor) -> None:
        for k, v in values.items():
            v = v.detach().double().sum(0)
            self._sums[k] = self._sums[k] + v if k in self._sums else v

    def repbn(self, x: Tensor, real: Tensor) -> Tensor:
        if self.mode in ("train", "calibrate"):
            sel = x[real]  # N×C, non-pad tokens
            mean, var = sel.mean(0), sel.var(0, unbiased=False)
            if self.mode == "train":
                with torch.no_grad():
                    n = sel.shape[0]
                    unbiased = var * n / max(1, n - 1)
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(unbiased.detach(), self.momentum)
            else:
                self._accumulate(n=torch.ones_like(sel[:, :1]), x=sel, xx=sel * sel)
        else:
            mean, var = self.running_mean, self.running_var
        xhat = (x - mean) * torch.rsqrt(var + self.bn_eps)
        return xhat * self.bn_weight + self.bn_bias + self.eta * x

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        y = self._forward(x, attention_mask)
        self.output = y if self.keep_output else None
        return y

    def _forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        real = real_positions(mask, x)
        if self.mode == "fit":
            y = self.norm(x)
            sel, out = x[real], y[real]
            ones = torch.ones_like(sel[:, :1])
            self._accumulate(n=ones, x=sel, xx=sel * sel, y=out, xy=sel * out)
            return y
        if self.lam >= 1.0:
            return self.norm(x)
        rep = self.repbn(x, real)
        if self.lam <= 0.0:
            return rep
        return self.lam * self.norm(x) + (1.0 - self.lam) * rep

    @torch.no_grad()
    def finish_fit(self) -> None:
        """Set BN to the least-squares per-channel affine fit of Norm on the tokens seen."""
        s, n = self._sums, float(self._sums["n"][0])
        mx, my = s["x"] / n, s["y"] / n
        var = (s["xx"] / n - mx * mx).clamp_min(1e-12)
        k = (s["xy"] / n - mx * my) / var
        self.running_mean.copy_(mx)
        self.running_var.copy_(var)
        self.bn_weight.copy_(k * torch.sqrt(var + self.bn_eps))
        self.bn_bias.copy_(my)
        self.eta.zero_()
        self._sums = {}

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Running statistics := mean and (unbiased) variance over every token seen."""
        s, n = self._sums, float(self._sums["n"][0])
        mean = s["x"] / n
        var = (s["xx"] / n - mean * mean).clamp_min(0) * n / max(1.0, n - 1)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self._sums = {}

    @torch.no_grad()
    def affine(self) -> tuple[Tensor, Tensor]:
        """(a, b) with RepBN(x) = a ⊙ x + b in eval mode, computed in float64."""
        inv = torch.rsqrt(self.running_var.double() + self.bn_eps)
        w = self.bn_weight.double()
        a = w * inv + self.eta.double()
        b = self.bn_bias.double() - w * self.running_mean.double() * inv
        return a, b


# ----------------------------------------------------------------------------- rewrite


def _targets(gm: fx.GraphModule, structure: Structure, config: RepBNConfig) -> list[Norm]:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = set(out_node.all_input_nodes)
    n_blocks = len(structure.blocks)
    for b in config.blocks or []:
        if not 0 <= b < n_blocks:
            raise PassError(
                f"repbn: block {b} is out of range (the graph has {n_blocks} blocks, "
                f"0..{n_blocks - 1}); see `trimformer inspect`"
            )
    found: list[Norm] = []
    for block in structure.blocks:
        if config.blocks is not None and block.index not in config.blocks:
            continue
        for sub in block.sublayers:
            if sub.kind not in config.sublayers:
                continue
            for norm in (sub.pre_norm, sub.post_norm):
                if norm is None or any(norm.output is f.output for f in found):
                    continue
                if config.keep_final and norm is sub.post_norm and norm.output in outputs:
                    continue
                found.append(norm)
    return found


def _mask_node(gm: fx.GraphModule) -> fx.Node | None:
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target == "attention_mask":
            return n
    return None


def insert_linear_norms(
    gm: fx.GraphModule, structure: Structure, config: RepBNConfig
) -> list[tuple[fx.Node, LinearNorm]]:
    """Replace each chosen norm by a call_module LinearNorm; returns the nodes and modules."""
    mask = _mask_node(gm)
    created = []
    replaced: set[str] = set()
    for i, norm in enumerate(_targets(gm, structure, config)):
        val = norm.output.meta.get("val")
        if not isinstance(val, Tensor) or val.dim() != 3:
            raise PassError(
                f"repbn: norm {norm.output.name} ({module_path(norm.output)}) is not on a "
                "(batch, tokens, channels) tensor; this layout is not supported"
            )
        weight = get_param(gm, norm.weight) if norm.weight else None
        bias = get_param(gm, norm.bias) if norm.bias else None
        owner = (norm.weight or norm.bias or "").rpartition(".")[0]
        channels = int(val.shape[-1])
        module = LinearNorm(norm.kind, channels, norm.eps, weight, bias, config.momentum, owner)
        module.source = norm.output.name
        name = f"trimformer_repbn_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, module)
        args = (norm.input, mask) if mask is not None else (norm.input,)
        with gm.graph.inserting_before(norm.output):
            node = gm.graph.call_module(name, args)
        node.meta["val"] = val
        for key in ("nn_module_stack", "stack_trace"):
            if key in norm.output.meta:
                node.meta[key] = norm.output.meta[key]
        node.meta["trimformer"] = "repbn: LinearNorm (training only)"
        norm.output.replace_all_uses_with(node)
        created.append((node, module))
        replaced.update(t for t in (norm.weight, norm.bias) if t is not None)
    eliminate_dead_code(gm)
    # Not `finish`: it would drop the LinearNorm parameters, which no get_attr reads.
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in replaced - read:
        owner, _, name = target.rpartition(".")
        del gm.get_submodule(owner)._parameters[name]
    gm.graph.lint()
    gm.recompile()
    return created


def _linear_norms(gm: fx.GraphModule) -> list[LinearNorm]:
    return [m for m in gm.modules() if isinstance(m, LinearNorm)]


def _set(gm: fx.GraphModule, *, mode: str | None = None, lam: float | None = None) -> None:
    for m in _linear_norms(gm):
        if mode is not None:
            m.mode = mode
        if lam is not None:
            m.lam = lam


def _run(gm: fx.GraphModule, batches: list[dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for b in batches:
            gm(**b)


def fit_init(gm: fx.GraphModule, batches: list[dict[str, Tensor]]) -> None:
    """init 'fit': one forward over `batches` at λ = 1, then BN := the per-channel fit of Norm."""
    _set(gm, mode="fit", lam=1.0)
    _run(gm, batches)
    for m in _linear_norms(gm):
        m.finish_fit()
    _set(gm, mode="train")


def refresh_statistics(gm: fx.GraphModule, batches: list[dict[str, Tensor]]) -> None:
    """Frozen weights, λ = 0: running statistics := exact moments over `batches`; then eval."""
    _set(gm, mode="calibrate", lam=0.0)
    _run(gm, batches)
    for m in _linear_norms(gm):
        m.finish_calibration()
    _set(gm, mode="eval", lam=0.0)


def _param_name(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def fold_linear_norms(gm: fx.GraphModule, structure: Structure) -> dict[str, Any]:
    """Each eval-mode LinearNorm (λ = 0) becomes `x * a + b`, then folds into its linears."""
    adds = []
    etas: dict[str, float] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), LinearNorm):
            continue
        module: LinearNorm = gm.get_submodule(node.target)  # type: ignore[assignment]
        if module.lam != 0.0 or module.mode != "eval":
            raise PassError(
                f"repbn: {node.target} is at λ = {module.lam} in mode {module.mode}; only an "
                "eval-mode RepBN at λ = 0 is an affine that can be folded"
            )
        a, b = module.affine()
        x = node.args[0]
        dtype = node.meta["val"].dtype
        a_node = add_param(gm, _param_name(module.owner, "repbn_scale"), a.to(dtype), before=node)
        b_node = add_param(gm, _param_name(module.owner, "repbn_shift"), b.to(dtype), before=node)
        with gm.graph.inserting_before(node):
            mul = gm.graph.call_function(aten.mul.Tensor, (x, a_node))
            add = gm.graph.call_function(aten.add.Tensor, (mul, b_node))
        annotate(mul, node, REPBN_NOTE)
        annotate(add, node, REPBN_NOTE)
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        adds.append(add)
        etas[module_path(add) or add.name] = round(float(module.eta.detach()), 6)
    finish(gm)
    made = set(adds)
    sites = [s for s in find_sites(gm) if s.node in made]
    residual_adds = {s.add for s in structure.sublayers()}
    changes = fold_sites(gm, sites, residual_adds)
    changes["eta"] = etas
    return changes


# ----------------------------------------------------------------------------- hidden targets


class HiddenTargets:
    """Per-norm hidden-state targets: the original norms' outputs, next to the output loss.

    The loss for a training batch is `weight · mean_i ‖h_i − h*_i‖² / var(h*_i)` over real
    positions, h_i the i-th LinearNorm's output in the student's last forward, h*_i the output
    of the norm it replaced in the teacher (layer-wise distillation, as in TinyBERT: Jiao et
    al., 2020). Dividing by the target's variance weighs every norm alike whatever its scale.
    Teacher values are cached per batch while they fit in `budget` bytes.
    """

    def __init__(
        self,
        teacher: fx.GraphModule,
        modules: list[LinearNorm],
        weight: float,
        budget: int = 1 << 30,
    ) -> None:
        by_name = {n.name: n for n in teacher.graph.nodes}
        missing = [m.source for m in modules if m.source not in by_name]
        if missing:
            raise PassError(f"repbn: hidden targets: no node {missing[0]} in the original graph")
        self.probe = tap(teacher, [by_name[m.source] for m in modules])
        self.modules = modules
        self.weight = weight
        self.budget = budget
        self.used = 0
        self.cache: dict[int, tuple[Tensor, ...]] = {}
        for m in modules:
            m.keep_output = True

    def targets(self, index: int, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        hit = self.cache.get(index)
        if hit is not None:
            return hit
        with torch.no_grad():
            out = tuple(t.detach() for t in self.probe(**batch))
        size = sum(t.numel() * t.element_size() for t in out)
        if self.used + size <= self.budget:
            self.cache[index] = out
            self.used += size
        return out

    def __call__(self, index: int, batch: dict[str, Tensor]) -> Tensor:
        want = self.targets(index, batch)
        real = real_positions(batch, want[0])
        terms = []
        for m, t in zip(self.modules, want, strict=True):
            if m.output is None:
                raise PassError(f"repbn: hidden targets: {m.source} kept no output")
            target = t[real]
            terms.append((m.output[real] - target).pow(2).mean() / target.var().clamp_min(1e-12))
        return self.weight * torch.stack(terms).mean()

    def close(self) -> None:
        for m in self.modules:
            m.keep_output, m.output = False, None
        self.cache = {}


# ----------------------------------------------------------------------------- the pass


def convert(
    gm: fx.GraphModule, structure: Structure, config: RepBNConfig, ctx: Context
) -> tuple[list[str], TrainResult, int]:
    """Everything but the fold: insert LinearNorms, init, distill, refresh the BN statistics.

    Leaves gm with eval-mode LinearNorm call_module nodes at λ = 0 (runnable, not exportable);
    returns the converted norms' names, the training record and the number of training batches.
    """
    old_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _convert(gm, structure, config, ctx)
    finally:
        torch.set_num_threads(old_threads)


def _convert(
    gm: fx.GraphModule, structure: Structure, config: RepBNConfig, ctx: Context
) -> tuple[list[str], TrainResult, int]:
    batches = rebatch(ctx.train_batches or ctx.batches, config.batch_size)
    if not batches:
        raise PassError("repbn: no calibration batches to train on; pass calibration text")
    teacher = copy.deepcopy(gm)
    created = insert_linear_norms(gm, structure, config)
    if not created:
        raise PassError(
            "repbn: no norm inside the blocks was found (structure has no pre/post norms); "
            "run `trimformer inspect` to see the structure"
        )
    if config.init == "fit":
        fit_init(gm, batches[: config.fit_batches])
    if ctx.progress is not None:
        ctx.progress(f"repbn: {len(created)} norms -> PRepBN, {config.steps} steps")
    own = [p for m in _linear_norms(gm) for p in m.parameters()]
    mine = {id(p) for p in own}
    groups = [ParamGroup(own)]
    if config.train == "all":
        rest = [p for p in gm.parameters() if id(p) not in mine]
        groups.append(ParamGroup(rest, config.model_lr_scale))
    hidden = (
        HiddenTargets(teacher, [m for _, m in created], config.hidden_weight)
        if config.hidden_weight > 0
        else None
    )

    def before_step(step: int) -> dict[str, float]:
        lam = config.lam(step)
        _set(gm, mode="train", lam=lam)
        return {"lam": lam}

    train = TrainConfig(
        steps=config.steps,
        lr=config.lr,
        warmup_steps=min(20, config.steps // 10),
        seed=config.seed,
        log_every=max(1, config.steps // 20),
        threads=config.threads,
    )
    try:
        result = distill(
            gm,
            teacher,
            batches,
            kind=ctx.kind,
            params=groups,
            config=train,
            before_step=before_step,
            extra_loss=hidden,
            progress=ctx.progress,
        )
    finally:
        if hidden is not None:
            hidden.close()
    refresh_statistics(gm, batches[: config.refresh_batches])
    return [module_path(n) or n.name for n, _ in created], result, len(batches)


def repbn(
    gm: fx.GraphModule, structure: Structure, config: RepBNConfig, ctx: Context
) -> dict[str, Any]:
    """Convert the norms inside the blocks to folded RepBN by progressive distillation."""
    start = time.perf_counter()
    converted, result, n_batches = convert(gm, structure, config, ctx)
    folded = fold_linear_norms(gm, structure)
    return {
        "converted": converted,
        "converted_count": len(converted),
        **folded,
        "training": result.to_dict(),
        "train_batches": n_batches,
        "seconds": round(time.perf_counter() - start, 2),
    }


SPEC = PassSpec(
    name="repbn",
    summary="replace the norms inside the blocks by BatchNorm (PRepBN distillation), then fold",
    exactness="needs-training",
    config=RepBNConfig,
    knobs={
        "blocks": "which blocks' norms are converted (fewer: closer to the original)",
        "sublayers": "attention and/or mlp norms (fewer: closer to the original)",
        "hidden_weight": "per-norm hidden-state targets next to the output loss",
        "decay_steps": "length of the λ 1→0 schedule (longer: closer to the original)",
        "final_steps": "steps at λ = 0 before the BN statistics refresh",
        "lr": "learning rate of the distillation",
    },
    apply=repbn,
    paper="SLAB: Efficient Transformers with Simplified Linear Attention and Progressive "
    "Re-parameterized Batch Normalization (ICML 2024)",
)
