"""The ``medxai`` command: one subcommand per stage (see ``medxai --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from medxai.errors import InvalidImageError, MedxaiError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("medxai")
console = Console(stderr=False)

DEMO_NAME = "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medxai",
        description="Train, evaluate and explain CNN classifiers of medical images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train the simple CNN on PneumoniaMNIST, evaluate and explain (CPU is enough)")
    demo.add_argument("--out", default="runs", help="folder that receives the run folder 'demo' (default: runs)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    train = commands.add_parser("train", help="train a model; writes a run folder")
    train.add_argument("--preset", "--config", dest="preset", help="preset name (see `medxai presets`) or YAML file")
    train.add_argument("--data", help="image folder, CSV manifest, .npz file or MedMNIST subset name")
    train.add_argument("--model", help="architecture (see `medxai models`)")
    train.add_argument("--pretrained", action="store_true", default=None, help="start from ImageNet weights")
    train.add_argument("--weights", help="local pretrained weights file (offline use)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--size", type=int, help="model input side in pixels")
    train.add_argument("--name", help="run name (folder under --out)")
    train.add_argument("--out", help="parent folder of run folders (default: runs)")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", action="store_true", help="continue an interrupted run exactly where it stopped")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any config value, e.g. --set augment.rotation_degrees=15 (repeatable)")

    evaluate = commands.add_parser("evaluate", help="evaluate a run on a split of any labelled data")
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--data", required=True, help="image folder, CSV manifest, .npz or MedMNIST name")
    evaluate.add_argument("--split", default="test", help="train, val, test, or all (default: test)")
    evaluate.add_argument("--out", help="where metrics.json goes (default: the run folder)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    predict = commands.add_parser("predict", help="classify images (files or folders)")
    predict.add_argument("run", help="run folder")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    predict.add_argument("--out", help="also write predictions.csv and skipped.csv here")
    predict.add_argument("--device", default="auto")

    explain = commands.add_parser("explain", help="write Grad-CAM overlays at each image's original resolution")
    explain.add_argument("run", help="run folder")
    explain.add_argument("images", nargs="+", help="image files or folders")
    explain.add_argument("--out", required=True, help="output folder for overlays")
    explain.add_argument("--method", default="gradcam", help="CAM method (default: gradcam)")
    explain.add_argument("--layer", action="append", help="module name(s) to explain at (default: the model's CAM layer)")
    explain.add_argument("--target", help="class name or index to explain (default: the predicted class)")
    explain.add_argument("--colormap", default="jet")
    explain.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity (default 0.4)")
    explain.add_argument("--npy", action="store_true", help="also save raw heatmaps as .npy")
    explain.add_argument("--json", action="store_true")
    explain.add_argument("--device", default="auto")
    explain.add_argument("--hash-names", action="store_true",
                         help="name outputs by a hash of the input's relative path (for file names that hold PHI)")
    explain.add_argument("--dicom-sc", action="store_true",
                         help="for DICOM inputs, also write the overlay as a DICOM Secondary Capture (.dcm) "
                              "referencing the source study and series; no patient data unless the next option")
    explain.add_argument("--dicom-sc-copy-patient", action="store_true",
                         help="copy the patient and study identification into the Secondary Capture (PHI!)")

    check_data = commands.add_parser("check-data", help="counts, unreadable files, duplicates within and across splits")
    check_data.add_argument("path", help="image folder, CSV manifest, .npz file or MedMNIST subset name")
    check_data.add_argument("--json", action="store_true", help="print the full result as JSON")
    check_data.add_argument("--out", help="also write the full result to this JSON file")
    check_data.add_argument("--near-threshold", type=int, default=None,
                            help="largest perceptual-hash distance (of 256 bits) for a near duplicate (default 24)")
    check_data.add_argument("--patient-pattern", help="regex giving the patient id from file names")

    report = commands.add_parser("report", help="write a run's self-contained HTML report (train and demo do this too)")
    report.add_argument("run", help="run folder")
    report.add_argument("--out", help="HTML file to write (default: RUN/report.html)")

    compare = commands.add_parser("compare", help="table of runs: model, data, metrics with 95%% confidence intervals")
    compare.add_argument("runs", nargs="+", help="run folders")
    compare.add_argument("--split", help="split to compare (default: test where present, else val)")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON")

    explain_eval = commands.add_parser(
        "explain-eval", help="faithfulness (deletion, insertion, ROAD vs random maps) and sanity check of CAM methods"
    )
    explain_eval.add_argument("run", help="run folder")
    explain_eval.add_argument("--data", required=True, help="image folder, CSV manifest, .npz or MedMNIST name")
    explain_eval.add_argument("--split", default="test", help="train, val, test, or all (default: test)")
    explain_eval.add_argument("--methods", default="gradcam",
                              help="comma-separated CAM methods (default: gradcam; e.g. gradcam,scorecam)")
    explain_eval.add_argument("--max-images", type=int, default=200,
                              help="evaluate a seeded random subset of at most this many images (default 200)")
    explain_eval.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    explain_eval.add_argument("--baseline", choices=("blur", "mean"), default="blur",
                              help="what deleted pixels become (default: blur)")
    explain_eval.add_argument("--seed", type=int, default=0)
    explain_eval.add_argument("--device", default="auto")
    explain_eval.add_argument("--out", help="where explain_metrics.json goes (default: the run folder)")
    explain_eval.add_argument("--json", action="store_true", help="print explain_metrics.json")

    commands.add_parser("models", help="list the registered architectures")
    commands.add_parser("presets", help="list the configuration presets")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    _configure_logging(arguments.verbose)
    try:
        return _COMMANDS[arguments.command](arguments)
    except MedxaiError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; a training run can continue with --resume")
        return 130


def _configure_logging(verbose: bool) -> None:
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("medxai").setLevel(logging.DEBUG if verbose else logging.INFO)


# -- commands ------------------------------------------------------------------------------------------------------
def _run_demo(arguments: argparse.Namespace) -> int:
    from medxai.config import load_config
    from medxai.workflow import train_run

    config = load_config("demo", arguments.overrides)
    config.out_dir, config.name = arguments.out, DEMO_NAME
    config.train.device = arguments.device
    started = time.perf_counter()
    run_dir = train_run(config, overwrite=True)
    _print_metrics_table(run_dir, title=f"PneumoniaMNIST, {config.model.name} (cf. the founding paper's Table 1)")
    console.print(f"run folder: [bold]{run_dir}[/]  ({time.perf_counter() - started:.0f} s)")
    console.print(f"report: [bold]{run_dir / 'report.html'}[/] (open it in a browser)")
    return 0


def _run_train(arguments: argparse.Namespace) -> int:
    from medxai.config import load_config
    from medxai.workflow import train_run

    overrides = list(arguments.overrides)
    mapping = {
        "data.source": arguments.data, "model.name": arguments.model, "model.pretrained": arguments.pretrained,
        "model.weights": arguments.weights, "train.epochs": arguments.epochs, "train.batch_size": arguments.batch_size,
        "train.lr": arguments.lr, "preprocess.size": arguments.size, "name": arguments.name,
        "out_dir": arguments.out, "train.device": arguments.device, "train.seed": arguments.seed,
    }
    overrides += [f"{key}={json.dumps(value)}" for key, value in mapping.items() if value is not None]
    config = load_config(arguments.preset, overrides)
    run_dir = train_run(config, resume=arguments.resume, overwrite=arguments.overwrite)
    _print_metrics_table(run_dir, title=f"{config.data.source}, {config.model.name}")
    console.print(f"run folder: [bold]{run_dir}[/]")
    console.print(f"report: [bold]{run_dir / 'report.html'}[/] (open it in a browser)")
    return 0


def _run_evaluate(arguments: argparse.Namespace) -> int:
    from medxai.workflow import evaluate_run

    evaluation = evaluate_run(arguments.run, arguments.data, arguments.split, out=arguments.out, device=arguments.device)
    if arguments.json:
        print(json.dumps({evaluation.split: evaluation.metrics}, indent=2))
    else:
        _print_metrics_table(Path(arguments.out or arguments.run), title=f"{arguments.data} ({arguments.split})",
                             splits=[evaluation.split])
    return 0


def _run_predict(arguments: argparse.Namespace) -> int:
    from medxai.classifier import load
    from medxai.workflow import write_skipped

    classifier = load(arguments.run, device=arguments.device)
    files = expand_inputs(arguments.images)
    results, skipped = _batched(files, classifier.predict)
    if arguments.out:
        out = Path(arguments.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_predictions_csv(out / "predictions.csv", results, classifier.label_names)
        write_skipped(out / "skipped.csv", skipped)
    if arguments.json:
        for prediction in results:
            print(json.dumps(prediction.to_dict()))
        for path, reason in skipped:
            print(json.dumps({"id": path, "skipped": reason}))
    else:
        table = Table(title=f"{len(results)} predicted, {len(skipped)} skipped, {len(files)} files")
        table.add_column("image", overflow="fold")
        table.add_column("prediction")
        for name in classifier.label_names:
            table.add_column(f"p({name})", justify="right")
        for prediction in results:
            table.add_row(prediction.id, prediction.label,
                          *(f"{prediction.probabilities[name]:.3f}" for name in classifier.label_names))
        console.print(table)
        _print_skipped(skipped)
    return 0 if results or not files else 1


def _run_explain(arguments: argparse.Namespace) -> int:
    import hashlib

    import numpy as np

    from medxai.classifier import load
    from medxai.data.dicom_sc import is_dicom_file, write_secondary_capture
    from medxai.explain import save_overlay
    from medxai.workflow import write_skipped

    classifier = load(arguments.run, device=arguments.device)
    target = arguments.target
    if target is not None and target.isdigit():
        target = int(target)
    files = expand_inputs(arguments.images)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)

    def explain(paths):
        return classifier.explain(paths, method=arguments.method, target=target, layer=arguments.layer)

    explanations, skipped = _batched(files, explain)
    written = []
    for explanation in explanations:
        stem = _output_stem(explanation.prediction.id, arguments.images)
        if arguments.hash_names:
            stem = hashlib.sha256(stem.encode()).hexdigest()[:20]
        path = save_overlay(out / f"{stem}.png", explanation.image, explanation.heatmap,
                            colormap=arguments.colormap, alpha=arguments.alpha)
        if arguments.npy:
            np.save(out / f"{stem}.npy", explanation.heatmap)
        if arguments.dicom_sc and is_dicom_file(explanation.prediction.id):
            description = f"{explanation.method} heatmap overlay ({explanation.target_label})"
            try:
                write_secondary_capture(explanation.overlay(colormap=arguments.colormap, alpha=arguments.alpha),
                                        explanation.prediction.id, out / f"{stem}.dcm",
                                        copy_patient=arguments.dicom_sc_copy_patient, description=description)
            except InvalidImageError as error:  # the PNG overlay stands; only the DICOM copy is missing
                logger.warning("no DICOM secondary capture for %s: %s", error.path, error.reason)
        written.append((explanation, path))
    write_skipped(out / "skipped.csv", skipped)
    if arguments.json:
        for explanation, path in written:
            print(json.dumps({**explanation.prediction.to_dict(), "overlay": str(path),
                              "explained_label": explanation.target_label, "method": explanation.method}))
    else:
        table = Table(title=f"{len(written)} explained, {len(skipped)} skipped, {len(files)} files -> {out}")
        table.add_column("image", overflow="fold")
        table.add_column("prediction")
        table.add_column("explained")
        table.add_column("overlay", overflow="fold")
        for explanation, path in written:
            table.add_row(explanation.prediction.id, explanation.prediction.label, explanation.target_label, path.name)
        console.print(table)
        _print_skipped(skipped)
    return 0 if written or not files else 1


def _run_check_data(arguments: argparse.Namespace) -> int:
    from medxai.data.check import NEAR_DUPLICATE_BITS, check_data, check_data_table

    threshold = NEAR_DUPLICATE_BITS if arguments.near_threshold is None else arguments.near_threshold
    result = check_data(arguments.path, near_threshold=threshold, patient_pattern=arguments.patient_pattern)
    if arguments.out:
        Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.out).write_text(json.dumps(result, indent=2))
    if arguments.json:
        print(json.dumps(result, indent=2))
    else:
        for table in check_data_table(result):
            console.print(table)
    return 0


def _run_models(arguments: argparse.Namespace) -> int:
    from medxai.models import list_models, model_spec

    table = Table(title="registered models")
    for column in ("name", "CAM layer", "pretrained", "description"):
        table.add_column(column)
    for name in list_models():
        spec = model_spec(name)
        layer = spec.cam_layer if isinstance(spec.cam_layer, str) else "depends on input size"
        table.add_row(name, layer, spec.pretrained_source or "-", spec.description)
    console.print(table)
    return 0


def _run_report(arguments: argparse.Namespace) -> int:
    from medxai.report.html import build_report

    path = build_report(arguments.run, arguments.out)
    console.print(f"report: [bold]{path}[/] ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _run_compare(arguments: argparse.Namespace) -> int:
    from medxai.report.compare import compare_runs, comparison_table

    rows = compare_runs(arguments.runs, split=arguments.split)
    if arguments.json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(comparison_table(rows, title="runs compared (value, 95% CI)"))
    return 0


def _run_explain_eval(arguments: argparse.Namespace) -> int:
    from medxai.explain._evaluation import EXPLAIN_METRICS_FILE, evaluate_explanations

    methods = [name.strip() for name in arguments.methods.split(",") if name.strip()]
    document = evaluate_explanations(
        arguments.run, arguments.data, arguments.split, methods=methods, max_images=arguments.max_images,
        steps=arguments.steps, baseline=arguments.baseline, seed=arguments.seed, device=arguments.device,
        out=arguments.out,
    )
    if arguments.json:
        print(json.dumps(document, indent=2))
        return 0
    table = Table(title=f"{document['data']} ({document['split']}, {document['n_images']} images, "
                        f"{document['baseline']} baseline): method (random heatmap)")
    for column in ("method", "deletion AUC (lower)", "insertion AUC (higher)", "ROAD MoRF (lower)",
                   "ROAD LeRF (higher)", "sanity check", "seconds"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, entry in document["methods"].items():
        chance = entry["random_baseline"]
        cells = [f"{entry[key]:.4f} ({chance[key]:.4f})" for key in ("deletion_auc", "insertion_auc", "road_morf",
                                                                     "road_lerf")]
        sanity = "passed" if entry["sanity_check"]["passed"] else "[red]FAILED[/]"
        table.add_row(name, *cells, sanity, f"{entry['seconds']:.0f}")
    console.print(table)
    console.print(f"written: [bold]{Path(arguments.out or arguments.run) / EXPLAIN_METRICS_FILE}[/]")
    return 0


def _run_presets(arguments: argparse.Namespace) -> int:
    from medxai.config import list_presets, preset_path

    for name in list_presets():
        first_line = preset_path(name).read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{name}[/]: {first_line}")
    return 0


_COMMANDS = {
    "demo": _run_demo,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "predict": _run_predict,
    "explain": _run_explain,
    "models": _run_models,
    "presets": _run_presets,
    "explain-eval": _run_explain_eval,
    "check-data": _run_check_data,
    "report": _run_report,
    "compare": _run_compare,
}


# -- helpers -------------------------------------------------------------------------------------------------------
def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files as given; folders expanded recursively to every non-hidden file, sorted (content decides later)."""
    from medxai.data.sources import is_hidden_or_system

    files: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                if child.is_file() and not any(is_hidden_or_system(Path(part)) for part in relative.parts):
                    files.append(str(child))
        else:
            files.append(str(path))
    return files


def _batched(files: Sequence[str], function, chunk: int = 32):
    """Run ``function`` on chunks of files; a chunk with a bad file is retried file by file so nothing is lost."""
    results, skipped = [], []
    for start in range(0, len(files), chunk):
        part = list(files[start : start + chunk])
        try:
            results.extend(function(part))
        except InvalidImageError:
            for path in part:
                try:
                    results.extend(function([path]))
                except InvalidImageError as error:
                    skipped.append((path, error.reason))
                    logger.warning("skipped %s: %s", path, error.reason)
    return results, skipped


def _output_stem(image_id: str, roots: Sequence[str]) -> str:
    """Name outputs by the input's path relative to the folder it was found in (no collisions across folders)."""
    path = Path(image_id)
    for root in roots:
        root_path = Path(root)
        if root_path.is_dir() and path.is_relative_to(root_path):
            path = path.relative_to(root_path)
            break
    else:
        path = Path(path.name)
    text = "__".join(path.with_suffix("").parts) + (f"{path.suffix.replace('.', '_')}" if path.suffix else "")
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text)


def _write_predictions_csv(path: Path, results, label_names) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "prediction", *(f"p_{name}" for name in label_names), "decision_rule"])
        for prediction in results:
            writer.writerow([prediction.id, prediction.label,
                             *(prediction.probabilities[name] for name in label_names), prediction.decision_rule])


def _print_skipped(skipped) -> None:
    if skipped:
        table = Table(title=f"skipped {len(skipped)} file(s)", title_style="yellow")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for path, reason in skipped:
            table.add_row(path, reason)
        console.print(table)


def _print_metrics_table(run_dir: Path, title: str, splits: Sequence[str] | None = None) -> None:
    """A table like the founding paper's Table 1: accuracy, precision, recall, F1, plus AUC, sens., spec."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    table = Table(title=title)
    columns = ("accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity", "n")
    table.add_column("split")
    for column in columns:
        table.add_column(column, justify="right")
    for split in splits or [name for name in ("val", "test") if name in metrics]:
        row = metrics[split]
        table.add_row(split, *(_format(row.get(column)) for column in columns))
    console.print(table)


def _format(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
