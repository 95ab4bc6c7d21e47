"""The ``laplace_lora`` config: LoRA's fields plus the posterior's."""

from __future__ import annotations

import dataclasses

from ...config import check
from ..lora import LoraConfig


@dataclasses.dataclass
class LaplaceLoraConfig(LoraConfig):
    """LoRA's fields plus the posterior's:

    ``hessian``: ``kfac`` or ``diag``. ``kfac_rank``: eigenpairs kept per Kronecker factor
    (0 keeps all). ``fisher``: ``ggn`` (exact), ``mc`` (one sampled label per prediction) or
    ``auto`` (``ggn`` up to 16 classes). ``tune_prior``: ``marglik`` or ``none`` (then
    ``prior_precision`` is used as is). ``dataset_size``: the number of predictions the
    curvature stands for (0: those ``finalize`` saw; set it when finalize gets a subset).
    ``predictive``: ``probit`` or ``mc`` with ``n_samples``. ``seed``: for the sampling.
    """

    name = "laplace_lora"
    hessian: str = "kfac"
    kfac_rank: int = 32
    fisher: str = "auto"
    prior_precision: float = 1.0
    tune_prior: str = "marglik"
    dataset_size: int = 0
    predictive: str = "probit"
    n_samples: int = 100
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        n = self.name
        check(self.hessian in ("kfac", "diag"), n, "hessian", "'kfac' or 'diag'", self.hessian)
        check(isinstance(self.kfac_rank, int) and self.kfac_rank >= 0, n, "kfac_rank",
              "an integer >= 0", self.kfac_rank)
        check(self.fisher in ("auto", "ggn", "mc"), n, "fisher", "'auto', 'ggn' or 'mc'",
              self.fisher)
        check(self.prior_precision > 0, n, "prior_precision", "a number > 0",
              self.prior_precision)
        check(self.tune_prior in ("marglik", "none"), n, "tune_prior", "'marglik' or 'none'",
              self.tune_prior)
        check(isinstance(self.dataset_size, int) and self.dataset_size >= 0, n, "dataset_size",
              "an integer >= 0", self.dataset_size)
        check(self.predictive in ("probit", "mc"), n, "predictive", "'probit' or 'mc'",
              self.predictive)
        check(isinstance(self.n_samples, int) and self.n_samples > 0, n, "n_samples",
              "an integer > 0", self.n_samples)
