"""Calibration and evaluation text.

The default corpus is the documentation every Python install carries: `pydoc_data.topics`.
Topics are sorted by name and every fifth one is held out for evaluation; the rest is calibration
text. The bundled sample was trained on the standard library's source and the calibration topics
only, never on the held-out ones (`samples/train_sample.py` imports this split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trimformer.errors import TrimformerError

HELDOUT_EVERY = 5


@dataclass(frozen=True)
class TextSplit:
    calibration: tuple[str, ...]
    heldout: tuple[str, ...]
    source: str


def python_docs_split() -> TextSplit:
    """Python's own documentation topics, split into calibration and held-out documents."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = tuple(topics[n] for i, n in enumerate(names) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1)
    held = tuple(topics[n] for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1)
    return TextSplit(calib, held, "pydoc_data.topics")


def load_text_file(path: Path) -> TextSplit:
    """A user's .txt (documents separated by blank lines) or .jsonl (a "text" field per line).

    The last fifth of the documents is held out for evaluation.
    """
    if not path.is_file():
        raise TrimformerError(f"calibration text {path} does not exist; pass a .txt or .jsonl file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TrimformerError(
                    f'{path}:{lineno}: expected a JSON object with a "text" field per line'
                ) from None
    else:
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    if len(docs) < 2:
        raise TrimformerError(
            f"{path} holds {len(docs)} document(s); at least 2 are needed (calibration + held-out)"
        )
    cut = max(1, len(docs) * 4 // 5)
    return TextSplit(tuple(docs[:cut]), tuple(docs[cut:]), str(path))
