"""The network as an ONNX graph, and an ONNX Runtime model that stands in for it when predicting.

:func:`export_onnx` writes a graph that takes the NORMALISED input batch ``input`` ``(B, C, S, S)`` float32 (the
batch axis dynamic) and returns ``logits`` ``(B, K)`` plus one output per stage layer (``model.stage_layers``)
holding that stage's statistics ``(B, 2C)`` exactly as :func:`~medxai.models.features.stage_statistics` computes
them. The statistics are part of the graph so that the out-of-domain guard (:mod:`medxai.evaluate.domain`) reads them
from the SAME forward pass that predicts, as it does with PyTorch. Preprocessing and calibration stay outside the
graph: they are the model card's, applied by the classifier for either backend.

:class:`OnnxModel` runs such a file with ONNX Runtime and behaves like the network where prediction needs it
(``model(batch) -> logits``, stage statistics through :meth:`OnnxModel.capture`); :func:`parity` measures how far
the two backends differ on a batch.

``onnx`` and ``onnxruntime`` are the optional extra ``medxai[onnx]``: they are imported only when needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medxai.errors import CheckpointError, ConfigError
from medxai.models.card import ModelCard
from medxai.models.features import StageCapture, capture_stage_statistics

__all__ = [
    "INPUT_NAME",
    "LOGITS_NAME",
    "ONNX_OPSET",
    "OnnxModel",
    "export_mismatches",
    "export_onnx",
    "file_sha256",
    "parity",
]

logger = logging.getLogger(__name__)

#: The ONNX operator set the graph is written for (explicit, so that a new PyTorch does not change the file).
ONNX_OPSET = 18
INPUT_NAME = "input"
LOGITS_NAME = "logits"
_INSTALL_HINT = "pip install 'medxai[onnx]'"


def _require(module: str) -> Any:
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"ONNX export and the onnxruntime backend need {module}: {_INSTALL_HINT}") from None


class _WithStageStatistics(nn.Module):
    """The network returning ``(logits, *stage statistics)``: the stage hooks run inside ``forward``, so the exporter
    traces the very :func:`~medxai.models.features.stage_statistics` the PyTorch backend computes, and the hooks are
    gone again when the forward returns (the wrapped model is not changed)."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        with capture_stage_statistics(self.model, self.layers) as capture:
            logits = self.model(images).float()
        return (logits, *(capture.batches[layer][0] for layer in self.layers))


def export_onnx(
    model: nn.Module,
    card: ModelCard,
    path: str | Path,
    *,
    opset: int = ONNX_OPSET,
    example_batch: int = 2,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX graph with its stage statistics as extra outputs (see the module docstring).

    The dynamo exporter (``torch.export``) is tried first; an architecture it cannot capture falls back to the
    TorchScript exporter, and the facts say which one wrote the file. The example batch has at least two images:
    ``torch.export`` specialises a dimension of size 1, which would fix the batch axis.

    Args:
        model: the network (a registered architecture or an ensemble); it is exported in eval mode and left in the
            mode it was in.
        card: its model card (input side and channels).
        path: the ``.onnx`` file to write (weights inside it, not beside it).
        opset: the ONNX operator set.
        example_batch: images in the example input used for tracing (>= 2).

    Returns:
        The export's facts: opset, exporter, input and output names, stage layers, torch version.

    Raises:
        ConfigError: ``onnx`` is not installed, a bad ``example_batch``, or neither exporter can write this
            architecture (the message names it).
    """
    onnx = _require("onnx")
    _require("onnxscript")  # the dynamo exporter's translator; without it only the fallback would ever run
    if example_batch < 2:
        raise ConfigError(f"example_batch must be at least 2 (a batch of 1 would fix the batch axis), got "
                          f"{example_batch}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = list(getattr(model, "stage_layers", ()))
    output_names = [LOGITS_NAME, *layers]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.randn(example_batch, card.in_chans, card.input_size, card.input_size, device=device)
    wrapper = _WithStageStatistics(model, layers)
    was_training = model.training
    wrapper.eval()  # the model inside too
    try:
        exporter = _export(wrapper, example, path, opset, output_names, card.architecture)
    finally:
        model.train(was_training)
    written = onnx.load(str(path), load_external_data=False)
    written_opset = next((item.version for item in written.opset_import if item.domain in ("", "ai.onnx")), None)
    facts = {
        "format": "onnx",
        "opset": written_opset,
        "exporter": exporter,
        "input": INPUT_NAME,
        "input_shape": ["batch", card.in_chans, card.input_size, card.input_size],
        "outputs": [output.name for output in written.graph.output],
        "stage_layers": layers,
        "architecture": card.architecture,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }
    logger.info("exported %s to %s (%s exporter, opset %s, %d stage outputs)", card.architecture, path, exporter,
                written_opset, len(layers))
    return facts


def _export(wrapper: nn.Module, example: Tensor, path: Path, opset: int, output_names: list[str],
            architecture: str) -> str:
    """Run the dynamo exporter, else the TorchScript one; return the name of the one that wrote ``path``."""
    try:
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=output_names, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
            verbose=False,
        )
        return "dynamo"
    except Exception as error:  # noqa: BLE001  the exporter raises many kinds; the fallback says what failed
        dynamo_error = _first_line(error)
        logger.warning("the dynamo ONNX exporter failed for %s (%s); trying the TorchScript exporter", architecture,
                       dynamo_error)
    path.unlink(missing_ok=True)
    try:
        with warnings.catch_warnings():  # its deprecation notice is not news to a user who did not choose it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=output_names, dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
            )
        return "torchscript"
    except Exception as error:  # noqa: BLE001  as above
        path.unlink(missing_ok=True)
        raise ConfigError(
            f"{architecture} cannot be exported to ONNX: the dynamo exporter failed ({dynamo_error}) and so did the "
            f"TorchScript exporter ({_first_line(error)})"
        ) from None


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message``: the exporters' messages run to pages of diagnostics."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class OnnxModel:
    """An exported ``.onnx`` file run by ONNX Runtime, used where the classifier uses the network.

    ``model(batch)`` returns float32 logits on the batch's device; :meth:`capture` records the stage statistics of
    the forward passes inside it, as :func:`~medxai.models.features.capture_stage_statistics` does for PyTorch.

    Args:
        path: a file written by :func:`export_onnx`.
        device: ``cuda`` uses ONNX Runtime's CUDA provider when it is installed (else the CPU, with a warning).
        threads: intra-op threads; None uses ``torch.get_num_threads()`` (the same budget as PyTorch).
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", threads: int | None = None) -> None:
        onnxruntime = _require("onnxruntime")
        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's concern
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                logger.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on the CPU")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # noqa: BLE001  onnxruntime's exception types are not importable by name
            raise CheckpointError(f"{self.path}: not a readable ONNX model ({error})") from None
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        if LOGITS_NAME not in self.output_names:
            raise CheckpointError(f"{self.path}: no {LOGITS_NAME!r} output; not a medxai export")
        self.stage_layers = tuple(name for name in self.output_names if name != LOGITS_NAME)
        self._captures: list[StageCapture] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, providers={self.providers})"

    def __call__(self, batch: Tensor) -> Tensor:
        """``(B, K)`` float32 logits of a normalised ``(B, C, S, S)`` batch, on the batch's device."""
        inputs = batch.detach().float().cpu().contiguous().numpy()
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: inputs})))
        for capture in self._captures:
            for layer in capture.layers:
                capture.batches[layer].append(torch.from_numpy(outputs[layer]).to(batch.device))
        return torch.from_numpy(outputs[LOGITS_NAME]).to(batch.device)

    @contextlib.contextmanager
    def capture(self, layers: Sequence[str] | None = None) -> Iterator[StageCapture]:
        """Record the statistics of ``layers`` (default: every exported stage) on every call inside the block."""
        layers = list(self.stage_layers if layers is None else layers)
        missing = [layer for layer in layers if layer not in self.stage_layers]
        if missing:
            raise ConfigError(f"{self.path} has no stage output(s) {missing}; it has {list(self.stage_layers)}")
        capture = StageCapture(layers)
        self._captures.append(capture)
        try:
            yield capture
        finally:
            self._captures.remove(capture)

    # The few nn.Module calls the classifier makes on its model: the session's device is chosen when it is built.
    def eval(self) -> OnnxModel:
        return self

    def to(self, *_args: object, **_kwargs: object) -> OnnxModel:
        return self


def parity(model: nn.Module, onnx_model: OnnxModel, batch: Tensor) -> dict[str, Any]:
    """How far the ONNX Runtime model is from the PyTorch one on ``batch`` (normalised inputs), both in float32.

    Returns:
        ``max_abs_logit_diff``, ``max_abs_stage_diff`` (over every exported stage), ``argmax_identical``, ``n``, and
        the scales the differences are to be read against: ``max_abs_logit`` and ``max_abs_stage`` (PyTorch's).
    """
    layers = list(onnx_model.stage_layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_stage_statistics(model, layers) as torch_stages:
            torch_logits = model(batch).float()
    finally:
        model.train(was_training)
    with onnx_model.capture(layers) as onnx_stages:
        onnx_logits = onnx_model(batch)
    expected, found = torch_stages.first(), onnx_stages.first()
    return {
        "max_abs_logit_diff": (torch_logits - onnx_logits).abs().max().item(),
        "max_abs_stage_diff": max(((expected[layer] - found[layer]).abs().max().item() for layer in layers),
                                  default=0.0),
        "argmax_identical": bool(torch.equal(torch_logits.argmax(dim=1), onnx_logits.argmax(dim=1))),
        "n": int(batch.shape[0]),
        "max_abs_logit": torch_logits.abs().max().item(),
        "max_abs_stage": max((expected[layer].abs().max().item() for layer in layers), default=0.0),
    }


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file (the weights an export was made from), read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def export_mismatches(exported: dict[str, Any], card: ModelCard, weights: str | Path | None) -> list[str]:
    """Why an export's card (``model.onnx.json``) does not belong to a run's card and weights; [] when it does.

    Args:
        exported: the export's card: the run's card as it was, plus ``source_weights_sha256``.
        card: the run's model card now.
        weights: the run's weights file the export must have been made from (None or absent: not compared).
    """
    problems = []
    for key in ("architecture", "num_classes", "label_names"):
        if exported.get(key) != getattr(card, key):
            problems.append(f"{key} {exported.get(key)!r} vs the run's {getattr(card, key)!r}")
    if exported.get("preprocess") != card.to_dict()["preprocess"]:
        problems.append("another preprocessing (input size, channels or normalisation)")
    if (weights is not None and Path(weights).is_file()
            and exported.get("source_weights_sha256") != file_sha256(weights)):
        problems.append(f"made from other weights than {Path(weights).name}")
    return problems
