"""Writing result files so that a reader never sees half of one.

Every JSON/text result (attack.json, summary.json, metrics caches, report.md) is written to a
hidden temporary file in the same folder and renamed into place (atomic on one file system).
The temporary file's name is unique to its writer: two processes writing the same file at once
(``-num_parts`` parts started together both record the report's settings) must not rename each
other's temporary file away.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` via a unique ``.NAME.*.tmp`` in the same folder + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk or an interrupt: no temporary file left behind
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path, obj: Any, indent: Optional[int] = 1, default: Optional[Callable] = None) -> None:
    """``json.dumps(obj)`` written atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default))
