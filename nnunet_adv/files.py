"""Writing result files so that a reader never sees half of one, and reading back only what was written.

Every JSON/text result (attack.json, summary.json, metrics caches, report.md) is written to a
hidden temporary file in the same folder and renamed into place (atomic on one file system).
The temporary file's name is unique to its writer: two processes writing the same file at once
(``-num_parts`` parts started together both record the report's settings) must not rename each
other's temporary file away.

A result that is read again (a run record such as attack.json, the cached metrics of one evaluation)
carries the SHA-256 of its own content (:func:`atomic_write_checked_json`), as images carry theirs in
their run records: :func:`read_checked_json` refuses a file changed after it was written (one flipped
byte in a Dice).
"""
from __future__ import annotations

import hashlib
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


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def has_digest(path, digest: str) -> bool:
    """Whether ``path`` is a file whose SHA-256 is ``digest`` (what a run record vouches for)."""
    return Path(path).is_file() and file_digest(path) == digest


#: the key under which a checked JSON file holds the SHA-256 of the rest of its content
CHECKSUM_KEY = "sha256"


class ChecksumMismatch(ValueError):
    """A checked JSON file that cannot be read or no longer matches its SHA-256."""


def _content_digest(obj: dict) -> str:
    """SHA-256 of a JSON object's canonical text (sorted keys, no spaces; NaN as JSON writes it)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_checked_json(path, obj: dict, indent: Optional[int] = 1, default: Optional[Callable] = None) -> None:
    """``obj`` (a JSON object) written atomically with :data:`CHECKSUM_KEY`: the SHA-256 of its content
    as it reads back (keys as strings; ``default`` as for :func:`json.dumps`)."""
    content = json.loads(json.dumps(obj, default=default))
    atomic_write_json(path, {**content, CHECKSUM_KEY: _content_digest(content)}, indent=indent)


def verify_checked_json(path, content: Any) -> Any:
    """``content`` read from ``path`` without its checksum, if it has one (records written before
    checksums existed have none and are taken as they are).

    Raises:
        ChecksumMismatch: the content differs from its checksum.
    """
    if not isinstance(content, dict) or CHECKSUM_KEY not in content:
        return content
    recorded = content.pop(CHECKSUM_KEY)
    if recorded != _content_digest(content):
        raise ChecksumMismatch(f"{path} does not match its checksum (changed after it was written)")
    return content


def read_checked_json(path) -> dict:
    """The object :func:`atomic_write_checked_json` wrote (without its checksum).

    Raises:
        ChecksumMismatch: the file is not JSON, has no checksum, or its content differs from it.
    """
    try:
        content = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ChecksumMismatch(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(content, dict) or CHECKSUM_KEY not in content:
        raise ChecksumMismatch(f"{path} has no checksum")
    return verify_checked_json(path, content)
