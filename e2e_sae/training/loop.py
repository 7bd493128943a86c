"""The loop around the engine: log / eval / save / signal triggers, for one run or several runs
on one batch stream (`train-cached`), each with its own directory, checkpoints and resume.

SIGINT / SIGTERM do not kill a training run (`StopOnSignal`): the current step finishes, a resume
point is written, and `TrainingInterrupted` ends the run (the CLI exits 128 + signal number:
130 / 143)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from tqdm.auto import tqdm

from e2e_sae.config import Config
from e2e_sae.errors import SignalInterrupt, TrainingInterrupted
from e2e_sae.eval.evaluate import EvalResult
from e2e_sae.interrupts import deliver_later, in_import
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.losses import LossTerm
from e2e_sae.training.curves import plot_training_curves
from e2e_sae.training.distributed import Dist, max_over_ranks
from e2e_sae.training.engine import TrainState, crossed, n_grad_steps
from e2e_sae.training.guard import NumericalError, StepValues
from e2e_sae.training.resume import Checkpointed, resume_points, save_point
from e2e_sae.training.runlog import RunLogger


class LoopTrainer(Checkpointed, Protocol):
    """What the loop drives (`training.trainer.Trainer` is one): an engine step, evaluation with
    the LM, and what a checkpoint saves."""

    loss_terms: list[LossTerm]
    dist: Dist

    @property
    def global_batch(self) -> int: ...

    def train_step(
        self, micro_batches: Iterator[Any], state: TrainState, stats: bool = False
    ) -> StepValues: ...

    def check(self, state: TrainState) -> None: ...

    def run_eval(self, progress: bool = False, desc: str = "eval") -> EvalResult | None: ...


logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One run in the loop: its trainer, counters, directory and metrics log; after the loop, its
    last logged values, last evaluation and (if it stopped on one) its numerical error."""

    trainer: LoopTrainer
    state: TrainState
    run_dir: Path
    log: RunLogger
    on_eval: Callable[[EvalResult], Any] | None = None
    values: dict[str, float] = field(default_factory=dict)
    eval: EvalResult | None = None
    error: NumericalError | None = None
    eval_seconds: float = 0.0
    """Wall time spent in this run's evaluations (left out of the training speed and ETA)."""
    saved_at: int = -1
    """n_samples of the last checkpoint written (a signal on a save step writes it once)."""

    def sync(self) -> bool:
        """Read what the device holds for this run (a host sync): False when the guard found a
        numerical problem in the steps so far (then `error` holds it and the checkpoints of the
        weights that caused it are set aside)."""
        t = self.trainer
        try:
            t.check(self.state)
        except NumericalError as err:
            self.error = set_aside_bad_point(err, self.run_dir, t.global_batch, t.dist)
            return False
        return True

    def save(self, final: bool = False) -> None:
        """A resume point; the newest `keep_last_n_checkpoints` (+ the final one) are kept. Call
        it after a read (`sync`, or the step's values read): the guard's window goes into it."""
        if self.saved_at != self.state.n_samples or final:
            t, keep = self.trainer, self.config.keep_last_n_checkpoints
            keep = keep + (1 if final else 0) if keep is not None else None
            self.log.save_file(save_point(self.run_dir, t, self.state, t.dist, keep))
            self.saved_at = self.state.n_samples

    @property
    def config(self) -> Config:
        return self.trainer.config

    @property
    def n_steps(self) -> int:
        return n_grad_steps(self.config, self.trainer.dist.world_size)

    @property
    def n_samples(self) -> int:
        return self.state.n_samples

    @property
    def active(self) -> bool:
        return self.error is None and self.state.step < self.n_steps

    def final_values(self) -> dict[str, float]:
        """The last step's logged values (loss terms, L0 per SAE, ...) and dead latents now."""
        dead = dead_counts(self.trainer.model, self.config.act_frequency_n_tokens)
        return {"loss": self.values.get("loss", float("nan")), **self.values, **dead}


def run_loop(
    runs: Sequence[Run],
    batches: Iterator[Any],
    n_ctx: int,
    progress: bool = True,
    resume_command: str = "e2e-sae train CONFIG --resume",
) -> None:
    """Step every unfinished run on the same micro-batches until each has taken its steps; a run
    is finished (final checkpoint and evaluation) as soon as it is done. A run that hits a
    numerical error stops (its bad checkpoints set aside); the others go on, and the first such
    error is raised at the end. SIGINT / SIGTERM: every unfinished run saves, then
    `TrainingInterrupted` names how to continue (`resume_command` + the run directory)."""
    d = runs[0].trainer.dist
    accum = runs[0].trainer.config.grad_accum_steps
    bs = runs[0].trainer.global_batch
    active = [r for r in runs if r.active]
    done = min((r.state.step for r in active), default=0)
    bar = tqdm(
        total=max(r.n_steps for r in runs),
        initial=done,
        desc="train",
        unit="step",
        disable=not progress or not d.is_main,
    )
    t0 = time.perf_counter()
    start = {id(r): r.state.n_samples for r in runs}
    rate = TokenRate(now=t0)

    def evals() -> float:
        return sum(r.eval_seconds for r in runs)

    paused = evals()
    stop = StopOnSignal().install()
    try:
        for r in runs:
            if r.error is None and not r.active:  # resumed after its last step: finish it
                finish_run(r, progress, stop)
        while active := [r for r in runs if r.active]:
            micro = [next(batches) for _ in range(accum)]
            for r in active:
                step_run(
                    r, micro, progress, partial(_rate, r, start[id(r)], n_ctx, t0, evals), stop
                )
            if (dt := evals() - paused) > 0:  # speed and ETA are of training, not evaluation
                paused += dt
                pause_bar(bar, dt)
                rate.pause(dt)
            loss = next((r.values["loss"] for r in active if "loss" in r.values), float("nan"))
            speed = format_rate(rate.update(bs * n_ctx))
            bar.set_postfix_str(f"loss={loss:.4g}, {speed}", refresh=False)
            bar.update(1)
            signum = stop.requested(d)  # SIGINT / SIGTERM: save, then stop
            if signum:
                interrupted = [r for r in runs if r.active and r.sync()]
                for r in interrupted:
                    r.save()
                if interrupted:
                    r = interrupted[0]
                    raise stop.interrupted(r.run_dir, r.state.step, signum, resume_command)
        errors = [r.error for r in runs if r.error is not None]
        if stop.signum and not errors:  # came while the last runs were finishing: nothing lost
            done_dirs = ", ".join(str(r.run_dir) for r in runs)
            raise SignalInterrupt(
                stop.signum,
                f"stopped by {signal.Signals(stop.signum).name} after the run finished; its "
                f"files are complete ({done_dirs})",
            )
    finally:
        bar.close()
        stop.restore()
    if errors:
        raise errors[0]


def _rate(r: Run, n0: int, n_ctx: int, t0: float, evals: Callable[[], float]) -> float:
    """Training tokens per second of `r` since the loop started (`n0`: its samples then), not
    counting the `evals()` seconds spent evaluating."""
    elapsed = time.perf_counter() - t0 - evals()
    return (r.state.n_samples - n0) * n_ctx / elapsed if elapsed > 0 else 0.0


def pause_bar(bar: Any, seconds: float) -> None:
    """Leave `seconds` just spent elsewhere (an evaluation, which has its own bar) out of a tqdm
    bar's elapsed time, rate and ETA: as if its clock had stopped for them."""
    if getattr(bar, "disable", True):
        return
    bar.start_t += seconds
    bar.last_print_t += seconds


def step_run(
    r: Run,
    micro: list[Any],
    progress: bool,
    rate: Callable[[], float],
    stop: StopOnSignal | None = None,
) -> None:
    """One optimizer step of `r` on `micro`, then its triggers (log, eval, save, finish);
    `rate()`: the run's tokens per second so far (logged); `stop`: see `finish_run`.

    Only a step with a trigger reads its values (and the guard's verdict) from the device: a
    step without one leaves them there, so a GPU is never made to wait."""
    t, state, cfg = r.trainer, r.state, r.config
    log_due = (state.step + 1) % cfg.log_every_n_grad_steps == 0 or state.step == 0
    last = state.step + 1 == r.n_steps
    bs, every, save_every = t.global_batch, cfg.eval_every_n_samples, cfg.save_every_n_samples
    eval_due = bool(every) and crossed(state.n_samples + bs, bs, every or 1)
    save_due = not last and bool(save_every) and crossed(state.n_samples + bs, bs, save_every or 1)
    try:
        values = t.train_step(iter(micro), state, stats=log_due or last)
        if not (log_due or last or eval_due or save_due):
            return
        r.values = values.read()  # (raises a numerical problem of this or an earlier step)
    except NumericalError as err:
        r.error = set_aside_bad_point(err, r.run_dir, t.global_batch, t.dist)
        return
    if log_due:
        rec = {
            "samples": state.n_samples,
            "step": state.step,
            "lr": t.scheduler.get_last_lr()[0],
            **values,
            "tokens_per_s": rate(),
        }
        rec.update(dead_counts(t.model, cfg.act_frequency_n_tokens))
        r.log.log(rec, step=state.n_samples)
    if eval_due:
        log_eval(r, progress=progress)
    if save_due:
        r.save()
    if last:
        finish_run(r, progress, stop)


def finish_run(r: Run, progress: bool = False, stop: StopOnSignal | None = None) -> None:
    """The final checkpoint, the final evaluation (unless the last step just had one), the
    metrics log closed and the training curves drawn. With `stop` (the loop's signal handling)
    SIGINT / SIGTERM end the final evaluation at once: everything is saved before it."""
    t, state, every = r.trainer, r.state, r.config.eval_every_n_samples
    r.save(final=True)
    if not (every and state.n_samples % every == 0):
        ckpt = f"samples_{state.n_samples}.safetensors"

        def message(signum: int) -> str:
            return (
                f"stopped by {signal.Signals(signum).name} during the final evaluation; the "
                f"final checkpoint {ckpt} is saved; evaluate it with `e2e-sae eval {r.run_dir}`"
            )

        with stop.at_once(message) if stop is not None else contextlib.nullcontext():
            log_eval(r, progress=progress, desc="final eval")
    r.log.finish()
    if t.dist.is_main:
        write_curves(r.run_dir)


def log_eval(r: Run, progress: bool = False, desc: str = "eval") -> None:
    """Evaluate `r` now (rank 0 only; the others wait at the next step) and log the result."""
    t, state = r.trainer, r.state
    if not t.dist.is_main:
        return
    t0 = time.perf_counter()
    result = t.run_eval(progress=progress, desc=desc)
    r.eval_seconds += time.perf_counter() - t0
    if result is None:
        return
    r.eval = result
    r.log.log(
        {"samples": state.n_samples, "step": state.step, **result.flat()}, step=state.n_samples
    )
    freqs = {p: result.feature_frequency(p) for p in result.feature_counts}
    r.log.log_feature_frequencies(freqs, step=state.n_samples)
    if r.on_eval is not None:
        r.on_eval(result)


def dead_counts(model: SAETransformer, window: int) -> dict[str, float]:
    """Training's dead latents: those that fired on none of the last `window` training tokens
    (`act_frequency_n_tokens`); the window is logged with them as `dead_window_tokens`."""
    counts = {f"dead_dict_elements/{p}": model.sae(p).n_dead(window) for p in model.sae_positions}
    return {**counts, "dead_window_tokens": window}


def set_aside_bad_point(err: NumericalError, run_dir: Path, bs: int, d: Any) -> NumericalError:
    """Rename the checkpoint holding the weights that caused `err` to `*.diverged` (so that
    evaluation, export and `--resume` use the one before) and say which one is kept."""
    if not d.is_main or err.weights_step is None:
        return err
    points = resume_points(run_dir)
    bad = [p for p in points if p.n_samples >= err.weights_step * bs and p.n_samples > 0]
    if not bad:
        return err
    for p in bad:
        for path in (p.samples_path, p.resume_path):
            path.replace(path.with_name(path.name + ".diverged"))
    kept = [p for p in points if p not in bad]
    names = ", ".join(p.samples_path.name for p in bad)
    last = kept[-1].samples_path.name if kept else "none"
    return NumericalError(
        f"{err}; last checkpoint before it: {last} ({names} renamed *.diverged)", err.weights_step
    )


class TokenRate:
    """Tokens per second over the last `window_s` seconds (the progress bar's current speed; the
    cumulative rate would hide a slowdown and include start-up)."""

    def __init__(self, window_s: float = 20.0, now: float | None = None) -> None:
        self.window_s = window_s
        self.marks: deque[tuple[float, int]] = deque(
            [(time.perf_counter() if now is None else now, 0)]
        )

    def pause(self, seconds: float) -> None:
        """Leave `seconds` just spent on something else out of the rate (shift the marks)."""
        self.marks = deque((t + seconds, n) for t, n in self.marks)

    def update(self, n_tokens: int, now: float | None = None) -> float:
        """Add `n_tokens` just processed; returns the current rate (tokens/s)."""
        now = time.perf_counter() if now is None else now
        self.marks.append((now, self.marks[-1][1] + n_tokens))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.window_s:
            self.marks.popleft()  # keep one mark at or before the window's start
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def format_rate(tokens_per_s: float) -> str:
    """'12.3k tok/s' style."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if tokens_per_s >= div:
            return f"{tokens_per_s / div:.3g}{unit} tok/s"
    return f"{tokens_per_s:.3g} tok/s"


def write_curves(run_dir: Path) -> Path | None:
    """training_curves.png of a finished run (a plotting failure never fails the run)."""
    try:
        return plot_training_curves(run_dir)
    except Exception as err:  # noqa: BLE001
        logger.warning("could not write the training curves of %s: %s", run_dir, err)
        return None


class StopOnSignal:
    """After `install()`, SIGINT / SIGTERM only set `signum`; the loop checks `requested()` after
    each step, saves, and raises `interrupted()`. The handlers are removed after the first signal,
    so a second one acts as usual (KeyboardInterrupt / termination). A no-op outside the main
    thread (signals are only delivered there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        logger.warning("got %s: finishing this step, then saving", signal.Signals(signum).name)
        self.restore()

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    @contextmanager
    def at_once(self, message: Callable[[int], str]) -> Iterator[None]:
        """Within: SIGINT / SIGTERM (or one that came since `install`) end the run now, with a
        `SignalInterrupt` carrying `message(signum)`: for work after the final checkpoint (the
        final evaluation), which a stop would otherwise have to wait for."""
        if self.signum:
            raise SignalInterrupt(self.signum, message(self.signum))
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: FrameType | None) -> None:
            if in_import(frame):  # (raised there, it would break the module being imported)
                deliver_later(signum)
                return
            self.signum = signum
            self.restore()  # (the handlers from before `install`: a further signal ends it all)
            raise SignalInterrupt(signum, message(signum))

        before = {s: signal.signal(s, handle) for s in self.SIGNALS}
        try:
            yield
        finally:
            if not self.signum:
                for s, old in before.items():
                    signal.signal(s, old)

    def requested(self, d: Dist) -> int:
        """The signal number if any rank got one (every rank must call this each step)."""
        return max_over_ranks(self.signum, d)

    @staticmethod
    def interrupted(
        run_dir: Path, step: int, signum: int, command: str = "e2e-sae train CONFIG --resume"
    ) -> TrainingInterrupted:
        """The exception that ends the run once the checkpoint for `signum` is written."""
        return TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved, "
            f"continue with `{command} {run_dir}`",
            signum,
        )
