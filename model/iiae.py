"""The Interaction Information Auto-Encoder (Hwang et al., NeurIPS 2020) on feature vectors.

x is the sketch domain, y the photo domain. zx, zy are domain-specific latents and zs the shared
one. Retrieval uses the variational encoders rx(zs|x) and ry(zs|y): `encode_sketches` and
`encode_photos` return their L2-normalised means. Architecture, objective and clamps follow the
official release (see docs/MODEL.md); sketch and photo modules share no weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGVAR_CLAMP = 9.21  # log(1e4), as in the release


@dataclass
class IIAEConfig:
    input_dim: int = 512
    latent_dim: int = 64
    hidden1: int = 512
    hidden2: int = 256
    decoder_hidden: int = 128
    # Objective: "release" is the official code's (beta, lambda) form; "paper" is eq. 12 (beta = 1,
    # no annealing of the prior KLs).
    objective: str = "release"
    lam: float = 1.0
    beta: float = 0.5
    rec_weight: float = 10.0
    anneal_steps: float = 2000.0  # c_t = 1 - exp(-step / anneal_steps); 0 disables annealing
    bn_momentum: float = 0.1  # PyTorch convention; TF's 0.9

    def __post_init__(self) -> None:
        assert self.objective in ("release", "paper"), f"unknown objective {self.objective!r}"
        if self.objective == "paper":
            self.beta = 1.0
            self.anneal_steps = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def kl_diag_gaussians(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL[N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)] per row, summed over dimensions (closed form)."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0
    ).sum(dim=-1)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL[N(mu, e^logvar) || N(0, I)] per row."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(dim=-1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * (0.5 * logvar).exp()


class GaussianEncoder(nn.Module):
    """FC -> BN + LeakyReLU -> FC -> BN + LeakyReLU -> FC to (mu, logvar); exposes the first hidden."""

    def __init__(self, in_dim: int, cfg: IIAEConfig):
        super().__init__()
        self.first = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden1),
            nn.BatchNorm1d(cfg.hidden1, momentum=cfg.bn_momentum),
            nn.LeakyReLU(0.2),
        )
        self.rest = nn.Sequential(
            nn.Linear(cfg.hidden1, cfg.hidden2),
            nn.BatchNorm1d(cfg.hidden2, momentum=cfg.bn_momentum),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden2, 2 * cfg.latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.first(x)
        mu, logvar = self.rest(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP), h


class JointEncoder(nn.Module):
    """q(zs|x,y) from the concatenated first hiddens of rx and ry."""

    def __init__(self, cfg: IIAEConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * cfg.hidden1, cfg.hidden1),
            nn.BatchNorm1d(cfg.hidden1, momentum=cfg.bn_momentum),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden1, 2 * cfg.latent_dim),
        )

    def forward(self, hx: torch.Tensor, hy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(torch.cat([hx, hy], dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)


class Decoder(nn.Module):
    """p(x|zx,zs): [z_private, zs] -> FC -> BN -> ReLU -> FC (linear output)."""

    def __init__(self, out_dim: int, cfg: IIAEConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * cfg.latent_dim, cfg.decoder_hidden),
            nn.BatchNorm1d(cfg.decoder_hidden, momentum=cfg.bn_momentum),
            nn.ReLU(),
            nn.Linear(cfg.decoder_hidden, out_dim),
        )

    def forward(self, z_private: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z_private, zs], dim=-1))


class IIAE(nn.Module):
    def __init__(self, cfg: IIAEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.input_dim
        self.q_zx = GaussianEncoder(d, cfg)  # q(zx|x)
        self.q_zy = GaussianEncoder(d, cfg)  # q(zy|y)
        self.r_x = GaussianEncoder(d, cfg)  # rx(zs|x)
        self.r_y = GaussianEncoder(d, cfg)  # ry(zs|y)
        self.q_zs = JointEncoder(cfg)  # q(zs|x,y)
        self.p_x = Decoder(d, cfg)
        self.p_y = Decoder(d, cfg)

    def prior_weight(self, step: int) -> float:
        """c_t: annealing of the prior KLs (not of the interaction KLs)."""
        if self.cfg.anneal_steps <= 0:
            return 1.0
        return 1.0 - math.exp(-step / self.cfg.anneal_steps)

    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective to minimise on a batch of paired (same-class) sketch x and photo y features."""
        cfg = self.cfg
        mu_zx, lv_zx, _ = self.q_zx(x)
        mu_zy, lv_zy, _ = self.q_zy(y)
        mu_rx, lv_rx, hx = self.r_x(x)
        mu_ry, lv_ry, hy = self.r_y(y)
        mu_zs, lv_zs = self.q_zs(hx, hy)

        if self.training:
            zx, zy, zs = reparameterise(mu_zx, lv_zx), reparameterise(mu_zy, lv_zy), reparameterise(mu_zs, lv_zs)
        else:
            zx, zy, zs = mu_zx, mu_zy, mu_zs
        rec_x = cfg.rec_weight * F.mse_loss(self.p_x(zx, zs), x)
        rec_y = cfg.rec_weight * F.mse_loss(self.p_y(zy, zs), y)
        kl_zx = kl_standard_normal(mu_zx, lv_zx).mean()
        kl_zy = kl_standard_normal(mu_zy, lv_zy).mean()
        kl_zs = kl_standard_normal(mu_zs, lv_zs).mean()
        kl_rx = kl_diag_gaussians(mu_zs, lv_zs, mu_rx, lv_rx).mean()
        kl_ry = kl_diag_gaussians(mu_zs, lv_zs, mu_ry, lv_ry).mean()

        c_t = self.prior_weight(step)
        bl = cfg.beta + cfg.lam
        total = (
            bl * (rec_x + rec_y)
            + c_t * bl * (kl_zx + kl_zy)
            + c_t * cfg.beta * kl_zs
            + cfg.lam * (kl_rx + kl_ry)
        )
        terms = {
            "loss": total.item(),
            "rec_x": rec_x.item(),
            "rec_y": rec_y.item(),
            "kl_zx": kl_zx.item(),
            "kl_zy": kl_zy.item(),
            "kl_zs": kl_zs.item(),
            "kl_zs_rx": kl_rx.item(),
            "kl_zs_ry": kl_ry.item(),
            "c_t": c_t,
        }
        return total, terms

    @torch.no_grad()
    def encode_sketches(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised mean of rx(zs|x)."""
        return F.normalize(self.r_x(x)[0], dim=-1)

    @torch.no_grad()
    def encode_photos(self, y: torch.Tensor) -> torch.Tensor:
        """L2-normalised mean of ry(zs|y)."""
        return F.normalize(self.r_y(y)[0], dim=-1)
