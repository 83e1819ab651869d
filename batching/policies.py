"""Scheduling policies as small swappable classes (STYLE.md rule 9).

The scheduler asks an ``AdmissionPolicy`` which waiting request to admit
next and where a preempted one goes back, and a ``PreemptionPolicy`` which
running request gives its blocks up when the pool is full. tokenstep's
defaults are DESIGN.md's: first come, first served, with preempted requests
back at the head of the queue (their clients see delay, never reordering);
and preempt the most recently admitted request (it has the least work to
recompute). ``SchedulerConfig`` names them by key in the mappings below.
"""

from collections import deque
from typing import Protocol

from batching.request import Request


class AdmissionPolicy(Protocol):
    def next_to_admit(self, waiting: deque[Request]) -> Request: ...

    def requeue_preempted(self, waiting: deque[Request], request: Request) -> None: ...


class PreemptionPolicy(Protocol):
    def choose_victim(self, candidates: list[Request]) -> Request:
        """``candidates``: the running requests this step has not scheduled
        yet, in admission order, the one asking for blocks first (choosing it
        preempts the asker itself)."""
        ...


class FirstComeFirstServed:
    """Admit in arrival order; a preempted request is first in line again."""

    def next_to_admit(self, waiting: deque[Request]) -> Request:
        return waiting[0]

    def requeue_preempted(self, waiting: deque[Request], request: Request) -> None:
        waiting.appendleft(request)


class PreemptNewest:
    """The most recently admitted running request (``running`` is in admission order)."""

    def choose_victim(self, candidates: list[Request]) -> Request:
        return candidates[-1]


ADMISSION_POLICIES: dict[str, type[AdmissionPolicy]] = {"fcfs": FirstComeFirstServed}
PREEMPTION_POLICIES: dict[str, type[PreemptionPolicy]] = {"newest": PreemptNewest}
