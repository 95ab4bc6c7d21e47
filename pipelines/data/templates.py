"""Task templates: rows of text -> token ids and training labels. Pure functions, no Ray.

Conventions (the data contract): ``labels`` are aligned with ``input_ids`` and the model
shifts them (Hugging Face causal LMs predict ``labels[i]`` from positions ``< i``); a label of
``-100`` is never trained. Nothing is padded here.

- ``classification``: the tokenizer's own special tokens (e.g. ``[CLS] … [SEP]``),
  truncated to ``max_length``; the label is a class index.
- ``instruction``: with a chat template, the prompt is the user turn rendered with
  ``add_generation_prompt=True`` and the response is the rest of the rendered two-turn
  conversation (the assistant text and its end-of-turn marker); without one, the prompt is
  ``prompt + "\\n"`` (after the BOS the tokenizer adds, if any) and the response is
  ``response + EOS``. Prompt tokens get label ``-100``; truncation keeps the prompt and cuts
  the response; a prompt that fills ``max_length`` leaves nothing to learn and is rejected.
- ``causal_lm``: the text with the tokenizer's special tokens plus EOS. Unpacked, it is
  truncated to ``max_length``. Packed, documents are concatenated (each ending in EOS) and cut
  into rows of exactly ``max_length`` tokens (the last row of a batch may be shorter); a
  document longer than a row continues in the next row. The first token of every document
  gets label ``-100``, so no loss term predicts a document from the one before it. Attention
  is *not* blocked between documents of one row (``attention_mask`` is all ones, as in
  standard GPT-style packing): a later document can attend to an earlier one, which only adds
  context; a block-diagonal mask would need a 2-D mask or varlen attention the contract does
  not carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .validate import Reject

IGNORE = -100
_PROBES = [
    "Hello world", " leading space", "Ünïcödé — ok?", "tabs\tand\nnewlines", "x" * 50,
    "The Rock is destined to be the 21st Century's new ''Conan''.",
]


class Encoder:
    """Batch tokenisation with a Hugging Face fast tokenizer's Rust backend, or its call.

    ``encode_batch`` on the backend skips the Python-side dict building of
    ``tokenizer(...)`` (about 20% of the time for short rows) and needs only the
    ``tokenizers`` package, so an actor can start without importing transformers or torch.
    :meth:`from_hf` uses the backend only when it gives exactly the ids of ``tokenizer(...)``
    on probe strings; otherwise the ordinary call.
    """

    def __init__(self, *, backend: Any = None, tok: Any = None, truncation_side: str = "right"):
        if backend is None and tok is None:
            raise ValueError("Encoder: needs a backend tokenizer or a Hugging Face tokenizer")
        self.backend = backend
        self.tok = tok
        self.truncation_side = truncation_side

    @classmethod
    def from_hf(cls, tok: Any) -> Encoder:
        side = getattr(tok, "truncation_side", "right")
        fast = getattr(tok, "is_fast", False)
        backend = getattr(tok, "backend_tokenizer", None) if fast else None
        if backend is not None:
            fast = cls(backend=backend, truncation_side=side)
            slow = cls(tok=tok, truncation_side=side)
            if all(fast.ids(_PROBES, special=sp, max_length=ml) ==
                   slow.ids(_PROBES, special=sp, max_length=ml)
                   for sp in (True, False) for ml in (None, 8)):
                return cls(backend=backend, tok=tok, truncation_side=side)
        return cls(tok=tok, truncation_side=side)

    def _hf(self, texts: list[str], *, special: bool, max_length: int | None) -> list[list[int]]:
        enc = self.tok(texts, add_special_tokens=special, truncation=max_length is not None,
                       max_length=max_length, return_attention_mask=False,
                       return_token_type_ids=False)
        return [list(x) for x in enc["input_ids"]]

    def _rust(self, texts: list[str], *, special: bool, max_length: int | None) -> list[list[int]]:
        b = self.backend
        b.no_padding()
        if max_length is None:
            b.no_truncation()
        else:
            b.enable_truncation(max_length, stride=0, strategy="longest_first",
                                direction=self.truncation_side)
        return [e.ids for e in b.encode_batch(texts, add_special_tokens=special)]

    def ids(self, texts: list[str], *, special: bool, max_length: int | None = None
            ) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            return self._rust(texts, special=special, max_length=max_length)
        return self._hf(texts, special=special, max_length=max_length)

    def ids_and_starts(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Each text's token ids (no special tokens added, no truncation) and the
        character at which each token starts: where a rendered conversation's turns fall."""
        if not texts:
            return []
        if self.backend is not None:
            b = self.backend
            b.no_padding()
            b.no_truncation()
            return [(e.ids, [o[0] for o in e.offsets])
                    for e in b.encode_batch(texts, add_special_tokens=False)]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True,
                       return_attention_mask=False, return_token_type_ids=False)
        return [(list(ids), [o[0] for o in offs])
                for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


@dataclass(frozen=True)
class TokenizerFacts:
    """What the template and later stages need to know about the tokenizer."""

    cls: str
    pad_token_id: int | None
    padding_side: str
    truncation_side: str
    eos_token_id: int | None
    bos_token_id: int | None
    has_chat_template: bool

    @classmethod
    def of(cls, tok: Any) -> TokenizerFacts:
        return cls(
            cls=type(tok).__name__,
            pad_token_id=tok.pad_token_id,
            padding_side=tok.padding_side,
            truncation_side=getattr(tok, "truncation_side", "right"),
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            has_chat_template=bool(getattr(tok, "chat_template", None)),
        )


@dataclass(frozen=True)
class TokenizerSpec:
    """How a worker gets the tokenizer: the serialized Rust backend when that suffices
    (checked on the driver), else the name for ``pipelines.models.load_tokenizer``."""

    name: str
    facts: TokenizerFacts
    backend_json: str | None = None
    chat_template: str | None = None  # data.chat_template's own template, set on load

    @classmethod
    def build(cls, name: str, tok: Any, *, needs_hf: bool,
              chat_template: str | None = None) -> TokenizerSpec:
        enc = Encoder.from_hf(tok)
        rust = enc.backend is not None and not needs_hf
        return cls(name, TokenizerFacts.of(tok), enc.backend.to_str() if rust else None,
                   chat_template)

    def load(self) -> tuple[Encoder, Any]:
        """(encoder, Hugging Face tokenizer or None)."""
        if self.backend_json is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.backend_json)
            return Encoder(backend=backend, truncation_side=self.facts.truncation_side), None
        from pipelines.models import load_tokenizer

        tok = load_tokenizer(self.name)
        if self.chat_template is not None:
            tok.chat_template = self.chat_template
        return Encoder.from_hf(tok), tok


def classification(enc: Encoder, texts: list[str], max_length: int) -> list[list[int]]:
    return enc.ids(texts, special=True, max_length=max_length)


def causal_lm(enc: Encoder, texts: list[str], eos: int | None,
              max_length: int | None) -> list[list[int]]:
    """Documents with EOS appended; cut to ``max_length`` unless it is None (packing)."""
    docs = enc.ids(texts, special=True)
    if eos is not None:
        for d in docs:
            if not d or d[-1] != eos:
                d.append(eos)
    if max_length is not None:
        docs = [d[:max_length] for d in docs]
    return docs


def chat_segments(tok: Any, prompts: list[str], responses: list[str]
                  ) -> tuple[list[str], list[str]]:
    """(prompt text, response text) rendered with the tokenizer's chat template."""
    users = [[{"role": "user", "content": p}] for p in prompts]
    heads = tok.apply_chat_template(users, add_generation_prompt=True, tokenize=False)
    fulls = tok.apply_chat_template(
        [u + [{"role": "assistant", "content": r}] for u, r in zip(users, responses)],
        tokenize=False,
    )
    tails = []
    for head, full in zip(heads, fulls):
        if not full.startswith(head):
            raise ValueError(
                "chat_template: the tokenizer's chat template does not render the prompt as a "
                "prefix of the conversation, so prompt tokens cannot be masked; set "
                "chat_template: false to use the plain template"
            )
        tails.append(full[len(head):])
    return heads, tails


def instruction(enc: Encoder, prompts: list[str], responses: list[str], max_length: int, *,
                chat_tok: Any = None, bos: int | None = None, eos: int | None = None
                ) -> list[tuple[list[int], list[int]] | Reject]:
    """(input_ids, labels) per row, prompt positions labelled -100; or a Reject.

    ``chat_tok`` (a Hugging Face tokenizer) renders the chat template; without it the plain
    template uses ``bos`` (when the tokenizer adds one) and ``eos``.
    """
    if chat_tok is not None:
        heads, tails = chat_segments(chat_tok, prompts, responses)
        p_ids = enc.ids(heads, special=False)
        r_ids = enc.ids(tails, special=False)
    else:
        p_ids = enc.ids([p + "\n" for p in prompts], special=False)
        if bos is not None and enc.ids(["a"], special=True)[0][:1] == [bos]:
            p_ids = [[bos, *p] for p in p_ids]
        r_ids = enc.ids(responses, special=False)
        if eos is not None:
            r_ids = [[*r, eos] for r in r_ids]
    out: list[tuple[list[int], list[int]] | Reject] = []
    for p, r in zip(p_ids, r_ids):
        if len(p) >= max_length:
            out.append(Reject("too_long", f"the prompt takes {len(p)} tokens and max_length is "
                                          f"{max_length}: no response token is left to train"))
            continue
        r = r[: max_length - len(p)]
        out.append((p + r, [IGNORE] * len(p) + r))
    return out


def pack(docs: list[list[int]], seq_len: int) -> list[tuple[list[int], list[int], int]]:
    """Concatenate documents into rows of ``seq_len`` tokens: (ids, labels, documents started).

    A document's first token is labelled -100 (never predicted across a boundary); a
    document continuing from the previous row keeps its label at position 0, which the
    model's shift never trains anyway.
    """
    rows: list[tuple[list[int], list[int], int]] = []
    ids: list[int] = []
    labels: list[int] = []
    started = 0
    for d in docs:
        i = 0
        while i < len(d):
            take = d[i : i + seq_len - len(ids)]
            lab = list(take)
            if i == 0:
                lab[0] = IGNORE
                started += 1
            ids += take
            labels += lab
            i += len(take)
            if len(ids) == seq_len:
                rows.append((ids, labels, started))
                ids, labels, started = [], [], 0
    if ids:
        rows.append((ids, labels, started))
    return rows
