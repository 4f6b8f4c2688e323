"""A time budget (`training.time_budget`): a run's plan of epochs laid over minutes of wall clock.

A config plans in epochs: `training.epochs` (warmup and progressive-resizing stages inside them), then
`training.fine_tune.epochs`. Under a budget those counts become shares of the time, so the same config is right for
2 or 10 minutes on a slow or a fast machine. An epoch at a smaller network input costs about its share of pixels,
so a stage's share of the time is its epochs times its pixels (relative to the full size). At any moment the time
spent says how far along the plan the run is, its *position* in nominal epochs; the learning rate is the schedule's
value there, a stage ends at the first epoch end past its share, and the run stops after the batch that spends the
budget (that last epoch is shorter, and is validated and saved like any other).

Example:

    >>> plan = BudgetPlan([(6, 0.5), (10, 1.0)])   # 6 epochs at half the pixels, then 4 at full size
    >>> plan.position(0.5)                         # half the time: the 3 + 4 units of cost, halved
    5.0
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import keras

from cnnlab.modeling import model_input_size


class BudgetPlan:
    """Maps a fraction of the budget spent to a position in the plan, in nominal epochs.

    Args:
        segments: `(end, weight)` per stage, in order: the nominal epoch at which the stage ends (counted from the
            start of the run) and the cost of one of its epochs relative to an epoch at the full size.
    """

    def __init__(self, segments: list[tuple[float, float]]):
        self.segments = []
        start = 0.0
        for end, weight in segments:
            if end > start:
                self.segments.append((start, float(end), float(weight)))
                start = float(end)
        self.total_cost = sum((end - start) * weight for start, end, weight in self.segments)

    @property
    def end(self) -> float:
        return self.segments[-1][1] if self.segments else 0.0

    def position(self, fraction: float) -> float:
        """The nominal epoch reached when `fraction` of the budget is spent (0 at the start, `end` at 1 or later)."""
        cost = min(max(fraction, 0.0), 1.0) * self.total_cost
        for start, end, weight in self.segments:
            if cost <= (end - start) * weight:
                return start + cost / weight
            cost -= (end - start) * weight
        return self.end


def plan_for(phases: list[dict], full_size: tuple[int, int], size_of: Callable) -> BudgetPlan:
    """The budget plan of a run's phases (see `cnnlab.training.training_phases`): each phase's cost per epoch is its
    network input's pixels over the full size's (`size_of(phase)` gives its (height, width))."""
    full = full_size[0] * full_size[1]
    return BudgetPlan([(phase["end"], size_of(phase)[0] * size_of(phase)[1] / full) for phase in phases])


class TimeBudget(keras.callbacks.Callback):
    """Drives one phase of a budgeted run: sets the learning rate before every batch from the time spent, ends the
    phase at the first epoch end past its share, and stops the run after the batch that spends the budget.

    The clock is read once as training starts, after every batch and at every epoch end, on every worker alike (so a
    clock agreed between workers, `Distribution.agreed_clock`, costs one exchange a batch); a batch's learning rate
    comes from the reading after the batch before it.

    Args:
        plan: the run's `BudgetPlan`.
        budget_s: the budget, in seconds.
        clock: seconds of training so far (the run's own clock, which runs on across phases and resumes).
        schedule: the phase's learning-rate schedule over optimizer steps (a Keras schedule or a number).
        schedule_start: the nominal epoch at which the phase's schedule starts (0, or where fine-tuning starts).
        steps_per_epoch: optimizer steps in one nominal epoch.
        phase_end: the nominal epoch at which this phase (or progressive stage) ends.
    """

    def __init__(self, plan: BudgetPlan, budget_s: float, clock: Callable[[], float], schedule,
                 schedule_start: float, steps_per_epoch: int, phase_end: float):
        super().__init__()
        self.plan, self.budget_s, self.clock = plan, budget_s, clock
        self.schedule, self.schedule_start = schedule, schedule_start
        self.steps_per_epoch, self.phase_end = steps_per_epoch, phase_end
        self.spent = False
        self.now = 0.0  # the latest reading of the clock

    def position(self) -> float:
        return self.plan.position(self.now / self.budget_s)

    def learning_rate(self) -> float:
        if not callable(self.schedule):
            return float(self.schedule)
        step = max(self.position() - self.schedule_start, 0.0) * self.steps_per_epoch
        return float(self.schedule(step))

    def on_train_begin(self, logs=None):
        self.now = self.clock()

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.learning_rate()

    def on_train_batch_end(self, batch, logs=None):
        self.now = self.clock()
        if self.now >= self.budget_s:
            self.spent = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.now = self.clock()
        if self.position() >= self.phase_end:
            self.model.stop_training = True


class EpochLine(keras.callbacks.Callback):
    """One line per epoch for a budgeted run, whose epoch count is not known in advance (Keras's own progress line
    would say "Epoch 7/<cap>"): the epoch, the minutes spent of the budget, the learning rate and the metrics."""

    def __init__(self, budget_s: float, clock: Callable[[], float]):
        super().__init__()
        self.budget_s, self.clock = budget_s, clock
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics = " - ".join(f"{k}: {v:.4f}" for k, v in (logs or {}).items() if k != "learning_rate")
        print(f"Epoch {epoch + 1} ({self.clock() / 60:.1f} of {self.budget_s / 60:g} min, lr {lr:.2e}, "
              f"{time.perf_counter() - self._start:.0f}s): {metrics}", file=sys.stdout, flush=True)


def epochs_held(plan: BudgetPlan, budget_s: float, epoch_s: float, scale: float = 1.0) -> float:
    """How many of the plan's nominal epochs `budget_s` holds when an epoch at the full size takes `epoch_s` and
    every network input is `scale` times the full size along each side (an epoch costs its pixels)."""
    return plan.end * budget_s / (plan.total_cost * epoch_s * scale ** 2)


def pick_size(own: int, sizes: list[int], min_epochs: float, held: Callable[[float], float]) -> int:
    """The network input height to train at under a budget (`training.downsize`): the config's own height when the
    budget holds `min_epochs` of the plan there, else the largest of `sizes` at which it does, else the smallest.

    Args:
        own: the config's own network input height (augment.crop, else data.image_size).
        sizes: smaller heights to fall back to.
        min_epochs: the fewest nominal epochs of the plan worth training at a size.
        held: the epochs the budget holds at a scale (a height over `own`), e.g. from `epochs_held`.

    Example:

        >>> pick_size(144, [96, 112, 128], 24, lambda scale: 20 / scale ** 2)   # 20 epochs at 144, 31.9 at 112
        112
    """
    for height in sorted({own, *sizes}, reverse=True):
        if held(height / own) >= min_epochs:
            return height
    return min(sizes)


def fallback_sizes(cfg: dict) -> list[int]:
    """The sizes of `training.downsize` a budgeted run may fall back to: those below the config's own network input
    height (a config whose crop was made smaller with --set has fewer), smallest first; [] without a budget."""
    if not cfg["training"]["time_budget"]:
        return []
    return sorted(h for h in set(cfg["training"]["downsize"]["sizes"]) if h < model_input_size(cfg)[0])


def downsized(cfg: dict, height: int) -> dict:
    """The config trained at network input `height` instead of its own: data.image_size, augment.crop and the
    progressive stages all shrink by the same factor (so crops show the same view), widths in proportion, and
    `training.downsize` is spent (its sizes emptied), so that a resumed run keeps the size this one chose."""
    from cnnlab.config import as_size

    crop = cfg["augment"]["crop"]
    factor = height / model_input_size(cfg)[0]

    def scaled(size):
        h, w = as_size(size)
        return [round(h * factor), round(w * factor)]

    training = cfg["training"]
    return {
        **cfg,
        "data": {**cfg["data"], "image_size": scaled(cfg["data"]["image_size"])},
        "augment": {**cfg["augment"], "crop": scaled(crop) if crop is not None else None},
        "training": {**training, "downsize": {**training["downsize"], "sizes": []},
                     "progressive": {**training["progressive"],
                                     "sizes": [scaled(size) for size in training["progressive"]["sizes"]]}},
    }
