"""The engine seam (:mod:`.base`): one adapter under DeepSpeed, or K packed members."""

from .adapter import AdapterEngine
from .base import Engine
from .packed import COMPLETED, MEMBERS_DIR, STOPPED, TRAINING, PackEngine, member_adapter

__all__ = ["COMPLETED", "MEMBERS_DIR", "STOPPED", "TRAINING", "AdapterEngine", "Engine",
           "PackEngine", "member_adapter"]
