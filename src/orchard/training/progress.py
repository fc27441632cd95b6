"""Progress of a training run: a live bar on a terminal, periodic lines in a log file.

Either way the user sees the step, the loss, tokens per second and the time left; the estimate
follows whichever limit (steps, tokens, time) will end the run first.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    def __init__(self, enabled: bool, initial_step: int, total_steps: int | None, log_interval: float = 30.0):
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.log_interval = log_interval
        self.last_line = time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.bar = tqdm(total=total_steps or 100, initial=initial_step, disable=not self.interactive,
                        unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, fraction_done: float, elapsed: float, loss: float, tokens_per_second: float | None):
        """After each step: `fraction_done` of the run (0..1) after `elapsed` seconds."""
        if not self.enabled:
            return
        self.postfix["loss"] = f"{loss:.3f}"
        if tokens_per_second is not None:
            self.postfix["tok/s"] = f"{tokens_per_second:,.0f}"
        if self.interactive:
            if fraction_done > 0:
                self.bar.total = max(step, round(step / fraction_done))
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif time.perf_counter() - self.last_line >= self.log_interval:
            self.last_line = time.perf_counter()
            eta = elapsed * (1 - fraction_done) / fraction_done if fraction_done > 0 else 0.0
            fields = " ".join(f"{k} {v}" for k, v in self.postfix.items())
            print(f"step {step} ({fraction_done:.0%}) {fields} elapsed {_duration(elapsed)} eta {_duration(eta)}",
                  file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
