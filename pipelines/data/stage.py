"""``prepare(config)``: the data stage as one function over a :class:`DataConfig`.

Flow (Ray Data, streaming, order preserved so the output is deterministic)::

    resolve + hash sources ─► dataset id ─► complete already? return it (cache hit)
    read (1 task per file, or per 8 MiB range of a big JSONL file: parse, validate, split
          key, dedup key)
      [materialise raw rows if labels must be inferred or rows deduplicated]
    ─► actor pool (tokenizer loaded once per actor): template, tokenize, [pack], write the
       block's Parquet parts per split ─► rejects.jsonl, manifest.json ─► rename into place

The read runs as its own tasks beside the actors: Ray Data fuses two operators only when
their remote arguments are equal, and the actors carry ``max_restarts=0``, an option a read
task does not accept (see the actors' map below for why they must not restart).

Resources: ``num_actors`` actors of ``actor_cpus`` each plus ``task_cpus`` for the read,
write and filter tasks must fit in the cluster, or those tasks would wait on the actors forever;
the defaults (1 actor on a 2-CPU cluster, half-CPU actor and task on a 1-CPU one) always
fit. The stage returns only after everything is written, so training that follows reads
finished Parquet and never competes with it for CPUs. ``no_progress_timeout_s`` turns a
stall into an error (Ray Data's ``execution_no_progress_timeout_s``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from ..ray_runtime import ensure_ray
from . import conversations, store
from . import sources as sources_mod
from .chat import ChatTemplateError, check_template
from .config import CONVERSATIONS, SPLITS, DataConfig, DataError, check_label_names
from .encode import TokenizeAndWrite
from .manifest import Manifest
from .readers import CorpusDatasource
from .split import duplicates
from .validate import RowSpec, label_type_drift, sort_labels

log = logging.getLogger(__name__)
BLOCK_BYTES = 4 << 20  # Ray Data block size for this stage (see _data_context)


class _Tokenizer(NamedTuple):
    """The tokenizer as the stage uses it."""

    facts: Any  # templates.TokenizerFacts: what the template and the manifest need
    use_chat: bool  # whether instruction rows go through the chat template
    spec: Any  # templates.TokenizerSpec: how the actors load it


class _RunResult(NamedTuple):
    """What one run of the Ray Data flow counted, for the checks and the manifest."""

    stats: dict[str, Any]  # store.merge_stats, plus "at_max_length"
    label_values: list[str] | None
    dropped: int  # duplicates dropped (data.dedup)
    found: int  # duplicates found, dropped or not
    examples: dict[str, str]  # split -> its first example input


def prepare(config: DataConfig | dict[str, Any], *, ray_address: str | None = None,
            require: dict[str, tuple[int, str]] | None = None) -> Manifest:
    """Build (or find) the tokenized dataset for ``config``; return its manifest.

    Uses the running Ray if there is one, else connects to ``ray_address`` (``"auto"``, a
    ``host:port``) or starts a local Ray. ``manifest.cache_hit`` says whether it was reused.
    ``require``: split -> (least rows, why), e.g. ``{"train": (8, "train.batch_size")}``;
    a dataset with fewer rows is a :class:`DataError` (and is not kept).

    Input problems (no rows, every row rejected, an unreadable file, splits too small) are a
    :class:`DataError` that names the file, field or row.
    """
    config, did, srcs, tok_identity = _identify(_validated(config))
    root = Path(config.data_root)
    if store.is_complete(root, did):
        return _reuse(root, did, require)
    tok = _tokenizer(config)
    # Ray's own dashboard default, as this stage has always started Ray with
    ensure_ray(ray_address, local={"include_dashboard": None})
    resources = plan_resources(config)

    store.remove_stale(root, did)
    tmp = store.temp_folder(root, did)
    try:
        run = _run_or_explain_stall(config, srcs, tmp, tok, resources)
        store.finish_rejects(tmp)
        store.fill_empty_splits(tmp, config.task)
        _check_rows(run.stats, srcs, tmp, require)
        manifest = _manifest(config, did, tok_identity, srcs, tok, run)
        store.commit(tmp, root / did, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return store.load_manifest(root, did)


def _reuse(root: Path, did: str, require: dict[str, tuple[int, str]] | None) -> Manifest:
    """The complete dataset already at ``root/did`` (a cache hit), if its splits are big
    enough for ``require``."""
    m = store.load_manifest(root, did)
    m.cache_hit = True
    check_split_sizes(m.rows, require)
    log.info("data: dataset %s is complete at %s; reusing it", did, m.path)
    return m


def _tokenizer(config: DataConfig) -> _Tokenizer:
    """Load the tokenizer once on the driver and decide how the template and the actors
    use it; a packing run needs an EOS token to end documents with."""
    from pipelines.models import load_tokenizer

    from .templates import TokenizerFacts, TokenizerSpec

    hf_tok = load_tokenizer(config.tokenizer)
    own = config.chat_template if isinstance(config.chat_template, str) else None
    if own is not None:
        hf_tok.chat_template = own
    facts = TokenizerFacts.of(hf_tok)
    use_chat = _use_chat(config, facts)
    if config.chat_format in CONVERSATIONS:
        check_template(hf_tok)
    # Actors get the Rust tokenizer alone unless the chat template needs transformers.
    tok_spec = TokenizerSpec.build(config.tokenizer, hf_tok, needs_hf=use_chat,
                                   chat_template=own)
    if config.packing and facts.eos_token_id is None:
        raise ValueError(f"packing: tokenizer {config.tokenizer!r} has no EOS token to end "
                         f"documents with")
    return _Tokenizer(facts, use_chat, tok_spec)


def _run_or_explain_stall(config: DataConfig, srcs, tmp: Path, tok: _Tokenizer,
                          resources: tuple[int, float, float]) -> _RunResult:
    """:func:`_run` under the stage's Ray Data context; a stall becomes an error that says
    what the stage needs and how many CPUs are free."""
    actors, actor_cpus, task_cpus = resources
    spec = RowSpec.of(config.fields(), config.labels, config.max_chars,
                      config.chat_format if config.chat_format in CONVERSATIONS else None)
    with _data_context(config.no_progress_timeout_s):
        try:
            return _run(config, srcs, spec, tmp, tok, resources)
        except Exception as e:
            if _stalled(e):
                raise RuntimeError(
                    f"data: Ray Data made no progress for {config.no_progress_timeout_s:g}s "
                    f"(no_progress_timeout_s). The stage needs {actors} × {actor_cpus:g} "
                    f"CPU for its actors and {task_cpus:g} for tasks; "
                    f"{_free_cpus():g} of the cluster's CPUs are free now. Run the data "
                    f"stage before training starts, or free CPUs.") from e
            raise


def _check_rows(stats: dict[str, Any], srcs, tmp: Path,
                require: dict[str, tuple[int, str]] | None) -> None:
    """A DataError for a run that kept no row (none read, or every one rejected) or splits
    smaller than ``require``."""
    rejected = sum(stats["rejected"].values())
    if not sum(stats["rows"].values()):
        if not rejected:
            raise DataError(_no_rows(srcs))
        raise DataError(_all_rejected(tmp / "rejects.jsonl", rejected))
    check_split_sizes(stats["rows"], require)


def _manifest(config: DataConfig, did: str, tok_identity: str, srcs, tok: _Tokenizer,
              run: _RunResult) -> Manifest:
    """The manifest of a finished run (before it is committed)."""
    stats, facts = run.stats, tok.facts
    rejected = sum(stats["rejected"].values())
    label_names = _display_names(config, run.label_values)
    counts = {s: {label_names[int(i)]: n for i, n in sorted(c.items(), key=lambda x: int(x[0]))}
              for s, c in stats["label_counts"].items()} if label_names else {}
    return Manifest(
        dataset_id=did,
        task=config.task,
        tokenizer={"name": config.tokenizer, "identity": tok_identity, "class": facts.cls},
        max_length=config.max_length,
        pad_token_id=facts.pad_token_id,
        padding_side=facts.padding_side,
        template={**_template_key(config), "chat_template": tok.use_chat,
                  "eos_token_id": facts.eos_token_id,
                  "worker_tokenizer": "rust" if tok.spec.backend_json else "transformers"},
        label_names=label_names,
        label_values=run.label_values,
        label_counts=counts,
        examples=run.examples,
        num_labels=len(label_names or []),
        rows={s: stats["rows"].get(s, 0) for s in SPLITS},
        tokens={s: stats["tokens"].get(s, 0) for s in SPLITS},
        documents={s: stats["documents"].get(s, 0) for s in SPLITS},
        trained_tokens={s: stats["trained_tokens"].get(s, 0) for s in SPLITS},
        rejected=rejected,
        rejected_by_kind=dict(sorted(stats["rejected"].items())),
        duplicates=run.found,
        duplicates_dropped=run.dropped,
        rows_at_max_length=stats["at_max_length"],
        read_rows=sum(stats["documents"].values()) + rejected + run.dropped,
        columns={f.name: str(f.type) for f in store.output_schema(config.task)},
        sources=[s.record() for s in srcs],
        config=config.model_dump(mode="json"),
        created_at=store.now(),
        path=str((Path(config.data_root) / did).resolve()),
    )


def dataset_id_for(config: DataConfig | dict[str, Any]) -> str:
    """The id ``prepare(config)`` writes to, without running anything (no Ray)."""
    return _identify(_validated(config))[1]


def _validated(config: DataConfig | dict[str, Any]) -> DataConfig:
    return config if isinstance(config, DataConfig) else DataConfig.model_validate(config)


def _template_key(config: DataConfig) -> dict[str, Any]:
    key = {"chat_template": config.chat_template, "packing": config.packing,
           "plain_separator": "\n"}
    if config.chat_format in CONVERSATIONS:  # prompt/response datasets keep their ids
        key.update(chat_format=config.chat_format, train_on=config.train_on)
    return key


def _identify(config: DataConfig
              ) -> tuple[DataConfig, str, list[sources_mod.Source], str]:
    """The config with its row form decided, the dataset id, sources and tokenizer id."""
    srcs = sources_mod.resolve(config.sources, config.format)
    config = conversations.resolved(config, srcs)
    tok_identity = store.tokenizer_identity(config.tokenizer)
    did = store.dataset_id(config, [s.record() for s in srcs], tok_identity,
                           _template_key(config))
    return config, did, srcs, tok_identity


def _run(config: DataConfig, srcs, spec: RowSpec, tmp: Path, tok: _Tokenizer,
         resources: tuple[int, float, float]) -> _RunResult:
    """The Ray Data flow: read, [the raw pass], tokenize and write, then what it counted."""
    actors, actor_cpus, task_cpus = resources
    label_names = config.labels
    infer = config.task == "classification" and label_names is None
    if config.labels is not None and config.label_names is not None:
        _display_names(config, config.labels)
    ds = _read(config, srcs, spec, task_cpus)
    dropped = 0
    if infer or config.dedup:
        ds, label_names, dropped = _raw_pass(ds, config, srcs, task_cpus, infer, label_names)
    ds = _tokenize_and_write(ds, config, srcs, tmp, tok, label_names, actors, actor_cpus)
    return _collect(ds.take_all(), label_names, dropped)


def _read(config: DataConfig, srcs, spec: RowSpec, task_cpus: float):
    """The raw rows as a dataset: parsed, validated, with split and dedup keys."""
    import ray

    datasource = CorpusDatasource(srcs, spec, config.task, config.seed, config.split,
                                  config.batch_size)
    ds = ray.data.read_datasource(
        datasource,
        # never fused into the actors (their max_restarts differs), so the read takes the
        # task share plan_resources keeps free next to them: with an actor's share it would
        # wait behind the actors for ever on a cluster sized for them
        num_cpus=task_cpus,
        # one block stream per file or range, not re-split into many small blocks
        override_num_blocks=datasource.num_tasks(),
    )
    if config.max_rows:
        ds = ds.limit(config.max_rows)
    return ds


def _raw_pass(ds, config: DataConfig, srcs, task_cpus: float, infer: bool,
              label_names: list[str] | None):
    """(dataset, label names, rows dropped): the labels inferred when ``infer``, the
    duplicates dropped under ``data.dedup``."""
    # Both need every row first: one pass over the raw rows, then only small columns
    # (keys, labels) travel to the driver.
    ds = ds.materialize()
    cols = ["_reject", "_kind", "_src", "_line", "_order", "_dup"]
    cols += ["label"] if infer else []
    meta = _gather(ds, cols, task_cpus)
    good = meta.filter(pc.is_null(meta.column("_reject")))
    if good.num_rows == 0:
        raise DataError(_all_rejected_meta(meta, srcs) if meta.num_rows else _no_rows(srcs))
    if infer:
        ds, good, label_names = _infer_labels(ds, good, config, task_cpus)
    dropped = 0
    if config.dedup:
        ds, dropped = _drop_duplicates(ds, good, task_cpus)
    return ds, label_names, dropped


def _infer_labels(ds, good: pa.Table, config: DataConfig, task_cpus: float):
    """(dataset, valid rows, label names): the classes of the valid rows' labels, after
    rows whose label has another type than the rest became ``label_type`` rejects."""
    drift = label_type_drift(good.column("label").to_pylist())
    if drift:
        ds, good = _reject_label_drift(ds, good, drift, config, task_cpus)
    label_names = sort_labels(pc.unique(good.column("label")).to_pylist())
    if len(label_names) < 2:
        raise DataError(
            f"data.label_field: the valid rows of {config.label_field!r} have "
            f"{len(label_names)} distinct label(s) {label_names}; classification "
            f"needs at least 2 (or set data.labels)")
    if config.label_names is not None:
        _display_names(config, label_names)
    return ds, good, label_names


def _reject_label_drift(ds, good: pa.Table, drift: tuple[list[int], str], config: DataConfig,
                        task_cpus: float):
    """(dataset, valid rows) with the rows at positions ``drift[0]`` of ``good`` marked as
    ``label_type`` rejects and taken out of the valid rows."""
    odd, why = drift
    bad = good.take(pa.array(odd, pa.int64()))
    reasons = {o: f"{config.label_field!r}: label {lab!r} has another type than "
                  f"the rest ({why}); set data.labels to accept it as a class"
               for o, lab in zip(bad.column("_order").to_pylist(),
                                 bad.column("label").to_pylist())}
    ds = ds.map_batches(_mark_rejects, fn_kwargs={"reasons": reasons,
                                                  "kind": "label_type"},
                        batch_format="pyarrow", num_cpus=task_cpus)
    keep = pc.invert(pc.is_in(good.column("_order"),
                              value_set=pa.array(list(reasons), pa.int64())))
    return ds, good.filter(keep)


def _drop_duplicates(ds, good: pa.Table, task_cpus: float):
    """(dataset, rows dropped): every duplicate of a valid row after its first."""
    drop = duplicates(good.select(["_dup", "_order"]))
    dropped = len(drop)
    if dropped:
        ds = ds.map_batches(_drop_rows, fn_kwargs={"orders": drop.to_pylist()},
                            batch_format="pyarrow", num_cpus=task_cpus)
    return ds, dropped


def _tokenize_and_write(ds, config: DataConfig, srcs, tmp: Path, tok: _Tokenizer,
                        label_names: list[str] | None, actors: int, actor_cpus: float):
    """The actor pool that templates, tokenizes, [packs] and writes each block's parts."""
    import ray

    with warnings.catch_warnings():
        # max_restarts has no named parameter in the pinned Ray (2.60): only the deprecated
        # ray_remote_args route sets it, which would warn on every run
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            TokenizeAndWrite,
            fn_constructor_kwargs={"folder": str(tmp), "source_uris": [s.uri for s in srcs],
                                   "tokenizer": tok.spec, "task": config.task,
                                   "max_length": config.max_length, "label_names": label_names,
                                   "use_chat": tok.use_chat, "packing": config.packing,
                                   "train_on": config.train_on},
            # whole blocks (BLOCK_BYTES) as batches: one Parquet part per block and split
            batch_size=None, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus,
            # Ray Data restarts pool actors by default, but it hands them their constructor
            # through the object store, where a restart after losing that object fails anyway
            # (ray-project/ray#53727) and Ray prints an error line on every run saying so. A
            # failed actor fails the stage instead; its output is a temp folder, so rerunning
            # `prepare` starts clean.
            max_restarts=0,
        )


def _collect(results: list[dict[str, Any]], label_names: list[str] | None,
             dropped: int) -> _RunResult:
    """Sum the write actors' per-block results: counts, duplicates found, examples."""
    stats = store.merge_stats(results)
    blob = b"".join(r["dup_keys"] for r in results)
    keys = [blob[i:i + 16] for i in range(0, len(blob), 16)]
    found = dropped + len(keys) - len(set(keys))
    stats["at_max_length"] = sum(int(r["at_max_length"]) for r in results)
    examples: dict[str, str] = {}
    for r in results:  # in input order: the first example of each split wins
        for k, v in json.loads(r["examples"]).items():
            examples.setdefault(k, v)
    return _RunResult(stats, label_names, dropped, found, examples)


def _mark_rejects(batch: pa.Table, *, reasons: dict[int, str], kind: str) -> pa.Table:
    """Rows whose ``_order`` is in ``reasons`` become rejects of ``kind`` (kept for
    rejects.jsonl, out of every split)."""
    orders = batch.column("_order").to_pylist()
    hit = [o in reasons for o in orders]
    if not any(hit):
        return batch
    cols = {c: batch.column(c).to_pylist() for c in ("_split", "_kind", "_reject", "_raw")}
    for i, (o, h) in enumerate(zip(orders, hit)):
        if h:
            cols["_split"][i], cols["_kind"][i], cols["_reject"][i] = -1, kind, reasons[o]
            cols["_raw"][i] = cols["_raw"][i] or _raw_of(batch, i)
    for c, t in (("_split", pa.int8()), ("_kind", pa.string()), ("_reject", pa.string()),
                 ("_raw", pa.string())):
        batch = batch.set_column(batch.schema.get_field_index(c), c, pa.array(cols[c], t))
    return batch


def _raw_of(batch: pa.Table, i: int) -> str:
    fields = [c for c in batch.column_names if not c.startswith("_")]
    return json.dumps({c: batch.column(c)[i].as_py() for c in fields}, ensure_ascii=False)[:300]


def _display_names(config: DataConfig, values: list[str] | None) -> list[str] | None:
    if values is None or config.label_names is None:
        return values
    try:
        return check_label_names(config.label_names, values)
    except ValueError as e:
        raise DataError(f"data.{e}") from None


def check_split_sizes(rows: dict[str, int], require: dict[str, tuple[int, str]] | None) -> None:
    """Every split in ``require`` holds at least its number of rows, or a DataError that
    says how many rows each split has and what needs more."""
    if not require:
        return
    short = [f"{s} needs at least {n} ({why})" for s, (n, why) in require.items()
             if rows.get(s, 0) < n]
    if short:
        have = ", ".join(f"{s} {rows.get(s, 0)}" for s in SPLITS)
        raise DataError(f"data.split: the splits have {have} rows; " + "; ".join(short)
                        + " (more data, other data.split fractions, or a smaller batch)")


def _drop_rows(batch: pa.Table, *, orders: list[int]) -> pa.Table:
    drop = pc.is_in(batch.column("_order"), value_set=pa.array(orders, pa.int64()))
    return batch.filter(pc.invert(drop))


def _gather(ds, columns: list[str], task_cpus: float) -> pa.Table:
    import ray

    refs = ds.select_columns(columns, num_cpus=task_cpus).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _use_chat(config: DataConfig, facts) -> bool:
    if config.task != "instruction":
        return False
    if config.chat_format in CONVERSATIONS and not facts.has_chat_template:
        raise ChatTemplateError(
            f"chat_format: {config.chat_format}, but tokenizer {config.tokenizer!r} has no chat "
            "template to render conversations with; give data.chat_template (a Jinja template)")
    if config.chat_template and not facts.has_chat_template:
        raise ValueError(f"chat_template: true, but tokenizer {config.tokenizer!r} has no chat "
                         f"template (set chat_template: false or leave it unset)")
    return facts.has_chat_template if config.chat_template is None else config.chat_template


def plan_resources(config: DataConfig) -> tuple[int, float, float]:
    """(actors, CPUs per actor, CPUs per read/write task) that fit in the cluster."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total <= 0:
        raise RuntimeError("data: the Ray cluster has no CPU")
    actors = config.num_actors or max(1, min(8, int(total) - 1))
    # Room for the actors plus one task (a read or a filter running next to them):
    # a task whose share does not fit next to the actors would wait for them forever.
    roomy = total >= actors + 1
    task_cpus = config.task_cpus or (1.0 if roomy else min(0.5, total / (actors + 1)))
    actor_cpus = config.actor_cpus or (1.0 if roomy else (total - task_cpus) / actors)
    if actors * actor_cpus + task_cpus > total + 1e-9:
        raise ValueError(
            f"num_actors × actor_cpus + task_cpus = {actors} × {actor_cpus:g} + {task_cpus:g} "
            f"exceeds the cluster's {total:g} CPUs: read and write tasks could never run next "
            f"to the actors; lower num_actors or actor_cpus")
    free = float(ray.available_resources().get("CPU", 0.0))
    if free + 1e-9 < actor_cpus + task_cpus:
        log.warning("data: only %.2g of %.2g CPUs are free; the stage may wait for them "
                    "(it fails after no_progress_timeout_s)", free, total)
    return actors, actor_cpus, task_cpus


def _stalled(e: BaseException | None) -> bool:
    from ray.data.exceptions import ExecutionTimeoutError

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ExecutionTimeoutError) or "made no progress" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


@contextlib.contextmanager
def _data_context(no_progress_timeout_s: float) -> Iterator[None]:
    """Order-preserving, fail-fast execution for datasets made inside; restored after."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.execution_no_progress_timeout_s,
             ctx.target_max_block_size)
    ctx.execution_options.preserve_order = True
    ctx.execution_no_progress_timeout_s = no_progress_timeout_s
    # Ray coalesces a read task's output up to this size before passing it on: at the
    # 128 MiB default a whole file is one block (one batch, one part file, no streaming).
    # Packed rows also depend on it (packing is per block), so it is fixed here.
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.execution_no_progress_timeout_s,
         ctx.target_max_block_size) = saved


def _summary(kinds: Counter, examples: list[str], total: int) -> str:
    parts = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    ex = "\n  ".join(examples[:3])
    return f"data.sources: all {total} rows were rejected ({parts}); the first:\n  {ex}"


def _no_rows(srcs) -> str:
    names = ", ".join(s.uri for s in srcs[:3]) + (" ..." if len(srcs) > 3 else "")
    return f"data.sources: no rows in {names} (empty, blank lines or a header only)"


def _all_rejected(rejects_path: Path, total: int) -> str:
    rows = [json.loads(x) for x in rejects_path.read_text().splitlines() if x]
    kinds = Counter(r["kind"] for r in rows)
    return _summary(kinds, [f"{r['source']}:{r['line']}: {r['reason']}" for r in rows], total)


def _all_rejected_meta(meta: pa.Table, srcs) -> str:
    rows = meta.select(["_src", "_line", "_kind", "_reject"]).to_pylist()
    kinds = Counter(r["_kind"] for r in rows)
    ex = [f"{srcs[r['_src']].uri}:{r['_line']}: {r['_reject']}" for r in rows[:3]]
    return _summary(kinds, ex, len(rows))
