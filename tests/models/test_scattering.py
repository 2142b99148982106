"""The 2-D scattering transform: kymatio's numbers (when kymatio is installed), and what can be
checked by hand without it."""

import pytest
import torch

from pneumonia.models.scattering import Scattering2D, channels, filter_bank, padded_size

TOLERANCE = 1e-5  # float32 transforms of values in [0, 1]: measured differences are ~2e-7


def kymatio_scattering(size: int):
    """kymatio's Scattering2D(J=2, L=8, order 2); its package import fails on new SciPy
    (the 3-D module imports scipy.special.sph_harm), its 2-D frontend does not."""
    pytest.importorskip("kymatio")
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=2, shape=(size, size), L=8, max_order=2)


@pytest.mark.parametrize("size", [4, 8, 32])
def test_the_transform_matches_kymatio(size):
    """4 px pads by more than the image side (kymatio's special case), 32 px is the tests'."""
    reference = kymatio_scattering(size)
    images = torch.rand(3, 2, size, size, generator=torch.Generator().manual_seed(size))
    expected = reference(images).reshape(3, 2 * 81, size // 4, size // 4)
    ours = Scattering2D(J=2, L=8)(images)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < TOLERANCE


def test_the_filters_match_kymatio():
    pytest.importorskip("kymatio")
    from kymatio.scattering2d.filter_bank import filter_bank as kymatio_bank

    side = padded_size(32, 2)
    theirs, ours = kymatio_bank(side, side, 2, 8), filter_bank(side, side, 2, 8)
    for r in range(2):
        expected = torch.from_numpy(theirs["phi"]["levels"][r]).double()
        assert torch.allclose(ours[f"phi{r}"], expected, atol=1e-6)
    psi = torch.stack([torch.from_numpy(p["levels"][0]).double() for p in theirs["psi"]])
    assert torch.allclose(ours["psi0"], psi, atol=1e-6)


def test_a_constant_image_has_only_its_low_pass_average():
    """A constant image has one Fourier coefficient (the mean): the zeroth order is that value
    times the low-pass filter's sum (its spectrum at 0), and every wavelet has zero mean, so
    the first and second orders vanish."""
    size, value = 16, 0.7
    out = Scattering2D()(torch.full((1, 1, size, size), value))
    side = padded_size(size, 2)
    dc = float(filter_bank(side, side, 2, 8)["phi0"][0, 0])
    # kymatio normalises its Gaussian with 3.1415 for pi: the low-pass sums to pi / 3.1415
    assert dc == pytest.approx(torch.pi / 3.1415, abs=1e-6)
    assert torch.allclose(out[:, 0], torch.full((size // 4, size // 4), value * dc), atol=1e-6)
    assert out[:, 1:].abs().max() < 1e-6


def test_the_wavelets_have_zero_mean_and_the_low_pass_passes_the_mean():
    bank = filter_bank(40, 40, 2, 8)
    assert bank["psi0"][:, 0, 0].abs().max() < 1e-6
    assert bank["phi0"].max() == bank["phi0"][0, 0]


def test_shape_channels_and_no_state():
    """81 channels per input channel at 1/4 of the side; no parameters, nothing in the state
    dict; the filters follow the input's size."""
    assert channels(2, 8) == 1 + 2 * 8 + 8 * 8 == 81
    scattering = Scattering2D()
    assert scattering(torch.rand(2, 3, 32, 32)).shape == (2, 3 * 81, 8, 8)
    assert scattering(torch.rand(1, 1, 16, 24)).shape == (1, 81, 4, 6)
    assert list(scattering.parameters()) == [] and scattering.state_dict() == {}
    assert scattering.shape == (16, 24)


def test_the_coefficients_are_non_negative_beyond_the_zeroth_order():
    """Moduli averaged by a positive low-pass: up to rounding, never below zero."""
    out = Scattering2D()(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out[:, 1:].min() > -1e-6


def test_it_runs_on_the_meta_device_and_refuses_sides_not_a_multiple_of_four():
    scattering = Scattering2D()
    out = scattering(torch.zeros(1, 1, 64, 64, device="meta"))
    assert out.shape == (1, 81, 16, 16) and out.device.type == "meta"
    with pytest.raises(ValueError, match="multiples of 4, not 30 x 30"):
        scattering(torch.zeros(1, 1, 30, 30))
