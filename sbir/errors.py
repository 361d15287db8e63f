"""UserError, re-exported from the ground module (sbir_ground.errors) for code that still imports it
from here; new code imports sbir_ground.errors."""

from sbir_ground.errors import UserError

__all__ = ["UserError"]
