"""What the input-attribution methods share: the call contract of a CAM, scoring perturbed copies, maps, superpixels.

Integrated Gradients, GradientSHAP, Occlusion, RISE, LIME and KernelSHAP explain the INPUT, not a layer: they score
the model on many perturbed (or interpolated) copies of each image and attribute the score to pixels. Each is a
subclass of :class:`InputAttribution` that states only how it computes a ``(B, C, *spatial)`` attribution; the base
gives them the call of every CAM in medxai, ``method(model, target_layers)(inputs, target) -> CAMResult``:

1. one no-grad forward of the unperturbed batch gives the logits and the class each map explains (the target's
   :meth:`~medxai.explain.targets.Target.classes`; None = the predicted class);
2. the perturbed copies are scored for that SAME class with the target's own score kind
   (:meth:`~medxai.explain.targets.Target.frozen`, as Score-CAM does): a copy that flips the prediction still
   counts against the class being explained;
3. the ``(B, C, *spatial)`` attribution becomes a ``(B, *spatial)`` map (:func:`pixel_map`: the method's channel
   reduction and sign rule, see each method's docstring) and is min-max normalised per sample, as the CAMs are.

Captum's implementations (Kokhlikyan et al. 2020, arXiv:2009.07896) do the attribution where they are right; they
batch perturbed copies of several images into one forward and hand the forward function a per-row sample index
through ``additional_forward_args`` (:class:`RowScorer` turns it back into each row's score). Captum draws its random
numbers from the global torch and NumPy generators: :func:`seeded_global_generators` seeds both from the method's
``seed`` and restores the caller's state afterwards, so two calls give the same map and the caller's random stream
is left as it was. (Not thread-safe against other threads drawing from the global generators at the same moment.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain.base import CAMResult, _as_logits, _model_device, checked_call, normalize_per_sample
from medxai.explain.faithfulness import baseline_images
from medxai.explain.targets import TargetLike, target_classes

__all__ = [
    "InputAttribution",
    "RowScorer",
    "SuperpixelAttribution",
    "check_reference_kind",
    "pixel_map",
    "reference_images",
    "seeded_global_generators",
    "superpixels",
]

logger = logging.getLogger(__name__)

#: How a ``(B, C, *spatial)`` attribution becomes one value per pixel: ``sum`` over channels (per-element
#: attributions that add up, as Integrated Gradients' completeness), or ``mean`` (a value repeated on every channel
#: of a pixel, as occlusion windows and superpixels give).
ChannelReduction = Literal["sum", "mean"]
#: What the map keeps of the signed per-pixel value: ``absolute`` (evidence either way), ``positive`` (evidence for
#: the class only; negative values become 0) or ``signed`` (as it is; min-max then puts the most negative at 0).
Sign = Literal["absolute", "positive", "signed"]
#: What a removed or "absent" pixel becomes: ``zero`` (0 in the model's normalised space, i.e. the training data's
#: mean intensity), ``blur`` (a Gaussian blur of the image) or ``mean`` (the image's own per-channel mean).
ReferenceKind = Literal["zero", "blur", "mean"]


def pixel_map(attributions: Tensor, channels: ChannelReduction, sign: Sign) -> Tensor:
    """``(B, C, *spatial)`` attributions -> ``(B, *spatial)`` per-pixel map (:data:`ChannelReduction`, :data:`Sign`).

    Raises:
        ConfigError: an unknown reduction or sign.
    """
    if channels == "sum":
        per_pixel = attributions.sum(dim=1)
    elif channels == "mean":
        per_pixel = attributions.mean(dim=1)
    else:
        raise ConfigError(f"unknown channel reduction {channels!r}: use 'sum' or 'mean'")
    if sign == "absolute":
        return per_pixel.abs()
    if sign == "positive":
        return torch.relu(per_pixel)
    if sign == "signed":
        return per_pixel
    raise ConfigError(f"unknown sign rule {sign!r}: use 'absolute', 'positive' or 'signed'")


def reference_images(inputs: Tensor, kind: ReferenceKind) -> Tensor:
    """The reference ("absent") version of each image of ``(B, C, *spatial)`` inputs (see :data:`ReferenceKind`).

    ``blur`` and ``mean`` are those of deletion/insertion (:func:`~medxai.explain.faithfulness.baseline_images`:
    Gaussian sigma ``5 * max(spatial) / 224`` px).

    Raises:
        ConfigError: an unknown kind.
    """
    if check_reference_kind(kind) == "zero":
        return torch.zeros_like(inputs)
    return baseline_images(inputs, kind)


def check_reference_kind(kind: str) -> ReferenceKind:
    """``kind`` if it is a :data:`ReferenceKind`; raises ConfigError otherwise (at construction, not at a call)."""
    if kind not in ("zero", "blur", "mean"):
        raise ConfigError(f"unknown baseline {kind!r}: use 'zero', 'blur' or 'mean'")
    return kind  # type: ignore[return-value]


@contextlib.contextmanager
def seeded_global_generators(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's and NumPy's global generators with ``seed`` for the block; restore the caller's state after.

    Captum draws LIME's and KernelSHAP's coalitions and GradientSHAP's baselines, noise and interpolation points from
    them and takes no generator argument.
    """
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


class RowScorer:
    """Captum's forward function: ``(inputs (N, C, *spatial), sample_index (N,)) -> scores (N,)``.

    Captum stacks perturbed copies of several images into one forward and expands ``additional_forward_args``
    alongside (tiled for Integrated Gradients and Occlusion, interleaved for GradientSHAP's samples, one image at a
    time for LIME): passing each row's sample index there tells this scorer which image, and so which class, a row
    stands for, whatever the layout. The target, frozen to the classes of the unperturbed forward, expects a batch of
    the original size, so rows are scored in rounds of at most one row per image, the other images' rows filled with
    their unperturbed logits (a target scores each row from that row's logits alone, as every medxai target does).

    Args:
        model: the network.
        target: the frozen target, ``logits (B, K) -> scores (B,)``.
        reference_logits: ``(B, K)`` logits of the unperturbed batch.
    """

    def __init__(self, model: nn.Module, target: Callable[[Tensor], Tensor], reference_logits: Tensor) -> None:
        self.model = model
        self.target = target
        self.reference_logits = reference_logits

    def __call__(self, inputs: Tensor, sample_index: Tensor) -> Tensor:
        logits = _as_logits(self.model(inputs), inputs.shape[0])
        return self.scores(logits, sample_index.to(logits.device))

    def scores(self, logits: Tensor, sample_index: Tensor) -> Tensor:
        """The target's score of each row of ``logits (N, K)``, row ``j`` standing for image ``sample_index[j]``."""
        rank = _rank_within_group(sample_index)
        scores = logits.new_zeros(logits.shape[0])
        reference = self.reference_logits.to(device=logits.device, dtype=logits.dtype)
        for level in range(int(rank.max()) + 1 if rank.numel() else 0):
            rows = (rank == level).nonzero().squeeze(1)
            samples = sample_index[rows]
            # Out-of-place index_copy: the scores stay differentiable with respect to the rows' logits.
            filled = reference.index_copy(0, samples, logits[rows])
            scores = scores.index_copy(0, rows, self.target(filled)[samples].to(scores.dtype))
        return scores


def _rank_within_group(index: Tensor) -> Tensor:
    """For each position, how many earlier positions hold the same value (``[3, 1, 3, 3] -> [0, 0, 1, 2]``)."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.searchsorted(ordered, ordered, right=False)
    rank = torch.empty_like(index)
    rank[order] = torch.arange(index.numel(), device=index.device) - first
    return rank


def superpixels(image: Tensor, n_segments: int, compactness: float) -> Tensor:
    """SLIC superpixels (Achanta et al., IEEE TPAMI 34(11), 2012; scikit-image) of one ``(C, *spatial)`` image.

    The image is min-max rescaled to [0, 1] per channel first. A positive per-channel affine map cancels in that
    rescaling, so the segments are those of the de-normalised image, without knowing the model's mean and std.
    Channels are segmented as they are (no Lab conversion: 1-channel and 3-channel images are treated alike);
    ``compactness`` is on that [0, 1] intensity scale. The image is smoothed by a Gaussian of sigma 1 pixel first
    (scikit-image's ``sigma``): without it, speckle (ultrasound) or noise splits every cluster into fragments that the
    connectivity step merges back into a handful of segments (a 32 px noise image: 1 segment instead of 36; BUSI
    ultrasound at 224 px: 36-41 instead of 43-46, of 50 asked). 3D volumes get supervoxels. SLIC is deterministic.

    Returns:
        ``(*spatial)`` long labels ``0 .. S-1`` (consecutive), on the image's device.
    """
    from skimage.segmentation import slic  # scikit-image loads slowly; only LIME and KernelSHAP need it

    values = image.detach().float()
    flat = values.flatten(1)
    per_channel = (-1,) + (1,) * (values.ndim - 1)
    low, high = flat.amin(1).view(per_channel), flat.amax(1).view(per_channel)
    scaled = (values - low) / (high - low).clamp_min(1e-12)
    channels_last = np.moveaxis(scaled.cpu().numpy().astype(np.float64), 0, -1)
    labels = slic(channels_last, n_segments=int(n_segments), compactness=float(compactness), channel_axis=-1,
                  convert2lab=False, start_label=0, enforce_connectivity=True, sigma=1.0)
    _, consecutive = np.unique(labels, return_inverse=True)
    return torch.from_numpy(consecutive.reshape(labels.shape).astype(np.int64)).to(image.device)


class InputAttribution:
    """Base of the input-attribution methods: called like a CAM, ``method(inputs, target) -> CAMResult``.

    Subclasses implement :meth:`attribute` and set :attr:`channels` and :attr:`default_sign`. The model is never
    modified: no mode switch (call ``model.eval()`` first), no ``.grad`` written (gradients are taken with
    :func:`torch.autograd.grad` with respect to the inputs), no hook registered.

    Args:
        model: a network returning logits ``(B, K)`` (``(B,)`` is read as one logit).
        target_layers: ignored (these methods explain the input); accepted so that every method in
            :data:`medxai.explain.CAM_METHODS` is built alike.
        batch_size: images per forward pass of perturbed copies (memory vs. speed), on the model's device.
        seed: seed of every random draw, so that two calls give the same map.
        sign: override the method's sign rule (:data:`Sign`), e.g. ``"positive"`` for Integrated Gradients maps
            of the evidence FOR the class only.

    Raises:
        ConfigError: ``batch_size`` is not positive, or an unknown sign rule.
    """

    #: How channels are reduced and which sign is kept (:func:`pixel_map`); each method states its own.
    channels: ClassVar[ChannelReduction] = "sum"
    default_sign: ClassVar[Sign] = "absolute"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        batch_size: int = 64,
        seed: int = 0,
        sign: Sign | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"{type(self).__name__} batch_size must be positive, got {batch_size}")
        if sign is not None and sign not in ("absolute", "positive", "signed"):
            raise ConfigError(f"unknown sign rule {sign!r}: use 'absolute', 'positive' or 'signed'")
        self.model = model
        self.target_layers = target_layers
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sign: Sign = sign or self.default_sign
        self._warned_training_mode = False

    def attribute(self, inputs: Tensor, scorer: RowScorer) -> Tensor:
        """The ``(B, C, *spatial)`` attribution of each input element to its image's score.

        Args:
            inputs: ``(B, C, *spatial)`` detached batch on the model's device.
            scorer: Captum's forward function; pass ``additional_forward_args=(sample_index,)`` with
                ``sample_index = torch.arange(B)`` (or the index of the one image being explained).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement attribute")

    def __call__(self, inputs: Tensor, target: TargetLike = None) -> CAMResult:
        """Explain a batch.

        Args:
            inputs: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` preprocessed batch; moved to the model's device and not
                modified.
            target: None (each sample's predicted class), a class index, one class index per sample, or a
                callable ``logits (B, K) -> scores (B,)`` such as :class:`~medxai.explain.targets.DecisionTarget`.

        Returns:
            Maps in [0, 1] at the input's spatial size; ``raw_maps`` before the min-max normalisation; the logits
            of the unperturbed forward pass; the class each map explains.

        Raises:
            ConfigError: a bad target.
            ModelError: the model does not return a logits tensor.
        """
        target_fn = checked_call(self, inputs, target)
        # Integrated Gradients and GradientSHAP need a graph even when the caller runs under no_grad.
        with torch.inference_mode(False), torch.enable_grad():
            batch = inputs.detach().to(_model_device(self.model, inputs.device))
            if batch.is_inference():
                batch = batch.clone()  # inference tensors cannot take part in autograd
            with torch.no_grad():
                logits = _as_logits(self.model(batch), batch.shape[0]).detach()
                scores = target_fn(logits)
            if not isinstance(scores, Tensor) or scores.shape != (batch.shape[0],):
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ConfigError(f"a target must return one score per sample, shape ({batch.shape[0]},); "
                                  f"got {got}")
            classes = target_classes(target_fn, logits)
            frozen = getattr(target_fn, "frozen", None)
            scorer = RowScorer(self.model, frozen(classes) if callable(frozen) else target_fn, logits)
            attributions = self.attribute(batch, scorer).detach()
        with torch.no_grad():
            dtype = torch.promote_types(attributions.dtype, torch.float32)
            raw_maps = pixel_map(attributions.to(dtype), self.channels, self.sign)
            maps = normalize_per_sample(raw_maps)
        return CAMResult(maps=maps, raw_maps=raw_maps, logits=logits, target_class=classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, seed={self.seed})"


class SuperpixelAttribution(InputAttribution):
    """Base of LIME and KernelSHAP: a surrogate model of the score over superpixels switched on and off.

    Each image is segmented into about ``n_segments`` SLIC superpixels (:func:`superpixels`); Captum's explainer
    (:meth:`explainer`) samples ``n_samples`` coalitions, replaces the switched-off superpixels by the reference
    image, scores the copies (``batch_size`` per forward) and fits its surrogate; each superpixel's coefficient is
    painted on its pixels. Each image gets its own Captum call with its own segments (Captum's batched call would
    give every image the largest segment count of the batch), under global generators seeded with ``seed``, so an
    image's map does not depend on its batch and two calls give the same map.

    The coefficient is the same on every channel of a pixel (mean over channels); only positive coefficients are kept
    (evidence for the class), as LIME's and SHAP's image explanations show them (``positive_only=True`` in the
    ``lime`` package, the red superpixels of ``shap.image_plot``).

    3D volumes are segmented into SLIC supervoxels (``n_segments`` in the whole volume).

    Args:
        model: see :class:`InputAttribution`.
        target_layers: ignored.
        n_segments: the number of superpixels SLIC aims for (it may return a few more or fewer).
        compactness: SLIC's balance of intensity against space, on intensities rescaled to [0, 1] (0.1 weighs one
            grid interval like an intensity difference of 0.1; Lab's usual 10 on its 0-100 scale).
        n_samples: coalitions sampled per image.
        baseline: what a switched-off superpixel becomes: ``"zero"`` (Captum's default, the training mean),
            ``"blur"`` or ``"mean"``.
        batch_size: perturbed copies per forward.
        seed: seed of the coalitions.
        sign: override the map's sign rule (default ``"positive"``).

    Raises:
        ConfigError: ``n_segments`` or ``n_samples`` not positive, ``compactness`` not positive, an unknown baseline.
    """

    channels = "mean"
    default_sign = "positive"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        n_segments: int = 50,
        compactness: float = 0.1,
        n_samples: int = 256,
        baseline: ReferenceKind = "zero",
        batch_size: int = 64,
        seed: int = 0,
        sign: Sign | None = None,
    ) -> None:
        super().__init__(model, target_layers, batch_size=batch_size, seed=seed, sign=sign)
        if int(n_segments) < 1 or int(n_samples) < 1:
            raise ConfigError(f"{type(self).__name__} needs n_segments and n_samples of at least 1, got "
                              f"{n_segments} and {n_samples}")
        if not float(compactness) > 0:
            raise ConfigError(f"{type(self).__name__} compactness must be positive, got {compactness}")
        self.baseline = check_reference_kind(baseline)
        self.n_segments = int(n_segments)
        self.compactness = float(compactness)
        self.n_samples = int(n_samples)

    def explainer(self, scorer: RowScorer):
        """Captum's explainer over ``scorer`` (``captum.attr.Lime`` or ``KernelShap``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement explainer")

    def attribute(self, inputs: Tensor, scorer: RowScorer) -> Tensor:
        explainer = self.explainer(scorer)
        references = reference_images(inputs, self.baseline)
        attributions = []
        for index in range(inputs.shape[0]):
            segments = superpixels(inputs[index], self.n_segments, self.compactness)
            sample_index = torch.tensor([index], device=inputs.device)
            if int(segments.max()) == 0:
                # One superpixel (a tiny or flat image): its Shapley value (and an unpenalised surrogate's slope) is
                # the image's score minus the reference's; Captum's KernelSHAP has no kernel for a single feature.
                with torch.no_grad():
                    pair = torch.cat([inputs[index : index + 1], references[index : index + 1]])
                    first, second = scorer(pair, sample_index.repeat(2)).tolist()
                attributions.append(torch.full_like(inputs[index : index + 1], first - second))
                continue
            with seeded_global_generators(self.seed, inputs.device):
                attributions.append(explainer.attribute(
                    inputs[index : index + 1], baselines=references[index : index + 1],
                    feature_mask=segments[None, None], n_samples=self.n_samples,
                    perturbations_per_eval=min(self.batch_size, self.n_samples),
                    additional_forward_args=(sample_index,),
                ))
        return torch.cat(attributions)
