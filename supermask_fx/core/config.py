"""``PopupConfig``: everything ``popupify`` needs to turn a model into a supermask network, as one value.

The config is what a subnetwork file stores (as JSON) so that the same random weights can be regenerated later.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import asdict, dataclass, field

from .dataclass_io import dataclass_from_dict
from .initializers import INITIALIZERS, NONLINEARITIES
from .method import method_class, options_of
from .packed import packable
from .source import KEEP, KeptWeights, SeededDraw

SCOPES = ("layer", "global")
BIAS_RULES = ("zero", "keep")
NORM_RULES = ("identity", "keep", "learn")
SCORE_DTYPES = ("bfloat16", "float16", "float32")
SCORE_STARTS = ("random", "magnitude")
WEIGHT_STORAGES = ("dense", "bits")
HOW_HELD = ("weight_storage", "rebuild_effective")  # config fields that change how values are held, not the values


@dataclass(frozen=True)
class PopupConfig:
    """How ``popupify`` rewrites a model.

    Attributes:
        k: fraction of each layer's weights kept, in (0, 1] (the paper's k%; ``k=0.3`` keeps 30 %).
        method: the name of a registered method (``supermask_fx.methods``): ``"edge_popup"`` (top-k of |scores|,
            straight-through), ``"sampled"`` (Zhou et al.: Bernoulli of sigmoid(scores)), ``"random"`` (a fixed
            random top-k mask, nothing trained) or ``"dense"`` (no mask; the weights themselves are trained: the
            learned-dense baseline with the same initialization); or a method's typed options
            (``SampledOptions(eval_rule="sample")``), which set ``method`` and ``method_options`` together.
        init: weight distribution, one of ``INITIALIZERS`` (``signed_constant``, ``kaiming_normal``, ...), or
            ``"keep"``: the model's own weights, bit for bit (a pretrained model's), frozen; files then store a
            fingerprint of them instead of the seed (``core.source``).
        scaled: multiply the weight standard deviation by ``sqrt(1/k)`` (the paper's Section 4.5).
        seed: seed of every weight and initial score; the same seed gives the same tensors on any machine.
        scope: ``"layer"`` (top-k within each layer, the paper's default) or ``"global"`` (one top-k over all
            gated layers together; layers matched by ``layer_k`` keep their own).
        layer_k: ``{pattern: k}`` overrides, matched with ``fnmatch`` against a layer's qualified module name
            (``"fc"``, ``"layer1.*"``); the first matching pattern wins.
        mode: ``"fan_in"`` or ``"fan_out"``, for the Kaiming standard deviation.
        nonlinearity: gain of the Kaiming standard deviation (``"relu"`` gives sqrt 2).
        bias: ``"zero"`` sets the biases of gated layers to 0 (the paper's networks have none); ``"keep"`` keeps
            the values the model was built with. Either way they are frozen. Default: ``"keep"`` with
            ``init="keep"``, else ``"zero"``.
        norms: ``"identity"``: normalization scales 1 and shifts 0 (the paper); ``"keep"``: their current values
            (a pretrained model's). Either way frozen. ``"learn"``: the affine parameters train beside the scores
            (``supermask_parameters`` yields them; biprop's learned BatchNorm), starting at identity (at their
            current values with ``init="keep"``); files store their trained values. Default: ``"keep"`` with
            ``init="keep"``, else ``"identity"``.
        scores: how the scores start: ``"random"`` (Kaiming-uniform from the seed, the paper) or ``"magnitude"``
            (``|w|``: the first mask is the weights' own top-k by magnitude, ties by lowest flat index). Default:
            ``"magnitude"`` with ``init="keep"``, else ``"random"``.
        include: ``fnmatch`` patterns of qualified parameter names (``"*.c_attn.weight"``) to gate in addition to
            the weights ``popupify`` finds itself: weights of custom modules that reach the computation by other
            means than ``F.linear``/``F.conv*`` (``x @ W``, ``torch.addmm``). The module must read the weight as
            an attribute (``self.weight``). Each pattern must match a parameter of 2+ dimensions.
        method_options: options of the method, as ``{name: value}`` (stored sorted as pairs), checked against the
            method's ``Options`` dataclass. ``"sampled"`` takes
            ``eval_rule`` (``"threshold"``: ``s >= 0`` in evaluation, the default; ``"sample"``: a fresh Bernoulli
            mask, as Zhou et al.), ``rescale`` (dynamic weight rescaling, ``numel / kept``) and ``score_init`` (a
            constant for the initial scores; Zhou et al. use 0). ``supermask_fx.methods.sampled.ZHOU_ET_AL`` holds
            their settings. Other methods take none.
        score_dtype: the scores' dtype, ``"bfloat16"``, ``"float16"`` or ``"float32"`` (also as a ``torch.dtype``);
            default the weight's. ``"bfloat16"`` halves the memory of the scores, their gradients and the
            optimizer's state; the mask is still the exact top-k of the stored (bf16) values, ties by the selection
            rule (lowest flat index first), and the gradient reaching them is rounded to bf16.
        weight_storage: how the frozen weights are held: ``"bits"``, one sign bit per weight and one scale per layer
            (``core.packed.PackedSigns``, 1/32 of float32), expanded only inside the operations that read it (the
            gated forward and backward read the bits directly on the CPU; elsewhere a transient tensor of one
            layer), or ``"dense"``, a tensor of the model's dtype. Default (``None``): ``"bits"`` where it applies,
            the inits of one magnitude per layer (``"signed_constant"``, the default init,
            ``"xavier_signed_constant"``, ``"unsigned_constant"``) with a method that does not train the weights;
            ``"dense"`` elsewhere (``init="keep"``, the normal and uniform inits, ``method="dense"``). The values, and
            so every mask, gradient and file, are the same either way. An in-place write that leaves other values in
            a ``"bits"`` weight is a ``ValueError``: use ``"dense"`` to hold weights you will change.
        rebuild_effective: whether a gated ``nn.Linear`` / ``nn.Conv{1,2,3}d`` rebuilds its effective weight
            ``w * mask`` in the backward (``core.recompute``: no copy of the weights held between the forward and
            the backward) or keeps it from the forward (one elementwise pass less per layer and step; the kept
            copies of the layers whose backward has not run add to the backward's memory peak). Default (``None``):
            keep it with ``weight_storage="bits"`` and full-precision scores (the bits free a float copy of the
            weights and the kept ``w * mask`` spends a part of it at the peak: 14 MiB on ResNet-18 at batch 128,
            0.3-0.8 bytes per parameter on GPT-2 and a 0.39B model); rebuild it with ``"dense"`` weights and with
            ``score_dtype="bfloat16"`` / ``"float16"``, the setting for the least memory (there keeping would
            cost up to 2.3 of their 13 bytes per parameter). The values are the same either way.
        fan_in_fan_out: the ``include``d weights are stored ``(in, out, ...)``, like Hugging Face GPT-2's ``Conv1D``
            (``x @ W``), so their fan-in (for the weight's and the scores' scale) is the first dimension. Weights
            found by the built-in rules keep their known layout.
    """

    k: float
    method: str = "edge_popup"
    init: str = "signed_constant"
    scaled: bool = False
    seed: int = 0
    scope: str = "layer"
    layer_k: tuple[tuple[str, float], ...] = field(default=())
    mode: str = "fan_in"
    nonlinearity: str = "relu"
    bias: str | None = None
    include: tuple[str, ...] = field(default=())
    fan_in_fan_out: bool = False
    method_options: tuple[tuple[str, object], ...] = field(default=())
    norms: str | None = None
    scores: str | None = None
    score_dtype: str | None = None
    weight_storage: str | None = None
    rebuild_effective: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):  # typed options: SampledOptions(...) -> "sampled" + its options
            if self.method_options:
                raise ValueError("pass the method's options either as its Options object or as method_options")
            name, chosen = options_of(self.method)
            object.__setattr__(self, "method", name)
            object.__setattr__(self, "method_options", chosen)
        if isinstance(self.layer_k, dict):
            object.__setattr__(self, "layer_k", tuple(self.layer_k.items()))
        else:
            object.__setattr__(self, "layer_k", tuple(tuple(item) for item in self.layer_k))
        object.__setattr__(self, "k", _as_number(self.k))
        object.__setattr__(self, "layer_k", tuple((pattern, _as_number(k)) for pattern, k in self.layer_k))
        object.__setattr__(self, "seed", _as_number(self.seed))
        _check_k(self.k, "k")
        for pattern, k in self.layer_k:
            _check_k(k, f"layer_k[{pattern!r}]")
        method = method_class(self.method)  # a registered method, or a ValueError naming those that are
        _check_choice("init", self.init, (*INITIALIZERS, KEEP))
        if method.redraws_weights and self.init == KEEP:
            raise ValueError(
                f"method={self.method!r} redraws pruned weights from the weights' distribution, and init='keep' has "
                "none: popupify with a distribution (init='signed_constant', 'kaiming_normal', ...), or use "
                "method='edge_popup' on kept weights"
            )
        kept = self.init == KEEP
        for name, when_kept, otherwise in (
            ("bias", "keep", "zero"),
            ("norms", "keep", "identity"),
            ("scores", "magnitude", "random"),
        ):
            if getattr(self, name) is None:
                object.__setattr__(self, name, when_kept if kept else otherwise)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("mode", self.mode, ("fan_in", "fan_out"))
        _check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _check_choice("bias", self.bias, BIAS_RULES)
        _check_choice("norms", self.norms, NORM_RULES)
        _check_choice("scores", self.scores, SCORE_STARTS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")
        if not isinstance(self.scaled, bool):
            raise ValueError(f"scaled={self.scaled!r} must be True or False")
        include = (self.include,) if isinstance(self.include, str) else self.include
        if not isinstance(include, (list, tuple)) or not all(isinstance(p, str) and p for p in include):
            raise ValueError(f"include={self.include!r} must be a list of fnmatch patterns of parameter names")
        object.__setattr__(self, "include", tuple(include))
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out={self.fan_in_fan_out!r} must be True or False")
        options = self.method_options
        if isinstance(options, dict):
            options = options.items()
        try:
            options = tuple(sorted((str(name), _as_option(value)) for name, value in options))
        except (TypeError, ValueError):
            raise ValueError(
                f"method_options={self.method_options!r} must be a dict of option names to values"
            ) from None
        object.__setattr__(self, "method_options", options)
        method_class(self.method).parse_options(dict(options))
        if self.score_dtype is not None:
            name = str(self.score_dtype).removeprefix("torch.")
            _check_choice("score_dtype", name, SCORE_DTYPES)
            object.__setattr__(self, "score_dtype", name)
        if self.weight_storage is None:
            bits = packable(self.init) and not method.trains_weights
            object.__setattr__(self, "weight_storage", "bits" if bits else "dense")
        _check_choice("weight_storage", self.weight_storage, WEIGHT_STORAGES)
        if self.weight_storage == "bits":
            if not packable(self.init):
                raise ValueError(
                    f"weight_storage='bits' holds weights of one magnitude per layer, and init={self.init!r} draws "
                    "others: use init='signed_constant' (or 'xavier_signed_constant', 'unsigned_constant'), or "
                    "weight_storage='dense'"
                )
            if method.trains_weights:
                raise ValueError(
                    f"method={self.method!r} trains the weights, which then take any value: use weight_storage='dense'"
                )
        if self.rebuild_effective is None:  # keep w * mask where the bits pay for it and memory was not asked for
            reduced_scores = self.score_dtype in ("bfloat16", "float16")
            object.__setattr__(self, "rebuild_effective", self.weight_storage != "bits" or reduced_scores)
        if not isinstance(self.rebuild_effective, bool):
            raise ValueError(f"rebuild_effective={self.rebuild_effective!r} must be True or False")
        if self.fan_in_fan_out and not self.include:
            raise ValueError("fan_in_fan_out=True applies to the include= weights, and include is empty")

    @property
    def source(self):
        """Where the frozen weights come from (``core.source``): ``KeptWeights()`` for ``init="keep"``, else the
        ``SeededDraw`` of ``init``, ``scaled``, ``seed``, ``mode`` and ``nonlinearity``."""
        if self.init == KEEP:
            return KeptWeights()
        return SeededDraw(self.init, self.scaled, self.seed, self.mode, self.nonlinearity)

    def make_method(self):
        """The ``Method`` object this config runs (its registered class with the options parsed)."""
        cls = method_class(self.method)
        return cls(cls.parse_options(dict(self.method_options)))

    def k_for(self, layer: str) -> float | None:
        """The ``layer_k`` override for a layer's module name, or ``None``."""
        for pattern, k in self.layer_k:
            if fnmatch.fnmatchcase(layer, pattern):
                return k
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layer_k"] = [list(item) for item in self.layer_k]
        out["include"] = list(self.include)
        out["method_options"] = dict(self.method_options)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PopupConfig:
        return dataclass_from_dict(cls, data)


def config_differences(theirs: dict, mine: dict) -> list[tuple[str, object, object]]:
    """``(field, their value, my value)`` for every field that differs between two ``PopupConfig.to_dict()`` forms
    (fields an older record lacks are completed as that version behaved first): the one comparison state_dict
    loads and subnetwork files report. Fields in ``HOW_HELD`` say how a model holds the same values and are not
    compared: a file or state_dict made with sign-bit weights loads into a model holding float weights."""
    theirs, mine = _completed(theirs), _completed(mine)
    keys = sorted((set(theirs) | set(mine)) - set(HOW_HELD))
    return [(key, theirs.get(key), mine.get(key)) for key in keys if theirs.get(key) != mine.get(key)]


def _completed(data: dict) -> dict:
    """A config dict with the fields an older record lacks filled in (``bias``, ``norms``, ``scores`` resolved
    from ``init``); a dict that does not parse as it is, for the caller to report."""
    try:
        return PopupConfig.from_dict(data).to_dict()
    except (ValueError, TypeError):
        return data


def _as_option(value: object) -> object:
    """A method option's value, canonical: numbers as ``_as_number``, lists (a JSON round trip) as tuples, so that
    equal options compare and hash equal."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_option(item) for item in value)
    return _as_number(value)


def _as_number(value: object) -> object:
    """numpy scalars and 0-d tensors as Python numbers (``k=np.float32(0.3)``, ``k=torch.tensor(0.3)``); other values
    as they are, for the checks to name."""
    if type(value) in (bool, int, float, str):  # exact types: np.float64 subclasses float
        return value
    if hasattr(value, "shape") and hasattr(value, "item") and tuple(value.shape) == ():
        narrow = getattr(getattr(value, "dtype", None), "itemsize", 8) < 8
        value = value.item()
        if isinstance(value, float) and narrow:
            return _shortest_float32(value)  # np.float32(0.3) means 0.3, not 0.30000001192092896
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _shortest_float32(x: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``x``."""
    import struct

    target = struct.pack("<f", x)
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack("<f", candidate) == target:
            return candidate
    return x


def _check_k(k: object, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or not 0.0 < k <= 1.0:
        raise ValueError(
            f"{name}={k!r} is not a fraction in (0, 1]: it is the fraction of weights kept, e.g. 0.3 keeps 30 %"
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
