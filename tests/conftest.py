import pytest
import torch

from nnunet_tree import make_tree

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: thread hand-offs cost more than they
    save there, and much more when the two cores are shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def nnunet_tree(tmp_path_factory):
    """A preprocessed real-MRI nnU-Net dataset (3d_fullres and 2d) shared by the tests."""
    return make_tree(tmp_path_factory.mktemp("nnunet"))
