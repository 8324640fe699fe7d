"""A Star Attention worker rank: loads the model, then runs its share of each step rank 0 sends, until told to stop.

Started by `longserve serve --star-world-size N` (N - 1 of these on the same machine), or on other machines as
the ranks >= 1 of `torchrun ... longserve serve --star-world-size N`. It never sees HTTP: its KV pool holds
the context blocks it owns (and the anchor while it encodes them); a request's KV goes when rank 0 says so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys

import torch

from attention_backends.star import StarBackend
from distributed.star_group import StarGroup, StarPlan
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


def run_worker(config: EngineConfig, group: StarGroup) -> None:
    engine = LLMEngine(config, hooks=[group])  # attaching waits until every rank has loaded its model
    star = engine.backend(StarBackend.name)
    assert isinstance(star, StarBackend)
    seqs: dict[str, Sequence] = {}
    while not (plan := group.recv()).stop:
        run_plan(engine, star, seqs, plan)
        if plan.report:
            group.report_usage(engine.usage().used)
    logger.info("rank %d: stopped by rank 0", group.rank)


def run_plan(engine: LLMEngine, star: StarBackend, seqs: dict[str, Sequence], plan: StarPlan) -> None:
    for rid in plan.frees:
        seqs.pop(rid, None)
        engine.free(rid)
    chunks = []
    for item in plan.items:
        seq = seqs.get(item.request_id)
        if seq is None:
            seq = seqs[item.request_id] = Sequence(item.request_id, item.new_tokens[: item.prompt_len],
                                                   SamplingParams(), StarBackend.name, item.params,
                                                   engine.max_model_len)
            seq.token_ids = list(item.new_tokens)
        else:
            seq.token_ids.extend(item.new_tokens)
        seq.num_computed_tokens = item.start
        entries = star.layout(item.params, item.prompt_len).blocks_written(
            star.rank, item.start, item.start + item.num_tokens, engine.kv_manager.block_size)
        chunks.append((seq, item.num_tokens, entries))
    if chunks:
        engine.run_planned(chunks)


def _die_with_parent() -> None:
    """A locally started worker must not outlive the server, however the server ends."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.star_worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--engine-config", type=json.loads, required=True)
    parser.add_argument("--cores", default=None, help="comma-separated CPU cores to pin this rank to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{args.rank} %(name)s: %(message)s")
    _die_with_parent()
    if args.cores:
        cores = [int(c) for c in args.cores.split(",")]
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    config = EngineConfig(**args.engine_config)
    if config.device in ("auto", "cuda") and torch.cuda.device_count() > 1:  # one GPU per rank on this machine
        config.device = f"cuda:{args.rank % torch.cuda.device_count()}"
    group = StarGroup.connect(args.rank, args.world_size, args.host, args.port, args.timeout)
    run_worker(config, group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
