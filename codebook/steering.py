"""Steering on the torch side: a :class:`~codebook.steering_spec.Steering` becomes, per codebook
site, the :class:`~codebook.layer.LayerSteering` tensors that the layers read while a model runs.

What a steering is (codes, modes, positions, validation and the per-site arrays) is defined once,
torch-free, in :mod:`codebook.steering_spec`; its names are re-exported here for callers that
import them from this module. :meth:`codebook.modeling.CodebookModel.steer` applies the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from codebook.layer import CodebookLayer, LayerSteering
from codebook.steering_spec import (
    MODES,
    POSITIONS,
    CodeRef,
    Steering,
    parse_codes,
    preset_steering,
    steering_arrays,
)

__all__ = [
    "MODES",
    "POSITIONS",
    "CodeRef",
    "Steering",
    "layer_steerings",
    "parse_codes",
    "preset_steering",
    "row_steerings",
    "site_shapes",
    "steering_arrays",
]


def site_shapes(layers: Mapping[tuple[int, str], CodebookLayer]) -> list[dict]:
    """The codebooks ``layers`` as :func:`~codebook.steering_spec.steering_arrays` reads them."""
    return [{"layer": layer, "site": site, "groups": cb.groups, "num_codes": cb.num_codes,
             "k": cb.k} for (layer, site), cb in layers.items()]


def layer_steerings(steering: Steering,
                    layers: Mapping[tuple[int, str], CodebookLayer]) -> dict:
    """Per-site :class:`LayerSteering`, keyed like ``layers`` (``(layer, site)`` →
    :class:`CodebookLayer`), for the sites ``steering`` touches. Unknown sites and out-of-range
    ids raise ``ValueError``."""
    result = {}
    for key, (bias, scale) in steering_arrays(site_shapes(layers), steering).items():
        device = layers[key].codebook.device
        # An all-ones scale changes nothing: leaving it out keeps the op on its unscaled path.
        result[key] = LayerSteering(
            bias=torch.from_numpy(bias).to(device),
            scale=None if (scale == 1).all() else torch.from_numpy(scale).to(device),
            positions=steering.positions,
        )
    return result


def row_steerings(rows: Sequence[Steering | None],
                  layers: Mapping[tuple[int, str], CodebookLayer]) -> dict:
    """Per-site tuples with one :class:`LayerSteering` per batch row (``None``: the row is not
    steered there), for the sites some row's steering touches. Rows with equal steerings share
    their tensors, so that a layer snaps them together."""
    built: dict[str, dict] = {}
    per_row = []
    for steering in rows:
        if steering is None:
            per_row.append({})
            continue
        key = steering.to_json()
        if key not in built:
            built[key] = layer_steerings(steering, layers)
        per_row.append(built[key])
    touched = {key for sites in per_row for key in sites}
    return {key: tuple(sites.get(key) for sites in per_row) for key in layers if key in touched}
