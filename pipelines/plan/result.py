"""What a plan returns: :class:`Plan`, the planned model and run, with one :class:`Choice`
(bytes per rank, term by term) per ZeRO stage and offload."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Offload = Literal["none", "optimizer", "optimizer+param"]
OFFLOADS: tuple[Offload, ...] = ("none", "optimizer", "optimizer+param")


@dataclasses.dataclass(frozen=True)
class Choice:
    """Predicted bytes per rank on the device (GPU memory, or RAM per process on CPU) for
    one ZeRO stage and offload choice; ``host`` is what offload moves to host RAM per rank."""

    stage: int
    offload: Offload
    base_params: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    zero_buffers: int
    activations: int
    heap_retained: int  # CPU only: freed activation memory glibc keeps (0 on GPUs)
    overhead: int
    load_peak: int  # model bytes resident while loading (before training starts)
    host: int
    fits: bool

    @property
    def steady(self) -> int:
        """Bytes at the training step's peak (without the fixed overhead). Retained heap is
        reused by gradients and optimizer states, so only what exceeds them adds."""
        return (self.base_params + self.trainable_params + self.zero_buffers + self.activations
                + max(self.heap_retained, self.gradients + self.optimizer_states))

    @property
    def peak(self) -> int:
        """The rank's peak: the fixed overhead plus the larger of loading and training."""
        return self.overhead + max(self.steady, self.load_peak)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planned model and run, and one :class:`Choice` per stage and offload."""

    model: str
    architecture: str
    base_params: int  # the model's own parameters (what its config defines)
    total_params: int  # with the method's added parameters
    trainable_params: int
    trainable_source: str  # how the trainable count was obtained
    method: str
    precision: Literal["fp32", "bf16"]
    device: Literal["cuda", "cpu"]
    world_size: int
    nodes: int
    ranks_per_node: int
    device_mem: int
    micro_batch_size: int
    max_length: int
    gradient_checkpointing: bool
    recipe_choice: tuple[int, Offload]
    choices: tuple[Choice, ...]
    notes: tuple[str, ...] = ()

    def choice(self, stage: int, offload: Offload = "none") -> Choice:
        for c in self.choices:
            if c.stage == stage and c.offload == offload:
                return c
        raise KeyError((stage, offload))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = [{**dataclasses.asdict(c), "peak": c.peak} for c in self.choices]
        return d
