"""Minibatches of cells on disk: shuffled blocks of consecutive cells, read ahead in a thread.

Drawing each minibatch's cells at random from the whole file would read every block for every
minibatch. :class:`BlockShuffleSampler` draws them as the on-disk loaders of annbatch and of the
CELLxGENE Census (``ExperimentDataPipe``) do: the blocks of consecutive cells come in a fresh
random order each epoch, and cells are shuffled within a window of a few blocks, so each
block is read once per epoch and only two windows' blocks need to be in memory.
:func:`prefetched` reads the next minibatches in a background thread while the current one
trains, at most ``depth`` ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from pyrosc.data import MinibatchSampler

T = TypeVar("T")


class BlockShuffleSampler(MinibatchSampler):
    """Seeded minibatches of cell positions, block-shuffled; every cell once per epoch.

    Each epoch: the blocks come in a random order; they are taken ``blocks_per_window`` at a
    time, and the cells of each window are shuffled together; the cells in that order are cut
    into minibatches of ``batch_size`` exactly as :class:`pyrosc.data.MinibatchSampler` cuts its
    permutation (same number of minibatches, no minibatch of one cell). A minibatch thus holds
    cells of at most two consecutive windows: a reader caching ``2 * blocks_per_window`` blocks
    reads each block once per epoch.

    Args:
        blocks: (cells,) int the block of each cell position (cells of one block share a
            value, e.g. :meth:`pyrosc.disk_blocks.BlockReader.block_of` of their rows).
        batch_size: cells per minibatch.
        blocks_per_window: blocks whose cells are shuffled together.
        seed: seeds the orders.
    """

    def __init__(
        self, blocks: np.ndarray, batch_size: int = 128, blocks_per_window: int = 16, seed: int = 0
    ) -> None:
        super().__init__(len(blocks), batch_size, shuffle=True, seed=seed)
        if blocks_per_window < 1:
            raise ValueError(f"blocks_per_window must be at least 1, got {blocks_per_window}")
        self.blocks_per_window = blocks_per_window
        blocks = np.asarray(blocks)
        by_block = np.argsort(blocks, kind="stable")  # positions, grouped by block
        cuts = np.flatnonzero(np.diff(blocks[by_block])) + 1
        self._members = np.split(by_block.astype(np.int64), cuts)  # positions of each block

    def _order(self) -> np.ndarray:
        """(n_cells,) positions: windows of shuffled blocks, cells shuffled in each window."""
        rng = self._generator
        blocks = rng.permutation(len(self._members))
        windows = []
        for start in range(0, len(blocks), self.blocks_per_window):
            window = blocks[start : start + self.blocks_per_window]
            cells = np.concatenate([self._members[block] for block in window])
            windows.append(rng.permutation(cells))
        return np.concatenate(windows)


def prefetched(
    batches: Iterable[np.ndarray], read: Callable[[np.ndarray], T], depth: int = 2
) -> Iterator[T]:
    """``read(index)`` of each index array of ``batches``, in order, computed in a background
    thread at most ``depth`` minibatches ahead of the consumer.

    The thread only reads (disk, decompression, densifying); the consumer trains meanwhile.
    An error in the thread is raised in the consumer; a consumer that stops early (an error,
    ``break``) stops the thread.
    """
    if depth < 1:
        yield from (read(index) for index in batches)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for index in batches:
                if not put((read(index), None)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))
            return
        put((done, None))

    thread = threading.Thread(target=work, name="pyrosc-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()
