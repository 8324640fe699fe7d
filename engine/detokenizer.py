"""Incremental detokenization with stop strings.

Text is decoded from a sliding window of tokens (`prefix_offset`..), so each step costs O(window), and
a token that ends mid-character (a partial UTF-8 sequence decodes to U+FFFD) waits for the next one.
While stop strings are set, the last `max(len(stop)) - 1` characters are held back from the stream so
a stop string is never shown in part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_INITIAL_WINDOW = 5


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    stop: list[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_text: str = ""
    stop_reason: str | None = None  # the stop string that ended generation
    _tokens: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _emitted: int = 0

    def __post_init__(self) -> None:
        # Seed with the prompt's tail so the first output token decodes with its left context (spaces).
        self._tokens = list(self.prompt_token_ids[-_INITIAL_WINDOW:])
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(0, self._read_offset - _INITIAL_WINDOW)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> bool:
        """Append a token; True when a stop string has just ended the text."""
        self._tokens.append(token_id)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return False
        new = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        start = max(0, len(self.output_text) - max((len(s) for s in self.stop), default=0) + 1)
        self.output_text += new
        for s in self.stop:
            pos = self.output_text.find(s, start)
            if pos != -1:
                self.output_text = self.output_text[: pos + (len(s) if self.include_stop_str_in_output else 0)]
                self.stop_reason = s
                return True
        return False

    def take_new_text(self, finished: bool) -> str:
        """Text not streamed yet; while running, keeps back what could still start a stop string."""
        hold = 0 if finished or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(self._emitted, len(self.output_text) - hold)
        new = self.output_text[self._emitted : end]
        self._emitted = end
        return new
