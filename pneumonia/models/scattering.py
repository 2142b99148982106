"""The 2-D scattering transform (Mallat 2012; Bruna & Mallat 2013) as kymatio 0.3.0's
`Scattering2D(J, shape, L, max_order=2)` computes it, in plain torch: a fixed, data-independent
feature extractor (Tramèr & Boneh, ICLR 2021: "Differentially private learning needs better
features"), so DP-SGD only has to train the small model on top.

Contract: `Scattering2D(J, L)` maps images [B, C, M, N] (M and N multiples of 2^J) to
[B, C * K, M / 2^J, N / 2^J] with K = 1 + J*L + L^2*J*(J-1)/2 channels per input channel
(81 at J=2, L=8), in kymatio's order: per input channel the zeroth order (low-pass),
then the first order |x * psi_{j1,t1}| * phi (j1 major), then the second order
||x * psi_{j1,t1}| * psi_{j2,t2}| * phi for j2 > j1 (j1, t1, j2, t2 major to minor). Like
kymatio it pads the image by reflection to the next multiple of 2^J above M + 2^J, convolves
in the Fourier domain (periodic on the padded grid), subsamples by periodising the spectrum,
and crops one coefficient from each border.

It has no learnable parameters. Its filters are buffers kept out of the state dict
(`persistent=False`): a checkpoint holds only the trained layers after it, and the filters are
rebuilt from (J, L, image size) on the first forward pass at a size, on the input's device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# kymatio's constants: the Morlet's scale 0.8 * 2^j, its frequency 3/4 pi / 2^j, its slant
# 4 / L, and the Gaussian's normalisation, which kymatio writes with pi as 3.1415.
SIGMA0 = 0.8
XI0 = 3.0 / 4.0 * math.pi
PI_KYMATIO = 3.1415
PERIODS = range(-2, 3)  # the Gaussians are periodised over 5 x 5 copies of the grid


def channels(J: int, L: int) -> int:
    """Scattering channels per input channel (orders 0, 1 and 2)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def padded_size(size: int, J: int) -> int:
    """kymatio's padded side: the multiple of 2^J after the one above `size` + 2^J."""
    return ((size + 2**J) // 2**J + 1) * 2**J


def gabor(M: int, N: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """A Gabor filter in space [M, N] (complex128), periodised on the grid: kymatio's gabor_2d."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    curv = rot @ torch.diag(torch.tensor([1.0, slant * slant], dtype=torch.float64)) @ rot.T
    curv = curv / (2 * sigma * sigma)
    out = torch.zeros(M, N, dtype=torch.complex128)
    for ex in PERIODS:
        xx = torch.arange(ex * M, (ex + 1) * M, dtype=torch.float64)[:, None]
        for ey in PERIODS:
            yy = torch.arange(ey * N, (ey + 1) * N, dtype=torch.float64)[None, :]
            quad = curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy
            phase = xx * xi * c + yy * xi * s
            out += torch.exp(torch.complex(-quad, phase))
    return out / (2 * PI_KYMATIO * sigma * sigma / slant)


def morlet(M: int, N: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """A Morlet filter: a Gabor minus the Gaussian that gives it zero mean (kymatio's)."""
    wave = gabor(M, N, sigma, theta, xi, slant)
    envelope = gabor(M, N, sigma, theta, 0.0, slant)
    return wave - wave.sum() / envelope.sum() * envelope


def periodize(spectrum: torch.Tensor, res: int) -> torch.Tensor:
    """A real spectrum [M, N] folded to [M / 2^res, N / 2^res] after its band above the new
    Nyquist frequency is cut (kymatio's periodize_filter_fft)."""
    if res == 0:
        return spectrum
    M, N = spectrum.shape
    k = 2**res
    masked = spectrum.clone()
    start_x, len_x = int(M * 2 ** (-res - 1)), int(M * (1 - 2**-res))
    start_y, len_y = int(N * 2 ** (-res - 1)), int(N * (1 - 2**-res))
    masked[start_x : start_x + len_x, :] = 0
    masked[:, start_y : start_y + len_y] = 0
    return masked.reshape(k, M // k, k, N // k).sum(dim=(0, 2))


def filter_bank(M: int, N: int, J: int, L: int) -> dict[str, torch.Tensor]:
    """The Fourier filters (real, float64) on the padded grid [M, N]: `phi<r>` the low-pass at
    resolution r (0..J-1), `psi<r>` the J*L wavelets (index j*L + theta) at resolution r."""
    spectrum = lambda f: torch.fft.fft2(f).real  # noqa: E731  (zero imaginary part)
    psi = torch.stack(
        [
            spectrum(
                morlet(
                    M,
                    N,
                    SIGMA0 * 2**j,
                    (int(L - L / 2 - 1) - theta) * math.pi / L,
                    XI0 / 2**j,
                    4.0 / L,
                )
            )
            for j in range(J)
            for theta in range(L)
        ]
    )
    phi = spectrum(gabor(M, N, SIGMA0 * 2 ** (J - 1), 0.0, 0.0, 1.0))
    bank = {f"phi{r}": periodize(phi, r) for r in range(J)}
    for r in range(max(J - 1, 1)):  # the second order reads the wavelets at resolution j1
        bank[f"psi{r}"] = torch.stack([periodize(p, r) for p in psi])
    return bank


def reflect_index(size: int, padded: int) -> torch.Tensor:
    """Indices of the rows (or columns) of an image reflected about its borders to `padded`
    (torch's ReflectionPad2d, and beyond one image side as kymatio extends it)."""
    before = (padded - size) // 2
    period = 2 * (size - 1)
    at = (torch.arange(padded) - before) % period
    return torch.where(at >= size, period - at, at)


def subsample(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    """The spectrum [..., M / k, N / k, 2] of the image whose spectrum is [..., M, N, 2],
    subsampled by `k` in both directions: periodised."""
    if k == 1:
        return spectrum
    *batch, M, N, two = spectrum.shape
    # One block axis at a time: a mean over two strided axes at once is slower on the CPU.
    folded = spectrum.reshape(*batch, k, M // k, k, N // k, two)
    return folded.mean(dim=-3).mean(dim=-4)


class Scattering2D(nn.Module):
    """Fixed 2-D scattering of order 2 (see the module docstring): [B, C, M, N] ->
    [B, C * channels(J, L), M / 2^J, N / 2^J]."""

    def __init__(self, J: int = 2, L: int = 8) -> None:
        super().__init__()
        self.J, self.L = J, L
        self.shape: tuple[int, int] | None = None  # the size the buffers were built for

    def out_channels(self, in_channels: int = 1) -> int:
        return in_channels * channels(self.J, self.L)

    def extra_repr(self) -> str:
        return f"J={self.J}, L={self.L}"

    def _build(self, M: int, N: int, device: torch.device) -> None:
        """Filters and padding indices for images [M, N], as non-persistent buffers."""
        Mp, Np = padded_size(M, self.J), padded_size(N, self.J)
        # Computed on the CPU in float64 whatever the default device (a meta-device build would
        # pay the meta dispatch for each of its thousands of small operations), then moved.
        with torch.device("cpu"):
            buffers = filter_bank(Mp, Np, self.J, self.L)
            buffers["rows"] = reflect_index(M, Mp)
            buffers["cols"] = reflect_index(N, Np)
        for name, value in buffers.items():
            value = value.float() if value.is_floating_point() else value
            self.register_buffer(name, value.to(device), persistent=False)
        self.shape = (M, N)

    def _buffer(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)  # built by _build
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, N = x.shape[-2:]
        if M % 2**self.J or N % 2**self.J:
            raise ValueError(
                f"scattering with J={self.J} needs sides that are multiples of {2**self.J}, "
                f"not {M} x {N}"
            )
        rows = getattr(self, "rows", None)
        if self.shape != (M, N) or rows is None or rows.device != x.device:
            self._build(M, N, x.device)
        B, C = x.shape[:2]
        # fft has no half-precision CPU kernel: the transform runs in float32 whatever the input.
        padded = x.float()[..., self._buffer("rows"), :][..., self._buffer("cols")]
        coefs = self._orders(_fft2(padded))
        return torch.cat([c.reshape(B, C, -1, *c.shape[-2:]) for c in coefs], dim=2).flatten(1, 2)

    def _orders(self, U0: torch.Tensor) -> list[torch.Tensor]:
        """The coefficients [B, C, K_i, m, n] of each order and scale from the padded image's
        spectrum U0 [B, C, Mp, Np, 2], in kymatio's order."""
        J, L = self.J, self.L
        phi = [self._buffer(f"phi{r}")[..., None] for r in range(J)]  # real: one per (re, im)
        psi0 = self._buffer("psi0")[..., None]
        out = [_low_pass(U0[:, :, None], phi[0], 2**J)]
        firsts, seconds = [], []
        for j1 in range(J):
            U1 = _modulus(U0[:, :, None] * psi0[j1 * L : (j1 + 1) * L], 2**j1)
            firsts.append(_low_pass(U1, phi[j1], 2 ** (J - j1)))
            if j1 + 1 < J:
                psi = self._buffer(f"psi{j1}")[(j1 + 1) * L :, ..., None]  # those with j2 > j1
                per_j2 = []
                for j2 in range(j1 + 1, J):
                    band = psi[(j2 - j1 - 1) * L : (j2 - j1) * L]
                    U2 = _modulus(U1[:, :, :, None] * band, 2 ** (j2 - j1))
                    per_j2.append(_low_pass(U2, phi[j2], 2 ** (J - j2)))
                # [B, C, L(t1), sum_j2 L(t2), m, n] -> t1 major, then (j2, t2)
                seconds.append(torch.cat(per_j2, dim=3).flatten(2, 3))
        return out + firsts + seconds


# Spectra are kept as real tensors [..., M, N, 2] (real and imaginary parts) between the FFTs:
# the ONNX exporter converts the FFTs but few other operations on complex tensors.


def _fft2(signal: torch.Tensor) -> torch.Tensor:
    """The spectrum [..., M, N, 2] of a real signal [..., M, N]."""
    return torch.view_as_real(torch.fft.fft2(signal))


def _ifft2(spectrum: torch.Tensor) -> torch.Tensor:
    """The complex signal [..., M, N, 2] of a spectrum [..., M, N, 2]."""
    return torch.view_as_real(torch.fft.ifft2(torch.view_as_complex(spectrum.contiguous())))


def _modulus(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    """The spectrum of |ifft(spectrum subsampled by k)|."""
    signal = _ifft2(subsample(spectrum, k))
    return _fft2(signal.square().sum(dim=-1).sqrt())


def _low_pass(spectrum: torch.Tensor, phi: torch.Tensor, k: int) -> torch.Tensor:
    """Low-pass, subsample by k, back to space (the real part), and crop kymatio's one-pixel
    border."""
    return _ifft2(subsample(spectrum * phi, k))[..., 1:-1, 1:-1, 0]
