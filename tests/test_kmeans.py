import pytest
import torch

from kvpass.errors import KVPassError
from kvpass.kmeans import assign, kmeans, kmeans_1d, kmeans_batched


def blobs(g=3, k=5, per=40, d=4, spread=0.05, seed=0):
    """G problems of k well-separated clusters: (points (G, k*per, d), true centers (G, k, d))."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(g, k, d, generator=gen) * 10
    pts = centers.repeat_interleave(per, dim=1) + spread * torch.randn(g, k * per, d, generator=gen)
    return pts, centers


def match(found, true):
    """Sort both center sets by their nearest true center; returns found reordered like true."""
    return found[assign(true, found)]


def test_recovers_separated_clusters_exactly():
    x, centers = blobs()
    c = kmeans_batched(x, 5)
    assert c.shape == (3, 5, 4) and c.dtype == torch.float32
    for g in range(3):
        codes = assign(x[g], c[g])
        # every cluster is one true blob, and the centroid is that blob's mean
        for j in range(5):
            members = x[g][codes == j]
            assert len(members) == 40
            torch.testing.assert_close(c[g, j], members.mean(0), rtol=0, atol=1e-5)
        assert (match(c[g], centers[g]) - centers[g]).abs().max() < 0.1


def test_weights_pull_centroid():
    # one cluster of 4 points on a line; a weight-10 point moves the mean to (sum w x) / (sum w)
    x = torch.tensor([[0.0, 0], [1, 0], [2, 0], [3, 0], [100, 100], [101, 100]])
    w = torch.tensor([1.0, 1, 1, 10, 1, 1])
    c = kmeans(x, 2, weights=w)
    c = c[c[:, 0].argsort()]
    torch.testing.assert_close(c[0], torch.tensor([(0 + 1 + 2 + 30) / 13, 0.0]))
    torch.testing.assert_close(c[1], torch.tensor([100.5, 100]))
    plain = kmeans(x, 2)
    assert plain[:, 0].min() == pytest.approx(1.5)


def test_zero_weight_points_do_not_move_centroids():
    x = torch.tensor([[0.0], [1.0], [50.0], [51.0], [1000.0]])
    w = torch.tensor([1.0, 1, 1, 1, 0])
    c = kmeans(x, 2, weights=w)
    assert sorted(c.squeeze(1).tolist()) == [0.5, 50.5]


def test_deterministic_for_a_seed():
    x = torch.randn(4, 300, 3, generator=torch.Generator().manual_seed(1))
    w = torch.rand(4, 300, generator=torch.Generator().manual_seed(2))
    a = kmeans_batched(x, 16, w, seed=7)
    b = kmeans_batched(x, 16, w, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans_batched(x, 16, w, seed=8))


def test_fewer_points_than_k():
    x = torch.tensor([[0.0, 0], [1, 1], [5, 5]])
    c = kmeans(x, 8)
    assert c.shape == (8, 2) and torch.isfinite(c).all()
    # every point is a centroid; the surplus ones duplicate points
    assert {tuple(r) for r in c.tolist()} == {(0.0, 0.0), (1.0, 1.0), (5.0, 5.0)}
    assert (x.unsqueeze(1) - c.unsqueeze(0)).abs().sum(-1).min(1).values.max() == 0


def test_duplicate_points_and_single_point():
    x = torch.zeros(10, 3)
    assert torch.equal(kmeans(x, 4), torch.zeros(4, 3))
    assert torch.equal(kmeans(torch.ones(1, 2), 3), torch.ones(3, 2))


def test_empty_cluster_is_reseeded_from_farthest_point():
    from kvpass.kmeans import _update
    x = torch.tensor([[[0.0], [0.1], [0.2], [10.0]]])
    w = torch.ones(1, 4)
    c = torch.tensor([[[0.1], [-50.0]]])        # the second centroid owns nothing
    codes = torch.zeros(1, 4, dtype=torch.long)
    dist = (x.squeeze(-1) - 0.1).square()
    new = _update(x, w, codes, dist, c)
    assert new[0, 1, 0] == 10.0                # re-seeded at the farthest point
    # and a full run ends with both clusters in use, whatever the start
    final = kmeans(x[0], 2)
    assert sorted(final.squeeze(1).tolist()) == pytest.approx([0.1, 10.0])


def test_kmeans_1d_sorted_and_weighted():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2, 500, generator=gen) * 0.01 + m for m in (-3.0, 0.0, 4.0)], dim=1)
    c = kmeans_1d(x, 3)
    assert c.shape == (2, 3)
    assert torch.equal(c, c.sort(-1).values)
    torch.testing.assert_close(c, torch.tensor([[-3.0, 0.0, 4.0]] * 2), atol=0.01, rtol=0)
    big = kmeans_1d(torch.randn(3, 2000, generator=gen), 16, torch.rand(3, 2000, generator=gen))
    assert (big.diff(dim=-1) >= 0).all()


def test_kmeans_1d_fast_path_equals_general_lloyd():
    # the scalar path (sorted points, prefix sums) against the general one on (x, 0) pairs
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3000, generator=gen) ** 3
    w = torch.rand(4, 3000, generator=gen)
    fast = kmeans_1d(x, 8, w, seed=1)
    general = kmeans_batched(torch.stack([x, torch.zeros_like(x)], -1), 8, w, seed=1)[..., 0]
    torch.testing.assert_close(fast, general.sort(-1).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_assign_matches_brute_force(d):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(7, 33, d, generator=gen)
    c = torch.randn(19, d, generator=gen)
    codes = assign(x, c)
    assert codes.shape == (7, 33) and codes.dtype == torch.int64
    dist = (x.unsqueeze(-2) - c).square().sum(-1)
    # same centroid as brute force, up to float ties: the chosen distance is the minimum
    torch.testing.assert_close(dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1), dist.min(-1).values)
    assert (codes == dist.argmin(-1)).float().mean() > 0.99
    # batched codebooks: problem g uses codebook g
    cb = torch.randn(7, 19, d, generator=gen)
    codes_b = assign(x, cb)
    for g in range(7):
        assert torch.equal(codes_b[g], assign(x[g], cb[g]))


def test_assign_chunks(monkeypatch):
    import kvpass.kmeans as km
    x, c = torch.randn(1000, 4), torch.randn(50, 4)
    whole = assign(x, c)
    monkeypatch.setattr(km, "CHUNK_ELEMENTS", 64)
    assert torch.equal(assign(x, c), whole)


def test_bad_inputs():
    with pytest.raises(KVPassError, match="k must be"):
        kmeans(torch.randn(5, 2), 0)
    with pytest.raises(KVPassError, match="weights"):
        kmeans(torch.randn(5, 2), 2, weights=-torch.ones(5))
    with pytest.raises(KVPassError, match="2-D"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(KVPassError, match="channels"):
        assign(torch.randn(5, 3), torch.randn(4, 2))
