"""Small, vectorized, deterministic k-means in pure PyTorch, for the calibrated schemes' codebooks.

:func:`kmeans_batched` is the core: G independent problems at once (one per channel group, PQ subspace or
layer), each with optional per-point weights (Fisher information: a centroid is the weighted mean of its
points; initialization is weighted k-means++). :func:`kmeans` (one problem) and :func:`kmeans_1d` (scalar
codebooks, sorted) are thin wrappers; :func:`assign` maps vectors to their nearest centroid.

Everything runs in float32 on the input's device; results depend only on the inputs and ``seed`` (on the
CPU; CUDA's index_add is not bit-deterministic). Scalar problems (d = 1) take a fast path: points sorted
once, each Lloyd step O(k log N) through prefix sums.
Distances are computed in chunks so memory stays bounded (about ``CHUNK_ELEMENTS`` floats at a time).
"""

from __future__ import annotations

import torch

from .errors import KVPassError

CHUNK_ELEMENTS = 1 << 20          # distance-matrix entries per chunk (4 MiB of float32: stays in cache)


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 25,
           seed: int = 0) -> torch.Tensor:
    """Weighted k-means of one point set.

    x: (N, d) float; k: number of centroids (>= 1); weights: (N,) >= 0 or None (all 1).
    returns: (k, d) float32 centroids. See :func:`kmeans_batched`.
    """
    _check(x, 2, "x (N, d)")
    w = None if weights is None else weights.unsqueeze(0)
    return kmeans_batched(x.unsqueeze(0), k, w, iters=iters, seed=seed)[0]


def kmeans_1d(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 25,
              seed: int = 0) -> torch.Tensor:
    """Weighted scalar k-means (non-uniform codebooks, e.g. KVQuant's nuq) for G problems.

    x: (G, N) float; weights: (G, N) >= 0 or None. returns: (G, k) float32, each row sorted ascending.
    """
    _check(x, 2, "x (G, N)")
    c = kmeans_batched(x.unsqueeze(-1), k, weights, iters=iters, seed=seed).squeeze(-1)
    return c.sort(dim=-1).values


def kmeans_batched(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 25,
                   seed: int = 0) -> torch.Tensor:
    """G independent weighted k-means problems at once (Lloyd's algorithm, weighted k-means++ init).

    x: (G, N, d) float points; k: centroids per problem (>= 1); weights: (G, N) non-negative sample
    weights or None (all 1); iters: at most this many Lloyd steps (stops early once no assignment
    changes); seed: seeds the k-means++ sampling (same inputs and seed -> same centroids).
    returns: (G, k, d) float32 centroids. A centroid is the weighted mean of its points. When a problem
    has fewer distinct positively-weighted points than k, the surplus centroids duplicate points; a
    cluster that loses all its (weighted) points is re-seeded at the point contributing most to the
    objective (weight x squared distance), as long as some point is not already on a centroid.
    """
    _check(x, 3, "x (G, N, d)")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise KVPassError(f"k must be a positive int, got {k!r}")
    g, n, d = x.shape
    if n == 0:
        raise KVPassError("k-means needs at least one point")
    x = x.float()
    w = torch.ones(g, n, device=x.device) if weights is None else weights.float()
    if tuple(w.shape) != (g, n):
        raise KVPassError(f"weights must be (G, N) = {(g, n)}, got {tuple(w.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(w).all()) or (w < 0).any():
        raise KVPassError("k-means points and weights must be finite, weights >= 0")
    # a problem whose weights are all zero is treated as unweighted
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    c = _init_pp(x, w, k, gen)
    if d == 1:
        return _lloyd_1d(x, w, c, iters)
    codes = None
    for _ in range(iters):
        new_codes, dist = _nearest(x, c)
        if codes is not None and torch.equal(new_codes, codes):
            break
        codes = new_codes
        c = _update(x, w, codes, dist, c)
    return c


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) of every vector.

    centroids (k, d): x (..., d) -> codes (...) int64.
    centroids (G, k, d): x (G, ..., d) -> codes (G, ...) int64 (problem g uses codebook g).
    Computed in chunks, so x may hold many vectors.
    """
    if centroids.dim() == 2:
        if x.shape[-1] != centroids.shape[-1]:
            raise KVPassError(f"x has {x.shape[-1]} channels but the centroids {centroids.shape[-1]}")
        flat = x.reshape(1, -1, x.shape[-1])
        return _nearest(flat, centroids.unsqueeze(0))[0].reshape(x.shape[:-1])
    if centroids.dim() == 3:
        if x.dim() < 2 or x.shape[0] != centroids.shape[0] or x.shape[-1] != centroids.shape[-1]:
            raise KVPassError(f"batched assign needs x (G, ..., d) for centroids (G, k, d) = "
                              f"{tuple(centroids.shape)}, got x {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return _nearest(flat, centroids)[0].reshape(x.shape[:-1])
    raise KVPassError(f"centroids must be (k, d) or (G, k, d), got {tuple(centroids.shape)}")


# -- internals --------------------------------------------------------------------------------------

def _check(x, dims: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != dims or not x.is_floating_point():
        raise KVPassError(f"{what} must be a {dims}-D float tensor, got "
                          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point: codes (G, N) int64 and squared distance (G, N) float32,
    for x (G, N, d) and c (G, k, d)."""
    x, c = x.float(), c.float()
    if x.shape[-1] == 1:
        return _nearest_1d(x.squeeze(-1), c.squeeze(-1))
    g, n, _ = x.shape
    k = c.shape[1]
    ct = c.transpose(1, 2).contiguous()                                  # (G, d, k)
    cc = c.square().sum(-1).unsqueeze(1)                                 # (G, 1, k)
    n_step = max(1, min(n, CHUNK_ELEMENTS // k))
    g_step = max(1, CHUNK_ELEMENTS // (n_step * k))
    codes = torch.empty(g, n, dtype=torch.int64, device=x.device)
    dist = torch.empty(g, n, device=x.device)
    for a in range(0, g, g_step):
        for s in range(0, n, n_step):
            xs = x[a:a + g_step, s:s + n_step]
            # |c|^2 - 2 x.c ranks the centroids like |x - c|^2
            dmin, idx = torch.baddbmm(cc[a:a + g_step], xs, ct[a:a + g_step], alpha=-2).min(-1)
            codes[a:a + g_step, s:s + n_step] = idx
            dist[a:a + g_step, s:s + n_step] = (dmin + xs.square().sum(-1)).clamp_min_(0)
    return codes, dist


def _nearest_1d(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar case in O(N log k): x (G, N), c (G, k); the bins lie between sorted centroids' midpoints."""
    sc, order = c.sort(-1)
    mids = (sc[:, 1:] + sc[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), x.contiguous())
    return order.gather(1, pos), (x - sc.gather(1, pos)).square()


def _lloyd_1d(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's steps for scalars, O(k log N) each: the points are sorted once, and each cluster (a run
    of sorted points between centroid midpoints) gets its mass and weighted sum from prefix sums.
    x (G, N, 1), w (G, N), c (G, k, 1) -> (G, k, 1), sorted."""
    g, n, _ = x.shape
    xs, order = x.squeeze(-1).sort(1)
    ws = w.gather(1, order)
    zero = torch.zeros(g, 1, dtype=torch.float64, device=x.device)
    cw = torch.cat([zero, ws.double().cumsum(1)], 1)                           # (G, N + 1)
    cx = torch.cat([zero, (ws.double() * xs.double()).cumsum(1)], 1)
    ends = (torch.zeros(g, 1, dtype=torch.int64, device=x.device), torch.full((g, 1), n, device=x.device))
    c = c.squeeze(-1).sort(1).values
    bounds = None
    for _ in range(iters):
        cut = torch.searchsorted(xs, ((c[:, 1:] + c[:, :-1]) / 2).contiguous(), right=True)
        new_bounds = torch.cat([ends[0], cut, ends[1]], 1)                     # cluster j: [b_j, b_j+1)
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        mass = cw.gather(1, hi) - cw.gather(1, lo)
        mean = ((cx.gather(1, hi) - cx.gather(1, lo)) / mass.clamp_min(1e-300)).float()
        if (mass <= 0).any():                   # rare: the general step re-seeds empty clusters
            codes, dist = _nearest_1d(xs, c)
            new = _update(xs.unsqueeze(-1), ws, codes, dist, c.unsqueeze(-1)).squeeze(-1)
        else:
            new = mean
        c = new.sort(1).values
    return c.unsqueeze(-1)


def _init_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++: the first centroid drawn by weight, each next one by weight x squared
    distance to the nearest centroid so far. Once every weighted point lies on a centroid, the rest
    copy the heaviest point (duplicates; nothing better exists)."""
    g, n, d = x.shape
    ar = torch.arange(g, device=x.device)
    xt = x.transpose(1, 2).contiguous()                                  # (G, d, N)
    xx = x.square().sum(-1).unsqueeze(1)                                 # (G, 1, N)

    def sqdist(cj):                                                      # cj (G, d) -> (G, N)
        return torch.baddbmm(xx, cj.unsqueeze(1), xt, alpha=-2).squeeze(1).add_(
            cj.square().sum(-1, keepdim=True)).clamp_min_(0)

    c = torch.empty(g, k, d, device=x.device)
    idx, _ = _sample(w, gen)
    c[:, 0] = x[ar, idx]
    best = sqdist(c[:, 0])
    heaviest = w.argmax(1)
    for j in range(1, k):
        idx, some = _sample(w * best, gen)
        c[:, j] = x[ar, torch.where(some, idx, heaviest)]
        torch.minimum(best, sqdist(c[:, j]), out=best)
    return c


def _sample(p: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One index per row of p (G, N), drawn with probability proportional to p, and whether the row
    had any mass (a row of zeros gives index 0)."""
    cdf = p.double().cumsum(1)
    total = cdf[:, -1:]
    u = torch.rand(p.shape[0], 1, generator=gen, device=p.device, dtype=torch.float64) * total
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(p.shape[1] - 1)
    return idx, total.squeeze(1) > 0


def _update(x, w, codes, dist, c):
    """Weighted means of the clusters; clusters with no weight are re-seeded at the points with the
    largest weighted squared distance (one distinct point per empty cluster), or kept if none is off
    a centroid."""
    g, n, d = x.shape
    k = c.shape[1]
    flat = codes + torch.arange(g, device=x.device).unsqueeze(1) * k       # (G, N) into G*k bins
    mass = torch.zeros(g * k, device=x.device).index_add_(0, flat.reshape(-1), w.reshape(-1))
    sums = torch.zeros(g * k, d, device=x.device).index_add_(0, flat.reshape(-1),
                                                           (x * w.unsqueeze(-1)).reshape(-1, d))
    mass, sums = mass.view(g, k), sums.view(g, k, d)
    empty = mass <= 0
    new = torch.where(empty.unsqueeze(-1), c, sums / mass.clamp_min(1e-30).unsqueeze(-1))
    if empty.any():
        m = min(int(empty.sum(1).max()), n)
        score, far = (w * dist).topk(m, dim=1)                               # (G, m)
        rank = empty.long().cumsum(1) - 1                                     # j-th empty cluster of g
        gi, ci = empty.nonzero(as_tuple=True)
        r = rank[gi, ci]
        ok = (r < m) & (score[gi, r.clamp_max(m - 1)] > 0)
        gi, ci, r = gi[ok], ci[ok], r[ok]
        new[gi, ci] = x[gi, far[gi, r]]
    return new


__all__ = ["assign", "kmeans", "kmeans_1d", "kmeans_batched"]
