import pytest

from fault_helpers import TRAINER
from nnunet_tree import DATASET_ID


@pytest.fixture(scope="module")
def tree(nnunet_tree):
    """The session's real-MRI tree with one tiny trained model (trained once per session)."""
    if not (nnunet_tree.model_folder(TRAINER) / "fold_0" / "checkpoint_final.pth").is_file():
        nnunet_tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu")
    return nnunet_tree


@pytest.fixture
def nnunet_env(tree, monkeypatch):
    """The tree's nnU-Net environment in this process, for commands run through their main()."""
    for key, value in tree.env.items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    return tree
