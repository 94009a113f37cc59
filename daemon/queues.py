"""A bounded request queue served round-robin by client identity.

The IO thread puts each decoded request under its client's identity (the ROUTER envelope);
the engine takes them one client at a time in turn, so one client pipelining thousands of
questions cannot make another client's ``ping`` wait behind all of them. The queue is bounded
in total and per client: :meth:`FairQueue.put` refuses (returns ``False``) instead of growing,
and the caller answers the request with ``busy`` at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-client FIFOs, round-robin between clients; thread-safe.

    Args:
        max_total: most items held over all clients.
        max_per_client: most items held for one client.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        if max_total < 1 or max_per_client < 1:
            raise ValueError("queue bounds must be >= 1")
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._cond = threading.Condition()
        # Clients in turn order: the next get() serves the first one, then moves it last.
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._size = 0

    def put(self, client: Hashable, item: T) -> bool:
        """Queue ``item`` for ``client``; ``False`` (nothing queued) when a bound is reached."""
        with self._cond:
            pending = self._queues.get(client)
            if self._size >= self.max_total or (
                pending is not None and len(pending) >= self.max_per_client
            ):
                return False
            if pending is None:
                pending = self._queues[client] = deque()
            pending.append(item)
            self._size += 1
            self._cond.notify()
            return True

    def _pop(self) -> T:
        client, pending = next(iter(self._queues.items()))
        item = pending.popleft()
        self._size -= 1
        if pending:
            self._queues.move_to_end(client)
        else:
            del self._queues[client]
        return item

    def get(self, timeout: float = 0.0) -> T | None:
        """The next item in round-robin order, waiting up to ``timeout`` s; ``None`` if none."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._size:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._pop()

    def drain(self) -> list[T]:
        """Take everything (round-robin order)."""
        with self._cond:
            items = []
            while self._size:
                items.append(self._pop())
            return items

    def empty(self) -> bool:
        with self._cond:
            return self._size == 0

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def clients(self) -> int:
        with self._cond:
            return len(self._queues)
