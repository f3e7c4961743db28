"""Settings found on the data: the learning rate from a few short trials, and ``training.tune``
(an Optuna search over lr, temperature, alpha and weight decay with poor trials pruned).

Both train through a :data:`TrialFn` the pipeline gives (its own student, method and trainer),
so a trial is exactly a short job, and both score a trial on the validation split with the
trainer's monitored metric (validation accuracy when there are labels). What they find is
written into the spec as chosen values (:func:`with_values`), auto epochs are cut to the time
left at the measured speed (:func:`fit_time`), and :class:`Found` reports it all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import recipe
from core.distill.trainer import TrainResult
from core.distill.types import Event, ProgressFn, StopFn
from core.errors import Cancelled, TrainingDiverged
from core.spec import AutoFloat, AutoInt, JobSpec, TrainingSpec

# lr trials: a log grid around Adam's usual range, each a short run of the job's own schedule.
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
LR_LIMITS = (1e-5, 0.3)  # how far the grid may be extended
MAX_EXTENSIONS = 2
TRIAL_SHARE, MIN_TRIAL_STEPS, MAX_TRIAL_STEPS, MAX_TRIAL_SHARE = 0.15, 100, 400, 0.25

# training.tune's search space (log scales for lr and weight decay).
LR_RANGE = (1e-4, 1e-1)
TEMPERATURE_RANGE = (1.0, 8.0)
ALPHA_RANGE = (0.1, 1.0)
WEIGHT_DECAY_RANGE = (1e-6, 1e-1)

# A trial: training settings and method overrides (temperature, alpha) → its trained result.
TrialFn = Callable[[TrainingSpec, dict[str, float], ProgressFn | None, StopFn], TrainResult]


@dataclass
class Trial:
    """One trial as the result reports it."""

    number: int
    params: dict[str, float]
    value: float | None
    state: str  # complete | pruned | failed
    epochs: int = 0  # epochs run
    best_epoch: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "params": {k: _round(v) for k, v in self.params.items()},
            "value": None if self.value is None else _round(self.value),
            "state": self.state,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class SearchResult:
    """The chosen values, every trial, and the best trial's trained model (tune only)."""

    params: dict[str, float]
    metric: str
    maximize: bool
    trials: list[Trial] = field(default_factory=list)
    best: TrainResult | None = None
    seconds_per_step: float | None = None  # measured, to fit the job in max_minutes


def trial_steps(total_steps: int) -> int:
    """Steps of one lr trial: 15% of the job's (100 to 400), and never above a quarter of them,
    so that a short job's search stays short too."""
    steps = max(MIN_TRIAL_STEPS, min(MAX_TRIAL_STEPS, round(TRIAL_SHARE * total_steps)))
    return min(steps, round(MAX_TRIAL_SHARE * total_steps))


def find_lr(
    run_trial: TrialFn,
    training: TrainingSpec,
    steps_per_epoch: int,
    *,
    log: Callable[[str], None],
    should_stop: StopFn,
) -> SearchResult:
    """The learning rate whose short run (the job's schedule, squeezed) scores best on the
    validation split: LR_GRID, extended by factors of 3 while its largest or smallest value
    wins; ties go to the lower validation loss."""
    full = int(training.epochs)
    epochs = max(1, min(full, round(trial_steps(steps_per_epoch * full) / steps_per_epoch)))
    short = training.model_copy(
        update={
            "epochs": epochs,
            "warmup_epochs": float(training.warmup_epochs) * epochs / full,
            "early_stopping_patience": None,
        }
    )
    log(f"finding the learning rate: short trials of {epochs} epochs, from {LR_GRID}")
    trials: list[Trial] = []
    scores: dict[float, tuple[float, float]] = {}  # lr → (score, -val_loss): higher is better
    steps = seconds = 0.0
    metric = "val_loss"
    todo = list(LR_GRID)
    while todo:
        lr = todo.pop(0)
        started = time.monotonic()
        try:
            result = run_trial(short.model_copy(update={"lr": lr}), {}, None, should_stop)
        except TrainingDiverged:
            elapsed = time.monotonic() - started
            trials.append(Trial(len(trials), {"lr": lr}, None, "failed", seconds=elapsed))
            log(f"lr {lr:g}: the loss diverged")
            continue
        elapsed = time.monotonic() - started
        steps += result.epochs_run * steps_per_epoch
        seconds += elapsed
        metric, value = result.metric, result.best_metric
        best_row = result.history[result.best_epoch - 1] if result.best_epoch else {}
        loss = float(best_row.get("val_loss", math.inf))
        trials.append(
            Trial(
                len(trials),
                {"lr": lr},
                value,
                "complete",
                result.epochs_run,
                result.best_epoch,
                elapsed,
            )
        )
        log(f"lr {lr:g}: {metric} {_fmt(value)} (val_loss {loss:.4g})")
        if value is not None and math.isfinite(value):
            scores[lr] = (
                value if _maximize(metric) else -value,
                -loss if math.isfinite(loss) else -math.inf,
            )
        if not todo and scores and len(trials) < len(LR_GRID) + MAX_EXTENSIONS:
            best = max(scores, key=scores.__getitem__)
            if best == max(scores) and best * 3 <= LR_LIMITS[1]:
                todo.append(float(f"{best * 3:.3g}"))
            elif best == min(scores) and best / 3 >= LR_LIMITS[0]:
                todo.append(float(f"{best / 3:.3g}"))
    lr = max(scores, key=scores.__getitem__) if scores else LR_GRID[0]
    log(f"learning rate chosen: {lr:g}")
    return SearchResult(
        {"lr": lr}, metric, _maximize(metric), trials, seconds_per_step=seconds / max(steps, 1.0)
    )


def tune(
    run_trial: TrialFn,
    training: TrainingSpec,
    searched: dict[str, bool],
    *,
    metric: str,
    log: Callable[[str], None],
    should_stop: StopFn,
    budget_seconds: float | None,
) -> SearchResult:
    """An Optuna study (TPE sampler seeded by the job, median pruning per epoch) over the
    settings marked True in ``searched`` (lr, weight_decay, temperature, alpha)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = training.tune
    assert spec is not None
    n_trials = spec.trials
    warmup = max(1, int(training.epochs) // 5)
    study = optuna.create_study(
        direction="maximize",  # values are signed so that higher is better
        sampler=optuna.samplers.TPESampler(seed=training.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
    )
    maximize = _maximize(metric)
    trials: list[Trial] = []
    best: dict[str, Any] = {}
    started = time.monotonic()

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, searched)
        overrides = {k: v for k, v in params.items() if k in ("temperature", "alpha")}
        settings = training.model_copy(
            update={k: v for k, v in params.items() if k in ("lr", "weight_decay")}
        )
        pruned = {"now": False}

        def progress(event: Event) -> None:
            value = event.data.get(metric)
            if event.type != "metrics" or value is None:
                return
            signed = float(value) if maximize else -float(value)
            trial.report(signed, int(event.data["epoch"]))
            if trial.should_prune():
                pruned["now"] = True

        def stop() -> bool:
            if should_stop():
                raise Cancelled("the job was cancelled")
            return pruned["now"]

        t0 = time.monotonic()
        try:
            result = run_trial(settings, overrides, progress, stop)
        except TrainingDiverged:
            trials.append(
                Trial(trial.number, params, None, "failed", seconds=time.monotonic() - t0)
            )
            log(f"trial {trial.number}: {_describe(params)}: the loss diverged")
            return -math.inf
        except Cancelled:
            if not pruned["now"] or should_stop():
                raise
            elapsed = time.monotonic() - t0
            trials.append(Trial(trial.number, params, None, "pruned", seconds=elapsed))
            log(f"trial {trial.number}: {_describe(params)} pruned")
            raise optuna.TrialPruned() from None
        value = result.best_metric
        entry = Trial(
            trial.number, params, value, "complete", result.epochs_run, result.best_epoch,
            time.monotonic() - t0,
        )  # fmt: skip
        trials.append(entry)
        log(f"trial {trial.number}: {_describe(params)} → {result.metric} {_fmt(value)}")
        if value is None or not math.isfinite(value):
            return -math.inf
        signed = value if maximize else -value
        if not best or signed > best["signed"]:
            best.update(signed=signed, result=result, params=params)
        return signed

    log(f"tuning: up to {n_trials} trials over {', '.join(k for k, v in searched.items() if v)}")
    study.optimize(objective, n_trials=n_trials, timeout=budget_seconds)
    if not best:
        raise TrainingDiverged(
            "no tuning trial finished with a finite validation metric; pin training.lr lower "
            "or remove training.tune"
        )
    log(
        f"tuning: best of {len(trials)} trials in {time.monotonic() - started:.0f} s: "
        f"{_describe(best['params'])}"
    )
    return SearchResult(best["params"], metric, maximize, trials, best["result"])


def _suggest(trial: Any, searched: dict[str, bool]) -> dict[str, float]:
    params: dict[str, float] = {}
    if searched.get("lr"):
        params["lr"] = trial.suggest_float("lr", *LR_RANGE, log=True)
    if searched.get("weight_decay"):
        params["weight_decay"] = trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True)
    if searched.get("temperature"):
        params["temperature"] = trial.suggest_float("temperature", *TEMPERATURE_RANGE)
    if searched.get("alpha"):
        params["alpha"] = trial.suggest_float("alpha", *ALPHA_RANGE)
    return params


def _maximize(metric: str) -> bool:
    return metric in ("val_accuracy", "val_agreement")


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _describe(params: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in params.items())


# --- writing what was found into the spec ------------------------------------------------------


@dataclass
class Found:
    """What was found on the data before the real training: the lr trials or the tune study."""

    lr_search: SearchResult | None = None
    tune: SearchResult | None = None  # its ``best`` is the first stage's student
    notes: list[str] = field(default_factory=list)

    def report(self, completed: dict[str, Any]) -> dict[str, Any]:
        """The result's ``spec`` (the completed spec as it ran), ``recipe`` (every value chosen
        automatically, by dotted field, and the lr trials) and ``tune`` blocks."""
        block: dict[str, Any] = {"chosen": chosen_values(completed)}
        if self.lr_search is not None:
            block["lr_trials"] = [t.as_dict() for t in self.lr_search.trials]
            block["metric"] = self.lr_search.metric
        if self.notes:
            block["notes"] = list(self.notes)
        out: dict[str, Any] = {"spec": completed, "recipe": block}
        if self.tune is not None and self.tune.best is not None:
            best = self.tune.best
            out["tune"] = {
                "metric": self.tune.metric,
                "trials": [t.as_dict() for t in self.tune.trials],
                "best": {
                    "params": {k: _round(v) for k, v in self.tune.params.items()},
                    "value": best.best_metric,
                    "best_epoch": best.best_epoch,
                },
            }
        return out


def chosen_values(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every ``{"auto": value}`` of a spec dump, keyed by its dotted field."""
    found: dict[str, Any] = {}
    if isinstance(node, dict):
        if set(node) == {"auto"}:
            return {prefix: node["auto"]}
        for key, value in node.items():
            found.update(chosen_values(value, f"{prefix}.{key}" if prefix else key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(chosen_values(value, f"{prefix}.{i}"))
    return found


def with_values(spec: JobSpec, values: dict[str, float]) -> JobSpec:
    """The spec with found training values (lr, weight_decay) and method values (temperature,
    alpha) written in as chosen ones."""
    training = {k: AutoFloat(v) for k, v in values.items() if k in ("lr", "weight_decay")}
    method = {k: AutoFloat(v) for k, v in values.items() if k in ("temperature", "alpha")}
    update: dict[str, Any] = {"training": spec.training.model_copy(update=training)}
    if method and spec.distillation is not None:
        update["distillation"] = spec.distillation.model_copy(update=method)
    return spec.model_copy(update=update)


def fit_time(
    spec: JobSpec,
    found: Found,
    steps_per_epoch: int,
    seconds_left: float,
    log: Callable[[str], None],
) -> JobSpec:
    """Auto epochs cut so that the planned training (``steps_per_epoch`` summed over every run:
    stages and baseline), at the speed the lr trials measured, fits ``seconds_left``."""
    training = spec.training
    rate = found.lr_search.seconds_per_step if found.lr_search is not None else None
    if not isinstance(training.epochs, AutoInt) or not rate:
        return spec
    fits = max(1, int(seconds_left / (rate * steps_per_epoch)))
    if fits >= training.epochs:
        return spec
    update: dict[str, Any] = {"epochs": AutoInt(fits)}
    if isinstance(training.warmup_epochs, AutoFloat):
        warmup = training.warmup_epochs * fits / training.epochs
        update["warmup_epochs"] = AutoFloat(round(warmup, 3))
    if isinstance(training.early_stopping_patience, AutoInt):
        update["early_stopping_patience"] = AutoInt(recipe.patience(fits))
    note = (
        f"epochs cut from {int(training.epochs)} to {fits} to fit training.max_minutes "
        f"({training.max_minutes:g}) at the measured {rate * 1000:.2f} ms per step"
    )
    found.notes.append(note)
    log(note)
    return spec.model_copy(update={"training": training.model_copy(update=update)})
