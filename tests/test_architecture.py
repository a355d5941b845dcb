"""The tree is the architecture: data flows one way through the stages, jobs compose them, the CLI calls jobs, and one
module owns the run folder's file names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medxai"

# Every top-level module or package of medxai, in the order data flows; a module may import only its own layer and
# the layers before it. The foundation (errors, config) comes first; run_folder sits between the model stage (whose
# card it reads and writes) and training; the Python surface (classifier) composes the stages for one model; jobs
# compose them for a command; the CLI calls jobs.
LAYERS = [
    {"errors", "__init__"},
    {"config"},
    {"data"},
    {"models"},
    {"run_folder"},
    {"train"},
    {"evaluate"},
    {"explain"},
    {"report"},
    {"classifier"},
    {"jobs"},
    {"serve"},
    {"cli", "__main__"},
]
RANK = {name: index for index, layer in enumerate(LAYERS) for name in layer}
STAGES = ("data", "models", "train", "evaluate", "explain", "report")

# The run folder's file and folder names: spelled in run_folder.py only.
RUN_FOLDER_NAMES = ("config.yaml", "model_card.json", "metrics.json", "data_check.json", "history.csv",
                    "skipped.csv", "report.html", "explain_metrics.json", "gallery.json", "evaluation.json",
                    "predictions.csv", "state.json", "best.safetensors", "last.safetensors", "state.safetensors",
                    "model.onnx", "model.onnx.json", "audit.sqlite", "predictions.parquet")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every medxai module imported anywhere in the file (inside functions too), resolved to its top-level name."""
    found = []
    package = ".".join(("medxai", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join([*base, *([node.module] if node.module else [])])]
            elif node.module:
                names = [node.module]
            if node.module in (None, "medxai") or names == ["medxai"]:
                names = [f"{names[0]}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "medxai" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_layer_of(path) for path in _modules()} - set(RANK))
    assert not unknown, f"add {unknown} to LAYERS in {__file__}"


def test_no_module_imports_a_later_layer():
    upward = []
    for path in _modules():
        mine = RANK[_layer_of(path)]
        for line, target in _imports(path):
            if target in RANK and RANK[target] > mine:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports medxai.{target}")
    assert not upward, "data must flow one way:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check above is not vacuous: a stage importing the jobs layer inside a function is found."""
    fake = tmp_path / "medxai"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from medxai.jobs.train import train_run\n"
                                          "    from .. import classifier\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _imports(fake / "data" / "bad.py") == [(2, "jobs"), (3, "classifier")]


def test_stages_do_not_import_jobs_or_the_classifier():
    offenders = [f"{path.relative_to(PACKAGE)} -> {target}" for path in _modules() if _layer_of(path) in STAGES
                 for _, target in _imports(path) if target in ("jobs", "classifier", "cli", "serve")]
    assert not offenders


@pytest.mark.parametrize("name", RUN_FOLDER_NAMES)
def test_only_run_folder_spells_a_run_folder_file_name(name):
    pattern = re.compile(rf"[\"'/]{re.escape(name)}[\"']")
    spelled = [str(path.relative_to(PACKAGE)) for path in _modules()
               if path.name != "run_folder.py" and pattern.search(path.read_text(encoding="utf-8"))]
    assert not spelled, f"{name} spelled outside run_folder.py: {spelled}"


def test_code_cites_no_file_outside_the_repository():
    citing = [str(path.relative_to(PACKAGE)) for path in _modules()
              if re.search(r"\.\./shared|DESIGN\.md|STYLE\.md", path.read_text(encoding="utf-8"))]
    assert not citing
    assert (PACKAGE.parents[1] / "docs" / "run-folder.md").is_file()
