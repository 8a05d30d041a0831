"""k-means on the fused quantizer, residual initialization, RQ-KMeans."""
import numpy as np
import pytest
import torch

from rqvae_fast import kmeans as km
from rqvae_fast.checkpoint import load_model, save_checkpoint
from rqvae_fast.functional import residual_quantize
from rqvae_fast.kmeans import (RQKMeans, fused_kmeans, kmeans, kmeans_plusplus, residual_kmeans,
                               sklearn_kmeans)
from rqvae_fast.model import RQVAE


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(k=6, per=50, d=5, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen) * 4
    labels = torch.arange(k).repeat_interleave(per)
    points = centres[labels] + spread * torch.randn(k * per, d, generator=gen)
    order = torch.randperm(k * per, generator=gen)
    return points[order], centres, labels[order]


def test_fused_kmeans_recovers_separated_blobs():
    points, centres, _ = _blobs()
    result = fused_kmeans(points, 6, iters=10, seed=0)
    assert result.centroids.shape == (6, 5) and result.centroids.dtype == torch.float32
    nearest = torch.cdist(centres, result.centroids).min(dim=1).values
    assert nearest.max() < 0.05  # every true centre has a centroid on it
    assert result.counts.sum() == 300 and sorted(result.counts.tolist()) == [50.0] * 6
    assert result.inertia < 0.05 and result.iterations == 10


def test_fused_kmeans_matches_sklearn_quality_on_unstructured_data():
    x = torch.randn(1500, 8, generator=torch.Generator().manual_seed(1))
    ours = fused_kmeans(x, 24, iters=30, seed=0)
    reference = sklearn_kmeans(x, 24, seed=0)
    assert ours.inertia < 1.05 * reference.inertia
    # the reported inertia is the mean squared distance to the assigned centroid
    assign = residual_quantize(x, [ours.centroids], 0.0).quantized
    # (inertia was measured before the last centroid update, so it can only be >= the final one)
    assert float((x - assign).pow(2).sum(dim=1).mean()) <= ours.inertia + 1e-4


def test_one_iteration_is_a_lloyd_step():
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(2))
    start = x[:10].clone()
    result = fused_kmeans(x, 10, iters=1, init=start)
    labels = torch.cdist(x, start).argmin(dim=1)
    expected = torch.stack([x[labels == j].mean(dim=0) for j in range(10)])
    torch.testing.assert_close(result.centroids, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.counts, torch.bincount(labels, minlength=10).float())


def test_empty_clusters_split_a_populated_one():
    points, _, _ = _blobs(k=4, per=40)
    init = points[:4].clone()
    init[3] = 1e4  # a centroid nothing will choose
    result = fused_kmeans(points, 4, iters=1, init=init)
    assert result.counts[3] == 0  # empty at the assignment ...
    # ... so it became a slightly perturbed copy of a populated centroid (FAISS's split rule)
    donors = [j for j in range(3) if torch.allclose(result.centroids[3], result.centroids[j],
                                                    rtol=3e-3, atol=1e-6)]
    assert len(donors) == 1 and not torch.equal(result.centroids[3], result.centroids[donors[0]])
    assert (fused_kmeans(points, 4, iters=5, init=init).counts > 0).all()


def test_fewer_rows_than_codes_draws_rows():
    x = torch.randn(5, 3)
    for result in (fused_kmeans(x, 8, seed=0), sklearn_kmeans(x, 8, seed=0)):
        assert result.centroids.shape == (8, 3)
        assert all(any(torch.equal(c, row) for row in x) for c in result.centroids)


def test_seeded_and_input_untouched():
    x = torch.randn(800, 6)
    copy = x.clone()
    a = fused_kmeans(x, 16, seed=5)
    b = fused_kmeans(x, 16, seed=5)
    torch.testing.assert_close(a.centroids, b.centroids)
    torch.testing.assert_close(x, copy)
    assert not torch.equal(a.centroids, fused_kmeans(x, 16, seed=6).centroids)


def test_kmeans_plusplus_spreads_seeds():
    points, centres, _ = _blobs(k=5, per=30, spread=0.01)
    seeds = kmeans_plusplus(points, 5, torch.Generator().manual_seed(0))
    # greedy k-means++ puts one seed in each well-separated blob
    assert torch.cdist(centres, seeds).min(dim=1).values.max() < 0.1


def test_auto_method_is_the_progressive_kmeans(monkeypatch):
    # issue 13: scikit-learn's k-means++ (the old "auto" below 10,000 CPU rows) collapses deep
    # residual layers; "auto" is the progressive-dimension k-means for every size now
    calls = []
    monkeypatch.setattr(km, "sklearn_kmeans", lambda *a, **k: calls.append("sk") or
                        km.KMeansResult(torch.zeros(2, 3), torch.ones(2), 0.0, 0))
    monkeypatch.setattr(km, "progressive_kmeans", lambda *a, **k: calls.append("pk") or
                        km.KMeansResult(torch.zeros(2, 3), torch.ones(2), 0.0, 0))
    kmeans(torch.randn(50, 3), 2)
    kmeans(torch.randn(50, 3), 2, method="sklearn")
    assert calls == ["pk", "sk"]
    with pytest.raises(ValueError, match="method"):
        kmeans(torch.randn(50, 3), 2, method="faiss")


def test_bad_kmeans_input():
    with pytest.raises(ValueError, match="NaN"):
        fused_kmeans(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="2-D"):
        fused_kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match="no rows"):
        fused_kmeans(torch.randn(0, 3), 2)


def test_residual_kmeans_reduces_error_layer_by_layer():
    x = torch.randn(2000, 6, generator=torch.Generator().manual_seed(3))
    results = residual_kmeans(x, [16, 16, 8], method="fused", seed=0)
    assert [r.centroids.shape[0] for r in results] == [16, 16, 8]
    inertias = [r.inertia for r in results]
    assert inertias[0] > inertias[1] > inertias[2]
    quantized = residual_quantize(x, [r.centroids for r in results], 0.0).quantized
    # layer l's inertia is the error left after layer l: the last one is the final error
    final_error = float((x - quantized).pow(2).sum(dim=1).mean())
    assert final_error <= inertias[2] + 1e-4
    assert final_error < 0.5 * float(x.pow(2).sum(dim=1).mean())


def test_rqkmeans_ids_follow_the_hierarchy():
    points, _, labels = _blobs(k=6, per=60, d=8, spread=0.3)
    model = RQKMeans(8, 2, [6, 16]).fit(points, seed=0)
    ids = model.get_semantic_ids(points)
    assert ids.shape == (360, 2) and ids.dtype == torch.int64
    # first code = blob: a one-to-one map between codes and labels
    pairs = set(zip(ids[:, 0].tolist(), labels.tolist()))
    assert len(pairs) == 6
    quantized, forward_ids = model(points)
    torch.testing.assert_close(forward_ids, ids)


def test_rqkmeans_checkpoint_round_trip(tmp_path):
    points, _, _ = _blobs(d=8)
    model = RQKMeans(8, 2, 8).fit(points, seed=0, max_samples=200)
    save_checkpoint(tmp_path / "c.pt", model)
    loaded = load_model(tmp_path / "c.pt")
    assert isinstance(loaded, RQKMeans) and loaded.config == model.config
    torch.testing.assert_close(loaded.get_semantic_ids(points), model.get_semantic_ids(points))


def test_rqvae_ema_layers_get_kmeans_statistics():
    torch.manual_seed(0)
    model = RQVAE(5, [8], 4, 2, 6, ema=True)
    model.initialize_codebooks(_blobs()[0], seed=0, batch_size=100)
    layer = model.vq.vq_layers[0]
    assert float(layer.ema_cluster_size.sum()) == pytest.approx(300)
    torch.testing.assert_close(layer.ema_dw / layer.ema_cluster_size[:, None].clamp_min(1),
                               layer.embeddings.detach() * (layer.ema_cluster_size[:, None] > 0))


def test_kmeans_result_is_numpy_free_on_device():
    result = fused_kmeans(torch.randn(300, 4), 8, seed=0)
    assert isinstance(result.inertia, float) and np.isfinite(result.inertia)
    assert result.counts.device == result.centroids.device


def test_sklearn_path_with_fewer_distinct_rows_than_codes_is_quiet():
    """scikit-learn's raw ConvergenceWarning ("distinct clusters smaller than n_clusters") must
    not reach the user: every distinct row becomes a centroid, without calling scikit-learn."""
    import warnings

    distinct = torch.randn(10, 4)
    x = distinct.repeat(30, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = sklearn_kmeans(x, 16, seed=0)
    assert result.centroids.shape == (16, 4)
    for row in distinct:  # each distinct row is a centroid holding its 30 copies
        hits = [k for k, c in enumerate(result.centroids) if torch.equal(c, row)]
        assert hits and result.counts[hits].sum() == 30
    assert result.counts.sum() == 300


def _plain_lloyd(points, centroids, iters):
    """Lloyd without any early stop (the reference the stopping rules must reproduce)."""
    from rqvae_fast.assign import assign_and_sum

    for _ in range(iters):
        _, _, counts, sums = assign_and_sum(points, centroids)
        assert bool((counts > 0).all())
        centroids = sums / counts[:, None]
    return centroids


def test_lloyd_stops_at_a_fixed_point_with_the_full_result():
    """Separated blobs converge in a few iterations: _lloyd stops there, and its centroids are
    bit-identical to those of all the iterations asked for."""
    from rqvae_fast.kmeans import _lloyd

    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 5, generator=gen) * 20
    points = (centres.repeat_interleave(50, dim=0) + torch.randn(300, 5, generator=gen))
    start = points[::50].clone() + 0.5
    result, counts, inertia, ran = _lloyd(points, start, 30, gen, 0.0, "auto", None)
    assert ran < 30
    assert torch.equal(result, _plain_lloyd(points, start, 30))
    assert torch.equal(counts, torch.full((6,), 50.0))
    assert inertia == pytest.approx(((points - result.repeat_interleave(50, dim=0)) ** 2)
                                    .sum(dim=1).mean().item(), rel=1e-5)


def test_lloyd_tolerance_stops_once_gains_are_small():
    """On unstructured data Lloyd keeps improving by small steps: with a tolerance it stops at
    the first iteration gaining less than that fraction, without one it runs every iteration."""
    from rqvae_fast.assign import assign_and_sum
    from rqvae_fast.kmeans import _lloyd

    gen = torch.Generator().manual_seed(4)
    points = torch.randn(3000, 8, generator=gen)
    start = points[:64].clone()
    full = _lloyd(points, start, 40, gen, 0.0, "auto", None)
    assert full[3] == 40
    stopped = _lloyd(points, start, 40, gen, 0.0, "auto", None, tol=1e-3)
    assert 2 <= stopped[3] < 40
    # the stopping iteration gained less than the tolerance, the one before did not
    inertias = []
    centroids = start
    for _ in range(stopped[3]):
        _, dist, counts, sums = assign_and_sum(points, centroids)
        inertias.append(float(dist.mean()))
        centroids = sums / counts.clamp_min(1)[:, None]
    assert inertias[-2] - inertias[-1] <= 1e-3 * inertias[-2]
    assert inertias[-3] - inertias[-2] > 1e-3 * inertias[-3]
    assert torch.equal(stopped[0], centroids)


def test_residual_kmeans_stops_converged_prefix_layers(monkeypatch):
    """The prefix layers' full-width iterations stop at the first that gains less than
    PREFIX_STOP_TOL of the inertia: on unstructured data a coarse tolerance cuts them short,
    at no more than that fraction of inertia per iteration skipped."""
    from rqvae_fast import kmeans as km

    gen = torch.Generator().manual_seed(5)
    points = torch.randn(4000, 12, generator=gen)
    monkeypatch.setattr(km, "PREFIX_STOP_TOL", 0.0)
    slow = km.residual_kmeans(points, [32, 32], seed=0)
    monkeypatch.setattr(km, "PREFIX_STOP_TOL", 5e-3)
    fast = km.residual_kmeans(points, [32, 32], seed=0)
    assert fast[0].iterations < slow[0].iterations
    skipped = slow[0].iterations - fast[0].iterations
    assert slow[0].inertia <= fast[0].inertia <= slow[0].inertia * (1 + 5e-3) ** skipped


def test_all_finite_sees_nan_inf_and_survives_an_overflowing_sum():
    from rqvae_fast._validation import all_finite

    x = torch.ones(1000, 7)
    assert all_finite(x) and all_finite(torch.empty(0, 7))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[917, 3] = bad
        assert not all_finite(y)
    huge = torch.full((1000, 7), 3e38)  # finite values whose sum overflows to inf
    assert all_finite(huge)
    huge[5, 5] = float("nan")
    assert not all_finite(huge)
