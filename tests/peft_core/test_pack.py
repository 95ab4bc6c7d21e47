"""Several LoRA adapters over one frozen base (peft_core.pack), each optimised by its own
pipelines.train.members.MemberOptimizer: each member of a pack trains as it would alone, on
tiny random Llama, GPT-2 and BERT models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import peft_core
from peft_core.files import CONFIG_FILE, WEIGHTS_FILE
from peft_core.pack import Member, PackedLoraLayer, PackedModel
from pipelines.errors import InputError
from pipelines.train.members import MemberOptimizer
from tests import tiny

pytestmark = pytest.mark.timeout(120)

TOL = {"atol": 1e-5, "rtol": 1e-4}
# per arch: a target list narrower than the default (one member adapts only these)
NARROW = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def _members(arch: str) -> list[dict]:
    """Three members differing in method, rank, alpha, init, targets, lr, seed, batch size."""
    return [
        {"name": "a", "config": {"name": "lora", "rank": 2, "alpha": 4.0}, "lr": 1e-2,
         "seed": 0, "size": 2},
        {"name": "b", "config": {"name": "lora_plus", "rank": 4, "alpha": 8.0,
                                 "init": "gaussian", "lr_ratio": 4.0}, "lr": 3e-3,
         "seed": 1, "size": 3},
        {"name": "c", "config": {"name": "moslora", "rank": 3, "alpha": 3.0,
                                 "target_modules": NARROW[arch]}, "lr": 2e-2,
         "seed": 2, "size": 4},
    ]


def _batch(arch: str, member: dict, step: int) -> dict[str, torch.Tensor]:
    # each member reads its own data stream, the same one its solo run reads
    return tiny.batch(arch, seed=1000 * member["seed"] + step, size=member["size"])


def _solo(arch: str, member: dict, steps: int):
    """The member trained alone: seed, apply, AdamW over param_groups, ``out.loss``."""
    base = tiny.model(arch)  # seeds the RNG itself, so it comes before the member's seed
    torch.manual_seed(member["seed"])
    pm = peft_core.apply(base, member["config"])
    pm.train()
    opt = torch.optim.AdamW(pm.param_groups(member["lr"]))
    losses = []
    for step in range(steps):
        loss = pm(**_batch(arch, member, step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return pm, losses


class _Run:
    """A pack and each member's own MemberOptimizer, stepped as the packed training engine
    steps them; keeps each member's per-step loss (mean over the step's micro-batches) and
    the learning rate that step used."""

    def __init__(self, arch: str, members: list[dict], **optim) -> None:
        self.pack = PackedModel(tiny.model(arch))
        self.optimizers = {}
        for m in members:
            member = self.pack.add(m["name"], m["config"], seed=m["seed"])
            self.optimizers[m["name"]] = MemberOptimizer(member.peft, lr=m["lr"], **optim)
        self.pack.train()
        self.losses: dict[str, list[float]] = {m["name"]: [] for m in members}
        self.lrs: dict[str, list[float]] = {m["name"]: [] for m in members}

    def step(self, micro_batches: list[dict]) -> None:
        pending: dict[str, list[float]] = {}
        for batches in micro_batches:
            for name, loss in self.pack.backward(batches, scale=1 / len(micro_batches)).items():
                pending.setdefault(name, []).append(loss)
        for name, values in pending.items():
            self.lrs[name].append(self.optimizers[name].lr())
            self.optimizers[name].step()
            self.losses[name].append(sum(values) / len(values))

    def remove(self, name: str) -> Member:
        self.optimizers[name].release()
        return self.pack.remove(name)


def _train(run: _Run, arch: str, members: list[dict], steps: range) -> None:
    for step in steps:
        run.step([{m["name"]: _batch(arch, m, step) for m in members
                   if m["name"] in run.pack.members}])


def _assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=k)


def test_packed_members_match_their_solo_runs(arch: str, tmp_path) -> None:
    steps = 5
    members = _members(arch)
    run = _Run(arch, members)
    pack = run.pack
    _train(run, arch, members, range(steps))
    eval_batch = tiny.batch(arch, seed=77)
    for m in members:
        solo, solo_losses = _solo(arch, m, steps)
        member = pack.member(m["name"])
        got = run.losses[m["name"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(solo_losses), **TOL)
        _assert_same_state(member.peft.adapter_state_dict(), solo.adapter_state_dict())
        # the exported folder is the solo run's: same config, same tensors, same outputs
        pack.save(m["name"], tmp_path / "packed" / m["name"])
        solo.save(tmp_path / "solo" / m["name"])
        cfg_p, cfg_s = (json.loads((tmp_path / w / m["name"] / CONFIG_FILE).read_text())
                        for w in ("packed", "solo"))
        assert cfg_p == cfg_s
        _assert_same_state(load_file(tmp_path / "packed" / m["name"] / WEIGHTS_FILE),
                           load_file(tmp_path / "solo" / m["name"] / WEIGHTS_FILE))
        loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "packed" / m["name"])
        torch.testing.assert_close(tiny.logits(loaded, eval_batch),
                                   tiny.logits(solo.eval(), eval_batch), **TOL)
    # a sanity check that the comparison could fail: the members did move apart
    a, c = (run.losses[n][-1] for n in ("a", "c"))
    assert a != c


def test_summed_loss_gives_each_member_its_own_gradient() -> None:
    members = _members("llama")
    run = _Run("llama", members)
    pack = run.pack
    _train(run, "llama", members, range(2))  # B != 0 now, so every factor has a gradient
    batches = {m["name"]: _batch("llama", m, 9) for m in members}
    sum(pack.losses(batches).values()).backward()
    together = {m["name"]: {n: p.grad.clone() for n, p in pack.member(m["name"]).peft
                            .trainable_parameters()} for m in members}
    pack.zero_grad(set_to_none=True)
    for m in members:
        pack.losses({m["name"]: batches[m["name"]]})[m["name"]].backward()
        alone = dict(pack.member(m["name"]).peft.trainable_parameters())
        for n, g in together[m["name"]].items():
            assert g.abs().sum() > 0, n
            torch.testing.assert_close(g, alone[n].grad, **TOL, msg=n)
        pack.zero_grad(set_to_none=True)


def test_removing_a_member_leaves_the_others_on_their_solo_runs(arch: str) -> None:
    members = _members(arch)
    run = _Run(arch, members)
    pack = run.pack
    _train(run, arch, members, range(3))
    assert run.optimizers["b"].optimizer.state  # AdamW moments, freed when "b" leaves
    removed = run.remove("b")
    assert removed.name == "b" and len(run.losses["b"]) == 3 and pack.members == ["a", "c"]
    assert not run.optimizers["b"].optimizer.state
    assert not any("members.b." in n for n, _ in pack.named_parameters())
    with pytest.raises(peft_core.PeftError, match="'b'"):
        run.step([{m["name"]: _batch(arch, m, 3) for m in members}])
    _train(run, arch, members, range(3, 6))
    for m in (members[0], members[2]):
        solo, solo_losses = _solo(arch, m, 6)
        member = pack.member(m["name"])
        got = run.losses[m["name"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(solo_losses), **TOL)
        _assert_same_state(member.peft.adapter_state_dict(), solo.adapter_state_dict())


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 3)


def test_accumulation_clipping_and_schedules_match_solo_runs() -> None:
    """Two micro-batches a step, each member's own gradient-norm clip and LambdaLR: what the
    training stage does (DeepSpeed clips a trial's own norm)."""
    arch, steps, clip, micro = "llama", 4, 0.01, 2
    members = _members(arch)
    run = _Run(arch, members, grad_clip=clip,
               scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _warmup))
    for step in range(steps):
        run.step([{m["name"]: _batch(arch, m, 10 * step + j) for m in members}
                  for j in range(micro)])
    for m in members:
        base = tiny.model(arch)
        torch.manual_seed(m["seed"])
        solo = peft_core.apply(base, m["config"])
        solo.train()
        opt = torch.optim.AdamW(solo.param_groups(m["lr"]))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
        params = [p for _, p in solo.trainable_parameters()]
        losses, norms = [], []
        for step in range(steps):
            micro_losses = []
            for j in range(micro):
                loss = solo(**_batch(arch, m, 10 * step + j)).loss
                (loss / micro).backward()
                micro_losses.append(float(loss.detach()))
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(sum(micro_losses) / micro)
        assert max(norms) > clip  # clipping did act, so a joint or missing clip would show
        torch.testing.assert_close(torch.tensor(run.losses[m["name"]]),
                                   torch.tensor(losses), **TOL)
        assert run.lrs[m["name"]] == pytest.approx([m["lr"] * _warmup(s)
                                                    for s in range(steps)])
        _assert_same_state(run.pack.member(m["name"]).peft.adapter_state_dict(),
                           solo.adapter_state_dict())


def test_member_optimizer_state_resumes_the_same_steps(tmp_path) -> None:
    """A member's adapter and MemberOptimizer state saved mid-run and restored into a fresh
    pack take the same next step as the run that went on (a packed checkpoint's resume)."""
    m = _members("llama")[1]  # LoRA+: two param groups with their own rates
    schedule = {"grad_clip": 0.01,
                "scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _warmup)}
    run = _Run("llama", [m], **schedule)
    _train(run, "llama", [m], range(2))
    run.pack.save("b", tmp_path / "b")
    state = copy.deepcopy(run.optimizers["b"].state_dict())
    _train(run, "llama", [m], range(2, 3))
    resumed = _Run("llama", [m], **schedule)
    resumed.pack.load("b", tmp_path / "b")
    resumed.optimizers["b"].load_state_dict(state)
    assert resumed.optimizers["b"].lr() == pytest.approx(m["lr"] * _warmup(2))
    _train(resumed, "llama", [m], range(2, 3))
    assert resumed.lrs["b"] == run.lrs["b"][2:]
    _assert_same_state(resumed.pack.member("b").peft.adapter_state_dict(),
                       run.pack.member("b").peft.adapter_state_dict())


def _storage_bytes(module: torch.nn.Module) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in module.parameters()}.values())


def test_base_is_frozen_and_held_once() -> None:
    members = _members("llama")
    base_bytes = _storage_bytes(tiny.model("llama"))
    run = _Run("llama", members)
    pack = run.pack
    adapter_bytes = {m["name"]: _storage_bytes(_solo("llama", m, 0)[0]) - base_bytes
                     for m in members}
    sizes = pack.storage_bytes()
    assert sizes == {"base": base_bytes, **adapter_bytes}
    # every tensor of the pack is the base's (once) or one member's: K adapters, one base
    assert _storage_bytes(pack) == base_bytes + sum(adapter_bytes.values())
    trainable = {id(p) for p in pack.parameters() if p.requires_grad}
    owned = {id(p) for m in members for p in pack.member(m["name"]).peft.parameters()}
    assert trainable == owned
    # the base runs once per stacked row: one call of each base linear, all rows at once
    layer = pack.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, PackedLoraLayer) and sorted(layer.members) == ["a", "b", "c"]
    seen: list[int] = []
    handle = layer.base.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    run.step([{m["name"]: _batch("llama", m, 0) for m in members}])
    handle.remove()
    assert seen == [sum(m["size"] for m in members)]
    assert all(not p.requires_grad for n, p in pack.named_parameters() if ".members." not in n)


@pytest.mark.parametrize(("config", "field"), [
    ({"name": "full"}, "method.name: 'full' trains or rewrites the base weights"),
    ({"name": "ia3"}, "method.name: 'ia3' computes its layers differently"),
    ({"name": "dora"}, "method.name: 'dora'"),
    ({"name": "lora", "init": "pissa"}, "lora.init: expected kaiming or gaussian"),
    ({"name": "lora", "rank": 0}, "lora.rank: expected an integer > 0"),
    ({"name": "lora", "target_modules": ["nope_proj"]}, "target_modules \\['nope_proj'\\]"),
])
def test_bad_member_config_names_the_field(config: dict, field: str) -> None:
    pack = PackedModel(tiny.model("llama"))
    with pytest.raises(peft_core.PeftError, match=field):
        pack.add("m", config, seed=0)
    assert pack.members == []


def test_bad_base_batches_and_adapters_are_named(tmp_path) -> None:
    with pytest.raises(peft_core.PeftError, match="model: already has adapters"):
        PackedModel(peft_core.apply(tiny.model("llama"), {"name": "lora"}))
    two = [{"name": "a", "config": {"name": "lora", "rank": 2}, "lr": 1e-3, "seed": 0},
           {"name": "b", "config": {"name": "lora", "rank": 4}, "lr": 1e-3, "seed": 1}]
    run = _Run("llama", two)
    pack = run.pack
    with pytest.raises(peft_core.ConfigError, match="member name: 'a' is already"):
        pack.add("a", {"name": "lora"})
    with pytest.raises(peft_core.ConfigError, match="member name"):
        pack.add("x.y", {"name": "lora"})
    for bad in (0, -1.0):
        with pytest.raises(InputError, match="grad_clip: expected a number > 0"):
            MemberOptimizer(pack.member("a").peft, lr=1e-3, grad_clip=bad)
    short = tiny.batch("llama")
    short = {k: v[:, :5] for k, v in short.items()}
    with pytest.raises(peft_core.PeftError, match="member 'b'.*'attention_mask' has shape"):
        run.step([{"a": tiny.batch("llama"), "b": short}])
    with pytest.raises(peft_core.PeftError, match="not members of the pack"):
        run.step([{"a": tiny.batch("llama"), "b": tiny.batch("llama"), "z": short}])
    with pytest.raises(peft_core.PeftError, match="outside PackedModel.forward"):
        pack.base_model(input_ids=short["input_ids"])
    # a member's checkpoint: another base, another config, then the right one
    other = peft_core.apply(tiny.model("llama", seed=5), {"name": "lora", "rank": 2})
    other.save(tmp_path / "other_base")
    with pytest.raises(peft_core.FingerprintMismatchError, match="weights_sha256"):
        pack.load("a", tmp_path / "other_base")
    pack.save("b", tmp_path / "b")
    with pytest.raises(peft_core.ConfigError, match="differs from member 'a'"):
        pack.load("a", tmp_path / "b")
    before = pack.member("a").peft.adapter_state_dict()
    run.step([{"a": tiny.batch("llama"), "b": tiny.batch("llama")}])
    pack.save("a", tmp_path / "a")
    run.step([{"a": tiny.batch("llama"), "b": tiny.batch("llama")}])
    pack.load("a", tmp_path / "a")
    _assert_same_state(pack.member("a").peft.adapter_state_dict(),
                       load_file(tmp_path / "a" / WEIGHTS_FILE))
    assert any(not torch.equal(before[k], v)
               for k, v in pack.member("a").peft.adapter_state_dict().items())
