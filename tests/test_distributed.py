"""Codebook syncing over torch.distributed: 2 CPU processes (gloo) against 1 process.

All 2-rank scenarios run in ONE spawn of two processes (a module fixture, to keep the file fast on
2 cores); each scenario saves its per-rank results, and the tests below compare them with a
single-process run on the concatenated batches. Collectives are counted by wrapping the
``torch.distributed`` functions inside the children.
"""
import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from rqvae_fast import ResidualVQ as DropInRVQ
from rqvae_fast import distributed
from rqvae_fast.compat import ResidualVQ as CompatRVQ

WORLD = 2
DIM = 8
ATOL = RTOL = 1e-5  # fp32: the all-reduced sums add the same rows in another order
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "gather", "scatter", "reduce_scatter", "all_to_all", "barrier")
JOIN_TIMEOUT_S = 240

# rows per rank at each step; the single-process run sees their concatenation
EQUAL = [(16, 16), (16, 16), (16, 16)]
UNEQUAL = [(6, 10), (0, 12), (9, 0), (5, 7)]


# ---------------------------------------------------------------------------------------------
# scenario bodies: run on every rank, or on one process with the whole batch (rank=None)


def batch(step, sizes, rank, seed=0, scale=1.0):
    """The ``step``'s global batch ``(sum(sizes), DIM)``, or rank ``rank``'s slice of it."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    full = torch.randn(sum(sizes), DIM, generator=gen) * scale
    if rank is None:
        return full
    start = sum(sizes[:rank])
    return full[start: start + sizes[rank]]


class Counter:
    """Counts calls of the ``torch.distributed`` collectives while installed."""

    def __init__(self):
        self.calls = {name: 0 for name in COLLECTIVES}
        self.originals = {}

    def install(self):
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self.originals[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def uninstall(self):
        for name, original in self.originals.items():
            setattr(dist, name, original)

    def take(self):
        calls = dict(self.calls)
        for name in self.calls:
            self.calls[name] = 0
        return calls


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_ema(rank, counter, kind, steps, sync=None, seed=0):
    """EMA codebooks (drop-in or compat), one training step per batch."""
    torch.manual_seed(0)
    if kind == "dropin":
        model = DropInRVQ(3, [16, 8, 8], DIM, 0.25, ema=True, decay=0.9, sync_codebook=sync)
    else:
        model = CompatRVQ(dim=DIM, codebook_size=(16, 8, 8), decay=0.9, commitment_weight=0.25,
                          sync_codebook=sync)
    out = {"losses": [], "indices": [], "calls": []}
    for step, sizes in enumerate(steps):
        x = batch(step, sizes, rank, seed).requires_grad_()
        counter and counter.take()
        quantized, indices, loss = model(x)
        out["calls"].append(counter.take() if counter else None)
        (quantized.sum() + loss.sum()).backward()
        out["losses"].append(loss.detach().clone())
        out["indices"].append(indices)
    out["state"] = state(model)
    return out


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.encoder = nn.Linear(DIM, DIM)
        if kind == "dropin":
            self.rvq = DropInRVQ(2, [16, 8], DIM, 0.25)
        else:
            self.rvq = CompatRVQ(dim=DIM, codebook_size=(16, 8), commitment_weight=0.25,
                                 learnable_codebook=True, ema_update=False)
        self.decoder = nn.Linear(DIM, DIM)

    def forward(self, x):
        quantized, indices, loss = self.rvq(self.encoder(x))
        return F.mse_loss(self.decoder(quantized), x) + loss.sum(), indices


def run_learned(rank, kind, steps):
    """Learned codebooks and an encoder/decoder trained by SGD (under DDP when ranked)."""
    torch.manual_seed(0)
    net = Net(kind)
    model = nn.parallel.DistributedDataParallel(net) if rank is not None else net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = {"losses": [], "indices": []}
    for step, sizes in enumerate(steps):
        loss, indices = model(batch(step, sizes, rank, seed=3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["losses"].append(loss.detach().clone())
        out["indices"].append(indices)
    out["state"] = state(net)
    return out


def run_kmeans(rank, counter, steps, threshold, sync=None):
    """compat.ResidualVQ with k-means init (rank 0's generator) and maybe dead-code re-seeding."""
    model = CompatRVQ(dim=DIM, codebook_size=(16, 8), decay=0.8, kmeans_init=True,
                      kmeans_iters=4, threshold_ema_dead_code=threshold, sync_codebook=sync)
    torch.manual_seed(123 + (rank or 0))  # rank 1's generator differs; rank 0 computes k-means
    out = {"states": [], "calls": []}
    for step, sizes in enumerate(steps):
        counter and counter.take()
        model(batch(step, sizes, rank, seed=5 + (rank if sync is False else 0)))
        out["calls"].append(counter.take() if counter else None)
        out["states"].append(state(model))
    return out


def run_dropin_init(rank, counter):
    """Drop-in ResidualVQ k-means init: each rank holds different rows; rank 0 fits all of them."""
    model = DropInRVQ(2, [8, 4], DIM, 0.25, ema=True)
    rows = batch(0, (40, 25), rank, seed=11)
    counter and counter.take()
    model.initialize_from_data(rows, seed=0)
    return {"state": state(model), "calls": counter.take() if counter else None,
            "rows": rows, "flags": [layer.initialized_with_data for layer in model.vq_layers]}


SCENARIOS = {
    "dropin_init": run_dropin_init,
    "ema_equal": lambda rank, c: run_ema(rank, c, "dropin", EQUAL),
    "ema_unequal_dropin": lambda rank, c: run_ema(rank, c, "dropin", UNEQUAL),
    "ema_unequal_compat": lambda rank, c: run_ema(rank, c, "compat", UNEQUAL),
    "nosync_dropin": lambda rank, c: run_ema(rank, c, "dropin", EQUAL, sync=False, seed=7 + rank),
    "nosync_compat": lambda rank, c: run_kmeans(rank, c, EQUAL, threshold=2.0, sync=False),
    "ddp_dropin": lambda rank, c: run_learned(rank, "dropin", EQUAL),
    "ddp_compat": lambda rank, c: run_learned(rank, "compat", EQUAL),
    "kmeans_sync": lambda rank, c: run_kmeans(rank, c, [(20, 44), (30, 34)], threshold=0.0),
    "kmeans_deadcode_sync": lambda rank, c: run_kmeans(rank, c, [(30, 0), (3, 40), (0, 25)] * 2,
                                                       threshold=3.0),
}


def _child(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    counter = Counter()
    counter.install()
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank, counter)
            except Exception:  # noqa: BLE001 - reported by the test of this scenario
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{name}.{rank}.pt"))
    finally:
        counter.uninstall()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Run every scenario on 2 gloo ranks; ``ranks(name) -> [rank 0 result, rank 1 result]``.

    A child that dies (e.g. gloo aborts on mismatched collectives) fails only the scenarios it
    had not finished."""
    crash = None
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        context = mp.start_processes(_child, args=(init_file, tmp), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    crash = f"still running after {JOIN_TIMEOUT_S}s (deadlock?)"
                    break
        except Exception as error:  # noqa: BLE001 - a child died; reported per scenario
            crash = f"{type(error).__name__}: {error}"
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = {}
        for name in SCENARIOS:
            for r in range(WORLD):
                path = os.path.join(tmp, f"{name}.{r}.pt")
                if os.path.exists(path):
                    results[name, r] = torch.load(path, weights_only=False)

    def get(name):
        pair = []
        for rank in range(WORLD):
            if (name, rank) not in results:
                pytest.fail(f"rank {rank} did not finish {name}: {crash}")
            result = results[name, rank]
            assert "error" not in result, f"rank {rank} failed in {name}:\n{result['error']}"
            pair.append(result)
        return pair

    return get


def assert_states(actual, expected, exact=False):
    assert actual.keys() == expected.keys()
    for key in expected:
        if exact:
            assert torch.equal(actual[key], expected[key]), f"{key} differs between ranks"
        else:
            torch.testing.assert_close(actual[key].float(), expected[key].float(), atol=ATOL,
                                       rtol=RTOL, msg=lambda m: f"{key}: {m}")


def weighted_loss(pair, step, sizes):
    """The global-batch mean loss from the ranks' local means."""
    return sum(p["losses"][step] * n for p, n in zip(pair, sizes)) / sum(sizes)


def assert_ranks_match_one_process(pair, single, steps):
    """Both ranks hold identical state, equal to one process on the concatenated batches, with the
    same global-batch losses and indices at every step."""
    assert_states(pair[1]["state"], pair[0]["state"], exact=True)
    assert_states(pair[0]["state"], single["state"])
    for step, sizes in enumerate(steps):
        torch.testing.assert_close(weighted_loss(pair, step, sizes), single["losses"][step],
                                   atol=ATOL, rtol=RTOL)
        assert torch.equal(torch.cat([p["indices"][step] for p in pair]), single["indices"][step])


# ---------------------------------------------------------------------------------------------
# (a) EMA, equal halves: same as one process; ONE all-reduce per step


def test_ema_two_ranks_equal_one_process_with_one_all_reduce_per_step(ranks):
    pair = ranks("ema_equal")
    assert_ranks_match_one_process(pair, run_ema(None, None, "dropin", EQUAL), EQUAL)
    for step in range(len(EQUAL)):
        for p in pair:
            calls = p["calls"][step]
            assert calls["all_reduce"] == 1, calls
            assert sum(calls.values()) == 1, calls


# (b) unequal batch sizes, an empty batch on one rank: no deadlock, same as one process


@pytest.mark.parametrize("kind", ["dropin", "compat"])
def test_unequal_and_empty_batches(ranks, kind):
    pair = ranks(f"ema_unequal_{kind}")
    assert_ranks_match_one_process(pair, run_ema(None, None, kind, UNEQUAL), UNEQUAL)
    for step in range(len(UNEQUAL)):
        assert [p["calls"][step]["all_reduce"] for p in pair] == [1, 1]


# (c) sync_codebook=False: no collective, the ranks drift apart


def test_sync_off_runs_no_collective_and_ranks_drift(ranks):
    for name in ("nosync_dropin", "nosync_compat"):
        pair = ranks(name)
        for p in pair:
            for calls in p["calls"]:
                assert sum(calls.values()) == 0, (name, calls)
        last = [p["state"] if "state" in p else p["states"][-1] for p in pair]
        books = [k for k in last[0] if k.endswith("embeddings") or k.endswith("_codebook.embed")]
        assert books and any(not torch.equal(last[0][k], last[1][k]) for k in books), name
    # each rank is the single-process run on its own data
    single = run_ema(1, None, "dropin", EQUAL, sync=False, seed=8)
    assert_states(ranks("nosync_dropin")[1]["state"], single["state"])


# (d) learned codebooks under DistributedDataParallel: same as one process


@pytest.mark.parametrize("kind", ["dropin", "compat"])
def test_learned_codebooks_under_ddp(ranks, kind):
    pair = ranks(f"ddp_{kind}")
    single = run_learned(None, kind, EQUAL)
    assert_ranks_match_one_process(pair, single, EQUAL)
    first = run_learned(None, kind, EQUAL[:0])["state"]  # the starting point: training moved it
    assert any(not torch.equal(first[k], single["state"][k]) for k in first if "rvq" in k)


# (e) compat.ResidualVQ with k-means init and dead-code re-seeding: identical ranks


def test_kmeans_init_uses_all_ranks_data(ranks):
    steps = [(20, 44), (30, 34)]
    pair = ranks("kmeans_sync")
    single = run_kmeans(None, None, steps, threshold=0.0)
    for step in range(len(steps)):
        assert_states(pair[1]["states"][step], pair[0]["states"][step], exact=True)
        # rank 0 ran k-means on the concatenated rows with the generator the single run uses
        assert_states(pair[0]["states"][step], single["states"][step])
    assert pair[0]["calls"][0]["broadcast"] == 1  # the k-means result, in one collective
    assert [p["calls"][1] for p in pair] == [{**dict.fromkeys(COLLECTIVES, 0), "all_reduce": 1}] * 2


def test_dead_codes_reseeded_identically_on_all_ranks(ranks):
    pair = ranks("kmeans_deadcode_sync")
    reseeded = 0
    for step, (s0, s1) in enumerate(zip(pair[0]["states"], pair[1]["states"])):
        assert_states(s1, s0, exact=True)
        for key in s0:
            if key.endswith("cluster_size"):
                reseeded += int((s0[key] == 3.0).sum())
        calls = pair[0]["calls"][step]
        assert calls["all_reduce"] == 1 and calls["all_gather"] <= 3, calls
    assert reseeded > 0  # the scenario did exercise re-seeding


# ---------------------------------------------------------------------------------------------
# world size 1: never a collective


def test_dropin_kmeans_init_uses_all_ranks_rows(ranks):
    pair = ranks("dropin_init")
    assert_states(pair[1]["state"], pair[0]["state"], exact=True)
    assert all(pair[0]["flags"]) and all(pair[1]["flags"])
    single = DropInRVQ(2, [8, 4], DIM, 0.25, ema=True)
    single.initialize_from_data(torch.cat([pair[0]["rows"], pair[1]["rows"]]), seed=0)
    assert_states(pair[0]["state"], state(single))


def test_world_size_one_runs_no_collective(tmp_path):
    assert distributed.world_size() == 1 and not distributed.should_sync(True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    counter = Counter()
    counter.install()
    try:
        assert distributed.world_size() == 1 and not distributed.should_sync(None)
        run_ema(None, None, "dropin", EQUAL[:2], sync=True)
        run_ema(None, None, "compat", EQUAL[:2], sync=True)
        run_kmeans(None, None, UNEQUAL, threshold=3.0, sync=True)
        distributed.broadcast_coalesced_([torch.zeros(3)])
        assert torch.equal(distributed.all_gather_rows(torch.ones(2, 3)), torch.ones(2, 3))
        assert sum(counter.calls.values()) == 0, counter.calls
    finally:
        counter.uninstall()
        dist.destroy_process_group()
