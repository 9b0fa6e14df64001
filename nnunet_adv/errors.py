"""The one base class of every error that bad input causes.

A :class:`UserError` carries a one-line message that says what is wrong and how to fix it.
The commands (:mod:`nnunet_adv.cli`) print it as one line and exit with code 2; the trainers
raise it from their constructor and ``nnUNetv2_train`` prints it as one line (see
:func:`nnunet_adv.training.integration.install`). Library callers (a notebook, a script) get an
ordinary exception they can catch: it is a ``ValueError``, never a ``SystemExit``.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from a user (a file, a folder, an option, a setting): one-line message."""
