"""peft-pipelines: the stages (data, train, tune, tracking, registry, serve) and the CLI."""

__version__ = "0.1.0"
