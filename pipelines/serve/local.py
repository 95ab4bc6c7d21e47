"""In-process inference from a trained or registered adapter: ``predict`` (classification)
and ``generate`` (causal LM), from a folder or a ``models:/NAME@ALIAS`` registry URI.

An adapter folder written by the training stage carries, beside the peft_core config, a
``pipeline`` block naming its base model, task, tokenizer and label names, so serving needs
nothing but the adapter. ``laplace_lora`` adapters with a fitted posterior answer with their
posterior predictive (linearised Laplace), not the MAP model's softmax.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

import peft_core

from .. import models
from ..errors import InputError


class ServeError(InputError, RuntimeError):
    """The adapter cannot serve this request (wrong task, missing metadata...): exit 2.
    Still a ``RuntimeError``, as before the tree."""


@dataclasses.dataclass
class LoadedAdapter:
    model: peft_core.PeftModel
    tokenizer: Any
    task: str
    label_names: list[str] | None
    max_length: int
    source: str


def pipeline_info(adapter_dir: str | Path) -> dict[str, Any]:
    cfg = peft_core.read_adapter_config(adapter_dir)
    info = cfg.get("pipeline")
    if not info or "model" not in info or "task" not in info:
        raise ServeError(
            f"{adapter_dir}: adapter_config.json has no 'pipeline' block (model, task); "
            "it was not written by peftpipe train"
        )
    return info


def load(model_ref: str, *, tracking_uri: str | None = None) -> LoadedAdapter:
    """Load an adapter folder or a ``models:/`` URI onto its base model, ready for inference."""
    if model_ref.startswith("models:/"):
        from mlflow import MlflowClient

        from ..registry import download

        client = MlflowClient(tracking_uri=tracking_uri)
        version, folder = download(client, model_ref, tempfile.mkdtemp(prefix="peftpipe-serve-"))
        source = f"{model_ref} (v{version})"
    else:
        folder, source = Path(model_ref), model_ref
        if not folder.is_dir():
            raise ServeError(f"model: {model_ref!r} is neither a models:/ URI nor a folder")
    return load_folder(folder, source=source)


def load_base(info: dict[str, Any]):
    """The base model and tokenizer an adapter's ``pipeline`` block names."""
    labels = info.get("label_names")
    base = models.load_model(info["model"], info["task"],
                             num_labels=len(labels) if labels else None,
                             quantization=info.get("quantization"))
    return base, models.load_tokenizer(info.get("tokenizer") or info["model"])


def load_folder(folder: str | Path, *, source: str | None = None, base=None,
                tokenizer=None, check_base: bool = True) -> LoadedAdapter:
    """An adapter folder onto its base model (``base``/``tokenizer`` given: onto that one,
    which must have the fingerprint the adapter was trained on)."""
    info = pipeline_info(folder)
    if base is None:
        base, tokenizer = load_base(info)
    pm = peft_core.load_adapter(base, folder, check_base=check_base)
    pm.eval()
    return LoadedAdapter(pm, tokenizer, info["task"], info.get("label_names"),
                         int(info.get("max_length", 512)), source or str(folder))


def uses_posterior(adapter: LoadedAdapter) -> bool:
    """Whether this is a ``laplace_lora`` adapter whose posterior was fitted."""
    if adapter.model.method.config.name != "laplace_lora":
        return False
    from peft_core.methods.laplace import prior_precision

    return prior_precision(adapter.model) > 0


def class_probs(adapter: LoadedAdapter, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, C)`` class probabilities: the posterior predictive for a fitted laplace_lora,
    the softmax of the logits otherwise."""
    if uses_posterior(adapter):
        from peft_core.methods.laplace import predictive_probs

        with torch.enable_grad():  # the linearised predictive needs the logits' Jacobian
            return predictive_probs(adapter.model, dict(enc)).detach().float()
    with torch.no_grad():
        return torch.softmax(adapter.model(**enc).logits.float(), dim=-1)


def predict(adapter: LoadedAdapter, texts: list[str]) -> list[dict[str, Any]]:
    """Class label and probabilities for each text."""
    if adapter.task != "classification":
        raise ServeError(f"predict needs a classification adapter; this one is "
                         f"{adapter.task!r} (use generate)")
    enc = adapter.tokenizer(texts, padding=True, truncation=True, max_length=adapter.max_length,
                            return_tensors="pt")
    probs = class_probs(adapter, enc)
    names = adapter.label_names or [str(i) for i in range(probs.shape[-1])]
    return [
        {"text": t, "label": names[int(p.argmax())],
         "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}}
        for t, p in zip(texts, probs)
    ]


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str | None:
    """``messages`` through the tokenizer's chat template (None when it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_batch(adapter: LoadedAdapter, prompts: list[str | list[dict[str, str]]], *,
                   max_new_tokens: int = 64, chat: bool = True) -> list[dict[str, Any]]:
    """Greedy completions of several prompts in one left-padded batch. A prompt is a string
    (through the chat template as a user turn when ``chat`` and the tokenizer has one, as the
    instruction template trained it) or a list of chat messages. Returns ``text``,
    ``prompt_tokens``, ``completion_tokens`` and ``finish_reason`` (``stop``/``length``)."""
    if adapter.task == "classification":
        raise ServeError("generate needs a causal-LM adapter; this one is a classifier "
                         "(use predict)")
    tok = adapter.tokenizer
    texts, special = [], []
    for p in prompts:
        messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
        templated = chat_text(tok, messages) if (chat or isinstance(p, list)) else None
        if templated is None and isinstance(p, list):
            templated = "\n".join(m.get("content", "") for m in messages)
        texts.append(templated if templated is not None else p)
        special.append(templated is None)
    side = tok.padding_side
    tok.padding_side = "left"  # decoder batches pad on the left so every row ends at its prompt
    try:
        # one tokenisation setting per batch: templates carry their own special tokens
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=all(special))
    finally:
        tok.padding_side = side
    out = adapter.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    width = enc["input_ids"].shape[1]
    results = []
    for i in range(len(prompts)):
        new = out[i, width:].tolist()
        # a row stops at its first eos (what follows is padding); without one it ran out
        n = next((j for j, t in enumerate(new) if t == tok.eos_token_id), None)
        kept = new if n is None else new[:n]
        results.append({
            "text": tok.decode(kept, skip_special_tokens=True).strip(),
            "prompt_tokens": int(enc["attention_mask"][i].sum()),
            "completion_tokens": len(kept),
            "finish_reason": "length" if n is None else "stop",
        })
    return results


def generate(adapter: LoadedAdapter, prompt: str, *, max_new_tokens: int = 64,
             chat: bool = True) -> str:
    """Greedy completion of ``prompt`` (through the chat template when the tokenizer has one,
    as the instruction template trained it)."""
    return generate_batch(adapter, [prompt], max_new_tokens=max_new_tokens, chat=chat)[0]["text"]
