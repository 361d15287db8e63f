"""IIAE: closed-form KLs, the objective against a hand computation, the release/paper forms."""

import math

import numpy as np
import pytest
import torch

from model.iiae import IIAE, LOGVAR_CLAMP, IIAEConfig, kl_diag_gaussians, kl_standard_normal


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g) * 0.5
    mu_p, lv_p = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g) * 0.5
    closed = kl_diag_gaussians(mu_q, lv_q, mu_p, lv_p)
    n = 400_000
    z = mu_q + torch.randn(n, 3, 4, generator=g) * (0.5 * lv_q).exp()

    def log_normal(z, mu, lv):
        return (-0.5 * (math.log(2 * math.pi) + lv + (z - mu) ** 2 / lv.exp())).sum(-1)

    mc = (log_normal(z, mu_q, lv_q) - log_normal(z, mu_p, lv_p)).mean(0)
    assert torch.allclose(closed, mc, rtol=0.02, atol=0.02), (closed, mc)
    assert torch.allclose(kl_standard_normal(mu_q, lv_q),
                          kl_diag_gaussians(mu_q, lv_q, torch.zeros_like(mu_q), torch.zeros_like(lv_q)))
    assert (closed > 0).all()
    assert kl_diag_gaussians(mu_q, lv_q, mu_q, lv_q).abs().max() < 1e-6


def _np_kl(mq, lq, mp, lp):
    return 0.5 * np.sum(lp - lq + (np.exp(lq) + (mq - mp) ** 2) / np.exp(lp) - 1.0, axis=1)


@pytest.mark.parametrize("objective", ["release", "paper"])
def test_loss_matches_hand_computation(objective):
    torch.manual_seed(0)
    cfg = IIAEConfig(input_dim=6, latent_dim=3, hidden1=8, hidden2=5, decoder_hidden=4, objective=objective,
                     lam=0.7, beta=0.3)
    model = IIAE(cfg).eval()  # eval: latents are the means, so the value is deterministic
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    step = 1500
    loss, terms = model.loss(x, y, step)

    with torch.no_grad():
        mzx, lzx, _ = model.q_zx(x)
        mzy, lzy, _ = model.q_zy(y)
        mrx, lrx, hx = model.r_x(x)
        mry, lry, hy = model.r_y(y)
        mzs, lzs = model.q_zs(hx, hy)
        xr, yr = model.p_x(mzx, mzs), model.p_y(mzy, mzs)
    n = lambda t: t.numpy().astype(np.float64)  # noqa: E731
    rec = 10 * np.mean((n(xr) - n(x)) ** 2) + 10 * np.mean((n(yr) - n(y)) ** 2)
    zero = np.zeros((5, 3))
    kl_zx, kl_zy = _np_kl(n(mzx), n(lzx), zero, zero).mean(), _np_kl(n(mzy), n(lzy), zero, zero).mean()
    kl_zs = _np_kl(n(mzs), n(lzs), zero, zero).mean()
    kl_rx = _np_kl(n(mzs), n(lzs), n(mrx), n(lrx)).mean()
    kl_ry = _np_kl(n(mzs), n(lzs), n(mry), n(lry)).mean()
    if objective == "release":
        beta, c_t = 0.3, 1 - math.exp(-step / 2000)
    else:  # paper eq. 12: beta = 1 and no annealing
        beta, c_t = 1.0, 1.0
    lam = 0.7
    expected = ((beta + lam) * rec + c_t * (beta + lam) * (kl_zx + kl_zy) + c_t * beta * kl_zs
                + lam * (kl_rx + kl_ry))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms["c_t"] == pytest.approx(c_t)


def test_logvar_is_clamped_and_embeddings_are_unit_norm():
    cfg = IIAEConfig(input_dim=4, latent_dim=2, hidden1=8, hidden2=4, decoder_hidden=4)
    model = IIAE(cfg).eval()
    with torch.no_grad():
        model.r_x.rest[-1].bias.fill_(1e3)
    _, lv, _ = model.r_x(torch.randn(3, 4))
    assert lv.max().item() == pytest.approx(LOGVAR_CLAMP)
    z = model.encode_photos(torch.randn(7, 4))
    assert torch.allclose(z.norm(dim=1), torch.ones(7), atol=1e-5)


def test_training_reduces_loss():
    torch.manual_seed(0)
    cfg = IIAEConfig(input_dim=8, latent_dim=4, hidden1=32, hidden2=16, decoder_hidden=16)
    model = IIAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999))
    shared = torch.randn(64, 4)
    x = torch.cat([shared, torch.randn(64, 4)], 1)
    y = torch.cat([shared @ torch.randn(4, 4), torch.randn(64, 4)], 1)
    first = None
    for step in range(1, 301):
        loss, _ = model.loss(x, y, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    model.eval()
    assert model.loss(x, y, 300)[0].item() < 0.6 * first
