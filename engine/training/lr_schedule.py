"""The learning-rate multiplier per optimizer step, with a warmup that restarts when the optimizer is reset.

`LRFactor(step)`: a linear warmup over `warmup_steps`, then constant, linear or cosine decay over the run down
to `min_ratio` of the peak. `restart(step)` begins a new warmup at `step`: a freshly reset Adam divides its
first updates by second-moment estimates made from one or two gradients, so every parameter moves by about the
full learning rate at once; the warmup spreads that jolt out. (The original CoCoNuT rebuilds its optimizer
every epoch, at lr 1e-4 and without warmup.)

It is a callable object, not a closure, so that `torch.optim.lr_scheduler.LambdaLR` saves its attributes with
the scheduler state: an exact resume restores the last restart too.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


class LRFactor:
    def __init__(self, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)
        self.restart_step = 0

    def restart(self, step: int) -> None:
        """Warm up again from `step` (the decay keeps following the whole run)."""
        self.restart_step = int(step)

    def decay(self, step: int) -> float:
        if self.schedule == "constant" or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))
        if self.schedule == "linear":
            return self.min_ratio + (1 - self.min_ratio) * (1 - progress)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        since = step - self.restart_step
        warm = (since + 1) / self.warmup_steps if self.warmup_steps and 0 <= since < self.warmup_steps else 1.0
        return warm * self.decay(step)


def restart_warmup(scheduler) -> int:
    """Restart the warmup of every `LRFactor` of a LambdaLR at its current step and apply the new rate now (the
    rate of the next optimizer step was computed before the restart). Returns the step."""
    step = scheduler.last_epoch
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        if isinstance(factor, LRFactor):
            factor.restart(step)
            group["lr"] = base * factor(step)
    return step
