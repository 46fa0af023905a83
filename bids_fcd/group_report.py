"""The group level's human-readable outputs: group/report.html (+ figures/) and group/MODEL_CARD.md.

The report opens with the verdict a reader needs first (metrics with CIs, warnings), then the figures (ROC,
PR, confusion, probabilities, training curves, cohort, embeddings, shortcut audit), then the tables. Figures
are PNG files under group/figures/, linked relatively, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bids_fcd import __version__
from bids_fcd.audit import SHORTCUT_AUROC, AuditReport
from bids_fcd.config import ModelConfig
from bids_fcd.derivatives import atomic_path, write_text
from bids_fcd.evaluate import UNSEEN_PEAK
from bids_fcd.report import html_table

NOTICE = ("Research use only. Not a medical device and not for clinical decisions. Metrics come from this "
          "cohort's cross-validation and say little about other scanners or populations.")
HEADLINE = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "f1", "brier")
LESION_KEYS = ("detection_rate", "false_positives_per_participant", "dice")
COLOURS = {"fcd": "#b00020", "control": "#1565c0"}


@dataclass
class GroupSummary:
    """What the report and the model card are made from (all computed by `bids_fcd.train`)."""

    config: ModelConfig
    metrics: dict
    predictions: pd.DataFrame
    fold_histories: list[list[dict]]
    final_history: list[dict]
    cohort: pd.DataFrame
    audit: AuditReport


def _threshold_spread(protocol: dict) -> str:
    """The subject threshold's own bootstrap interval as a sentence ("" when too few participants define it)."""
    interval = protocol["subject_threshold_ci95"]
    if interval is None:
        return ""
    return (f" Chosen again on bootstrap resamples of the participants, the cut falls in {interval[0]:.2f}-"
            f"{interval[1]:.2f} (95 %): another cohort of this size could set the operating point anywhere there.")


def _fmt(entry, digits: int = 3) -> str:
    """A metric {"value", "ci95"} (or a plain number) as "0.812 [0.701, 0.903]"."""
    if isinstance(entry, dict):
        if entry.get("value") is None:
            return "n/a"
        ci = entry.get("ci95")
        text = f"{entry['value']:.{digits}f}"
        return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")
    if entry is None:
        return "n/a"
    return f"{entry:.{digits}f}" if isinstance(entry, float) else str(entry)


def metric_rows(metrics: dict) -> list[list[str]]:
    """[evaluation, metric, value [95% CI]] for cross-validation, test / official test, and each site."""
    rows = []
    sections = [("cross-validation", metrics["cross_validation"])]
    for key, title in (("test", "test set"), ("official_test_patients", "official test patients (OOF)")):
        if key in metrics:
            sections.append((title, metrics[key]))
    for title, section in sections:
        for key in HEADLINE:
            rows.append([title, key, _fmt(section["subject"][key])])
        for key in LESION_KEYS:
            rows.append([title, f"lesion {key}", _fmt(section["lesion"][key])])
        by_band = (("lesion_by_volume", "lesions"), ("lesion_by_edge_distance", "lesions inside the brain mask by"))
        for key, measure in by_band:
            for band, entry in section[key].items():
                rows.append([title, f"lesion detection_rate, {measure} {band}",
                             f"{_fmt(entry['detection_rate'])} (n = {entry['n']})"])
        for budget, best in section.get("froc", {}).get("detection_within_fp", {}).items():
            metric = f"lesion detection_rate within {budget} false positives per control (best voxel threshold)"
            rows.append([title, metric, _fmt(best)])
        missed = section["missed_lesions"]
        rows.append([title, f"lesions missed: unseen (map peak < {UNSEEN_PEAK:g} inside) / under the cut",
                     f"{missed['unseen']} / {missed['under_the_cut']}"])
        rows.append([title, "n (FCD)", f"{section['subject']['n']} ({section['subject']['n_positive']})"])
    for site, section in metrics["cross_validation"]["by_site"].items():
        for key in ("auroc", "sensitivity", "specificity"):
            rows.append([f"CV site {site}", key, _fmt(section["subject"][key])])
        rows.append([f"CV site {site}", "lesion detection_rate", _fmt(section["lesion"]["detection_rate"])])
    return rows


# --- figures ------------------------------------------------------------------------------------------------


def _figure(rows: int = 1, columns: int = 1, figsize: tuple[float, float] = (5, 5), squeeze: bool = True):
    """A pyplot-free Figure (no global state, no display backend) and its axes; constrained layout, so that
    neighbouring panels' labels never overlap."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=squeeze)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100, bbox_inches="tight", format="png")
    return path


def _curves(summary: GroupSummary) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, labels, probabilities) of the image model (CV, test) and the metadata baseline."""
    frame = summary.predictions
    curves = []
    for name, rows in (("image model, out-of-fold", frame[frame["fold"] != "test"]),
                       ("image model, test set", frame[frame["fold"] == "test"])):
        if len(rows) and rows["label"].nunique() == 2:
            curves.append((name, (rows["label"] == "fcd").to_numpy().astype(int),
                           rows["fcd_probability"].to_numpy()))
    if summary.audit.metadata_roc is not None and len(np.unique(summary.audit.metadata_roc[0])) == 2:
        curves.append(("metadata only (shortcut audit)", *summary.audit.metadata_roc))
    return curves


def roc_pr_figures(summary: GroupSummary, figures: Path) -> list[tuple[str, Path]]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    out = []
    fig, ax = _figure(figsize=(5, 5))
    for name, y, p in _curves(summary):
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name, linestyle="--" if "metadata" in name else "-")
    ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    out.append(("ROC curves", _save(fig, figures / "roc.png")))
    fig, ax = _figure(figsize=(5, 5))
    for name, y, p in _curves(summary):
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", label=name, linestyle="--" if "metadata" in name else "-")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    out.append(("Precision-recall curves", _save(fig, figures / "pr.png")))
    return out


def confusion_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    frame = summary.predictions
    parts = [(name, rows) for name, rows in (("out-of-fold", frame[frame["fold"] != "test"]),
                                             ("test set", frame[frame["fold"] == "test"])) if len(rows)]
    fig, axes = _figure(1, len(parts), figsize=(4 * len(parts), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], parts):
        matrix = np.array([[np.sum((rows["label"] == t) & (rows["predicted"] == p)) for p in ("control",
                                                                                              "fcd")]
                           for t in ("control", "fcd")])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14,
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["control", "FCD"], yticklabels=["control", "FCD"],
               xlabel="predicted", ylabel="true",
               title=f"{name} (threshold {summary.config.subject_threshold:.3f})")
    return "Confusion matrices", _save(fig, figures / "confusion.png")


def probability_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    frame = summary.predictions
    fig, ax = _figure(figsize=(6, 3.2))
    rng = np.random.default_rng(0)
    for row, label in enumerate(("control", "fcd")):
        values = frame.loc[frame["label"] == label, "fcd_probability"].to_numpy()
        ax.scatter(values, row + rng.uniform(-0.15, 0.15, len(values)), s=14, alpha=0.7, color=COLOURS[label])
    ax.axvline(summary.config.subject_threshold, color="#333", linestyle="--", label="subject threshold")
    ax.set(yticks=[0, 1], yticklabels=["control", "FCD"], xlim=(-0.02, 1.02), xlabel="FCD probability",
           title="Subject-level probabilities (out-of-fold and test)")
    ax.legend(fontsize=8)
    return "Probabilities by group", _save(fig, figures / "probabilities.png")


def calibration_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    """Reliability diagram: observed FCD fraction against mean predicted probability, in probability quantiles,
    so that a reader sees whether a probability of 0.8 means FCD about 8 times in 10 (Brier score in the title)."""
    from sklearn.calibration import calibration_curve

    fig, ax = _figure(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8, label="perfect calibration")
    for name, y, p in _curves(summary):
        if "metadata" in name:
            continue
        observed, predicted = calibration_curve(y, p, n_bins=max(2, min(10, len(y) // 10)), strategy="quantile")
        ax.plot(predicted, observed, marker="o", label=f"{name} (Brier {np.mean((p - y) ** 2):.3f})")
    ax.set(xlabel="mean predicted FCD probability", ylabel="observed fraction FCD", xlim=(0, 1), ylim=(0, 1),
           title="Calibration (quantile bins)")
    ax.legend(loc="upper left", fontsize=8)
    return "Calibration", _save(fig, figures / "calibration.png")


def training_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    fig, axes = _figure(1, 3, figsize=(14, 3.8))
    for k, history in enumerate(summary.fold_histories):
        epochs = [h["epoch"] for h in history]
        line = axes[0].plot(epochs, [h["train_loss"] for h in history], label=f"fold {k} train")[0]
        axes[0].plot(epochs, [h["val_loss"] for h in history], linestyle="--", color=line.get_color(),
                     label=f"fold {k} val")
        axes[1].plot(epochs, [h["val_auroc"] if h.get("val_auroc") is not None else np.nan for h in history],
                     color=line.get_color(), label=f"fold {k}")
        axes[2].plot(epochs, [h["lr"] for h in history], color=line.get_color())
    if summary.final_history:
        axes[0].plot([h["epoch"] for h in summary.final_history],
                     [h["train_loss"] for h in summary.final_history],
                     color="black", linewidth=2, label="final refit train")
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss (solid train, dashed validation)")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set(xlabel="epoch", ylabel="AUROC", title="Validation AUROC", ylim=(0, 1.02))
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="Learning rate (start of epoch)")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return "Training curves", _save(fig, figures / "training_curves.png")


def cohort_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    cohort = summary.cohort
    fig, axes = _figure(1, 3, figsize=(15, 4))
    table = pd.crosstab(cohort["site"], [cohort["label"], cohort["split"]])
    table.plot.barh(stacked=True, ax=axes[0], colormap="tab20")
    axes[0].set(xlabel="units", ylabel="", title="Label x split by site / acquisition")
    axes[0].legend(fontsize=7, title="label, split")
    for label in ("control", "fcd"):
        ages = cohort.loc[cohort["label"] == label, "age"].dropna()
        if len(ages):
            axes[1].hist(ages, bins=15, alpha=0.6, color=COLOURS[label], label=label)
    axes[1].set(xlabel="age (participants.tsv units)", ylabel="participants", title="Age")
    axes[1].legend(fontsize=8)
    pd.crosstab(cohort["sex"], cohort["label"]).plot.bar(ax=axes[2], color=[COLOURS.get(c, "#777") for c in
                                                                           sorted(cohort["label"].unique())])
    axes[2].set(xlabel="sex", ylabel="participants", title="Sex")
    return "Cohort composition", _save(fig, figures / "cohort.png")


def embedding_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    emb = summary.audit.embeddings
    panels = [("before ComBat", emb["before"])] + ([("after ComBat",
                                                     emb["after"])] if emb["after"] is not None
                                                   else [])
    fig, axes = _figure(2, len(panels), figsize=(5.5 * len(panels), 9), squeeze=False)
    labels, sites = np.asarray(emb["label"]), np.asarray(emb["site"]).astype(str)
    site_colours = {s: matplotlib.colormaps["tab10"](i % 10) for i, s in enumerate(sorted(set(sites)))}
    for column, (title, points) in enumerate(panels):
        for label, name in ((0, "control"), (1, "fcd")):
            chosen = labels == label
            axes[0, column].scatter(points[chosen, 0], points[chosen, 1], s=16, color=COLOURS[name],
                                    label=name)
        for site, colour in site_colours.items():
            chosen = sites == site
            axes[1, column].scatter(points[chosen, 0], points[chosen, 1], s=16, color=colour, label=site)
        axes[0, column].set_title(f"{emb['method'].upper()} of encoder features, {title}: label")
        axes[1, column].set_title(f"{title}: site")
        for row in range(2):
            axes[row, column].legend(fontsize=7)
    return "Feature embeddings", _save(fig, figures / "embeddings.png")


def audit_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    shortcut = summary.audit.shortcut
    names, values = ["image model"], [shortcut["image_auroc"] or 0.0]
    for set_name, entry in shortcut["feature_sets"].items():
        for model in ("logistic_regression", "random_forest"):
            names.append(f"{set_name}\n{model.replace('_', ' ')}")
            values.append(entry.get(model) or 0.0)
    fig, ax = _figure(figsize=(1.3 * len(names) + 2, 3.8))
    ax.bar(range(len(names)), values, color=["#333"] + ["#e07b00"] * (len(names) - 1))
    ax.axhline(SHORTCUT_AUROC, color="#b00020", linestyle="--", linewidth=1,
               label=f"metadata at or above {SHORTCUT_AUROC} always warns")
    ax.set(xticks=range(len(names)), xticklabels=names, ylim=(0, 1.02), ylabel="AUROC (same folds)",
           title="Shortcut audit: image model vs metadata only")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    return "Shortcut audit", _save(fig, figures / "shortcut_audit.png")


def froc_figure(summary: GroupSummary, figures: Path) -> tuple[str, Path]:
    """Lesion detection against false-positive candidates per control at every voxel threshold (metrics' froc),
    the shipped voxel threshold marked: what a lower or higher cut would buy and cost."""
    fig, ax = _figure(figsize=(5, 5))
    chosen = summary.config.voxel_threshold
    for key, name in (("cross_validation", "out-of-fold"), ("test", "test set")):
        points = [p for p in summary.metrics.get(key, {}).get("froc", {}).get("points", [])
                  if p["detection_rate"] is not None and p["false_positive_clusters_per_control"] is not None]
        if not points:
            continue
        line = ax.plot([p["false_positive_clusters_per_control"] for p in points],
                       [p["detection_rate"] for p in points], marker=".", label=name)[0]
        at_chosen = [p for p in points if np.isclose(p["voxel_threshold"], chosen)]
        if at_chosen:
            ax.plot(at_chosen[0]["false_positive_clusters_per_control"], at_chosen[0]["detection_rate"], marker="*",
                    markersize=14, color=line.get_color(), linestyle="none",
                    label=f"{name} at voxel threshold {chosen:.2f}")
    if not ax.lines:
        ax.text(0.5, 0.5, "needs controls and lesion masks", ha="center", va="center", transform=ax.transAxes)
    most = max((x for line in ax.lines for x in line.get_xdata()), default=0.0)
    ax.set(xlabel="false-positive candidates per control", ylabel="lesion detection rate", ylim=(0, 1.02),
           xlim=(0, max(1.0, 1.05 * most)), title="Lesion detection against false candidates (FROC)")
    if ax.lines:
        ax.legend(loc="lower right", fontsize=8)
    return "Lesion detection against false-positive candidates per control, every voxel threshold (FROC)", _save(
        fig, figures / "froc.png")


def make_figures(summary: GroupSummary, figures: Path) -> list[tuple[str, Path]]:
    items = roc_pr_figures(summary, figures)
    for make in (froc_figure, confusion_figure, calibration_figure, probability_figure, training_figure,
                 cohort_figure, embedding_figure, audit_figure):
        items.append(make(summary, figures))
    return items


# --- report.html --------------------------------------------------------------------------------------------


def cohort_rows(cohort: pd.DataFrame) -> list[list]:
    """[site, label, split, units, age mean +- sd, F / M] per site x label x split."""
    rows = []
    for (site, label, split), part in cohort.groupby(["site", "label", "split"]):
        ages = part["age"].dropna()
        age = f"{ages.mean():.1f} ± {ages.std(ddof=0):.1f}" if len(ages) else "n/a"
        sexes = part["sex"].value_counts()
        rows.append([site, label, split, len(part), age, f"{sexes.get('F', 0)} / {sexes.get('M', 0)}"])
    return rows


def write_report(group_dir: Path, summary: GroupSummary) -> Path:
    """group/report.html and its figures under group/figures/."""
    figures = make_figures(summary, group_dir / "figures")
    metrics, config, audit = summary.metrics, summary.config, summary.audit
    cv = metrics["cross_validation"]["subject"]
    warnings = "".join(f'<p class="warning"><strong>WARNING:</strong> {html.escape(w)}</p>'
                       for w in metrics["warnings"])
    harm = audit.harmonisation
    figure_html = "".join(f'<figure><img src="{html.escape(str(p.relative_to(group_dir)))}" '
                          f'alt="{html.escape(t)}"><figcaption>{html.escape(t)}</figcaption></figure>'
                          for t, p in figures)
    audit_rows = [[name, ", ".join(entry["columns"]), _fmt(entry.get("logistic_regression")),
                   _fmt(entry.get("random_forest"))]
                  for name, entry in audit.shortcut["feature_sets"].items()]
    fold_rows = [[f["fold"], f["n_train"], f["n_val"], f["epochs_run"], f["best_epoch"],
                  _fmt(f["best_val_loss"], 4)]
                 for f in metrics["folds"]]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bids_fcd group report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }}
.notice {{ background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; }}
.warning {{ background: #fde0e0; border: 1px solid #b00020; padding: .6em 1em; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: .2em .6em; }}
figure {{ display: inline-block; margin: .5em; vertical-align: top; }} img {{ max-width: 680px; }}
.headline {{ font-size: 1.25em; }}
</style></head><body>
<h1>bids_fcd group report: {html.escape(config.name)} {html.escape(config.model_version)}</h1>
<p class="notice"><strong>{html.escape(NOTICE)}</strong></p>
<h2>Summary</h2>
<p class="headline">Cross-validated ({metrics['protocol']['n_folds']} folds, {cv['n']} units,
{cv['n_positive']} FCD): AUROC <strong>{_fmt(cv['auroc'])}</strong>,
balanced accuracy <strong>{_fmt(cv['balanced_accuracy'])}</strong>, lesion detection rate
<strong>{_fmt(metrics['cross_validation']['lesion']['detection_rate'])}</strong> (95% bootstrap CIs).</p>
<p>Subject threshold {config.subject_threshold:.4f}: {html.escape(metrics['protocol']['threshold_rule'])}.{html.escape(_threshold_spread(metrics['protocol']))}
Voxel threshold {config.voxel_threshold:.2f}: {html.escape(metrics['protocol']['voxel_threshold_rule'])}.
Final model: {html.escape(metrics['protocol']['final_model'])}.
Architecture {html.escape(config.architecture)}, channels {html.escape(', '.join(config.channels))},
grid {list(config.grid_shape)} at {config.grid_spacing_mm} mm; bids_fcd {html.escape(__version__)}.</p>
{warnings}
<h2>Metrics</h2>
{html_table(metric_rows(metrics), ["evaluation", "metric", "value [95% CI]"])}
<h2>Figures</h2>
{figure_html}
<h2>Shortcut audit</h2>
<p>Metadata-only classifiers on the image model's folds;
image model AUROC {_fmt(audit.shortcut['image_auroc'])}.
Rule: {html.escape(audit.shortcut['rule'])}.
{html.escape(audit.shortcut.get('warning') or 'No shortcut warning.')}</p>
{html_table(audit_rows, ["feature set", "columns", "logistic regression AUROC", "random forest AUROC"])}
<h2>Harmonisation (ComBat of the encoder features)</h2>
<p>{html.escape(harm['reason'])}. Cramér's V (site x label) {_fmt(harm['cramers_v'])};
site predictable from features (balanced accuracy) before {_fmt(harm['site_predictability_before'])}, after
{_fmt(harm['site_predictability_after'])}.</p>
{html_table([[s, *row] for s, row in zip(harm['sites'], harm['table'])], ["site", "control", "FCD"])}
<h2>Cohort</h2>
{html_table(cohort_rows(summary.cohort), ["site", "label", "split", "units", "age (mean ± sd)", "F / M"])}
<h2>Folds</h2>
{html_table(fold_rows, ["fold", "train units", "validation units", "epochs run", "best epoch", "best val loss"])}
<p>Files: model.pt, model.json, folds.tsv, predictions.tsv, metrics.json, MODEL_CARD.md,
fold-&lt;k&gt;/log.tsv.</p>
</body></html>
"""
    return write_text(group_dir / "report.html", page)


# --- MODEL_CARD.md ------------------------------------------------------------------------------------------


def write_model_card(path: Path, summary: GroupSummary) -> Path:
    """A model card (Mitchell et al. 2019): details, use, data, training, evaluation, audit, limits."""
    config, metrics = summary.config, summary.metrics
    data, protocol = config.training["dataset"], metrics["protocol"]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in metric_rows(metrics))
    shortcut = metrics["shortcut_audit"]
    best = shortcut.get("best") or {}
    left_out = metrics["cohort"]["left_out"]
    standardised = (", then each channel's histogram standardised to the landmarks in model.json (Nyul-Udupa)"
                    if config.histogram_landmarks else "")
    text = f"""# Model card: {config.name} {config.model_version}

**Research use only. Not a medical device; not for diagnosis or treatment decisions.**

## Model details
- Architecture: `{config.architecture}` (encoder) with a voxel-wise lesion decoder and a lesion-evidence
  subject head (bids_fcd.models), arch_params `{config.arch_params}`.
- Input: channels {', '.join(config.channels)} in template space {config.template_space}, grid
  {list(config.grid_shape)} voxels at {config.grid_spacing_mm} mm, normalisation `{config.normalisation}`{standardised}.
- Outputs: subject-level FCD probability (threshold {config.subject_threshold:.4f}) and a voxel-wise FCD
  probability map (clusters at >= {config.voxel_threshold:.2f}, at least {config.min_cluster_mm3:g} mm3).
- Trained by bids_fcd {__version__} on {config.training['date']}; package versions in model.json.

## Intended use
Research on focal cortical dysplasia detection in T1w + FLAIR MRI: ranking scans and marking candidate
regions for expert review. Out of scope: clinical use, other pathologies, other input contrasts, populations
or scanners unlike the training data.

## Training data
- Dataset: `{data['bids_dir']}`; {data['n_units']} units from {data['n_participants']} participants
  ({data['n_fcd']} FCD, {data['n_control']} controls); {data['n_with_lesion_mask']} with a lesion mask.
- Labels: participants.tsv column `{config.training['label']['column']}`, positive value
  `{config.training['label']['positive']}`.
- Left out: {len(left_out)} unit(s){': ' + ', '.join(left_out) if left_out else ''}.

## Training procedure
- {protocol['n_folds']}-fold subject-level cross-validation, stratified by label and site/acquisition,
  sessions of a participant kept together (folds.tsv).
  Test set: {protocol['test_set'] or 'none (see warnings)'}.
- Options: `{config.training['options']}`.
- Final model: {protocol['final_model']}.
- Non-FCD lesion mimics: {protocol['mimic_copies']}.
- Simulated FCD lesions: {protocol['implant_copies']}.
- Subject threshold: {protocol['threshold_rule']}.{_threshold_spread(protocol)}
  Voxel threshold: {protocol['voxel_threshold_rule']}.

## Evaluation (95% bootstrap confidence intervals)
| evaluation | metric | value [95% CI] |
|---|---|---|
{table}

## Shortcut audit
Metadata-only baseline (acquisition labels, scanner sidecar fields, age, sex) on the same folds: best AUROC
{_fmt(best.get('auroc'))} ({best.get('feature_set', 'n/a')}, {best.get('classifier', 'n/a')}) vs image model
{_fmt(shortcut['image_auroc'])}.
{('**WARNING:** ' + shortcut['warning']) if shortcut.get('warning') else 'No shortcut warning.'}

Harmonisation: {metrics['harmonisation']['reason']}.

## Warnings
{chr(10).join('- ' + w for w in metrics['warnings']) or '- none'}

## Limitations
- Small cohorts give wide confidence intervals; per-site numbers rest on few participants.
- Where patients and controls were scanned with different protocols, subject-level scores can reflect the
  protocol; lesion detection and per-site metrics are the better evidence.
- The lesion masks define what counts as detected; FCD invisible on MRI cannot be found.
"""
    return write_text(path, text)
