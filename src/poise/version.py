"""poise's version: a leaf module, so that no module inside the package imports the package root for it."""

from __future__ import annotations

__version__ = "0.1.0"
