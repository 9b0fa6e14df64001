"""Report figures: PNG validity and pixel sizes, central slices, scale texts, degenerate inputs."""
import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.text import Text

from nnunet_adv.evaluation import figures as rf

RNG = np.random.default_rng(0)
SHAPE = (16, 20)
NUM_CLASSES = 3


def _example_row(i, epsilon=0.031):
    image = RNG.normal(100.0, 20.0, SHAPE)
    labels = (image > 100).astype(int) + (image > 120).astype(int)   # values 0..2
    sign = np.sign(RNG.normal(size=SHAPE))
    return rf.ExampleRow(title=f"nnUNetTrainer, case_{i:03d}, pgd:eps=4", image=image,
                         adversarial=image + epsilon * sign, clean_prediction=labels,
                         adversarial_prediction=np.roll(labels, 1, axis=0), reference=labels)


def _texts(fig):
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _png_size(path):
    """(width, height) of a PNG, asserting it decodes to a non-blank RGB(A) image."""
    pixels = imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0      # something was drawn
    return pixels.shape[1], pixels.shape[0]


# --------------------------------------------------------------------------- central_slice

def test_central_slice_3d_each_axis():
    volume = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    np.testing.assert_array_equal(rf.central_slice(volume), volume[1])
    np.testing.assert_array_equal(rf.central_slice(volume, axis=1), volume[:, 2, :])
    np.testing.assert_array_equal(rf.central_slice(volume, axis=2), volume[:, :, 2])
    # hand-checked: volume[z, y, x] = 20 z + 5 y + x, so slice z = 1 starts at 20
    assert rf.central_slice(volume)[0, 0] == 20 and rf.central_slice(volume).shape == (4, 5)


def test_central_slice_2d_unchanged_and_bad_ndim():
    image = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(rf.central_slice(image), image)
    with pytest.raises(ValueError):
        rf.central_slice(np.zeros(5))


# --------------------------------------------------------------------------- examples

@pytest.mark.parametrize("n_rows", [1, 3])
def test_examples_png_size(tmp_path, n_rows):
    out = tmp_path / "sub" / "examples.png"
    rf.plot_examples([_example_row(i) for i in range(n_rows)], out, NUM_CLASSES)
    assert _png_size(out) == rf.examples_figure_size(n_rows)
    assert rf.examples_figure_size(3)[1] == 3 * rf.examples_figure_size(1)[1]


def test_examples_titles_and_scale():
    rows = [_example_row(0, epsilon=0.031), _example_row(1, epsilon=4.0)]
    texts = _texts(rf.build_examples_figure(rows, NUM_CLASSES))
    assert "perturbation (±0.031)" in texts and "perturbation (±4)" in texts
    assert rows[0].title in texts and rows[1].title in texts
    for column in ("image", "adversarial image", "clean prediction", "ground truth"):
        assert texts.count(column) == 2


def test_examples_perturbation_limits_and_shared_grey():
    fig = rf.build_examples_figure([_example_row(0, epsilon=0.5)], NUM_CLASSES)
    image_ax, perturbation_ax, adversarial_ax = fig.subfigs[0].axes[:3]
    assert perturbation_ax.images[0].get_clim() == pytest.approx((-0.5, 0.5))
    assert adversarial_ax.images[0].get_clim() == image_ax.images[0].get_clim()


def test_examples_zero_perturbation(tmp_path):
    row = _example_row(0, epsilon=0.0)
    assert rf.perturbation_scale(row.image, row.adversarial) == 0.0
    assert "perturbation (±0)" in _texts(rf.build_examples_figure([row], NUM_CLASSES))
    rf.plot_examples([row], tmp_path / "zero.png", NUM_CLASSES)
    assert _png_size(tmp_path / "zero.png") == rf.examples_figure_size(1)


def test_label_colormap_fixed_and_background_black():
    cmap, norm = rf.label_colormap(4)
    colors = [tuple(cmap(norm(k))[:3]) for k in range(4)]
    assert colors[0] == (0.0, 0.0, 0.0)
    assert len(set(colors)) == 4
    # the same class has the same colour whatever the number of classes
    cmap8, norm8 = rf.label_colormap(8)
    assert tuple(cmap8(norm8(2))[:3]) == colors[2]


# --------------------------------------------------------------------------- robustness curve

CURVES = {"nnUNetTrainer": {"eps": [0, 0.5, 1, 2, 4, 8, 16, 32],
                            "dice": [0.9, 0.8, 0.7, 0.5, 0.3, 0.1, 0.05, 0.0],
                            "jaccard": [0.82, 0.67, 0.54, 0.33, 0.18, 0.05, 0.03, 0.0]},
          "DualBN": {"eps": [0, 0.5, 1, 2, 4, 8, 16, 32],
                     "dice": [0.88, 0.86, float("nan"), 0.8, None, 0.6, 0.5, 0.4],
                     "jaccard": [0.79, 0.75, float("nan"), 0.67, None, 0.43, 0.33, 0.25]}}


def test_robustness_curve_png_size_with_nan(tmp_path):
    out = tmp_path / "curve.png"
    rf.plot_robustness_curve(CURVES, out, x_label="eps (intensity units)", title="Dataset 1")
    assert _png_size(out) == rf.curve_figure_size()


def test_robustness_curve_axes():
    fig = rf.build_robustness_curve_figure(CURVES, x_label="eps", title="T")
    dice_ax, jaccard_ax = fig.axes[:2]
    for ax in (dice_ax, jaccard_ax):
        assert ax.get_xscale() == "symlog"
        assert ax.xaxis.get_transform().linthresh == 0.5
        assert list(ax.get_xticks()) == [0, 0.5, 1, 2, 4, 8, 16, 32]
        assert ax.get_ylim() == (0.0, 1.0)
        assert len(ax.lines) == 2
    assert [t.get_text() for t in dice_ax.get_xticklabels()][:3] == ["0", "0.5", "1"]
    assert [t.get_text() for t in dice_ax.get_legend().get_texts()] == list(CURVES)
    assert "Jaccard" in jaccard_ax.get_ylabel() and "Dice" in dice_ax.get_ylabel()
    # a doubling sweep is evenly spaced, 0 included
    x = dice_ax.transData.transform([(e, 0) for e in (0, 0.5, 1, 2)])[:, 0]
    np.testing.assert_allclose(np.diff(x), np.diff(x)[0], rtol=1e-6)


def test_robustness_curve_all_nan_and_clean_only(tmp_path):
    curves = {"m": {"eps": [0], "dice": [float("nan")], "jaccard": [float("nan")]}}
    rf.plot_robustness_curve(curves, tmp_path / "c.png", x_label="eps")
    assert _png_size(tmp_path / "c.png") == rf.curve_figure_size()


# --------------------------------------------------------------------------- saliency

def _saliency_inputs(n_rows, n_models):
    slices = [(f"case_{i:03d}", RNG.normal(size=SHAPE)) for i in range(n_rows)]
    maps = {f"model{m}": [np.abs(RNG.normal(size=SHAPE)) for _ in range(n_rows)]
            for m in range(n_models)}
    return slices, maps


@pytest.mark.parametrize("n_rows,n_models", [(1, 1), (3, 2)])
def test_saliency_png_size(tmp_path, n_rows, n_models):
    out = tmp_path / "saliency.png"
    rf.plot_saliency(*_saliency_inputs(n_rows, n_models), out)
    assert _png_size(out) == rf.saliency_figure_size(n_rows, n_models)


def test_saliency_titles_and_mismatch():
    slices, maps = _saliency_inputs(2, 2)
    fig = rf.build_saliency_figure(slices, maps)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "model0", "model1"]
    assert [fig.axes[3 * r].get_ylabel() for r in range(2)] == ["case_000", "case_001"]
    maps["model1"] = maps["model1"][:1]
    with pytest.raises(ValueError):
        rf.build_saliency_figure(slices, maps)


def test_saliency_titles_of_long_trainer_names_do_not_overlap():
    """nnU-Net trainer names with settings (80 characters) side by side: each title wrapped to its panel."""
    names = [f"nnUNetTrainer{r}_steps-3_alphaeps-0.833_ep-3_its-50_valits-2_valsteps-1_seed-0"
             for r in ("PGDAT", "DualBN")]
    slices, maps = _saliency_inputs(1, 2)
    fig = rf.build_saliency_figure(slices, dict(zip(names, maps.values())))
    fig.canvas.draw()
    titles = [ax.title for ax in fig.axes[:3]]
    assert [t.get_text().replace("\n", "") for t in titles] == ["image"] + names
    boxes = [t.get_window_extent() for t in titles]
    assert all(not a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    assert rf.panel_title("a_b", width=2) == "a_\nb" and rf.panel_title("x" * 5, width=2) == "xx\nxx\nx"


def test_normalise_saliency():
    saliency = np.arange(1000, dtype=float)             # 99th percentile = 989.01
    normalised = rf.normalise_saliency(-saliency)       # the sign is dropped
    assert normalised.max() == 1.0 and normalised[0] == 0.0
    assert normalised[500] == pytest.approx(500 / np.percentile(saliency, 99))
    assert not rf.normalise_saliency(np.zeros(SHAPE)).any()
    sparse = np.zeros(1000)
    sparse[3] = 7.0                                      # 99th percentile 0 -> scale by max
    assert rf.normalise_saliency(sparse)[3] == 1.0


def test_backend_untouched(tmp_path):
    before = matplotlib.get_backend()
    rf.plot_saliency(*_saliency_inputs(1, 1), tmp_path / "s.png")
    assert matplotlib.get_backend() == before
