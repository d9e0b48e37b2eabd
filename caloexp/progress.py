"""Training progress for people: a tqdm bar on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import logging
import sys
import time
from typing import Mapping

log = logging.getLogger("caloexp.train")


class Progress:
    """Step, epoch, main losses, events/s and ETA; a log line every ``every_s`` seconds without a TTY."""

    def __init__(self, total: int | None, start: int = 0, enabled: bool = True, every_s: float = 30.0):
        self.enabled, self.total, self.every_s = enabled, total, every_s
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self._last = time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.step = start

    @staticmethod
    def _short(values: Mapping[str, float]) -> dict[str, str]:
        keep = {k: v for k, v in values.items() if k.startswith("loss/") or k in ("perf/events_per_s", "epoch")}
        return {k.split("/")[-1]: (f"{v:.3g}" if k != "epoch" else str(int(v))) for k, v in keep.items()}

    def update(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix(self._short(values), refresh=False)
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            rate = values.get("perf/events_per_s")
            total = f"/{self.total}" if self.total else ""
            log.info("step %d%s, epoch %d: %s", step, total, epoch,
                     ", ".join(f"{k} {v}" for k, v in self._short(values).items()) +
                     (f" ({rate:.0f} events/s)" if rate else ""))
        self.step = step

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
