"""Shortcut audit: can scanner metadata alone tell patients from controls, and what do the learned features
encode?

- `metadata_baseline`: logistic regression and random forest on acquisition metadata (BIDS `acq` labels,
  scanner sidecar fields) and demographics (age, sex), cross-validated on the image model's own folds. In
  ds004199 every control shares one FLAIR protocol, so metadata alone separates many patients: an image model
  that scores no better than this may be reading the scanner, not the lesion (`shortcut_warning`).
- `harmonise`: ComBat (neuroCombat 0.2.12) of the encoder's global-pooled features by site, with the label as
  a protected covariate, after `confounding` checks that site and label are not (nearly) collinear; its
  estimates are written beside the model (`combat_estimates.json`), a record of the site effects removed.
- `embed`: 2-D UMAP / t-SNE / PCA embeddings of the features before and after harmonisation, for the report.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_fcd.data import Sample
from bids_fcd.evaluate import auroc

log = logging.getLogger("bids_fcd.audit")

AGE_COLUMNS = ("age", "age_scan", "age_at_scan")
SEX_COLUMNS = ("sex",)
MISSING = ("", "n/a", "na", "nan", "none")
SHORTCUT_AUROC = 0.8  # metadata alone at or above this is a warning
SHORTCUT_MARGIN = 0.05  # ... as is metadata within this much of the image model's AUROC,
SHORTCUT_FLOOR = 0.65  # ... when metadata is clearly above chance (both at chance says nothing)
COLLINEAR_CRAMERS_V = 0.8  # site-label association at or above this: do not harmonise
MIN_BATCH = 3  # sites with fewer participants are pooled into "other" for ComBat


# --- metadata-only baseline ---------------------------------------------------------------------------------


def metadata_table(samples: list[Sample]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Metadata per sample and the feature sets {"acquisition", "demographics", "all"} -> column names.

    Acquisition: every `T1w_*` / `FLAIR_*` field `inputs` collects (acq label, manufacturer, model, field
    strength, TR, TE, TI, flip angle, coil). Demographics: age and sex from participants.tsv. Columns with a
    single value carry no information and are dropped.
    """
    rows = []
    for sample in samples:
        meta = sample.unit.metadata
        row = {k: v for k, v in meta.items() if k.startswith(("T1w_", "FLAIR_"))}
        for name, choices in (("age", AGE_COLUMNS), ("sex", SEX_COLUMNS)):
            row[name] = next((meta[c] for c in choices if c in meta), None)
        rows.append(row)
    table = pd.DataFrame(rows).map(lambda v: None if v is None or str(v).strip().lower() in MISSING else v)
    table = table.loc[:, table.astype(str).nunique(dropna=False) > 1]
    acquisition = [c for c in table.columns if c.startswith(("T1w_", "FLAIR_"))]
    demographics = [c for c in ("age", "sex") if c in table.columns]
    sets = {"acquisition": acquisition, "demographics": demographics, "all": acquisition + demographics}
    return table, {name: columns for name, columns in sets.items() if columns}


def _numeric_columns(table: pd.DataFrame) -> list[str]:
    numeric = []
    for column in table.columns:
        values = table[column].dropna()
        if len(values) and pd.to_numeric(values.astype(str), errors="coerce").notna().all():
            numeric.append(column)
    return numeric


def _classifiers(seed: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    return {"logistic_regression": LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000),
            "random_forest": RandomForestClassifier(n_estimators=100, min_samples_leaf=2,
                                                    class_weight="balanced",
                                                    random_state=seed)}


def _prepared(table: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The columns as numbers (numeric ones, NaN when missing) or strings ("n/a" when missing)."""
    numeric = _numeric_columns(table[columns])
    categorical = [c for c in columns if c not in numeric]
    frame = table[columns].copy()
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in categorical:
        frame[column] = [("n/a" if v is None else str(v)) for v in frame[column]]
    return frame, numeric, categorical


def _pipeline(numeric: list[str], categorical: list[str], classifier):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    encode = ColumnTransformer([
        ("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
        ("categorical", OneHotEncoder(handle_unknown="ignore"), categorical),
    ])
    return make_pipeline(encode, classifier)


def metadata_baseline(samples: list[Sample], fold: np.ndarray, seed: int = 0) -> dict:
    """Out-of-fold AUROC of metadata-only classifiers on the image model's folds (`fold` per sample, >= 0).

    Returns {"feature_sets": {set: {"columns", "logistic_regression", "random_forest"}}, "best": {"auroc",
    "feature_set", "classifier"} or None, "oof_probability": the best model's out-of-fold probabilities}.
    """
    table, sets = metadata_table(samples)
    labels = np.array([s.label for s in samples])
    result: dict = {"feature_sets": {}, "best": None, "oof_probability": None}
    best = -1.0
    for set_name, columns in sets.items():
        frame, numeric, categorical = _prepared(table, columns)
        entry: dict = {"columns": columns}
        for model_name, classifier in _classifiers(seed).items():
            probability = np.full(len(samples), np.nan)
            for k in np.unique(fold[fold >= 0]):
                train, test = (fold >= 0) & (fold != k), fold == k
                if len(np.unique(labels[train])) < 2:
                    continue
                pipeline = _pipeline(numeric, categorical, classifier).fit(frame[train], labels[train])
                probability[test] = pipeline.predict_proba(frame[test])[:, 1]
            done = ~np.isnan(probability)
            score = auroc(labels[done], probability[done]) if done.any() else None
            entry[model_name] = score
            if score is not None and score > best:
                best = score
                result["best"] = {"auroc": score, "feature_set": set_name, "classifier": model_name}
                result["oof_probability"] = [None if math.isnan(p) else float(p) for p in probability]
        result["feature_sets"][set_name] = entry
    return result


def shortcut_warning(metadata_auroc: float | None, image_auroc: float | None) -> str | None:
    """The warning text when metadata alone comes close to (or beats) the image model, else None."""
    if metadata_auroc is None:
        return None
    close = (image_auroc is not None and metadata_auroc >= image_auroc - SHORTCUT_MARGIN
             and metadata_auroc >= SHORTCUT_FLOOR)
    if metadata_auroc < SHORTCUT_AUROC and not close:
        return None
    image = f"{image_auroc:.3f}" if image_auroc is not None else "n/a"
    return (f"SHORTCUT RISK: acquisition metadata and demographics alone reach AUROC {metadata_auroc:.3f} "
            f"(image model {image}) on the same folds. Patients and controls differ in scanner or protocol, "
            "so the image model's score may reflect the acquisition rather than the lesion; check per-site "
            "metrics and lesion detection before trusting the subject-level AUROC.")


# --- learned features and ComBat ----------------------------------------------------------------------------


@torch.no_grad()
def encoder_features(model: nn.Module, samples: list[Sample], device: torch.device) -> np.ndarray:
    """(N, C) deepest encoder feature map (stride 16) averaged over the brain, per sample (eval mode); an
    ensemble's members' features side by side (C summed over members)."""
    model = model.to(device).eval()
    encoders = [member.encoder for member in getattr(model, "members", [model])]
    features = []
    for sample in samples:
        x = torch.from_numpy(np.ascontiguousarray(sample.image, dtype=np.float32))[None].to(device)
        mask = torch.from_numpy(sample.brain_mask.astype(np.float32))[None, None].to(device)
        pooled = []
        for encoder in encoders:
            deep = encoder(x)[-1]  # (1, C, x, y, z)
            weight = nn.functional.adaptive_avg_pool3d(mask, deep.shape[2:])  # brain fraction of each deep cell
            pooled.append(((deep * weight).sum(dim=(2, 3, 4)) / weight.sum().clamp(min=1e-6))[0].cpu().numpy())
        features.append(np.concatenate(pooled))
    return np.stack(features).astype(np.float64)


def batches_for_combat(sites: np.ndarray) -> np.ndarray:
    """Sites with fewer than MIN_BATCH participants pooled into "other" (ComBat needs a variance per batch);
    an "other" of one joins the largest site."""
    sites = np.asarray(sites).astype(str)
    levels, counts = np.unique(sites, return_counts=True)
    rare = set(levels[counts < MIN_BATCH])
    batch = np.array(["other" if s in rare else s for s in sites], dtype=object)
    if (batch == "other").sum() == 1:
        kept, kept_counts = np.unique(batch[batch != "other"], return_counts=True)
        batch[batch == "other"] = kept[np.argmax(kept_counts)] if len(kept) else "other"
    return batch.astype(str)


def confounding(batch: np.ndarray, labels: np.ndarray) -> dict:
    """How far site and label are entangled, and whether ComBat may be applied.

    Returns Cramér's V of the site x label table, the sites holding one class only, whether the design
    [site indicators, label] is rank-deficient (label fully determined by site: ComBat would fail or erase
    the signal), and the decision `harmonise` with its `reason`.
    """
    from scipy.stats.contingency import association

    batch, labels = np.asarray(batch).astype(str), np.asarray(labels).astype(int)
    levels = np.unique(batch)
    table = np.array([[np.sum((batch == b) & (labels == c)) for c in (0, 1)] for b in levels])
    single_class = [str(b) for b, row in zip(levels, table) if (row > 0).sum() == 1]
    v = float(association(table,
                          method="cramer")) if len(levels) > 1 and table.sum(axis=0).min() > 0 else None
    design = np.column_stack([(batch == b).astype(float) for b in levels] + [labels.astype(float)])
    rank_deficient = bool(np.linalg.matrix_rank(design) < design.shape[1])
    if len(levels) < 2:
        harmonise, reason = False, "one site only: nothing to harmonise"
    elif rank_deficient:
        harmonise, reason = False, ("the label is fully determined by the site (singular design): "
                                    "harmonising by site would remove the diagnosis itself; not harmonised")
    elif v is not None and v >= COLLINEAR_CRAMERS_V:
        harmonise, reason = False, (f"site and label are nearly collinear (Cramér's V {v:.2f} >= "
                                    f"{COLLINEAR_CRAMERS_V}): site effects cannot be told from disease "
                                    "effects; not harmonised")
    else:
        harmonise = True
        reason = f"Cramér's V {v:.2f}: harmonised by site with the label as a protected covariate"
        if single_class:
            reason += (f"; sites with one class only ({', '.join(single_class)}) have their site effect "
                       "estimated assuming the disease effect is the same as in mixed sites")
    return {"sites": [str(b) for b in levels], "table": table.tolist(), "cramers_v": v,
            "single_class_sites": single_class, "rank_deficient": rank_deficient, "harmonise": harmonise,
            "reason": reason}


def harmonise(features: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """ComBat of (N, F) features by `batch`, protecting `labels`; returns harmonised features and estimates.

    Features with no variance are passed through unchanged (ComBat divides by their variance); their
    indices are in the estimates as "kept_features". The estimates keep neuroCombat's names, with "mod.mean"
    reduced to its per-feature mean (F, 1), as neuroCombatFromTraining reads them.
    """
    from neuroCombat import neuroCombat

    kept = np.flatnonzero(features.std(axis=0) > 1e-8)
    covars = pd.DataFrame({"batch": np.asarray(batch).astype(str), "label": np.asarray(labels).astype(int)})
    with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints its progress
        result = neuroCombat(dat=features[:, kept].T, covars=covars, batch_col="batch",
                             categorical_cols=["label"])
    harmonised = features.copy()
    harmonised[:, kept] = result["data"].T
    found = result["estimates"]
    estimates = {"batches": [str(b) for b in found["batches"]], "kept_features": kept,
                 **{key: np.asarray(found[key]) for key in ("var.pooled", "stand.mean", "gamma.star",
                                                            "delta.star")},
                 "mod.mean": np.asarray(found["mod.mean"]).mean(axis=1, keepdims=True)}
    return harmonised, estimates


def site_predictability(features: np.ndarray, batch: np.ndarray, seed: int = 0) -> float | None:
    """Cross-validated balanced accuracy of predicting the site from the features (chance = 1 / n_sites)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    batch = np.asarray(batch).astype(str)
    smallest = np.unique(batch, return_counts=True)[1].min() if len(batch) else 0
    if len(np.unique(batch)) < 2 or smallest < 2:
        return None

    splitter = StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    predicted = cross_val_predict(model, features, batch, cv=splitter)
    return float(balanced_accuracy_score(batch, predicted))


def embed(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(N, 2) embedding of standardised (N, F) features with "umap", "tsne" or "pca"."""
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(features)
    n = len(scaled)
    if n < 4 or method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(scaled) if n >= 2 else np.zeros((n, 2))
    if method == "umap":
        import warnings

        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by setting random_state": wanted, for replay
            return umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed).fit_transform(scaled)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(perplexity=min(30.0, (n - 1) / 3), random_state=seed, init="pca").fit_transform(scaled)
    raise ValueError(f"unknown embedding {method!r}: umap, tsne or pca")


# --- the whole audit ----------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    """The audit's results: JSON-ready dicts for metrics.json and arrays for the report's figures.

    embeddings: {"method", "before": (N, 2), "after": (N, 2) or None, "label": (N,), "site": (N,)}.
    metadata_roc: (labels, out-of-fold probabilities) of the best metadata model, cross-validation units only.
    """

    shortcut: dict
    harmonisation: dict
    combat_estimates: dict | None
    embeddings: dict
    metadata_roc: tuple[np.ndarray, np.ndarray] | None


def run_audit(samples: list[Sample], plan, model: nn.Module, device: torch.device, metrics: dict,
              embedding: str, seed: int) -> AuditReport:
    """Metadata baseline on the cross-validation folds, then ComBat and embeddings of the final model's
    features.

    `plan` is the group's `SplitPlan`; `metrics` must hold the image model's cross-validation AUROC.
    """
    cv = plan.cv_indices
    baseline = metadata_baseline([samples[i] for i in cv], plan.fold[cv], seed)
    image_auroc = metrics["cross_validation"]["subject"]["auroc"]["value"]
    metadata_auroc = baseline["best"]["auroc"] if baseline["best"] else None
    shortcut = {**{k: v for k, v in baseline.items() if k != "oof_probability"}, "image_auroc": image_auroc,
                "warning": shortcut_warning(metadata_auroc, image_auroc),
                "rule": f"warn when metadata AUROC >= {SHORTCUT_AUROC}, or >= {SHORTCUT_FLOOR} and within "
                        f"{SHORTCUT_MARGIN} of the image model's"}

    features = encoder_features(model, samples, device)
    labels = np.array([s.label for s in samples])
    batch = batches_for_combat(np.array([s.site for s in samples]))
    check = confounding(batch, labels)
    harmonised, estimates = None, None
    if check["harmonise"]:
        harmonised, estimates = harmonise(features, batch, labels)
    log.info("ComBat by site: %s", check["reason"])
    harmonisation = {**check, "n_features": int(features.shape[1]),
                     "batch_of": "site (participants.tsv `site`, "
                     f"else T1w/FLAIR acquisition; sites under {MIN_BATCH} pooled as 'other')",
                     "site_predictability_before": site_predictability(features, batch, seed),
                     "site_predictability_after": None if harmonised is None
                     else site_predictability(harmonised, batch, seed)}
    embeddings = {"method": embedding, "before": embed(features, embedding, seed),
                  "after": None if harmonised is None else embed(harmonised, embedding, seed),
                  "label": labels, "site": batch}
    roc = None
    if baseline["oof_probability"] is not None:
        probability = np.array([np.nan if p is None else p for p in baseline["oof_probability"]])
        done = ~np.isnan(probability)
        roc = (labels[cv][done], probability[done])
    return AuditReport(shortcut, harmonisation, estimates, embeddings, roc)
