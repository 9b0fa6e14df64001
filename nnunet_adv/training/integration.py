"""The two places where nnunet_adv changes nnU-Net's own behaviour, installed in one call.

:func:`install` runs once when :mod:`nnunet_adv.trainers` is imported (which is how nnU-Net's
trainer lookup and every user subclass reach our trainers), never from a constructor:

1. ``nnUNetv2_train -pretrained_weights`` uses :func:`nnunet_adv.training.pretrained.load_pretrained_weights`
   (nnU-Net's rules, plus the key mapping that networks with NLCE or dual norms need; other
   networks take nnU-Net's own function unchanged);
2. an uncaught :class:`nnunet_adv.errors.UserError` (a bad trainer setting, raised in the trainer's
   constructor inside ``nnUNetv2_train``) prints its one-line message instead of a traceback;
   every other exception keeps Python's usual report.
"""
from __future__ import annotations

import sys

from nnunet_adv.errors import UserError


def _one_line_user_errors(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserError):
            print(str(exc), file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook.nnunet_adv = True
    return hook


def install() -> None:
    """Install both (idempotent)."""
    from nnunet_adv.training import pretrained  # imports nnU-Net's training module: only when installing

    pretrained.install()
    if not getattr(sys.excepthook, "nnunet_adv", False):
        sys.excepthook = _one_line_user_errors(sys.excepthook)
