"""One training step (forward, loss, backward, with the recipe's gradient checkpointing) run
on a meta-device model and counted tensor by tensor: the activations a rank holds at the
step's peak, parameters and their gradients left out. Also the attention stand-in the meta
model is built with, so that attention saves what a training kernel saves."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

#: The name the attention stand-in is registered under with transformers.
ATTENTION = "peftpipe_plan_meta"


@dataclasses.dataclass(frozen=True)
class Activations:
    peak: int  # live tensors at the step's peak, parameters and their gradients excluded
    saved: int  # what autograd keeps at the end of the forward pass
    per_block: tuple[int, ...]  # of which saved inside each transformer block
    gradient_checkpointing: bool = False
    note: str | None = None


def _attention(module, query, key, value, attention_mask, **kwargs):
    """Stands in for SDPA on the meta model, keeping what flash / memory-efficient kernels
    save for backward (q, k, v, output, fp32 log-sum-exp); on meta tensors PyTorch would
    take the math path, which stores the full attention matrix, which no training kernel
    does (on CPU the flash kernel runs too)."""
    import torch

    class _Saved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            # the gradients the real kernels return (their values do not matter here)
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    out = _Saved.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make :data:`ATTENTION` a valid ``attn_implementation`` for transformers."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


@contextlib.contextmanager
def saved_tensors(model: Any) -> Iterator[dict[str, Any]]:
    """Record every tensor autograd saves during a forward, once per storage, attributed to
    the transformer block that saved it; parameters and buffers (weights kept for the input
    gradient) are not activations and are skipped."""
    import torch

    from peft_core import targets

    blocks = [m for _, m in targets.blocks(model)] if _has_blocks(model) else []
    skip = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    state: dict[str, Any] = {"block": None, "per_block": [0] * len(blocks), "outside": 0,
                             "seen": set(), "keep": []}

    def pack(t):
        st = t.untyped_storage()
        key = id(st)
        if key in skip or key in state["seen"]:
            return t
        state["seen"].add(key)
        state["keep"].append(st)  # ids stay unique while the storages live
        n = st.nbytes()
        if state["block"] is None:
            state["outside"] += n
        else:
            state["per_block"][state["block"]] += n
        return t

    def enter(i):
        def hook(_, __):
            state["block"] = i
        return hook

    def leave(_, __, ___):
        state["block"] = None

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(enter(i)))
        handles.append(b.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield state
    finally:
        for h in handles:
            h.remove()


def _has_blocks(model) -> bool:
    from peft_core import targets

    try:
        return bool(targets.blocks(model))
    except Exception:  # an architecture peft_core has no table entry for
        return False


@contextlib.contextmanager
def live_tensors(existing: Iterable[Any] = ()) -> Iterator[dict[str, int]]:
    """Bytes of every tensor an op creates while the context is open, alive and at peak;
    views of the ``existing`` tensors (parameters: ``W.t()`` in every linear) are not new.

    It uses ``TorchDispatchMode`` (through :mod:`pipelines.compat`: torch documents the
    ``__torch_dispatch__`` extension point but ships it in an underscored module): it
    sees each op's outputs, including backward's, on the meta device too, where PyTorch's
    memory statistics do not exist. A storage is counted once, freed when it is collected.
    """
    import weakref

    import torch

    from ..compat import torch_dispatch_mode, tree_leaves

    TorchDispatchMode = torch_dispatch_mode()  # noqa: N806 (a class, named as torch names it)

    state = {"now": 0, "peak": 0}
    keep = [t.untyped_storage() for t in existing]  # alive, so their ids stay theirs
    seen: set[int] = {id(st) for st in keep}

    def free(key: int, n: int) -> None:
        state["now"] -= n
        seen.discard(key)

    class _Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if id(st) in seen:
                        continue
                    seen.add(id(st))
                    n = st.nbytes()
                    state["now"] += n
                    state["peak"] = max(state["peak"], state["now"])
                    weakref.finalize(st, free, id(st), n)
            return out

    with _Live():
        yield state


def step_activations(runner: Any, task: str, micro: int, seq: int, *,
                     gradient_checkpointing: bool, grad_bytes: int) -> Activations:
    """One training step (forward, loss, backward) of ``runner`` on the meta device at
    ``micro`` x ``seq`` tokens: the peak of live tensors, with the output (logits) kept alive
    through backward as the training loop keeps it."""
    import torch

    base = getattr(runner, "base_model", runner)
    note = None
    if gradient_checkpointing:
        try:
            with warnings.catch_warnings():  # transformers' renaming notice is not the user's
                warnings.simplefilter("ignore", FutureWarning)
                runner.enable_gradient_checkpointing()
        except Exception as e:  # prefix methods refuse it
            gradient_checkpointing, note = False, f"planned without gradient checkpointing: {e}"
    runner.train()
    ids = torch.empty((micro, seq), dtype=torch.long, device="meta")
    labels = torch.empty((micro,), dtype=torch.long, device="meta") if task == "classification" \
        else ids
    with live_tensors([*runner.parameters(), *runner.buffers()]) as live:
        with saved_tensors(base) as saved:
            out = runner(input_ids=ids, labels=labels)
        forward_end = live["now"]
        out.loss.backward()
        del out
    # The trainable parameters' gradients appear during backward; the planner counts them
    # as gradients, so they are taken out here (all of them: an upper bound on those alive
    # at the peak), never below what the forward pass left.
    peak = max(live["peak"] - grad_bytes, forward_end)
    return Activations(peak, saved["outside"] + sum(saved["per_block"]),
                       tuple(saved["per_block"]), gradient_checkpointing, note)
