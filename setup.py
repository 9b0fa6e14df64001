"""Build script: everything is declared in setup.cfg except the start-up hook.

nnU-Net v2 (>= 2.8) finds external trainers through the environment variable
``nnUNet_extTrainer``. We install a one-line ``nnunet_adv.pth`` file into
site-packages; Python runs it at start-up and it appends our trainer folder to that
variable (see nnunet_adv/ext_trainer.py). It is shipped as a data file whose target
is site-packages relative to the installation prefix (computed by the interpreter
that builds the wheel), so ``pip install .`` puts it in place.
"""
import os
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution


class _Distribution(Distribution):
    # setuptools' editable_wheel installs data files only if the distribution answers
    # `has_data()`, a name that Distribution does not define (it has has_data_files);
    # without this alias `pip install -e .` silently skips the .pth hook.
    def has_data(self):
        return self.has_data_files()


_site_packages = os.path.relpath(sysconfig.get_path("purelib"), sysconfig.get_path("data"))

setup(
    distclass=_Distribution,
    data_files=[(_site_packages, ["nnunet_adv/_ext/nnunet_adv.pth"])],
)
