"""Server extensions: deployment code that `longserve serve` runs around the engine, found through the entry-point
group `longserve.server_extensions` (longserve's own, Star Attention across ranks, is one). An extension adds its
flags, starts what it runs (an engine hook) before the engine is built, or turns this process into one of its
worker ranks; the server names none of them.
"""

from __future__ import annotations

import argparse
import logging
from functools import cache
from importlib.metadata import entry_points
from typing import Protocol

from engine.config import EngineConfig
from engine.hooks import EngineHook

ENTRY_POINT_GROUP = "longserve.server_extensions"
logger = logging.getLogger(__name__)


class ServerExtension(Protocol):
    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """Its flags (config-file keys too)."""

    def configure(self, args: argparse.Namespace) -> None:
        """Take its settings from the parsed flags; raise ValueError for bad ones."""

    def run_worker(self, engine: EngineConfig) -> bool:
        """If this process is one of its worker ranks (not the one that serves), run it until told to stop and
        return True."""

    def start(self, engine: EngineConfig) -> EngineHook | None:
        """Before the engine is built: what to attach to it; None when its settings leave it off."""


@cache
def _extension_classes() -> tuple[type, ...]:
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append(ep.load())
        except Exception:  # a broken extension must not take the server down with it
            logger.exception("could not load server extension %s", ep.value)
    return tuple(found)


def server_extensions() -> list[ServerExtension]:
    """A fresh instance of every installed extension."""
    return [cls() for cls in _extension_classes()]
