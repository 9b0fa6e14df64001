"""Natural corruptions (TorchIO) at five severities: names, severities, seeds, geometry, units."""
import numpy as np
import pytest

from nnunet_adv.errors import UserError
from nnunet_adv.evaluation.corruptions import CORRUPTIONS, case_seed, corrupt, parse_corruptions

pytest.importorskip("torchio")


def _image(shape=(1, 24, 24, 24), lo=-1000.0, hi=1000.0):
    rng = np.random.default_rng(0)
    x = np.zeros(shape, np.float32)
    x[(slice(None),) + tuple(slice(s // 4, 3 * s // 4) for s in shape[1:])] = 1.0
    return (lo + (hi - lo) * (0.2 + 0.6 * x + 0.05 * rng.standard_normal(shape))).astype(np.float32)


def test_parse_names_severities_and_all():
    assert parse_corruptions(["noise:2", "blur"]) == [("noise", 2)] + [("blur", s) for s in range(1, 6)]
    assert len(parse_corruptions(["all"])) == 8 * 5 and len(CORRUPTIONS) == 8
    for bad, message in (("fog", "unknown corruption 'fog'"), ("noise:6", "severity must be one of 1-5"),
                         ("noise:x", "must be an integer 1-5")):
        with pytest.raises(UserError, match=message):
            parse_corruptions([bad])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_is_seeded_keeps_the_shape_and_grows_with_severity(name):
    x = _image()
    mild, severe = corrupt(x, (1, 1, 1), name, 1, 7), corrupt(x, (1, 1, 1), name, 5, 7)
    assert mild.shape == x.shape and mild.dtype == np.float32 and np.isfinite(severe).all()
    assert np.array_equal(mild, corrupt(x, (1, 1, 1), name, 1, 7))         # seeded: the same artefact
    change = lambda y: float(np.sqrt(np.mean((y - x) ** 2)))  # noqa: E731
    assert 0 < change(mild) < change(severe)


def test_intensity_corruptions_mean_the_same_on_ct_and_mri_ranges():
    """Noise is a fraction of the channel's range: the same severity on HU and on 0-255 data."""
    ct, mr = _image(lo=-1000, hi=1000), _image(lo=0, hi=255)
    rel = [np.std(corrupt(x, (1, 1, 1), "noise", 3, 1) - x) / (x.max() - x.min()) for x in (ct, mr)]
    assert rel[0] == pytest.approx(rel[1], rel=0.05) and rel[0] == pytest.approx(0.06 * 2000 / np.ptp(ct), rel=0.1)


def test_2d_images_and_case_seeds():
    x = _image((1, 1, 32, 32))
    for name in CORRUPTIONS:
        assert corrupt(x, (1, 1, 1), name, 3, 0).shape == x.shape
    assert case_seed(0, "a", "noise", 1) != case_seed(0, "b", "noise", 1) == case_seed(0, "b", "noise", 1)
