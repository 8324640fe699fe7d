"""Engine hooks: code that runs beside the engine loop and owns what the engine does not, such as a distributed
backend's process group (`distributed/star_group.py`). The engine names no backend; it calls its hooks on the
engine thread at these points, and every method has a default that does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.sequence import Sequence


@dataclass(slots=True)
class StepVeto:
    """Sequences a hook leaves out of the step about to run."""

    later: list[Sequence] = field(default_factory=list)  # preempted: they run again once they can
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # finished with this error


class EngineHook:
    name: ClassVar[str] = "hook"  # its entry in `/health`

    def attach(self, engine: LLMEngine) -> None:
        """Once, at the end of the engine's construction, before any request."""

    def before_step(self, scheduled: list[tuple[Sequence, int]]) -> StepVeto:
        """The step about to run, as (sequence, tokens) pairs."""
        return StepVeto()

    def after_step(self) -> None:
        """After a step's outputs are committed: requests that finished or were preempted in it are out of
        `engine.requests` (or, preempted, back at num_computed_tokens 0)."""

    def on_abort(self) -> None:
        """A request was aborted between steps."""

    def on_failure(self, exc: BaseException) -> None:
        """The step raised; the engine now reruns its sequences one by one so that one that fails fails alone."""

    def health(self) -> dict[str, Any] | None:
        """What `/health` shows under `name`: `{"status": "ok", ...}`, or another status, which makes the server
        report itself degraded; None: nothing to show."""
        return None

    def shutdown(self) -> None:
        """The server is stopping."""
