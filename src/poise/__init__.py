"""poise: pick instruction-tuning data that is influential and balanced across capabilities.

The public API: run the whole pipeline from a config (`run`), or load an attribution matrix, select from it,
analyse and report the selection.
"""

from __future__ import annotations

from poise.errors import PoiseError, PoiseWarning  # noqa: E402
from poise.matrix import AttributionMatrix, load_attribution  # noqa: E402
from poise.selection import METHODS, Selection, read_selection, select, write_selection  # noqa: E402
from poise.version import __version__  # noqa: E402 - a leaf module


def run(config, **options):  # noqa: ANN001, ANN201 - the signature is pipeline.run's
    """Run the whole pipeline from a config file, a mapping or a `RunConfig` (see `poise.pipeline.run`)."""
    from poise.pipeline import run as run_pipeline

    return run_pipeline(config, **options)


__all__ = [
    "METHODS",
    "AttributionMatrix",
    "PoiseError",
    "PoiseWarning",
    "Selection",
    "__version__",
    "load_attribution",
    "read_selection",
    "run",
    "select",
    "write_selection",
]
