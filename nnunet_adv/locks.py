"""One run per output folder at a time: a lock file that the kernel releases when its holder dies.

Two runs writing the same folder at once rename each other's files away and read half-written
images (a cryptic missing-file or ITK error in one of them, a mix of both in the folder). Every
command that writes a folder (``nnUNetv2_adv_attack``, ``nnUNetv2_adv_evaluate``, the demo, the
study) holds :func:`folder_lock` on it: a second run refuses with one line naming the first (its
PID, command and start time).

The lock is ``fcntl.flock`` on the hidden file ``.nnunet_adv.lock`` in the folder. A whole run
holds it exclusively; the parts of a run split with ``-num_parts`` hold it shared (they run at once
by design) and each holds its own ``.nnunet_adv.lock.partI-of-N`` exclusively, so two copies of one
part, or a whole run during parts, are refused. A lock file left by a killed process does not
block: the kernel drops a flock with its process, and only a held flock refuses. The file is
removed when its last holder ends. Where ``fcntl`` does not exist (Windows) nothing is locked.
"""
from __future__ import annotations

import datetime
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from nnunet_adv.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".nnunet_adv.lock"


def part_lock_name(part: Tuple[int, int]) -> str:
    """The lock file of part ``part_id`` of ``num_parts`` (``part`` = (num_parts, part_id))."""
    return f"{LOCK_NAME}.part{part[1]}-of-{part[0]}"


class FolderInUse(UserError):
    """Another live run holds the folder's lock."""


@contextmanager
def folder_lock(folder, part: Optional[Tuple[int, int]] = None, command: str = "") -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (module docstring); ``part`` = (num_parts, part_id)
    for one part of a split run. The folder is made if missing, and removed again if the block leaves
    it empty (a refused run leaves nothing). Raises :class:`FolderInUse` naming the holder."""
    folder = Path(folder)
    if fcntl is None:
        yield
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    held: List[Tuple[int, Path]] = []
    try:
        main = folder / LOCK_NAME
        held.append((_acquire(main, shared=part is not None, folder=folder), main))
        mine = main if part is None else folder / part_lock_name(part)
        if part is not None:
            held.append((_acquire(mine, shared=False, folder=folder), mine))
        _write_holder(held[-1][0], command)
        yield
    finally:
        for fd, path in reversed(held):
            _release(fd, path)
        if made:
            try:
                folder.rmdir()  # only if nothing was written
            except OSError:
                pass


def _acquire(path: Path, shared: bool, folder: Path) -> int:
    """An open file descriptor of ``path`` holding its flock; :class:`FolderInUse` when held elsewhere."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another run ({_holders(folder)}); wait for it to end or "
                              f"choose another folder (nothing was changed)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its last holder removed the file between our open and our lock: lock the new one


def _write_holder(fd: int, command: str) -> None:
    """Who holds the lock, for the refusal of a second run (the file holds nothing else)."""
    info = {"pid": os.getpid(), "command": command, "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _release(fd: int, path: Path) -> None:
    """Drop the lock; the last holder removes the file (a shared holder is the last when it can
    take the lock exclusively)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass  # other parts still hold it shared
    finally:
        os.close(fd)


def _holders(folder: Path) -> str:
    """'PID 123: COMMAND, since TIME' of the live holders recorded in the folder's lock files."""
    found = []
    for path in sorted(folder.glob(f"{LOCK_NAME}*")):
        try:
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            continue
        pid = info.get("pid")
        if isinstance(pid, int) and _alive(pid):
            command = " ".join(str(info.get("command") or "").split())
            found.append(f"PID {pid}" + (f": {command[:200]}" if command else "") +
                         (f", since {info['started']}" if info.get("started") else ""))
    return "; ".join(found) or "its PID is not recorded"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
