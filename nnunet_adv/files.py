"""Writing result files so that a reader never sees half of one.

Every JSON/text result (attack.json, summary.json, metrics caches, report.md) is written to a
hidden temporary file in the same folder and renamed into place (atomic on one file system).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` via ``.NAME.tmp`` + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: no half-written temporary file left behind
        raise


def atomic_write_json(path, obj: Any, indent: Optional[int] = 1, default: Optional[Callable] = None) -> None:
    """``json.dumps(obj)`` written atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default))
