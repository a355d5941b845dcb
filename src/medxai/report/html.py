"""``report.html``: one self-contained page that shows what a run is worth, readable in any browser, offline.

:func:`build_report` reads only what the run folder holds, through :class:`~medxai.run_folder.RunFolder` (the
contract: ``docs/run-folder.md``): configuration, model card, data check, metrics, history, figures, heatmaps and
gallery, explanation quality when measured, and every evaluation on other data (``evaluations/<name>/``), which gets
a section of its own beside, never inside, the run's own metrics. Whatever is missing is said so in its section
rather than failing, so a partial run still gets a report.

The page carries everything inside it: images are base64 ``data:`` URIs, styles are inline, there is no script, no
web font and no link to anything outside the file, so it can be mailed, archived or opened on a machine without
network. Big images are scaled down (and, when a PNG stays large, re-encoded as JPEG) to keep the file small; the
whole page is kept under ``max_bytes`` (5 MB by default) by shrinking images further when needed.

Sections (each an HTML ``<section>`` with a stable ``id``): ``data``, ``config``, ``metrics``, ``per-class``,
``curves``, ``confusion``, ``roc-pr``, ``calibration``, ``evaluations``, ``gallery``, ``explanations``,
``model-card``.
"""

from __future__ import annotations

import base64
import datetime as _datetime
import html
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medxai.errors import CheckpointError, ConfigError
from medxai.run_folder import FIGURE_KINDS, REPORT_FILE, TRAINING_CURVES, EvaluationFolder, RunFolder, safe_file_stem

__all__ = ["build_report", "REPORT_FILE", "SECTION_IDS", "DEFAULT_MAX_BYTES"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 5_000_000
SECTION_IDS = (
    "data",
    "config",
    "metrics",
    "per-class",
    "curves",
    "confusion",
    "roc-pr",
    "calibration",
    "evaluations",
    "gallery",
    "explanations",
    "localization",
    "shortcut",
    "model-card",
)
NOT_FOR_CLINICAL_USE = "Not for clinical use without independent validation on the target population and setting."

# Table 1 of the founding paper reports accuracy, precision, recall and F1; AUC, sensitivity and specificity are what
# a clinical reader asks next.
_TABLE_METRICS = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1"),
    ("auc", "AUC"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("balanced_accuracy", "Balanced acc."),
)
_PER_CLASS_METRICS = (("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"),
                      ("specificity", "Specificity"), ("auc", "AUC (one-vs-rest)"))
_CLAIMED_FIGURES = re.compile(rf"^({TRAINING_CURVES}|{'|'.join(f'{kind}_.*' for kind in FIGURE_KINDS)})\.png$")
_EXPLAIN_FIGURE_HINTS = ("explain", "deletion", "insertion", "road", "sanity", "faithful")
_OUTCOME_TITLES = {
    "true_positive": "True positives",
    "false_negative": "False negatives (missed)",
    "false_positive": "False positives (false alarms)",
    "true_negative": "True negatives",
}
# (figure max side, gallery max side, JPEG when a PNG exceeds this many bytes), tried in order until the page fits.
_IMAGE_BUDGETS = ((1100, 320, 250_000), (900, 256, 150_000), (700, 192, 80_000), (500, 144, 40_000))


@dataclass(frozen=True)
class _RunFiles:
    """Everything the report reads, loaded once."""

    run: RunFolder
    config_text: str | None
    card: dict[str, Any] | None
    data_check: dict[str, Any] | None
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    gallery: dict[str, Any] | None
    explain_metrics: list[tuple[Path, dict[str, Any]]]
    evaluations: list[tuple[EvaluationFolder, dict[str, Any], dict[str, Any]]]  # (folder, info, metrics)

    @property
    def run_dir(self) -> Path:
        return self.run.path


def build_report(
    run_dir: str | Path, out: str | Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Path:
    """Write the run's HTML report.

    Args:
        run_dir: a run folder written by ``medxai train`` or ``medxai demo``.
        out: the HTML file to write; defaults to ``run_dir/report.html``.
        max_bytes: the largest file size wanted; images are shrunk step by step until the page fits (a warning is
            logged if even the smallest images do not fit).

    Returns:
        The path of the written file.

    Raises:
        CheckpointError: if ``run_dir`` is not a run folder (no ``model_card.json`` and no ``metrics.json``).
    """
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: run folder not found")
    if not run.card_path.is_file() and not run.metrics_path.is_file():
        raise CheckpointError(f"{run.path}: neither {run.card_path.name} nor {run.metrics_path.name} here; is this a "
                              "medxai run folder?")
    files = _read_run(run)
    out_path = Path(out) if out else run.report_path
    page = ""
    for figure_side, gallery_side, jpeg_above in _IMAGE_BUDGETS:
        images = _ImageEncoder(figure_side, gallery_side, jpeg_above)
        page = _render_page(files, images)
        if len(page.encode("utf-8")) <= max_bytes:
            break
    else:
        logger.warning("report is %.1f MB, above the %.1f MB wanted, even with the smallest images",
                       len(page.encode("utf-8")) / 1e6, max_bytes / 1e6)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    logger.info("report: %s (%.2f MB)", out_path, out_path.stat().st_size / 1e6)
    return out_path


# -- reading -------------------------------------------------------------------------------------------------------
def _read_run(run: RunFolder) -> _RunFiles:
    explain = []
    for folder in [run, *run.evaluations()]:
        document = _tolerant(folder.read_explain_metrics, folder.explain_metrics_path)
        if isinstance(document, dict):
            explain.append((folder.explain_metrics_path, document))
    evaluations = []
    for folder in run.evaluations():
        info = _tolerant(folder.read_info, folder.info_path)
        metrics = _tolerant(folder.read_metrics, folder.metrics_path)
        if isinstance(info, dict) and metrics:  # explain-eval alone leaves no metrics: it shows under explanations
            evaluations.append((folder, info, metrics))
    card = _tolerant(run.read_card, run.card_path)
    metrics = _tolerant(run.read_metrics, run.metrics_path)
    return _RunFiles(
        run=run,
        config_text=(run.config_path.read_text(encoding="utf-8", errors="replace")
                     if run.config_path.is_file() else None),
        card=card.to_dict() if card is not None else _read_json(run.card_path),
        data_check=_tolerant(run.read_data_check, run.data_check_path),
        metrics=metrics if isinstance(metrics, dict) else {},
        history=_tolerant(run.read_history, run.history_path) or [],
        gallery=_tolerant(run.read_gallery, run.gallery_path),
        explain_metrics=explain,
        evaluations=evaluations,
    )


def _tolerant(read: Callable[[], Any], path: Path) -> Any:
    """What ``read`` returns, or None (with a warning) when the file is damaged: one bad file must not cost the
    whole report."""
    try:
        return read()
    except (CheckpointError, ConfigError, OSError, ValueError, KeyError) as error:
        if path.exists():
            logger.warning("report: cannot read %s (%s); its section says so", path, error)
        return None


def _read_json(path: Path) -> Any:
    """A damaged or old model card, shown as far as it goes."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


class _ImageEncoder:
    """PNG/JPEG files as ``data:`` URIs, scaled to fit the current budget."""

    def __init__(self, figure_side: int, gallery_side: int, jpeg_above: int) -> None:
        self.figure_side = figure_side
        self.gallery_side = gallery_side
        self.jpeg_above = jpeg_above

    def data_uri(self, path: Path, *, gallery: bool = False) -> str | None:
        from PIL import Image, UnidentifiedImageError

        side = self.gallery_side if gallery else self.figure_side
        try:
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as opened:
                image_format = opened.format
                image = opened.copy()
        except (OSError, UnidentifiedImageError) as error:
            logger.warning("report: cannot read image %s (%s); left out", path, error)
            return None
        if image_format in ("PNG", "JPEG") and max(image.size) <= side and len(raw) <= self.jpeg_above:
            # Small enough as it is: embed the file's own bytes (no re-encoding, which is most of the report's time).
            return f"data:image/{image_format.lower()};base64,{base64.b64encode(raw).decode('ascii')}"
        if max(image.size) > side:
            # Gallery overlays of 28 px images were enlarged by nearest neighbour; keep their blocks sharp.
            resample = Image.NEAREST if gallery and _is_blocky(image) else Image.LANCZOS
            image.thumbnail((side, side), resample)
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
        if buffer.tell() > self.jpeg_above:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85, optimize=True)
            mime = "image/jpeg"
        return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _is_blocky(image) -> bool:
    """Whether an image looks enlarged by an integer nearest-neighbour factor (equal neighbouring columns)."""
    small = image.convert("L")
    width, height = small.size
    if width < 4 or height < 4:
        return False
    pixels = small.load()
    row = height // 2
    equal = sum(pixels[x, row] == pixels[x + 1, row] for x in range(width - 1))
    return equal > 0.7 * (width - 1)


# -- page ----------------------------------------------------------------------------------------------------------
def _render_page(files: _RunFiles, images: _ImageEncoder) -> str:
    card = files.card or {}
    name = files.run_dir.resolve().name
    architecture = card.get("architecture", "unknown model")
    source = (card.get("train_data") or {}).get("source") or (files.data_check or {}).get("source") or "unknown data"
    sections: list[tuple[str, str, Callable[[_RunFiles, _ImageEncoder], str]]] = [
        ("data", "Data", _data_section),
        ("config", "Configuration", _config_section),
        ("metrics", "Metrics with 95% confidence intervals", _metrics_section),
        ("per-class", "Per-class metrics", _per_class_section),
        ("curves", "Training curves", _curves_section),
        ("confusion", "Confusion matrices", _confusion_section),
        ("roc-pr", "ROC and precision-recall curves", _roc_pr_section),
        ("calibration", "Calibration", _calibration_section),
        ("domain", "Inputs outside the training domain", _domain_section),
        ("evaluations", "Evaluations", _evaluations_section),
        ("gallery", "Grad-CAM gallery", _gallery_section),
        ("explanations", "Explanation quality", _explanations_section),
        ("localization", "Does the heatmap point at the lesion?", _localization_section),
        ("shortcut", "Shortcut alarm", _shortcut_section),
        ("model-card", "Model card", _model_card_section),
    ]
    body = []
    for section_id, title, render in sections:
        try:
            content = render(files, images)
        except Exception as error:  # a damaged file must not cost the whole report
            logger.warning("report: section %s failed (%s: %s)", section_id, type(error).__name__, error)
            content = _note(f"This section could not be built: {type(error).__name__}: {error}")
        body.append(f'<section id="{section_id}"><h2>{_e(title)}</h2>\n{content}\n</section>')
    navigation = " ".join(f'<a href="#{section_id}">{_e(title)}</a>' for section_id, title, _ in sections)
    version = card.get("medxai_version", "")
    generated = _datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medxai report: {_e(name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>medxai report: {_e(name)}</h1>
<p class="subtitle">{_e(architecture)} trained on {_e(source)}</p>
<p class="warning"><strong>Research use only.</strong> {_e(NOT_FOR_CLINICAL_USE)}</p>
<nav>{navigation}</nav>
</header>
<main>
{chr(10).join(body)}
</main>
<footer>Generated by medxai {_e(version)} on {_e(generated)} from {_e(str(files.run_dir))}. Self-contained: no external
resources.</footer>
</body>
</html>
"""


def _data_section(files: _RunFiles, images: _ImageEncoder) -> str:
    check = files.data_check
    if not isinstance(check, dict):
        return _note("No data_check.json in this run folder.")
    parts = [f"<p>Source: <code>{_e(check.get('source', '?'))}</code>"
             + (f", content fingerprint <code>{_e(str(check['fingerprint'])[:16])}</code>" if check.get("fingerprint")
                else "") + "</p>"]
    splits = check.get("splits") or {}
    names = list(check.get("label_names") or [])
    if splits:
        if not names:
            names = sorted({label for split in splits.values() for label in (split.get("per_class") or {})})
        rows = []
        totals = {label: 0 for label in names}
        for split, summary in splits.items():
            per_class = summary.get("per_class") or {}
            for label in names:
                totals[label] += int(per_class.get(label, 0) or 0)
            rows.append([split, *(_count(per_class.get(label)) for label in names), _count(summary.get("n"))])
        rows.append(["all", *(_count(totals[label]) for label in names), _count(sum(totals.values()))])
        parts.append(_table(["split", *names, "total"], rows, caption="Images per split and class", cls="metrics"))
    parts.append(_splits_account(files))
    parts.append(_data_check_result(check))
    duplicates = check.get("duplicates")
    if isinstance(duplicates, dict) and isinstance(duplicates.get("counts"), dict):
        parts.append(_duplicates_block(duplicates, check.get("dropped_from_test")))
    known = {"source", "fingerprint", "label_names", "splits", "unreadable", "source_skipped", "layout"}
    if isinstance(duplicates, dict) and isinstance(duplicates.get("counts"), dict):
        known |= {"duplicates", "dropped_from_test"}
    # Whatever else the data check reports (sizes, modes, timings, later additions): short values in one table,
    # structured ones under their own heading.
    other_rows = []
    for key, value in check.items():
        if key in known:
            continue
        if isinstance(value, (dict, list)) and len(json.dumps(value)) > 200:
            parts.append(f"<h3>{_e(key.replace('_', ' ').capitalize())}</h3>{_generic(value)}")
        else:
            other_rows.append([key.replace("_", " "), _short(value)])
    if other_rows:
        parts.append(_table(["check", "result"], other_rows, caption="Other findings of the data check"))
    return "\n".join(parts)


def _splits_account(files: _RunFiles) -> str:
    """How the data was read and how each split came about (the model card's ``train_data``), with any note."""
    train_data = (files.card or {}).get("train_data") or {}
    layout = train_data.get("layout") or (files.data_check or {}).get("layout") or {}
    splits = train_data.get("splits") or {}
    parts = []
    if layout:
        where = ", ".join(f"{split} from {place}" for split, place in (layout.get("splits") or {}).items())
        parts.append(f"<p>Read as {_e(str(layout.get('kind', '?')))}" + (f" ({_e(where)})" if where else "") + ".</p>")
    origins = splits.get("origins") or {}
    if origins:
        parts.append("<p>Splits: " + "; ".join(f"{_e(split)}: {_e(origin)}" for split, origin in origins.items())
                     + ".</p>")
    for note in splits.get("notes") or []:
        parts.append(f'<p class="attention">Note: {_e(note)}.</p>')
    if splits.get("unlabelled_left_out"):
        parts.append(f"<p>{_count(splits['unlabelled_left_out'])} unlabelled record(s) were left out.</p>")
    return "".join(parts)


def _duplicates_block(duplicates: Mapping[str, Any], dropped: Any) -> str:
    """The duplicate check of ``medxai check-data`` (``data_check.json["duplicates"]``), in words and tables."""
    counts = duplicates["counts"]
    text = (f"<h3>Duplicates</h3><p>{_count(counts.get('exact_groups'))} group(s) of identical images "
            f"({_count(counts.get('exact_images'))} images), {_count(counts.get('near_pairs'))} near-duplicate "
            f"pair(s) (distance ≤ {_e(str(duplicates.get('near_threshold', '?')))}), "
            f"<strong>{_count(counts.get('cross_split_pairs'))} pair(s) across splits</strong> "
            f"({_count(counts.get('cross_split_exact_pairs'))} identical), "
            f"{_count(counts.get('conflicting_label_groups'))} identical group(s) with conflicting labels. "
            "An image in both the training and an evaluation split makes that split's metrics optimistic.</p>")
    if duplicates.get("method"):
        text += f'<p class="note">Method: {_e(duplicates["method"])}.</p>'
    pairs = duplicates.get("cross_split") or []
    if pairs:
        rows = []
        for pair in pairs[:10]:
            a, b = pair.get("a") or {}, pair.get("b") or {}
            rows.append([pair.get("kind", ""), _count(pair.get("distance")),
                         f"{a.get('split', '')}: {a.get('id', '')} ({a.get('label', '')})",
                         f"{b.get('split', '')}: {b.get('id', '')} ({b.get('label', '')})",
                         "yes" if pair.get("conflicting_labels") else "no"])
        more = len(pairs) - 10 if len(pairs) > 10 else 0
        footnote = f"{more} more pairs in data_check.json" if more else None
        if duplicates.get("truncated"):
            footnote = "the list in data_check.json is truncated; the counts above are complete"
        text += _table(["kind", "distance", "image", "same as", "labels differ"], rows,
                       caption="Pairs across splits", footnote=footnote)
    leaked = duplicates.get("leaked_ids") or {}
    if leaked:
        text += "<ul>" + "".join(f"<li>{_e(direction)}: {len(ids)} image(s)</li>" for direction, ids in leaked.items()
                                 if isinstance(ids, list)) + "</ul>"
    if isinstance(dropped, list):
        text += f"<p>{len(dropped)} test image(s) that duplicate training images were left out of the test metrics.</p>"
    return text


def _data_check_result(check: Mapping[str, Any]) -> str:
    unreadable = check.get("unreadable") or []
    skipped = check.get("source_skipped") or []
    duplicates = check.get("duplicates")
    duplicate_count = _issue_count(duplicates)
    findings = []
    if unreadable:
        findings.append(f"{len(unreadable)} unreadable file(s) left out")
    if skipped:
        findings.append(f"{len(skipped)} file(s) skipped by the source")
    if duplicate_count:
        findings.append(f"{duplicate_count} duplicate finding(s) (see below)")
    if "passed" in check:
        status = "passed" if check["passed"] else "FAILED"
    else:
        status = "passed" if not findings else "passed with findings"
    css = "ok" if status == "passed" else "attention"
    text = f'<p class="{css}">Data check: <strong>{_e(status)}</strong>'
    text += (": " + _e("; ".join(findings)) if findings else " (every file read, no duplicates reported)"
             if duplicates is not None else " (every file read; duplicate check not in this data_check.json)")
    text += ".</p>"
    for title, items in (("Unreadable files", unreadable), ("Skipped by the source", skipped)):
        if items:
            rows = [[item.get("file", ""), item.get("reason", "")] if isinstance(item, dict) else [str(item), ""]
                    for item in items[:20]]
            more = f"{len(items) - 20} more in data_check.json" if len(items) > 20 else None
            text += _table(["file", "reason"], rows, caption=title, footnote=more)
    return text


def _issue_count(value: Any) -> int:
    """How many findings a (schema-free) duplicates entry holds: list lengths, or counts it states."""
    if value is None:
        return 0
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict):
        counts = value.get("counts")
        if isinstance(counts, dict):  # medxai check-data's schema
            return sum(int(counts.get(key) or 0) for key in ("exact_groups", "near_pairs"))
        for key in ("count", "n", "total", "n_groups", "groups_count"):
            if isinstance(value.get(key), int):
                return int(value[key])
        return sum(_issue_count(item) for key, item in value.items() if isinstance(item, (list, dict)))
    return 0


def _config_section(files: _RunFiles, images: _ImageEncoder) -> str:
    if files.config_text is None:
        return _note("No config.yaml in this run folder.")
    return ("<p>The resolved configuration (defaults, preset and command-line overrides): enough to reproduce the run "
            f"with <code>medxai train --config config.yaml</code>.</p><pre>{_e(files.config_text)}</pre>")


def _metrics_section(files: _RunFiles, images: _ImageEncoder) -> str:
    metrics = files.metrics
    if not metrics:
        return _note("No metrics.json in this run folder.")
    card = files.card or {}
    threshold = card.get("threshold") or {}
    headers = ["split", "decision rule", "n", *(title for _, title in _TABLE_METRICS)]
    rows = []
    for split in _splits(metrics):
        entry = metrics[split]
        argmax = "argmax (0.5)" if entry.get("positive_label") else "argmax"
        rows.append([split, argmax, _count(entry.get("n")),
                     *(_with_interval(entry, key) for key, _ in _TABLE_METRICS)])
        at = entry.get("at_threshold")
        if isinstance(at, dict):
            rule = f"p ≥ {_number(at.get('threshold'), 3)} ({threshold.get('method', 'chosen')})"
            rows.append([split, rule, _count(at.get("n")), *(_with_interval(at, key) for key, _ in _TABLE_METRICS)])
    any_entry = next(iter(metrics.values()), {})
    bootstrap = any_entry.get("bootstrap") or {}
    positive = any_entry.get("positive_label")
    notes = []
    if positive:
        notes.append(f"Binary metrics (precision, recall, F1, sensitivity) refer to <strong>{_e(positive)}</strong>; "
                     "specificity is the recall of the other class.")
    else:
        notes.append("Multi-class task: precision, recall, F1 and specificity are macro averages; AUC is the "
                     "one-vs-rest macro AUC.")
    if bootstrap:
        notes.append(f"Brackets: 95% confidence intervals, {bootstrap.get('method', 'percentile bootstrap')} "
                     f"({_count(bootstrap.get('resamples'))} resamples, seed {_e(str(bootstrap.get('seed')))}). "
                     "Images of one patient resampled independently make intervals too narrow.")
    else:
        notes.append("No confidence intervals in this metrics.json (bootstrap turned off or an older run).")
    if positive:
        notes.append("\"argmax (0.5)\" is the MedMNIST evaluation protocol. The operating threshold and the "
                     "calibration temperature were chosen on the validation split, so validation numbers at the "
                     "threshold are optimistic; the test split gives the honest estimate.")
    else:
        notes.append("\"argmax\" (the most probable class) is the MedMNIST evaluation protocol; operating thresholds "
                     "apply to binary tasks only.")
    text = _table(headers, rows, caption="Table 1: summary metrics per split (value and 95% CI)", cls="metrics")
    text += "".join(f"<p class=\"note\">{note}</p>" for note in notes)
    if threshold.get("value") is not None:
        target = f", target sensitivity {_number(threshold.get('target'), 2)}" if threshold.get("target") else ""
        text += (f"<p>Operating threshold: <strong>{_number(threshold['value'], 4)}</strong> on the calibrated "
                 f"probability of {_e(str(card.get('positive_label') or positive))}, chosen by "
                 f"<strong>{_e(threshold.get('method', '?'))}</strong>{target} on the validation split "
                 f"(validation sensitivity {_number(threshold.get('val_sensitivity'), 3)}, specificity "
                 f"{_number(threshold.get('val_specificity'), 3)}). <code>predict</code> and <code>explain</code> use "
                 "it.</p>")
    return text


def _per_class_section(files: _RunFiles, images: _ImageEncoder) -> str:
    metrics = files.metrics
    if not metrics:
        return _note("No metrics.json in this run folder.")
    parts = []
    for split in _splits(metrics):
        entry = metrics[split]
        per_class = entry.get("per_class") or {}
        intervals = entry.get("per_class_ci95") or {}
        rows = []
        for label, values in per_class.items():
            label_intervals = intervals.get(label) or {}
            rows.append([label, _count(values.get("support")),
                         *(_cell(values.get(key), label_intervals.get(key)) for key, _ in _PER_CLASS_METRICS)])
        if rows:
            parts.append(_table(["class", "support", *(title for _, title in _PER_CLASS_METRICS)], rows,
                                caption=f"{split} (argmax), one-vs-rest, value and 95% CI", cls="metrics"))
    return "\n".join(parts) or _note("metrics.json has no per-class entries.")


def _curves_section(files: _RunFiles, images: _ImageEncoder) -> str:
    parts = []
    if files.history:
        last = files.history[-1]
        # The rule of train.fit: the highest validation score, ties to the lower validation loss.
        best = max(files.history, key=lambda row: (_float(row.get("val_score"), float("-inf")),
                                                   -_float(row.get("val_loss"), float("inf"))))
        seconds = sum(_float(row.get("seconds"), 0.0) for row in files.history)
        best_epoch = _e(str(best.get("epoch", "?")).split(".")[0])
        parts.append(f"<p>{len(files.history)} epochs in {seconds:.0f} s; best validation score "
                     f"{_number(_float(best.get('val_score')), 4)} at epoch {best_epoch} (that checkpoint is the "
                     f"model). Last epoch: training loss {_number(_float(last.get('train_loss')), 4)}, validation "
                     f"loss {_number(_float(last.get('val_loss')), 4)}.</p>")
    parts.append(_figure(files.run.figure_path(TRAINING_CURVES), images,
                         "Accuracy and loss per epoch, training (augmented) against validation."))
    return "\n".join(parts)


def _confusion_section(files: _RunFiles, images: _ImageEncoder) -> str:
    parts = []
    names = (files.card or {}).get("label_names") or []
    argmax = "the argmax (0.5)" if len(names) == 2 else "the argmax"
    for split in _splits(files.metrics) or files.run.figure_splits("confusion_matrix"):
        parts.append('<div class="row">')
        parts.append(_figure(files.run.figure_path("confusion_matrix", split), images,
                             f"{split}: at {argmax}. Rows: true class; columns: predicted class."))
        at = (files.metrics.get(split) or {}).get("at_threshold")
        if isinstance(at, dict) and at.get("confusion_matrix") and names:
            matrix = at["confusion_matrix"]
            rows = [[f"true {names[index]}", *(_count(value) for value in row)] for index, row in enumerate(matrix)]
            parts.append("<div>" + _table(["", *(f"predicted {name}" for name in names)], rows, cls="metrics",
                                          caption=f"{split}: at the operating threshold "
                                                  f"{_number(at.get('threshold'), 3)}") + "</div>")
        parts.append("</div>")
    return "\n".join(parts) or _note("No confusion matrices in this run folder.")


def _roc_pr_section(files: _RunFiles, images: _ImageEncoder) -> str:
    parts = []
    for split in _splits(files.metrics) or files.run.figure_splits("roc"):
        parts.append('<div class="row">')
        parts.append(_figure(files.run.figure_path("roc", split), images, f"ROC curve, {split}"))
        parts.append(_figure(files.run.figure_path("precision_recall", split), images,
                             f"Precision-recall curve, {split}"))
        parts.append("</div>")
    return "\n".join(parts) or _note("No curves in this run folder.")


def _calibration_section(files: _RunFiles, images: _ImageEncoder) -> str:
    parts = []
    card = files.card or {}
    temperature = card.get("temperature")
    method = (card.get("calibration") or {}).get("method", "temperature")
    if method in ("bias", "vector"):
        parts.append(f"<p>Calibration: <strong>{_e(method)} scaling</strong> fitted on the validation split "
                     "(temperature plus per-class bias: Platt scaling of the log-odds; vector: per-class scale and "
                     "bias, Guo et al. 2017).</p>")
    elif temperature is not None:
        parts.append(f"<p>Temperature scaling (Guo et al. 2017), fitted on the validation split: T = "
                     f"<strong>{_number(temperature, 3)}</strong>"
                     + (" (T &gt; 1: the raw model was over-confident)." if temperature > 1.0 else
                        " (T &lt; 1: the raw model was under-confident)." if temperature < 1.0 else " (not fitted).")
                     + " It changes confidence only, never the argmax or an AUC.</p>")
    rows = []
    for split in _splits(files.metrics):
        entry = files.metrics[split]
        calibrated = entry.get("calibration") or {}
        raw = entry.get("calibration_uncalibrated") or {}
        intervals = calibrated.get("ci95") or {}
        if calibrated:
            rows.append([split, _number(raw.get("ece"), 3), _cell(calibrated.get("ece"), intervals.get("ece")),
                         _number(calibrated.get("ece_adaptive"), 3),
                         _number(raw.get("brier"), 3), _cell(calibrated.get("brier"), intervals.get("brier")),
                         _e(str(calibrated.get("ece_reading", "")))])
    if rows:
        any_entry = next(iter(files.metrics.values()))
        bins = (any_entry.get("calibration") or {}).get("n_bins", "?")
        parts.append(_table(["split", "ECE before", "ECE after (95% CI)", "adaptive ECE after", "Brier before",
                             "Brier after (95% CI)", "probability read"], rows, cls="metrics",
                            caption=f"Expected calibration error ({bins} equal-width bins; adaptive: {bins} "
                                    "equal-mass bins, Nixon et al. 2019) and Brier score; lower is better. "
                                    "Validation is where the calibration was fitted (optimistic); test is honest."))
    worse_than_val = [split for split in _splits(files.metrics) if split != "val" and "val" in files.metrics
                      and _calibration_value(files.metrics[split]) > _calibration_value(files.metrics["val"]) + 0.02]
    if worse_than_val:
        parts.append(_note(
            f"Calibration on {', '.join(worse_than_val)} is worse than on validation. Calibration fitted on "
            "validation holds where the data are alike; a test set from another time, scanner or population, or "
            "with another prevalence of the positive class, shifts probabilities in ways no validation fit can "
            "foresee (Ovadia et al., NeurIPS 2019). Ensembles of independently trained models degrade least under "
            "such shift; the out-of-domain section below says how far the test images lie from the training ones."))
    worse = [split for split in _splits(files.metrics)
             if split != "val" and _rose(files.metrics[split], "ece")]
    if worse:
        parts.append(_note(
            f"On {', '.join(worse)} the ECE rose after temperature scaling (which minimises the validation "
            "log-likelihood, not the ECE). One temperature corrects over- or under-confidence; it cannot correct "
            "probabilities shifted towards one class (e.g. by a class-weighted loss, or a test prevalence unlike "
            "the validation one): look at the reliability diagram for a curve off the diagonal on one side."))
    figures = [_figure(files.run.figure_path("reliability", split), images, f"Reliability diagram, {split}")
               for split in (_splits(files.metrics) or files.run.figure_splits("reliability"))]
    if figures:
        parts.append('<div class="row">' + "".join(figures) + "</div>")
    return "\n".join(parts) or _note("No calibration results in this run folder.")


def _calibration_value(entry: Mapping[str, Any]) -> float:
    value = (entry.get("calibration") or {}).get("ece")
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _domain_section(files: _RunFiles, images: _ImageEncoder) -> str:
    """The out-of-domain guard: what it is, how often it flags each split, the probes, and external evaluations."""
    guard = (files.card or {}).get("domain") or {}
    if not guard:
        return _note("This run has no out-of-domain guard (domain.enabled false, or a run from before the guard "
                     "existed): its predictions do not say when an input is unlike its training images.")
    parts = [
        "<p>Every prediction carries <code>in_domain</code> and <code>domain_score</code>. The score is a "
        "Mahalanobis distance of the network's stage statistics to the training images' class means (Lee et al. "
        f"2018), over {len(guard.get('layers', []))} stage(s), in standard deviations above its validation mean; "
        f"above <strong>{_number(guard.get('z_threshold'), 2)}</strong> (a {guard.get('false_alarm_rate')} "
        "false-alarm rate extrapolated from validation) an input is out of domain. Input checks that need no "
        "model (DICOM modality and body part, colour, aspect ratio, size, intensity range) flag it too. "
        "Out-of-domain predictions should not be trusted, whatever their probability.</p>"
    ]
    rows = []
    for split in _splits(files.metrics):
        entry = (files.metrics[split] or {}).get("domain") or {}
        if entry:
            rows.append([_e(split), str(entry.get("n")), str(entry.get("out_of_domain")), _number(entry.get("rate"), 3),
                         _e(", ".join(f"{k}: {v}" for k, v in (entry.get("reasons") or {}).items()) or "-")])
    for name, entry in (guard.get("probes") or {}).items():
        rows.append([f"probe: {_e(name)}", str(entry.get("n")), str(entry.get("out_of_domain")),
                     _number(entry.get("rate"), 3), "synthetic, made from test images"])
    for folder, info, metrics in files.evaluations:
        entry = (metrics.get(info.get("split")) or {}).get("domain") or {}
        if entry:
            rows.append([f"evaluation: {_e(folder.name)}", str(entry.get("n")), str(entry.get("out_of_domain")),
                         _number(entry.get("rate"), 3), _e(str(info.get("kind", "")))])
    if rows:
        parts.append(_table(["data", "n", "out of domain", "share", "why"], rows, cls="metrics",
                            caption="In-domain splits should be flagged rarely; probes and other kinds of image "
                                    "almost always."))
    figures = [_figure(files.run.figure_path("domain_scores", split), images, f"Domain scores, {split}")
               for split in files.run.figure_splits("domain_scores")]
    if figures:
        parts.append('<div class="row">' + "".join(figures) + "</div>")
    return "\n".join(parts)


def _rose(entry: Mapping[str, Any], key: str) -> bool:
    """Whether a calibration measure is higher after temperature scaling than before."""
    after = (entry.get("calibration") or {}).get(key)
    before = (entry.get("calibration_uncalibrated") or {}).get(key)
    return isinstance(after, (int, float)) and isinstance(before, (int, float)) and after > before + 1e-12


_EVALUATION_METRICS = (("accuracy", "Accuracy"), ("auc", "AUC"), ("sensitivity", "Sensitivity"),
                       ("specificity", "Specificity"), ("balanced_accuracy", "Balanced acc."))


def _evaluations_section(files: _RunFiles, images: _ImageEncoder) -> str:
    if not files.evaluations:
        return _note("No evaluations beyond the run's own splits. <code>medxai evaluate RUN --data OTHER --split "
                     "all</code> measures the model on another hospital's data; results go to "
                     "<code>evaluations/&lt;name&gt;/</code>, never into the run's own metrics.")
    rows, figures = [], []
    for folder, info, metrics in files.evaluations:
        split = info.get("split")
        entry = metrics.get(split) if isinstance(metrics.get(split), dict) else {}
        kind = "external" if info.get("kind") == "external" else "internal: the run's own data"
        data = str(info.get("data", "?"))
        rows.append([f"<b>{_e(folder.name)}</b><br><small>{_e(kind)}</small>",
                     f'<span title="{_e(data)}">{_e(_short_data_name(data))}</span><br>'
                     f"<small>{_e(str(info.get('selection', split)))}</small>",
                     _count(entry.get("n")),
                     *(_with_interval(entry, key) for key, _ in _EVALUATION_METRICS),
                     _with_interval(entry.get("calibration") or {}, "ece")])
        for kind_of_figure, caption in (("roc", "ROC"), ("reliability", "Reliability")):
            path = folder.figure_path(kind_of_figure, split) if split else None
            if path is not None and path.is_file():
                figures.append(_figure(path, images, f"{caption}, evaluation {folder.name}"))
    text = ("<p>The model measured again after training (<code>medxai evaluate</code>). An <b>external</b> "
            "evaluation uses data it was not trained on: the honest answer to \"will it work on our patients?\"; "
            "a drop against the run's own test split measures the shift between the datasets (scanners, "
            "populations, preprocessing). An <b>internal</b> one re-reads the run's own data through its split "
            "lists. Threshold and temperature are the run's, chosen on its own validation split. A set drawn from "
            "the same source as the training data is not independent, whatever its folder is called.</p>")
    text += _table(["evaluation", "data and images", "n", *(title for _, title in _EVALUATION_METRICS), "ECE"], rows,
                   cls="metrics", raw=True, caption="Evaluations (value and 95% CI)")
    if figures:
        text += '<div class="row">' + "".join(figures) + "</div>"
    return text


def _short_data_name(description: str) -> str:
    """``image folder /long/path/chest_xray`` -> ``chest_xray`` (the full description is the cell's tooltip)."""
    return Path(description.split(" ", 2)[-1]).name or description


def _gallery_section(files: _RunFiles, images: _ImageEncoder) -> str:
    heatmaps = files.run.heatmaps_dir
    items = _gallery_items(files, heatmaps)
    if not items:
        return _note("No heatmaps in this run folder.")
    gallery = files.gallery if isinstance(files.gallery, dict) else {}
    intro = "<p>Grad-CAM overlays (Selvaraju et al. 2017) of the most confident images of each outcome"
    if gallery.get("split"):
        intro += f" on the {_e(gallery['split'])} split"
    if gallery.get("decision_rule"):
        intro += f"; decisions by {_e(gallery['decision_rule'])}"
    intro += (". Warm colours mark where the evidence for the explained class lies; a heatmap is not a segmentation "
              "and can point at shortcuts (markers, borders, text) as readily as at disease.</p>")
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item.get("outcome", "other"), []).append(item)
    order = [outcome for outcome in _OUTCOME_TITLES if outcome in groups] + [
        outcome for outcome in groups if outcome not in _OUTCOME_TITLES]
    parts = [intro]
    for outcome in order:
        cards = []
        for item in groups[outcome]:
            uri = images.data_uri(heatmaps / item["file"], gallery=True)
            if uri is None:
                continue
            details = [f"<b>{_e(str(item.get('id', '')))}</b>"]
            if item.get("label") is not None:
                details.append(f"true: {_e(str(item['label']))}")
            if item.get("predicted") is not None:
                details.append(f"predicted: {_e(str(item['predicted']))}")
            if item.get("probability_positive") is not None and (files.card or {}).get("positive_label"):
                details.append(f"p({_e(files.card['positive_label'])}) = {_number(item['probability_positive'], 3)}")
            elif item.get("probability") is not None:
                details.append(f"p = {_number(item['probability'], 3)}")
            cards.append(f'<figure class="tile"><img src="{uri}" alt="{_e(outcome)} {_e(str(item.get("id", "")))}">'
                         f"<figcaption>{'<br>'.join(details)}</figcaption></figure>")
        if cards:
            title = _OUTCOME_TITLES.get(outcome, outcome.replace("_", " ").capitalize())
            parts.append(f"<h3>{_e(title)}</h3><div class=\"tiles\">{''.join(cards)}</div>")
    return "\n".join(parts)


def _gallery_items(files: _RunFiles, heatmaps: Path) -> list[dict[str, Any]]:
    """Gallery entries from ``gallery.json``, or parsed from the overlay file names of older runs."""
    if isinstance(files.gallery, dict) and isinstance(files.gallery.get("items"), list):
        return [item for item in files.gallery["items"]
                if isinstance(item, dict) and (heatmaps / str(item.get("file", ""))).is_file()]
    labels = (files.card or {}).get("label_names") or []
    # Outcome prefixes of jobs.gallery.write_gallery's file names, longest first so "missed_a_b" beats "missed_a".
    prefixes = sorted([*_OUTCOME_TITLES, *(f"{kind}_{safe_file_stem(str(label))}" for label in labels
                                           for kind in ("correct", "missed"))], key=len, reverse=True)
    items = []
    for path in sorted(heatmaps.glob("*.png")) if heatmaps.is_dir() else []:
        outcome = next((prefix for prefix in prefixes if path.name.startswith(prefix + "_")), "other")
        stem = path.stem[len(outcome) + 1:] if outcome != "other" else path.stem
        probability = re.search(r"_p([0-9]*\.?[0-9]+)$", stem)
        items.append({"outcome": outcome, "id": stem[: probability.start()] if probability else stem,
                      "file": path.name, "probability": float(probability.group(1)) if probability else None})
    return items


def _explanations_section(files: _RunFiles, images: _ImageEncoder) -> str:
    parts = []
    for path, document in files.explain_metrics:
        parts.append(_explain_metrics_table(path, document, files.run_dir))
        if path.parent != files.run_dir:
            for figure in sorted(path.parent.glob("*.png")):
                parts.append(_figure(figure, images, figure.stem.replace("_", " ")))
    figures_dir = files.run.figures_dir
    extra = [path for path in sorted(figures_dir.glob("*.png")) if not _CLAIMED_FIGURES.match(path.name)]
    for path in extra:
        parts.append(_figure(path, images, path.stem.replace("_", " ")))
    if not parts:
        return _note("Explanation quality was not measured for this run (run <code>medxai explain-eval</code> to "
                     "measure deletion/insertion, ROAD and the sanity checks).")
    return "\n".join(parts)


def _explain_metrics_table(path: Path, document: Mapping[str, Any], run_dir: Path) -> str:
    methods = document.get("methods") or {}
    where = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
    header = (f"<p>From <code>{_e(str(where))}</code>: {_count(document.get('n_images'))} images of "
              f"{_e(str(document.get('data', '?')))} ({_e(str(document.get('split', '?')))} split), baseline "
              f"{_e(str(document.get('baseline', '?')))}. Deletion and ROAD-MoRF: lower is better; insertion and "
              "ROAD-LeRF: higher is better. The random column is the same score for a random heatmap.</p>")
    keys = (("deletion_auc", "Deletion AUC"), ("insertion_auc", "Insertion AUC"),
            ("road_morf", "ROAD MoRF"), ("road_lerf", "ROAD LeRF"))
    rows = []
    for name, values in methods.items():
        if not isinstance(values, dict):
            continue
        random = values.get("random_baseline") or {}
        beats = values.get("beats_random") or {}
        cells = [_e(name)]
        for key, _ in keys:
            mark = ""
            if isinstance(beats, dict) and key in beats:
                mark = " ✓" if beats[key] else " ✗"
            cells.append(f"{_number(values.get(key), 3)} <small>(random {_number(random.get(key), 3)}){mark}</small>")
        sanity = values.get("sanity_check") or {}
        if isinstance(sanity, dict) and "passed" in sanity:
            cells.append("passed" if sanity["passed"] else "<strong>failed</strong>")
        else:
            cells.append("-")
        cells.append(_number(values.get("seconds"), 1))
        rows.append(cells)
    if not rows:
        return header + _generic(document)
    return header + _table(["method", *(title for _, title in keys), "sanity check (Adebayo et al. 2018)", "seconds"],
                           rows, cls="metrics", raw=True,
                           caption="Explanation quality (✓: better than a random heatmap)")


_LOCALIZATION_COLUMNS = (
    ("pointing_game", "pointing game"), ("energy_pointing_game", "energy pointing game"),
    ("iou_otsu", "IoU at Otsu"), ("iou_top10", "IoU top 10 %"), ("iou_value", "IoU at val. threshold"),
    ("iobb_hit_0.1", "IoBB > 0.1"), ("iobb_hit_0.5", "IoBB > 0.5"), ("pixel_auroc", "pixel AUROC"),
    ("pixel_auprc", "pixel AUPRC"),
)


def _localization_section(files: _RunFiles, images: _ImageEncoder) -> str:
    """Each explain-eval document with ground truth: the localisation table by method and outcome, the classes, the
    maps of images without a lesion, and the best and worst cases with the expert's outline."""
    parts = []
    for path, document in files.explain_metrics:
        facts = document.get("localization")
        if not isinstance(facts, dict):
            continue
        where = path.relative_to(files.run_dir) if path.is_relative_to(files.run_dir) else path
        thresholds = ("per-class thresholds chosen on the validation split" if facts.get("thresholds_from")
                      else "no validation masks, so no per-class threshold")
        parts.append(
            f"<p>From <code>{_e(str(where))}</code>: {_count(facts.get('lesion_images'))} images of "
            f"{_e(str(document.get('split', '?')))} with an expert lesion outline or box, "
            f"{_count(facts.get('empty_mask_images'))} without a lesion (reported apart); CAM layer "
            f"<code>{_e(str(facts.get('layer')))}</code>; {thresholds}. Each map is placed on the original image as "
            "its overlay is, and compared there with the mask. Pointing game (Zhang et al. 2018, 15 px scaled to the "
            "image): the map's peak lies on the lesion; energy pointing game (Wang et al. 2020): the share of the "
            "map inside the lesion's box; IoBB (Wang et al. 2017): the detected box's overlap. Means with 95% "
            "bootstrap intervals.</p>")
        rows, class_rows, empty_rows = [], [], []
        for method, entry in (document.get("methods") or {}).items():
            localization = entry.get("localization") if isinstance(entry, dict) else None
            if not isinstance(localization, dict):
                continue
            for outcome in ("correct", "wrong", "all"):
                values = (localization.get("lesion") or {}).get(outcome)
                if values:
                    n = (values.get("pointing_game") or {}).get("n", 0)
                    rows.append([_e(method), f"{_e(outcome)} ({n})",
                                 *(_metric_interval(values.get(key)) for key, _ in _LOCALIZATION_COLUMNS)])
            for name, values in (localization.get("by_class") or {}).items():
                class_rows.append([_e(method), _e(name), *(_metric_interval(values.get(key)) for key in
                                                         ("pointing_game", "energy_pointing_game", "iou_otsu"))])
            empty = localization.get("empty_mask") or {}
            if empty:
                empty_rows.append([_e(method), *(_metric_interval(empty.get(key)) for key in
                                                 ("peak", "area_above_otsu", "border_energy"))])
        if rows:
            parts.append(_table(["method", "images", *(title for _, title in _LOCALIZATION_COLUMNS)], rows,
                                cls="metrics", raw=True, caption="Localisation of correctly and wrongly classified "
                                                                 "lesion images"))
        if class_rows:
            parts.append(_table(["method", "class", "pointing game", "energy pointing game", "IoU at Otsu"],
                                class_rows, cls="metrics", raw=True, caption="By class (all lesion images)"))
        if empty_rows:
            parts.append(_table(["method", "peak", "share of the image above Otsu", "share of the map in the border"],
                                empty_rows, cls="metrics", raw=True,
                                caption="Images without a lesion: where the map puts its mass"))
        parts.extend(_localization_cases(path, document, images))
    if not parts:
        return _note("No localisation was measured: give <code>medxai explain-eval</code> data with lesion masks or "
                     "boxes (BUSI-style <code>_mask.png</code> files, a <code>mask</code> column, box columns, or "
                     "<code>--masks</code>).")
    return "\n".join(parts)


def _localization_cases(path: Path, document: Mapping[str, Any], images: _ImageEncoder) -> list[str]:
    figures = []
    for method, entry in (document.get("methods") or {}).items():
        for case in ((entry.get("localization") or {}).get("cases") or []) if isinstance(entry, dict) else []:
            caption = (f"{method}: {case.get('kind')} #{case.get('rank')} ({case.get('class')}, energy pointing game "
                       f"{_number(case.get('energy_pointing_game'), 2)}); green: the expert's outline")
            figures.append(_figure(path.parent / "localization" / str(case.get("file", "")), images, caption))
    return figures


def _shortcut_section(files: _RunFiles, images: _ImageEncoder) -> str:
    """The shortcut alarm of each explain-eval document: a warning with the worst examples where it fires."""
    parts = []
    for path, document in files.explain_metrics:
        for method, entry in (document.get("methods") or {}).items():
            verdict = entry.get("shortcut_alarm") if isinstance(entry, dict) else None
            if not isinstance(verdict, dict):
                continue
            regions = verdict.get("regions") or {}
            cells = [[_e(region), "<strong>fires</strong>" if result.get("fires") else "quiet",
                      _number(result.get("flagged_fraction"), 2), _number(result.get("median_energy_share"), 2),
                      _number(result.get("median_area_share"), 2)]
                     for region, result in regions.items() if isinstance(result, dict)]
            if verdict.get("fires"):
                fired = ", ".join(region for region, result in regions.items() if result.get("fires"))
                parts.append(f'<p class="warning"><strong>{_e(method)}: the evidence of correctly classified images '
                             f"sits on {_e(fired)}.</strong> The model may have learnt a shortcut (burnt-in text, a "
                             "marker, the field of view) rather than the disease; check the examples below.</p>")
            else:
                parts.append(f"<p>{_e(method)}: quiet on {_count(verdict.get('n_images'))} correctly classified "
                             f"images of {_e(str(document.get('split', '?')))}.</p>")
            parts.append(_table(["region", "verdict", "images flagged", "median share of the map",
                                 "median share of the image"], cells, cls="metrics", raw=True))
            for region, result in regions.items():
                for file in result.get("worst_examples") or [] if isinstance(result, dict) else []:
                    parts.append(_figure(path.parent / "shortcut" / str(file), images,
                                         f"{method}: evidence on {region}"))
    if not parts:
        return _note("The shortcut alarm has not run (run <code>medxai explain-eval</code>).")
    return ("<p>Share of each map's energy on the image border, on burnt-in text or markers, and outside the body, "
            "for correctly classified images. An image is flagged when at least half its evidence lies in a region "
            "and the evidence is twice as dense there as a uniform map's; a region fires when a quarter of the "
            "images (or half of one class) are flagged.</p>" + "\n".join(parts))


def _metric_interval(value: Any) -> str:
    """"0.812 <small>[0.70, 0.90]</small>" from a ``{"mean", "n", "interval"}`` summary."""
    if not isinstance(value, dict) or value.get("mean") is None:
        return "–"
    interval = value.get("interval")
    text = _number(value["mean"], 3)
    if _is_interval(interval):
        text += f" <small>[{interval[0]:.2f}, {interval[1]:.2f}]</small>"
    return text


def _model_card_section(files: _RunFiles, images: _ImageEncoder) -> str:
    card = files.card
    if not isinstance(card, dict):
        return _note("No model_card.json in this run folder.")
    threshold = card.get("threshold") or {}
    if threshold.get("value") is not None:
        rule = (f"positive ({_e(str(card.get('positive_label')))}) when its calibrated probability ≥ "
                f"{_number(threshold['value'], 4)} ({_e(threshold.get('method', ''))}, chosen on validation)")
    else:
        rule = "the most probable class (argmax)"
    preprocess = card.get("preprocess") or {}
    channels = preprocess.get("channels", card.get("in_chans"))
    preprocessing = (f"{_e(str(preprocess.get('size', card.get('input_size'))))} px square "
                     f"({_e(str(preprocess.get('resize_mode', '?')))}), {_e(str(channels))} "
                     f"channel(s), intensity {_e(str(preprocess.get('intensity', '?')))}, normalisation "
                     f"{_e(str(preprocess.get('normalize', '?')))}")
    train_data = card.get("train_data") or {}
    summary = card.get("metrics") or {}
    test_split = summary.get("split")
    entry = files.metrics.get(test_split, {}) if test_split else {}
    metric_text = "; ".join(f"{_e(key)} {_inline_interval(entry if entry else summary, key)}"
                            for key in ("accuracy", "auc", "sensitivity", "specificity")
                            if summary.get(key) is not None)
    if entry.get("at_threshold"):
        at = entry["at_threshold"]
        metric_text += (f"; at the operating threshold: sensitivity {_inline_interval(at, 'sensitivity')}, specificity "
                        f"{_inline_interval(at, 'specificity')}")
    items = [
        ("Model", f"{_e(card.get('architecture', '?'))}, {_e(card.get('num_classes', '?'))} classes "
                  f"({_e(', '.join(card.get('label_names') or []))}); Grad-CAM layer "
                  f"<code>{_e(card.get('cam_layer', ''))}</code>"),
        ("Intended use", _e(card.get("intended_use", ""))),
        ("Not intended for", f"<strong>{_e(NOT_FOR_CLINICAL_USE)}</strong> Not a medical device; not for diagnosis, "
                             "triage or treatment decisions."),
        ("Training data", f"{_e(str(train_data.get('source', '?')))}"
                          + (f" (fingerprint <code>{_e(str(train_data['fingerprint'])[:16])}</code>)"
                             if train_data.get("fingerprint") else "")
                          + "".join(f"; <strong>note:</strong> {_e(note)}"
                                    for note in (train_data.get("splits") or {}).get("notes") or [])),
        ("Preprocessing", preprocessing),
        ("Decision rule", rule),
        ("Calibration", f"temperature {_number(card.get('temperature'), 3)} (fitted on validation)"),
        ("Metrics", f"{_e(str(test_split))} split, n = {_count(summary.get('n'))}: {metric_text}" if summary else "-"),
        ("Limitations", _e(card.get("limitations", ""))),
        ("Shortcut alarm", _shortcut_card_text((card.get("metrics") or {}).get("shortcut_alarm"))),
        ("Version", f"medxai {_e(str(card.get('medxai_version', '?')))}"),
    ]
    return "<dl class=\"card\">" + "".join(f"<dt>{_e(term)}</dt><dd>{value}</dd>" for term, value in items) + "</dl>"


def _shortcut_card_text(verdict: Any) -> str:
    if not isinstance(verdict, dict):
        return "not measured (run <code>medxai explain-eval</code> on the test split)"
    where = f"{_count(verdict.get('n_images'))} {_e(str(verdict.get('split', '?')))} images"
    if verdict.get("fires"):
        return (f"<strong>fires</strong> on {where}: the evidence sits on {_e(', '.join(verdict.get('regions') or []))} "
                f"({_e(', '.join(verdict.get('methods') or []))}); the model may have learnt a shortcut")
    return f"quiet on {where}"


# -- helpers -------------------------------------------------------------------------------------------------------
def _splits(metrics: Mapping[str, Any]) -> list[str]:
    """Split names in reading order: val, test, then any others."""
    order = {"train": 0, "val": 1, "test": 2}
    return sorted((name for name, entry in metrics.items() if isinstance(entry, dict)),
                  key=lambda name: (order.get(name, 3), name))


def _figure(path: Path, images: _ImageEncoder, caption: str) -> str:
    if not path.is_file():
        return _note(f"{path.name} is not in this run folder.")
    uri = images.data_uri(path)
    if uri is None:
        return _note(f"{path.name} could not be read.")
    return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, caption: str | None = None,
           cls: str = "", footnote: str | None = None, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless produced by the helpers here (``_Safe``) or ``raw`` is set."""
    head = "".join(f"<th>{_e(str(header))}</th>" for header in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell if raw or isinstance(cell, _Safe) else _e(str(cell))}</td>" for cell in row)
        + "</tr>" for row in rows
    )
    caption_html = f"<caption>{_e(caption)}</caption>" if caption else ""
    foot = f'<p class="note">{_e(footnote)}</p>' if footnote else ""
    return f'<table class="{cls}">{caption_html}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}'


class _Safe(str):
    """HTML produced here from numbers: not escaped again."""


def _with_interval(entry: Mapping[str, Any], key: str) -> _Safe:
    return _cell(entry.get(key), (entry.get("ci95") or {}).get(key))


def _inline_interval(entry: Mapping[str, Any], key: str) -> str:
    """"0.912 (95% CI 0.890–0.931)" for running text."""
    interval = (entry.get("ci95") or {}).get(key)
    text = _number(entry.get(key), 3)
    if _is_interval(interval):
        text += f" (95% CI {interval[0]:.3f}–{interval[1]:.3f})"
    return text


def _cell(value: Any, interval: Any) -> _Safe:
    text = _number(value, 3)
    if _is_interval(interval):
        text += f'<br><span class="ci">{interval[0]:.3f}–{interval[1]:.3f}</span>'
    return _Safe(text)


def _is_interval(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _number(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "–"
    return f"{value:.{digits}f}"


def _count(value: Any) -> _Safe:
    return _Safe(f"{int(value):,}" if isinstance(value, (int, float)) and value == value else "–")


def _float(value: Any, default: float = float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _generic(value: Any, depth: int = 0) -> str:
    """A schema-free rendering of JSON (for sections written by other parts, e.g. duplicate checks)."""
    if isinstance(value, dict):
        if not value:
            return "<p>none</p>"
        if depth > 3:
            return f"<pre>{_e(json.dumps(value, indent=1)[:2000])}</pre>"
        return "<dl>" + "".join(f"<dt>{_e(str(key))}</dt><dd>{_generic(item, depth + 1)}</dd>"
                                for key, item in value.items()) + "</dl>"
    if isinstance(value, list):
        if not value:
            return "none"
        shown = value[:10]
        if all(isinstance(item, dict) for item in shown):
            headers = list(dict.fromkeys(key for item in shown for key in item))
            rows = [[_short(item.get(header)) for header in headers] for item in shown]
            table = _table(headers, rows)
        else:
            table = "<ul>" + "".join(f"<li>{_e(_short(item))}</li>" for item in shown) + "</ul>"
        more = f'<p class="note">{len(value) - 10} more not shown.</p>' if len(value) > 10 else ""
        return table + more
    return _e(_short(value))


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 0;
       color: #1d2430; background: #f6f7f9; line-height: 1.45; }
header { background: #16324f; color: #fff; padding: 1.2rem 2rem 0.8rem; }
header h1 { margin: 0 0 0.2rem; font-size: 1.6rem; }
.subtitle { margin: 0 0 0.6rem; opacity: 0.9; }
.warning { background: #fff3cd; color: #5c4400; padding: 0.4rem 0.8rem; border-radius: 4px; display: inline-block; }
nav { margin-top: 0.6rem; font-size: 0.9rem; }
nav a { color: #cfe3ff; margin-right: 0.9rem; text-decoration: none; white-space: nowrap; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 2rem 2rem; }
section { background: #fff; border: 1px solid #dde2e8; border-radius: 6px; padding: 0.6rem 1.4rem 1.2rem;
          margin: 1.2rem 0; }
h2 { font-size: 1.25rem; border-bottom: 2px solid #e3e8ef; padding-bottom: 0.3rem; }
h3 { font-size: 1.05rem; margin-top: 1.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid #dde2e8; padding: 0.3rem 0.55rem; text-align: left; vertical-align: top; }
table.metrics th, table.metrics td { text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
thead th { background: #eef2f7; }
.ci { color: #5b6675; font-size: 0.8rem; white-space: nowrap; }
.note { color: #5b6675; font-size: 0.9rem; }
.ok { color: #1e6b32; }
.attention { color: #8a4b00; }
pre { background: #f3f5f8; padding: 0.8rem; overflow-x: auto; font-size: 0.82rem; border-radius: 4px; }
figure { margin: 0.6rem 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e8ef; }
figcaption { font-size: 0.85rem; color: #4a5563; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; }
.row figure { flex: 0 1 520px; }
.tiles { display: flex; flex-wrap: wrap; gap: 0.8rem; }
.tile { width: 200px; }
.tile img { width: 200px; image-rendering: pixelated; }
dl.card dt { font-weight: 600; margin-top: 0.5rem; }
dl.card dd { margin-left: 1rem; }
footer { text-align: center; color: #6b7684; font-size: 0.8rem; padding: 1rem 2rem 2rem; }
"""
