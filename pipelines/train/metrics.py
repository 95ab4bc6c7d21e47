"""Metric names (fixed across the project) and their cross-rank aggregation."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Iterator

import torch

from ..tracking import PHASE_PREFIX, PHASE_SUFFIX

# The names every stage (tune, tracking, registry) relies on.
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
TRAINABLE_PARAMS = "trainable_params"
TRAINABLE_FRACTION = "trainable_fraction"
TOKENS_PER_S = "tokens_per_s"
STEP_TIME_S = "step_time_s"
PEAK_MEM_MB = "peak_mem_mb"
STEP = "step"
PERPLEXITY = "perplexity"


def peak_mem_mb(device: torch.device) -> float:
    """This process's peak memory: CUDA allocator peak on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """This process's resident memory now (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return pages * resource.getpagesize() / 2**20


def param_mem_mb(model: torch.nn.Module) -> float:
    """Bytes of parameters resident on this rank: the local partition (``ds_tensor``) of a
    ZeRO-3 parameter, the whole tensor otherwise."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        total += t.numel() * t.element_size()
    return total / 2**20


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max over ranks (identity when not distributed)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # gloo and nccl both reduce float64 on CPU/GPU; keep it on the backend's device.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


class Window:
    """Training statistics since the last report, on one rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.reg_sum = 0.0
        self.micro = 0
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def end_step(self) -> None:
        assert self._t0 is not None
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1
        self._t0 = None

    def add_micro(self, loss: float, reg: float, tokens: int) -> None:
        self.loss_sum += loss
        self.reg_sum += reg
        self.micro += 1
        self.tokens += tokens

    def summarise(self) -> dict[str, float]:
        """Reduce over ranks: mean loss, global tokens/s, slowest rank's step time."""
        loss, reg, micro, tokens = all_reduce(
            [self.loss_sum, self.reg_sum, float(self.micro), float(self.tokens)]
        )
        (seconds,) = all_reduce([self.seconds], op="max")
        out = {
            TRAIN_LOSS: loss / micro if micro else math.nan,
            TOKENS_PER_S: tokens / seconds if seconds else 0.0,
            STEP_TIME_S: seconds / self.steps if self.steps else 0.0,
        }
        if reg:
            out["train_regularizer"] = reg / micro
        return out


# -- calibration: every classification trial's final evaluation, and the test-split scores --
EVAL_ECE = "eval_ece"
EVAL_NLL = "eval_nll"
ECE_BINS = 15
# 1.0 where eval_loss / eval_accuracy / eval_ece / eval_nll are a fitted laplace_lora's
# posterior predictive (its MAP scores are then kept under eval_map_*), 0.0 where they are
# the model's own softmax
LAPLACE_PREDICTIVE = "laplace_predictive"


class Calibration:
    """Running sums for accuracy, NLL and expected calibration error of class probabilities,
    summed over ranks by :meth:`summarise`.

    ECE is ``Σ_b (n_b / N) |acc_b - conf_b|`` over ``bins`` equal-width confidence bins
    ``((b-1)/bins, b/bins]`` (Guo et al. 2017; the definition of
    ``peft_core.methods.laplace.calibration_metrics``); per bin only the counts, the summed
    confidence and the summed correctness are kept, so shards combine exactly."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.conf = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)
        self.nll = 0.0

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """``probs`` (N, C) class probabilities, ``labels`` (N,) class indices."""
        probs, labels = probs.detach().double().cpu(), labels.detach().long().cpu()
        if probs.ndim != 2 or labels.shape != probs.shape[:1]:
            raise ValueError(f"calibration: probs (N, C) and labels (N,) expected, got "
                             f"{tuple(probs.shape)} and {tuple(labels.shape)}")
        conf, pred = probs.max(1)
        b = (torch.ceil(conf * self.bins).long() - 1).clamp(0, self.bins - 1)
        self.count += torch.bincount(b, minlength=self.bins).double()
        self.conf += torch.bincount(b, weights=conf, minlength=self.bins)
        self.correct += torch.bincount(b, weights=(pred == labels).double(), minlength=self.bins)
        p = probs.gather(1, labels[:, None]).squeeze(1)
        self.nll += float(-torch.log(p.clamp_min(1e-12)).sum())

    def summarise(self) -> dict[str, float]:
        """``eval_accuracy``, ``eval_nll`` (mean) and ``eval_ece`` over every rank's rows
        (NaN without rows)."""
        n = self.bins
        sums = all_reduce([*self.count.tolist(), *self.conf.tolist(), *self.correct.tolist(),
                           self.nll])
        count, conf, correct = (torch.tensor(sums[i * n:(i + 1) * n], dtype=torch.float64)
                                for i in range(3))
        total = float(count.sum())
        if not total:
            return {EVAL_ACCURACY: math.nan, EVAL_NLL: math.nan, EVAL_ECE: math.nan}
        return {EVAL_ACCURACY: float(correct.sum()) / total, EVAL_NLL: sums[-1] / total,
                EVAL_ECE: float((correct - conf).abs().sum()) / total}


def uses_posterior(peft_model: torch.nn.Module) -> bool:
    """Whether ``peft_model`` is a ``laplace_lora`` whose posterior was fitted."""
    if peft_model.method.config.name != "laplace_lora":
        return False
    from peft_core.methods.laplace import prior_precision

    return prior_precision(peft_model) > 0


def posterior_eval(peft_model: torch.nn.Module, batches: list[dict[str, torch.Tensor] | None],
                   device: torch.device) -> dict[str, float]:
    """A fitted ``laplace_lora``'s posterior predictive (linearised Laplace, the method's link)
    on this rank's eval batches (``None``: a rank without rows), reduced over ranks:
    ``eval_loss`` (= its mean NLL), ``eval_accuracy``, ``eval_nll``, ``eval_ece``. The
    forward runs on the module, not the DeepSpeed engine: its per-example Jacobians need
    the LoRA layers' outputs in the graph, and outside ZeRO-3 every rank holds them whole."""
    from peft_core.methods.laplace import predictive_probs

    calib = Calibration()
    was_training = peft_model.training
    peft_model.eval()
    try:
        for b in batches:
            if b is None:
                continue
            b = {k: v.to(device) for k, v in b.items()}
            with torch.enable_grad():
                probs = predictive_probs(peft_model, b)
            calib.add(probs, b["labels"])
    finally:
        peft_model.train(was_training)
    out = calib.summarise()
    return {EVAL_LOSS: out[EVAL_NLL], **out}


# -- where a trial's time goes: every second from the trial's start, charged to one phase ----
#: in the order a trial passes them; ``phase_<name>_s`` (cumulative seconds) in each report
PHASES = (
    "wait",          # the worker group's placement group waiting for resources
    "controller",    # the rest until the worker's process exists: the trial driver's
                     # checks, Ray Train's controller actor, the worker actors' creation
    "worker_start",  # the worker's process until the train function runs: Ray's worker
                     # start-up, Ray Train's setup, the process group, unpickling the
                     # function (which imports torch and pipelines.train)
    "imports",       # what the function imports itself (DeepSpeed, transformers, plugins)
    "data",          # reading the splits and batching them
    "load",          # the base model
    "method",        # peft_core's injection, ``prepare`` and ``finalize``
    "engine",        # deepspeed.initialize
    "steps",         # optimizer steps (and the loop's bookkeeping between them)
    "eval",          # evaluations (with the memory probe that follows each)
    "checkpoint",    # resume state and adapter saved, persisted by a checkpoint's report
    "report",        # ray.train.report without a checkpoint (it waits for the controller
                     # to take the previous report)
)


def phase_key(name: str) -> str:
    return f"{PHASE_PREFIX}{name}{PHASE_SUFFIX}"


class Phases:
    """A stopwatch that charges every second to exactly one phase, the current one, so the
    phases of a timeline add up to its wall time by construction. ``with phases("eval"):``
    charges a block to ``eval`` and returns to the phase it interrupted."""

    def __init__(self, first: str) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.current = first
        self._since = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        """Charge time measured elsewhere (before this process ran) to ``name``."""
        self.totals[name] += max(0.0, seconds)

    def switch(self, name: str) -> str:
        """Close the current phase, open ``name``; returns the phase closed."""
        now = time.perf_counter()
        self.totals[self.current] += now - self._since
        self._since, previous, self.current = now, self.current, name
        return previous

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def snapshot(self) -> dict[str, float]:
        """``phase_<name>_s`` for every phase, up to now."""
        self.switch(self.current)
        return {phase_key(p): self.totals[p] for p in PHASES}
