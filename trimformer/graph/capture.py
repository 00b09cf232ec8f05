"""Load a checkpoint and capture it as an ATen-level fx graph with `torch.export`.

Contract:
- `load_checkpoint(path)` reads a local Hugging Face folder (config.json + safetensors or a
  weights-only-loadable .bin) or a `.pt2` program, never downloads, never runs remote code
  unless asked, and never writes to the folder.
- Every model is wrapped so that it takes keyword tensors (`input_ids`, `attention_mask`, or
  `pixel_values`) and returns ONE tensor: logits for causal LMs, the last hidden state for
  encoders and image models. The graph, the .pt2 and the ONNX program all share that signature.
- `capture(model, inputs)` exports with dynamic batch and sequence (non-strict) and returns the
  unlifted GraphModule, whose nodes keep `meta["nn_module_stack"]` for naming.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from trimformer.errors import CheckpointError, TrimformerError

log = logging.getLogger(__name__)

Kind = Literal["causal-lm", "encoder", "image"]
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
DEFAULT_SAMPLE = SAMPLES / "tinyllama-py"
PT2_META = "trimformer.json"  # extra file inside .pt2 archives written by trimformer

_IMAGE_TYPES = {"vit", "deit", "beit", "dinov2", "swin", "convnext", "clip_vision_model", "siglip"}


class TextModel(nn.Module):
    """input_ids, attention_mask -> one tensor (logits or last hidden state)."""

    def __init__(self, model: nn.Module, kind: Kind) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal-lm":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


class ImageModel(nn.Module):
    """pixel_values -> last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kind: Kind = "image"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


@dataclass
class Loaded:
    """A model ready to capture, with what is needed to feed it."""

    module: nn.Module  # takes keyword tensors, returns one tensor
    kind: Kind
    source: Path
    tokenizer: Any = None  # a transformers tokenizer, or None (image models, bare .pt2)
    config: Any = None  # the transformers config, or None for a .pt2
    max_seq: int = 512
    image_size: int = 224
    channels: int = 3
    vocab_size: int | None = None
    program: Any = None  # the ExportedProgram when loaded from a .pt2
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("pixel_values",) if self.kind == "image" else ("input_ids", "attention_mask")


def checkpoint_digest(path: Path) -> str:
    """sha256 of the weight and config files: a replayed recipe checks it is the same model."""
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(
            p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json", ".pt2"}
        )
    )
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _kind_of(config: Any) -> Kind:
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if config.model_type in _IMAGE_TYPES or (
        hasattr(config, "image_size") and hasattr(config, "num_channels")
    ):
        return "image"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def load_checkpoint(path: Path | None, *, trust_remote_code: bool = False) -> Loaded:
    """Load a local checkpoint folder or .pt2; None means the bundled sample."""
    path = DEFAULT_SAMPLE if path is None else Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a Hugging Face model folder or a .pt2 file"
        )
    if path.is_file():
        if path.suffix != ".pt2":
            raise CheckpointError(
                f"{path} is a file but not a .pt2 program; pass the model folder that holds "
                "config.json and the weights"
            )
        return _load_pt2(path)
    return _load_hf(path, trust_remote_code)


def _load_hf(path: Path, trust_remote_code: bool) -> Loaded:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model folder?")
    weights = [p for p in path.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".bin")]
    if not weights:
        raise CheckpointError(
            f"{path} has no weights (*.safetensors or pytorch_model.bin); copy them next to "
            "config.json"
        )
    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError, OSError) as e:
        mt = _read_model_type(path / "config.json")
        raise CheckpointError(
            f"{path / 'config.json'}: transformers does not know model_type {mt!r} "
            f"({str(e).splitlines()[0][:120]}); upgrade transformers or pass "
            "--trust-remote-code if the folder ships its own modelling code"
        ) from None
    kind = _kind_of(config)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    try:
        model = auto.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            attn_implementation="sdpa",
        )
    except Exception as e:  # safetensors/transformers raise many types for a bad file
        raise CheckpointError(
            f"{path}: the weights could not be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); "
            "re-copy or re-save the checkpoint"
        ) from None
    model.eval()
    tokenizer = None
    if kind != "image":
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: no usable tokenizer ({type(e).__name__}); text models need the "
                "tokenizer files (tokenizer.json or vocab files) in the folder"
            ) from None
    if kind == "image":
        module: nn.Module = ImageModel(model)
    else:
        module = TextModel(model, kind)
    module.eval()
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    return Loaded(
        module=module,
        kind=kind,
        source=path,
        tokenizer=tokenizer,
        config=config,
        max_seq=int(max_pos) if max_pos else 2048,
        image_size=int(getattr(config, "image_size", 224) or 224),
        channels=int(getattr(config, "num_channels", 3) or 3),
        vocab_size=getattr(config, "vocab_size", None),
        meta={"model_type": config.model_type, "architectures": config.architectures},
    )


def _read_model_type(config_path: Path) -> str:
    try:
        return str(json.loads(config_path.read_text()).get("model_type", "<missing>"))
    except (json.JSONDecodeError, OSError):
        return "<unreadable config.json>"


def _load_pt2(path: Path) -> Loaded:
    from trimformer.export.pt2 import load_pt2

    extra = {PT2_META: ""}
    try:
        program = load_pt2(path, extra_files=extra)
    except TrimformerError as e:
        raise CheckpointError(str(e)) from None
    meta = json.loads(extra[PT2_META]) if extra[PT2_META] else {}
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    kind: Kind = meta.get("kind") or ("image" if "pixel_values" in names else "encoder")
    tokenizer = None
    tok_src = meta.get("tokenizer_source")
    if kind != "image" and tok_src and Path(tok_src).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_src, local_files_only=True)
    return Loaded(
        module=program.module(),
        kind=kind,
        source=path,
        tokenizer=tokenizer,
        max_seq=int(meta.get("max_seq", 512)),
        image_size=int(meta.get("image_size", 224)),
        channels=int(meta.get("channels", 3)),
        vocab_size=meta.get("vocab_size"),
        program=program,
        meta=meta,
    )


def dynamic_shapes(loaded: Loaded, inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    """Batch (and sequence, for text) are dynamic; export specializes sizes 0/1, so min seq is 2."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    if loaded.kind == "image":
        return {"pixel_values": {0: batch}}
    seq = Dim("seq", min=2, max=max(2, loaded.max_seq))
    return {name: {0: batch, 1: seq} for name in inputs}


def capture(loaded: Loaded, inputs: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """torch.export (non-strict, dynamic batch/seq) -> unlifted GraphModule."""
    for name, t in inputs.items():
        if t.dim() >= 1 and t.shape[0] < 2:
            raise TrimformerError(
                f"example input {name} has batch {t.shape[0]}; capture needs batch >= 2 "
                "so the batch dimension stays dynamic"
            )
    if loaded.program is not None:
        return loaded.program.module()
    try:
        with torch.no_grad():
            ep = torch.export.export(
                loaded.module,
                (),
                inputs,
                strict=False,
                dynamic_shapes=dynamic_shapes(loaded, inputs),
            )
    except Exception as e:
        raise TrimformerError(
            f"torch.export could not capture {loaded.source} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); this model needs an export-"
            "friendly forward (no data-dependent Python control flow)"
        ) from None
    from trimformer.graph.rewrite import finish

    gm = ep.module()
    finish(gm)  # outputs the wrapper does not return (e.g. BERT's pooler) are dead code
    return gm
