"""The stream's error policy: count skipped samples by reason, log at a limited rate, stop on a run.

Bad data (a corrupt shard, a missing member, a bad record, an undecodable image) is skipped and
counted; ``max_consecutive`` failures in a row mean a bug or an unreadable dataset, and raise.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

log = logging.getLogger(__name__)


class ErrorPolicy:
    """Counts skipped samples by reason, logs at a limited rate, and stops on a run of failures.

    The counters are plain ``Counter`` keys: ``error/<reason>``, ``repeat/<why>`` and
    ``augment/flip_refused``; they travel to the main process with each batch.
    """

    def __init__(self, log_interval_s: float, max_consecutive: int, where: str = ""):
        self.counts: Counter = Counter()
        self.log_interval_s = log_interval_s
        self.max_consecutive = max_consecutive
        self.where = where
        self._consecutive = 0
        self._last_log: dict[str, float] = {}
        self._unlogged: Counter = Counter()
        self._mark: Counter = Counter()

    def error(self, reason: str, exn: BaseException) -> None:
        """Count and maybe log one failure; raise when too many fail in a row."""
        self.counts[f"error/{reason}"] += 1
        self._consecutive += 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) >= self.log_interval_s:
            log.warning(
                "%sskipped (%s, %d so far, %d not logged): %s",
                self.where,
                reason,
                self.counts[f"error/{reason}"],
                self._unlogged[reason],
                exn,
            )
            self._last_log[reason] = now
            self._unlogged[reason] = 0
        else:
            self._unlogged[reason] += 1
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.where}{self._consecutive} samples failed in a row (last: {reason}: {exn}); "
                "this is a bug or an unreadable dataset, not a few bad samples"
            ) from exn

    def success(self) -> None:
        """A sample made it through: the run of failures is over."""
        self._consecutive = 0

    def mark(self) -> None:
        """Start counting afresh for ``since_mark`` (after each batch: a batch carries its own counts)."""
        self._mark = self.counts.copy()

    def since_mark(self) -> dict[str, int]:
        """Counts since ``mark``."""
        return dict(self.counts - self._mark)

    def note(self, key: str, n: int = 1) -> None:
        """Count an event that is not an error (a repeated sample, a refused flip)."""
        self.counts[key] += n
