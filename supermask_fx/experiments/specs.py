"""What one run is (``RunSpec``), how it trains (``Recipe``) and what a scale changes (``Scale``).

A run is fully described by its ``RunSpec``: two runs with equal ``RunSpec.key()`` train the same thing, whatever
experiment asked for them, so an experiment that needs a run another experiment already made reuses its CSV row
(e.g. Conv4, k = 50 %, signed constant is a point of Fig. 3, Fig. 4, Fig. 6 and Fig. 7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

__all__ = ["Recipe", "RunSpec", "Scale", "SCALES", "KEY_FIELDS", "variant_settings"]


@dataclass(frozen=True)
class Recipe:
    """Optimizer and schedule of one training phase (the authors' small-scale configs, see docs/reproducing.md)."""

    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" or "constant"


#: Edge-popup (and any top-k mask search): SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine, batch 128.
EDGE_POPUP = Recipe()
#: Learned dense weights with SGD: lr 0.01 (the authors' conv*_sgd_baseline.yml).
DENSE_SGD = Recipe(lr=0.01)
#: Zhou et al. supermask (the authors' conv*sample_*.yml): SGD lr 200, momentum 0.9, no weight decay, cosine.
ZHOU = Recipe(lr=200.0, weight_decay=0.0)
#: ResNet-18 on CIFAR-10 (the authors' resnet18-*-unsigned.yaml): weight decay 5e-4, batch 256.
RESNET18 = Recipe(weight_decay=5e-4, batch_size=256)
RESNET18_DENSE = Recipe(weight_decay=5e-4, batch_size=256)


def adam_recipe(model: str) -> Recipe:
    """Learned dense weights with Adam (the authors' conv*_adam_baseline.yml): batch 60, lr 2e-4 for Conv2, 3e-4
    otherwise, constant learning rate, no weight decay."""
    return Recipe(
        optimizer="adam",
        lr=2e-4 if model == "conv2" else 3e-4,
        momentum=0.0,
        weight_decay=0.0,
        batch_size=60,
        schedule="constant",
    )


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model, how it is popupified, how it is trained, on what data, with which seed.

    ``variant`` distinguishes runs whose popupify settings alone do not say what was done:
    ``""`` (train the method), ``"retrain_found"`` (edge-popup finds a mask, then its weights are retrained under
    it), ``"retrain_random"`` (a random mask of the same size, weights retrained: Table 3), ``"zhou"`` (``sampled``
    with Zhou et al.'s settings: sampled evaluation, dynamic weight rescaling, scores 0; ``methods/sampled.py``),
    ``"sample_eval"`` (``sampled`` evaluated with sampled masks, no rescaling, the project's scores: the edge-popup
    authors' ``SampleSubnetConv``, their Fig. 6 baseline).
    ``k`` of ``method="dense"`` is 1.0; of ``method="sampled"`` it is nominal (Zhou et al. learn the fraction).
    """

    experiment: str
    model: str
    width: float
    method: str
    init: str
    k: float
    seed: int
    epochs: int
    dataset: str
    recipe: Recipe = field(default_factory=Recipe)
    scaled: bool = False
    variant: str = ""
    train_limit: int | None = None
    test_limit: int | None = None
    retrain: Recipe | None = None  # second phase of the retrain_* variants

    @property
    def optimizer(self) -> str:
        return self.recipe.optimizer

    def key(self) -> tuple[str, ...]:
        """The identity of the run (no experiment name), as the strings its CSV row holds."""
        row = self.row_fields()
        return tuple(row[name] for name in KEY_FIELDS)

    def row_fields(self) -> dict[str, str]:
        """This spec as the CSV row's spec columns (canonical strings)."""
        r = self.recipe
        return {
            "experiment": self.experiment,
            "dataset": self.dataset,
            "model": self.model,
            "width": _num(self.width),
            "method": self.method,
            "init": self.init,
            "scaled": str(bool(self.scaled)),
            "k": _num(self.k),
            "variant": self.variant,
            "optimizer": r.optimizer,
            "lr": _num(r.lr),
            "momentum": _num(r.momentum),
            "weight_decay": _num(r.weight_decay),
            "batch_size": str(r.batch_size),
            "schedule": r.schedule,
            "epochs": str(self.epochs),
            "seed": str(self.seed),
            "train_limit": "" if self.train_limit is None else str(self.train_limit),
            "test_limit": "" if self.test_limit is None else str(self.test_limit),
        }

    def with_(self, **changes) -> RunSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


#: Tokens of a ``RunSpec.variant`` (joined by ``+``) that set popupify or training options (the follow-up methods'
#: protocol): ``global`` (``scope="global"``), ``kwarmup<E>`` (k warm-up over the first E epochs, linear),
#: ``norms_learn`` (``norms="learn"``), ``coats<C>`` (``method_options={"coats": C}``).
OPTION_TOKENS = ("global", "kwarmup", "norms_learn", "coats")


def variant_settings(variant: str) -> tuple[dict, dict]:
    """``(popupify keyword arguments, TrainConfig fields)`` a variant's option tokens ask for (``OPTION_TOKENS``);
    tokens of other meanings (``zhou``, ``retrain_found``, ...) ask for none here."""
    popup: dict = {}
    train: dict = {}
    for token in filter(None, variant.split("+")):
        if token == "global":
            popup["scope"] = "global"
        elif token == "norms_learn":
            popup["norms"] = "learn"
        elif token.startswith("kwarmup"):
            train["k_warmup_epochs"] = float(token[len("kwarmup") :])
        elif token.startswith("coats"):
            popup.setdefault("method_options", {})["coats"] = int(token[len("coats") :])
    return popup, train


def _num(x: float) -> str:
    """Canonical text of a number: ``repr`` of the float, rounded to 10 significant digits (stable round trip)."""
    return repr(float(f"{float(x):.10g}"))


#: Columns of the CSV row that identify a run (everything but the experiment name and the results).
KEY_FIELDS: tuple[str, ...] = (
    "dataset",
    "model",
    "width",
    "method",
    "init",
    "scaled",
    "k",
    "variant",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "schedule",
    "epochs",
    "seed",
    "train_limit",
    "test_limit",
)


@dataclass(frozen=True)
class Scale:
    """What changes between the paper's scale and the reduced CPU scale.

    Attributes:
        name: ``"small"`` (the paper's grids shrunk to minutes: a quick look, the tests; not evidence) or
            ``"paper"``.
        dataset: data set of the small-scale experiments.
        epochs: training epochs of every phase.
        conv_width: the width multiplier that counts as "width 1" for Conv2-8 (0.25 on the CPU: 16-128 channels).
        fc_width: the same for FC.
        resnet_width: the same for ResNet-18.
        train_limit / test_limit: first N examples of each split (None: all).
        ks: the k grid of Fig. 3 for FC, Conv2, Conv4; ``deep_ks`` for Conv6/Conv8.
        width_factors: Fig. 4/5 widths, relative to "width 1".
        fig7_ks: k values of Fig. 7.
        resnet_ks: k values of Fig. 11.
        fig6_models: models of the Zhou et al. comparison.
    """

    name: str
    dataset: str
    epochs: int
    conv_width: float
    fc_width: float
    resnet_width: float
    train_limit: int | None
    test_limit: int | None
    ks: tuple[float, ...]
    deep_ks: tuple[float, ...]
    width_factors: tuple[float, ...]
    fig5_widths: tuple[float, ...]
    fig7_ks: tuple[float, ...]
    resnet_ks: tuple[float, ...]
    fig6_models: tuple[str, ...]
    table3_ks: tuple[float, ...]

    def base_width(self, model: str) -> float:
        if model == "fc":
            return self.fc_width
        if model == "resnet18":
            return self.resnet_width
        return self.conv_width


PAPER_KS = (0.1, 0.3, 0.5, 0.7, 0.9)

SCALES: dict[str, Scale] = {
    "paper": Scale(
        name="paper",
        dataset="cifar10",
        epochs=100,
        conv_width=1.0,
        fc_width=1.0,
        resnet_width=1.0,
        train_limit=None,
        test_limit=None,
        ks=PAPER_KS,
        deep_ks=PAPER_KS,
        width_factors=(0.25, 0.5, 1.0, 1.5, 2.0),
        fig5_widths=(1.0, 1.5, 2.0, 2.5, 3.0),
        fig7_ks=PAPER_KS,
        resnet_ks=PAPER_KS,
        fig6_models=("conv2", "conv4", "conv6", "conv8"),
        table3_ks=(0.3, 0.5, 0.7),
    ),
    "small": Scale(
        name="small",
        dataset="fashion_mnist",
        epochs=2,
        conv_width=0.25,
        fc_width=1.0,
        resnet_width=0.125,
        train_limit=8000,
        test_limit=None,
        ks=PAPER_KS,
        deep_ks=(0.3, 0.5, 0.7),
        width_factors=(0.5, 1.0, 1.5),
        fig5_widths=(1.0, 1.5),
        fig7_ks=(0.3, 0.5, 0.7),
        resnet_ks=(0.3, 0.7),
        fig6_models=("conv4",),
        table3_ks=(0.3, 0.5),
    ),
}
