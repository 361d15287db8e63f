"""UserError, re-exported from the ground module (model.ground.errors) for code that still imports it
from here; new code imports model.ground.errors."""

from model.ground.errors import UserError

__all__ = ["UserError"]
