import pytest


@pytest.fixture(scope="module")
def tree(shared_model):
    """The session's real-MRI tree with its one trained model (tests/conftest.py)."""
    return shared_model


@pytest.fixture
def nnunet_env(tree, monkeypatch):
    """The tree's nnU-Net environment in this process, for commands run through their main()."""
    tree.set_in_process(monkeypatch)
    return tree
