"""Defenses against robust overfitting, each a `Defense` that touches only the
engine's hooks. Importing this package registers the built-in ones."""

from defenses import aroid, awp, cure, dom, dom_da, fomo, hr, idbh, lap, rwp  # noqa: F401
from defenses.base import Defense, DefenseCard, list_defenses, register_defense
from defenses.registry import build_defenses, resolve_defense

__all__ = ["Defense", "DefenseCard", "build_defenses", "list_defenses", "register_defense",
           "resolve_defense"]
