"""`longserve serve --star-world-size N`: the server extension that starts Star Attention's ranks.

With N > 1, this process is rank 0 (it serves HTTP and schedules) and N - 1 worker processes start here, each
pinned to its share of the cores. Under torchrun (RANK and WORLD_SIZE set) the ranks torchrun started meet at
MASTER_ADDR:--star-port instead, and ranks >= 1 run the worker loop rather than a server.
"""

from __future__ import annotations

import argparse
import os

from distributed.star_group import StarGroup
from distributed.star_worker import run_worker
from engine.config import EngineConfig


class StarExtension:
    def __init__(self) -> None:
        self.world_size, self.timeout, self.port = 1, 60.0, 29511

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("star attention across ranks")
        g.add_argument("--star-world-size", type=int, default=self.world_size,
                       help="ranks that `star` requests shard their context over; N > 1 starts N - 1 worker "
                            "processes here, each pinned to its share of the cores (under torchrun: the ranks "
                            "torchrun starts)")
        g.add_argument("--star-timeout", type=float, default=self.timeout,
                       help="seconds a rank may keep the others waiting in a step before star requests fail with 503")
        g.add_argument("--star-port", type=int, default=self.port,
                       help="rank 0's rendezvous port on MASTER_ADDR when started under torchrun")

    def configure(self, args: argparse.Namespace) -> None:
        if args.star_world_size < 1 or args.star_timeout <= 0:
            raise ValueError("star_world_size must be at least 1 and star_timeout positive")
        self.world_size, self.timeout, self.port = args.star_world_size, args.star_timeout, args.star_port

    def _torchrun_rank(self) -> int | None:
        if self.world_size == 1 or "RANK" not in os.environ:
            return None
        if int(os.environ.get("WORLD_SIZE", "0")) != self.world_size:
            raise ValueError(f"--star-world-size {self.world_size} but torchrun started "
                             f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}")
        return int(os.environ["RANK"])

    def _connect(self, rank: int) -> StarGroup:
        return StarGroup.connect(rank, self.world_size, os.environ.get("MASTER_ADDR", "127.0.0.1"), self.port,
                                 self.timeout)

    def run_worker(self, engine: EngineConfig) -> bool:
        rank = self._torchrun_rank()
        if not rank:
            return False
        run_worker(engine, self._connect(rank))
        return True

    def start(self, engine: EngineConfig) -> StarGroup | None:
        if self.world_size == 1:
            return None
        if self._torchrun_rank() == 0:
            return self._connect(0)
        return StarGroup.launch(engine, self.world_size, self.timeout, pin=True)
