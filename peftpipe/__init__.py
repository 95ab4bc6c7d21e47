"""``peftpipe``: the whole command line, composed from the two halves of the project.

:mod:`pipelines.cli` holds the stage commands (``run``, ``prepare``, ``train``, ``tune``,
``promote``, ``report``, serving, ``plan``, ...) and :mod:`cluster.cli` the cluster ones
(``cluster up|down|status|validate``, ``submit``). This is the only module that imports both:
``cluster`` builds on ``pipelines``, never the other way, so neither has to know the other's
commands.
"""

from __future__ import annotations

import typer

from cluster.cli import cluster_app, submit
from pipelines import cli as pipelines_cli

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=pipelines_cli.app.info.help)
app.add_typer(pipelines_cli.app)  # no name: its commands sit at the top level
app.add_typer(cluster_app, name="cluster")
# Typer lists an app's own commands before its groups: `submit` goes in a nameless group of
# its own so that `peftpipe --help` keeps it last, after `cluster`.
_submit = typer.Typer()
_submit.command()(submit)
app.add_typer(_submit)


def main() -> None:
    """The ``peftpipe`` console script (and ``python -m peftpipe``)."""
    pipelines_cli.main(app)


__all__ = ["app", "main"]
