"""The planner's inputs from the command line: memory sizes, the cluster's shape, and
:class:`PlanError`, which every bad input to the planner raises."""

from __future__ import annotations

import os
import re

from ..errors import InputError

#: Nodes with more GPUs than this are not built (8 per HGX/DGX board, the largest common).
MAX_GPUS_PER_NODE = 8

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(InputError):
    """Bad input to the planner; the message starts with the field (``--gpus: ...``)."""


def parse_size(text: str, field: str = "--gpu-mem") -> int:
    """Bytes in ``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, ``1.5TB``; a unit is required."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise PlanError(f"{field}: cannot read {text!r} as a memory size; expected a number "
                        f"and a unit, e.g. 80GB, 80GiB or 512MB (units: {', '.join(_UNITS)})")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise PlanError(f"{field}: {text!r} is not a usable memory size; expected more than 0")
    return int(value)


def cluster_shape(gpus: int | None, nodes: int | None, workers: int) -> tuple[int, int, int]:
    """(world size, nodes, ranks per node), checking that such a cluster can exist."""
    if gpus is None:
        if nodes not in (None, 1):
            raise PlanError("--nodes: a multi-node plan needs --gpus (the total GPU count)")
        return workers, 1, workers
    if nodes is None:
        nodes = 1
    if nodes < 1:
        raise PlanError(f"--nodes: expected at least 1 node, got {nodes}")
    if gpus < 1:
        raise PlanError(f"--gpus: expected at least 1 GPU, got {gpus}")
    if gpus % nodes:
        raise PlanError(f"--gpus: {gpus} GPUs cannot be split evenly over {nodes} nodes; "
                        f"expected a multiple of {nodes}")
    per = gpus // nodes
    if per > MAX_GPUS_PER_NODE:
        raise PlanError(f"--gpus: {gpus} GPUs on {nodes} node(s) is {per} per node; a node has "
                        f"at most {MAX_GPUS_PER_NODE} (use --nodes {-(-gpus // MAX_GPUS_PER_NODE)} "
                        "or more)")
    return gpus, nodes, per


def ram_per_rank(ranks: int) -> int:
    """This machine's RAM split over ``ranks`` processes (the CPU plan's default memory)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        raise PlanError("--gpu-mem: cannot read this machine's RAM; give the memory per "
                        "rank") from None
    return total // ranks
