"""One router per resource: search, photos, operations (health, metrics, info), admin, the drawing page."""
