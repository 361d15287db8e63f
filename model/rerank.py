"""The served second stage: re-rank IIAE's top candidates with a second learned representation.

IIAE's shared code zs (64-d) finds the candidates: it is what the FAISS index holds. Its code keeps
what the two domains share and loses detail that tells near neighbours apart, so its first result is
wrong more often than a discriminative model's. The second stage takes IIAE's top `top` candidates and
orders them by the mean of two cosines:

    score = (1 - weight) * cos(zs_query, zs_photo) + weight * cos(v_query, v_photo)

where `v` is the InfoNCE peer's embedding (model/peer.py: two linear maps of the adapter's output,
trained on the same pairs) or the adapter's output itself, L2-normalised. Photos beyond the candidates
keep IIAE's order below them. The peer, `weight` 0.5 and `top` 200 were chosen on validation classes
only (docs/BENCHMARKS.md, "Served re-ranking"). A model row is the two parts side by side, `[zs | v]`,
each a unit vector; the index holds the first part. Pure numpy: the index builder, the service and the
evaluation share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

VECTORS = ("infonce", "adapter")


@dataclass(frozen=True)
class RerankConfig:
    vector: str = "infonce"  # the second representation: the InfoNCE peer's, or the adapter's output
    dim: int = 64  # its width
    top: int = 200  # IIAE candidates the second stage re-orders
    weight: float = 0.5  # the second cosine's share of the score

    def __post_init__(self):
        if self.vector not in VECTORS:
            raise ValueError(f"unknown re-ranking vector {self.vector!r} (known: {', '.join(VECTORS)})")
        if self.dim < 1 or self.top < 1 or not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"bad re-ranking settings: dim {self.dim}, top {self.top}, weight {self.weight}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> RerankConfig | None:
        return cls(**d) if d else None


def split_rows(rows: np.ndarray, search_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """`[zs | a]` rows -> (zs part, second part)."""
    return rows[:, :search_dim], rows[:, search_dim:]


def fuse(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """The second stage's score from the two cosines (arrays of one shape)."""
    return (1.0 - weight) * first + weight * second


def rerank(
    cand_ids: np.ndarray, first: np.ndarray, second: np.ndarray, weight: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Order each query's candidates by the fused score and keep `k`.

    cand_ids, first, second: (n, R) candidate ids (-1 = none), first-stage and second-stage cosines.
    Returns (scores, ids), each (n, min(k, R)), -1 / -inf where a query had fewer candidates.
    """
    fused = fuse(first, second, weight).astype(np.float32)
    fused = np.where(cand_ids >= 0, fused, -np.inf)
    order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(fused, order, 1), np.take_along_axis(cand_ids, order, 1)


def rerank_matrix(first: np.ndarray, second: np.ndarray, cfg: RerankConfig) -> np.ndarray:
    """Full (Q, G) scores whose descending order is the served ranking: the top `cfg.top` of each row
    of `first` by fused score, then the rest in `first`'s order (for evaluation over a whole gallery)."""
    top = min(cfg.top, first.shape[1])
    cand = np.argsort(-first, axis=1, kind="stable")[:, :top]
    fused = fuse(np.take_along_axis(first, cand, 1), np.take_along_axis(second, cand, 1), cfg.weight)
    # cosines and their mean lie in [-1, 1]: the candidates go above every other photo
    out = first.astype(np.float64) - 4.0
    np.put_along_axis(out, cand, fused, axis=1)
    return out
