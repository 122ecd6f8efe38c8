"""Dealing work out evenly: the one rule behind balancing prompts over rollout replicas, samples
over learner ranks, and micro-batches over ranks.

Items come costliest first and are dealt in snake order (0, 1, ..., h-1, h-1, ..., 1, 0, 0, 1, ...):
counts differ by at most one, and each lap's cheapest item goes to the hand whose last one was
costliest, so loads stay close without a search."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def snake_deal(items: list[T], hands: int) -> list[list[T]]:
    """``items`` (costliest first) dealt to ``hands`` hands in snake order; each hand keeps the dealing order."""
    dealt: list[list[T]] = [[] for _ in range(hands)]
    for position, item in enumerate(items):
        lap, offset = divmod(position, hands)
        dealt[offset if lap % 2 == 0 else hands - 1 - offset].append(item)
    return dealt
