"""The participant report `sub-<label>.html` (fMRIPrep convention): summary, figures, tables.

Figures are nilearn overlays on the model's own template-space inputs (what the network saw), cut at the
top candidate clusters, saved under `sub-<label>/figures/` and linked relatively from the report.
"""

from __future__ import annotations

import html
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib import pyplot as plt
from nilearn import plotting

from bids_fcd import __version__
from bids_fcd.derivatives import atomic_path, write_text

log = logging.getLogger(__name__)
MAX_FIGURE_CANDIDATES = 3
DISPLAY_THRESHOLD = 0.05  # overlays start here, below the voxel threshold: the reader sees the weak evidence too
NOTICE = ("Research use only. Not a medical device and not for clinical decisions. The model marks regions for "
          "expert review; it has not been validated on clinical FCD cases.")


def _image(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)


def overlay_figure(background: np.ndarray, overlay: np.ndarray, affine: np.ndarray, cut_mm, title: str,
                   path: Path, cmap: str = "hot") -> Path:
    """An orthogonal view of `overlay` (0..1) over `background`, both on the template grid, cut at `cut_mm`."""
    with warnings.catch_warnings():
        # A control's map can be below the display threshold everywhere: the figure then rightly shows no overlay.
        warnings.filterwarnings("ignore", message="empty mask")
        display = plotting.plot_stat_map(_image(overlay, affine), bg_img=_image(background, affine),
                                         cut_coords=[float(c) for c in cut_mm], display_mode="ortho",
                                         threshold=DISPLAY_THRESHOLD, vmax=1.0, cmap=cmap, title=title,
                                         annotate=True,
                                         black_bg=True, draw_cross=True, colorbar=True)
    with atomic_path(path) as temporary:
        display.savefig(str(temporary), dpi=80)
    display.close()
    plt.close("all")
    return path


def cut_points_mm(clusters, prediction, grid) -> list[tuple[str, np.ndarray]]:
    """Where to cut the views: the top clusters' template-space peaks, else the saliency maximum."""
    points = [(f"candidate {c.id}", np.asarray(c.peak_template_mm)) for c in clusters[:MAX_FIGURE_CANDIDATES]]
    if not points:
        peak_voxel = np.unravel_index(np.argmax(prediction.saliency_template), prediction.saliency_template.shape)
        points = [("saliency peak",
                   grid.affine[:3, :3] @ np.asarray(peak_voxel) + grid.affine[:3, 3])]
    return points


def prediction_figures(pre, prediction, clusters, figures_dir: Path, stem: str) -> list[tuple[str, Path]]:
    """T1w + probability, FLAIR + probability and T1w + saliency at each cut point."""
    affine = pre.grid.affine
    flair = pre.flair if pre.flair is not None else pre.t1w
    figures = []
    for index, (what, cut) in enumerate(cut_points_mm(clusters, prediction, pre.grid), 1):
        for background, overlay, name, cmap in ((pre.t1w, prediction.prob_template, "T1w-probability", "hot"),
                                                (flair, prediction.prob_template, "FLAIR-probability", "hot"),
                                                (pre.t1w, prediction.saliency_template, "T1w-saliency", "cool")):
            path = figures_dir / f"{stem}_cut-{index}_desc-{name.replace('-', '')}_overlay.png"
            overlay_figure(background, overlay, affine, cut, f"{what}: {name.replace('-', ' + ')}", path, cmap)
            figures.append((f"{what}: {name.replace('-', ' + ')}", path))
    return figures


def discordance_note(predicted: str, n_clusters: int) -> str:
    """A sentence for the reader when the subject call and the candidate list disagree, else "".

    Both come from one map (the subject head reads its strongest voxels) but are cut by separate thresholds, so
    a subject can be called FCD with no cluster large or confident enough to list, or control with clusters.
    """
    if predicted == "fcd" and n_clusters == 0:
        return ("The subject-level call is FCD but no region reached the voxel threshold: the evidence is weak or "
                "diffuse, and there is no candidate to review. The views below are cut at the saliency maximum.")
    if predicted == "control" and n_clusters > 0:
        return ("The subject-level call is control, yet candidate clusters were found: review them; each is a "
                "possible lesion or a false positive.")
    return ""


def html_table(rows: list[list], header: list[str]) -> str:
    """An HTML table, every cell escaped (labels and file names come from the user's dataset)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mm(point) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ")"


def write_participant_report(output_dir: Path, unit, pre, prediction, clusters, config, outputs: dict,
                             qc_figures: dict[str, Path], qc_warnings: list[str]) -> Path:
    """Write OUTPUT_DIR/sub-<label>[_ses-<label>].html; figures go to OUTPUT_DIR/sub-<label>/figures/."""
    figures_dir = output_dir / f"sub-{unit.subject}" / "figures"
    figures = prediction_figures(pre, prediction, clusters, figures_dir, unit.name)
    probability = prediction.fcd_probability
    predicted = outputs["predicted"]
    cluster_rows = [[c.id, f"{c.volume_mm3:.0f}", _mm(c.peak_mm), _mm(c.centroid_mm), _mm(c.peak_template_mm),
                     f"{c.peak_probability:.2f}", f"{c.mean_probability:.2f}", c.region] for c in clusters]
    qc_rows = [[key, f"{value:.3f}" if isinstance(value, float) else value] for key, value in sorted(pre.qc.items())
               if not isinstance(value, dict)]  # per-step timings belong to the log, not the review
    relative = [(title, path.relative_to(output_dir)) for title, path in figures]
    qc_relative = [(name, Path(path).relative_to(output_dir)) for name, path in qc_figures.items()]
    output_rows = [[name, Path(path).relative_to(output_dir)] for name, path in outputs.items()
                   if isinstance(path, Path)]

    def figure_html(items) -> str:
        return "".join(f'<figure><img src="{html.escape(str(p))}" alt="{html.escape(t)}"><figcaption>'
                       f"{html.escape(t)}</figcaption></figure>" for t, p in items)

    verdict_class = "fcd" if predicted == "fcd" else "control"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bids_fcd: {html.escape(unit.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
.notice {{ background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; }}
.qc-warning {{ background: #fde0e0; border: 1px solid #b00020; padding: .6em 1em; }}
.verdict {{ font-size: 1.4em; padding: .4em 0; }} .fcd {{ color: #b00020; }} .control {{ color: #1b5e20; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ccc; padding: .2em .6em; }}
figure {{ display: inline-block; margin: .5em; }} img {{ max-width: 560px; }}
</style></head><body>
<h1>FCD report: {html.escape(unit.name)}</h1>
<p class="notice"><strong>{html.escape(NOTICE)}</strong></p>
{"".join(f'<p class="qc-warning"><strong>Preprocessing QC:</strong> {html.escape(w)}. Check the QC figures '
         'below before reading the result.</p>' for w in qc_warnings)}
<h2>Summary</h2>
<p class="verdict {verdict_class}">Subject-level FCD probability <strong>{probability:.4f}</strong>
(threshold {config.subject_threshold:.4f}): <strong>{html.escape(predicted)}</strong></p>
<p>{len(clusters)} candidate cluster(s) at voxel probability &ge; {config.voxel_threshold:.2f}.
{html.escape(discordance_note(predicted, len(clusters)))}
Model <code>{html.escape(config.name)}</code> version {html.escape(config.model_version)}
({html.escape(config.architecture)}); bids_fcd {html.escape(__version__)};
{prediction.n_passes} stochastic pass(es). Brain extraction: {html.escape(pre.brain_extraction)}.</p>
<h2>Candidate lesions</h2>
<p>Peak and centroid in the T1w's scanner RAS mm; the template peak in {html.escape(config.template_space)} mm,
where the views below are cut; volume in the participant's head (mm&sup3;); region from the
{html.escape(clusters[0].atlas) if clusters else "atlas"} at the template peak.</p>
{html_table(cluster_rows, ["id", "volume mm3", "peak (mm)", "centroid (mm)", "template peak (mm)", "peak p",
                           "mean p", "region"])
 if cluster_rows else "<p>No candidate cluster above the voxel threshold.</p>"}
<h2>Probability and saliency</h2>
<p>Views in template space ({html.escape(config.template_space)}), on the model's inputs, cut at the template
peak (x, y, z in the corners). Probability is drawn from {DISPLAY_THRESHOLD} up, below the candidate cut at
{config.voxel_threshold:.2f}, so that sub-threshold evidence is visible too; saliency is scaled 0..1.</p>
{figure_html(relative)}
<h2>Preprocessing quality</h2>
{figure_html(qc_relative)}
{html_table(qc_rows, ["measure", "value"])}
<h2>Inputs and outputs</h2>
{html_table([["T1w", unit.t1w], ["FLAIR", unit.flair]], ["input", "file"])}
{html_table(output_rows, ["output", "file"])}
</body></html>
"""
    return write_text(output_dir / f"{unit.name}.html", page)
