"""KernelSHAP over superpixels: Shapley values of the superpixels, estimated by a weighted linear regression.

Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017 (arXiv:1705.07874), Theorem 2:
LIME's regression with the Shapley kernel

    pi(z') = (M - 1) / (C(M, |z'|) |z'| (M - |z'|))

over coalitions ``z'`` of ``M`` features and no penalty recovers the Shapley values. Computed by Captum's
``KernelShap``: coalitions sampled in proportion to the Shapley kernel (so the regression is unweighted), scored
with the switched-off superpixels replaced by the reference, fitted by least squares (scikit-learn).

Superpixels, seeds, batching, the map and 3D: see :class:`~medxai.explain._attribution.SuperpixelAttribution`
(SLIC, 50 segments, 256 samples per image: about five per superpixel; the estimate of each value is noisy below
that).
"""

from __future__ import annotations

from medxai.explain._attribution import RowScorer, SuperpixelAttribution

__all__ = ["KernelSHAP"]


class KernelSHAP(SuperpixelAttribution):
    """KernelSHAP (Lundberg & Lee, NeurIPS 2017) over SLIC superpixels through Captum, called like a CAM.

    Args: see :class:`~medxai.explain._attribution.SuperpixelAttribution`.
    """

    def explainer(self, scorer: RowScorer):
        from captum.attr import KernelShap

        return KernelShap(scorer)
