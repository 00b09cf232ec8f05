"""Train the bundled sample: a small Llama-architecture causal LM on text every Python install has.

Architecture: Llama (RMSNorm, RoPE, SwiGLU, GQA 8 query heads / 4 key-value heads), hidden 256,
6 blocks, context 1024, a 4096-token byte-level BPE tokenizer trained here with `tokenizers`.

Training text: the standard library's own source files (tests excluded) and the *calibration*
part of `pydoc_data.topics`; the held-out topics (trimformer.optimizer.text) are never seen.

Usage (about 40 minutes on a 2-core CPU; checkpoints as it goes, resumable):

    python samples/train_sample.py --out samples/tinyllama-py --steps 900

It writes the Hugging Face folder (config.json, model.safetensors, tokenizer files) and
TRAINING.md with the held-out perplexity of the model and of a unigram model on the same tokens.

`--init DIR` continues training a sample folder made by this script (its tokenizer and weights,
a fresh optimizer): the bundled `samples/tinyllama-py-1k` is `samples/tinyllama-py` continued at
its full context of 1024 tokens (the usual short-then-long recipe of context extension):

    python samples/train_sample.py --init samples/tinyllama-py --out samples/tinyllama-py-1k \
        --seq 1024 --batch 4 --steps 250 --lr 6e-4 --warmup 20 --work /tmp/trimformer-sample-1k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trimformer.optimizer.text import python_docs_split

VOCAB = 4096
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def training_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f
        for f in root.rglob("*.py")
        if not ({"site-packages", "test", "tests", "idle_test"} & set(f.relative_to(root).parts))
    )
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    docs += list(python_docs_split().calibration)
    return docs


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1024,
    )


def encode_stream(tok: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d)["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_config(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


@torch.no_grad()
def heldout_perplexity(model: LlamaForCausalLM, ids: torch.Tensor, seq: int = 512) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq):
        chunk = ids[start : start + seq + 1]
        if len(chunk) < 2:
            break
        out = model(input_ids=chunk[None, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits[0], chunk[1:], reduction="sum")
        nll += float(loss)
        count += len(chunk) - 1
    model.train()
    return math.exp(nll / count)


def unigram_perplexity(train_ids: torch.Tensor, held_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[held_ids[1:]].mean()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("samples/tinyllama-py"))
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--init", type=Path, default=None, help="continue from a sample folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trimformer-sample-train"))
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    docs = training_documents()
    tok_dir = args.init if args.init is not None else args.work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    elif args.init is not None:
        raise SystemExit(f"--init {args.init}: no tokenizer.json there; pass a sample folder")
    else:
        tok = train_tokenizer(docs)
        tok.save_pretrained(tok_dir)
    # the cached token stream belongs to one tokenizer
    tok_sha = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:12]
    ids_path = args.work / f"train_ids.{tok_sha}.pt"
    if ids_path.exists():
        train_ids = torch.load(ids_path, weights_only=True)
    else:
        train_ids = encode_stream(tok, docs)
        torch.save(train_ids, ids_path)
    held_ids = encode_stream(tok, list(python_docs_split().heldout))
    print(f"train tokens {len(train_ids):,}  held-out tokens {len(held_ids):,}", flush=True)

    if args.init is not None:
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        base_ppl = heldout_perplexity(model, held_ids)
        base_ppl_1k = heldout_perplexity(model, held_ids, seq=1024)
        print(
            f"--init {args.init}: held-out perplexity {base_ppl:.2f} (512) "
            f"{base_ppl_1k:.2f} (1024)",
            flush=True,
        )
    else:
        model = LlamaForCausalLM(make_config(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start_step = 0
    ckpt = args.work / "ckpt.pt"
    run = {"init": str(args.init), "seq": args.seq, "batch": args.batch, "steps": args.steps}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        if state.get("run") != run:
            raise SystemExit(
                f"{ckpt} is from another run ({state.get('run')}, this one: {run}); "
                "pass another --work or delete it"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = int(state["step"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)

    warmup = args.warmup
    gen = torch.Generator().manual_seed(1234)
    model.train()
    t0 = time.time()
    log = []
    for step in range(start_step, args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        # a continued run draws other text windows than the run it continues
        gen.manual_seed(1234 + step + (100_000 if args.init is not None else 0))
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            rate = (step + 1 - start_step) * args.batch * args.seq / (time.time() - t0)
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {rate:.0f} tok/s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4)})
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "run": run,
                },
                ckpt,
            )

    ppl = heldout_perplexity(model, held_ids)
    ppl_1k = heldout_perplexity(model, held_ids, seq=1024)
    uni = unigram_perplexity(train_ids, held_ids, len(tok))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    origin = (
        f"Continued from `{args.init}` (its tokenizer and weights, a fresh optimizer; held-out "
        f"perplexity before: {base_ppl:.2f} in 512-token windows, {base_ppl_1k:.2f} in 1024) by "
        if args.init is not None
        else "Made by "
    )
    (args.out / "TRAINING.md").write_text(
        f"# {args.out.name}: how it was trained\n\n"
        f"{origin}`samples/train_sample.py` (steps={args.steps}, batch={args.batch}, "
        f"seq={args.seq}, lr={args.lr}, warmup={args.warmup}, seed 0) on {len(train_ids):,} tokens "
        "of the standard library's source and the calibration part of `pydoc_data.topics`.\n\n"
        f"- parameters: {n_params:,}\n"
        f"- held-out text: the held-out `pydoc_data.topics` documents, {len(held_ids):,} tokens\n"
        f"- held-out perplexity of this model (512-token windows): **{ppl:.2f}**\n"
        f"- held-out perplexity of this model (1024-token windows): **{ppl_1k:.2f}**\n"
        f"- held-out perplexity of a unigram model on the same tokens (add-one): **{uni:.2f}**\n"
    )
    (args.out / "training_log.json").write_text(json.dumps(log))
    print(f"held-out perplexity {ppl:.2f}  unigram {uni:.2f}", flush=True)


if __name__ == "__main__":
    main()
