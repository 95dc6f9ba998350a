"""The server's engine loop: one thread owns the Engine and one long-lived Scheduler.

HTTP handlers (on the asyncio loop) hand it problems and cancellations through
a lock-guarded inbox and get events back on per-request asyncio queues, posted
with ``call_soon_threadsafe``; neither side waits on the other's work. Between
iterations the loop takes in what arrived, so new requests join the running
batch at the next token and a cancelled one leaves with all its blocks::

    HTTP thread                     engine thread
    submit(ticket) ---- inbox ----> scheduler.add
    cancel(ticket) ---- inbox ----> scheduler.cancel
    queue.get() <-- call_soon_threadsafe -- ("progress" | "result" | "error", ...)

When an iteration raises, every request in flight gets the error, every pool
is emptied and a fresh scheduler takes over: the server goes on.
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from pf_engine.api import Engine
from pf_engine.errors import OutOfBlocksError
from pf_engine.scheduler import Scheduler
from pf_engine.state import Problem

log = logging.getLogger("pf_engine.server")


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Ticket:
    """One request inside the loop. ``events`` receives ("progress", dict), ("result", Result) or
    ("error", exception)."""

    problem: Problem
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)
    last_progress: float = 0.0
    done: bool = False

    def post(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


class ServerLoop:
    def __init__(self, engine: Engine, max_queue: int, progress_interval: float = 1.0,
                 max_running: int | None = None, on_finish=None):
        self.engine, self.max_queue, self.progress_interval = engine, max_queue, progress_interval
        self.max_running = max_running
        self.on_finish = on_finish  # called in the engine thread with each (ticket, result)
        self.scheduler = self._new_scheduler()
        self._lock = threading.Condition()
        self._arrivals: list[Ticket] = []
        self._cancels: list[Ticket] = []
        self._tickets: dict[int, Ticket] = {}  # id(problem) -> ticket, for problems in the scheduler
        self.num_waiting = 0  # requests not yet admitted, as of the last iteration (and arrivals since)
        self.num_running = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pf-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    def submit(self, ticket: Ticket) -> None:
        """Queue a request; QueueFull when ``max_queue`` requests already wait for admission."""
        with self._lock:
            if self.num_waiting + len(self._arrivals) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (pf-engine serve --max-queue)")
            self._arrivals.append(ticket)
            self._lock.notify()

    def cancel(self, ticket: Ticket) -> None:
        """Take a request out at the next iteration (its client went away)."""
        with self._lock:
            if not ticket.done:
                self._cancels.append(ticket)
                self._lock.notify()

    @property
    def kv_blocks_in_use(self) -> int:
        return sum(m.num_blocks - m.num_free_blocks for m in self.scheduler.core.managers)

    # -- the engine thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._arrivals or self._cancels or self._stopping
                           or self.scheduler.waiting or self.scheduler.running):
                    self._lock.wait()
                if self._stopping:
                    break
                arrivals, self._arrivals = self._arrivals, []
                cancels, self._cancels = self._cancels, []
            self._take(arrivals, cancels)
            self._iterate()
            self._count()
            self._progress()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _take(self, arrivals: list[Ticket], cancels: list[Ticket]) -> None:
        """The requests that arrived join the scheduler; those cancelled and still in flight leave it."""
        for ticket in arrivals:
            self._tickets[id(ticket.problem)] = ticket
            self.scheduler.add(ticket.problem)
        for ticket in cancels:
            if self._tickets.pop(id(ticket.problem), None) is not None:
                self.scheduler.cancel(ticket.problem)
                ticket.done = True

    def _iterate(self) -> None:
        """One scheduler iteration, if it has work; each problem it finishes is answered."""
        try:
            finished = self.scheduler.iterate() if self.scheduler.waiting or self.scheduler.running else []
            for problem in finished:
                self._finish(self._tickets.pop(id(problem)), problem)
        except OutOfBlocksError as exc:  # one problem outgrew the cache alone: it fails, the rest go on
            if getattr(exc, "problem", None) is None or id(exc.problem) not in self._tickets:
                log.exception("the engine loop failed; every request in flight gets the error")
                self._fail_all(exc)
            else:
                self.scheduler.cancel(exc.problem)
                self._count()
                ticket = self._tickets.pop(id(exc.problem))
                ticket.done = True
                ticket.post("error", exc)
        except Exception as exc:  # nothing a request sends gets here; a PRM callable or a bug may
            log.exception("the engine loop failed; every request in flight gets the error")
            self._fail_all(exc)

    def _count(self) -> None:
        """The queue and batch sizes /metrics shows, brought up to date before any client hears of a change."""
        with self._lock:
            self.num_waiting, self.num_running = len(self.scheduler.waiting), len(self.scheduler.running)

    def _finish(self, ticket: Ticket, problem: Problem) -> None:
        self._count()
        try:
            result = self.engine.result(problem)
        except Exception as exc:
            log.exception("building a result failed")
            ticket.done = True
            ticket.post("error", exc)
            return
        ticket.done = True
        if self.on_finish is not None:
            self.on_finish(ticket, result)
        ticket.post("result", result)

    def _progress(self) -> None:
        now = time.monotonic()
        if not self._tickets or now - min(t.last_progress for t in self._tickets.values()) < self.progress_interval:
            return
        for ticket in self._tickets.values():
            if now - ticket.last_progress >= self.progress_interval:
                ticket.last_progress = now
                p = ticket.problem
                ticket.post("progress", {"state": "running" if p.rows is not None else "waiting", "step": p.step,
                                         "sweep": p.sweep, "live_particles": int((~p.finished).sum())})

    def _fail_all(self, exc: BaseException) -> None:
        """Every request in flight gets ``exc``, once the pools are emptied and a fresh scheduler has
        taken over (a client told of the failure finds the server ready)."""
        failed = list(self._tickets.values())
        self._tickets.clear()
        self.scheduler.free_sequences()
        self.scheduler = self._new_scheduler()
        self._count()
        for ticket in failed:
            ticket.done = True
            ticket.post("error", exc)

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.engine.core, self.engine.bytes_per_block, max_running=self.max_running)
