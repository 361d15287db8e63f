"""The served second stage: re-rank IIAE's top candidates with other representations.

IIAE's shared code zs (64-d) finds the candidates: it is what the FAISS index holds. Its code keeps
what the two domains share and loses detail that tells near neighbours apart, so its first result is
wrong more often than a discriminative model's; and being trained on the training styles, it moves
less well to a style it never saw than the backbone's own features do. The second stage takes IIAE's
top `top` candidates and orders them by a weighted mean of up to three cosines:

    score = (1 - weight - raw_weight) * cos(zs) + weight * cos(v) + raw_weight * cos(r)

- `v` is the InfoNCE peer's embedding (model/peer.py: two linear maps of the adapter's output,
  trained on the same pairs) or the adapter's output itself, L2-normalised;
- `r` is the backbone's features standardised with the adapter's per-domain training statistics
  (no training of its own), L2-normalised; `raw_dim` 0 leaves it out (checkpoints made before it).

Photos beyond the candidates keep IIAE's order below them. The peer, `weight` 0.5, `raw_weight` 0.25
and `top` 400 were chosen on validation classes only (docs/BENCHMARKS.md, "Served re-ranking"). A model
row is the parts side by side, `[zs | v | r]`, each a unit vector; the index holds the first part.
The service computes the second stage's two cosines as one dot product: `second_query` scales the
query's parts by their shares. Pure numpy: the index builder, the service and the evaluation share it.
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
    weight: float = 0.5  # the second representation's share of the score
    # the standardised backbone features' share and width (0, 0: not part of the rows, as in
    # checkpoints made before they were)
    raw_weight: float = 0.0
    raw_dim: int = 0

    def __post_init__(self):
        if self.vector not in VECTORS:
            raise ValueError(f"unknown re-ranking vector {self.vector!r} (known: {', '.join(VECTORS)})")
        if (self.dim < 1 or self.top < 1 or self.raw_dim < 0 or not 0.0 <= self.weight <= 1.0
                or not 0.0 <= self.raw_weight <= 1.0 or self.weight + self.raw_weight > 1.0 + 1e-9
                or (self.raw_weight > 0) != (self.raw_dim > 0)):
            raise ValueError(f"bad re-ranking settings: dim {self.dim}, top {self.top}, weight {self.weight}, "
                             f"raw_weight {self.raw_weight}, raw_dim {self.raw_dim} (the weights lie in [0, 1] "
                             f"and add up to at most 1; raw features have a width exactly when they have a weight)")

    @property
    def width(self) -> int:
        """Columns of a row after the searched part: `[v | r]`."""
        return self.dim + self.raw_dim

    @property
    def share(self) -> float:
        """The second stage's share of the score (the rest is IIAE's zs cosine)."""
        return self.weight + self.raw_weight

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> RerankConfig | None:
        return cls(**d) if d else None


def split_rows(rows: np.ndarray, search_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """`[zs | v | r]` rows -> (zs part, the second stage's part `[v | r]`)."""
    return rows[:, :search_dim], rows[:, search_dim:]


def unit_parts(rows: np.ndarray, search_dim: int, cfg: RerankConfig | None) -> list[np.ndarray]:
    """The parts of rows that are each a unit vector: zs, then v and r where the model re-ranks."""
    if cfg is None:
        return [rows]
    cuts = [0, search_dim, search_dim + cfg.dim, search_dim + cfg.width]
    return [rows[:, a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def second_query(second: np.ndarray, cfg: RerankConfig) -> np.ndarray:
    """A query's `[v | r]` scaled so that its dot product with a photo's `[v | r]` is the second stage's
    cosine: `(weight * cos(v) + raw_weight * cos(r)) / share`."""
    if cfg.share <= 0:
        return np.zeros_like(second)
    scale = np.concatenate([np.full(cfg.dim, cfg.weight / cfg.share), np.full(cfg.raw_dim, cfg.raw_weight / cfg.share)])
    return (second * scale.astype(second.dtype)).astype(second.dtype, copy=False)


def second_scores(query_second: np.ndarray, photo_second: np.ndarray, cfg: RerankConfig) -> np.ndarray:
    """(Q, G) second-stage cosines of queries' and photos' `[v | r]` parts."""
    return second_query(query_second, cfg) @ photo_second.T


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
    of `first` (zs cosines) by fused score with `second` (from `second_scores`), then the rest in `first`'s order (for evaluation over a whole gallery)."""
    top = min(cfg.top, first.shape[1])
    cand = np.argsort(-first, axis=1, kind="stable")[:, :top]
    fused = fuse(np.take_along_axis(first, cand, 1), np.take_along_axis(second, cand, 1), cfg.share)
    # cosines and their mean lie in [-1, 1]: the candidates go above every other photo
    out = first.astype(np.float64) - 4.0
    np.put_along_axis(out, cand, fused, axis=1)
    return out
