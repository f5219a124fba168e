"""The methods ``popupify`` can apply; each is a file. ``METHODS[name]()`` builds one."""

from .base import Method
from .dense import Dense
from .edge_popup import EdgePopup, RandomSubnetwork, RankedLayer
from .sampled import Sampled

METHODS: dict[str, type[Method]] = {m.name: m for m in (EdgePopup, Sampled, RandomSubnetwork, Dense)}

__all__ = ["METHODS", "Method", "EdgePopup", "RandomSubnetwork", "Sampled", "Dense", "RankedLayer"]
