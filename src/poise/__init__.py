"""poise: pick instruction-tuning data that is influential and balanced across capabilities.

The public API: load an attribution matrix, select from it, analyse and report the selection.
"""

from __future__ import annotations

__version__ = "0.1.0"

from poise.attribution import AttributionMatrix, load_attribution  # noqa: E402
from poise.errors import PoiseError, PoiseWarning  # noqa: E402
from poise.selection import METHODS, Selection, read_selection, select, write_selection  # noqa: E402

__all__ = [
    "METHODS",
    "AttributionMatrix",
    "PoiseError",
    "PoiseWarning",
    "Selection",
    "__version__",
    "load_attribution",
    "read_selection",
    "select",
    "write_selection",
]
