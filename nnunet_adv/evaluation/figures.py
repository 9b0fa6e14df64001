"""Figures of the robustness report written by ``nnUNetv2_adv_evaluate``.

Three PNG figures, all drawn from plain numpy arrays (nothing here imports torch or nnU-Net):

``examples.png`` (:func:`plot_examples`)
    One row per (model, case, attack) example, six panels from left to right:

    1. the clean image slice (raw intensities, grey);
    2. the perturbation ``adversarial - image``, amplified: a diverging colormap centred on 0
       whose limits are ``+-max|perturbation|``; that amplitude is written in the panel title,
       so a near-invisible perturbation is still readable and its size is known;
    3. the adversarial image, with the same grey limits as the clean image so that both are
       directly comparable;
    4. the prediction on the clean image;
    5. the prediction on the adversarial image;
    6. the ground truth.

    The three label maps share one fixed discrete colormap (background black), so a colour means
    the same class in every panel of every row.

``robustness_curve.png`` (:func:`plot_robustness_curve`)
    Mean foreground Dice (left) and mean foreground Jaccard (right) against the attack budget
    eps, one line per model. eps = 0 is the clean score. The budgets of a sweep are usually
    geometric (0.5, 1, 2, ..., 32), so the x axis is symmetric-log in base 2: linear between 0
    and the smallest positive eps, logarithmic beyond, which puts 0 and every doubling of eps
    one tick apart.

``saliency.png`` (:func:`plot_saliency`)
    Input-gradient saliency ``|dLoss/dx|`` (the interpretability comparison of the dual-BN
    adversarial-training paper): one row per case, the image then one panel per model with its
    saliency map overlaid in the 'hot' colormap on the image in grey. A robust model is expected
    to concentrate its gradient on object boundaries, a standard one to spread it as noise.

Every figure has a deterministic pixel size, given by the matching ``*_figure_size`` function:
fixed inches per panel at :data:`DPI`, saved without ``bbox_inches='tight'`` (which would crop
to the content and make the size depend on the text). Figures are built as
:class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, never through pyplot, so
no display is needed and the user's global matplotlib backend is left untouched. The
``build_*_figure`` functions return the figure unsaved, so that tests can inspect its texts.

Slices are drawn as stored in the array (first axis downwards); no radiological re-orientation
is applied.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Tuple, Union

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

DPI = 100

PathOrFile = Union[str, os.PathLike, io.IOBase]   # anything Figure.savefig accepts

# Sizes in pixels. Every size is a multiple of DPI / 4, so the size in inches (pixels / DPI) is
# exact in binary floating point and the saved PNG has exactly these dimensions.
_PANEL_PX = 250          # width of one image panel
_ROW_PX = 300            # height of one row: the square panel plus its row and panel titles
_HEADER_PX = 100         # band for a two-line figure title and the column titles
_CURVE_SIZE_PX = (1100, 450)

# Style used both while building and while saving: texts take their size when they are
# created, and "savefig.bbox" from a user's matplotlibrc must not crop the figure.
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "figure.titlesize": 10,
    "savefig.bbox": "standard",
    "savefig.facecolor": "white",
}

_EXAMPLE_COLUMNS = ("image", "perturbation", "adversarial image",
                    "clean prediction", "adversarial prediction", "ground truth")

# Grey limits of raw intensities: percentiles rather than min/max, so that a few extreme
# voxels (metal in CT, a bright vessel in MRI) do not wash out the rest of the slice.
_GREY_PERCENTILES = (0.5, 99.5)
_SALIENCY_PERCENTILE = 99.0

# Foreground class colours, cycled beyond ten classes; background is black.
_CLASS_COLORS = matplotlib.colormaps["tab10"].colors


# --------------------------------------------------------------------------- shared helpers

def central_slice(volume: np.ndarray, axis: int = 0) -> np.ndarray:
    """2D slice at the centre of `axis` of a 3D array (Z, Y, X); a 2D array is returned unchanged.

    The centre index is ``shape[axis] // 2`` (the upper of the two middle slices for an even
    size). Raises ValueError for arrays that are neither 2D nor 3D.
    """
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return volume
    if volume.ndim != 3:
        raise ValueError(f"expected a 2D or 3D array, got shape {volume.shape}")
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def _new_figure(size_px: Tuple[int, int]) -> Figure:
    """An Agg-backed figure of exactly `size_px` (width, height) pixels at DPI."""
    width, height = size_px
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_file: PathOrFile) -> None:
    """Write `fig` at DPI, uncropped, creating the parent folder of a path if needed."""
    if isinstance(out_file, (str, os.PathLike)):
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(_STYLE):
        fig.savefig(out_file, dpi=DPI)


def _blank_axes(ax) -> None:
    """No ticks nor frame, but keep the axis labels (unlike ax.axis('off'))."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _grey_limits(image: np.ndarray) -> Tuple[float, float]:
    """(vmin, vmax) for displaying raw intensities, see _GREY_PERCENTILES."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, _GREY_PERCENTILES)
    return float(low), float(high)


def _show_grey(ax, image: np.ndarray, limits: Tuple[float, float]) -> None:
    ax.imshow(image, cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest")


# --------------------------------------------------------------------------- examples.png

@dataclass
class ExampleRow:
    """One row of examples.png; all arrays are 2D slices of the same shape (Y, X)."""

    title: str                          # e.g. "nnUNetTrainer, case_003, pgd:eps=4"
    image: np.ndarray                   # float, the clean image slice (raw intensities)
    adversarial: np.ndarray             # float, same slice of the adversarial image
    clean_prediction: np.ndarray        # int labels
    adversarial_prediction: np.ndarray  # int labels
    reference: np.ndarray               # int labels (ground truth)


def examples_figure_size(n_rows: int) -> Tuple[int, int]:
    """(width, height) in pixels of examples.png for n_rows rows: 250 px per panel column (6
    columns) by 300 px per row, i.e. (1500, 300 * n_rows)."""
    return len(_EXAMPLE_COLUMNS) * _PANEL_PX, n_rows * _ROW_PX


def label_colormap(num_classes: int) -> Tuple[ListedColormap, BoundaryNorm]:
    """Discrete colormap and norm for label maps with values 0..num_classes-1.

    Class 0 (background) is black, classes 1.. take the 'tab10' colours in order (cycled past
    ten). The norm maps each integer exactly to its colour, whatever subset of classes a given
    slice contains, so colours are comparable across panels.
    """
    num_classes = max(int(num_classes), 1)
    colors = ["black"] + [_CLASS_COLORS[i % len(_CLASS_COLORS)] for i in range(num_classes - 1)]
    cmap = ListedColormap(colors, name=f"labels{num_classes}")
    norm = BoundaryNorm(np.arange(num_classes + 1) - 0.5, num_classes)
    return cmap, norm


def perturbation_scale(image: np.ndarray, adversarial: np.ndarray) -> float:
    """max |adversarial - image| over the finite pixels, in image intensity units (0 if none)."""
    delta = np.asarray(adversarial, dtype=float) - np.asarray(image, dtype=float)
    finite = np.abs(delta[np.isfinite(delta)])
    return float(finite.max()) if finite.size else 0.0


def perturbation_title(scale: float) -> str:
    """Title of the perturbation panel: its colour limits, i.e. how much it is amplified."""
    return f"perturbation (±{scale:.3g})"


def _plot_perturbation(ax, image: np.ndarray, adversarial: np.ndarray) -> None:
    scale = perturbation_scale(image, adversarial)
    # A zero perturbation still needs a non-empty colour range; any positive value works,
    # 0 then lands on the neutral centre of the colormap.
    limit = scale if scale > 0 else 1.0
    ax.imshow(np.asarray(adversarial, dtype=float) - np.asarray(image, dtype=float),
              cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(perturbation_title(scale))


def _plot_example_row(subfig, row: ExampleRow, cmap, norm) -> None:
    axes = subfig.subplots(1, len(_EXAMPLE_COLUMNS))
    subfig.suptitle(row.title)
    grey = _grey_limits(np.asarray(row.image, dtype=float))
    _show_grey(axes[0], row.image, grey)
    _plot_perturbation(axes[1], row.image, row.adversarial)
    _show_grey(axes[2], row.adversarial, grey)
    label_maps = (row.clean_prediction, row.adversarial_prediction, row.reference)
    for ax, labels in zip(axes[3:], label_maps):
        ax.imshow(labels, cmap=cmap, norm=norm, interpolation="nearest")
    for ax, name in zip(axes, _EXAMPLE_COLUMNS):
        if not ax.get_title():      # the perturbation panel already has its scale title
            ax.set_title(name)
        _blank_axes(ax)


def build_examples_figure(rows: Sequence[ExampleRow], num_classes: int) -> Figure:
    """The examples figure (see plot_examples), unsaved."""
    if not rows:
        raise ValueError("plot_examples needs at least one row")
    cmap, norm = label_colormap(num_classes)
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(examples_figure_size(len(rows)))
        # One subfigure per row so that each row gets its own title above its six panels.
        subfigs = np.atleast_1d(fig.subfigures(len(rows), 1))
        for subfig, row in zip(subfigs, rows):
            _plot_example_row(subfig, row, cmap, norm)
    return fig


def plot_examples(rows: Sequence[ExampleRow], out_file: PathOrFile, num_classes: int) -> None:
    """Write examples.png: per row, image | perturbation | adversarial image | clean prediction |
    adversarial prediction | ground truth (see the module docstring).

    rows: the examples, one figure row each (at least one). num_classes: number of labels,
    background included (label maps hold values 0..num_classes-1). The PNG is
    examples_figure_size(len(rows)) pixels. A zero perturbation is drawn as a blank panel
    titled '±0'.
    """
    _save(build_examples_figure(rows, num_classes), out_file)


# --------------------------------------------------------------------------- robustness curve

def curve_figure_size() -> Tuple[int, int]:
    """(width, height) in pixels of the robustness-curve figure: (1100, 450)."""
    return _CURVE_SIZE_PX


def _eps_axis(ax, eps_values: Sequence[float], x_label: str) -> None:
    """Symlog x axis in base 2 with one labelled tick per eps of the sweep.

    Base 2 and linscale 0.5 make the linear part [0, linthresh] exactly one octave wide, so a
    doubling sweep 0, e, 2e, 4e, ... is evenly spaced.
    """
    eps = sorted({float(e) for e in eps_values if np.isfinite(e)})
    positive = [e for e in eps if e > 0]
    linthresh = positive[0] if positive else 1.0
    ax.set_xscale("symlog", base=2, linthresh=linthresh, linscale=0.5)
    ax.xaxis.set_major_locator(FixedLocator(eps))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{e:g}" for e in eps]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(x_label)


def _plot_metric_panel(ax, curves: Mapping[str, Mapping], metric: str, label: str,
                       x_label: str) -> None:
    for model, curve in curves.items():
        # float conversion turns None into NaN; matplotlib leaves NaN points out (a gap).
        x = np.asarray(curve["eps"], dtype=float)
        y = np.asarray(curve[metric], dtype=float)
        # clip_on=False: a perfect score of 1 sits on the top edge and its marker stays whole.
        ax.plot(x, y, marker="o", label=model, clip_on=False)
    all_eps = [e for curve in curves.values() for e in curve["eps"]]
    _eps_axis(ax, all_eps, x_label)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)


def build_robustness_curve_figure(curves: Mapping[str, Mapping], x_label: str,
                                  title: str = "") -> Figure:
    """The robustness-curve figure (see plot_robustness_curve), unsaved."""
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(curve_figure_size())
        dice_ax, jaccard_ax = fig.subplots(1, 2)
        _plot_metric_panel(dice_ax, curves, "dice", "mean foreground Dice", x_label)
        _plot_metric_panel(jaccard_ax, curves, "jaccard", "mean foreground Jaccard", x_label)
        if curves:
            dice_ax.legend(loc="lower left")
        if title:
            fig.suptitle(title)
    return fig


def plot_robustness_curve(curves: Mapping[str, Mapping], out_file: PathOrFile, x_label: str,
                          title: str = "") -> None:
    """Write the robustness curve: mean foreground Dice (left) and Jaccard (right) vs eps.

    curves: {model_name: {"eps": [0, 0.5, 1, 2], "dice": [...], "jaccard": [...]}}, three
    sequences of equal length per model; eps in the attack's budget unit (named by x_label),
    eps 0 is the clean score; dice/jaccard in [0, 1], NaN or None for a missing point (drawn as
    a gap). The x axis is symlog (base 2, linthresh = smallest positive eps) with a tick at every
    given eps; y spans [0, 1]. The PNG is curve_figure_size() pixels.
    """
    _save(build_robustness_curve_figure(curves, x_label, title), out_file)


# --------------------------------------------------------------------------- saliency.png

#: characters per line of a panel title: a 250 px panel holds about 30 at the "small" font size
_TITLE_CHARS = 28


def panel_title(name: str, width: int = _TITLE_CHARS) -> str:
    """``name`` on lines of at most ``width`` characters, broken after underscores where it can be (nnU-Net
    trainer names with their settings run to 80 characters, and side by side they would overlap)."""
    lines, line = [], ""
    for part in re.split(r"(?<=_)", name):
        while len(part) > width:                      # a part longer than a line: cut it
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line] if line else lines)


def saliency_figure_size(n_rows: int, n_models: int) -> Tuple[int, int]:
    """(width, height) in pixels of saliency.png: 250 px square panels, one column for the
    image plus one per model, one row per case, plus a 100 px title band, i.e.
    (250 * (1 + n_models), 250 * n_rows + 100)."""
    # Unlike examples.png, rows carry no title of their own (the case name is on the side).
    return (1 + n_models) * _PANEL_PX, n_rows * _PANEL_PX + _HEADER_PX


def normalise_saliency(saliency: np.ndarray) -> np.ndarray:
    """|saliency| divided by its 99th percentile and clipped to [0, 1] (float, same shape).

    The percentile rather than the maximum, so that a few extreme gradients do not render the
    rest of the map black. NaN counts as 0; an all-zero map stays zero.
    """
    magnitude = np.abs(np.nan_to_num(np.asarray(saliency, dtype=float)))
    reference = np.percentile(magnitude, _SALIENCY_PERCENTILE) if magnitude.size else 0.0
    if reference <= 0:
        # Fewer than 1 % non-zero pixels: fall back to the maximum (0 for an all-zero map).
        reference = magnitude.max(initial=0.0)
    return np.clip(magnitude / reference, 0.0, 1.0) if reference > 0 else magnitude


def _plot_saliency_overlay(ax, image: np.ndarray, saliency: np.ndarray, grey) -> None:
    _show_grey(ax, image, grey)
    heat = normalise_saliency(saliency)
    # Per-pixel opacity = saliency: where the gradient is negligible the anatomy shows through.
    ax.imshow(heat, cmap="hot", vmin=0.0, vmax=1.0, alpha=heat, interpolation="nearest")


def build_saliency_figure(image_slices: Sequence[Tuple[str, np.ndarray]],
                          saliency: Mapping[str, Sequence[np.ndarray]]) -> Figure:
    """The saliency figure (see plot_saliency), unsaved."""
    if not image_slices:
        raise ValueError("plot_saliency needs at least one image slice")
    for model, maps in saliency.items():
        if len(maps) != len(image_slices):
            raise ValueError(f"model {model!r}: {len(maps)} saliency maps for "
                             f"{len(image_slices)} image slices")
    models = list(saliency)
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(saliency_figure_size(len(image_slices), len(models)))
        axes = fig.subplots(len(image_slices), 1 + len(models), squeeze=False)
        for row, (case, image) in enumerate(image_slices):
            grey = _grey_limits(np.asarray(image, dtype=float))
            _show_grey(axes[row, 0], image, grey)
            axes[row, 0].set_ylabel(case)
            for column, model in enumerate(models, start=1):
                _plot_saliency_overlay(axes[row, column], image, saliency[model][row], grey)
        for ax, name in zip(axes[0], ["image"] + models):
            ax.set_title(panel_title(name), fontsize="small")
        for ax in axes.flat:
            _blank_axes(ax)
        # Two short lines: the figure can be as narrow as two panels (one model).
        fig.suptitle(f"input-gradient saliency |dLoss/dx|\n"
                     f"(each map / its own {_SALIENCY_PERCENTILE:g}th percentile)")
    return fig


def plot_saliency(image_slices: Sequence[Tuple[str, np.ndarray]],
                  saliency: Mapping[str, Sequence[np.ndarray]], out_file: PathOrFile) -> None:
    """Write saliency.png: input-gradient saliency maps, one row per case.

    image_slices: [(case_name, 2D image (Y, X), raw intensities)]. saliency: {model_name: [2D
    |dLoss/dx| map per case, same order and shapes as image_slices]} (the sign is dropped, the
    unit is irrelevant since each map is normalised to its own 99th percentile, see
    normalise_saliency). Column titles are 'image' then the model names; each row is labelled
    with its case name. The PNG is saliency_figure_size(len(image_slices), len(saliency)) pixels.
    """
    _save(build_saliency_figure(image_slices, saliency), out_file)
