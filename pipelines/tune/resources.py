"""What a search asks of the cluster: CPUs per training worker and each trial driver's bundle,
checked against what the cluster has before any trial starts."""

from __future__ import annotations

import math

from .config import TuneConfig

TRIAL_DRIVER_CPU = 0.01  # a trial's driver only waits on its trainer; it must not hold a CPU


class ResourceError(ValueError):
    """The cluster cannot run the search as configured."""


def cpus_per_worker(config: TuneConfig, driver_cpu: float = TRIAL_DRIVER_CPU) -> float:
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    workers = config.max_concurrent_trials * config.workers_per_trial
    if config.cpus_per_worker is not None:
        need = workers * config.cpus_per_worker + config.max_concurrent_trials * driver_cpu
        if need > total:
            raise ResourceError(
                f"tune: {config.max_concurrent_trials} concurrent trials x "
                f"{config.workers_per_trial} workers x {config.cpus_per_worker} CPU need "
                f"{need:g} CPUs; the cluster has {total:g}"
            )
        return config.cpus_per_worker
    share = math.floor((total - config.max_concurrent_trials * driver_cpu) / workers * 100) / 100
    if share < 0.1:
        raise ResourceError(
            f"tune: {workers} concurrent workers on {total:g} CPUs leaves {share:g} CPU each; "
            "lower max_concurrent_trials or workers_per_trial"
        )
    return share


def driver_resources(cpu: float):
    """The trial driver's bundle. Tune refuses an all-zero bundle, so a driver without a
    CPU reserves 1 MiB of Ray's ``memory`` resource instead (the workers ask for none)."""
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": cpu} if cpu > 0 else {"memory": 1 << 20}])
