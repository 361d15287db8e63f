"""The one exception type every stage raises for mistakes a user can fix."""


class UserError(Exception):
    """A bad path, a wrong model for an index, an empty collection...: printed without a traceback."""
