#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine without internet (run HERE, with internet):
#   .whl/       wheels for Python 3.12 x86-64 of the project's dependencies that the device image lacks
#               (it has torch, numpy, scipy, scikit-image, pandas, matplotlib, ...; see the device's KINDS.md)
#   .gpu_data/  ch2.nii.gz and aal.nii.gz from Debian's mricron-data (the real MRI of the demo dataset)
# Both folders are git-ignored; name them in the device call's `carry`. Prints their sizes (limit 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .gpu_data
PY=${PYTHON:-python3}
# version pins: the ones this repository is tested with (pip list in the venv)
PKGS="nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils==0.2.6 batchgenerators==0.25.5
      batchgeneratorsv2==0.3.6 blosc2==4.14.1 ndindex==1.10.1 msgpack==1.2.4 simpleitk==2.5.7 nibabel torch-dct==0.1.6
      monai==1.6.1 yacs==0.1.8 graphviz==0.21 connected-components-3d==4.1.1 numexpr==2.14.2
      linecache2==1.0.0 traceback2==1.4.0 unittest2==1.1.0 future==1.0.0"
for pkg in $PKGS; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pkg" \
    || $PY -m pip wheel -q --no-deps -w .whl "$pkg"  # pure-Python sdists (acvl-utils): build the wheel here
done
# SimpleITK's wheel (53 MB) alone nearly fills the 64 MiB that travels: carried as its unpacked files in a
# tar.xz (29 MB), which gpu_check.sh unpacks into site-packages (what installing a wheel does)
for whl in .whl/simpleitk-*.whl; do
  [ -e "$whl" ] || continue
  tmp=$(mktemp -d); (cd "$tmp" && unzip -q "$OLDPWD/$whl" && tar cf - . | xz -T0 -6 >"$OLDPWD/${whl%%-cp*}.tar.xz")
  rm -rf "$tmp" "$whl"
done
cp /usr/share/mricron/templates/ch2.nii.gz /usr/share/mricron/templates/aal.nii.gz .gpu_data/
du -shc .whl .gpu_data
