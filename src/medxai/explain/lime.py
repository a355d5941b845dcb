"""LIME over superpixels: a sparse linear surrogate of the score, fitted to superpixels switched on and off.

Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any Classifier", KDD 2016
(arXiv:1602.04938), Eq. 1-2: sample binary vectors ``z'`` over the interpretable features (here superpixels), score
the image with the switched-off superpixels replaced by a reference, and fit a linear model ``g`` that minimises

    sum_z  pi_x(z) (f(z) - g(z'))^2  +  Omega(g)

with a locality kernel ``pi_x``. Computed by Captum's ``Lime`` with its defaults (uniform Bernoulli(0.5) coalitions,
an exponential kernel of width 1 on the cosine distance between the image and its perturbed copy) except for the
surrogate: ridge regression with ``alpha=1`` (scikit-learn), the default of the authors' ``lime`` package, instead of
Captum's Lasso (``alpha=0.01``), whose penalty zeroes every coefficient, and so the whole map, whenever the score
varies by less than about 0.01 over the coalitions (an unsure model, a probability target).

Superpixels, seeds, batching, the map and 3D: see :class:`~medxai.explain._attribution.SuperpixelAttribution`
(SLIC, 50 segments, 256 samples per image).
"""

from __future__ import annotations

from medxai.explain._attribution import RowScorer, SuperpixelAttribution

__all__ = ["LIME"]


class LIME(SuperpixelAttribution):
    """LIME (Ribeiro et al., KDD 2016) over SLIC superpixels through Captum, called like a CAM.

    Args: see :class:`~medxai.explain._attribution.SuperpixelAttribution`.
    """

    def explainer(self, scorer: RowScorer):
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr import Lime

        return Lime(scorer, interpretable_model=SkLearnRidge(alpha=1.0))
