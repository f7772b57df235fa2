"""GS-WGAN's sanitizer and its two accountings (Chen et al., NeurIPS 2020)."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedsim.privacy.gradient_sanitizer import sanitize
from fedsim.privacy.gs_wgan_accounting import GSWGANAccounting


def _rows(batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def test_sanitizer_without_noise_clips_rows_to_c_over_b_and_keeps_small_rows() -> None:
    batch, clip = 32, 1.0
    rows = _rows(batch, 64) * torch.logspace(-3, 1, batch).unsqueeze(1)  # norms 0.008 .. 80
    out = sanitize(rows, clip_norm=clip, noise_multiplier=0.0, generator=torch.Generator())
    norms, bound = out.norm(dim=1), clip / batch
    assert torch.all(norms <= bound * (1 + 1e-6))
    small = rows.norm(dim=1) <= bound
    assert small.any() and (~small).any()
    assert torch.equal(out[small], rows[small])  # under the bound: unchanged, not normalized
    large = ~small
    torch.testing.assert_close(norms[large], torch.full_like(norms[large], bound))
    # clipping only rescales: every row keeps its direction
    cosine = torch.nn.functional.cosine_similarity(out, rows, dim=1)
    torch.testing.assert_close(cosine, torch.ones(batch))


def test_sanitizer_clips_image_shaped_rows_as_whole_samples() -> None:
    rows = _rows(4, 64).view(4, 1, 8, 8) * 10
    out = sanitize(rows, clip_norm=2.0, noise_multiplier=0.0, generator=torch.Generator())
    assert out.shape == rows.shape
    torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.full((4,), 2.0 / 4))


def test_sanitizer_noise_std_is_2c_sigma_over_b_within_5_standard_errors() -> None:
    batch, dim, clip, sigma = 32, 31_250, 1.0, 1.07  # 10^6 coordinates
    zeros = torch.zeros(batch, dim, dtype=torch.float64)
    noise = sanitize(
        zeros, clip_norm=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(1)
    )
    expected, count = 2 * clip * sigma / batch, noise.numel()
    # The sample std of n Gaussians has standard error std / sqrt(2 (n - 1)).
    assert abs(noise.std().item() - expected) <= 5 * expected / math.sqrt(2 * (count - 1))
    assert abs(noise.mean().item()) <= 5 * expected / math.sqrt(count)
    # Independent across samples: the correlation of two rows has standard error 1/sqrt(dim).
    correlation = torch.corrcoef(noise[:8])
    off_diagonal = correlation[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() <= 5 / math.sqrt(dim)


def test_sanitizer_refuses_bad_settings() -> None:
    rows = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_norm"):
        sanitize(rows, clip_norm=0.0, noise_multiplier=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise_multiplier"):
        sanitize(rows, clip_norm=1.0, noise_multiplier=-1.0, generator=torch.Generator())


# The authors' accountant (autodp, Gaussian subsampled without replacement), delta = 1e-5.
PAPER_REFERENCE = [
    (1.07, 1000, 20_000, 32, 9.9926),
    (1.07, 1000, 10_000, 32, 6.7325),
    (0.80, 1000, 20_000, 32, 14.9856),
    (1.07, 500, 20_000, 32, 23.7759),
]


@pytest.mark.parametrize(("sigma", "clients", "iterations", "batch", "epsilon"), PAPER_REFERENCE)
def test_paper_accounting_gives_the_reference_values(
    sigma: float, clients: int, iterations: int, batch: int, epsilon: float
) -> None:
    accounting = GSWGANAccounting(
        noise_multiplier=sigma, sampling_rate=1 / clients, batch_size=batch, delta=1e-5
    )
    assert accounting.paper_epsilon(iterations) == pytest.approx(epsilon, abs=1e-4)


@pytest.mark.parametrize(("sigma", "clients", "iterations", "batch", "_paper"), PAPER_REFERENCE)
def test_joint_accounting_is_opacus_rdp_at_sigma_over_sqrt_b_once_per_iteration(
    sigma: float, clients: int, iterations: int, batch: int, _paper: float
) -> None:
    accounting = GSWGANAccounting(
        noise_multiplier=sigma, sampling_rate=1 / clients, batch_size=batch, delta=1e-5
    )
    opacus = RDPAccountant()
    opacus.history = [(sigma / math.sqrt(batch), 1 / clients, iterations)]
    with pytest.warns(UserWarning, match="smallest alpha"):  # Opacus's own call warns
        expected = opacus.get_epsilon(1e-5)
    assert accounting.joint_epsilon(iterations) == pytest.approx(expected, rel=1e-12)
    assert accounting.joint_noise_multiplier == pytest.approx(sigma / math.sqrt(batch))


def test_joint_accounting_of_the_papers_setting_is_in_the_hundreds() -> None:
    paper_setting = GSWGANAccounting(
        noise_multiplier=1.07, sampling_rate=1 / 1000, batch_size=32, delta=1e-5
    )
    joint = paper_setting.joint_epsilon(20_000)
    assert 100 < joint < 1000
    # (a) under the same (Opacus, Poisson) accountant is about 4.45: the two differ ~80-fold.
    opacus = RDPAccountant()
    opacus.history = [(1.07, 1 / 1000, 20_000 * 32)]
    assert opacus.get_epsilon(1e-5) == pytest.approx(4.45, abs=0.01)


def test_accounting_edges_and_refusals() -> None:
    noiseless = GSWGANAccounting(noise_multiplier=0.0, sampling_rate=0.1, batch_size=8, delta=1e-5)
    assert noiseless.paper_epsilon(1) == math.inf and noiseless.joint_epsilon(1) == math.inf
    assert noiseless.paper_epsilon(0) == 0.0 and noiseless.joint_epsilon(0) == 0.0
    both = GSWGANAccounting(noise_multiplier=1.0, sampling_rate=0.1, batch_size=8, delta=1e-5)
    assert set(both.epsilons(10)) == {"epsilon_paper", "epsilon_joint", "delta"}
    for bad in (
        {"noise_multiplier": -1.0},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"batch_size": 0},
        {"delta": 1.0},
    ):
        settings = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "batch_size": 8, "delta": 1e-5}
        with pytest.raises(ValueError, match=next(iter(bad))):
            GSWGANAccounting(**{**settings, **bad})
