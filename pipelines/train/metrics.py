"""Metric names (fixed across the project) and their cross-rank aggregation."""

from __future__ import annotations

import math
import resource
import sys
import time

import torch

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
