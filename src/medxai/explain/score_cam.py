"""Score-CAM: channel weights from the model's score on the input masked by each channel's activation map.

Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks", CVPR Workshops 2020
(arXiv:1910.01279), Eq. 4-8: each channel ``A^k`` is upsampled to the input size and min-max normalised to a mask
``H^k`` in [0, 1]; the model scores the masked input ``X (.) H^k``; the scores weight the channels:

    s_k = S(f(X (.) H^k))        w = softmax_k(s)        L = relu(sum_k w_k A^k)

with ``S`` the explained target (a class logit by default, as the CAM target of every other method). No gradients:
Score-CAM runs on models whose gradients are unusable, at the price of one forward pass per channel and image,
batched here over channels and images (``batch_size`` masked images per forward), on the model's device.

Choices and deviations:

* The channel softmax (``channel_softmax=True``) follows pytorch-grad-cam's ``ScoreCAM``. The authors' released code
  instead weights each channel by the target's softmax *probability* on its masked input, without a softmax over
  channels: ``ScoreCAM(model, channel_softmax=False)`` with ``target=SoftmaxProbabilityTarget(k)`` reproduces that.
  The paper's baseline term ``f(X_b)`` is the same for every channel; it cancels in the channel softmax and shifts
  the weights uniformly otherwise, so it is left out, as in both implementations.
* Masks are upsampled (bi/tri)linearly with ``align_corners=False``, as the maps of every medxai method and the
  authors' code; pytorch-grad-cam uses ``align_corners=True`` (``UpsamplingBilinear2d``): pass
  ``mask_align_corners=True`` to reproduce its maps. The mask normalisation ``(A - min) / (max - min + 1e-8)``
  is the one of both implementations (a constant channel gives an all-zero mask).
* The masked inputs of a sample are scored for the class the sample's map explains: the predicted class of the
  unmasked forward pass (not each masked input's own prediction) when the target is the predicted class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medxai.errors import ConfigError
from medxai.explain.base import BaseCAM, CAMContext, _as_logits, weighted_channel_sum

__all__ = ["ScoreCAM"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_MASK_EPS = 1e-8


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al., CVPR-W 2020): gradient-free, channels weighted by the score of masked inputs.

    Args:
        model: see :class:`~medxai.explain.base.BaseCAM`.
        target_layers: see :class:`~medxai.explain.base.BaseCAM`.
        batch_size: masked images per forward pass (memory vs. speed).
        channel_softmax: weights are the softmax over channels of the masked scores (True, pytorch-grad-cam) or the
            scores themselves (False, the authors' code when the target is a softmax probability).
        mask_align_corners: upsample the masks with ``align_corners=True`` (pytorch-grad-cam) instead of False.
        channels_last: see :class:`~medxai.explain.base.BaseCAM`.

    Raises:
        ConfigError: ``batch_size`` is not positive.
    """

    uses_gradients = False

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] | None = None,
        *,
        batch_size: int = 64,
        channel_softmax: bool = True,
        mask_align_corners: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__(model, target_layers, channels_last=channels_last)
        if int(batch_size) < 1:
            raise ConfigError(f"ScoreCAM batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.channel_softmax = bool(channel_softmax)
        self.mask_align_corners = bool(mask_align_corners)

    def combine(self, activations: Tensor, gradients: Tensor | None, context: CAMContext) -> Tensor:
        """``(B, C, *spatial)`` activations -> ``(B, *spatial)`` map, scoring ``B * C`` masked inputs."""
        scores = self.masked_scores(activations, context)
        weights = torch.softmax(scores, dim=1) if self.channel_softmax else scores
        return weighted_channel_sum(weights, activations)

    def masked_scores(self, activations: Tensor, context: CAMContext) -> Tensor:
        """The target's score on each input masked by each channel's normalised, upsampled map: ``(B, C)``."""
        batch_size, channels = activations.shape[:2]
        inputs = context.inputs
        target = _fixed_target(context.target, context.target_class)
        scores = torch.empty(batch_size, channels, device=activations.device, dtype=activations.dtype)
        per_forward = max(1, self.batch_size // batch_size)  # channels per forward; all samples of each channel
        with torch.no_grad():
            for start in range(0, channels, per_forward):
                stop = min(channels, start + per_forward)
                masks = self._masks(activations[:, start:stop], tuple(inputs.shape[2:]))  # (B, m, *size)
                # Channel-major blocks of B samples, so each block lines up with the batch the target expects.
                masked = (masks.transpose(0, 1).unsqueeze(2) * inputs.unsqueeze(0)).to(inputs.dtype)
                masked = masked.reshape((stop - start) * batch_size, *inputs.shape[1:])
                logits = torch.cat([
                    _as_logits(context.model(part), part.shape[0]) for part in masked.split(self.batch_size)
                ]).to(activations.dtype)
                for offset, block in enumerate(logits.split(batch_size)):
                    scores[:, start + offset] = target(block)
        return scores

    def _masks(self, maps: Tensor, size: tuple[int, ...]) -> Tensor:
        """``(B, m, *spatial)`` channel maps -> ``(B, m, *size)`` masks in [0, 1], min-max per sample and channel."""
        b, m = maps.shape[:2]
        mode = _MODES[len(size)]
        upsampled = F.interpolate(maps, size=size, mode=mode, align_corners=self.mask_align_corners)
        flat = upsampled.reshape(b, m, -1)
        low = flat.amin(dim=2, keepdim=True)
        high = flat.amax(dim=2, keepdim=True)
        return ((flat - low) / (high - low + _MASK_EPS)).reshape(b, m, *size)


def _fixed_target(target: Callable[[Tensor], Tensor], classes: Tensor) -> Callable[[Tensor], Tensor]:
    """A target that picks its class from the logits, frozen to the classes of the unmasked forward
    (:meth:`~medxai.explain.targets.Target.frozen`); any other target as it is."""
    frozen = getattr(target, "frozen", None)
    return frozen(classes) if callable(frozen) else target
