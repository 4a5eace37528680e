"""Dynamic batching: requests from many clients, answered together by the one inference engine.

One worker thread owns the engine. It takes every waiting job that shares the oldest job's sampling settings
(temperature, top_p), up to `max_batch_size`, and answers them with one `InferenceEngine.generate` call, each
job with its own budget, stop strings, streamed text and cancellation (`ReplyOptions`). New requests wait in
the queue while a batch runs and form the next one; after the first job of an idle spell the worker waits
until no new job has arrived for `gather_s` (at most 8 x gather_s) so that clients arriving together share a
batch. This is request-level batching: a job that arrives while a batch is generating starts with the next
batch (continuous, token-level batching would let it join at once).

Jobs are handed back to the asyncio side through `loop.call_soon_threadsafe`: each job has a queue of events
("text", piece), ("done", text) or ("error", APIError).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..infer import InferenceEngine, ReplyOptions, Request
from .protocol import APIError

log = logging.getLogger("mm_moslora.serve")


@dataclass
class Job:
    request: Request
    temperature: float
    top_p: float
    options: ReplyOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """The client is gone: the engine ends the row at its next check (or the job never starts)."""
        self.cancelled = True

    def put(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass


class BatchScheduler:
    def __init__(self, engine: InferenceEngine, max_batch_size: int = 32, gather_s: float = 0.005):
        self.engine, self.max_batch_size, self.gather_s = engine, max_batch_size, gather_s
        self.waiting: list[Job] = []
        self.condition = threading.Condition()
        self.stopping = False
        self.batch_sizes: Counter[int] = Counter()
        self.cancelled_jobs = 0
        self.thread = threading.Thread(target=self._run, name="mm_moslora-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request, temperature: float, top_p: float, max_tokens: int, stop: list[str],
               stream: bool) -> Job:
        """Queue a request (from the event loop's thread); its events arrive on job.events."""
        job = Job(request, temperature, top_p, ReplyOptions(max_new_tokens=max_tokens, stop=stop),
                  asyncio.get_running_loop())
        job.options.cancelled = lambda: job.cancelled
        if stream:
            job.options.on_text = lambda piece: job.put("text", piece)
        with self.condition:
            self.waiting.append(job)
            self.condition.notify()
        return job

    def stats(self) -> dict:
        with self.condition:
            sizes = dict(sorted(self.batch_sizes.items()))
            waiting = len(self.waiting)
        n_batches = sum(sizes.values())
        return {"batches": n_batches, "requests": sum(k * v for k, v in sizes.items()),
                "largest_batch": max(sizes, default=0), "batch_sizes": sizes, "waiting": waiting,
                "cancelled": self.cancelled_jobs, "max_batch_size": self.max_batch_size}

    def close(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join(timeout=30)

    # ---- the worker thread ----------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self.condition:
            while not self.waiting and not self.stopping:
                self.condition.wait()
            if self.stopping:
                return None
            deadline = time.monotonic() + 8 * self.gather_s
            while len(self.waiting) < self.max_batch_size and time.monotonic() < deadline:
                seen = len(self.waiting)
                self.condition.wait(timeout=self.gather_s)
                if len(self.waiting) == seen:
                    break
            key = (self.waiting[0].temperature, self.waiting[0].top_p)
            batch = [job for job in self.waiting if (job.temperature, job.top_p) == key][:self.max_batch_size]
            taken = set(map(id, batch))
            self.waiting = [job for job in self.waiting if id(job) not in taken]
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            gone = [job for job in batch if job.cancelled]
            self.cancelled_jobs += len(gone)
            batch = [job for job in batch if not job.cancelled]
            if batch:
                self._answer(batch)

    def _answer(self, batch: list[Job]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            replies = self.engine.generate([job.request for job in batch], temperature=batch[0].temperature,
                                           top_p=batch[0].top_p, batch_size=len(batch),
                                           options=[job.options for job in batch])
        except Exception as err:  # a bug or the GPU: these requests fail, the server keeps serving
            log.exception("generation failed for a batch of %d", len(batch))
            error = APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")
            for job in batch:
                job.put("error", error)
            return
        for job, reply in zip(batch, replies):
            if job.options.finish_reason == "cancelled":
                self.cancelled_jobs += 1
            job.put("done", reply)
