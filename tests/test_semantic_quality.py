"""RQ-KMeans quality: the skewed/collapsed deep layers of issues 11 and 13, progressive-dimension
k-means, empty-cluster splitting, codebook refinement, balanced codes, the perplexity warning."""
import numpy as np
import pytest
import torch

from rqvae_fast.assign import code_sums, nearest, sq_distances
from rqvae_fast.balanced import balanced_encode, capacity_assign
from rqvae_fast.beam import greedy_encode
from rqvae_fast.kmeans import (RQKMeans, kmeans, progressive_dims, progressive_kmeans,
                               refine_codebooks, split_empty)
from rqvae_fast.metrics import (MIN_PERPLEXITY_SHARE, TrainingFacts, collision_stats, diagnose,
                                layer_stats, low_perplexity_warnings, perplexity)


def blobs(n, k, d, noise, seed=0):
    """``n`` rows around ``k`` Gaussian centres in ``d`` dims plus isotropic noise (issue 13)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    return torch.from_numpy((centres[labels] + noise * rng.normal(size=(n, d))).astype(np.float32))


def layer_perplexities(model, x):
    codes, _ = greedy_encode(x, [b.detach() for b in model.vq.codebooks])
    return [s.perplexity for s in layer_stats(codes, model.codebook_sizes)]


def test_issue13_collapse_on_noise_residuals_is_fixed():
    # Issue 13 at CI size: after layer 0 the residuals are near-isotropic noise. k-means++ (the
    # old default, scikit-learn below 10,000 rows) put almost every row on one code of the deep
    # layers (perplexity ~1). The progressive-dimension k-means keeps them near uniform.
    x = blobs(1500, 16, 256, 0.3)
    new = layer_perplexities(RQKMeans(256, 3, 64).fit(x, seed=0), x)
    assert min(new) > 0.75 * 64, new
    old = layer_perplexities(RQKMeans(256, 3, 64).fit(x, seed=0, method="sklearn", refine=0), x)
    assert min(old[1:]) < MIN_PERPLEXITY_SHARE * 64, old  # the bug this test pins
    assert low_perplexity_warnings(old, [64] * 3, 1500)
    assert not low_perplexity_warnings(new, [64] * 3, 1500)


def test_real_embeddings_deep_layers_are_not_skewed():
    # Issue 11: on WordLlama's real embeddings the deep layers had perplexity 77 and 47 of 256.
    import importlib.util

    if importlib.util.find_spec("wordllama") is None:
        pytest.skip("wordllama not installed (pip install 'rqvae-fast[test]')")
    from rqvae_fast.embedding_sets import wordllama_embeddings

    x = torch.from_numpy(wordllama_embeddings()[::8].copy())  # 4,000 rows
    ppl = layer_perplexities(RQKMeans(256, 3, 64).fit(x, seed=0), x)
    assert min(ppl) > 0.8 * 64, ppl


def test_progressive_dims():
    assert progressive_dims(256, 5) == [3, 9, 27, 84, 256]
    assert progressive_dims(256, 10) == [1, 3, 5, 9, 16, 27, 48, 84, 147, 256]  # FAISS's widths
    assert progressive_dims(7, 5) == [1, 2, 3, 4, 7]
    assert progressive_dims(3, 5) == [1, 2, 3]
    assert progressive_dims(1, 5) == [1]
    assert progressive_dims(100, 1) == [100]


def test_progressive_kmeans_recovers_separated_blobs_and_keeps_input():
    x = blobs(600, 4, 10, 0.01, seed=3)
    before = x.clone()
    result = progressive_kmeans(x, 9, seed=0)  # more codes than blobs: random seeds hit every blob
    assert torch.equal(x, before)
    assert result.centroids.shape == (9, 10)
    assert int((result.counts > 0).sum()) == 9  # no empty code (empty ones are split)
    codes, dist = nearest(x, result.centroids)
    assert float(dist.mean()) < 0.01 ** 2 * 10 * 2  # every blob found: what is left is noise
    assert result.counts.sum().item() == pytest.approx(600)


def test_progressive_kmeans_subsamples_like_faiss_and_scales_counts():
    x = blobs(3000, 4, 5, 0.1, seed=1)
    result = progressive_kmeans(x, 4, seed=0, max_points_per_centroid=100)
    assert result.counts.sum().item() == pytest.approx(3000)


def test_progressive_kmeans_is_deterministic_and_handles_few_rows():
    x = blobs(300, 5, 7, 0.2)
    a, b = progressive_kmeans(x, 8, seed=4), progressive_kmeans(x, 8, seed=4)
    assert torch.equal(a.centroids, b.centroids)
    few = progressive_kmeans(x[:3], 8, seed=0)  # fewer rows than codes: rows drawn again
    assert few.centroids.shape == (8, 7)
    one = progressive_kmeans(x[:1], 2, seed=0)
    assert torch.equal(one.centroids, x[:1].expand(2, 7))
    with pytest.raises(ValueError, match="no rows"):
        progressive_kmeans(x[:0], 2)
    with pytest.raises(ValueError, match="NaN"):
        progressive_kmeans(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 2)


def test_split_empty_halves_a_populated_cluster():
    centroids = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [9.0, 9.0, 9.0]])
    counts = torch.tensor([1.0, 10.0, 0.0])
    new, new_counts = split_empty(centroids, counts, torch.Generator().manual_seed(0))
    # the singleton (count 1) is never a donor: code 1 is split in two
    assert new_counts.tolist() == [1.0, 5.0, 5.0]
    assert torch.allclose(new[2], centroids[1], rtol=2e-3) and not torch.equal(new[2], new[1])
    assert torch.allclose((new[1] + new[2]) / 2, centroids[1])
    assert torch.equal(centroids[2], torch.tensor([9.0, 9.0, 9.0]))  # inputs untouched


def test_kmeans_methods_and_balanced_option():
    x = blobs(400, 3, 6, 1.0)
    for method in ("auto", "progressive", "fused", "sklearn"):
        assert kmeans(x, 4, method=method, seed=0).centroids.shape == (4, 6)
    with pytest.raises(ValueError, match="balanced"):
        kmeans(x, 4, method="sklearn", balanced=True)


def test_balanced_kmeans_evens_out_cluster_sizes():
    # one dense blob and a sparse one: plain k-means gives the dense blob most codes' rows
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.concatenate([rng.normal(0, 1, (900, 2)), rng.normal(8, 3, (100, 2))])
                         .astype(np.float32))
    sizes = []
    for balanced in (False, True):
        result = progressive_kmeans(x, 16, seed=0, balanced=balanced)
        codes, _ = nearest(x, result.centroids)
        sizes.append(np.bincount(codes.numpy(), minlength=16))
    assert perplexity(sizes[1]) > perplexity(sizes[0])


def test_refinement_lowers_the_error():
    x = blobs(800, 12, 16, 0.5, seed=2)
    model = RQKMeans(16, 3, [8, 5, 7]).fit(x, seed=0, refine=0)
    books = [b.detach() for b in model.vq.codebooks]
    before = float(greedy_encode(x, books)[1].sum())
    refined = refine_codebooks(x, books, rounds=2)
    assert [b.shape for b in refined] == [b.shape for b in books]
    assert float(greedy_encode(x, refined)[1].sum()) < before


def test_code_sums_matches_index_add():
    x = torch.randn(37, 5)
    codes = torch.randint(0, 7, (37,))
    codes[codes == 3] = 2  # an empty code
    counts, sums = code_sums(x, codes, 7)
    assert torch.equal(counts, torch.bincount(codes, minlength=7).float())
    assert torch.allclose(sums, torch.zeros(7, 5).index_add_(0, codes, x), atol=1e-5)
    assert torch.equal(sums[3], torch.zeros(5))
    counts, sums = code_sums(x[:0], codes[:0], 7)
    assert counts.sum() == 0 and sums.shape == (7, 5)


def test_nearest_and_distances_match_brute_force():
    x, c = torch.randn(53, 9), torch.randn(11, 9)
    brute = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    assert torch.allclose(sq_distances(x, c), brute, atol=1e-4)
    codes, dist = nearest(x, c)
    assert torch.equal(codes, brute.argmin(1))
    assert torch.allclose(dist, brute.min(1).values, atol=1e-4)
    bias = torch.zeros(11)
    bias[brute.argmin(1)[0]] = 1e6  # a huge penalty moves row 0 off its nearest code
    codes_b, dist_b = nearest(x, c, bias)
    assert codes_b[0] != codes[0]
    assert torch.allclose(dist_b[0], brute[0, codes_b[0]], atol=1e-4)


def test_capacity_assign_respects_capacity():
    groups = np.zeros(6, dtype=np.int64)
    cand = np.array([[0, 1, 2]] * 6)
    dist = np.array([[0.1 * i, 1.0, 2.0] for i in range(6)])
    chosen = capacity_assign(groups, cand, dist, num_codes=3, slack=1.0)  # capacity 2 per code
    assert np.bincount(chosen, minlength=3).tolist() == [2, 2, 2]
    assert chosen[:2].tolist() == [0, 0]  # the closest claimants win their nearest code
    # a row whose candidates are all full keeps its nearest code
    assert capacity_assign(groups, cand[:, :1], dist[:, :1], 3, 1.0).tolist() == [0] * 6


def test_balanced_encode_cuts_collisions():
    x = blobs(400, 8, 12, 0.3, seed=5)  # 400 items, 16 x 32 = 512 possible IDs
    model = RQKMeans(12, 2, [16, 32]).fit(x, seed=0)
    books = [b.detach() for b in model.vq.codebooks]
    greedy, greedy_err = greedy_encode(x, books)
    codes, err = balanced_encode(x, books)
    assert codes.shape == (400, 2) and codes.dtype == torch.int64
    ours, plain = collision_stats(codes), collision_stats(greedy)
    assert ours.colliding_share < plain.colliding_share
    assert ours.largest_group < plain.largest_group and ours.unique_ids > plain.unique_ids
    assert float(err.sum()) < 1.2 * float(greedy_err.sum())
    assert torch.equal(codes[:, 0], greedy[:, 0])  # only the last layer is constrained
    every, _ = balanced_encode(x, books, all_layers=True)
    assert collision_stats(every).colliding_share < plain.colliding_share
    # the reported error is the error of the returned codes
    recon = books[0][codes[:, 0]] + books[1][codes[:, 1]]
    assert torch.allclose(err, ((x - recon) ** 2).sum(1), rtol=1e-4, atol=1e-5)
    same, _ = balanced_encode(x, books, slack=float("inf"))
    assert torch.equal(same, greedy)
    assert balanced_encode(x[:0], books)[0].shape == (0, 2)
    with pytest.raises(ValueError, match="slack"):
        balanced_encode(x, books, slack=0.5)
    ids = model.get_semantic_ids(x, balanced=True)
    assert torch.equal(ids, codes)


def test_perplexity_warning_for_both_methods():
    assert low_perplexity_warnings([240.0, 47.0, 1.0], [256] * 3, 32_000)[0].startswith(
        "skewed layer 1")
    assert len(low_perplexity_warnings([240.0, 47.0, 1.0], [256] * 3, 32_000)) == 2
    assert low_perplexity_warnings([3.0], [256], 10) == []  # 10 items: floor 2.5
    facts = TrainingFacts([0.9, 0.05, 0.9], [256] * 3, 1e-3, "adamw", 0.25, 10_000, 0.1, 0.1,
                          layer_perplexity=[200.0, 2.0, 20.0])
    warnings = diagnose(facts)
    assert any(w.startswith("codebook collapse in layer 1") for w in warnings)
    assert any(w.startswith("skewed layer 2") for w in warnings)
    assert not any(w.startswith("skewed layer 1") for w in warnings)  # said once, as collapse
    mid_run = TrainingFacts([0.9, 0.5, 0.9], [256] * 3, 1e-3, "adamw", 0.25, 10_000, 0.1, 0.1,
                            layer_perplexity=[200.0, 2.0, 20.0], final=False)
    assert not any(w.startswith("skewed layer") for w in diagnose(mid_run))  # judged at the end


def test_read_safetensors(tmp_path):
    import json
    import struct

    from rqvae_fast.embedding_sets import read_safetensors

    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    b = np.arange(5, dtype=np.float32)
    header = {"a": {"dtype": "F16", "shape": [3, 4], "data_offsets": [0, a.nbytes]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [a.nbytes, a.nbytes + b.nbytes]},
              "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes())
    assert np.array_equal(read_safetensors(path, "a"), a)
    assert np.array_equal(read_safetensors(path, "b"), b)
    with pytest.raises(ValueError, match="name one"):
        read_safetensors(path)
    with pytest.raises(KeyError, match="no tensor"):
        read_safetensors(path, "c")


def test_last_layer_stops_where_lloyd_drifts_toward_uneven_codes():
    # Issue 11: on near-isotropic residuals more full-width Lloyd iterations let more items share
    # an ID. With ``stop_uneven`` the full-width step stops at the first iteration whose code
    # sizes are less even than the one before, and returns the centroids that made it (so the
    # greedy codes of the training rows are the counts it reports).
    x = torch.randn(3000, 32, generator=torch.Generator().manual_seed(0))
    full = progressive_kmeans(x, 64, seed=0, steps=3, iters=5, final_iters=20)
    stopped = progressive_kmeans(x, 64, seed=0, steps=3, iters=5, final_iters=20, stop_uneven=3)
    assert full.iterations == 2 * 5 + 20
    assert 2 * 5 + 3 < stopped.iterations < full.iterations
    codes, _ = nearest(x, stopped.centroids)
    assert np.bincount(codes.numpy(), minlength=64).tolist() == stopped.counts.long().tolist()
    never = progressive_kmeans(x, 64, seed=0, steps=3, iters=5, final_iters=20, stop_uneven=0)
    assert torch.equal(never.centroids, full.centroids)


def test_first_layer_coarse_balance_evens_out_first_codes(monkeypatch):
    # Issue 11: prefix coherence is a pair-weighted mean, so the biggest first-code groups set
    # it; the size penalty in the first layer's partial-width steps evens them out, and leaves
    # the deeper layers' k-means plain (a penalised deep layer emptied codes on the synthetic set).
    import rqvae_fast.kmeans as km

    rng = np.random.default_rng(1)  # near-isotropic rows, as WordLlama's
    x = torch.from_numpy((rng.normal(size=(4000, 16)) * np.linspace(2, 0.5, 16)).astype(np.float32))
    balances = []
    original = km.kmeans

    def spy(*args, **kwargs):
        balances.append(kwargs.get("coarse_balance"))
        return original(*args, **kwargs)

    monkeypatch.setattr(km, "kmeans", spy)
    ppl = []
    for strength in (0.0, km.FIRST_COARSE_BALANCE):
        monkeypatch.setattr(km, "FIRST_COARSE_BALANCE", strength)
        model = RQKMeans(16, 3, 64).fit(x, seed=0)
        codes, _ = greedy_encode(x, [b.detach() for b in model.vq.codebooks])
        ppl.append(perplexity(np.bincount(codes[:, 0].numpy(), minlength=64)))
    assert balances[3:] == [km.FIRST_COARSE_BALANCE, 0.0, 0.0]
    assert ppl[1] > ppl[0]


def test_coarse_balance_cap_leaves_real_clusters_alone():
    # Issue 11: the coarse size penalty evens out codes that Lloyd's drift made uneven, but on the
    # synthetic catalogue it also cut real clusters of unequal size (coherence below FAISS's).
    # Capped at COARSE_BIAS_CAP mean distances it cannot move a boundary between real clusters:
    # three 1-D clusters of 800 / 150 / 50 rows keep their own sizes under a strong penalty,
    # which without the cap pulls them toward 333 each.
    from rqvae_fast.kmeans import _lloyd

    gen = torch.Generator().manual_seed(2)
    sizes = (800, 150, 50)
    x = torch.cat([torch.randn(n, 1, generator=gen) + 4.0 * i for i, n in enumerate(sizes)])
    start = torch.tensor([[0.0], [4.0], [8.0]])
    natural = _lloyd(x, start, 30, gen, 0.0, "auto", None)[1]
    uncapped = _lloyd(x, start, 30, gen, 0.5, "auto", None)[1]
    capped = _lloyd(x, start, 30, gen, 0.5, "auto", None, bias_cap=0.1)[1]
    assert uncapped.max() < natural.max() - 100  # the penalty alone pulls rows off the big one
    assert (capped - natural).abs().max() <= 15  # capped, the clusters keep their sizes
    assert natural.max() > 750
