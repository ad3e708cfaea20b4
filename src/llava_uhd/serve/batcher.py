"""Dynamic batching: requests that arrive close together are answered by one ``generate`` call.

The model thread takes the oldest waiting job and waits up to ``window_s`` from that job's arrival for
more jobs that can share its batch (:attr:`~llava_uhd.serve.engine.Job.batch_key`), up to ``max_batch``;
jobs of other keys wait for a later batch. The queue is bounded: a job beyond ``max_queue`` waiting ones
is refused with 503 and ``Retry-After``. A cancelled job (its client went away) leaves the queue at once,
or, already in a batch, stops there at the next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from llava_uhd.errors import ConfigError
from llava_uhd.serve.engine import Job
from llava_uhd.serve.limits import ApiError

RETRY_AFTER_S = 1


class Batcher:
    """A bounded queue of jobs and the one thread that runs them through ``run_batch`` in batches."""

    def __init__(
        self,
        run_batch: Callable[[list[Job]], None],
        *,
        max_batch: int = 16,
        window_s: float = 0.01,
        max_queue: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ConfigError(f"the batch window must be >= 0 s, got {window_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self._queue: list[Job] = []
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="llava-uhd-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._queue)

    def check_room(self) -> None:
        """Refuse with 503 now when the queue is full (before a request does its image work)."""
        if len(self._queue) >= self.max_queue:
            raise ApiError(
                503,
                f"the server is busy: {len(self._queue)} requests are waiting (limit {self.max_queue}, "
                "set by --max-queue); retry later",
                code="queue_full",
                kind="server_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def submit(self, job: Job) -> None:
        """Queue ``job``; 503 when the queue is full."""
        with self._changed:
            self.check_room()
            job.enqueued = time.monotonic()
            self._queue.append(job)
            self._changed.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job``: out of the queue if it waits, stopped at the next step if it runs."""
        job.cancelled.set()
        with self._changed:
            if job in self._queue:
                self._queue.remove(job)
                self._changed.notify()

    def close(self) -> None:
        """Stop the thread after the batch it is running (waiting jobs are dropped)."""
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join()

    def _next_batch(self) -> list[Job] | None:
        with self._changed:
            while True:
                while not self._queue and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return None
                key = self._queue[0].batch_key
                deadline = self._queue[0].enqueued + self.window_s
                same = [job for job in self._queue if job.batch_key == key]
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch or left <= 0:
                    batch = same[: self.max_batch]
                    self._queue = [job for job in self._queue if job not in batch]
                    return batch
                self._changed.wait(left)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.run_batch(batch)
