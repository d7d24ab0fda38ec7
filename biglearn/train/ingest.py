"""A training worker's data: its Ray Data shard as micro-batches, epoch after epoch, read a few
ahead by a thread, from a resumable position (the loop state's epoch and batches taken)."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import ray.train

from biglearn.data.manifest import Manifest
from biglearn.train.config import PretrainConfig


def resumable_batches(cfg: PretrainConfig, manifest: Manifest, state: dict, device) -> Iterator:
    """Micro-batches of this worker's shard, epoch after epoch, from the data position in `state`
    (which advances as they are taken) until state["step"] reaches the run's steps.

    A background thread reads them a few micro-batches ahead, so the next epoch starts while this
    one trains: starting one costs 30-90 ms (a round trip to Ray Data's split coordinator and a
    new execution), about 2% of a step on the digits (benchmarks/train_step.py)."""
    shard = ray.train.get_dataset_shard("train")
    rows = fetch_rows(manifest, cfg.data.fetch_bytes)

    def epochs():
        epoch = state["epoch"]
        while True:
            seed = cfg.train.seed + epoch
            for values in micro_batches(shard, cfg.micro_batch_size, rows, cfg.data.shuffle_buffer, seed, device):
                yield epoch, values
            epoch += 1

    index = 0
    with read_ahead(epochs(), AHEAD) as batches:
        for epoch, values in batches:
            if state["step"] >= cfg.train.steps:
                return
            if epoch != state["epoch"]:
                state["epoch"], state["batches_in_epoch"], index = epoch, 0, 0
            index += 1
            if index <= state["batches_in_epoch"]:
                continue  # resuming mid-epoch: these were consumed before the checkpoint
            state["batches_in_epoch"] = index
            yield values


AHEAD = 4  # micro-batches read ahead: enough to hide an epoch's start behind the steps before it


@contextlib.contextmanager
def read_ahead(items: Iterator, ahead: int):
    """`items`, drawn by a daemon thread up to `ahead` in advance; its errors re-raise here. On
    exit the thread stops at its next hand-over."""
    handed, stop, done = queue.Queue(maxsize=ahead), threading.Event(), object()

    def hand_over(entry: tuple) -> bool:
        """False once the consumer has left (the entry is dropped)."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                handed.put(entry, timeout=0.1)
                return True
        return False

    def draw() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((done, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            hand_over((done, error))

    def drawn() -> Iterator:
        while True:
            item, error = handed.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item

    thread = threading.Thread(target=draw, name="biglearn-read-ahead", daemon=True)
    thread.start()
    try:
        yield drawn()
    finally:
        stop.set()


def fetch_rows(manifest: Manifest, fetch_bytes: int) -> int:
    return max(1, fetch_bytes // (manifest.length * (manifest.patch_dim or 1) * 4))


def micro_batches(shard, micro: int, fetch_rows: int, shuffle_buffer: int | None, seed: int | None, device):
    """The epoch's `values` as micro-batches of `micro` rows (a trailing partial one is dropped),
    cut from Ray Data batches of about `fetch_rows` rows: Ray Data pays a fixed cost per batch,
    which dominates at micro-batch sizes (benchmarks/ingest.py measures it)."""
    fetch = max(1, fetch_rows // micro) * micro
    for batch in shard.iter_torch_batches(
        batch_size=fetch,
        drop_last=False,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=seed if shuffle_buffer else None,
        device=device,
    ):
        values = batch["values"]
        for first in range(0, len(values) - micro + 1, micro):
            yield values[first : first + micro]
