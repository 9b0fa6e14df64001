"""Tests of the demo dataset builder (nnunet_adv.demo.data) and its CLI.

Real-MRI tests need Debian's mricron-data (ch2.nii.gz + aal.nii.gz); they are skipped with a
reason where it is missing. Everything here runs on the CPU in a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnunet_adv.demo import data as demo_data
from nnunet_adv.demo.data import DatasetExistsError, DemoDataConfigError, TemplatesMissingError, build_demo_dataset

requires_mricron = pytest.mark.skipif(
    not demo_data.mricron_available(),
    reason=f"Debian mricron-data not found in {demo_data.template_dir()} "
           f"(apt-get install -y mricron-data)")

NUM_TRAIN, NUM_TEST = 4, 2
CLI = [sys.executable, "-m", "nnunet_adv.cli.make_demo_dataset"]
MIRROR_WORLD_X = np.diag([-1.0, 1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- helpers


def _load(path: Path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _cases(folder: Path):
    """(identifier, split, image path, label path) for every case, in manifest order."""
    manifest = json.loads((folder / demo_data.MANIFEST_FILE).read_text())
    for case in manifest["cases"]:
        suffix = "Tr" if case["split"] == "train" else "Ts"
        ident = case["identifier"]
        yield (case, folder / f"images{suffix}" / f"{ident}_0000.nii.gz",
               folder / f"labels{suffix}" / f"{ident}.nii.gz")


def _all_arrays(folder: Path):
    """{relative path: (array, affine)} of every NIfTI file in the dataset."""
    return {str(p.relative_to(folder)): _load(p) for p in sorted(folder.rglob("*.nii.gz"))}


def _tree(folder: Path):
    """Snapshot of a folder: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _colin27():
    """ch2 T1 (float), AAL mapped to demo labels (uint8), affine: read independently of
    demo_data.load_templates so that the anatomy tests do not check the code with itself."""
    root = demo_data.template_dir()
    t1, affine = _load(root / "ch2.nii.gz")
    aal, _ = _load(root / "aal.nii.gz")
    labels = np.zeros(aal.shape, np.uint8)
    labels[np.isin(aal, (37, 38))] = 1  # hippocampus L/R
    labels[np.isin(aal, (41, 42))] = 2  # amygdala L/R
    return t1.astype(np.float32), labels, affine


def _nominal_template_region(case_affine, flip, template_affine, shape):
    """Colin27 voxel coordinates (3, *shape) of each case voxel at the case's nominal crop
    (the augmentation-free position that its affine describes; flipped cases carry the
    mirrored world, so un-mirror first)."""
    to_template = np.linalg.inv(template_affine) @ (MIRROR_WORLD_X if flip else np.eye(4)) \
        @ case_affine
    grid = np.indices(shape, dtype=np.float64)
    return np.einsum("ij,j...->i...", to_template[:3, :3], grid) \
        + to_template[:3, 3][:, None, None, None]


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mricron_dataset(tmp_path_factory) -> Path:
    if not demo_data.mricron_available():
        pytest.skip("Debian mricron-data not installed (apt-get install -y mricron-data)")
    raw = tmp_path_factory.mktemp("raw")
    return build_demo_dataset(raw, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0,
                              source="mricron")


@pytest.fixture
def no_mricron(tmp_path_factory, monkeypatch) -> Path:
    """Simulate a machine without mricron-data via $NNUNET_ADV_MRICRON_DIR (an empty folder
    outside tmp_path, so tests can assert that tmp_path stays empty)."""
    empty = tmp_path_factory.mktemp("no_mricron")
    monkeypatch.setenv(demo_data.TEMPLATE_DIR_ENV, str(empty))
    return empty


@pytest.fixture
def no_templates(no_mricron, monkeypatch) -> Path:
    """A machine with neither mricron-data nor nilearn's ICBM template ($NNUNET_ADV_ICBM152_DIR empty too)."""
    monkeypatch.setenv(demo_data.ICBM_DIR_ENV, str(no_mricron))
    return no_mricron


# --------------------------------------------------------------------------- layout


@requires_mricron
def test_layout_and_dataset_json(mricron_dataset):
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    folder = mricron_dataset
    assert folder.name == "Dataset900_AdvDemoMRI"
    assert convert_dataset_name_to_id(folder.name) == 900
    train_ids = [f"case_{i:04d}" for i in range(NUM_TRAIN)]
    test_ids = [f"case_{i:04d}" for i in range(NUM_TRAIN, NUM_TRAIN + NUM_TEST)]
    listing = {sub: sorted(p.name for p in (folder / sub).iterdir())
               for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    assert listing == {"imagesTr": [f"{i}_0000.nii.gz" for i in train_ids],
                       "labelsTr": [f"{i}.nii.gz" for i in train_ids],
                       "imagesTs": [f"{i}_0000.nii.gz" for i in test_ids],
                       "labelsTs": [f"{i}.nii.gz" for i in test_ids]}
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == {"background": 0, "hippocampus": 1, "amygdala": 2}
    assert meta["numTraining"] == NUM_TRAIN
    assert meta["file_ending"] == ".nii.gz"
    assert meta["nnunet_adv_source"] == "mricron"
    # No temporary folder left next to the dataset.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


class _SerialPool:
    """Stands in for verify_dataset_integrity's spawn pool: a spawned worker re-imports torch
    and nnU-Net (~9 s on this machine); the checks themselves are the same."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


@requires_mricron
def test_nnunet_verify_dataset_integrity(mricron_dataset, monkeypatch):
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    monkeypatch.setattr(vdi, "multiprocessing",
                        SimpleNamespace(get_context=lambda *_: SimpleNamespace(Pool=_SerialPool)))
    vdi.verify_dataset_integrity(str(mricron_dataset), num_processes=1)  # raises on problems


@requires_mricron
def test_labels_declared_and_both_classes_everywhere(mricron_dataset):
    for case, image_path, label_path in _cases(mricron_dataset):
        labels, label_affine = _load(label_path)
        image, image_affine = _load(image_path)
        assert labels.dtype == np.uint8 and image.dtype == np.float32
        assert labels.shape == image.shape == (40, 40, 40)
        assert set(np.unique(labels).tolist()) == {0, 1, 2}, case["identifier"]
        np.testing.assert_array_equal(label_affine, image_affine)
        # 1 mm isotropic, axis-aligned, positive axes (RAS).
        np.testing.assert_allclose(image_affine[:3, :3], np.eye(3))
        assert np.isfinite(image).all()


# --------------------------------------------------------------------------- real anatomy


@requires_mricron
def test_reference_case_is_exact_colin27_crop(mricron_dataset):
    """Training case 0 is un-augmented: image and labels equal Colin27/AAL at the voxels its
    affine points to."""
    t1, atlas_labels, template_affine = _colin27()
    case, image_path, label_path = next(_cases(mricron_dataset))
    assert case["identifier"] == "case_0000" and not case["params"]["flip"]
    image, affine = _load(image_path)
    labels, _ = _load(label_path)
    offset = np.linalg.inv(template_affine) @ affine
    np.testing.assert_allclose(offset[:3, :3], np.eye(3))
    start = offset[:3, 3]
    assert np.allclose(start, np.round(start))
    region = tuple(slice(int(s), int(s) + n) for s, n in zip(np.round(start), image.shape))
    np.testing.assert_array_equal(image, t1[region])
    np.testing.assert_array_equal(labels, atlas_labels[region])


@requires_mricron
def test_augmented_cases_are_colin27_anatomy(mricron_dataset):
    """Stated property: every case, augmented or not, correlates with Colin27 at its nominal
    crop (r > 0.6; measured 0.76-0.94 for seed 0) much better than at a crop 8 voxels away,
    and its labels overlap the AAL labels there (Dice > 0.5 per class; measured >= 0.65)."""
    t1, atlas_labels, template_affine = _colin27()
    for case, image_path, label_path in _cases(mricron_dataset):
        image, affine = _load(image_path)
        labels, _ = _load(label_path)
        coords = _nominal_template_region(affine, case["params"]["flip"], template_affine,
                                          image.shape)
        ref = ndimage.map_coordinates(t1, coords, order=0)
        ref_labels = ndimage.map_coordinates(atlas_labels, coords, order=0)
        shifted = ndimage.map_coordinates(t1, coords + np.array([0, 8, 0])[:, None, None, None],
                                          order=0)
        r = np.corrcoef(image.ravel(), ref.ravel())[0, 1]
        r_shifted = np.corrcoef(image.ravel(), shifted.ravel())[0, 1]
        assert r > 0.6 and r > r_shifted + 0.2, (case["identifier"], r, r_shifted)
        for k in (1, 2):
            dice = 2 * np.sum((labels == k) & (ref_labels == k)) / (
                np.sum(labels == k) + np.sum(ref_labels == k))
            assert dice > 0.5, (case["identifier"], k, dice)


@requires_mricron
def test_cases_are_distinct_and_both_hemispheres_used(mricron_dataset):
    images = [_load(p)[0] for _, p, _ in _cases(mricron_dataset)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])
    manifest = json.loads((mricron_dataset / demo_data.MANIFEST_FILE).read_text())
    assert {c["params"]["side"] for c in manifest["cases"]} == {"left", "right"}


# --------------------------------------------------------------------------- determinism


@requires_mricron
def test_same_seed_identical_other_seed_different(mricron_dataset, tmp_path):
    reference = _all_arrays(mricron_dataset)
    same_root, other_root = tmp_path / "same", tmp_path / "other"
    same_root.mkdir()
    other_root.mkdir()
    same = _all_arrays(build_demo_dataset(same_root, num_train=NUM_TRAIN, num_test=NUM_TEST,
                                          seed=0, source="mricron"))
    other = _all_arrays(build_demo_dataset(other_root, num_train=NUM_TRAIN,
                                           num_test=NUM_TEST, seed=1, source="mricron"))
    assert same.keys() == reference.keys() == other.keys()
    for key, (array, affine) in reference.items():
        np.testing.assert_array_equal(same[key][0], array, err_msg=key)
        np.testing.assert_array_equal(same[key][1], affine, err_msg=key)
    # Training case 0 is the seed-independent un-augmented anchor; every other image differs.
    for key, (array, _) in reference.items():
        if key.startswith("images"):
            assert np.array_equal(other[key][0], array) == (key == "imagesTr/case_0000_0000.nii.gz")


# --------------------------------------------------------------------------- never overwrite


@requires_mricron
def test_refuses_to_overwrite_the_same_dataset(mricron_dataset):
    before = _tree(mricron_dataset)
    with pytest.raises(DatasetExistsError) as info:
        build_demo_dataset(mricron_dataset.parent, num_train=NUM_TRAIN, num_test=NUM_TEST)
    assert "900" in _one_line(str(info.value))
    assert _tree(mricron_dataset) == before
    assert [p.name for p in mricron_dataset.parent.iterdir()] == [mricron_dataset.name]


def test_refuses_any_dataset_with_the_same_id(tmp_path):
    other = tmp_path / "Dataset900_SomethingElse"
    other.mkdir()
    (other / "marker.txt").write_text("keep me")
    with pytest.raises(DatasetExistsError, match="Dataset900_SomethingElse"):
        build_demo_dataset(tmp_path, dataset_id=900, num_train=2, num_test=0,
                           source="synthetic")
    assert (other / "marker.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset900_SomethingElse"]
    # Another id is fine next to it.
    assert build_demo_dataset(tmp_path, dataset_id=901, num_train=2, num_test=0,
                              source="synthetic").name == "Dataset901_AdvDemoMRI"


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    real_write = demo_data._write_case
    calls = []

    def write_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real_write(*args, **kwargs)

    monkeypatch.setattr(demo_data, "_write_case", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path, num_train=3, num_test=1, source="synthetic")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- synthetic fallback


def test_auto_falls_back_to_synthetic_with_message(tmp_path, no_templates, capsys):
    folder = build_demo_dataset(tmp_path, num_train=3, num_test=1, source="auto")
    message = _one_line(capsys.readouterr().err)
    assert "mricron-data is missing" in message
    assert "apt-get install -y mricron-data" in message
    assert "synthetic" in message and "pip install nilearn" in message
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["nnunet_adv_source"] == "synthetic" and meta["numTraining"] == 3
    assert len(list((folder / "imagesTr").glob("case_*_0000.nii.gz"))) == 3
    assert len(list((folder / "labelsTs").glob("case_*.nii.gz"))) == 1
    for case, image_path, label_path in _cases(folder):
        labels, affine = _load(label_path)
        image, image_affine = _load(image_path)
        assert case["source"] == "synthetic"
        assert set(np.unique(labels).tolist()) == {0, 1, 2}
        assert image.shape == labels.shape == (40, 40, 40)
        np.testing.assert_array_equal(affine, image_affine)
        # Foreground classes are visible in the image (class means differ clearly).
        means = [image[labels == k].mean() for k in (0, 1, 2)]
        assert means[1] > means[0] + 20 and means[2] < means[0] - 20


requires_icbm = pytest.mark.skipif(not demo_data.icbm152_available(),
                                   reason="nilearn's ICBM 2009a template not found (pip install nilearn)")


@requires_icbm
def test_without_mricron_auto_cuts_the_icbm_template_nilearn_installs(tmp_path, no_mricron, capsys):
    """No mricron-data (no root, another system): the same crops from the ICBM 2009a T1 that the nilearn
    wheel bundles, grey and white matter from its probability maps, read here independently of the module."""
    folder = build_demo_dataset(tmp_path, num_train=3, num_test=1, seed=0, source="auto")
    message = _one_line(capsys.readouterr().err)
    assert "mricron-data is missing" in message and "ICBM 2009a" in message and "synthetic" not in message
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["nnunet_adv_source"] == "icbm152"
    assert meta["labels"] == {"background": 0, "grey matter": 1, "white matter": 2}
    root = demo_data.icbm152_dir()
    t1, template_affine = _load(root / demo_data.ICBM_T1)
    gm, _ = _load(root / demo_data.ICBM_GM)
    wm, _ = _load(root / demo_data.ICBM_WM)
    expected = np.where((wm >= 127.5) & (wm > gm), 2, np.where((gm >= 127.5) & (gm >= wm), 1, 0))
    cases = list(_cases(folder))
    _, image_path, label_path = cases[0]  # the un-augmented anchor: the template itself
    labels, affine = _load(label_path)
    start = np.round((np.linalg.inv(template_affine) @ affine)[:3, 3]).astype(int)
    region = tuple(slice(a, a + n) for a, n in zip(start, labels.shape))
    np.testing.assert_array_equal(labels, expected[region])
    np.testing.assert_array_equal(_load(image_path)[0], t1[region].astype(np.float32))
    # centred on the hippocampus-amygdala's MNI coordinates (left), as the Colin27 crops are
    centre = affine[:3, :3] @ ((np.array(labels.shape) - 1) / 2) + affine[:3, 3]
    np.testing.assert_allclose(centre, demo_data.STRUCTURES["hippocampus-amygdala"].mni_centres[0], atol=1.0)
    for case, image_path, path in cases:
        found = _load(path)[0]
        assert case["source"] == "icbm152" and set(np.unique(found).tolist()) == {0, 1, 2}
        image = _load(image_path)[0]
        assert image[found == 2].mean() > image[found == 1].mean() > image[found == 0].mean()  # T1 contrast


@requires_icbm
def test_icbm_source_asked_for_and_missing_is_one_line(tmp_path, no_templates):
    with pytest.raises(TemplatesMissingError, match="the ICBM 2009a template was not found in .*pip install nilearn"):
        build_demo_dataset(tmp_path, num_train=2, num_test=0, source="icbm152")
    assert list(tmp_path.iterdir()) == []


def test_synthetic_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = _all_arrays(build_demo_dataset(a, num_train=2, num_test=1, source="synthetic"))
    second = _all_arrays(build_demo_dataset(b, num_train=2, num_test=1, source="synthetic"))
    for key in first:
        np.testing.assert_array_equal(first[key][0], second[key][0], err_msg=key)


def test_mricron_source_without_templates_is_an_error(tmp_path, no_templates):
    with pytest.raises(TemplatesMissingError) as info:
        build_demo_dataset(tmp_path, num_train=2, num_test=0, source="mricron")
    message = _one_line(str(info.value))
    assert "mricron-data" in message and "apt-get install -y mricron-data" in message
    assert list(tmp_path.iterdir()) == []


def test_template_folder_argument_overrides_default(tmp_path, capsys):
    folder = build_demo_dataset(tmp_path, num_train=2, num_test=0, source="auto",
                                template_folder=tmp_path / "nowhere")
    assert f"not found in {tmp_path / 'nowhere'}" in capsys.readouterr().err  # looked there, not in the default
    assert json.loads((folder / "dataset.json").read_text())["nnunet_adv_source"] in ("icbm152", "synthetic")


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kwargs", [
    {"num_train": 0}, {"num_test": -1}, {"dataset_id": 0}, {"dataset_id": 1000},
    {"name": "has space"}, {"name": ""}, {"crop_size": 8}, {"crop_size": (40, 40)},
    {"source": "internet"},
])
def test_bad_arguments_raise_config_error(tmp_path, kwargs):
    with pytest.raises(DemoDataConfigError):
        build_demo_dataset(tmp_path, **{"source": "synthetic", **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_missing_raw_folder_is_a_config_error(tmp_path):
    with pytest.raises(DemoDataConfigError, match="does not exist"):
        build_demo_dataset(tmp_path / "missing", source="synthetic")


# --------------------------------------------------------------------------- CLI


def _run_cli(args, env_update=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_writes_dataset_and_says_where(tmp_path):
    result = _run_cli(["--num_train", "2", "--num_test", "1", "--source", "synthetic",
                       "-d", "905", "--name", "CliDemo"],
                      env_update={"nnUNet_raw": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "Dataset905_CliDemo"
    assert str(folder) in result.stdout
    assert (folder / "dataset.json").is_file()
    assert "writing demo cases" in result.stderr  # tqdm progress


def test_cli_one_line_errors(tmp_path):
    (tmp_path / "Dataset900_Existing").mkdir()
    cases = {
        "existing dataset": (["-o", str(tmp_path)], {}, ()),
        "bad number": (["-o", str(tmp_path), "-d", "901", "--num_train", "0"], {}, ()),
        "not a number": (["-o", str(tmp_path), "--num_test", "two"], {}, ()),
        "missing raw folder": (["-o", str(tmp_path / "nope")], {}, ()),
        "no raw folder given": ([], {}, ("nnUNet_raw",)),
        "missing templates": (["-o", str(tmp_path), "-d", "902", "--source", "mricron",
                               "--template_dir", str(tmp_path / "none")], {}, ()),
    }
    for what, (args, env_update, drop) in cases.items():
        result = _run_cli(args, env_update, drop)
        assert result.returncode == 2, (what, result.stderr)
        line = _one_line(result.stderr)
        assert line.startswith("nnUNetv2_adv_make_demo_dataset: error:"), (what, line)
        assert "Traceback" not in result.stderr, what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset900_Existing"]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "nnUNetv2_adv_make_demo_dataset"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--num_train" in result.stdout


@requires_mricron
def test_a_second_task_of_other_anatomy_caudate_and_putamen(tmp_path):
    """``structures="caudate-putamen"``: labels 1 and 2 are AAL 71/72 and 73/74, named so in
    dataset.json; the un-augmented anchor case equals the atlas there, and every case holds both."""
    folder = build_demo_dataset(tmp_path, dataset_id=905, num_train=3, num_test=1, crop_size=40, seed=0,
                                source="mricron", structures="caudate-putamen")
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "caudate": 1,
                                                                           "putamen": 2}
    root = demo_data.template_dir()
    t1, template_affine = _load(root / "ch2.nii.gz")
    aal, _ = _load(root / "aal.nii.gz")
    expected = np.zeros(aal.shape, np.uint8)
    expected[np.isin(aal, (71, 72))] = 1
    expected[np.isin(aal, (73, 74))] = 2
    cases = list(_cases(folder))
    _, image_path, label_path = cases[0]
    labels, affine = _load(label_path)
    start = np.round((np.linalg.inv(template_affine) @ affine)[:3, 3]).astype(int)
    region = tuple(slice(s, s + n) for s, n in zip(start, labels.shape))
    np.testing.assert_array_equal(labels, expected[region])
    np.testing.assert_array_equal(_load(image_path)[0], t1[region])
    for _, _, path in cases:
        assert set(np.unique(_load(path)[0]).tolist()) == {0, 1, 2}
    with pytest.raises(demo_data.DemoDataConfigError, match="structures must be one of"):
        build_demo_dataset(tmp_path, dataset_id=906, num_train=1, num_test=0, structures="thalamus")
