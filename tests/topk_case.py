"""The exact top-k case shared by tests/test_search.py in process and by each process of its
2-process run (a plain module: it does not import conftest.py, which asks for 8 devices)."""

import numpy as np


def check_exact_topk_against_brute_force(engine) -> None:
    """`engine` (an `ExactTopK`, any devices) returns the brute-force top k: ties broken by row,
    k beyond the library clipped, streamed chunks and chunks placed on the devices alike."""
    rng = np.random.default_rng(0)
    # Small integers: every dot product is exact in float32, so ties are exact and the order
    # is fully determined (score descending, then row ascending).
    library = rng.integers(-2, 3, size=(203, 8)).astype(np.float32)  # [N, D]
    library[50] = library[7]  # identical rows tie
    queries = rng.integers(-2, 3, size=(5, 8)).astype(np.float32)  # [Q, D]
    scores = queries @ library.T  # [Q, N]
    order = np.lexsort((np.broadcast_to(np.arange(203), scores.shape), -scores), axis=1)

    def chunks(rows):
        for start in range(0, len(library), rows):
            yield library[start : start + rows], start

    for k in (1, 7, 250):
        got_scores, got_rows = engine.search(queries, chunks, k, num_rows=len(library))
        k_out = min(k, len(library))
        np.testing.assert_array_equal(got_rows, order[:, :k_out])
        np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, order, 1)[:, :k_out])
    placed = engine.place(chunks(engine.chunk_rows_for(len(library))), len(library))
    np.testing.assert_array_equal(engine.search(queries, placed, 7)[1], order[:, :7])
    half = engine.search(
        queries,
        lambda r: ((c.astype(np.float16), s) for c, s in chunks(r)),
        7,
        num_rows=len(library),
    )
    np.testing.assert_array_equal(half[1], order[:, :7])  # small integers are exact in float16
