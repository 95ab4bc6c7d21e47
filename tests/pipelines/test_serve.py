"""Serving in-process: ``predict``/``generate`` from a folder and from ``models:/`` (both task
kinds), the registered version as an MLflow Model, adapters sharing one base, Laplace-LoRA's
posterior predictive. Base models: the real MiniLM classifier and a tiny random Llama with
SmolLM2's tokenizer (saved as a folder); adapters are built directly with peft_core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peft_core
from pipelines import models, promote, registry, serve, tracking
from pipelines.serve.adapters import SharedBase

pytestmark = pytest.mark.timeout(180)

LABELS = ["negative", "positive"]
TEXTS = ["a wonderful, moving film", "dull and far too long"]


# -- helpers shared with test_serve_app.py ------------------------------------------------------

def tiny_lm_folder(path: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    tok = models.load_tokenizer("builtin:smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_adapter(path: Path, base_ref: str, task: str, seed: int, method: str = "lora") -> Path:
    """A LoRA adapter whose B matrices are random (seeded), so adapters answer differently."""
    base = models.load_model(base_ref, task, num_labels=2 if task == "classification" else None)
    pm = peft_core.apply(base, {"name": method, "rank": 4})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.trainable_parameters():
            if "lora_B" in name or "classifier" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    block = {"model": base_ref, "task": task, "max_length": 64,
             "tokenizer": base_ref, "label_names": LABELS if task == "classification" else None}
    return pm.save(path, pipeline=block)


def register(client, name: str, experiment: str, adapter: Path, *, score: float = 0.0) -> str:
    """Log ``adapter`` as a run's artifact, register it (MLflow Model) and run the gate with
    ``score`` as its eval loss (lower wins)."""
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(adapter), "adapter")
    client.set_terminated(run)
    client.set_tag(run, "score", str(score))
    v = promote.register_model(client, name, run)
    rcfg = registry.RegistryConfig(model_name=name, metric="eval_loss", mode="min")
    registry.decide(client, rcfg, v,
                    lambda ver: float(client.get_run(client.get_model_version(name, ver).run_id)
                                      .data.tags["score"]))
    return v


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory) -> str:
    return str(tiny_lm_folder(tmp_path_factory.mktemp("bases") / "tiny-llama"))


@pytest.fixture
def store(tmp_path):
    cfg = tracking.TrackingConfig(experiment="serve")
    client = tracking.client(cfg, tmp_path)
    return client, tracking.experiment_id(client, cfg, tmp_path)


# -- tests ---------------------------------------------------------------------------------------

def test_predict_from_adapter_folder(tmp_path) -> None:
    torch.manual_seed(0)
    base = models.load_model("builtin:minilm", "classification", num_labels=2)
    pm = peft_core.apply(base, {"name": "lora", "rank": 4})
    tok = models.load_tokenizer("builtin:minilm")
    with torch.no_grad():
        expected = torch.softmax(pm(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1)
    pm.save(tmp_path / "a", pipeline={"model": "builtin:minilm", "task": "classification",
                                      "label_names": LABELS, "max_length": 64})
    loaded = serve.load(str(tmp_path / "a"))
    out = serve.predict(loaded, TEXTS)
    assert [o["label"] for o in out] == [LABELS[int(i)] for i in expected.argmax(-1)]
    for o, p in zip(out, expected):
        assert o["probabilities"]["positive"] == pytest.approx(float(p[1]), abs=1e-5)
    with pytest.raises(serve.ServeError, match="use predict"):
        serve.generate(loaded, "hello")


def test_folder_without_pipeline_block_is_refused(tmp_path) -> None:
    base = models.load_model("builtin:minilm", "classification", num_labels=2)
    peft_core.apply(base, {"name": "linear_probe"}).save(tmp_path / "a")
    with pytest.raises(serve.ServeError, match="no 'pipeline' block"):
        serve.load(str(tmp_path / "a"))
    with pytest.raises(serve.ServeError, match="neither a models:/ URI nor a folder"):
        serve.load(str(tmp_path / "missing"))


def test_both_task_kinds_from_folder_and_registry_and_as_mlflow_model(tmp_path, store,
                                                                       lm_base) -> None:
    """predict/generate from a folder and from models:/NAME@champion give the same answers,
    and so does ``mlflow.pyfunc.load_model`` on the registered version."""
    import mlflow.pyfunc
    import pandas as pd

    client, exp = store
    clf = make_adapter(tmp_path / "clf", "builtin:minilm", "classification", seed=1)
    lm = make_adapter(tmp_path / "lm", lm_base, "causal_lm", seed=2)
    register(client, "clf", exp, clf)
    register(client, "lm", exp, lm)
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        from_folder = serve.predict(serve.load(str(clf)), TEXTS)
        from_registry = serve.predict(
            serve.load("models:/clf@champion", tracking_uri=client.tracking_uri), TEXTS)
        assert from_registry == from_folder
        pyfunc = mlflow.pyfunc.load_model("models:/clf@champion")
        df = pyfunc.predict(pd.DataFrame({"text": TEXTS}))
        assert list(df["label"]) == [r["label"] for r in from_folder]
        for got, want in zip(df["probabilities"], from_folder):
            assert got == pytest.approx(want["probabilities"], abs=1e-6)
        sig = pyfunc.metadata.signature
        assert sig.inputs.input_names() == ["text"]
        assert pyfunc.metadata.metadata["peftpipe"]["base_model"] == "builtin:minilm"

        prompt = "What is the capital of France?"
        text = serve.generate(serve.load(str(lm)), prompt, max_new_tokens=8)
        assert text and text == serve.generate(
            serve.load("models:/lm@champion", tracking_uri=client.tracking_uri), prompt,
            max_new_tokens=8)
        lm_pyfunc = mlflow.pyfunc.load_model("models:/lm@champion")
        out = lm_pyfunc.predict(pd.DataFrame({"prompt": [prompt]}), params={"max_new_tokens": 8})
        assert list(out["text"]) == [text]
        assert lm_pyfunc.metadata.get_input_schema().input_names() == ["prompt"]
    finally:
        mlflow.set_tracking_uri(None)

    # The version references its base (name + fingerprint) and never contains its weights.
    mv = client.get_model_version("lm", "1")
    assert mv.tags["base_model"] == lm_base and len(mv.tags["base_fingerprint"]) == 16
    _, folder = registry.download(client, "models:/lm/1", tmp_path / "dl")
    model_dir = folder.parents[1]
    assert (model_dir / "MLmodel").is_file()
    files = {p.name for p in model_dir.rglob("*") if p.is_file()}
    assert "model.safetensors" not in files and "adapter.safetensors" in files
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    base_size = (Path(lm_base) / "model.safetensors").stat().st_size
    assert size < base_size / 4, (size, base_size)


def test_adapters_share_one_base(tmp_path) -> None:
    """Two classifier adapters over one MiniLM: each answers as if loaded alone, and the
    frozen base tensors are the same storage (not copies)."""
    a = make_adapter(tmp_path / "a", "builtin:minilm", "classification", seed=1)
    b = make_adapter(tmp_path / "b", "builtin:minilm", "classification", seed=2)
    shared = SharedBase(serve.pipeline_info(a))
    la, lb = shared.attach(a), shared.attach(b)
    assert serve.predict(la, TEXTS) == serve.predict(serve.load(str(a)), TEXTS)
    assert serve.predict(lb, TEXTS) == serve.predict(serve.load(str(b)), TEXTS)
    assert serve.predict(la, TEXTS) != serve.predict(lb, TEXTS)
    pa = dict(la.model.base_model.named_parameters())
    pb = dict(lb.model.base_model.named_parameters())
    same = [n for n in pa if n in pb and pa[n].data_ptr() == pb[n].data_ptr()]
    assert any("embeddings" in n for n in same)
    assert not any(n.startswith("classifier") for n in same)  # each adapter's own head
    with pytest.raises(serve.ServeError, match="another base"):
        other = tmp_path / "other"
        make_adapter(other, str(tiny_lm_folder(tmp_path / "lm")), "causal_lm", seed=3)
        shared.attach(other)


def test_laplace_lora_answers_with_its_posterior_predictive(tmp_path) -> None:
    from peft_core.methods.laplace import predictive_probs

    torch.manual_seed(0)
    tok = models.load_tokenizer("builtin:minilm")
    base = models.load_model("builtin:minilm", "classification", num_labels=2)
    pm = peft_core.apply(base, {"name": "laplace_lora", "rank": 4})
    train = dict(tok(TEXTS * 4, padding=True, return_tensors="pt"))
    train["labels"] = torch.tensor([1, 0] * 4)
    pm.finalize([train])
    pm.save(tmp_path / "la", pipeline={"model": "builtin:minilm", "task": "classification",
                                       "label_names": LABELS, "max_length": 64})
    loaded = serve.load(str(tmp_path / "la"))
    assert serve.uses_posterior(loaded)
    enc = dict(tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    want = predictive_probs(loaded.model, enc)
    with torch.no_grad():
        map_probs = torch.softmax(loaded.model(**enc).logits, -1)
    out = serve.predict(loaded, TEXTS)
    got = torch.tensor([[o["probabilities"][n] for n in LABELS] for o in out])
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)
    assert not torch.allclose(got, map_probs, atol=1e-4)  # not the MAP point


def test_export_peft_merged_vllm_and_refusals(tmp_path, store, lm_base) -> None:
    from pipelines.serve import export

    client, exp = store
    lm = make_adapter(tmp_path / "lm", lm_base, "causal_lm", seed=4)
    register(client, "ex", exp, lm)
    tags = client.get_model_version("ex", "1").tags
    assert tags["export.peft"] == tags["export.merged"] == tags["export.vllm"] == "yes"
    assert tags["vllm.max_lora_rank"] == "8"  # rank 4 -> vLLM's smallest setting
    _, folder = registry.download(client, "models:/ex@champion", tmp_path / "dl")

    out = export.export(folder, "vllm", tmp_path / "vllm")
    hf = json.loads((out / "adapter_config.json").read_text())
    assert hf["peft_type"] == "LORA" and hf["r"] == 4
    assert json.loads((out / "vllm.json").read_text())["max_lora_rank"] == 8

    # merged: a plain transformers folder whose logits are the adapter's
    merged = export.export(folder, "merged", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = serve.load(str(folder)).model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # an additive adapter: no merge, no vLLM; the reason is given
    base = models.load_model(lm_base, "causal_lm")
    add = peft_core.apply(base, {"name": "adapter_houlsby"}).save(
        tmp_path / "add", pipeline={"model": lm_base, "task": "causal_lm"})
    with pytest.raises(serve.ServeError, match="not mergeable"):
        export.export(add, "merged", tmp_path / "x")
    with pytest.raises(serve.ServeError, match="LoRA adapters only"):
        export.export(add, "vllm", tmp_path / "x")
    assert not (tmp_path / "x").exists()
