"""Inference from a trained or registered adapter: ``predict`` (classification) and
``generate`` (causal LM), from a folder or a ``models:/NAME@ALIAS`` registry URI.

An adapter folder written by the training stage carries, beside the peft_core config, a
``pipeline`` block naming its base model, task, tokenizer and label names, so serving needs
nothing but the adapter.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

import peft_core

from . import models


class ServeError(RuntimeError):
    """The adapter cannot serve this request (wrong task, missing metadata...)."""


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

        from .registry import download

        client = MlflowClient(tracking_uri=tracking_uri)
        version, folder = download(client, model_ref, tempfile.mkdtemp(prefix="peftpipe-serve-"))
        source = f"{model_ref} (v{version})"
    else:
        folder, source = Path(model_ref), model_ref
        if not folder.is_dir():
            raise ServeError(f"model: {model_ref!r} is neither a models:/ URI nor a folder")
    info = pipeline_info(folder)
    labels = info.get("label_names")
    base = models.load_model(info["model"], info["task"], num_labels=len(labels) if labels else None,
                             quantization=info.get("quantization"))
    pm = peft_core.load_adapter(base, folder)
    pm.eval()
    tok = models.load_tokenizer(info.get("tokenizer") or info["model"])
    return LoadedAdapter(pm, tok, info["task"], labels, int(info.get("max_length", 512)), source)


@torch.no_grad()
def predict(adapter: LoadedAdapter, texts: list[str]) -> list[dict[str, Any]]:
    """Class label and probabilities for each text."""
    if adapter.task != "classification":
        raise ServeError(f"predict needs a classification adapter; this one is {adapter.task!r} (use generate)")
    enc = adapter.tokenizer(texts, padding=True, truncation=True, max_length=adapter.max_length,
                            return_tensors="pt")
    probs = torch.softmax(adapter.model(**enc).logits.float(), dim=-1)
    names = adapter.label_names or [str(i) for i in range(probs.shape[-1])]
    return [
        {"text": t, "label": names[int(p.argmax())],
         "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}}
        for t, p in zip(texts, probs)
    ]


@torch.no_grad()
def generate(adapter: LoadedAdapter, prompt: str, *, max_new_tokens: int = 64,
             chat: bool = True) -> str:
    """Greedy completion of ``prompt`` (through the chat template when the tokenizer has one,
    as the instruction template trained it)."""
    if adapter.task == "classification":
        raise ServeError("generate needs a causal-LM adapter; this one is a classifier (use predict)")
    tok = adapter.tokenizer
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(prompt, return_tensors="pt")
    out = adapter.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
