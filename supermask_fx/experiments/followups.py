"""The CPU protocol that decides the follow-up methods' claims, fixed here before any run is made.

``python -m supermask_fx.experiments decide --protocol followups`` makes the runs (resumable) and
``... decide --protocol followups --report`` writes docs/results/followups/report.md. The rules are those of the
paper's protocol (``protocol.py``): 3 seeds per configuration, a difference of configuration means with its 95 %
Welch interval, read by ``stats.decide`` (supported / contradicted / inconclusive; ``>=`` is non-inferiority with a
margin). The scale is that protocol's: FC 784-300-100 on MNIST for 20 epochs (every claim), and Conv2 at width 0.25
on the CIFAR-10 copy for 15 epochs where a claim was made on conv nets (IteRand). Edge-popup runs the paper's
protocol already made (same ``RunSpec`` key) are read from its CSV, not made again.

Options of each side, fixed here:

* IteRand: ``method="iterand"`` with its defaults (``methods/iterand.py``), signed constant, k = 50 %.
* k warm-up + global: ``scope="global"`` and a linear k warm-up from 1 over the first 5 of 20 epochs
  (``TrainConfig(k_warmup_epochs=5)``), against per-layer top-k without warm-up, at k = 10 % and 5 %; the two
  factors alone (global without warm-up, per-layer with warm-up) at k = 10 % are plotted, not compared.
* Learned norms: ``fc_bn`` (a BatchNorm after each hidden layer), ``norms="learn"`` against ``norms="identity"``,
  k = 50 %, signed constant; the norms' affine parameters take the scores' optimizer (SGD lr 0.1, weight decay 1e-4).
* Coats: ``method="multicoat"`` with 2 and 3 coats (inner coats at the method's default fractions) against one coat
  (edge-popup) at the same outer k = 50 %, signed constant.
* Binary weights with a gain: ``method="biprop"`` on Kaiming-normal weights (the authors' choice) against edge-popup
  on signed constant, k = 50 %, non-inferiority with a 0.5-point margin.
"""

from __future__ import annotations

from .protocol import CIFAR_EPOCHS, CIFAR_WIDTH, FC_EPOCHS, KN, SC, Claim, cifar, diff, fc
from .specs import RunSpec

__all__ = ["EXPERIMENT", "SEEDS", "TITLE", "claims", "anchors", "configurations", "plan"]

EXPERIMENT = "followups"
SEEDS = 3
TITLE = "The follow-up methods' claims at CPU scale: verdicts"
WARMUP = "kwarmup5"


def _gap_grows(label: str, small: tuple[RunSpec, RunSpec], large: tuple[RunSpec, RunSpec]):
    """(new - old) at ``small`` minus (new - old) at ``large`` > 0: the gain is larger at the small width."""
    from .protocol import Comparison

    (new_s, old_s), (new_l, old_l) = small, large
    return Comparison(label, ((1.0, new_s), (-1.0, old_s), (-1.0, new_l), (1.0, old_l)), ">")


def _claims() -> tuple[Claim, ...]:
    fc_label = f"FC 784-300-100 on MNIST, {FC_EPOCHS} epochs"
    cifar_label = f"Conv2 at width {CIFAR_WIDTH:g} on the CIFAR-10 copy, {CIFAR_EPOCHS} epochs"
    low_ks = (0.1, 0.05)
    return (
        Claim(
            1,
            "IteRand beats edge-popup at the same width, more at small widths (Chijiwa et al. 2021, Fig. 2-3)",
            "Chijiwa et al., Fig. 2-3",
            f"{fc_label} at widths 0.25 and 1; {cifar_label}; k = 50 %, signed constant (paper: Conv6, ResNet-18/34 "
            "on CIFAR-10, widths 0.25-2, ImageNet ResNet-34/50)",
            (
                diff("FC width 0.25: IteRand minus edge-popup", fc(width=0.25, method="iterand"), fc(width=0.25)),
                diff("FC width 1: IteRand minus edge-popup", fc(method="iterand"), fc()),
                _gap_grows(
                    "FC: gain of IteRand at width 0.25 minus its gain at width 1",
                    (fc(width=0.25, method="iterand"), fc(width=0.25)),
                    (fc(method="iterand"), fc()),
                ),
                diff("Conv2 CIFAR-10: IteRand minus edge-popup", cifar("conv2", method="iterand"), cifar("conv2")),
            ),
        ),
        Claim(
            2,
            "A k warm-up plus a global threshold beats per-layer top-k at low k (biprop's --prune_rate_epoch; "
            "global ranking)",
            "Diffenderfer & Kailkhura 2021; Ramanujan et al. 2020 (Sec. 4.1, per-layer)",
            f"{fc_label}, signed constant, k = 10 % and 5 %; warm-up linear over the first 5 epochs",
            tuple(
                diff(
                    f"k = {k:.0%}: global + warm-up minus per-layer",
                    fc(k=k, variant=f"global+{WARMUP}"),
                    fc(k=k),
                )
                for k in low_ks
            ),
            figure=(fc(k=0.1, variant="global"), fc(k=0.1, variant=WARMUP)),
        ),
        Claim(
            3,
            "Learned norms beat frozen identity norms (biprop: ImageNet WRN-50, 74.03 % against 72.67 %)",
            "Diffenderfer & Kailkhura 2021",
            f"{fc_label} with a BatchNorm after each hidden layer (fc_bn), k = 50 %, signed constant",
            (diff("fc_bn: learned norms minus identity norms", fc("fc_bn", variant="norms_learn"), fc("fc_bn")),),
        ),
        Claim(
            4,
            "Two or three coats beat one coat at the same k (Okoshi et al. 2022)",
            "Okoshi et al. 2022",
            f"{fc_label}, outer k = 50 %, signed constant (paper: ResNet-18/50 on CIFAR-10 and ImageNet)",
            (
                diff("2 coats minus 1 coat", fc(method="multicoat", variant="coats2"), fc()),
                diff("3 coats minus 1 coat", fc(method="multicoat", variant="coats3"), fc()),
            ),
        ),
        Claim(
            5,
            "Binary weights with a gain are not worse than signed constant (biprop)",
            "Diffenderfer & Kailkhura 2021",
            f"{fc_label}, k = 50 %: biprop on Kaiming normal against edge-popup on signed constant; '>=' is "
            "non-inferiority with a 0.5-point margin",
            (diff("biprop minus edge-popup signed constant", fc(method="biprop", init=KN), fc(init=SC), ">=", 0.5),),
            figure=(fc(init=KN),),
        ),
    )


CLAIMS: tuple[Claim, ...] = ()


def claims() -> tuple[Claim, ...]:
    global CLAIMS
    if not CLAIMS:
        CLAIMS = _claims()
    return CLAIMS


def anchors() -> tuple[tuple[str, RunSpec, str], ...]:
    """No configuration here has a published figure for the same model and data; the papers' figures are given
    beside ours, with their scale, in docs/reproducing.md."""
    return ()


def configurations() -> list[RunSpec]:
    out, seen = [], set()
    for spec in (s for c in claims() for s in c.configs()):
        spec = spec.with_(experiment=EXPERIMENT)
        if spec.key() not in seen:
            seen.add(spec.key())
            out.append(spec)
    return out


def plan(seeds: int = SEEDS) -> list[RunSpec]:
    """The MNIST runs claim by claim (every seed of a configuration together), then the CIFAR-10 runs."""
    configs = configurations()
    mnist = [c.with_(seed=s) for c in configs if c.dataset == "mnist" for s in range(seeds)]
    cifar10 = [c.with_(seed=s) for s in range(seeds) for c in configs if c.dataset == "cifar10"]
    return mnist + cifar10
