"""Hand-worked data shared by the CAM tests: a 4x4 input with mixed signs and the toy conv computed without torch."""

from __future__ import annotations

import numpy as np

# 4x4 single-channel input with mixed signs, so both toy channels have structure.
X2D = np.array(
    [
        [1.0, -2.0, 3.0, 0.5],
        [-1.0, 2.0, -0.5, 4.0],
        [0.0, 1.0, -3.0, 2.0],
        [2.0, -1.0, 1.0, -2.0],
    ],
    dtype=np.float32,
)


def toy_volume() -> np.ndarray:
    """A (3, 4, 4) volume built from X2D, for the 3D cases."""
    return np.stack([X2D, -0.5 * X2D[::-1], X2D.T])


def conv_by_hand(x: np.ndarray) -> np.ndarray:
    """The toy conv's pre-ReLU output, without torch: channel 0 is x, channel 1 is x[j] - x[j + 1]; (2, *x.shape)."""
    right = np.zeros_like(x)
    right[..., :-1] = x[..., 1:]  # x[..., j + 1], zero beyond the edge
    return np.stack([x, x - right])
