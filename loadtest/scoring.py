"""Scoring a response against a sample's answers: deterministic, as RULER and the passkey test score."""

from __future__ import annotations

import re


def score(task: str, answers: list[str], output: str) -> bool:
    if task == "passkey":  # the first integer in the output is the key
        m = re.search(r"\d+", output)
        return m is not None and m.group() == answers[0]
    return all(a.lower() in output.lower() for a in answers)  # string_match_all
