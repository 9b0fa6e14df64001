"""Make nnU-Net find our trainers by name, with nothing set by the user.

nnU-Net v2 (>= 2.8) resolves ``-tr NAME`` first inside its own package, then in every
folder listed in the environment variable ``nnUNet_extTrainer`` (os.pathsep-separated).
It imports each module of such a folder under a top-level name and removes it from
``sys.modules`` afterwards, so the folder we register holds a single shim module
(``_ext/nnunet_adv_trainers.py``) that re-exports the classes of
:mod:`nnunet_adv.trainers`: the class nnU-Net builds is the one users import.

The ``nnunet_adv.pth`` file that ``pip install`` puts into site-packages calls
:func:`register` at interpreter start-up. This module imports only ``os`` and ``sys``
because it runs in every Python process of the environment.
"""
import os

ENV_VAR = "nnUNet_extTrainer"


def trainer_folder() -> str:
    """Absolute path of the folder to put on ``nnUNet_extTrainer``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")


def register(environ=os.environ) -> None:
    """Append :func:`trainer_folder` to ``nnUNet_extTrainer`` unless it is already there.

    A user's own folders stay first, so their trainers (also subclasses of ours) are
    found exactly as before.
    """
    folder = trainer_folder()
    current = environ.get(ENV_VAR, "")
    entries = [p for p in current.split(os.pathsep) if p.strip()]
    if any(os.path.abspath(p) == folder for p in entries):
        return
    environ[ENV_VAR] = os.pathsep.join(entries + [folder])


def _startup_hook() -> None:
    """Called from ``nnunet_adv.pth``; never lets a problem break interpreter start-up."""
    try:
        register()
    except Exception:  # pragma: no cover - defensive, start-up must not fail
        pass
