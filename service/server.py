"""Running the service: one uvicorn process, one worker (one model and one index per GPU).

`run(settings)` is the entry point for `sbir serve` and for anything else that starts the service
(e.g. `sbir demo`); it blocks until the server is stopped (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import logging

from model.ground.errors import UserError
from service.settings import Settings

LOG = logging.getLogger(__name__)


def make_server(settings: Settings):
    """A configured `uvicorn.Server` for the app (not started): `server.run()` or `await server.serve()`."""
    import uvicorn

    from service.app import create_app
    from service.http_protocol import head_deadline_protocol

    if not settings.snapshot_root.is_dir():
        raise UserError(f"snapshot root {settings.snapshot_root} is not a directory")
    logging.getLogger("service").setLevel(settings.log_level.upper())
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,  # never more: each worker would load its own model and index
        log_level=settings.log_level,
        lifespan="on",
        http=head_deadline_protocol(settings.request_timeout_s),  # slow request heads get 408
        timeout_graceful_shutdown=10,
        # Clients are benchmarks and browsers on the same host or behind a proxy the operator runs.
        proxy_headers=False,
    )
    return uvicorn.Server(config)


def run(settings: Settings) -> None:
    """Serve until stopped. Raises UserError when the snapshot root does not exist."""
    server = make_server(settings)
    LOG.info("serving %s on http://%s:%d", settings.snapshot_root, settings.host, settings.port)
    server.run()
