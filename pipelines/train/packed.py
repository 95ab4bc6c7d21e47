"""What each Ray Train worker of a *packed* run executes: K LoRA-family members trained side
by side over one frozen copy of the base model (:class:`peft_core.pack.PackedModel`).

A packed run is K runs of one recipe that differ only in method config and learning rate
(a search's trials, ``tune.pack``). Each micro-batch is stacked K times, the base runs once
over the stack and each member's adapter on its own rows, so the K members see the data a
solo run sees, in the same order, and start from the same seed: each follows the solo
run's trajectory up to floating-point summation order.

No DeepSpeed engine here: an engine holds one optimizer over one model, clips the joint
gradient norm and cannot drop a member's parameters in the middle of a run, and all three
would tie the members to each other. Each member has its own AdamW (DeepSpeed's ``torch``
AdamW, same betas/eps/weight decay), learning-rate schedule and gradient clipping on its
own norm; across ranks the members' gradients are averaged with one all-reduce per member,
what ZeRO stages 0-2 do for a solo run (the adapters are small, so their optimizer states
are not worth sharding). ZeRO-3 (a partitioned base) is refused before a packed run starts.

Early stopping: at each report a ``stopper(member, report_index, metrics) -> bool`` (given
by the search: successive halving over all of the search's members) is asked on rank 0
for every member still training; a stopped member leaves the pack (its tensors and
optimizer state freed) and the others train on. Every checkpoint holds every member's
adapter, ``members/<name>/adapter`` (a stopped member's as it was when it stopped), so the
latest checkpoint has them all.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import metrics as M
from .loop import (
    EvalSums,
    Worker,
    _load_base,
    _memory,
    _to,
    lr_lambda,
    pipeline_info,
    resume_source,
    start_worker,
)

MEMBERS_DIR = "members"
PACK_STATE = "pack_state.pt"  # each member's optimizer and scheduler state (rank 0)
#: a member's ``status`` in a report
TRAINING, STOPPED, COMPLETED = "training", "stopped early", "completed"


def member_adapter(checkpoint: str | Path, member: str) -> Path:
    """Where a packed run's checkpoint keeps ``member``'s adapter folder."""
    return Path(checkpoint) / MEMBERS_DIR / member / ckpt.ADAPTER_DIR


def packed_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train's per-worker function of a packed run: ``loop_config`` as for
    :func:`~pipelines.train.loop.train_loop_per_worker`, plus ``members`` (a list of
    ``{"name", "method", "lr"}``) and an optional ``stopper``. Each report carries the
    pack's shared figures (step, phases, memory) and ``members``: per member its own
    metrics, ``lr``, ``step`` (its last) and ``status``."""
    w = start_worker(loop_config)  # first: its stopwatch starts at this function's start
    import ray.train

    from peft_core import targets
    from peft_core.pack import PackedModel

    config, phases, rank = w.config, w.phases, w.rank
    specs = loop_config["members"]
    stopper = loop_config.get("stopper")
    if config.zero.stage == 3:
        raise ValueError("train.zero.stage: a packed run shares one whole base model; "
                         "ZeRO-3 partitions it (use stage 0, 1 or 2)")

    phases.switch("load")
    base, _ = _load_base(config, w.info, w.ds_config, w.dtype)
    base.to(w.device)
    load_s = time.perf_counter() - w.started
    phases.switch("method")
    base_params = sum(targets.numel(p) for p in base.parameters())
    pack = PackedModel(base)
    adamw = functools.partial(torch.optim.AdamW, betas=tuple(config.betas), eps=1e-8,
                              weight_decay=config.weight_decay)
    for spec in specs:
        pack.add(spec["name"], spec["method"], lr=spec["lr"], seed=config.seed,
                 weight_decay=config.weight_decay, optimizer=adamw, grad_clip=config.grad_clip,
                 scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)))
    load_peak = M.all_reduce([M.peak_mem_mb(w.device)], "max")[0]
    ended: dict[str, Any] = {}  # name -> Member, once out of the pack
    records: dict[str, dict[str, Any]] = {}  # each member's last report
    step, history = 0, []

    restored, source = resume_source(loop_config)
    if source is not None:
        phases.switch("checkpoint")
        with source as folder:
            saved = _load(pack, Path(folder), [s["name"] for s in specs], rank=rank)
        step, history = int(saved["step"]), list(saved.get("history", []))
        records = dict(saved["pack"]["records"])
        for name in saved["pack"]["ended"]:
            ended[name] = pack.remove(name)
        if restored is not None and saved.get("finalized") and history:
            # as train_loop_per_worker: the driver died before Tune saw the final report
            ray.train.report({**history[-1], "checkpoint_path": restored.path})
            return history

    members = {name: pack.member(name) for name in pack.members}
    members.update(ended)
    static = {
        "resumed_from": step,
        "param_mem_mb": M.all_reduce([M.param_mem_mb(pack)], "max")[0],
        "load_peak_mem_mb": load_peak,
        "load_s": M.all_reduce([load_s], "max")[0],
        "precision": w.precision,
        "pack_size": len(specs),
    }
    own = {name: _param_counts(member, base_params, targets.numel)
           for name, member in members.items()}
    adapter_info = pipeline_info(config, w.info)
    windows = {name: M.Window() for name in pack.members}
    reports = len(history)

    def report_now(evaluated: dict[str, dict[str, float]], *, last: bool) -> dict[str, Any]:
        nonlocal reports
        reports += 1
        for name, metrics in evaluated.items():
            window = windows[name].summarise() if step else {}
            records[name] = {**own[name], **window, **metrics, M.STEP: step,
                             "lr": _lr(members[name]), "status": COMPLETED if last else TRAINING}
        stop = _decide(stopper, [] if last else pack.members, records, reports,
                       rank=rank, world=w.world)
        for name in stop:
            records[name]["status"] = STOPPED
            ended[name] = pack.remove(name)
        for window in windows.values():
            window.reset()
        return {M.STEP: step, **static, "members": {n: dict(r) for n, r in records.items()}}

    phases.switch("steps")
    if step == 0 and config.eval_before_training:
        with phases("eval"):
            report = report_now(_evaluate(pack, w), last=False)
            report.update(_memory(w.device))
        report.update(phases.snapshot())
        history.append(report)
        with phases("report"):
            ray.train.report(report)
    pack.train()
    while step < config.max_steps and pack.members:
        for window in windows.values():
            window.start_step()
        for mb in w.batches.micro_batches(step):
            mb = _to(mb, w.device)
            # DeepSpeed divides a micro-batch's loss by the accumulation steps: so does this
            losses = pack.backward({n: mb for n in pack.members}, scale=1.0 / config.grad_accum)
            tokens = int(mb["attention_mask"].sum())
            for name, loss in losses.items():
                windows[name].add_micro(loss, 0.0, tokens)
        _average_gradients(pack, w.world)
        pack.optimizer_step()
        for name in pack.members:
            windows[name].end_step()
        step += 1
        last = step == config.max_steps
        if step % config.eval_every and not last:
            continue
        with phases("eval"):
            evaluated = _evaluate(pack, w, calibrate=last)
        before = set(pack.members)
        report = report_now(evaluated, last=last)
        stopped = before - set(pack.members)
        report.update(_memory(w.device))
        # a member's adapter is saved when it leaves the pack: a checkpoint then
        if not (last or stopped or step % config.ckpt_every == 0 or not pack.members):
            report.update(phases.snapshot())
            history.append(report)
            with phases("report"):
                ray.train.report(report)
            continue
        finalized = last or not pack.members
        with tempfile.TemporaryDirectory(prefix="peftpipe-ckpt-") as tmp:
            folder = Path(tmp)
            phases.switch("checkpoint")
            _save(pack, members, records, folder, rank=rank, pipeline=adapter_info)
            report.update(phases.snapshot())
            history.append(report)
            if rank == 0:
                ckpt.write_state(folder, {
                    "step": step, "world_size": w.world, "zero_stage": config.zero.stage,
                    "position": w.batches.position(step), "seed": config.seed,
                    "finalized": finalized, "history": history,
                    "pack": {"members": [s["name"] for s in specs], "ended": sorted(ended),
                             "records": records}})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        phases.switch("steps")
    return history


def _param_counts(member: Any, base_params: int, numel: Any) -> dict[str, Any]:
    """A member's own parameter figures: the shared base counts once in each member's total,
    as it would in the same trial run alone."""
    n = sum(numel(p) for _, p in member.peft.trainable_parameters())
    return {M.TRAINABLE_PARAMS: n, M.TRAINABLE_FRACTION: n / (base_params + n),
            "total_params": base_params + n}


def _lr(member: Any) -> float:
    sched = member.scheduler
    return float(sched.get_last_lr()[0] if sched is not None
                 else member.optimizer.param_groups[0]["lr"])


@torch.no_grad()
def _evaluate(pack: Any, w: Worker, *, calibrate: bool = False) -> dict[str, dict[str, float]]:
    """Every member's evaluation (as :func:`~pipelines.train.loop.evaluate` computes a solo
    run's) from one stacked forward per eval batch."""
    pack.eval()
    sums = {name: EvalSums(w.info, calibrate=calibrate) for name in pack.members}
    for b in w.evals:
        if b is None:  # a rank without rows (stages 0-2 need no collective forward)
            continue
        batch = _to(b, w.device)
        logits = pack({name: batch for name in pack.members})
        for name, lg in logits.items():
            loss = pack.loss_fn(pack.base_model, lg, batch["labels"])
            sums[name].add(float(loss), lg, b)
    pack.train()
    return {name: s.result() for name, s in sums.items()}


def _average_gradients(pack: Any, world: int) -> None:
    """The members' gradients averaged over the ranks (one all-reduce per member)."""
    if world == 1:
        return
    import torch.distributed as dist

    for name in pack.members:
        grads = [p.grad for _, p in pack.member(name).peft.trainable_parameters()
                 if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _decide(stopper: Any, names: list[str], records: dict[str, dict[str, Any]],
            report_index: int, *, rank: int, world: int) -> list[str]:
    """The members ``stopper`` stops at this report: asked on rank 0, in member order (as
    reports reach an asynchronous scheduler), and the answer broadcast to every rank."""
    stop = []
    if rank == 0 and stopper is not None:
        stop = [n for n in names if stopper(n, report_index, records[n])]
    if world > 1:
        import torch.distributed as dist

        box = [stop]
        dist.broadcast_object_list(box, src=0)
        stop = box[0]
    return stop


def _save(pack: Any, members: dict[str, Any], records: dict[str, dict[str, Any]],
          folder: Path, *, rank: int, pipeline: dict[str, Any]) -> None:
    """Every rank its RNG state; rank 0 every member's adapter (those that left the pack as
    they were then) and the optimizer and scheduler states of those still in it."""
    ckpt.save_rng(folder, rank=rank)
    if rank != 0:
        return
    for name, member in members.items():
        rec = records.get(name, {})
        member.peft.save(member_adapter(folder, name), pipeline=pipeline, training={
            "step": rec.get(M.STEP, 0), "finalized": rec.get("status") != TRAINING,
            "eval_loss": rec.get(M.EVAL_LOSS)})
    state = {name: {"optimizer": pack.member(name).optimizer.state_dict(),
                    "scheduler": pack.member(name).scheduler.state_dict()}
             for name in pack.members}
    torch.save(state, folder / PACK_STATE)


def _load(pack: Any, folder: Path, names: list[str], *, rank: int) -> dict[str, Any]:
    """Restore every member's adapter and (still training) optimizer and scheduler state,
    and this rank's RNG; returns the checkpoint's record."""
    state = ckpt.read_state(folder)
    saved = (state.get("pack") or {}).get("members")
    if saved != names:
        raise ckpt.ResumeError(f"{folder}: a checkpoint of members {saved}, this run packs "
                               f"{names}")
    optim = torch.load(folder / PACK_STATE, weights_only=True)
    for name in names:
        pack.load(name, member_adapter(folder, name))
        if name in optim:
            member = pack.member(name)
            member.optimizer.load_state_dict(optim[name]["optimizer"])
            member.scheduler.load_state_dict(optim[name]["scheduler"])
    ckpt.load_rng(folder, rank=rank)
    return state
