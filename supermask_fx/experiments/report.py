"""The report: PNG figures in the style of the paper's (mean +- one std over seeds) and a Markdown list of the
paper's claims with our numbers and a verdict. Runs not in the CSV are shown as missing, never filled in.

Verdict rule (``compare``), per comparison of two groups of per-seed accuracies A and B: the difference of
means with its 95 % Welch interval, read as in ``stats.py`` (the same rule as the CPU protocol's report):
``A > B`` supported if the interval lies above 0, contradicted if below; ``A >= B`` non-inferiority within 0.5
point; ``A ~ B`` equivalence within 1 point; otherwise inconclusive. With one seed: inconclusive (n < 2).

A claim made of several comparisons is "contradicted" if any is, "supported" if all are, else inconclusive;
if any group it needs has no run it is "missing runs" (with what the available comparisons say so far).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .configs import EXPERIMENTS, experiment_specs, missing_data_reason
from .results import read_rows, row_key
from .specs import SCALES, RunSpec
from .stats import CONTRADICTED, SUPPORTED, contrast, decide

__all__ = ["Group", "compare", "make_report", "Claim"]

MISSING = "missing runs"
#: Margins (points) of the non-inferiority (">=") and equivalence ("~") comparisons.
MARGINS = {">=": 0.5, "~": 1.0}
INIT_LABEL = {
    "kaiming_normal": "Kaiming normal (N_k)",
    "signed_constant": "signed constant (U_k)",
    "xavier_normal": "Xavier normal (N_x)",
    "xavier_signed_constant": "Xavier signed constant (U_x)",
    "kaiming_uniform": "Kaiming uniform",
}


@dataclass
class Group:
    """The runs of one configuration (all seeds): accuracies done and seeds still missing."""

    spec: RunSpec
    accs: list[float] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    found: list[float] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    by_seed: dict[int, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.accs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs) if self.accs else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0

    def text(self) -> str:
        if not self.accs:
            return "missing"
        miss = f", {len(self.missing)} missing" if self.missing else ""
        return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n}{miss})"


def _config_key(spec: RunSpec) -> tuple:
    return spec.with_(seed=0, experiment="").key()


def collect(rows: list[dict[str, str]], specs: list[RunSpec]) -> dict[tuple, Group]:
    """Group the expected ``specs`` by configuration and attach the CSV rows that match them exactly."""
    index = {row_key(row): row for row in rows}
    groups: dict[tuple, Group] = {}
    for spec in specs:
        group = groups.setdefault(_config_key(spec), Group(spec.with_(seed=0)))
        row = index.get(spec.key())
        if row is None:
            group.missing.append(spec.seed)
            continue
        acc = float(row["test_accuracy"])
        group.accs.append(acc)
        group.by_seed[spec.seed] = acc
        if row.get("kept_weights"):
            group.kept.append(int(row["kept_weights"]))
        if row.get("found_accuracy"):
            group.found.append(float(row["found_accuracy"]))
    return groups


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(a: list[float], b: list[float], relation: str = ">") -> str:
    """Verdict for ``A relation B`` over per-seed values: the difference of means with its 95 % Welch interval,
    read by ``stats.decide`` (``">="``: non-inferiority within ``MARGINS[">="]`` points; ``"~"``: equivalence
    within ``MARGINS["~"]``)."""
    if not a or not b:
        return MISSING
    return decide(contrast([(1.0, a), (-1.0, b)]), relation, MARGINS.get(relation, 0.0))


def combine(verdicts: list[str]) -> str:
    if not verdicts:
        return MISSING
    present = [v for v in verdicts if v != MISSING]
    if not present:
        return MISSING
    if any(v == CONTRADICTED for v in present):
        so_far = CONTRADICTED
    elif all(v == SUPPORTED for v in present):
        so_far = SUPPORTED
    else:
        ns = sorted({v for v in present if v.startswith("inconclusive")})
        so_far = ns[0] if len(ns) == 1 else "inconclusive"
    if len(present) < len(verdicts):
        return f"{MISSING} (so far {so_far} on {len(present)} of {len(verdicts)} comparisons)"
    return so_far


@dataclass
class Claim:
    title: str
    experiment: str
    lines: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)

    def add(
        self,
        label: str,
        a: Group | list[float] | None,
        relation: str,
        b: Group | list[float] | None,
        how: str = "",
        needs: list[Group] = (),
    ):
        """One comparison; ``needs``: every group the comparison depends on (e.g. all k of a curve whose best
        point is compared): if one of them has no run yet, the comparison is "missing runs"."""
        va = a.accs if isinstance(a, Group) else (a or [])
        vb = b.accs if isinstance(b, Group) else (b or [])
        verdict = compare(va, vb, relation)
        absent = [g for g in needs if not g.accs]
        if absent:
            verdict = MISSING
            how += f" ({len(absent)} needed configuration(s) without any run)"
        self.verdicts.append(verdict)
        ta = a.text() if isinstance(a, Group) else _list_text(va)
        tb = b.text() if isinstance(b, Group) else _list_text(vb)
        self.lines.append(f"{label}: {ta} {relation} {tb}{how} → {verdict}")

    @property
    def verdict(self) -> str:
        return combine(self.verdicts)


def _list_text(values: list[float]) -> str:
    if not values:
        return "missing"
    m, s = _stats(values)
    return f"{m:.2f} ± {s:.2f} (n={len(values)})"


def _select(groups: dict[tuple, Group], **want) -> list[Group]:
    out = []
    for g in groups.values():
        s = g.spec
        if all(_match(getattr(s, name) if name != "optimizer" else s.optimizer, v) for name, v in want.items()):
            out.append(g)
    return out


def _match(value, want) -> bool:
    if isinstance(want, float):
        return abs(float(value) - want) < 1e-9
    return value == want


def _paired(a: Group, b: Group) -> list[float]:
    """Per-seed differences a - b over the seeds both have."""
    return [a.by_seed[s] - b.by_seed[s] for s in sorted(set(a.by_seed) & set(b.by_seed))]


def _best(groups: list[Group]) -> Group | None:
    done = [g for g in groups if g.accs]
    return max(done, key=lambda g: g.mean) if done else None


def dataset_label(name: str) -> str:
    """Name to report runs on data set ``name`` under: its display name, with " (JPEG copy)" when the local copy
    the runs read is not bit-exact (the CIFAR-10 JPEG copy in ``../shared/data``)."""
    from ..data import dataset_info, local_copy_is_exact

    return dataset_info(name).display_name + (" (JPEG copy)" if local_copy_is_exact(name) is False else "")


def _add_best_k(c: Claim, label: str, curve: list[Group]) -> None:
    """One "best k in 30–70 % > best of the other k" comparison of an edge-popup k curve (skipped if the curve
    has no k outside 30–70 %)."""
    inner = [g for g in curve if 0.3 - 1e-9 <= g.spec.k <= 0.7 + 1e-9]
    outer = [g for g in curve if not 0.3 - 1e-9 <= g.spec.k <= 0.7 + 1e-9]
    if not outer:
        return  # grid without k = 10 % / 90 % for this model at this scale
    bi, bo = _best(inner), _best(outer)
    how = f" (best k in 30–70: {bi.spec.k:.0%}; best of 10/90: {bo.spec.k:.0%})" if bi and bo else ""
    c.add(label, bi, ">", bo, how, needs=curve)


# ----------------------------------------------------------------------------------------------------- claims


def claims(groups: dict[str, dict[tuple, Group]]) -> list[Claim]:
    out = []
    g3 = groups.get("fig3_depth_k", {})
    c = Claim("Accuracy is best for k in 30–70 % (edge-popup, Fig. 3)", "fig3_depth_k")
    for model in ("fc", "conv2", "conv4", "conv6", "conv8"):
        for init in ("kaiming_normal", "signed_constant"):
            _add_best_k(c, f"{model} {init}", _select(g3, model=model, init=init, method="edge_popup"))
    out.append(c)

    gc = groups.get("cifar10_k", {})
    if gc:
        label = dataset_label(next(iter(gc.values())).spec.dataset)
        c = Claim(f"On {label}, accuracy is best for k in 30–70 % (Conv4, edge-popup)", "cifar10_k")
        for init in sorted({g.spec.init for g in _select(gc, method="edge_popup")}):
            _add_best_k(c, f"conv4 {init}", _select(gc, model="conv4", init=init, method="edge_popup"))
        out.append(c)

    c = Claim("Deeper nets close the gap to learned dense weights (Fig. 3)", "fig3_depth_k")
    for init in ("kaiming_normal", "signed_constant"):
        gaps, needed = {}, []
        for model in ("conv2", "conv8"):
            dense_all = _select(g3, model=model, method="dense")
            ep_all = _select(g3, model=model, init=init, method="edge_popup")
            needed += dense_all + ep_all
            dense, ep = _best(dense_all), _best(ep_all)
            gaps[model] = _paired(dense, ep) if dense and ep else []
        c.add(
            f"{init}: gap (best dense − best-k edge-popup) conv2 vs conv8",
            gaps["conv2"],
            ">",
            gaps["conv8"],
            needs=needed,
        )
    out.append(c)

    g4 = groups.get("fig4_width", {})
    c = Claim("Wider nets close the gap to learned dense weights (Fig. 4, k = 50 %)", "fig4_width")
    for model in ("conv4", "conv6"):
        widths = sorted({g.spec.width for g in _select(g4, model=model)})
        if len(widths) < 2:
            continue
        lo, hi = widths[0], widths[-1]
        for init in ("kaiming_normal", "signed_constant"):
            gap = {}
            for w in (lo, hi):
                dense = _select(g4, model=model, method="dense", width=w)
                ep = _select(g4, model=model, method="edge_popup", init=init, width=w)
                gap[w] = _paired(dense[0], ep[0]) if dense and ep else []
            c.add(f"{model} {init}: gap at width {lo:g} vs {hi:g}", gap[lo], ">", gap[hi])
    out.append(c)

    g5 = groups.get("fig5_fixed_params", {})
    c = Claim("At a fixed number of kept weights, wider is better (Fig. 5)", "fig5_fixed_params")
    bases = sorted({g.spec.width for g in g5.values()})
    if bases:
        base = bases[0]
        for ref_group in sorted(_select(g5, width=base), key=lambda g: g.spec.k):
            wider = [
                g
                for g in g5.values()
                if g.spec.width > base and g.spec.model == ref_group.spec.model and _same_ref(g, ref_group, g5)
            ]
            for g in sorted(wider, key=lambda g: g.spec.width):
                c.add(
                    f"{g.spec.model} kept = {ref_group.spec.k:.0%} of width 1: width {g.spec.width:g} "
                    f"(k = {g.spec.k:.1%}) vs width {base:g}",
                    g,
                    ">",
                    ref_group,
                )
    out.append(c)

    g6 = groups.get("fig6_zhou", {})
    c = Claim("Edge-popup beats Zhou et al.'s sampled supermask (Fig. 6)", "fig6_zhou")
    for g in sorted(_select(g6, method="sampled"), key=lambda g: (g.spec.model, g.spec.init)):
        ep = _select(g6, method="edge_popup", model=g.spec.model, init=g.spec.init)
        c.add(f"{g.spec.model} {g.spec.init}", ep[0] if ep else None, ">", g)
    out.append(c)

    g7 = groups.get("fig7_distributions", {})
    c = Claim("Signed constant ≥ Kaiming normal ≫ Xavier normal / Kaiming uniform (Fig. 7)", "fig7_distributions")
    for k in sorted({g.spec.k for g in g7.values()}):

        def one(init, k=k):
            found = _select(g7, init=init, k=k, scaled=False)
            return found[0] if found else None

        c.add(f"k={k:.0%}: signed constant vs Kaiming normal", one("signed_constant"), ">=", one("kaiming_normal"))
        c.add(f"k={k:.0%}: Kaiming normal vs Xavier normal", one("kaiming_normal"), ">", one("xavier_normal"))
        c.add(f"k={k:.0%}: Kaiming normal vs Kaiming uniform", one("kaiming_normal"), ">", one("kaiming_uniform"))
    out.append(c)

    gt = groups.get("table3_retrain", {})
    c = Claim("Retraining a found subnetwork ≈ retraining a random one of the same size (Table 3)", "table3_retrain")
    for g in sorted(_select(gt, variant="retrain_found"), key=lambda g: g.spec.k):
        rnd = _select(gt, variant="retrain_random", k=g.spec.k, model=g.spec.model)
        c.add(
            f"{g.spec.model} k={g.spec.k:.0%}: found, retrained vs random, retrained", g, "~", rnd[0] if rnd else None
        )
    out.append(c)
    return out


def _same_ref(g: Group, ref: Group, g5: dict[tuple, Group]) -> bool:
    """Whether run ``g`` is planned to keep as many weights as base run ``ref`` (within 2 %, same model)."""
    return g.spec.model == ref.spec.model and abs(_kept_estimate(g) / _kept_estimate(ref) - 1) < 0.02


def _kept_estimate(g: Group) -> float:
    from .configs import gated_weight_count

    return g.spec.k * gated_weight_count(g.spec.model, g.spec.width, g.spec.dataset)


# ---------------------------------------------------------------------------------------------------- figures


def _plot_line(ax, groups: list[Group], x, label: str, **kw):
    pts = sorted(((x(g), g) for g in groups if g.accs), key=lambda p: p[0])
    if not pts:
        return
    xs = [p[0] for p in pts]
    ms = [p[1].mean for p in pts]
    ss = [p[1].std for p in pts]
    ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label, **kw)


def _hline(ax, group: Group | None, label: str, color: str, style="--"):
    if group is None or not group.accs:
        return
    ax.axhline(group.mean, color=color, linestyle=style, label=f"{label} ({group.mean:.1f})")
    ax.axhspan(group.mean - group.std, group.mean + group.std, color=color, alpha=0.12)


def _legend(ax, size):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def _missing_note(ax, groups: list[Group]):
    missing = sum(len(g.missing) for g in groups)
    if missing:
        ax.text(0.02, 0.97, f"missing: {missing} runs", transform=ax.transAxes, fontsize=7, color="crimson", va="top")


def figures(groups: dict[str, dict[tuple, Group]], out: Path, dataset: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def save(fig, name):
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = path

    g3 = groups.get("fig3_depth_k")
    if g3:
        models = [m for m in ("fc", "conv2", "conv4", "conv6", "conv8") if _select(g3, model=m)]
        fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            for init, color in (("kaiming_normal", "tab:blue"), ("signed_constant", "tab:red")):
                _plot_line(
                    ax,
                    _select(g3, model=model, init=init, method="edge_popup"),
                    lambda g: 100 * g.spec.k,
                    INIT_LABEL[init],
                    color=color,
                )
            for opt, color in (("sgd", "tab:green"), ("adam", "tab:purple")):
                dense = _select(g3, model=model, method="dense", optimizer=opt)
                _hline(ax, dense[0] if dense else None, f"dense {opt}", color)
            _missing_note(ax, _select(g3, model=model))
            ax.set_title(model.upper() if model == "fc" else model.capitalize())
            ax.set_xlabel("% of weights kept (k)")
            ax.set_ylabel("test accuracy (%)")
            _legend(ax, 6)
        fig.suptitle(f"Fig. 3: depth and k ({dataset})", fontsize=9)
        save(fig, "fig3_depth_k")

    g4 = groups.get("fig4_width")
    if g4:
        models = [m for m in ("conv4", "conv6") if _select(g4, model=m)]
        fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            for init, color in (("kaiming_normal", "tab:blue"), ("signed_constant", "tab:red")):
                _plot_line(
                    ax,
                    _select(g4, model=model, init=init, method="edge_popup"),
                    lambda g: g.spec.width,
                    INIT_LABEL[init],
                    color=color,
                )
            _plot_line(ax, _select(g4, model=model, method="dense"), lambda g: g.spec.width, "dense sgd", color="k")
            _missing_note(ax, _select(g4, model=model))
            ax.set_title(f"{model.capitalize()}, k = 50 %")
            ax.set_xlabel("width multiplier (absolute)")
            ax.set_ylabel("test accuracy (%)")
            _legend(ax, 6)
        fig.suptitle(f"Fig. 4: width ({dataset})", fontsize=9)
        save(fig, "fig4_width")

    g5 = groups.get("fig5_fixed_params")
    if g5:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        bases = sorted({g.spec.width for g in g5.values()})
        for i, ref in enumerate(sorted(_select(g5, width=bases[0]), key=lambda g: g.spec.k)):
            same = [g for g in g5.values() if g is ref or _same_ref(g, ref, g5)]
            _plot_line(ax, same, lambda g: g.spec.width, f"kept = {ref.spec.k:.0%} of width 1", color=f"C{i}")
        _missing_note(ax, list(g5.values()))
        ax.set_xlabel("width multiplier (absolute)")
        ax.set_ylabel("test accuracy (%)")
        _legend(ax, 7)
        ax.set_title(f"Fig. 5: fixed number of kept weights ({dataset})", fontsize=9)
        save(fig, "fig5_fixed_params")

    def bars(name, title, cats, series, ylabel="test accuracy (%)"):
        fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(cats)), 3.4))
        width = 0.8 / max(1, len(series))
        for j, (label, getter) in enumerate(series):
            xs, ms, ss = [], [], []
            for i, cat in enumerate(cats):
                g = getter(cat)
                if g is not None and g.accs:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ms.append(g.mean)
                    ss.append(g.std)
            ax.bar(xs, ms, width, yerr=ss, capsize=3, label=label)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([c if isinstance(c, str) else f"{c}" for c in cats], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        _legend(ax, 7)
        _missing_note(ax, list(groups.get(name, {}).values()))
        lo = [g.mean - g.std - 5 for g in groups.get(name, {}).values() if g.accs]
        if lo:
            ax.set_ylim(max(0, min(lo)), None)
        save(fig, name)

    g6 = groups.get("fig6_zhou")
    if g6:
        cats = sorted({(g.spec.model, g.spec.init) for g in g6.values()})
        labels = [f"{m} {INIT_LABEL.get(i, i).split('(')[-1].rstrip(')')}" for m, i in cats]

        def pick(method):
            return lambda label: next(
                iter(_select(g6, model=cats[labels.index(label)][0], init=cats[labels.index(label)][1], method=method)),
                None,
            )

        bars(
            "fig6_zhou",
            f"Fig. 6: edge-popup vs Zhou et al. ({dataset})",
            labels,
            [("edge-popup", pick("edge_popup")), ("Zhou et al. (sampled)", pick("sampled"))],
        )

    g7 = groups.get("fig7_distributions")
    if g7:
        ks = sorted({g.spec.k for g in g7.values()})
        kinds = [
            ("kaiming_normal", False),
            ("signed_constant", False),
            ("kaiming_normal", True),
            ("signed_constant", True),
            ("xavier_normal", False),
            ("kaiming_uniform", False),
        ]
        labels = [f"{INIT_LABEL[i].split(' (')[0]}{chr(10) + 'scaled' if s else ''}" for i, s in kinds]
        series = [
            (
                f"k = {k:.0%}",
                lambda label, k=k: next(
                    iter(_select(g7, init=kinds[labels.index(label)][0], scaled=kinds[labels.index(label)][1], k=k)),
                    None,
                ),
            )
            for k in ks
        ]
        bars("fig7_distributions", f"Fig. 7: weight distributions, Conv4 ({dataset})", labels, series)

    gt = groups.get("table3_retrain")
    if gt:
        ks = sorted({g.spec.k for g in gt.values()})
        labels = [f"k = {k:.0%}" for k in ks]

        def tget(variant):
            return lambda label: next(iter(_select(gt, variant=variant, k=ks[labels.index(label)])), None)

        def found_before(label):
            g = next(iter(_select(gt, variant="retrain_found", k=ks[labels.index(label)])), None)
            if g is None or not g.found:
                return None
            return Group(g.spec, accs=list(g.found))

        bars(
            "table3_retrain",
            f"Table 3: retraining subnetworks, Conv4 ({dataset})",
            labels,
            [
                ("found (edge-popup), before retraining", found_before),
                ("found, retrained", tget("retrain_found")),
                ("random, retrained", tget("retrain_random")),
            ],
        )

    def k_curves(name, title, ylabel="test accuracy (%)"):
        """Edge-popup accuracy over k per init (mean ± std over seeds), learned dense weights (SGD) as a line."""
        gs = groups.get(name)
        if not gs:
            return
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for init, color in (("kaiming_normal", "tab:blue"), ("signed_constant", "tab:red")):
            _plot_line(
                ax, _select(gs, init=init, method="edge_popup"), lambda g: 100 * g.spec.k, INIT_LABEL[init], color=color
            )
        dense = _select(gs, method="dense", optimizer="sgd")
        _hline(ax, dense[0] if dense else None, "dense sgd", "tab:green")
        _missing_note(ax, list(gs.values()))
        ax.set_xlabel("% of weights kept (k)")
        ax.set_ylabel(ylabel)
        _legend(ax, 7)
        ax.set_title(title, fontsize=9)
        save(fig, name)

    k_curves("resnet18", f"Fig. 11: ResNet-18 ({dataset})")
    gc = groups.get("cifar10_k")
    if gc:
        label = dataset_label(next(iter(gc.values())).spec.dataset)
        k_curves("cifar10_k", f"Conv4 over k on {label}", ylabel=f"test accuracy on {label} (%)")
    return made


# ----------------------------------------------------------------------------------------------------- report


def make_report(
    csv_path: str | Path, out_dir: str | Path, scale: str, seeds: int, command: str = "", smoke: bool = False
) -> Path:
    """Write ``out_dir/*.png`` and ``out_dir/report.md`` from ``csv_path``; return the Markdown path."""
    from ..data import dataset_info

    out_dir = Path(out_dir)
    rows = read_rows(csv_path)
    sc = SCALES[scale]
    specs = {name: experiment_specs(name, sc, seeds, smoke) for name in EXPERIMENTS}
    groups = {name: collect(rows, specs[name]) for name in EXPERIMENTS}
    dataset = dataset_info(sc.dataset).display_name
    made = figures(groups, out_dir, dataset)
    found = claims(groups)
    others = {
        name: dataset_label(ds) for name, ss in specs.items() for ds in sorted({s.dataset for s in ss} - {sc.dataset})
    }
    # experiment -> why its missing runs are not made here (data set neither local nor downloadable)
    lacking = {ds: missing_data_reason(ds) for ds in {g.spec.dataset for gs in groups.values() for g in gs.values()}}
    skipped = {}
    for name, gs in groups.items():
        why = sorted({lacking[g.spec.dataset] for g in gs.values() if g.missing and lacking[g.spec.dataset]})
        if why:
            skipped[name] = "; ".join(why)
    extra = "".join(f"; {name} on {label}" for name, label in others.items())
    lines = [
        f"# Reproduction report ({scale} scale, {dataset}{extra})",
        "",
        f"Generated from `{csv_path}` ({len(rows)} rows)" + (f" by `{command}`." if command else "."),
        f"Expected: {seeds} seeds per configuration. Accuracies are top-1 test accuracy in %, mean ± std over the "
        "seeds done (n); missing runs are listed, never filled in.",
        "",
    ]
    if rows:
        times = [float(r["wall_time_s"]) for r in rows if r.get("wall_time_s")]
        engines = sorted({r.get("engine", "") for r in rows})
        revs = sorted({r.get("git_revision", "") for r in rows})
        lines += [
            f"Wall time per run: median {statistics.median(times):.0f} s, total {sum(times) / 3600:.2f} h. "
            f"Training loop: {', '.join(engines)}. Revisions: {', '.join(revs)}.",
            "",
        ]
    if rows:
        by_kind: dict[tuple, list[float]] = {}
        for r in rows:
            kind = (r["dataset"], r["model"], float(r["width"]), r["method"] if not r["variant"] else r["variant"])
            by_kind.setdefault(kind, []).append(float(r["wall_time_s"]))
        lines += ["Measured wall time per run (median over the rows done):", ""]
        lines += ["| data set | model | width | method | runs | median s |", "|---|---|---|---|---|---|"]
        for (ds, model, width, method), secs in sorted(by_kind.items()):
            lines.append(f"| {ds} | {model} | {width:g} | {method} | {len(secs)} | {statistics.median(secs):.1f} |")
        lines.append("")
    lines += ["## Claims", "", "| claim | verdict |", "|---|---|"]
    for claim in found:
        lines.append(f"| {claim.title} | **{claim.verdict}** |")
    lines.append("")
    for claim in found:
        lines += [f"### {claim.title}", "", f"Verdict: **{claim.verdict}**", ""]
        lines += [f"- {line}" for line in claim.lines] or ["- no comparison possible: missing runs"]
        if claim.experiment in skipped:
            lines.append(f"- runs missing because they are skipped here: {skipped[claim.experiment]}")
        lines.append("")
    lines += ["## Experiments", ""]
    for name, gs in groups.items():
        expected = sum(g.n + len(g.missing) for g in gs.values())
        done = sum(g.n for g in gs.values())
        lines += [f"### {name}: {done} of {expected} runs done", ""]
        if name in others:
            lines += [f"Data set: {others[name]}.", ""]
        if name in skipped:
            lines += [f"Missing runs skipped by the planner here: {skipped[name]}.", ""]
        if name in made:
            lines += [f"![{name}]({made[name].name})", ""]
        lines += [
            "| model | width | method | init | scaled | k | optimizer | variant | accuracy | kept |",
            "|" + "---|" * 10,
        ]
        for g in sorted(
            gs.values(),
            key=lambda g: (
                g.spec.model,
                g.spec.width,
                g.spec.method,
                g.spec.init,
                g.spec.scaled,
                g.spec.k,
                g.spec.optimizer,
                g.spec.variant,
            ),
        ):
            s = g.spec
            kept = f"{statistics.fmean(g.kept):,.0f}" if g.kept else ""
            lines.append(
                f"| {s.model} | {s.width:g} | {s.method} | {s.init} | {s.scaled} | {s.k:.3g} | {s.optimizer} "
                f"| {s.variant} | {g.text()} | {kept} |"
            )
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
