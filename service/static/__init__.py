"""The drawing page served at GET / (see service.routes.page); data files only."""
