import pytest
import torch

from nnunet_tree import make_tree

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def nnunet_tree(tmp_path_factory):
    """A preprocessed real-MRI nnU-Net dataset (3d_fullres and 2d) shared by the tests."""
    return make_tree(tmp_path_factory.mktemp("nnunet"))
