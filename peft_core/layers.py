"""Building blocks shared by methods that wrap a frozen linear-like module."""

from __future__ import annotations

from torch import nn


class MergeableLayer(nn.Module):
    """A wrapper whose update folds exactly into its ``base`` module's weight.

    Subclasses implement ``_fold(sign)`` (add ``sign`` × the update to the base weight, in
    place, without autograd) and read ``merged`` in their forward. The default
    :meth:`peft_core.Method.merge` merges every such layer in the model.
    """

    merged: bool = False

    def _fold(self, sign: float) -> None:
        raise NotImplementedError

    def merge(self) -> None:
        self._fold(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        self._fold(-1.0)
        self.merged = False
