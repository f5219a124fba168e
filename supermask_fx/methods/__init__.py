"""The built-in methods; each is a file that registers itself (``supermask_fx.core.method.register_method``).

``edge_popup`` and ``random`` (``edge_popup.py``), ``sampled`` (``sampled.py``, Zhou et al.), ``dense``
(``dense.py``), ``biprop`` (``biprop.py``, binary weights with a gain), ``iterand`` (``iterand.py``, Chijiwa et al.:
edge-popup with redraws of pruned weights), ``multicoat`` (``multicoat.py``, Okoshi et al.: nested top-k masks
summed). A method of your own: subclass ``Method``, give it a ``name`` (and an ``Options`` dataclass if it takes
options), and call ``register_method`` on it; ``popupify(model, k, method=name)`` then uses it.
"""

from ..core.method import Method, NoOptions, register_method, registered_methods
from .biprop import Biprop
from .dense import Dense
from .edge_popup import EdgePopup, RandomSubnetwork
from .iterand import IteRand, IteRandOptions
from .multicoat import Multicoat, MulticoatOptions
from .sampled import Sampled, SampledOptions

__all__ = [
    "Method",
    "NoOptions",
    "register_method",
    "registered_methods",
    "EdgePopup",
    "RandomSubnetwork",
    "Sampled",
    "SampledOptions",
    "Dense",
    "Biprop",
    "IteRand",
    "IteRandOptions",
    "Multicoat",
    "MulticoatOptions",
]
