"""Configuration as dataclasses, one per pipeline stage.

Each stage owns its defaults (commented here); presets in ``medxai/configs/*.yaml`` override them; command-line
options override the preset. Unknown keys are errors, never silently ignored. The resolved result is saved as
``config.yaml`` in the run folder and is enough to reproduce the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from medxai.errors import ConfigError

__all__ = [
    "DataConfig",
    "PreprocessConfig",
    "AugmentConfig",
    "ModelConfig",
    "TrainConfig",
    "ExplainConfig",
    "RunConfig",
    "InferenceConfig",
    "ExplainEvalConfig",
    "DomainConfig",
    "ServeConfig",
    "with_values",
    "load_config",
    "preset_path",
    "list_presets",
    "apply_overrides",
    "save_config",
    "build_config",
    "parse_yaml",
    "is_offline",
    "OFFLINE_ENV",
]

PRESET_DIR = Path(__file__).parent / "configs"

#: Set to anything but empty, 0, false or no, and medxai downloads nothing: neither data nor weights.
OFFLINE_ENV = "MEDXAI_OFFLINE"


def is_offline() -> bool:
    """Whether downloads are forbidden (``MEDXAI_OFFLINE``); hospitals are often offline, tests always are."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class DataConfig:
    """Where the images come from and how splits are made."""

    source: str = "pneumoniamnist"  # a folder, a .csv manifest, a .npz file or a MedMNIST subset name
    # Which top-level folder holds which split, e.g. {train: Training, test: Testing}; {} reads every top-level
    # folder as a class; None recognises split folders by name (train/training/train_set, val/valid/dev, test/...).
    split_folders: dict[str, str] | None = None
    # The positive (disease) class of a binary task; None chooses by whole words (pneumonia over normal, tumor over
    # no_tumor) and logs the choice. It drives sensitivity, specificity, P/R/F1, the threshold and the gallery.
    positive_label: str | None = None
    val_fraction: float = 0.1  # carved from train (stratified, grouped by patient) when the data has no val split
    # An official val split smaller than this, or than 5% of train, is merged into train and val carved instead
    # (the Kaggle chest X-ray set ships a 16-image val/): the best epoch, temperature and threshold need more.
    min_val_size: int = 100
    test_fraction: float = 0.0  # carved too when the data has no test split and this is > 0
    patient_pattern: str | None = None  # regex on file names; group 1 = patient id, used to group splits
    split_seed: int = 0  # seed of the carved splits (independent of the training seed)
    num_workers: int | None = None  # decoding processes; None: one per core (at most 8) for splits of 256+ images
    # Keep the preprocessed splits on disk (shard files keyed by the files and the preprocessing) so that
    # later runs, --resume, evaluate and explain-eval decode nothing; false keeps them in memory only.
    cache: bool = True
    cache_dir: str | None = None  # None: $MEDXAI_CACHE_DIR, else $XDG_CACHE_HOME/medxai, else ~/.cache/medxai
    cache_dtype: str = "uint16"  # the stored codes: "uint16" (any source) or "uint8" (half the bytes; 8-bit data)
    drop_test_duplicates: bool = False  # drop test images with an exact/near duplicate in train (data_check.json)
    near_duplicate_bits: int = 24  # largest pHash distance (of 256 bits) of a near duplicate; < 0 turns it off


@dataclass
class PreprocessConfig:
    """Deterministic preprocessing, identical for training, evaluation, prediction and serving."""

    size: int = 28  # side of the square model input, pixels
    resize_mode: str = "stretch"  # "stretch" to the square, or "pad": keep aspect ratio, pad with black
    channels: int = 1  # 1 (grey models) or 3 (RGB models); grey inputs are replicated, colour turned to luminance
    intensity: str = "auto"  # "auto": uint8 / 255, other dtypes percentile-clipped; "dtype", "minmax", "percentile"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # used by "percentile" (and "auto" for non-uint8 images)
    denoise: str = "none"  # "none", "median" or "gaussian": applied at model resolution, after resizing
    median_kernel: int = 3  # odd kernel side of the median filter
    gaussian_sigma: float = 0.8  # standard deviation of the Gaussian filter, pixels
    normalize: str = "dataset"  # "dataset": mean/std measured on the train split; "fixed": the values below; "none"
    mean: list[float] | None = None  # per-channel mean (filled in from train data when normalize == "dataset")
    std: list[float] | None = None  # per-channel std (likewise)


@dataclass
class AugmentConfig:
    """Random training-time augmentation, applied to batches on the training device."""

    enabled: bool = True
    rotation_degrees: float = 10.0  # uniform in [-r, r]
    scale: tuple[float, float] = (0.9, 1.1)  # isotropic zoom range
    translate: float = 0.05  # max shift as a fraction of the side
    shear_degrees: float = 0.0
    hflip: float = 0.0  # probability; off by default: chest films are not left-right symmetric (heart, labels)
    vflip: float = 0.0
    brightness: float = 0.1  # additive shift in [-b, b] on the [0, 1] intensity scale
    contrast: float = 0.1  # multiplicative factor in [1 - c, 1 + c] about the image mean
    gamma: float = 0.0  # log-uniform gamma in [exp(-g), exp(g)]; 0 turns it off
    noise_std: float = 0.0  # additive Gaussian noise on the [0, 1] scale


@dataclass
class ModelConfig:
    """Which network to build."""

    name: str = "simple_cnn"  # any name from `medxai models`
    pretrained: bool = False  # ImageNet weights (torchvision cache or `weights`); fails clearly when unavailable
    weights: str | None = None  # local weights file (.safetensors or a torchvision state dict) for offline use
    dropout: float = 0.25  # dropout before the classifier


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and stopping."""

    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero (Loshchilov & Hutter 2017)
    label_smoothing: float = 0.0
    # Weight the loss by inverse class frequency of the train split. It shifts every probability towards the rare
    # class (a re-weighted loss fits a re-weighted prior), which calibration then has to undo: prefer the plain loss
    # and let the validation-chosen threshold set the operating point.
    class_weighting: bool = False
    # Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): the loss sees
    # z + tau * log(prior) with the train split's class prior, so the network's own logits z learn the class-BALANCED
    # posterior; 0 turns it off. Unlike a re-weighted loss it keeps the probabilities a proper (balanced-prior)
    # posterior; the validation calibration ("bias" restores the validation prior, "temperature" keeps the balance).
    logit_adjustment: float = 0.0
    # Exponential moving average of the weights (and BatchNorm buffers), updated every step with this decay and
    # evaluated, selected and checkpointed instead of the raw weights (Polyak & Juditsky 1992; as in timm's
    # ModelEmaV2); 0 turns it off. It damps the epoch-to-epoch swings of validation accuracy.
    ema_decay: float = 0.0
    # Re-estimate BatchNorm statistics on un-augmented train batches before each validation (the running statistics
    # were gathered on augmented images); at most this many images, 0 turns it off.
    bn_recalibration_images: int = 0
    # Explanation-guided training on the train images that have a lesion mask or boxes (medxai.train.explanation_loss):
    # "none", "input_gradients" (Ross et al. 2017, "Right for the Right Reasons": squared input gradients of the
    # summed log-probabilities outside the lesion), "cam" (the share of the Grad-CAM energy at the run's CAM layer
    # outside the lesion) or "actdiff" (Viviano et al. 2021: the L2 distance between the CAM layer's activations of
    # the image and of its copy with everything outside the lesion at the normalised zero, relative to the image's
    # own; 10 moved a toy model off a shortcut). Images without ground truth, and normal images (empty mask), add
    # nothing.
    explanation_loss: str = "none"
    explanation_weight: float = 1.0  # lambda: the penalty's weight beside the classification loss
    monitor: str = "auto"  # validation metric for best checkpoint / early stopping: "auc", "accuracy", "loss", "auto"
    patience: int = 0  # epochs without improvement before stopping; 0 never stops early
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"...
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # NHWC weights and batches in training and evaluation (faster on CUDA and CPU)
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    # After training, on the VALIDATION split only (the test split never chooses anything):
    temperature_scaling: bool = True  # False: no calibration at all (whatever ``calibration`` says)
    # Post-hoc calibration fitted on validation: "temperature" (Guo et al. 2017), "bias" (temperature plus per-class
    # bias: Platt scaling of the log-odds for binary tasks), "vector" (per-class scale and bias) or "none".
    calibration: str = "temperature"
    threshold_method: str = "youden"  # binary operating point: "youden" (max J), "sensitivity" (target below), "argmax"
    target_sensitivity: float = 0.95  # the validation sensitivity to reach with threshold_method "sensitivity"
    bootstrap_resamples: int = 1000  # resamples for the 95% confidence intervals in metrics.json; 0 leaves them out


@dataclass
class ExplainConfig:
    """Heatmaps written at the end of training and by `medxai explain`."""

    method: str = "gradcam"
    # Module name, or a list of names whose normalised maps are averaged (LayerCAM-style fusion of a fine and a deep
    # stage, Jiang et al. 2021); None uses the model's declared CAM layer (docs/models.md gives each model's rule).
    # Set when training, it becomes the run's CAM layer (model card) and the layer train.explanation_loss "cam" trains.
    layer: str | list[str] | None = None
    colormap: str = "jet"
    alpha: float = 0.4  # heatmap opacity over the image
    per_outcome: int = 3  # demo/train gallery: images per outcome (TP, FP, FN, TN) for binary tasks
    save_npy: bool = False  # also save raw maps as .npy
    # Test-time augmentation of `medxai explain`: views among hflip, vflip, shift (medxai.explain.tta) whose
    # probabilities and maps are averaged with the original's; [] turns it off. Flips only suit models trained with
    # them (a mirrored chest film is not a chest film).
    tta: list[str] = field(default_factory=list)


@dataclass
class DomainConfig:
    """The out-of-domain guard fitted at the end of training (:mod:`medxai.evaluate.domain`)."""

    enabled: bool = True
    # Share of in-domain inputs the feature score may flag, extrapolated from the validation scores with a normal
    # tail (1e-4: about 3.7 standard deviations); lower flags fewer in-domain inputs and fewer of the others.
    false_alarm_rate: float = 1e-4
    shrinkage: float = 0.01  # weight of the scaled identity in each stage's covariance
    max_train_images: int = 20000  # a seeded random subset of train fits the Gaussians when train is larger
    # DICOM values the model is for, beside those its training DICOM files carry (e.g. [CR, DX] and [CHEST] for
    # chest films exported as PNG); empty: only the training files' values are checked, if any.
    modalities: list[str] = field(default_factory=list)
    body_parts: list[str] = field(default_factory=list)


@dataclass
class InferenceConfig:
    """How a trained run is applied to new images (predict, explain, evaluate, explain-eval)."""

    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"...
    # Images per forward pass; None: the run's own training batch size, so that re-evaluating its splits gives
    # bit-identical logits (a convolution's float sums depend on the batch it runs in).
    batch_size: int | None = None
    # Use a run whose training was stopped before it finished (no metrics.json: no calibration, threshold or
    # domain guard may have been fitted); refused by default, since its probabilities mean less than they say.
    allow_unfinished: bool = False


@dataclass
class ServeConfig:
    """``medxai serve``: where it listens, how it batches, what it accepts (see ``docs/serve.md``)."""

    host: str = "127.0.0.1"  # loopback: anywhere else needs token_file
    port: int = 8000
    device: str = "auto"
    backend: str = "torch"  # "torch", or "onnxruntime" (predict only) after `medxai export RUN --format onnx`
    max_batch: int = 16  # most requests of one kind in one forward (and one backward for explain)
    # How long the first request of a batch may wait for company; it waits only while more admitted requests are
    # on their way (being read or decoded), so a lone request on an idle server does not wait at all.
    max_wait_ms: float = 10.0
    queue: int = 64  # most requests admitted at once (waiting or running); more get 503 with Retry-After
    timeout_s: float = 30.0  # a request waiting longer than this gets 504
    token_file: str | None = None  # a file holding the bearer token every /v1 request must carry
    max_upload_mb: float = 64.0  # most bytes one upload may have
    max_pixels: int = 50_000_000  # most pixels one decoded image may have (PIL.Image.MAX_IMAGE_PIXELS)
    # Decoding limits of one upload, tighter than batch jobs' (medxai.data.readers.limits): a volume's or multi-frame
    # object's voxels, and the memory decoding may take, estimated from the header before decoding (more: 413).
    max_voxels: int = 64_000_000
    max_decoded_mb: float = 256.0
    max_decodes: int = 2  # uploads decoded at once; the others wait (up to timeout_s, then 504)
    decode_budget_mb: float = 512.0  # estimated decode memory of all uploads being decoded together
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API; none: CORS off
    audit_db: str | None = None  # SQLAlchemy URL or SQLite path; None: <run>/serve/audit.sqlite
    explanations_kept: int = 64  # overlays kept for GET /v1/explanations/{id} (overlay=url), newest first
    explanations_ttl_s: float = 600.0  # and for at most this long
    channels_last: bool = True  # NHWC weights and inputs on the CPU (faster convolutions; Classifier.use_channels_last)
    allow_unfinished: bool = False  # serve a run whose training stopped before the end (no metrics.json)
    # Host header names answered besides loopback names and the bound address (DNS rebinding); "*": any name.
    allowed_hosts: list[str] = field(default_factory=list)
    # Slow clients: a connection must send its request line and headers within header_timeout_s; an upload may not
    # pause longer than read_timeout_s and, after that grace, must arrive at min_upload_rate bytes/s on average
    # (408). A request counts against `queue` only once its body is in.
    header_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    min_upload_rate: float = 16384.0
    max_connections_per_client: int = 8  # requests in progress from one client address; more get 429 (0: no cap)
    receive_budget_mb: float = 256.0  # upload bytes held at once by requests still being received; more get 503
    worker_threads: int = 4  # threads that decode uploads and encode answers (each keeps a malloc arena)
    # glibc malloc arenas of the `medxai serve` process, with large buffers mapped apart (serve.server.tune_malloc);
    # 0: glibc's own defaults (8 arenas per core)
    malloc_arenas: int = 2


@dataclass
class ExplainEvalConfig:
    """`medxai explain-eval`: how faithfulness and sanity of the CAM methods are measured."""

    methods: list[str] = field(default_factory=lambda: ["gradcam"])  # CAM method names
    max_images: int = 200  # a seeded random subset of at most this many images is evaluated
    steps: int = 20  # deletion/insertion steps
    baseline: str = "blur"  # what deleted pixels become: "blur" or "mean"
    seed: int = 0  # image subset, random heatmaps, ROAD noise, re-initialisation order
    batch_size: int = 64  # images per forward pass
    sanity_images: int = 32  # images in the model-randomisation sanity check
    # Deletion/insertion/ROAD against random maps and the sanity check; False measures localisation against masks
    # and the shortcut alarm alone (a quick look, e.g. to choose a layer on validation).
    faithfulness: bool = True
    # The layer(s) the CAM methods explain (a module name or a list, whose normalised maps are averaged); None uses
    # the run's own CAM layer (model_card.json's cam_layer). Input-attribution methods ignore it.
    layer: str | list[str] | None = None


@dataclass
class RunConfig:
    """Everything that defines a run."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        return _build(cls, values, "config")


T = TypeVar("T")


def _plain(value: Any) -> Any:
    """Tuples to lists, so that YAML and JSON hold plain types."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def build_config(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build the config dataclass ``cls`` from a mapping (YAML or JSON), rejecting unknown keys and coercing types.

    Args:
        cls: a dataclass of this module.
        values: its keys and values.
        where: what the mapping is, for error messages (``"config"``, ``"model card preprocess"``).

    Raises:
        ConfigError: an unknown key (with a suggestion) or a value of the wrong type.
    """
    return _build(cls, values, where)


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and coercing simple types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in set(values) - known)  # YAML keys may be numbers, dates, None...
    if unknown:
        hint = difflib.get_close_matches(unknown[0], known, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}{suggestion}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value or {}, where)
    origin, args = get_origin(annotation), get_args(annotation)
    if value is None:
        if type(None) in args or annotation is Any:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if args and type(None) in args:  # Optional[X] or X | Y | None: the first alternative that takes the value
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:
            try:
                return _coerce(alternative, value, where)
            except ConfigError:
                continue
        return _coerce(inner[-1], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{train: Training}}, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, where) for k, v in value.items()}
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in {"true", "yes", "1", "on"}:
                    return True
                if lowered in {"false", "no", "0", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            if isinstance(value, (dict, list, tuple, set)):  # str() of a structure is never the text meant
                raise TypeError(value)
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {_short(value)} is not a valid {annotation.__name__}") from None
    return value


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about values read from files."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def with_values(config: T, **values: Any) -> T:
    """A copy of the dataclass ``config`` with the given fields set; None values are skipped, so a command line's
    unset options (None) keep the dataclass defaults."""
    chosen = {key: value for key, value in values.items() if value is not None}
    unknown = sorted(set(chosen) - {item.name for item in fields(config)})
    if unknown:
        raise ConfigError(f"{type(config).__name__}: unknown option(s) {unknown}")
    return dataclasses.replace(config, **chosen)


def list_presets() -> list[str]:
    """Names of the presets shipped with medxai."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``kermany``) or a YAML path to a file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}'; known presets: {list_presets()}")
    return path


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a configuration never needs ``*name``, and aliases let a few lines of
    text expand into structures exponentially larger (the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML (plain values only: no Python tags, no aliases).

    Args:
        text: what the user wrote (a ``--set`` value, a preset file, a run's ``config.yaml``).
        where: what the text is, for the error message.

    Raises:
        ConfigError: not valid YAML, a tag or an alias, or nesting too deep to parse; one line saying where.
    """
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506  a SafeLoader, stricter still
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(error)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The problem of a YAML error in one line, with its line and column."""
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{position}".split())


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML: :func:`parse_yaml`) to a nested mapping, in place.

    Raises:
        ConfigError: an override without ``=``, a value that is not valid YAML, or a key below a value.
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like section.key=value")
        dotted, raw = override.split("=", 1)
        target = values
        *parents, leaf = dotted.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override '{override}': '{parent}' is not a section")
        target[leaf] = parse_yaml(raw, f"--set {dotted.strip()}")
    return values


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the preset file, then ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        path = preset_path(preset)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
        loaded = parse_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values = loaded
    apply_overrides(values, overrides or [])
    return RunConfig.from_dict(values)


def save_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
