"""The ``medxai`` command: parses arguments and calls a job (:mod:`medxai.jobs`); nothing else.

Options left unset are passed on as None, so every default lives in one place: the configuration dataclasses of
:mod:`medxai.config` (or the job's signature, for the few choices that are not configuration).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from medxai.errors import ConfigError, MedxaiError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("medxai")
console = Console(stderr=False)
errors = Console(stderr=True)  # errors and notices: stdout stays clean for --json readers

DEMO_NAME = "demo"
_TABLE_ROWS = 50  # results shown in a console table; the files and --json hold them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medxai",
        description="Train, evaluate and explain CNN classifiers of medical images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train the simple CNN on PneumoniaMNIST, evaluate and explain (CPU is enough)"
    )
    demo.add_argument("--out", help="folder that receives the run folder 'demo' (default: runs)")
    demo.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
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
    train.add_argument("--positive-label", help="the positive (finding) class of a binary task (data.positive_label)")
    train.add_argument("--name", help="run name: one folder name under --out (default: run)")
    train.add_argument("--out", help="parent folder of run folders (default: runs)")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run --out/--name from its own config.yaml")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder (medxai runs only)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="any config value, e.g. --set augment.rotation_degrees=15 (repeatable)")

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a run on its own split or on other data; writes RUN/evaluations/NAME/"
    )
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--data", required=True, help="image folder, CSV manifest, .npz or MedMNIST name")
    evaluate.add_argument("--split", choices=("train", "val", "test", "all"), help="default: test")
    evaluate.add_argument("--name", help="evaluation folder name under RUN/evaluations (default: DATA-SPLIT)")
    _add_data_options(evaluate)
    _add_inference_options(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    predict = commands.add_parser("predict", help="classify images (files or folders)")
    predict.add_argument("run", help="run folder")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    predict.add_argument("--out", help="also write predictions.csv and skipped.csv here")
    predict.add_argument("--tta", help="test-time augmentation views, comma-separated: hflip, vflip, shift")
    predict.add_argument("--backend", help="torch (default) or onnxruntime (after `medxai export RUN`)")
    predict.add_argument("--resume", action="store_true",
                         help="continue an interrupted job: keep --out's results, predict only the inputs not in them")
    _add_hash_names(predict)
    _add_ood_action(predict)
    _add_inference_options(predict)
    _add_engine_options(predict)

    explain = commands.add_parser("explain", help="write Grad-CAM overlays at each image's original resolution")
    explain.add_argument("run", help="run folder")
    explain.add_argument("images", nargs="+", help="image files or folders")
    explain.add_argument("--out", required=True, help="output folder for overlays")
    explain.add_argument("--method", help="heatmap method (default: gradcam): a CAM, or integrated_gradients, "
                         "gradientshap, occlusion, rise, lime, kernelshap")
    explain.add_argument("--layer", action="append",
                         help="module name(s) to explain at (default: the model's CAM layer)")
    explain.add_argument("--target", help="class name or index to explain (default: the label the model reports)")
    explain.add_argument("--colormap", help="matplotlib colormap (default: jet)")
    explain.add_argument("--alpha", type=float, help="heatmap opacity (default 0.4)")
    explain.add_argument("--npy", action="store_true", default=None, help="also save raw heatmaps as .npy")
    explain.add_argument("--json", action="store_true")
    explain.add_argument("--resume", action="store_true",
                         help="continue an interrupted job: explain only the inputs not yet in --out's predictions.csv")
    explain.add_argument("--tta", help="test-time augmentation views, comma-separated: hflip, vflip, shift "
                                       "(probabilities and maps averaged)")
    _add_hash_names(explain)
    _add_ood_action(explain)
    explain.add_argument("--dicom-sc", action="store_true",
                         help="for DICOM inputs, also write the overlay as a DICOM Secondary Capture (.dcm) in the "
                              "source's study, referencing the source; no patient data unless the next option")
    explain.add_argument("--dicom-sc-copy-patient", action="store_true",
                         help="copy the patient and study identification into the Secondary Capture (PHI!)")
    explain.add_argument("--dicom-sc-deidentify", action="store_true",
                         help="give each Secondary Capture a new study of its own, without references to the source")
    _add_inference_options(explain)
    _add_engine_options(explain)

    check_data = commands.add_parser("check-data", help="counts, unreadable files, duplicates within and across splits")
    check_data.add_argument("path", help="image folder, CSV manifest, .npz file or MedMNIST subset name")
    check_data.add_argument("--json", action="store_true", help="print the full result as JSON")
    check_data.add_argument("--out", help="also write the full result to this JSON file")
    check_data.add_argument("--near-threshold", type=int,
                            help="largest perceptual-hash distance (of 256 bits) for a near duplicate (default 24)")
    check_data.add_argument("--patient-pattern", help="regex giving the patient id from file names")
    check_data.add_argument("--split-folders", help=_SPLIT_FOLDERS_HELP)

    report = commands.add_parser("report", help="write a run's self-contained HTML report (train and demo do this too)")
    report.add_argument("run", help="run folder")
    report.add_argument("--out", help="HTML file to write (default: RUN/report.html)")

    ensemble = commands.add_parser(
        "ensemble", help="combine trained runs (same data and splits) into one ensemble run: the mean of their "
                         "probabilities, calibrated, evaluated, explained and reported like any run"
    )
    ensemble.add_argument("runs", nargs="+", help="two or more run folders")
    ensemble.add_argument("--name", required=True, help="name of the ensemble run")
    ensemble.add_argument("--out", help="parent folder of the ensemble run (default: runs)")
    ensemble.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    ensemble.add_argument("--overwrite", action="store_true", help="replace an existing run folder (medxai runs only)")

    compare = commands.add_parser(
        "compare", help="table of runs and evaluations: model, data, metrics with 95%% confidence intervals"
    )
    compare.add_argument("runs", nargs="+", help="run folders, or evaluation folders (RUN/evaluations/NAME)")
    compare.add_argument("--split", help="split to compare (default: test where present, else val)")
    compare.add_argument("--evaluations", action="store_true",
                         help="also a column for every evaluation of each run (RUN/evaluations/*)")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON")

    explain_eval = commands.add_parser(
        "explain-eval", help="faithfulness (deletion, insertion, ROAD vs random maps), sanity check and, where the data "
                             "has lesion masks or boxes, localisation (pointing game, IoU...) of explanation methods"
    )
    explain_eval.add_argument("run", help="run folder")
    explain_eval.add_argument("--data", required=True, help="image folder, CSV manifest, .npz or MedMNIST name")
    explain_eval.add_argument("--split", choices=("train", "val", "test", "all"), help="default: test")
    explain_eval.add_argument("--methods", help="comma-separated heatmap methods (default: gradcam; e.g. "
                              "gradcam,scorecam,integrated_gradients,rise)")
    explain_eval.add_argument("--max-images", type=int,
                              help="evaluate a seeded random subset of at most this many images (default 200)")
    explain_eval.add_argument("--steps", type=int, help="deletion/insertion steps (default 20)")
    explain_eval.add_argument("--baseline", choices=("blur", "mean"), help="what deleted pixels become (default: blur)")
    explain_eval.add_argument("--seed", type=int)
    explain_eval.add_argument("--masks", metavar="DIR|CSV",
                              help="lesion masks or boxes apart from the data: a folder of mask files named after the "
                                   "images, or a CSV (image column with mask paths or x0,y0,x1,y1 / x,y,w,h boxes; "
                                   "NIH's BBox_List_2017.csv as shipped)")
    explain_eval.add_argument("--layer", help="CAM layer(s), comma-separated to fuse several (default: the run's own)")
    explain_eval.add_argument("--no-faithfulness", dest="faithfulness", action="store_false", default=None,
                              help="skip deletion/insertion/ROAD and the sanity check: localisation and the shortcut "
                                   "alarm only")
    explain_eval.add_argument("--name", help="evaluation folder name for data other than the run's own")
    explain_eval.add_argument("--label-map", action="append", metavar="DATA=MODEL", help=_LABEL_MAP_HELP)
    explain_eval.add_argument("--split-folders", help=_SPLIT_FOLDERS_HELP)
    _add_inference_options(explain_eval)
    explain_eval.add_argument("--json", action="store_true", help="print explain_metrics.json")

    serve = commands.add_parser("serve", help="serve a run over HTTP: an API, a page at /, metrics, an audit log")
    serve.add_argument("run", help="run folder")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; anything else needs --token-file)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    serve.add_argument("--backend", help="torch (default) or onnxruntime (predict only; `medxai export` first)")
    serve.add_argument("--max-batch", type=int, help="most requests in one forward pass (default 16)")
    serve.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 10)")
    serve.add_argument("--queue", type=int, help="most requests admitted at once; more get 503 (default 64)")
    serve.add_argument("--timeout-s", type=float, help="a request waiting longer gets 504 (default 30)")
    serve.add_argument("--token-file", help="file holding the bearer token every /v1 request must carry")
    serve.add_argument("--max-upload-mb", type=float, help="largest upload in MB (default 64)")
    serve.add_argument("--max-pixels", type=int, help="most pixels of a decoded image (default 50,000,000)")
    serve.add_argument("--max-voxels", type=int,
                       help="most voxels of a decoded volume or multi-frame upload (default 64,000,000)")
    serve.add_argument("--max-decoded-mb", type=float,
                       help="most memory decoding one upload may take, judged from its header (default 256)")
    serve.add_argument("--max-decodes", type=int, help="uploads decoded at once; others wait (default 2)")
    serve.add_argument("--decode-budget-mb", type=float,
                       help="decode memory of all uploads being decoded together (default 512)")
    serve.add_argument("--cors-origin", action="append", dest="cors_origins",
                       help="a browser origin allowed to call the API (repeatable; default: CORS off)")
    serve.add_argument("--audit-db", help="SQLAlchemy URL or SQLite file (default: RUN/serve/audit.sqlite)")
    serve.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="NAME",
                       help="a Host name to answer besides loopback names and --host (repeatable; '*': any)")
    serve.add_argument("--header-timeout-s", type=float,
                       help="time a client has to send its request headers (default 10)")
    serve.add_argument("--read-timeout-s", type=float,
                       help="longest pause in an upload, and the grace before --min-upload-rate applies (default 10)")
    serve.add_argument("--min-upload-rate", type=float,
                       help="bytes per second an upload must average after the grace (default 16384)")
    serve.add_argument("--max-connections-per-client", type=int,
                       help="requests in progress from one address; more get 429 (default 8; 0: no cap)")
    serve.add_argument("--receive-budget-mb", type=float,
                       help="upload MB held at once by requests being received; more get 503 (default 256)")
    serve.add_argument("--worker-threads", type=int, help="threads that decode and encode (default 4)")
    serve.add_argument("--malloc-arenas", type=int,
                       help="glibc malloc arenas of the process, large buffers mapped apart (default 2; 0: glibc's "
                       "own defaults)")
    serve.add_argument("--allow-unfinished", action="store_true", default=None, help=_ALLOW_UNFINISHED_HELP)

    audit = commands.add_parser("audit", help="print a service's audit log, or export it as CSV/JSON")
    audit.add_argument("run", help="run folder")
    audit.add_argument("--audit-db", help="SQLAlchemy URL or SQLite file (default: RUN/serve/audit.sqlite)")
    audit.add_argument("--limit", type=int, help="only the newest N records")
    audit.add_argument("--format", choices=["csv", "json", "jsonl"], help="export format (with --out)")
    audit.add_argument("--out", help="write the records to this file")

    export = commands.add_parser("export", help="export a run's network (ONNX) with a parity check")
    export.add_argument("run", help="run folder")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="onnx")
    export.add_argument("--out", help="file to write (default: RUN/model.onnx)")
    export.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED_HELP)
    export.add_argument("--images", nargs="+", help="images for the parity check (default: the run's own "
                                                     "validation images)")

    commands.add_parser("models", help="list the registered architectures")
    commands.add_parser("presets", help="list the configuration presets")
    return parser


_LABEL_MAP_HELP = "map a data label to a model label when their names differ beyond case/spaces/_/- (repeatable)"
_ALLOW_UNFINISHED_HELP = ("use a run whose training stopped before the end (no metrics.json: it may lack calibration, "
                          "threshold and domain guard)")
_SPLIT_FOLDERS_HELP = (
    "which top-level folder is which split, e.g. 'train=Training,test=Testing' (other folders left out), or 'none' "
    "to read every top-level folder as a class (default: recognised by name)"
)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-map", action="append", metavar="DATA=MODEL", help=_LABEL_MAP_HELP)
    parser.add_argument("--split-folders", help=_SPLIT_FOLDERS_HELP)
    parser.add_argument("--patient-pattern", help="regex giving the patient id from file names")


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int,
                        help="images per forward pass (default: the run's training batch size)")
    parser.add_argument("--allow-unfinished", action="store_true", default=None, help=_ALLOW_UNFINISHED_HELP)


def _add_hash_names(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hash-names", action="store_true",
                        help="name inputs by a pseudonym in every output (CSV, JSON, files, console, skipped list, "
                             "log): for file names that hold patient data; set MEDXAI_HASH_KEY to key the hash")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process (default); ray: Ray Data with an actor pool "
                             "(pip install 'medxai[ray]')")
    parser.add_argument("--ray-address",
                        help="with --engine ray: an existing cluster, such as auto or ray://head:10001 (default: a "
                             "local instance on loopback); the run, the inputs and --out on a shared file system")
    parser.add_argument("--actors", type=int,
                        help="with --engine ray: actors in the pool (default: one per GPU, else one per CPU core)")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    _configure_logging(arguments.verbose)
    try:
        return _COMMANDS[arguments.command](arguments)
    except MedxaiError as error:
        _print_error(error)
        return 2
    except OSError as error:  # a folder that cannot be written, a disk that is full: the user's to fix
        _print_error(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
        return 2
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]; a training run can continue with --resume")
        return 130


def _print_error(error: Any) -> None:
    """``error: <message>`` as one line on stderr (never wrapped nor broken, so it can be grepped and read whole)."""
    errors.print("[bold red]error:[/] ", end="")
    errors.print(" ".join(str(error).split()), highlight=False, markup=False, soft_wrap=True)


def _configure_logging(verbose: bool) -> None:
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("medxai").setLevel(logging.DEBUG if verbose else logging.INFO)


# -- commands ------------------------------------------------------------------------------------------------------
def _run_demo(arguments: argparse.Namespace) -> int:
    from medxai.config import load_config
    from medxai.jobs.train import train_run

    overrides = list(arguments.overrides) + _overrides({"name": DEMO_NAME, "out_dir": arguments.out,
                                                        "train.device": arguments.device})
    config = load_config("demo", overrides)
    started = time.perf_counter()
    run_dir = train_run(config, overwrite=True)
    _print_metrics_table(run_dir, title=f"PneumoniaMNIST, {config.model.name} (cf. the founding paper's Table 1)")
    console.print(f"run folder: [bold]{run_dir}[/]  ({time.perf_counter() - started:.0f} s)")
    _print_report_path(run_dir)
    return 0


def _run_train(arguments: argparse.Namespace) -> int:
    from medxai.config import RunConfig, load_config
    from medxai.jobs.train import resume_config, train_run
    from medxai.train.distributed import from_environment

    overrides = list(arguments.overrides) + _overrides({
        "data.source": arguments.data, "data.positive_label": arguments.positive_label,
        "model.name": arguments.model, "model.pretrained": arguments.pretrained, "model.weights": arguments.weights,
        "train.epochs": arguments.epochs, "train.batch_size": arguments.batch_size, "train.lr": arguments.lr,
        "preprocess.size": arguments.size, "train.device": arguments.device, "train.seed": arguments.seed,
    })
    if arguments.resume:
        if arguments.preset:
            raise ConfigError("--resume continues a run from its own config.yaml; drop --preset/--config")
        defaults = RunConfig()
        run_dir = Path(arguments.out or defaults.out_dir) / (arguments.name or defaults.name)
        config = resume_config(run_dir, overrides)
    else:
        config = load_config(arguments.preset, overrides + _overrides({"name": arguments.name,
                                                                        "out_dir": arguments.out}))
    run_dir = train_run(config, resume=arguments.resume, overwrite=arguments.overwrite)
    if not from_environment().is_main:  # under torchrun, rank 0 speaks for the job
        return 0
    _print_metrics_table(run_dir, title=f"{config.data.source}, {config.model.name}")
    console.print(f"run folder: [bold]{run_dir}[/]")
    _print_report_path(run_dir)
    return 0


def _run_evaluate(arguments: argparse.Namespace) -> int:
    from medxai.jobs.evaluate import evaluate_run

    options = {"split": arguments.split} if arguments.split else {}
    result = evaluate_run(
        arguments.run, arguments.data, **options, name=arguments.name, label_map=arguments.label_map,
        split_folders=_split_folders(arguments.split_folders), patient_pattern=arguments.patient_pattern,
        inference=_inference(arguments),
    )
    evaluation = result.evaluation
    if arguments.json:
        print(json.dumps({evaluation.split: evaluation.metrics, "evaluation": result.info}, indent=2))
    else:
        _print_metrics_table(result.folder.path, splits=[evaluation.split],
                             title=f"{result.info['kind']} evaluation: {arguments.data} ({result.info['selection']})")
        console.print(f"evaluation folder: [bold]{result.folder.path}[/]")
    return 0


def _add_ood_action(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ood-action", choices=("mark", "skip"), default="mark",
                        help="inputs the domain guard marks out of domain: keep them, marked (default), or list them "
                             "in skipped.csv instead of predicting")


def _domain_cell(prediction: Any) -> str:
    if prediction.in_domain is None:
        return "-"
    return "yes" if prediction.in_domain else "[bold red]NO: OUT OF DOMAIN[/]"


def _check_engine(arguments: argparse.Namespace, unsupported: Mapping[str, bool]) -> None:
    """Refuse the Ray options without ``--engine ray``, and with it the options given in ``unsupported`` (option ->
    whether it was given): those :func:`~medxai.jobs.ray_batch.predict_with_ray` cannot express. What it can
    express, it checks itself."""
    if arguments.engine != "ray":
        given = [name for name, value in (("--ray-address", arguments.ray_address), ("--actors", arguments.actors))
                 if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)}: only with --engine ray")
        return
    refused = [name for name, given in unsupported.items() if given]
    if refused:
        raise ConfigError(f"--engine ray does not support {', '.join(refused)}; leave "
                          f"{'it' if len(refused) == 1 else 'them'} out or use --engine local")


def _run_on_ray(arguments: argparse.Namespace, *, explain: Any = None, target: int | str | None = None) -> int:
    """``predict``/``explain`` ``--engine ray``: :func:`~medxai.jobs.ray_batch.predict_with_ray` (imported here: the
    ray extra is optional) and a short summary; the results are in ``--out``'s files."""
    from medxai.jobs.ray_batch import predict_with_ray

    inference = _inference(arguments)
    result = predict_with_ray(arguments.run, arguments.images, arguments.out, address=arguments.ray_address,
                              actors=arguments.actors, batch_size=inference.batch_size, device=inference.device,
                              hash_names=arguments.hash_names, ood_action=arguments.ood_action, explain=explain,
                              target=target, resume=arguments.resume, allow_unfinished=inference.allow_unfinished)
    summary = (f"{result.predicted} {'explained' if explain is not None else 'predicted'}, "
               f"{len(result.skipped)} skipped, {result.inputs} inputs")
    if explain is not None:
        summary += f", {result.overlays} overlay(s) written"
    if result.actors:
        each = f"{result.gpus_per_actor:g} GPU each" if result.gpus_per_actor else "CPU"
        summary += f", on {result.actors} Ray actor(s) ({each})"
    console.print(summary, highlight=False)
    if result.files:
        console.print(f"{result.predicted} prediction(s) in {', '.join(str(path) for path in result.files)}")
    _print_skipped(result.skipped)
    return 0 if result.predicted or not result.inputs else 1


def _run_predict(arguments: argparse.Namespace) -> int:
    from medxai.explain.tta import parse_tta
    from medxai.jobs.predict import predict_files

    _check_engine(arguments, {
        "--json": arguments.json,
        "--tta (on Ray only explain takes it)": bool(parse_tta(arguments.tta)),
        f"--backend {arguments.backend}": arguments.backend not in (None, "torch"),
    })
    if arguments.engine == "ray":
        if arguments.out is None:
            raise ConfigError("predict --engine ray needs --out: the folder that receives predictions.csv, "
                              "skipped.csv and predictions.parquet")
        return _run_on_ray(arguments)

    def print_json(predictions, skipped) -> None:  # as they are made: nothing accumulates
        for prediction in predictions:
            print(json.dumps(prediction.to_dict()), flush=True)
        for name, reason in skipped:
            print(json.dumps({"id": name, "skipped": reason}), flush=True)

    result = predict_files(arguments.run, arguments.images, out=arguments.out, hash_names=arguments.hash_names,
                           inference=_inference(arguments), ood_action=arguments.ood_action,
                           tta=parse_tta(arguments.tta), backend=arguments.backend or "torch",
                           resume=arguments.resume, keep=not (arguments.json or arguments.out),
                           on_results=print_json if arguments.json else None)
    if arguments.json:
        return 0 if result.done or not result.inputs else 1
    label_names = result.classifier.label_names
    table = Table(title=f"{result.done} predicted, {len(result.skipped)} skipped, {result.inputs} inputs")
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    for name in label_names:
        table.add_column(f"p({name})", justify="right")
    table.add_column("in domain")
    # In-domain predictions first, out-of-domain ones after them: never mixed in one list unmarked.
    ordered = sorted(result.predictions, key=lambda item: item.in_domain is False)
    for prediction in ordered[:_TABLE_ROWS]:
        table.add_row(prediction.id, prediction.label,
                      *(f"{prediction.probabilities[name]:.3f}" for name in label_names), _domain_cell(prediction))
    if result.predictions:
        console.print(table)
    if len(ordered) > _TABLE_ROWS:
        console.print(f"... and {len(ordered) - _TABLE_ROWS} more (--out writes them all, --json prints them)")
    if result.files:
        console.print(f"{result.done} prediction(s) in {', '.join(str(path) for path in result.files)}")
    flagged = sum(item.in_domain is False for item in result.predictions)
    if flagged:
        console.print(f"[bold red]{flagged} input(s) are OUT OF DOMAIN[/]: unlike the training images; their "
                      "predictions should not be trusted (domain_reasons in --json / predictions.csv)")
    _print_skipped(result.skipped)
    return 0 if result.done or not result.inputs else 1


def _run_explain(arguments: argparse.Namespace) -> int:
    from medxai.config import ExplainConfig, with_values
    from medxai.jobs.predict import DicomOutput, explain_files

    _check_engine(arguments, {"--json": arguments.json, "--dicom-sc": arguments.dicom_sc,
                              "--dicom-sc-copy-patient": arguments.dicom_sc_copy_patient,
                              "--dicom-sc-deidentify": arguments.dicom_sc_deidentify})
    target = arguments.target
    if target is not None and target.isdigit():
        target = int(target)
    from medxai.explain.tta import parse_tta

    explain = with_values(ExplainConfig(), method=arguments.method, layer=arguments.layer,
                          colormap=arguments.colormap, alpha=arguments.alpha, save_npy=arguments.npy,
                          tta=list(parse_tta(arguments.tta)) or None)
    if arguments.engine == "ray":
        return _run_on_ray(arguments, explain=explain, target=target)
    dicom = DicomOutput(arguments.dicom_sc, arguments.dicom_sc_copy_patient, arguments.dicom_sc_deidentify)
    result = explain_files(arguments.run, arguments.images, arguments.out, explain=explain, target=target,
                           hash_names=arguments.hash_names, dicom=dicom, inference=_inference(arguments),
                           ood_action=arguments.ood_action, resume=arguments.resume)
    if arguments.json:
        for item in result.explained:
            print(json.dumps({**item.prediction.to_dict(), "overlay": str(item.overlay),
                              "explained_label": item.target_label, "method": item.method}))
        for name, reason in result.skipped:
            print(json.dumps({"id": name, "skipped": reason}))
    else:
        table = Table(title=f"{result.done} explained, {len(result.skipped)} skipped, {result.inputs} inputs "
                            f"-> {arguments.out}")
        for column in ("image", "prediction", "explained", "overlay", "in domain"):
            table.add_column(column, overflow="fold")
        ordered = sorted(result.explained, key=lambda entry: entry.prediction.in_domain is False)
        for item in ordered[:_TABLE_ROWS]:
            table.add_row(item.prediction.id, item.prediction.label, item.target_label, item.overlay.name,
                          _domain_cell(item.prediction))
        console.print(table)
        if len(ordered) > _TABLE_ROWS:
            console.print(f"... and {len(ordered) - _TABLE_ROWS} more (predictions.csv in {arguments.out})")
        _print_skipped(result.skipped)
    return 0 if result.done or not result.inputs else 1


def _run_check_data(arguments: argparse.Namespace) -> int:
    from medxai.data import open_source
    from medxai.data.check import check_data, check_data_table, interpretation_lines
    from medxai.run_folder import check_output_location

    if arguments.out:
        check_output_location(arguments.out, inputs=[arguments.path])
    source = open_source(arguments.path, patient_pattern=arguments.patient_pattern,
                         split_folders=_split_folders(arguments.split_folders))
    if not arguments.json:  # the interpretation first, before the (long) decoding of every file
        for line in interpretation_lines(source):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    options = {"near_threshold": arguments.near_threshold} if arguments.near_threshold is not None else {}
    result = check_data(source, **options)
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
    from medxai.run_folder import RunFolder, check_output_location

    own_report = RunFolder(arguments.run).report_path
    if arguments.out and Path(arguments.out).resolve() != own_report.resolve():
        check_output_location(arguments.out, runs=[arguments.run])
    path = build_report(arguments.run, arguments.out)
    console.print(f"report: [bold]{path}[/] ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _run_compare(arguments: argparse.Namespace) -> int:
    from medxai.report.compare import compare_runs, comparison_table

    rows = compare_runs(arguments.runs, split=arguments.split, evaluations=arguments.evaluations)
    if arguments.json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(comparison_table(rows, title="runs compared (value, 95% CI)"))
    return 0


def _run_ensemble(arguments: argparse.Namespace) -> int:
    from medxai.jobs.ensemble import build_ensemble

    started = time.perf_counter()
    run_dir = build_ensemble(arguments.runs, name=arguments.name, out_dir=arguments.out or "runs",
                             overwrite=arguments.overwrite, device=arguments.device)
    _print_metrics_table(run_dir, title=f"ensemble of {len(arguments.runs)} runs")
    console.print(f"run folder: [bold]{run_dir}[/]  ({time.perf_counter() - started:.0f} s)")
    _print_report_path(run_dir)
    return 0


def _run_explain_eval(arguments: argparse.Namespace) -> int:
    from medxai.config import ExplainEvalConfig, with_values
    from medxai.jobs.explain_eval import evaluate_explanations
    from medxai.run_folder import EvaluationFolder

    methods = [name.strip() for name in arguments.methods.split(",") if name.strip()] if arguments.methods else None
    layers = [name.strip() for name in arguments.layer.split(",") if name.strip()] if arguments.layer else None
    settings = with_values(ExplainEvalConfig(), methods=methods, max_images=arguments.max_images,
                           steps=arguments.steps, baseline=arguments.baseline, seed=arguments.seed,
                           layer=layers[0] if layers and len(layers) == 1 else layers,
                           faithfulness=arguments.faithfulness)
    options = {"split": arguments.split} if arguments.split else {}
    document = evaluate_explanations(
        arguments.run, arguments.data, **options, settings=settings, name=arguments.name,
        label_map=arguments.label_map, split_folders=_split_folders(arguments.split_folders),
        inference=_inference(arguments), ground_truth=arguments.masks,
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
        if "random_baseline" not in entry:
            continue
        chance = entry["random_baseline"]
        cells = [f"{entry[key]:.4f} ({chance[key]:.4f})" for key in ("deletion_auc", "insertion_auc", "road_morf",
                                                                     "road_lerf")]
        sanity = "passed" if entry["sanity_check"]["passed"] else "[red]FAILED[/]"
        table.add_row(name, *cells, sanity, f"{entry['seconds']:.0f}")
    console.print(table)
    if document.get("localization"):
        console.print(_localization_table(document))
    console.print(f"written: [bold]{EvaluationFolder(document['folder']).explain_metrics_path}[/]")
    return 0


def _localization_table(document: dict) -> Table:
    """Does the heatmap point at the lesion? One row per method and outcome, means with 95 % intervals."""
    facts = document["localization"]
    table = Table(title=f"localisation on {facts['lesion_images']} images with a lesion mask "
                        f"({facts['empty_mask_images']} without a lesion reported apart in the JSON)")
    columns = (("pointing_game", "pointing game"), ("energy_pointing_game", "energy pointing game"),
               ("iou_otsu", "IoU at Otsu"), ("iou_top10", "IoU top 10 %"), ("pixel_auprc", "pixel AUPRC"))
    for column in ("method", "images", *(title for _, title in columns)):
        table.add_column(column, justify="left" if column in ("method", "images") else "right")
    for name, entry in document["methods"].items():
        lesion = (entry.get("localization") or {}).get("lesion") or {}
        for outcome in ("correct", "wrong"):
            values = lesion.get(outcome)
            if not values:
                continue
            cells = []
            for key, _ in columns:
                value = values.get(key) or {}
                interval = value.get("interval")
                cells.append("-" if value.get("mean") is None else f"{value['mean']:.3f}" + (
                    f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""))
            table.add_row(name, f"{outcome} ({(values.get('pointing_game') or {}).get('n', 0)})", *cells)
    return table


def _run_presets(arguments: argparse.Namespace) -> int:
    from medxai.config import list_presets, preset_path

    for name in list_presets():
        first_line = preset_path(name).read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{name}[/]: {first_line}")
    return 0


def _run_serve(arguments: argparse.Namespace) -> int:
    from medxai.config import ServeConfig, with_values
    from medxai.serve.app import run_server

    config = with_values(ServeConfig(), **{name: getattr(arguments, name) for name in (
        "host", "port", "device", "backend", "max_batch", "max_wait_ms", "queue", "timeout_s", "token_file",
        "max_upload_mb", "max_pixels", "max_voxels", "max_decoded_mb", "max_decodes", "decode_budget_mb",
        "cors_origins", "audit_db", "allowed_hosts", "header_timeout_s", "read_timeout_s", "min_upload_rate",
        "max_connections_per_client", "receive_budget_mb", "worker_threads", "malloc_arenas",
        "allow_unfinished")})
    run_server(arguments.run, config, log_level="debug" if arguments.verbose else "info")
    return 0


def _run_audit(arguments: argparse.Namespace) -> int:
    from medxai.run_folder import RunFolder, check_output_location
    from medxai.serve.audit import audit_url, export_audit, read_audit, summarize_audit

    database = arguments.audit_db or RunFolder(arguments.run).audit_db_path
    url = audit_url(database)
    if arguments.out:
        is_file = "://" not in str(database)  # a SQLite file, not a database server's URL
        check_output_location(arguments.out, inputs=[database] if is_file else [], runs=[arguments.run])
        count = export_audit(url, arguments.out, arguments.format or Path(arguments.out).suffix.lstrip(".") or "csv",
                             limit=arguments.limit)
        console.print(f"{count} audit record(s) written to {arguments.out}")
        return 0
    rows = read_audit(url, limit=arguments.limit or 20)
    table = Table(title=f"the newest {len(rows)} audit record(s)")
    for column in ("time", "endpoint", "status", "outcome", "label", "in_domain", "latency_ms", "input_sha256"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(column) is None else str(row[column]) for column in (
            "time", "endpoint", "status", "outcome", "label", "in_domain", "latency_ms", "input_sha256")))
    console.print(table)
    console.print_json(json.dumps(summarize_audit(read_audit(url))))
    return 0


def _run_export(arguments: argparse.Namespace) -> int:
    from medxai.jobs.export import export_run

    options = {"opset": arguments.opset} if arguments.opset is not None else {}
    result = export_run(arguments.run, format=arguments.format, out=arguments.out, images=arguments.images,
                        overwrite=arguments.overwrite, allow_unfinished=arguments.allow_unfinished, **options)
    parity = result.parity
    console.print(f"wrote {result.path} and {result.card_path}; parity on {parity['n']} image(s) "
                  f"({parity.get('images', 'real')}): max |logit difference| {parity['max_abs_logit_diff']:.2e}, "
                  f"argmax identical: {parity['argmax_identical']}")
    return 0


_COMMANDS = {
    "serve": _run_serve,
    "audit": _run_audit,
    "export": _run_export,
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
    "ensemble": _run_ensemble,
}


# -- helpers -------------------------------------------------------------------------------------------------------
def _overrides(values: Mapping[str, Any]) -> list[str]:
    """``section.key=value`` overrides for the options that were given (None: left to the config's default)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def _inference(arguments: argparse.Namespace):
    from medxai.config import InferenceConfig, with_values

    return with_values(InferenceConfig(), device=arguments.device, batch_size=arguments.batch_size,
                       allow_unfinished=arguments.allow_unfinished)


def _split_folders(text: str | None) -> dict[str, str] | None:
    """``--split-folders 'train=Training,test=Testing'`` (or ``none``) as ``data.split_folders`` takes it."""
    if text is None:
        return None
    if text.strip().lower() in ("none", "{}", ""):
        return {}
    folders = {}
    for item in text.split(","):
        split, separator, folder = item.partition("=")
        if not separator or not split.strip() or not folder.strip():
            raise ConfigError(f"--split-folders {text!r}: expected SPLIT=FOLDER[,SPLIT=FOLDER...] or 'none'")
        folders[split.strip()] = folder.strip()
    return folders


def _print_report_path(run_dir: Path) -> None:
    from medxai.run_folder import RunFolder

    console.print(f"report: [bold]{RunFolder(run_dir).report_path}[/] (open it in a browser)")


def _print_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        table = Table(title=f"skipped {len(skipped)} file(s)", title_style="yellow")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for path, reason in skipped:
            table.add_row(path, reason)
        console.print(table)


def _print_metrics_table(folder: Path, title: str, splits: Sequence[str] | None = None) -> None:
    """A table like the founding paper's Table 1: accuracy, precision, recall, F1, plus AUC, sens., spec."""
    from medxai.run_folder import EvaluationFolder

    metrics = EvaluationFolder(folder).read_metrics()
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
