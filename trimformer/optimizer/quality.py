"""What an optimization costs in quality, measured against the original model.

Contract:
- A model is a `torch.nn.Module` called as `model(**batch.inputs)` with keyword tensors only and
  returning ONE tensor: causal LMs return logits (B×S×V), encoders the last hidden state (B×S×H),
  image models the last hidden state (B×T×H). The model's kind is one of `KINDS`.
- `reference_outputs` records the original's outputs once; `evaluate` runs a candidate on the same
  batches and compares it with that record. Every metric is computed, including the baseline's
  (`baseline_metrics` evaluates the original against a fresh record of itself, so a model that is
  not deterministic, e.g. left in train mode with dropout, shows kl > 0 rather than a flattering 0).
- Metrics only ever look at real positions: pad positions (attention_mask 0) are excluded, so the
  ids under the padding and the outputs there cannot move any number.

Metrics, by kind:
- causal-lm, over next-token positions t whose source t and target t+1 are both real tokens:
  `perplexity` = exp(mean cross-entropy of the candidate's logits at t against the token at t+1),
  `kl` = mean KL(original ‖ candidate) of the next-token distributions at t, in nats per position,
  `top1_agreement` = fraction of positions where the candidate's argmax equals the original's.
- encoder: `cosine` = mean over sequences of cos(mask-weighted mean pool of the candidate,
  same pool of the original); `token_cosine` = mean over real tokens of the per-token cosine.
- image: `cosine` = mean over images of the cosine of the position-0 (CLS) outputs;
  `token_cosine` = mean over all output tokens of the per-token cosine. There is no image data
  offline, so image batches are synthetic (see `make_image_batches`): image metrics say how closely
  the candidate agrees with the original, never how well either one sees.

Sums are accumulated in float64 so that an unchanged model scores kl 0 and cosine 1 to within
rounding instead of to within fp32 noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trimformer.errors import TrimformerError

KINDS = ("causal-lm", "encoder", "image")

# Headline metric per kind and which direction is better.
_PRIMARY: dict[str, tuple[str, str]] = {
    "causal-lm": ("perplexity", "min"),
    "encoder": ("cosine", "max"),
    "image": ("cosine", "max"),
}

# ImageNet statistics: vision checkpoints expect inputs normalized this way.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Log-probabilities are computed in float64 chunks of at most this many elements (128 MiB), so a
# 150k-token vocabulary does not need B×S×V float64 tensors at once.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Batch:
    """Inputs for one call, `model(**batch.inputs)`.

    `tokens` counts the real positions: non-pad tokens for text batches, images for image batches.
    """

    inputs: dict[str, Tensor]
    tokens: int

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every input moved to `device`."""
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.tokens)


@dataclass(frozen=True)
class QualityResult:
    """Metrics of one model on a fixed set of batches.

    `positions` is how many units the averages run over: next-token positions for causal LMs,
    sequences for encoders, images for image models (0 when unknown).
    """

    metrics: dict[str, float]
    positions: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy: {"metrics": {...}, "positions": n}."""
        return {"metrics": dict(self.metrics), "positions": self.positions}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise TrimformerError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def primary_metric(kind: str) -> tuple[str, str]:
    """The headline metric of `kind` and whether it is better high ("max") or low ("min")."""
    _check_kind(kind)
    return _PRIMARY[kind]


# ---------------------------------------------------------------------------------------------
# Batches


def _token_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    # verbose=False: documents are longer than model_max_length on purpose (they are cut into
    # windows afterwards), so the tokenizer's length warning would only be noise.
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] … [SEP]).

    Found by encoding a probe with and without special tokens and locating the plain ids inside
    the framed ones, so it works for CLS/SEP, BOS-only and no-framing tokenizers alike.
    """
    probe = "the quality probe"
    plain = _token_ids(tokenizer, probe, special=False)
    framed = _token_ids(tokenizer, probe, special=True)
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    raise TrimformerError(
        f"tokenizer {type(tokenizer).__name__} changes the text's tokens when it adds special "
        "tokens, so windows cannot be framed; pass a tokenizer whose special tokens only wrap text"
    )


def _ids_of(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return int(value) if isinstance(value, int) else None


def make_text_batches(
    tokenizer: Any,
    docs: Sequence[str],
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    pad_ragged: bool = True,
) -> list[Batch]:
    """Deterministic `input_ids`/`attention_mask` batches (int64, B×seq_len) from documents.

    Documents are tokenized in order without special tokens and concatenated, each followed by
    the tokenizer's EOS (SEP for BERT-style tokenizers without EOS; nothing if it has neither).
    The stream is cut into non-overlapping windows; if the tokenizer frames text with special
    tokens ([CLS] … [SEP], or a BOS), each window keeps that framing, so an encoder sees inputs
    shaped like the ones it was trained on. Windows are grouped into at most `max_batches` batches
    of `min(batch_size, windows)` rows; every batch has the same shape and leftover windows are
    dropped. Documents are only tokenized until enough windows exist.

    With `pad_ragged` and at least 2 rows, the last row of every batch is cut to about 3/4 of
    `seq_len` (framing kept) and right-padded with attention_mask 0, so that padding handling is
    exercised. The pad id is the tokenizer's pad token, else EOS, else 0.

    Raises TrimformerError on bad sizes or when the text does not fill one window.
    """
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("max_batches", max_batches),
    ):
        if value < 1:
            raise TrimformerError(f"make_text_batches: {name} must be at least 1, got {value}")
    prefix, suffix = _framing(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    # Two content tokens make the smallest window with a next-token target.
    if body < 2:
        framing = len(prefix) + len(suffix)
        raise TrimformerError(
            f"seq_len {seq_len} leaves {body} token(s) beside the tokenizer's {framing} special "
            f"tokens; use seq_len >= {framing + 2}"
        )
    eos = _ids_of(tokenizer, "eos_token_id")
    sep = eos if eos is not None else _ids_of(tokenizer, "sep_token_id")
    pad = _ids_of(tokenizer, "pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)

    wanted = max_batches * batch_size * body
    stream: list[int] = []
    for doc in docs:
        stream.extend(_token_ids(tokenizer, doc, special=False))
        if sep is not None:
            stream.append(sep)
        if len(stream) >= wanted:
            break
    n_windows = len(stream) // body
    if n_windows == 0:
        raise TrimformerError(
            f"the text gave {len(stream)} tokens ({len(docs)} document(s)) but one window of "
            f"seq_len {seq_len} needs {body} besides special tokens; "
            "pass more text or a smaller seq_len"
        )
    rows = min(batch_size, n_windows)
    n_batches = min(max_batches, n_windows // rows)

    # Length of the shortened last row; skipped when seq_len is too small to shorten meaningfully.
    ragged = seq_len - max(1, seq_len // 4)
    ragged_body = ragged - len(prefix) - len(suffix)
    pad_last = pad_ragged and rows >= 2 and ragged_body >= 2

    batches = []
    for b in range(n_batches):
        ids = torch.full((rows, seq_len), pad, dtype=torch.int64)
        mask = torch.zeros((rows, seq_len), dtype=torch.int64)
        for r in range(rows):
            start = (b * rows + r) * body
            keep = ragged_body if (pad_last and r == rows - 1) else body
            row = prefix + stream[start : start + keep] + suffix
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[r, : len(row)] = 1
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, int(mask.sum())))
    return batches


def make_image_batches(
    image_size: int,
    channels: int,
    *,
    batch_size: int,
    max_batches: int,
    seed: int = 0,
) -> list[Batch]:
    """Deterministic synthetic `pixel_values` batches (float32, B×channels×size×size).

    There is no image data set offline, so images are smooth random fields: noise drawn at 2×2,
    4×4 and 8×8 and upsampled bilinearly, amplitudes falling with frequency, one field shared by
    all channels plus a weaker field per channel (colour varies less than brightness). Each image
    is scaled to [0, 1] and normalized with ImageNet's mean and std (0.5/0.5 unless 3 channels).
    Quality metrics on these are therefore only output-agreement metrics (candidate vs original),
    not accuracy. `Batch.tokens` is the number of images.
    """
    for name, value in (
        ("image_size", image_size),
        ("channels", channels),
        ("batch_size", batch_size),
        ("max_batches", max_batches),
    ):
        if value < 1:
            raise TrimformerError(f"make_image_batches: {name} must be at least 1, got {value}")
    gen = torch.Generator().manual_seed(seed)
    if channels == 3:
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    else:
        mean, std = torch.tensor(0.5), torch.tensor(0.5)

    def field(width: int) -> Tensor:
        # B×width×k×k noise per octave, upsampled to B×width×size×size and summed.
        total = torch.zeros(batch_size, width, image_size, image_size)
        for k in (2, 4, 8):
            noise = torch.randn(batch_size, width, k, k, generator=gen) * (2.0 / k)
            total += F.interpolate(noise, size=(image_size, image_size), mode="bilinear")
        return total

    batches = []
    for _ in range(max_batches):
        x = field(1) + 0.5 * field(channels)  # B×C×H×W
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
        batches.append(Batch({"pixel_values": ((x - mean) / std).float()}, batch_size))
    return batches


# ---------------------------------------------------------------------------------------------
# Outputs and metrics


def _forward(model: torch.nn.Module, batch: Batch, index: int) -> Tensor:
    out = model(**batch.inputs)
    if not isinstance(out, Tensor):
        raise TrimformerError(
            f"batch {index}: the model returned {type(out).__name__}, not one tensor; wrap it so "
            "forward returns the logits (causal LM) or the last hidden state (encoder, image)"
        )
    return out.detach().float()


def reference_outputs(model: torch.nn.Module, batches: Sequence[Batch]) -> list[Tensor]:
    """The model's outputs on each batch, as float32, without gradients.

    The caller puts the model in eval mode (exported programs cannot be switched here).
    """
    with torch.no_grad():
        return [_forward(model, batch, i) for i, batch in enumerate(batches)]


def _chunks(n: int, width: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _causal_lm_sums(out: Tensor, ref: Tensor, batch: Batch) -> dict[str, float]:
    ids = batch.inputs["input_ids"].to(out.device)
    real = batch.inputs["attention_mask"].to(out.device).bool()
    # Position t predicts token t+1: both must be real tokens.
    valid = real[:, :-1] & real[:, 1:]  # B×(S-1)
    cand = out[:, :-1][valid]  # N×V
    orig = ref[:, :-1][valid]  # N×V
    target = ids[:, 1:][valid]  # N
    sums = {"nll": 0.0, "kl": 0.0, "agree": 0.0, "n": float(target.numel())}
    for part in _chunks(target.numel(), cand.shape[-1]):
        log_c = torch.log_softmax(cand[part].double(), dim=-1)
        log_o = torch.log_softmax(orig[part].double(), dim=-1)
        sums["nll"] -= float(log_c.gather(-1, target[part, None]).sum())
        # KL(original ‖ candidate) = Σ p_o (log p_o − log p_c); tokens the original rules out
        # (log p_o = −inf) contribute 0, not nan.
        terms = log_o.exp() * (log_o - log_c)
        sums["kl"] += float(torch.where(torch.isneginf(log_o), 0.0, terms).sum())
        sums["agree"] += float((cand[part].argmax(-1) == orig[part].argmax(-1)).sum())
    return sums


def _cosine_sums(out: Tensor, ref: Tensor, real: Tensor, pooled: str) -> dict[str, float]:
    out, ref, real = out.double(), ref.double(), real.to(out.device).bool()
    token_cos = F.cosine_similarity(out, ref, dim=-1)  # B×S
    if pooled == "mean":
        # Mask-weighted mean pool: the sentence embedding most encoders are used through.
        w = real.double().unsqueeze(-1)  # B×S×1
        count = w.sum(1).clamp_min(1.0)
        seq_cos = F.cosine_similarity((out * w).sum(1) / count, (ref * w).sum(1) / count, dim=-1)
        seq_cos = seq_cos[real.any(1)]
    else:
        seq_cos = F.cosine_similarity(out[:, 0], ref[:, 0], dim=-1)  # CLS token
    return {
        "seq": float(seq_cos.sum()),
        "seqs": float(seq_cos.numel()),
        "tok": float(token_cos[real].sum()),
        "toks": float(real.sum()),
    }


def _score(
    kind: str, outputs: Sequence[Tensor], batches: Sequence[Batch], reference: Sequence[Tensor]
) -> QualityResult:
    totals: dict[str, float] = {}
    for i, (out, ref, batch) in enumerate(zip(outputs, reference, batches, strict=True)):
        ref = ref.to(out.device)
        if out.shape != ref.shape:
            raise TrimformerError(
                f"batch {i}: candidate output shape {tuple(out.shape)} differs from the "
                f"original's {tuple(ref.shape)}; a pass changed the model's output"
            )
        if out.dim() != 3:
            raise TrimformerError(
                f"batch {i}: {kind} output has shape {tuple(out.shape)}; expected 3 dimensions "
                "(B×S×V logits or B×S×H hidden states)"
            )
        if kind == "causal-lm":
            sums = _causal_lm_sums(out, ref, batch)
        elif kind == "encoder":
            sums = _cosine_sums(out, ref, batch.inputs["attention_mask"], pooled="mean")
        else:
            real = torch.ones(out.shape[:2], dtype=torch.bool)
            sums = _cosine_sums(out, ref, real, pooled="cls")
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value

    if kind == "causal-lm":
        n = totals.get("n", 0.0)
        if n == 0:
            raise TrimformerError(
                "no next-token positions to score (every row has fewer than 2 real tokens); "
                "make batches with a longer seq_len"
            )
        mean_nll = totals["nll"] / n
        # exp overflows a float above ~709 nats; such a model is broken, say so with inf.
        ppl = math.exp(mean_nll) if mean_nll < 709.0 else math.inf
        metrics = {"perplexity": ppl, "kl": totals["kl"] / n, "top1_agreement": totals["agree"] / n}
        return QualityResult(metrics, int(n))
    seqs, toks = totals.get("seqs", 0.0), totals.get("toks", 0.0)
    if seqs == 0 or toks == 0:
        raise TrimformerError(
            f"no real tokens to score in {len(batches)} batch(es); check the masks"
        )
    metrics = {"cosine": totals["seq"] / seqs, "token_cosine": totals["tok"] / toks}
    return QualityResult(metrics, int(seqs))


def evaluate(
    kind: str,
    model: torch.nn.Module,
    batches: Sequence[Batch],
    reference: Sequence[Tensor],
) -> QualityResult:
    """Metrics of `model` on `batches` against the original's `reference` outputs.

    See the module docstring for the metric definitions; all ignore pad positions. Raises
    TrimformerError for an unknown kind, a reference of the wrong length, or outputs whose shape
    differs from the reference.
    """
    _check_kind(kind)
    if len(reference) != len(batches):
        raise TrimformerError(
            f"{len(batches)} batches but {len(reference)} reference outputs; "
            "capture the reference with reference_outputs on the same batches"
        )
    with torch.no_grad():
        outputs = [_forward(model, batch, i) for i, batch in enumerate(batches)]
        return _score(kind, outputs, batches, reference)


def baseline_metrics(
    kind: str,
    model: torch.nn.Module,
    batches: Sequence[Batch],
    reference: Sequence[Tensor] | None = None,
) -> QualityResult:
    """The original's own metrics: `evaluate` against its reference (captured here if not given).

    Computed, not assumed: a deterministic model gets kl 0, agreement 1 and cosine 1 to within
    rounding, and its real perplexity.
    """
    if reference is None:
        reference = reference_outputs(model, batches)
    return evaluate(kind, model, batches, reference)


def quality_delta(kind: str, before: QualityResult, after: QualityResult) -> dict[str, Any]:
    """The change from `before` (the original) to `after` (a candidate), in plain numbers.

    Returns {"metric", "goal", "before", "after", "change", "change_pct", "summary", "metrics"}
    for the headline metric, plus "ratio" (after/before) for perplexity and "drop"
    (before − after) for cosine; "metrics" holds before/after/change for every shared metric.
    `change_pct` is None when `before` is 0.
    """
    name, goal = primary_metric(kind)
    if name not in before.metrics or name not in after.metrics:
        raise TrimformerError(
            f"quality_delta: {kind} results must both hold {name!r}; got "
            f"{sorted(before.metrics)} and {sorted(after.metrics)}"
        )
    b, a = before.metrics[name], after.metrics[name]
    change_pct = None if b == 0 else 100.0 * (a - b) / abs(b)
    delta: dict[str, Any] = {
        "metric": name,
        "goal": goal,
        "before": b,
        "after": a,
        "change": a - b,
        "change_pct": change_pct,
    }
    if name == "perplexity":
        delta["ratio"] = None if b == 0 else a / b
    else:
        delta["drop"] = b - a
    pct = "" if change_pct is None else f" ({change_pct:+.2f}%)"
    delta["summary"] = f"{name} {b:.4g} -> {a:.4g}{pct}"
    delta["metrics"] = {
        key: {
            "before": before.metrics[key],
            "after": after.metrics[key],
            "change": after.metrics[key] - before.metrics[key],
        }
        for key in before.metrics
        if key in after.metrics
    }
    return delta
