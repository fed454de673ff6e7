"""Deterministic, resumable batch iterator with background prefetch.

The record stream is a pure function of (seed, epoch, position): epoch e visits the source in the order
`default_rng([seed, e]).permutation(n)` (or 0..n-1 without shuffling), and samples are built and packed
deterministically. So a resume point is just (epoch, position) of the first record not yet in a consumed batch
(the one that did not fit the last batch), plus the skip counters; `restore(state())` replays the exact same
batches. A thread builds batches ahead into a bounded queue; each batch carries the state *after* it, so
`state()` describes what the caller consumed, never what the thread prefetched.

Why threads rather than grain: one producer that packs in order is what makes resumption exact and simple;
image decoding (PIL) releases the GIL, and `workers > 0` builds samples in a thread pool, order preserved.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
from typing import Any, Iterator

import numpy as np

from qwen3vl.data.datasets import JsonlSource, SampleBuilder, SkipSample
from qwen3vl.data.packing import Packer, batch_stats
from qwen3vl.data.synthetic import SyntheticSource

__all__ = ["Loader", "SyntheticSource", "JsonlSource"]

log = logging.getLogger(__name__)
_END = object()
_LOG_PER_REASON = 5  # log the first few skips of each reason, then only count


class Loader:
    """Infinite (or `epochs`-long) iterator of Packer batches over a random-access `source` of records.

    source: `len()` and `[i]` -> record dict (SyntheticSource, JsonlSource, or a list of records).
    packer: batch layout; its `builder` (or `builder=`) turns records into samples. The Loader packs with its
      own copy, so one Packer can configure several loaders.
    prefetch: batches built ahead in a background thread (0 = build in the caller's thread).
    workers: threads building samples in parallel (0 = in the producer thread).
    shard: (index, count): visit only the records whose position in the epoch's order is index modulo count
      (one share per process of a multi-host run; positions stay global, so resume points do too).
    """

    def __init__(self, source, packer: Packer, *, seed: int = 0, shuffle: bool = True, prefetch: int = 2,
                 epochs: int | None = None, workers: int = 0, builder: SampleBuilder | None = None,
                 shard: tuple[int, int] = (0, 1)):
        if len(source) == 0:
            raise ValueError(f"Loader got an empty source {source!r}")
        self.builder = builder or packer.builder
        if self.builder is None:
            raise ValueError("Loader needs a SampleBuilder: pass Packer(tokenizer=...) or builder=")
        self.source, self.packer = source, packer.clone()
        self.seed, self.shuffle, self.prefetch = int(seed), bool(shuffle), int(prefetch)
        self.epochs, self.workers = epochs, int(workers)
        self.shard = (int(shard[0]), int(shard[1]))
        if not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"Loader shard {shard} must be (index, count) with 0 <= index < count")
        self._state = {"epoch": 0, "position": 0, "batches": 0, "skipped": {}}
        self._perm: tuple[int, np.ndarray] | None = None
        self._logged: collections.Counter = collections.Counter()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._gen: Iterator | None = None
        self._done = False
        self.last_stats: dict | None = None  # batch_stats of the last batch returned

    # ------------------------------------------------------------------------------------------ public
    def state(self) -> dict:
        """JSON-able resume point after the last batch returned by next()."""
        s = self._state
        return {"epoch": s["epoch"], "position": s["position"], "batches": s["batches"],
                "skipped": dict(s["skipped"]), "seed": self.seed, "source_size": len(self.source)}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`: the following batches equal those that followed it originally."""
        if state.get("source_size", len(self.source)) != len(self.source) or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state is for a source of {state.get('source_size')} records with seed "
                             f"{state.get('seed')}; this loader has {len(self.source)} records, seed {self.seed}")
        self.close()
        self._state = {"epoch": int(state["epoch"]), "position": int(state["position"]),
                       "batches": int(state.get("batches", 0)),
                       "skipped": {str(k): int(v) for k, v in state.get("skipped", {}).items()}}
        self._done = False
        self.last_stats = None

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far, by reason (datasets.SKIP_REASONS), up to the last batch returned."""
        return dict(self._state["skipped"])

    def close(self) -> None:
        """Stop the prefetch thread; a later next() restarts from the last batch returned."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)  # unblock a producer waiting on a full queue
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
        self._thread, self._queue, self._gen = None, None, None
        self._stop = threading.Event()
        self.packer = self.packer.clone()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        if self.prefetch <= 0:
            if self._gen is None:
                self._gen = self._batches(dict(self._state))
            item = next(self._gen, _END)
        else:
            if self._thread is None:
                self._start_thread()
            item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        self.last_stats = batch_stats(batch)
        return batch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------- producer
    def _start_thread(self):
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(dict(self._state), self._queue, self._stop),
                                        name="qwen3vl-loader", daemon=True)
        self._thread.start()

    def _produce(self, state, q: queue.Queue, stop: threading.Event):
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for item in self._batches(state):
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            put(e)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.source)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (epoch, order)
        return self._perm[1]

    def _positions(self, epoch: int, position: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, position, source index) from a resume point on."""
        n = len(self.source)
        while self.epochs is None or epoch < self.epochs:
            order = self._order(epoch)
            index, count = self.shard
            for p in range(position + (index - position) % count, n, count):
                yield epoch, p, int(order[p])
            epoch, position = epoch + 1, 0

    def _build(self, index: int):
        """Sample, or the SkipSample saying why not (never raises for bad data)."""
        try:
            sample = self.builder(self.source[index])
            why = self.packer.too_big(sample)
            if why:
                raise SkipSample(why, f"{sample.length} tokens, {sample.num_patches} patches")
            return sample
        except SkipSample as e:
            skip = e
        except Exception as e:  # a bug or an unforeseen bad input: count it, keep training
            skip = SkipSample("error", f"{type(e).__name__}: {e}")
        if self._logged[skip.reason] < _LOG_PER_REASON:
            self._logged[skip.reason] += 1
            log.warning("skipping record %d of %r: %s", index, self.source, skip)
        return skip

    def _samples(self, epoch: int, position: int):
        positions = self._positions(epoch, position)
        if self.workers <= 0:
            for e, p, i in positions:
                yield e, p, self._build(i)
            return
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="qwen3vl-build") as pool:
            while True:
                chunk = [x for _, x in zip(range(4 * self.workers), positions)]
                if not chunk:
                    return
                for (e, p, _), result in zip(chunk, pool.map(self._build, [i for _, _, i in chunk])):
                    yield e, p, result

    def _batches(self, state: dict) -> Iterator[Any]:
        """(batch, state after it) pairs; `state` = where to start."""
        skipped = collections.Counter(state["skipped"])
        batches, bad_run, n = state["batches"], 0, len(self.source)
        packer = self.packer
        for e, p, result in self._samples(state["epoch"], state["position"]):
            if isinstance(result, SkipSample):
                skipped[result.reason] += 1
                bad_run += 1
                if bad_run >= n:
                    raise RuntimeError(f"no usable sample in {bad_run} consecutive records of {self.source!r}; "
                                       f"skipped by reason: {dict(skipped)}")
                continue
            bad_run = 0
            if packer.add(result):
                continue
            batches += 1
            yield packer.flush(), {"epoch": e, "position": p, "batches": batches, "skipped": dict(skipped)}
            packer.add(result)  # fits: too_big() was checked, and the packer is empty
        if len(packer):  # finite epochs: the last, partial batch
            yield packer.flush(), {"epoch": self.epochs, "position": 0, "batches": batches + 1,
                                   "skipped": dict(skipped)}
