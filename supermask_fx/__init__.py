"""supermask_fx: find subnetworks hidden in randomly weighted neural networks (edge-popup), for any PyTorch model.

model = popupify(torchvision.models.wide_resnet50_2(), k=0.3)
optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.256, momentum=0.875, weight_decay=3.0517578125e-05)
... train as usual ...
save_subnetwork(model, "wrn50-k30.safetensors")
"""

from .core.config import PopupConfig
from .core.heads import active_mask, add_mask, delete_mask, list_masks, set_k, set_mask
from .core.initializers import INITIALIZERS
from .core.masks import (
    Coverage,
    MaskStats,
    coverage,
    fix_masks,
    gated_layers,
    mask_stats,
    refresh_masks,
    supermask_parameters,
)
from .core.popup import popupify
from .core.schedule import KWarmup
from .files.folder import load_masks, save_masks
from .files.materialize import materialize
from .files.restore import restore
from .files.subnetwork import SubnetworkFileError, load_subnetwork, save_subnetwork
from .methods import (  # importing methods registers the built-in ones
    IteRandOptions,
    Method,
    MulticoatOptions,
    SampledOptions,
    register_method,
)
from .selection.topk import kept_count

__version__ = "0.1.0"

__all__ = [
    "popupify",
    "PopupConfig",
    "supermask_parameters",
    "mask_stats",
    "MaskStats",
    "coverage",
    "Coverage",
    "fix_masks",
    "refresh_masks",
    "gated_layers",
    "save_subnetwork",
    "load_subnetwork",
    "SubnetworkFileError",
    "materialize",
    "restore",
    "kept_count",
    "INITIALIZERS",
    "add_mask",
    "set_mask",
    "list_masks",
    "active_mask",
    "delete_mask",
    "set_k",
    "KWarmup",
    "save_masks",
    "load_masks",
    "Method",
    "register_method",
    "SampledOptions",
    "IteRandOptions",
    "MulticoatOptions",
]
