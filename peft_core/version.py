"""peft_core's version, written into every adapter it saves (a module of its own so that the
modules that save need not import the package above them)."""

__version__ = "0.1.0"
