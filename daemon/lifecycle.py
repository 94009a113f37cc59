"""The daemon's lifecycle as a small state machine.

``starting -> loading -> serving -> draining -> stopped``; a failure while loading goes to
``draining`` (or straight to ``stopped`` before anything was opened). Any other transition is a
bug and raises. The history is kept for ``status`` and tests.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum

log = logging.getLogger(__name__)


class State(str, Enum):
    STARTING = "starting"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.LOADING, State.STOPPED}),
    State.LOADING: frozenset({State.SERVING, State.DRAINING}),
    State.SERVING: frozenset({State.DRAINING}),
    State.DRAINING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}


class Lifecycle:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = State.STARTING
        self.history: list[tuple[State, float]] = [(State.STARTING, time.time())]

    def to(self, new: State) -> None:
        with self._lock:
            if new not in ALLOWED[self.state]:
                raise RuntimeError(
                    f"illegal lifecycle transition {self.state.value} -> {new.value}"
                )
            log.info("lifecycle: %s -> %s", self.state.value, new.value)
            self.state = new
            self.history.append((new, time.time()))

    @property
    def accepting(self) -> bool:
        return self.state is State.SERVING
