"""StarGroup: the torch.distributed ranks that run Star Attention together, seen from any rank.

Rank 0 runs the server and the scheduler; before each step that holds sharded star requests it broadcasts
the step's plan (which chunk of which request, and the tokens the workers have not seen), then every rank
runs its rows, exchanging (output, LSE) per layer for query rows. Two gloo groups share one TCP store:
plans wait without a deadline (a worker idles as long as the server does), the per-layer exchange has
`timeout` seconds, so a rank that died or hung fails the step instead of hanging it.

A failure is final: the group aborts, local workers are stopped, star requests get BackendUnavailable (503)
and other backends keep serving on rank 0. On rank 0 the group is an engine hook: it sends each step's plan
before the step runs, and tells the workers which requests are gone after it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pydantic import BaseModel

from attention_backends.base import BackendUnavailable
from attention_backends.star import StarBackend, StarLayout
from engine.config import EngineConfig
from engine.hooks import EngineHook, StepVeto
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = timedelta(minutes=10)  # workers import torch and load the model before they join
IDLE = timedelta(days=365)  # a worker waits this long for the next plan


@dataclass(slots=True)
class StarItem:
    """One sharded request's share of a step: the chunk `[start, start + num_tokens)`."""

    request_id: str
    start: int
    num_tokens: int
    new_tokens: list[int]  # tokens the workers have not been sent yet: the prompt at first, then each new one
    prompt_len: int
    params: BaseModel


@dataclass(slots=True)
class StarPlan:
    items: list[StarItem] = field(default_factory=list)
    frees: list[str] = field(default_factory=list)  # requests whose KV the workers drop (finished, preempted)
    report: bool = False  # after the step, every rank shares how many KV blocks it holds
    stop: bool = False


class Booking(Enum):
    BOOKED = "booked"
    LATER = "later"  # a worker's pool is short while other requests hold it
    NEVER = "never"  # short even with nothing else in it


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200]


class StarGroup(EngineHook):
    name = "star"

    def __init__(self, rank: int, world_size: int, store: dist.Store, timeout: float,
                 workers: list[subprocess.Popen] | None = None) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._collective = dist.ProcessGroupGloo(dist.PrefixStore("star/collective", store), rank, world_size,
                                                 timedelta(seconds=timeout))
        self._plans = dist.ProcessGroupGloo(dist.PrefixStore("star/plans", store), rank, world_size, IDLE)
        self.workers = workers or []  # the worker processes this rank started
        self.failure: str | None = None
        self._sent: dict[str, tuple[int, int]] = {}  # rank 0: request id -> (tokens sent, its preemptions then)
        # Rank 0 mirrors the workers' block tables (which entries each holds, per request), so it never sends a
        # chunk a worker has no room for: the workers' pools are accounted exactly, without asking them.
        self._held: dict[str, list[set[int]]] = {}
        self._drops: list[tuple[list[set[int]], set[int]]] = []  # anchors the workers drop after this step
        self.capacity: list[int] = []  # usable blocks per rank, learnt when the engines attach
        self._dispatched = False
        self._engine: LLMEngine | None = None

    @classmethod
    def connect(cls, rank: int, world_size: int, host: str, port: int, timeout: float,
                workers: list[subprocess.Popen] | None = None, store: dist.TCPStore | None = None) -> StarGroup:
        store = store or dist.TCPStore(host, port, world_size, rank == 0, timeout=STARTUP_TIMEOUT)
        return cls(rank, world_size, store, timeout, workers)

    @classmethod
    def launch(cls, config: EngineConfig, world_size: int, timeout: float, host: str = "127.0.0.1",
               pin: bool = False) -> StarGroup:
        """Rank 0 here and `world_size - 1` worker processes on this machine, each pinned to its share of the
        cores (this process too when `pin`)."""
        store = dist.TCPStore(host, 0, world_size, True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
        cores = sorted(os.sched_getaffinity(0))
        shares = [cores[r::world_size] for r in range(world_size)] if len(cores) >= world_size else None
        workers = []
        for rank in range(1, world_size):
            cmd = [sys.executable, "-m", "distributed.star_worker", "--rank", str(rank),
                   "--world-size", str(world_size), "--host", host, "--port", str(store.port),
                   "--timeout", str(timeout), "--engine-config", json.dumps(asdict(config))]
            if shares:
                cmd += ["--cores", ",".join(map(str, shares[rank]))]
            workers.append(subprocess.Popen(cmd))
        if pin and shares:
            os.sched_setaffinity(0, shares[0])
            torch.set_num_threads(len(shares[0]))
        try:
            return cls.connect(0, world_size, host, store.port, timeout, workers, store)
        except BaseException:
            for p in workers:
                p.kill()
            raise

    # -- every rank -------------------------------------------------------------------------------

    def attach(self, engine: LLMEngine) -> None:
        """This rank's engine is built: give its star backend the group, then wait until every rank has loaded its
        model, learning each rank's KV pool size."""
        star = engine.backend(StarBackend.name)
        assert isinstance(star, StarBackend)
        star.attach(self)
        self._engine = engine
        flag = torch.tensor([engine.pool.num_blocks])
        sizes = [torch.empty(1, dtype=flag.dtype) for _ in range(self.world_size)]
        self._plans.allgather([sizes], [flag]).wait()
        self.capacity = [int(t) - 1 for t in sizes]  # the null block is never handed out

    def health(self) -> dict[str, Any]:
        try:
            self.check()
        except BackendUnavailable as e:
            return {"status": "unavailable", "world_size": self.world_size, "reason": str(e)}
        return {"status": "ok", "world_size": self.world_size}

    def check(self) -> None:
        if self.failure is None:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is not None:
                    self.fail(f"worker rank {rank} exited with code {proc.returncode}")
                    break
        if self.failure is not None:
            raise self._unavailable()

    def _unavailable(self) -> BackendUnavailable:
        return BackendUnavailable(f"Star Attention is unavailable on this server: {self.failure}")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.check()
        device, t = t.device, t.detach().to("cpu", copy=False).contiguous()  # the gloo group exchanges host memory
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            self._collective.allgather([out], [t]).wait()
        except RuntimeError as e:
            self.fail(f"the exchange between ranks failed ({_first_line(e)})")
            raise self._unavailable() from e
        return torch.stack(out).to(device)

    def fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        logger.error("Star Attention group failed: %s; star requests get 503 until the server restarts", reason)
        for pg in (self._collective, self._plans):
            pg.abort()
        self._stop_workers(grace=0)

    def recv(self) -> StarPlan:
        size = torch.zeros(1, dtype=torch.int64)
        self._plans.broadcast(size, 0).wait()
        data = torch.empty(int(size), dtype=torch.uint8)
        self._plans.broadcast(data, 0).wait()
        return pickle.loads(data.numpy().tobytes())

    # -- rank 0 -----------------------------------------------------------------------------------

    def before_step(self, scheduled: list[tuple[Sequence, int]]) -> StepVeto:
        """Send the workers their part of the step about to run on rank 0. The sharded sequences left out: those a
        worker has no room for now (to preempt) and those it never could (to fail). After a failure nothing is
        sent: the star backend fails the sharded sequences and the rest of the step runs."""
        engine = self._engine
        frees = self._stale(engine.requests)
        veto = StepVeto()
        if self.failure is not None:
            return veto
        items = []
        for seq, n in scheduled:
            if seq.backend != StarBackend.name:
                continue
            lay = StarLayout.of(seq.backend_params, seq.num_prompt_tokens, self.world_size)
            if not lay.sharded:
                continue
            booking = self._reserve(seq, lay, n, engine.kv_manager.block_size)
            if booking is Booking.LATER:
                veto.later.append(seq)
                continue
            if booking is Booking.NEVER:
                veto.failed.append((seq, MemoryError(f"request {seq.request_id}: its share of the context does not "
                                                     "fit a worker rank's KV pool")))
                continue
            sent, _ = self._sent.get(seq.request_id, (0, 0))
            end = max(seq.num_computed_tokens + n, seq.num_prompt_tokens)  # the whole prompt on first sight
            items.append(StarItem(seq.request_id, seq.num_computed_tokens, n, seq.token_ids[sent:end],
                                  seq.num_prompt_tokens, seq.backend_params))
            self._sent[seq.request_id] = (end, seq.num_preemptions)
        for held, anchor in self._drops:
            for blocks in held[1:]:
                blocks -= anchor
        self._drops.clear()
        self._dispatched = bool(items)
        if items or frees:
            self._send(StarPlan(items, frees))
        return veto

    def _reserve(self, seq: Sequence, lay: StarLayout, n: int, block_size: int) -> Booking:
        """Book the blocks each worker allocates for this chunk (its rows, and the anchor when it starts), and
        queue the anchor's drop once the context is done."""
        rid = seq.request_id
        held = self._held.setdefault(rid, [set() for _ in range(self.world_size)])
        start = seq.num_computed_tokens
        new = []
        for rank in range(1, self.world_size):
            new.append(lay.blocks_written(rank, start, start + n, block_size) - held[rank])
            others = sum(len(h[rank]) for r, h in self._held.items() if r != rid)
            if len(new[-1]) > self.capacity[rank] - others - len(held[rank]):
                if rid not in self._sent:
                    del self._held[rid]
                return Booking.LATER if others else Booking.NEVER
        for rank, blocks in enumerate(new, start=1):
            held[rank] |= blocks
        if start + n >= lay.context_len:  # after the step: a worker allocates every item's blocks, runs, then drops
            self._drops.append((held, set(range(lay.anchor // block_size))))
        return Booking.BOOKED

    def blocks_in_use(self, pool_used: int) -> list[int]:
        """KV blocks each rank's pool has handed out, rank-major (rank 0 passes its own count)."""
        self._send(StarPlan(report=True))
        return self.report_usage(pool_used)

    def report_usage(self, pool_used: int) -> list[int]:
        return [int(t) for t in self.all_gather(torch.tensor([pool_used]))]

    def after_step(self) -> None:
        """Tell the workers to drop requests that finished, were aborted or preempted since the last plan."""
        frees = self._stale(self._engine.requests)
        if frees and self.failure is None:
            self._send(StarPlan(frees=frees))

    on_abort = after_step

    def on_failure(self, exc: BaseException) -> None:
        """Rank 0's step raised after its plan went out: the workers may be waiting inside a layer's exchange,
        and no later step could line up with them again."""
        if self._dispatched:
            self.fail(f"a step with sharded requests failed on rank 0 ({exc})")

    def shutdown(self) -> None:
        if self.failure is None and self.rank == 0:
            try:
                self._send(StarPlan(stop=True))
            except BackendUnavailable:
                pass
        self._stop_workers(grace=10)
        if self.failure is None:
            self.failure = "the server is shutting down"
            for pg in (self._collective, self._plans):
                pg.abort()

    def _stale(self, requests: dict[str, Sequence]) -> list[str]:
        stale = [rid for rid, (_, pre) in self._sent.items()
                 if rid not in requests or requests[rid].num_preemptions != pre]
        for rid in stale:
            del self._sent[rid]
            self._held.pop(rid, None)
        return stale

    def _send(self, plan: StarPlan) -> None:
        self.check()
        data = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8)
        try:
            self._plans.broadcast(torch.tensor([data.numel()], dtype=torch.int64), 0).wait()
            self._plans.broadcast(data, 0).wait()
        except RuntimeError as e:
            self.fail(f"sending a step to the workers failed ({_first_line(e)})")
            self.check()

    def _stop_workers(self, grace: float) -> None:
        for proc in self.workers:
            if grace:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
