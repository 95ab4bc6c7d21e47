"""The data stage's configuration: one pydantic model whose errors name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import InputError

Task = Literal["classification", "instruction", "causal_lm"]
Format = Literal["auto", "jsonl", "parquet", "csv", "tsv", "hf_disk"]
#: how an instruction row holds its text: one prompt and one response, or a conversation
ChatFormat = Literal["auto", "prompt_response", "messages", "sharegpt", "alpaca"]
CONVERSATIONS = ("messages", "sharegpt", "alpaca")
SPLITS = ("train", "eval", "test")
#: default ``max_chars``: longer fields are rejected as ``oversized`` (a 2 MB "text" is a
#: scraping accident, not a training row; tokenizers turn it into a single unknown token)
MAX_CHARS = 100_000


class DataError(InputError):
    """The input data cannot make a dataset (no rows, every row rejected, splits too small,
    an unreadable file); the message names the file, field or row and what was expected."""


class MissingSourceError(DataError, FileNotFoundError):
    """A source matches no file."""


class SplitFractions(BaseModel):
    """Fractions of the rows that go to each split; they must add up to 1."""

    model_config = ConfigDict(extra="forbid")

    train: float = Field(0.8, ge=0.0, le=1.0)
    eval: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.eval + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + eval + test must be 1, got {self.train} + {self.eval} + {self.test} "
                f"= {total:g}"
            )
        if self.train <= 0:
            raise ValueError("train must be > 0: a dataset needs training rows")
        return self


class DataConfig(BaseModel):
    """What to read, how to turn rows into token sequences, and where to write them.

    ``sources`` are local paths, globs (``data/*.jsonl``, ``**`` allowed) or URIs pyarrow
    understands (``s3://bucket/prefix/*.parquet``, ``file:///abs/path``); a folder means
    every file in it with a known extension, or a Hugging Face ``save_to_disk`` dataset.
    Columns are named by the ``*_field`` options; a task uses only its own ones.

    The resource knobs (``num_actors``, ``actor_cpus``, ``task_cpus``) do not change the
    output and are not part of the dataset id. ``batch_size`` is the rows per table a read
    task yields (Ray Data merges them into ~4 MiB blocks, each tokenized as one batch and
    written as one Parquet part per split); it is part of the id when ``packing`` is on,
    because documents are packed within a block.
    """

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1)
    format: Format = "auto"
    task: Task
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    labels: list[str] | None = None
    # display names of the classes: a list in class order (``labels`` order, else the
    # inferred order) or a mapping label value -> name; predictions and reports show them
    label_names: list[str] | dict[str, str] | None = None
    tokenizer: str
    max_length: int = Field(256, ge=4)
    max_chars: int | None = Field(MAX_CHARS, ge=1)
    packing: bool = False
    # instruction rows: ``prompt_response`` (prompt_field/response_field), or a conversation
    # (``messages``: OpenAI turns, ``sharegpt``, ``alpaca``); ``auto`` looks at the first
    # row's columns (``messages``, ``conversations``, ``instruction``)
    chat_format: ChatFormat = "auto"
    # the column holding a conversation's turns (default ``messages`` / ``conversations``)
    messages_field: str | None = None
    # which turns of a conversation are trained on
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    # the tokenizer's chat template (None: when it has one), off (false), or a Jinja
    # template of its own (a string) used in its place
    chat_template: bool | str | None = None
    dedup: bool = False
    split: SplitFractions = Field(default_factory=SplitFractions)
    seed: int = 0
    data_root: str = "runs/data"
    max_rows: int | None = Field(None, ge=1)
    batch_size: int = Field(1024, ge=1)
    num_actors: int | None = Field(None, ge=1)
    actor_cpus: float | None = Field(None, gt=0)
    task_cpus: float | None = Field(None, gt=0)
    no_progress_timeout_s: float = Field(300.0, gt=0)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, v):
        # YAML gives ints for `labels: [0, 1]`; rows' integer labels are compared as text.
        if v is None:
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("expected a non-empty list of label names")
        out = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (str, int)):
                raise ValueError(f"label {x!r}: expected a string or an integer")
            out.append(str(x))
        if len(set(out)) != len(out):
            dup = sorted({x for x in out if out.count(x) > 1})
            raise ValueError(f"duplicate label(s) {dup}")
        return out

    @field_validator("label_names", mode="before")
    @classmethod
    def _names_as_strings(cls, v):
        if v is None:
            return v
        if isinstance(v, dict):
            if not v:
                raise ValueError("expected a non-empty mapping of label value -> name")
            out = {str(k): str(n) for k, n in v.items()}
            names = list(out.values())
        elif isinstance(v, list) and v:
            names = out = [str(n) for n in v]
        else:
            raise ValueError("expected a list of class names or a mapping label value -> name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class name(s) {dup}")
        return out

    @field_validator("sources")
    @classmethod
    def _non_empty_sources(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s.strip():
                raise ValueError("a source is an empty string")
        return v

    @model_validator(mode="after")
    def _task_options(self) -> DataConfig:
        if self.packing and self.task != "causal_lm":
            raise ValueError(f"packing: only the causal_lm task packs documents, not {self.task}")
        if self.labels is not None and self.task != "classification":
            raise ValueError(f"labels: only the classification task has labels, not {self.task}")
        if self.label_names is not None and self.task != "classification":
            raise ValueError("label_names: only the classification task has labels, "
                             f"not {self.task}")
        if self.labels is not None and self.label_names is not None:
            check_label_names(self.label_names, self.labels)
        if self.chat_format not in ("auto", "prompt_response") and self.task != "instruction":
            raise ValueError(f"chat_format: only the instruction task reads conversations, "
                             f"not {self.task}")
        if self.train_on != "assistant" and self.task != "instruction":
            raise ValueError(f"train_on: only the instruction task has turns, not {self.task}")
        if self.chat_format in CONVERSATIONS and self.chat_template is False:
            raise ValueError(f"chat_template: false, but chat_format {self.chat_format} is "
                             "rendered with a chat template")
        if self.chat_template is not None and self.task != "instruction":
            raise ValueError(f"chat_template: only the instruction task uses it, not {self.task}")
        return self

    def fields(self) -> dict[str, str]:
        """The task's columns: canonical name -> column name in the sources."""
        if self.task == "classification":
            return {"text": self.text_field, "label": self.label_field}
        if self.task == "instruction" and self.chat_format in CONVERSATIONS:
            return {"conversation": self.conversation_field}
        if self.task == "instruction":
            return {"prompt": self.prompt_field, "response": self.response_field}
        return {"text": self.text_field}


    @property
    def conversation_field(self) -> str:
        """The column a conversation is recognised by (its turns, or Alpaca's instruction)."""
        default = {"messages": "messages", "sharegpt": "conversations"}
        return self.messages_field or default.get(self.chat_format, "instruction")


def check_label_names(names: list[str] | dict[str, str], values: list[str]) -> list[str]:
    """The display name of each class (``values`` in class order), or a ValueError that
    names ``label_names`` and what was expected."""
    if isinstance(names, list):
        if len(names) != len(values):
            raise ValueError(f"label_names: {len(names)} name(s) {names} for {len(values)} "
                             f"class(es) {values}; give one name per class, in that order")
        return list(names)
    unknown = sorted(set(names) - set(values))
    if unknown:
        raise ValueError(f"label_names: {unknown} are not label values of the data; "
                         f"the classes are {values}")
    out = [names.get(v, v) for v in values]
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ValueError(f"label_names: class name(s) {dup} would name two classes")
    return out
