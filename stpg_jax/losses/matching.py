"""Prototype-to-anchor matching: Hungarian assignment on the host, gathered anchors on the device.
DESIGN.md §3 "Matching"."""

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def hungarian_assignment(prototypes, anchors):
    """σ maximising Σ_c cos(P_c, A_σ(c)) over all classes. prototypes, anchors: (C, D). Host function (forces a
    device-to-host copy); returns np.ndarray int32 (C,) with σ[c] = index of class c's anchor."""
    p = np.asarray(prototypes, np.float64)
    a = np.asarray(anchors, np.float64)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    rows, cols = linear_sum_assignment(p @ a.T, maximize=True)
    sigma = np.empty(p.shape[0], np.int32)
    sigma[rows] = cols
    return sigma


def assigned_anchors(anchors, assignment):
    """A_σ(c) for every class: anchors (C, D), assignment (C,) int → (C, D). A gather; pass the assignment as an
    array argument of the jitted step so a new matching does not recompile."""
    return jnp.take(jnp.asarray(anchors), jnp.asarray(assignment, jnp.int32), axis=0)
