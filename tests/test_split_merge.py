"""Split-merge moves: exact gain and cost terms, and escaping Lloyd's local minima."""
import pytest
import torch

from rqvae_fast.assign import assign_and_sum
from rqvae_fast.split_merge import merge_costs, split_merge, two_means

pytestmark = pytest.mark.usefixtures("one_thread")


def _sse(rows: torch.Tensor) -> float:
    """Squared error of ``rows`` about their mean, in float64."""
    rows = rows.double()
    return float((rows - rows.mean(dim=0)).pow(2).sum())


def _stuck_layout(seed: int = 0, per: int = 200, d: int = 7):
    """Four tight blobs and four centroids in a Lloyd fixed point that is not the optimum: one
    centroid holds the two far blobs A and B (far apart), two centroids share blob C, one holds D.
    Returns ``(points, start centroids, blob labels, blob centres)``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-3.0] + [0.0] * (d - 1), [3.0] + [0.0] * (d - 1),
                            [0.0, 40.0] + [0.0] * (d - 2), [0.0, -40.0] + [0.0] * (d - 2)])
    labels = torch.arange(4).repeat_interleave(per)
    points = centres[labels] + 0.3 * torch.randn(4 * per, d, generator=gen)
    offset = torch.zeros(d)
    offset[2] = 0.25
    start = torch.stack([(centres[0] + centres[1]) / 2,
                         centres[2] + offset, centres[2] - offset, centres[3]])
    return points, start, labels, centres


def test_merge_costs_are_the_inertia_a_merge_adds():
    gen = torch.Generator().manual_seed(1)
    groups = [torch.randn(n, 5, generator=gen) + 3 * torch.randn(5, generator=gen)
              for n in (17, 40, 3, 9)]
    means = torch.stack([g.mean(dim=0) for g in groups])
    counts = torch.tensor([float(g.shape[0]) for g in groups])
    costs = merge_costs(means, counts)
    assert torch.isinf(costs.diagonal()).all()
    for i in range(4):
        for j in range(4):
            if i != j:
                added = _sse(torch.cat([groups[i], groups[j]])) - _sse(groups[i]) - _sse(groups[j])
                assert float(costs[i, j]) == pytest.approx(added, rel=1e-4)
    # an empty code is never merged
    counts[2] = 0
    assert torch.isinf(merge_costs(means, counts)[2]).all()


@pytest.mark.parametrize("n_a,n_b,d", [(30, 70, 3), (5, 1, 9), (101, 64, 33)])
def test_two_means_gain_is_the_inertia_the_split_removes(n_a, n_b, d):
    gen = torch.Generator().manual_seed(n_a + d)
    direction = torch.randn(d, generator=gen)
    rows = torch.cat([torch.randn(n_a, d, generator=gen) + 6 * direction,
                      torch.randn(n_b, d, generator=gen) - 6 * direction])
    rows = rows[torch.randperm(rows.shape[0], generator=gen)]
    gain, means = two_means(rows, rows.pow(2).sum(dim=1))
    # the parts are the nearer-mean halves; their squared errors add up to the whole's minus gain
    side = (rows - means[1]).pow(2).sum(dim=1) < (rows - means[0]).pow(2).sum(dim=1)
    assert 0 < int(side.sum()) < rows.shape[0]
    assert sorted([int(side.sum()), int((~side).sum())]) == sorted([n_a, n_b])
    assert torch.allclose(means[1], rows[side].mean(dim=0), atol=1e-5)
    assert torch.allclose(means[0], rows[~side].mean(dim=0), atol=1e-5)
    left = _sse(rows) - _sse(rows[side]) - _sse(rows[~side])
    assert gain == pytest.approx(left, rel=1e-4)


def test_two_means_of_identical_or_single_rows_gains_nothing():
    same = torch.ones(6, 4)
    assert two_means(same, same.pow(2).sum(dim=1))[0] == 0.0
    one = torch.randn(1, 4)
    assert two_means(one, one.pow(2).sum(dim=1))[0] == 0.0


def test_split_merge_moves_a_centroid_from_a_shared_blob_to_an_overloaded_one():
    points, start, labels, centres = _stuck_layout()
    codes, dist, counts, sums = assign_and_sum(points, start)
    means = sums / counts[:, None]
    before = float(dist.sum())
    moved, moves = split_merge(points, codes, means, counts)
    assert moves == 1
    # every blob now has a centroid on it, and the inertia fell by more than half
    assert float(torch.cdist(centres, moved).min(dim=1).values.max()) < 0.2
    _, after_dist, _, _ = assign_and_sum(points, moved)
    assert float(after_dist.sum()) < 0.5 * before
    # inputs untouched
    assert torch.equal(means, sums / counts[:, None])


def test_split_merge_makes_no_move_at_the_optimum():
    points, _, _, centres = _stuck_layout()
    codes, _, counts, sums = assign_and_sum(points, centres)
    moved, moves = split_merge(points, codes, sums / counts[:, None], counts)
    assert moves == 0


def test_lloyd_with_split_merge_escapes_the_local_minimum_plain_lloyd_keeps():
    from rqvae_fast.kmeans import _lloyd

    points, start, _, centres = _stuck_layout(seed=2)
    gen = torch.Generator().manual_seed(0)
    plain = _lloyd(points, start, 30, gen, 0.0, "auto", None)
    escaped = _lloyd(points, start, 30, gen, 0.0, "auto", None, split_merge_rounds=2)
    assert plain[3] < 30  # plain Lloyd is at a fixed point ...
    assert float(torch.cdist(centres, plain[0]).min(dim=1).values.max()) > 2.0  # ... a bad one
    assert float(torch.cdist(centres, escaped[0]).min(dim=1).values.max()) < 0.2
    assert escaped[2] < 0.5 * plain[2]
    assert sorted(escaped[1].tolist()) == [200.0] * 4
    # no rounds: the same as plain Lloyd
    same = _lloyd(points, start, 30, gen, 0.0, "auto", None, split_merge_rounds=0)
    assert torch.equal(same[0], plain[0])


def test_split_merge_respects_the_minimum_gain():
    points, start, _, _ = _stuck_layout()
    codes, dist, counts, sums = assign_and_sum(points, start)
    _, moves = split_merge(points, codes, sums / counts[:, None], counts,
                           min_gain=float(dist.sum()) * 10)
    assert moves == 0


def _codes_mixing_clusters(codes, labels):
    return sum(len(torch.unique(labels[codes == c])) > 1 for c in torch.unique(codes))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_kmeans_first_layer_stops_mixing_real_clusters(monkeypatch, seed):
    """64 codes for 64 real clusters (level-1 nodes of a catalogue): Lloyd alone converges with
    codes holding two clusters while others share one; the moves undo most of them and lower
    the first layer's inertia (the failure behind the synthetic catalogue's coherence @2)."""
    from rqvae_fast import kmeans as km
    from rqvae_fast.assign import nearest
    from rqvae_fast.synthetic import make_catalogue

    catalogue = make_catalogue(5000, 64, branching=(16, 4, 2), seed=0)
    x = torch.nn.functional.normalize(catalogue.embeddings, dim=1)
    clusters = catalogue.labels[:, 1]
    found = {}
    for rounds in (0, km.SPLIT_MERGE_ROUNDS):
        monkeypatch.setattr(km, "SPLIT_MERGE_ROUNDS", rounds)
        first = km.residual_kmeans(x, [64, 64], seed=seed)[0]
        codes, dist = nearest(x, first.centroids)
        found[rounds] = (_codes_mixing_clusters(codes, clusters), float(dist.mean()))
    (mixed_before, inertia_before) = found[0]
    (mixed_after, inertia_after) = found[km.SPLIT_MERGE_ROUNDS]
    assert mixed_before >= 5
    assert mixed_after <= mixed_before // 2
    assert inertia_after < inertia_before
