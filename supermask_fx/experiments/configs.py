"""The paper's experiments as declarative grids of runs.

Each experiment is a list of ``Grid`` entries; a grid is the product of its axes (models x widths x inits x
scaled x ks) for one method and optimizer, on the scale's data set unless the grid names its own. Axis values
given as strings name a field of the ``Scale`` (``"ks"`` -> ``scale.ks``), so the same config gives the paper's
grid and the reduced CPU grid. Widths are factors of the scale's "width 1" of each model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .specs import (
    DENSE_SGD,
    EDGE_POPUP,
    RESNET18,
    RESNET18_DENSE,
    SCALES,
    ZHOU,
    Recipe,
    RunSpec,
    Scale,
    adam_recipe,
)

__all__ = [
    "Grid",
    "EXPERIMENTS",
    "PAPER_ONLY",
    "expand",
    "plan",
    "recipe_for",
    "smoke_subset",
    "gated_weight_count",
    "missing_data_reason",
]

KN, SC = "kaiming_normal", "signed_constant"
DEPTHS = ("fc", "conv2", "conv4", "conv6", "conv8")


@dataclass(frozen=True)
class Grid:
    """A product of runs. String values of ``ks`` / ``widths`` name a ``Scale`` field.

    ``kept_refs``: instead of ``ks``, choose k per width so that the number of kept weights equals
    ``ref * (weights at width 1)`` for each ref (Fig. 5); widths where that k would exceed 1 are skipped.
    ``dataset``: data set of the grid's runs (None: the scale's ``dataset``).
    """

    models: tuple[str, ...]
    method: str = "edge_popup"
    inits: tuple[str, ...] = (SC,)
    ks: tuple[float, ...] | str = (0.5,)
    widths: tuple[float, ...] | str = (1.0,)
    scaled: tuple[bool, ...] = (False,)
    optimizer: str = "sgd"
    variant: str = ""
    kept_refs: tuple[float, ...] | str = ()
    dataset: str | None = None


EXPERIMENTS: dict[str, list[Grid]] = {
    # Fig. 3: k x depth, Kaiming normal and signed constant, against learned dense weights (SGD and Adam).
    "fig3_depth_k": [
        Grid(("fc", "conv2", "conv4"), inits=(KN, SC), ks="ks"),
        Grid(("conv6", "conv8"), inits=(KN, SC), ks="deep_ks"),
        Grid(DEPTHS, method="dense", inits=(KN,), ks=(1.0,)),
        Grid(DEPTHS, method="dense", inits=(KN,), ks=(1.0,), optimizer="adam"),
    ],
    # Fig. 4: width at k = 50 %, against learned dense weights of the same width.
    "fig4_width": [
        Grid(("conv4", "conv6"), inits=(KN, SC), widths="width_factors"),
        Grid(("conv4", "conv6"), method="dense", inits=(KN,), ks=(1.0,), widths="width_factors"),
    ],
    # Fig. 5: width varied, k chosen so that the kept weights stay at the k = 30/50/70 % counts of width 1.
    "fig5_fixed_params": [
        Grid(("conv4",), inits=(SC,), widths="fig5_widths", kept_refs=(0.3, 0.5, 0.7)),
    ],
    # Fig. 6: edge-popup vs Zhou et al. (sampled masks) with N_x, U_x, N_k, U_k. The baseline as the edge-popup
    # authors ran it (their SampleSubnetConv): masks sampled in training and evaluation, no weight rescaling (which
    # only suits Glorot-std weights: docs/reproducing.md, "Zhou et al. on Conv2").
    "fig6_zhou": [
        Grid(
            "fig6_models",
            method="sampled",
            inits=("xavier_normal", "xavier_signed_constant", KN, SC),
            variant="sample_eval",
        ),
        Grid("fig6_models", inits=("xavier_normal", "xavier_signed_constant", KN, SC)),
    ],
    # Fig. 7: weight distributions on Conv4.
    "fig7_distributions": [
        Grid(("conv4",), inits=(KN, SC), ks="fig7_ks", scaled=(False, True)),
        Grid(("conv4",), inits=("xavier_normal", "kaiming_uniform"), ks="fig7_ks"),
    ],
    # Table 3: retrain the weights of a found subnetwork vs of a random subnetwork of the same size.
    "table3_retrain": [
        Grid(("conv4",), inits=(SC,), ks="table3_ks", variant="retrain_found"),
        Grid(("conv4",), method="random", inits=(SC,), ks="table3_ks", variant="retrain_random"),
    ],
    # Fig. 11: CIFAR ResNet-18 over k, against its dense training.
    "resnet18": [
        Grid(("resnet18",), inits=(KN, SC), ks="resnet_ks"),
        Grid(("resnet18",), method="dense", inits=(KN,), ks=(1.0,)),
    ],
    # Fig. 3's k sweep for Conv4 (signed constant) on CIFAR-10 against learned dense weights (SGD): at CPU scale
    # the CIFAR part of the suite (skipped where CIFAR-10 is neither local nor downloadable); at paper scale a
    # subset of fig3_depth_k (the same runs, made once).
    "cifar10_k": [
        Grid(("conv4",), inits=(SC,), ks="ks", dataset="cifar10"),
        Grid(("conv4",), method="dense", inits=(KN,), ks=(1.0,), dataset="cifar10"),
    ],
}

#: Experiments that exist only at the paper's scale (emitted as commands, not run here).
PAPER_ONLY = ("imagenet_table2",)

#: Priority of runs within a pass: (experiment, models or None for all). The cheap part of Fig. 3 first, then
#: Fig. 7, Fig. 6 and Table 3, then the deep nets of Fig. 3, then the rest.
PRIORITY: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("fig3_depth_k", ("fc", "conv2", "conv4")),
    ("fig7_distributions", None),
    ("fig6_zhou", None),
    ("table3_retrain", None),
    ("fig3_depth_k", None),
    ("fig4_width", None),
    ("fig5_fixed_params", None),
    ("resnet18", None),
    ("cifar10_k", None),
)

#: The experiments ``all`` runs (shared runs are attributed to the first one listed).
ORDER = (
    "fig3_depth_k",
    "fig7_distributions",
    "fig6_zhou",
    "table3_retrain",
    "fig4_width",
    "fig5_fixed_params",
    "resnet18",
    "cifar10_k",
)


def recipe_for(model: str, method: str, optimizer: str) -> Recipe:
    if method == "dense" and optimizer == "adam":
        return adam_recipe(model)
    if model == "resnet18":
        return RESNET18_DENSE if method == "dense" else RESNET18
    if method == "dense":
        return DENSE_SGD
    if method == "sampled":
        return ZHOU
    return EDGE_POPUP


def _axis(value, scale: Scale) -> tuple:
    return tuple(getattr(scale, value)) if isinstance(value, str) else tuple(value)


_WEIGHT_COUNTS: dict[tuple[str, float, str], int] = {}


def gated_weight_count(model: str, width: float, dataset: str) -> int:
    """Number of weights popupify gates in ``build_model(model, dataset=dataset, width=width)`` (Conv/Linear)."""
    key = (model, float(width), dataset)
    if key not in _WEIGHT_COUNTS:
        from torch import nn

        from ..models import build_model

        net = build_model(model, dataset=dataset, width=width)
        _WEIGHT_COUNTS[key] = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return _WEIGHT_COUNTS[key]


def expand(name: str, scale: Scale | str, seeds: int | tuple[int, ...]) -> list[RunSpec]:
    """The runs of experiment ``name`` at ``scale`` for ``seeds`` (a count, meaning 0..n-1, or explicit seeds)."""
    scale = SCALES[scale] if isinstance(scale, str) else scale
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    specs: list[RunSpec] = []
    for grid in EXPERIMENTS[name]:
        dataset = grid.dataset or scale.dataset
        for model in _axis(grid.models, scale):
            base = scale.base_width(model)
            for factor in _axis(grid.widths, scale):
                width = base * factor
                if grid.kept_refs:
                    total1 = gated_weight_count(model, base, dataset)
                    total = gated_weight_count(model, width, dataset)
                    ks = [ref * total1 / total for ref in _axis(grid.kept_refs, scale)]
                    ks = [k for k in ks if 0.0 < k <= 1.0]
                else:
                    ks = _axis(grid.ks, scale)
                for init in grid.inits:
                    for scaled in grid.scaled:
                        for k in ks:
                            for seed in seed_list:
                                recipe = recipe_for(model, grid.method, grid.optimizer)
                                specs.append(
                                    RunSpec(
                                        experiment=name,
                                        model=model,
                                        width=width,
                                        method=grid.method,
                                        init=init,
                                        k=k,
                                        seed=seed,
                                        epochs=scale.epochs,
                                        dataset=dataset,
                                        recipe=recipe,
                                        scaled=scaled,
                                        variant=grid.variant,
                                        train_limit=scale.train_limit,
                                        test_limit=scale.test_limit,
                                        retrain=DENSE_SGD if grid.variant.startswith("retrain") else None,
                                    )
                                )
    return specs


def plan(
    names: list[str], scale: Scale | str, seeds: int | tuple[int, ...], smoke: bool = False, log=print
) -> list[RunSpec]:
    """All runs of ``names`` in the order to make them; runs shared between experiments are listed once (under
    the first experiment that needs them). Runs on a data set that is neither local nor downloadable are left
    out, with one line per experiment through ``log`` saying how many and why (``missing_data_reason``).

    Order: the runs on the scale's own data set first, then those on other data sets (CIFAR-10 at CPU scale),
    each part in passes: a first pass makes the first two seeds of every configuration (by ``PRIORITY``, the two
    seeds of a configuration next to each other), so a partial suite covers every figure early with enough seeds
    for a spread; then one pass per further seed.
    """
    scale = SCALES[scale] if isinstance(scale, str) else scale
    specs: list[RunSpec] = []
    seen: set[tuple] = set()
    reasons: dict[str, str | None] = {}
    skipped: dict[tuple[str, str], int] = {}
    for name in names:
        for spec in experiment_specs(name, scale, seeds, smoke):
            if spec.key() in seen:
                continue
            seen.add(spec.key())
            if spec.dataset not in reasons:
                reasons[spec.dataset] = missing_data_reason(spec.dataset)
            if reasons[spec.dataset] is not None:
                skipped[(name, spec.dataset)] = skipped.get((name, spec.dataset), 0) + 1
                continue
            specs.append(spec)
    for (name, dataset), count in skipped.items():
        log(f"{name}: {count} runs skipped: {reasons[dataset]}")
    first = sorted({s.seed for s in specs})[:2]
    return sorted(
        specs,
        key=lambda s: (s.dataset != scale.dataset, 0 if s.seed in first else s.seed + 1, priority(s, names)),
    )


def missing_data_reason(dataset: str) -> str | None:
    """Why runs on ``dataset`` cannot be made here, or None if they can (a local copy exists, or torchvision can
    download it now): the planner skips such runs and the report names the reason next to them."""
    from .. import data

    if data.is_available_offline(dataset) or data.download_possible(dataset):
        return None
    name = data.dataset_info(dataset).display_name
    return (
        f"{name} not found locally (searched {len(data.search_locations(dataset))} folders; "
        f"load_dataset({data.canonical_name(dataset)!r}, download=False) lists them) "
        "and not downloadable here (offline, or torchvision missing)"
    )


def priority(spec: RunSpec, names: list[str]) -> int:
    """Position of ``spec`` in ``PRIORITY`` (experiments not in it: after, in the order of ``names``)."""
    for i, (experiment, models) in enumerate(PRIORITY):
        if spec.experiment == experiment and (models is None or spec.model in models):
            return i
    return len(PRIORITY) + names.index(spec.experiment)


def experiment_specs(name: str, scale: Scale | str, seeds, smoke: bool = False) -> list[RunSpec]:
    """``expand(name, ...)``, or its smoke subset (1 seed) with ``smoke``."""
    return smoke_subset(expand(name, scale, 1)) if smoke else expand(name, scale, seeds)


def smoke_subset(specs: list[RunSpec], *, limit: int = 256) -> list[RunSpec]:
    """One run per (experiment, model, method, optimizer, variant), seed 0, 1 epoch, ``limit`` examples,
    at a quarter of the scale's width: exercises every code path in seconds."""
    out: list[RunSpec] = []
    seen: set[tuple] = set()
    for spec in specs:
        ident = (spec.experiment, spec.model, spec.method, spec.optimizer, spec.variant)
        if ident in seen or spec.seed != specs[0].seed:
            continue
        seen.add(ident)
        out.append(spec.with_(epochs=1, train_limit=limit, test_limit=limit, width=spec.width / 4))
    return out
