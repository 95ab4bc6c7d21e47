"""How the same recipe reaches a real cluster.

Public API:

- :func:`up` / :func:`down` / :func:`status` (``cluster.local``): a local multi-node Ray
  cluster (a head and N worker nodes, each its own ``ray start`` process on 127.0.0.1) plus
  an MLflow server, described by one JSON state file (:class:`ClusterState`);
  :func:`kill_node` simulates a lost node.
- :func:`submit_recipe` / :func:`prepare_job` (``cluster.submit``): a recipe as a Ray Job with a
  runtime env; returns the job's exit code.
- :func:`mlflow_server` (``cluster.mlflow_server``): a throwaway MLflow server for tests.
- :mod:`cluster.deploy`: cloud deployment files (Ray cluster launcher, KubeRay RayCluster
  and RayJob, MLflow server, Dockerfile); :mod:`cluster.validate` checks them offline.

The CLI (``peftpipe cluster up|down|status``, ``peftpipe submit``) is in :mod:`cluster.cli`.
"""

from .local import ClusterError, ClusterState, down, kill_node, read_state, status, up
from .mlflow_server import mlflow_server
from .submit import SubmitError
from .submit import prepare as prepare_job
from .submit import submit as submit_recipe

__all__ = [
    "ClusterError", "ClusterState", "SubmitError", "down", "kill_node", "mlflow_server",
    "prepare_job", "read_state", "status", "submit_recipe", "up",
]
