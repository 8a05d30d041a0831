"""Peer residual quantizers for ``bench_semantic_ids``, run in their own process.

``python -m rqvae_fast._bench_worker METHOD DATA.npy OUT.npz LAYERS CODES THREADS [BEAM] [SEED]``
fits and encodes ``DATA.npy`` with ``METHOD``:

- ``faiss``: FAISS's ``ResidualQuantizer(d, LAYERS, log2 CODES)`` with ``max_beam_size=BEAM``
  (its default training: progressive-dimension k-means);
- ``sklearn``: scikit-learn k-means (k-means++, ``n_init="auto"``) layer by layer on residuals.

Writes ``codes (N, LAYERS)`` int64, ``codebooks (LAYERS, CODES, D)`` fp32 and the seconds of fit
and encode to ``OUT.npz``. Imports NumPy and the peer only (no torch): FAISS's OpenMP runtime and
torch's slow each other down in one process.
"""
from __future__ import annotations

import sys
import time

import numpy as np


def unpack_codes(packed: np.ndarray, layers: int, bits: int) -> np.ndarray:
    """``(N, layers)`` int64 codes from FAISS's little-endian bit-packed ``(N, bytes)`` uint8."""
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : layers * bits]
    weights = (1 << np.arange(bits, dtype=np.int64))
    return stream.reshape(packed.shape[0], layers, bits).astype(np.int64) @ weights


def run_faiss(x, layers, codes, threads, beam, seed):
    import faiss

    faiss.omp_set_num_threads(threads)
    bits = int(codes).bit_length() - 1
    if 1 << bits != codes:
        raise SystemExit(f"FAISS needs a power-of-two codebook size, got {codes}")
    start = time.perf_counter()
    rq = faiss.ResidualQuantizer(x.shape[1], layers, bits)
    rq.max_beam_size = beam
    rq.cp.seed = seed
    rq.train(x)
    fitted = time.perf_counter()
    packed = rq.compute_codes(x)
    done = time.perf_counter()
    books = faiss.vector_to_array(rq.codebooks).reshape(layers, codes, x.shape[1])
    return unpack_codes(packed, layers, bits), books, fitted - start, done - fitted


def run_sklearn(x, layers, codes, threads, beam, seed):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        start = time.perf_counter()
        residual, books, ids = x.copy(), [], []
        for layer in range(layers):
            model = KMeans(n_clusters=codes, n_init="auto", random_state=seed + layer).fit(residual)
            book = model.cluster_centers_.astype(np.float32)
            books.append(book)
            ids.append(model.labels_.astype(np.int64))
            residual -= book[model.labels_]
        fitted = time.perf_counter()
    return np.stack(ids, axis=1), np.stack(books), fitted - start, 0.0


def main(argv) -> int:
    method, data, out, layers, codes, threads = argv[:6]
    beam = int(argv[6]) if len(argv) > 6 else 1
    seed = int(argv[7]) if len(argv) > 7 else 1234
    x = np.ascontiguousarray(np.load(data), dtype=np.float32)
    run = {"faiss": run_faiss, "sklearn": run_sklearn}[method]
    ids, books, fit_s, encode_s = run(x, int(layers), int(codes), int(threads), beam, seed)
    np.savez(out, codes=ids, codebooks=books, fit_s=fit_s, encode_s=encode_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
