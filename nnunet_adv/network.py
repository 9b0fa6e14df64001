"""Small helpers for nnU-Net's (possibly wrapped) networks, used by training/ and volume/ alike."""
from contextlib import contextmanager

from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and torch.compile (``._orig_mod``).

    Attacks run on the plain module: a forward through the DDP wrapper would arm its
    gradient reducer, and one through the compiled wrapper could trigger recompiles.
    Parameters are shared, so the unwrapped module sees the current weights.
    """
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


@contextmanager
def network_mode(network: nn.Module, train: bool):
    """Temporarily put ``network`` into train (True) or eval (False) mode, then restore it."""
    was_training = network.training
    network.train(train)
    try:
        yield network
    finally:
        network.train(was_training)
