"""Exact top-k by cosine over a library of unit vectors, chunked and sharded over devices.

The library is cut into chunks of `chunk_rows` rows; each chunk is split over the devices of a
1-D mesh. One jit-compiled program per (query batch, chunk) shape scores the queries against a
device's slice of the chunk (float32 dot products at full precision, float16 libraries are
widened first), masks the padding rows of the last chunk, and keeps that slice's best
``min(k, rows per device)`` with `lax.top_k`. The host merges each chunk's candidates into a
running top-k per query. Memory is bounded by the chunk, not by the library: at most
``query_batch x chunk_rows`` float32 scores exist at a time. The library is either streamed from
host memory (memory-mapped shard files) chunk by chunk, or placed on the devices once
(`place`), which a server does.

Ties are broken by library row (the lower row first): `lax.top_k` prefers the lower index and
the merge sorts by (score descending, row ascending), so results are deterministic. A result's
rank is the competition rank 1 + (number of library rows scoring strictly higher), the
optimistic rank of the evaluation protocols (docs/evaluation.md, "Rank and ties").

There are no collectives: each device returns its own candidates, the host merges them. With
several processes (a mesh holding other processes' devices, `jaxmol.search.join_processes`)
every process makes the same calls with the same library and queries, places only its own
devices' slices, and gathers every device's candidates (`process_allgather`), so every process
gets the whole result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "rows"
DEFAULT_CHUNK_ROWS = 131_072
DEFAULT_QUERY_BATCH = 256
_NO_ROW = np.iinfo(np.int64).max  # row of an empty slot (sorts after every real row)


@dataclasses.dataclass(frozen=True)
class DeviceLibrary:
    """Library chunks already on the devices (see `ExactTopK.place`).

    Attributes:
      chunks: [(array [chunk_rows, D] split over the mesh, first row, real rows)].
      num_rows: rows in the library.
      chunk_rows: rows per chunk (the last one padded).
    """

    chunks: tuple[tuple[jax.Array, int, int], ...]
    num_rows: int
    chunk_rows: int


def competition_ranks(scores: np.ndarray) -> np.ndarray:
    """1 + (number of strictly higher scores) for scores sorted in descending order."""
    scores = np.asarray(scores)
    return 1 + np.searchsorted(-scores, -scores, side="left")


class ExactTopK:
    """Exact cosine top-k of unit-vector queries against a unit-vector library.

    Args:
      devices: the devices to shard library chunks over (default: all local devices).
      chunk_rows: rows per library chunk (rounded to a multiple of the device count).
      query_batch: queries per device program (more are processed in batches).
    """

    def __init__(
        self,
        devices: Sequence | None = None,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        query_batch: int = DEFAULT_QUERY_BATCH,
    ):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.num_devices = len(self.devices)
        if chunk_rows < 1 or query_batch < 1:
            raise ValueError(f"chunk_rows, query_batch must be >= 1: {chunk_rows}, {query_batch}")
        self.max_chunk_rows = self._round(chunk_rows)
        self.query_batch = int(query_batch)
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self._rows = NamedSharding(self.mesh, P(AXIS))
        self._replicated = NamedSharding(self.mesh, P())
        self._programs: dict[int, Callable] = {}
        # Devices of other processes: arrays are assembled from each process's own slices.
        self.multiprocess = any(d.process_index != jax.process_index() for d in self.devices)

    def _round(self, rows: int) -> int:
        """`rows` rounded up to a multiple of the device count (at least one row per device)."""
        return -(-max(int(rows), 1) // self.num_devices) * self.num_devices

    def chunk_rows_for(self, num_rows: int) -> int:
        """The chunk size used for a library of `num_rows` rows."""
        return min(self.max_chunk_rows, self._round(num_rows))

    def _query_rows(self, num_queries: int) -> int:
        """Queries padded to a power of two (few compiled shapes), at most `query_batch`."""
        return min(self.query_batch, 1 << max(int(num_queries) - 1, 0).bit_length())

    def _program(self, local_k: int) -> Callable:
        if local_k not in self._programs:

            def local(queries, chunk, start, count):
                # queries [Q, D] (replicated), chunk [R, D]: this device's slice of the chunk.
                per_device = chunk.shape[0]
                first = lax.axis_index(AXIS) * per_device
                scores = jnp.dot(
                    queries,
                    chunk.astype(jnp.float32).T,
                    precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32,
                )  # [Q, R]
                real = (first + jnp.arange(per_device)) < count  # [R]
                scores = jnp.where(real[None, :], scores, -jnp.inf)
                best, where = lax.top_k(scores, local_k)  # [Q, k'] each
                return best[None], (where + first + start)[None]  # [1, Q, k']

            self._programs[local_k] = jax.jit(
                jax.shard_map(
                    local,
                    mesh=self.mesh,
                    in_specs=(P(), P(AXIS), P(), P()),
                    out_specs=(P(AXIS), P(AXIS)),
                    check_vma=False,
                )
            )
        return self._programs[local_k]

    def _put(self, host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """A host array (the same on every process) -> a device array laid out by `sharding`;
        with several processes each process copies only its own devices' slices."""
        if self.multiprocess:
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(host, sharding)

    def _scalar(self, value: int):
        """An int32 program argument (with several processes, a replicated global array)."""
        if self.multiprocess:
            return self._put(np.asarray(value, np.int32), self._replicated)
        return np.int32(value)

    def _fetch(self, array: jax.Array) -> np.ndarray:
        """Per-device outputs [D, ...] -> host NumPy, every device's rows on every process."""
        if self.multiprocess:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(array, tiled=True))
        return np.asarray(array)

    def _device_chunk(self, host: np.ndarray, chunk_rows: int) -> jax.Array:
        if host.shape[0] < chunk_rows:
            padded = np.zeros((chunk_rows, host.shape[1]), host.dtype)
            padded[: host.shape[0]] = host
            host = padded
        return self._put(np.asarray(host), self._rows)

    def place(self, chunks: Iterator[tuple[np.ndarray, int]], num_rows: int) -> DeviceLibrary:
        """Copies a library onto the devices once, in chunks of `chunk_rows_for(num_rows)`.

        Args:
          chunks: host chunks (array [<= chunk_rows, D], first row), in row order, as
            `iter_chunks` of an index yields them.
          num_rows: rows in the library.
        """
        chunk_rows = self.chunk_rows_for(num_rows)
        placed = tuple(
            (self._device_chunk(host, chunk_rows), int(start), int(host.shape[0]))
            for host, start in chunks
        )
        return DeviceLibrary(placed, int(num_rows), chunk_rows)

    def search(
        self,
        queries: np.ndarray,
        library: DeviceLibrary | Callable[[int], Iterator[tuple[np.ndarray, int]]],
        k: int,
        num_rows: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best library rows for every query.

        Args:
          queries: float32 [Q, D] unit rows.
          library: a `DeviceLibrary`, or a function `chunk_rows -> iterator of (host array
            [<= chunk_rows, D], first row)` over the whole library in row order (streamed).
          k: results per query (at most the library size are returned).
          num_rows: the library size (needed for a streamed library).

        Returns:
          scores float32 [Q, k'] (descending) and rows int64 [Q, k'], k' = min(k, library
          size); ties in row order.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be [Q, D], got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(library, DeviceLibrary):
            num_rows, chunk_rows = library.num_rows, library.chunk_rows
            chunks: Iterator = iter(library.chunks)
        else:
            if num_rows is None:
                raise ValueError("a streamed library needs num_rows")
            chunk_rows = self.chunk_rows_for(num_rows)
            chunks = (
                (self._device_chunk(host, chunk_rows), start, host.shape[0])
                for host, start in library(chunk_rows)
            )
        num_queries = queries.shape[0]
        k_out = min(int(k), int(num_rows))
        best_scores = np.full((num_queries, k_out), -np.inf, np.float32)
        best_rows = np.full((num_queries, k_out), _NO_ROW, np.int64)
        if num_queries == 0 or num_rows == 0:
            return best_scores, best_rows
        program = self._program(min(k_out, chunk_rows // self.num_devices))
        query_rows = self._query_rows(num_queries)
        batches = []  # (first query, real queries, replicated device array)
        for first in range(0, num_queries, query_rows):
            block = np.zeros((query_rows, queries.shape[1]), np.float32)
            part = queries[first : first + query_rows]
            block[: len(part)] = part
            batches.append((first, len(part), self._put(block, self._replicated)))

        pending: list = []  # one chunk's device outputs stay in flight while the next runs
        for device_chunk, start, count in chunks:
            start_arg, count_arg = self._scalar(start), self._scalar(count)
            outputs = [
                (first, n, program(q, device_chunk, start_arg, count_arg))
                for first, n, q in batches
            ]
            if self.multiprocess and not pending:
                # The programs are compiled now; the first gather (gloo's set-up) must not find
                # the other processes more than 30 s away (docs/design.md section 4).
                from jaxmol import distributed

                distributed.barrier("topk_compiled")
            for first, n, (scores, rows) in pending:
                self._merge(best_scores, best_rows, first, n, scores, rows, k_out)
            pending = outputs
        for first, n, (scores, rows) in pending:
            self._merge(best_scores, best_rows, first, n, scores, rows, k_out)
        return best_scores, best_rows

    def _merge(self, best_scores, best_rows, first, n, scores, rows, k_out) -> None:
        """Merges one chunk's per-device candidates [D, Qb, k'] into the running best."""
        scores = self._fetch(scores)[:, :n]  # [D, n, k']
        rows = self._fetch(rows)[:, :n].astype(np.int64)
        scores = np.moveaxis(scores, 0, 1).reshape(n, -1)  # [n, D * k']
        rows = np.moveaxis(rows, 0, 1).reshape(n, -1)
        rows = np.where(np.isneginf(scores), _NO_ROW, rows)  # padding rows of the last chunk
        stop = first + n
        all_scores = np.concatenate([best_scores[first:stop], scores], axis=1)
        all_rows = np.concatenate([best_rows[first:stop], rows], axis=1)
        order = np.lexsort((all_rows, -all_scores), axis=1)[:, :k_out]  # score desc, row asc
        best_scores[first:stop] = np.take_along_axis(all_scores, order, axis=1)
        best_rows[first:stop] = np.take_along_axis(all_rows, order, axis=1)
