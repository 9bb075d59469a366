"""Noise schedule and DDIM sampler, checked against closed forms and an oracle denoiser."""

import pytest
import torch

from mdsearch.train.diffusion import NoiseSchedule, ddim_sample


def test_scaled_linear_schedule_matches_sd():
    s = NoiseSchedule()
    # SD-1.5's alphas_cumprod at t=0 and t=999 (scaled-linear betas 0.00085 -> 0.012)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=2e-4)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_targets_invert_to_x0_and_noise(prediction):
    s = NoiseSchedule(prediction=prediction)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, noise, t)
    x0_hat, eps_hat = s.to_x0_eps(xt, s.target(x0, noise, t), t)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, noise, atol=1e-3)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_with_an_oracle_denoiser_returns_the_data(guidance):
    """A denoiser that knows the data is the image `target` predicts the exact noise;
    DDIM must then land on `target` whatever the guidance."""
    s = NoiseSchedule()
    target = torch.linspace(-0.8, 0.8, 3 * 4 * 4).view(1, 3, 4, 4)

    def oracle(x, t, context):
        a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = ddim_sample(oracle, s, torch.zeros(2, 5, 7), torch.zeros(1, 5, 7), (2, 3, 4, 4),
                      steps=10, guidance=guidance, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand(2, -1, -1, -1), atol=1e-4)


def test_ddim_is_deterministic_by_generator():
    s = NoiseSchedule()
    model = lambda x, t, c: 0.1 * x  # noqa: E731
    run = lambda: ddim_sample(model, s, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), (1, 3, 4, 4),  # noqa: E731
                              steps=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(run(), run())


def test_linear_schedule_has_a_weaker_terminal_signal():
    linear, scaled = NoiseSchedule(kind="linear"), NoiseSchedule()
    assert linear.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # DDPM's
    assert linear.alphas_cumprod[-1] < scaled.alphas_cumprod[-1] / 100
    with pytest.raises(ValueError, match="noise schedule 'cosine'"):
        NoiseSchedule(kind="cosine")
