"""Bottleneck adapters and CoDA: outputs recomputed by hand, routing invariants, param counts.

The hand computations run on an *un-adapted* copy of the same tiny model: forward hooks at
the sublayer boundaries (module names written out here, not read from peft_core's table)
apply each method's formula with the adapter weights read from the injected model.

No parity test against AdapterHub ``adapters``: its newest release (1.3.0) requires
``transformers~=4.57.6`` and this project runs transformers 5.24.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import peft_core
from peft_core.methods.coda import CodaFFN, coda_layers, hard_topk, route_counts, soft_topk
from tests import tiny

ADAPTERS = ("adapter_houlsby", "adapter_pfeiffer", "adapter_parallel", "coda")

# Sublayer boundaries per architecture, relative to a block, written out independently of
# peft_core.targets: (attention input, attention output, FFN input, FFN output).
HOOKS = {
    "llama": ("model.layers.{i}", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "gpt2": ("transformer.h.{i}", "attn", "attn.c_proj", "mlp", "mlp.c_proj"),
    "bert": (
        "bert.encoder.layer.{i}", "attention", "attention.output.dense", "intermediate",
        "output.dense",
    ),
}
LAYERS = 2


def _perturb(pm: peft_core.PeftModel, seed: int = 3, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _bottleneck(h: torch.Tensor, w: dict[str, torch.Tensor], act=F.relu) -> torch.Tensor:
    return F.linear(
        act(F.linear(h, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"]
    )


def _weights(pm: peft_core.PeftModel, prefix: str) -> dict[str, torch.Tensor]:
    state = dict(pm.base_model.named_parameters())
    return {
        k[len(prefix) + 1 :]: v.detach() for k, v in state.items() if k.startswith(prefix + ".")
    }


def _outputs(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits and the last hidden states (BERT's classifier logits alone hide small changes)."""
    with torch.no_grad():
        out = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        )
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _hand_model(arch: str, pm: peft_core.PeftModel, method: str, routed=None) -> torch.nn.Module:
    """An un-adapted copy whose hooks apply ``method``'s formula with ``pm``'s weights.

    ``routed(name, x, valid) -> weights (batch, length)`` gives CoDA's FFN weights per token.
    """
    ref = tiny.model(arch)
    with torch.no_grad():  # trained base tensors (layer norms, the classifier) carry over as such
        for n, p in pm.trainable_parameters():
            if ".adapter." not in n and ".router." not in n:
                ref.get_parameter(n).copy_(p)
    block_fmt, attn_in, attn_out, ffn_in, ffn_out = HOOKS[arch]
    cfg = pm.method_config
    for i in range(LAYERS):
        block = block_fmt.format(i=i)
        # On the adapted model the wrapped modules sit one level down (".base").
        if method in ("adapter_houlsby", "adapter_pfeiffer"):
            outs = [attn_out, ffn_out] if method == "adapter_houlsby" else [ffn_out]
            for out in outs:
                w = _weights(pm, f"{block}.{out}.adapter")

                def serial(mod, args, h, w=w):
                    return h + _bottleneck(h, w)

                ref.get_submodule(f"{block}.{out}").register_forward_hook(serial)
        elif method == "adapter_parallel":
            spans = [(ffn_in, ffn_out)] + ([(attn_in, attn_out)] if cfg.attention else [])
            for first, out in spans:
                w = _weights(pm, f"{block}.{out}.adapter")
                seen: dict[str, torch.Tensor] = {}

                def remember(mod, args, kwargs, seen=seen):
                    seen["x"] = _input(args, kwargs)

                def parallel(mod, args, y, w=w, seen=seen):
                    return y + cfg.scaling * _bottleneck(seen["x"], w)

                ref.get_submodule(f"{block}.{first}").register_forward_pre_hook(
                    remember, with_kwargs=True
                )
                ref.get_submodule(f"{block}.{out}").register_forward_hook(parallel)
        else:  # coda: the FFN output y (dense, un-adapted) becomes s·A(x) + λ·y
            w = _weights(pm, f"{block}.{ffn_in}.adapter")
            router = _weights(pm, f"{block}.{ffn_in}.router")["weight"]
            seen = {}

            def remember(mod, args, kwargs, seen=seen):
                seen["x"] = _input(args, kwargs)

            def coda(mod, args, y, w=w, router=router, seen=seen, name=block):
                x = seen["x"]
                lam = routed(name, x, router)
                return cfg.scaling * _bottleneck(x, w) + lam.unsqueeze(-1) * y

            ref.get_submodule(f"{block}.{ffn_in}").register_forward_pre_hook(
                remember, with_kwargs=True
            )
            ref.get_submodule(
                f"{block}.{ffn_out if arch == 'bert' else ffn_in}"
            ).register_forward_hook(coda)
    return ref


def _hard_by_sorting(scores: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Top-k indicator written the slow way: per row, sort the real tokens' scores."""
    out = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        idx = valid[b].nonzero().flatten()
        k = min(max(1, math.ceil(round(fraction * len(idx), 9))), len(idx))
        top = idx[scores[b, idx].argsort(descending=True)[:k]]
        out[b, top] = 1.0
    return out


def _scores(x: torch.Tensor, router: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r = (x @ router.T).squeeze(-1).float()
    # Standardised over the real tokens of each row (the row loop keeps it obviously right).
    out = torch.zeros_like(r)
    for b in range(r.shape[0]):
        v = r[b, valid[b]]
        out[b] = (r[b] - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-6)
    return out


def _bisect_soft_topk(s: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """λ_i = min(1, exp((s_i - τ)/ε)) with Σλ = k, τ found by bisection (float64)."""
    s = s.double()
    lo, hi = s.min().item() - 50 * eps - 10, s.max().item() + 50 * eps + 10
    for _ in range(200):
        tau = (lo + hi) / 2
        total = torch.exp(((s - tau) / eps).clamp(max=0)).sum().item()
        lo, hi = (tau, hi) if total > k else (lo, tau)
    return torch.exp(((s - (lo + hi) / 2) / eps).clamp(max=0))


# -- outputs by hand ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,extra",
    [
        ("adapter_houlsby", {}),
        ("adapter_pfeiffer", {}),
        ("adapter_parallel", {}),
        ("adapter_parallel", {"attention": True}),
        ("coda", {}),
    ],
)
def test_output_matches_formula_by_hand(method: str, extra: dict, arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": method, "bottleneck": 5, **extra})
    _perturb(pm)
    b = tiny.batch(arch)
    valid = b["attention_mask"].bool()

    def hard(name, x, router):
        return _hard_by_sorting(_scores(x, router, valid), valid, pm.method_config.route_fraction)

    ref = _hand_model(arch, pm, method, routed=hard)
    torch.testing.assert_close(_outputs(pm, b), _outputs(ref, b), atol=1e-6, rtol=0)


def test_coda_training_output_matches_soft_topk_by_hand(arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": "coda", "bottleneck": 5, "epsilon": 0.5})
    _perturb(pm)
    b = tiny.batch(arch)
    b["attention_mask"][1, 9:] = 0  # some padding, which must get λ = 0
    valid = b["attention_mask"].bool()
    eps, frac = pm.method_config.epsilon, pm.method_config.route_fraction

    def soft(name, x, router):
        s = _scores(x, router, valid)
        lam = torch.zeros_like(s)
        for r in range(s.shape[0]):
            n = int(valid[r].sum())
            lam[r, valid[r]] = _bisect_soft_topk(s[r, valid[r]], math.ceil(frac * n), eps).float()
        return lam

    ref = _hand_model(arch, pm, "coda", routed=soft)
    pm.train()
    torch.testing.assert_close(_outputs(pm, b), _outputs(ref, b), atol=1e-5, rtol=0)


# -- CoDA routing ------------------------------------------------------------------------------
def _padded_batch(arch: str) -> dict[str, torch.Tensor]:
    b = tiny.batch(arch)
    # Distinct first tokens: every prefix differs, so no two positions share a hidden state.
    b["input_ids"][:, 0] = torch.tensor([3, 4, 5, 6])
    b["attention_mask"][1, 7:] = 0
    b["attention_mask"][2, 10:] = 0
    b["attention_mask"][3, 1:] = 0  # a one-token sequence
    return b


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_coda_inference_runs_ffn_on_exactly_k_real_tokens(fraction: float, arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": "coda", "route_fraction": fraction})
    _perturb(pm)
    b = _padded_batch(arch)
    valid = b["attention_mask"].bool()
    k = [min(max(1, math.ceil(fraction * int(n))), int(n)) for n in valid.sum(-1)]
    layers = coda_layers(pm.base_model)
    assert len(layers) == LAYERS
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = []
    for _, layer in layers:
        seen = {}
        hooks.append(layer.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0])))
        hooks.append(
            layer.heavy.register_forward_hook(
                lambda m, a, out, seen=seen: calls.append((seen["x"], a[0]))
            )
        )
    tiny.logits(pm, b)
    assert len(calls) == LAYERS, "the FFN ran more than once per layer"
    for x, gathered in calls:
        assert gathered.shape[:2] == (1, sum(k)), f"FFN saw {gathered.shape[1]} tokens, k = {k}"
        # Where did each gathered token come from? Only real tokens, exactly k per row.
        dist = torch.cdist(
            gathered[0], x.reshape(-1, x.shape[-1]), compute_mode="donot_use_mm_for_euclid_dist"
        )
        src = dist.argmin(-1)
        assert torch.all(dist.min(-1).values < 1e-6)
        rows, cols = src // x.shape[1], src % x.shape[1]
        assert valid[rows, cols].all(), "a padding token was routed"
        assert torch.bincount(rows, minlength=len(k)).tolist() == k


def test_coda_routed_tokens_match_full_computation(arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": "coda", "bottleneck": 4})
    _perturb(pm)
    name, layer = coda_layers(pm.base_model)[0]
    layer.routing.mask = None
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sparse = layer(x)
        dense_ffn = layer.heavy(x)  # the FFN on every token
        light = layer.scaling * layer.adapter(x)
        scores, k, valid = layer.routing_weights(x)
    routed = hard_topk(scores, k, valid)
    assert routed.sum(-1).tolist() == [4, 4, 4]
    torch.testing.assert_close(sparse[routed], (light + dense_ffn)[routed], atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse[~routed], light[~routed], atol=0, rtol=0)


def test_coda_padding_does_not_change_real_tokens(arch: str) -> None:
    """A sequence padded to a longer length gives its real tokens the same outputs:
    padding neither gets routed nor counts towards k."""
    pm = peft_core.apply(tiny.model(arch), {"name": "coda"})
    _perturb(pm)
    ids = tiny.batch(arch, size=1)["input_ids"]

    def last_hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                -1
            ]

    for n in (4, 5, 7, 8, 9):
        short = last_hidden(ids[:, :n], torch.ones(1, n, dtype=torch.long))
        mask = torch.zeros_like(ids)
        mask[:, :n] = 1
        torch.testing.assert_close(last_hidden(ids, mask)[:, :n], short, atol=1e-5, rtol=0)


def test_soft_topk_solves_the_entropic_problem() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 20, generator=g) * 2
    valid = torch.ones(6, 20, dtype=torch.bool)
    valid[1, 15:] = False
    valid[4, 3:] = False
    k = route_counts(valid, 0.3)
    for eps in (0.05, 0.5, 2.0):
        lam = soft_topk(scores, k, valid, eps)
        assert torch.all((lam >= 0) & (lam <= 1))
        assert torch.all(lam[~valid] == 0)
        torch.testing.assert_close(lam.sum(-1), k.float(), atol=1e-4, rtol=0)
        for r in range(6):
            want = _bisect_soft_topk(scores[r, valid[r]], int(k[r]), eps)
            torch.testing.assert_close(lam[r, valid[r]].double(), want, atol=1e-5, rtol=0)
    # As ε -> 0 the soft weights become the hard top-k indicator (on well-separated scores).
    spaced = torch.stack([torch.randperm(20, generator=g).float() * 0.1 for _ in range(6)])
    torch.testing.assert_close(
        soft_topk(spaced, k, valid, 1e-3), hard_topk(spaced, k, valid).float(), atol=1e-6, rtol=0
    )


def test_soft_topk_gradient_is_exact() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    k = route_counts(valid, 0.4)
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, k, valid, 0.3), (scores,))


def test_coda_router_learns_through_soft_routing(arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": "coda"})
    pm.train()
    pm(**_padded_batch(arch)).loss.backward()
    for name, layer in coda_layers(pm.base_model):
        grad = layer.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_coda_gradient_checkpointing_routes_like_the_forward() -> None:
    """Recomputation during backward must see the same padding mask as the forward."""
    b = _padded_batch("llama")
    grads = []
    for checkpointing in (False, True):
        pm = peft_core.apply(tiny.model("llama"), {"name": "coda"})
        _perturb(pm)
        if checkpointing:
            pm.enable_gradient_checkpointing()
        pm.train()
        pm(**b).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.trainable_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_coda_generate_with_cache_and_left_padding() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "coda"})
    _perturb(pm)
    b = tiny.batch("llama", size=2)
    b["attention_mask"][0, :4] = 0
    out = pm.generate(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=4,
        do_sample=False, pad_token_id=0,
    )
    assert out.shape == (2, tiny.SEQ + 4)


# -- placement, counts, config -----------------------------------------------------------------
@pytest.mark.parametrize(
    "method,count",
    [("adapter_houlsby", 2), ("adapter_pfeiffer", 1), ("adapter_parallel", 1), ("coda", 1)],
)
def test_adapters_sit_in_every_block_at_the_table_hook_points(
    method: str, count: int, arch: str
) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": method})
    block_fmt, _, attn_out, ffn_in, ffn_out = HOOKS[arch]
    where = {
        "adapter_houlsby": [attn_out, ffn_out],
        "adapter_pfeiffer": [ffn_out],
        "adapter_parallel": [ffn_out],
        "coda": [ffn_in],
    }[method]
    names = {n.rsplit(".adapter.", 1)[0] for n, _ in pm.trainable_parameters() if ".adapter." in n}
    assert names == {f"{block_fmt.format(i=i)}.{w}" for i in range(LAYERS) for w in where}
    assert len(names) == count * LAYERS


def test_target_modules_selects_blocks(arch: str) -> None:
    block_fmt = HOOKS[arch][0]
    last = block_fmt.format(i=LAYERS - 1)
    pm = peft_core.apply(tiny.model(arch), {"name": "adapter_pfeiffer", "target_modules": [last]})
    assert {n.split(".adapter.")[0] for n, _ in pm.trainable_parameters() if ".adapter." in n} == {
        f"{last}.{HOOKS[arch][4]}"
    }
    with pytest.raises(peft_core.TargetError, match="transformer block"):
        peft_core.apply(tiny.model(arch), {"name": "adapter_pfeiffer", "target_modules": ["nope"]})


CONFIGS = [
    {"name": "adapter_houlsby"},
    {"name": "adapter_houlsby", "train_layer_norms": False, "bottleneck": 7},
    {"name": "adapter_pfeiffer", "reduction_factor": 4},
    {"name": "adapter_pfeiffer", "train_layer_norms": True, "activation": "gelu"},
    {"name": "adapter_parallel"},
    {"name": "adapter_parallel", "attention": True, "bottleneck": 3},
    {"name": "coda"},
    {"name": "coda", "train_layer_norms": True, "bottleneck": 6},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_trainable_params_match_the_formula(config: dict, arch: str) -> None:
    base = tiny.model(arch)
    expected = peft_core.get(config["name"])(
        peft_core.MethodConfig.from_dict(config)
    ).expected_trainable_params(base)
    pm = peft_core.apply(base, config)
    assert pm.summary()["trainable_params"] == expected
    assert pm.method.expected_trainable_params(pm.base_model) == expected


def test_trainable_params_formula_by_numbers() -> None:
    """Tiny Llama: d = 32, 2 blocks, r = 32 // 16 = 2, each adapter 2·32·2 + 2 + 32 = 162."""
    counts = {
        "adapter_houlsby": 2 * 2 * 162 + 2 * 2 * 32,  # + two RMSNorm (32 each) per block
        "adapter_pfeiffer": 2 * 162,
        "adapter_parallel": 2 * 162,
        "coda": 2 * (162 + 32),  # + the router
    }
    for name, n in counts.items():
        assert (
            peft_core.apply(tiny.model("llama"), {"name": name}).summary()["trainable_params"] == n
        )


def test_parallel_adapter_needs_the_sublayer_input() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "adapter_parallel"})
    down = pm.base_model.get_submodule("model.layers.0.mlp.down_proj")
    with pytest.raises(peft_core.PeftError, match="sublayer's input was not seen"):
        down(torch.zeros(1, 2, 64))


@pytest.mark.parametrize(
    "config,field",
    [
        ({"name": "adapter_houlsby", "bottleneck": -1}, "bottleneck"),
        ({"name": "adapter_pfeiffer", "activation": "softmax"}, "activation"),
        ({"name": "adapter_parallel", "scaling": 0}, "scaling"),
        ({"name": "coda", "route_fraction": 1.5}, "route_fraction"),
        ({"name": "coda", "epsilon": 0.0}, "epsilon"),
        ({"name": "adapter_pfeiffer", "reduction_factor": 0}, "reduction_factor"),
    ],
)
def test_bad_config_names_the_field(config: dict, field: str) -> None:
    with pytest.raises(peft_core.ConfigError, match=rf"{config['name']}\.{field}"):
        peft_core.MethodConfig.from_dict(config)


def test_coda_layer_is_a_coda_ffn_on_bert_split_ffn() -> None:
    pm = peft_core.apply(tiny.model("bert"), {"name": "coda"})
    block = pm.base_model.bert.encoder.layer[0]
    assert isinstance(block.intermediate, CodaFFN)
    assert isinstance(block.output.dense, torch.nn.Identity)


def test_coda_routing_every_token_is_the_parallel_adapter(arch: str) -> None:
    """With route_fraction = 1 at inference, CoDA computes exactly FFN(x) + s·A(x)."""
    par = peft_core.apply(
        tiny.model(arch), {"name": "adapter_parallel", "bottleneck": 3, "scaling": 4.0}
    )
    _perturb(par)
    coda = peft_core.apply(
        tiny.model(arch), {"name": "coda", "bottleneck": 3, "route_fraction": 1.0, "scaling": 4.0}
    )
    block_fmt, _, _, ffn_in, ffn_out = HOOKS[arch]
    with torch.no_grad():
        for i in range(LAYERS):
            block = block_fmt.format(i=i)
            src = _weights(par, f"{block}.{ffn_out}.adapter")
            for k, v in _weights(coda, f"{block}.{ffn_in}.adapter").items():
                v.copy_(src[k])
        for n, p in par.trainable_parameters():  # the classifier head of BERT
            if ".adapter." not in n:
                coda.base_model.get_parameter(n).copy_(p)
    b = _padded_batch(arch)
    got, want = _outputs(coda, b), _outputs(par, b)
    real = b["attention_mask"].bool()  # padding skips CoDA's FFN, so compare real tokens only
    torch.testing.assert_close(got["hidden"][real], want["hidden"][real], atol=1e-5, rtol=0)
