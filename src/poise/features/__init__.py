"""Gradient features for LESS-style influence (docs/design.md §2.3): the Adam map and random projections.

`adam_direction` maps a training example's gradient to the direction an Adam step would take;
`make_projector` builds the (seed, parameter name, shape)-determined map that reduces per-example
gradients to d dimensions, one parameter at a time.
"""

from __future__ import annotations

from poise.features.precondition import adam_direction
from poise.features.projection import (
    SCHEME,
    NoProjector,
    Projector,
    RademacherProjector,
    SJLTProjector,
    make_projector,
)

__all__ = [
    "SCHEME",
    "NoProjector",
    "Projector",
    "RademacherProjector",
    "SJLTProjector",
    "adam_direction",
    "make_projector",
]
