"""Checking a recorded history of fenced increments, like a linearizability checker for one register.

Every writer logs, per attempt, the token it read and either the token its
write produced (accepted) or nothing (refused).  Because each accepted write
stores ``round + 1`` of the state it read, the accepted writes of a correct
backend form one chain: values ``v0+1 .. v0+N`` each exactly once, each one
read over the token the previous one wrote.  Anything else is a violation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from tests.reliability.recorder import WriteFigures

__all__ = ["Event", "HistoryCheck", "check_history"]


@dataclass(frozen=True)
class Event:
    outcome: str  # accepted | refused | error
    read: Optional[str]  # token read (format_token form)
    written: Optional[str]  # token the accepted write produced
    value: Any  # accepted: round written; refused: round read; error: the error's name

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "Event":
        return cls(*row)


@dataclass
class HistoryCheck:
    figures: WriteFigures
    violations: List[str] = field(default_factory=list)

    def text(self) -> str:
        f = self.figures
        return (f"attempted={f.attempted} accepted={f.accepted} refused={f.refused} errors={f.errors} "
                f"lost={f.lost} stale-accepted={f.stale_accepted}")


def check_history(events: Sequence[Event], initial_token: str, initial_value: int, final_token: str,
                  final_value: int, strict: bool) -> HistoryCheck:
    """Check ``events`` against the register's initial and final (token, value)."""
    accepted = [e for e in events if e.outcome == "accepted"]
    refused = [e for e in events if e.outcome == "refused"]
    errors = [e for e in events if e.outcome == "error"]
    figures = WriteFigures(attempted=len(events), accepted=len(accepted), refused=len(refused), errors=len(errors))
    check = HistoryCheck(figures)
    bad = check.violations

    # Every accepted increment is in the final count, and nothing else is.
    figures.lost = max(0, len(accepted) - (final_value - initial_value))
    if final_value - initial_value != len(accepted):
        bad.append(f"final round {final_value} - initial {initial_value} != {len(accepted)} accepted writes")

    by_value: Dict[int, Event] = {}
    for event in accepted:
        if event.value in by_value:
            figures.stale_accepted += 1
            bad.append(f"two writes of round {event.value} were accepted (one over a stale token)")
        by_value[event.value] = event
    expected = set(range(initial_value + 1, initial_value + len(accepted) + 1))
    if set(by_value) != expected:
        bad.append(f"accepted rounds are not {initial_value + 1}..{initial_value + len(accepted)}")

    # The chain: each accepted write was read over the token the previous one produced.
    def token_of(value: int) -> Optional[str]:
        if value == initial_value:
            return initial_token
        event = by_value.get(value)
        return None if event is None else event.written

    for value, event in sorted(by_value.items()):
        if event.read != token_of(value - 1):
            figures.stale_accepted += 1
            bad.append(f"round {value} was accepted over token {event.read}, not the current {token_of(value - 1)}")
    last = initial_value + len(accepted)
    if token_of(last) != final_token:
        bad.append(f"the final token {final_token} is not the one the last accepted write produced")

    # Tokens: strict backends never hand out a token twice; c10d's tokens are values (distinct rounds).
    written = [e.written for e in accepted] + [initial_token]
    if len(set(written)) != len(written):
        bad.append("an accepted write produced a token seen before" + ("" if strict else " (value tokens)"))

    # No false refusals: a refused write read a state that some accepted write superseded.
    for event in refused:
        successor = by_value.get(event.value + 1)
        if successor is None or successor.read != event.read:
            bad.append(f"a write over round {event.value} (token {event.read}) was refused, "
                       "but no accepted write superseded that token")
            break
    return check
