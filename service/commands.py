"""`sbir serve ROOT`: the search service on the snapshot that ROOT/CURRENT names.

Every flag has an `SBIR_*` environment variable (see service.settings); a flag given wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sbir.errors import UserError

# flag dest -> Settings field (same name); only flags the user gave override the environment
_FLAGS = (
    ("--host", str, "interface to bind (default 127.0.0.1; 0.0.0.0 for all)"),
    ("--port", int, "TCP port (default 8000; 0 picks a free one)"),
    ("--device", str, "encoder device: auto, cpu, cuda, cuda:N (default auto)"),
    ("--max-upload-bytes", int, "largest request body, 413 past it (default 8 MiB)"),
    ("--request-timeout", float, "seconds a client may take to send a request's head, and its body (default 30)"),
    ("--max-k", int, "largest k a client may ask for (default 100)"),
    ("--default-k", int, "k when the client gives none (default 24)"),
    ("--max-batch", int, "most sketches per forward pass (default 16)"),
    ("--max-wait-ms", float, "longest a sketch waits for others to batch with (default 4)"),
    ("--batch-workers", int, "batches in flight at once (default 2)"),
    ("--max-queue", int, "searches in progress before 503s (default 256)"),
    ("--decode-threads", int, "threads decoding uploads (default 2)"),
    ("--torch-threads", int, "encoder threads on the CPU, torch's or onnxruntime's (default: all cores)"),
    ("--cpu-runtime", str, "backbone on the CPU: auto, onnxruntime or torch (default auto)"),
    ("--cpu-precision", str, "backbone precision on the CPU: auto (the snapshot's), fp32 or int8 (default auto)"),
    ("--faiss-threads", int, "FAISS search threads (default 1)"),
    ("--reload-interval", float, "seconds between polls of ROOT/CURRENT, 0 to never poll (default 2)"),
    ("--max-thumbnail", int, "largest /photos thumbnail side (default 1024)"),
    (
        "--admin-token",
        str,
        "enable /admin/* with this bearer token (prefer SBIR_ADMIN_TOKEN: flags show in ps)",
    ),
    ("--log-level", str, "critical, error, warning, info or debug (default info)"),
)
_FIELD_FOR_FLAG = {"reload_interval": "reload_interval_s", "request_timeout": "request_timeout_s"}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP search service on an index root",
        description=(
            "Serve POST /search, GET /photos/{id}, /healthz, /readyz, /metrics, /info and /admin/reload "
            "from the snapshot ROOT/CURRENT names; a new CURRENT is picked up without a restart. "
            "One process per GPU. Settings come from SBIR_* environment variables; flags override them."
        ),
    )
    p.add_argument("root", type=Path, nargs="?", help="index root (default: $SBIR_SNAPSHOT_ROOT)")
    for flag, kind, text in _FLAGS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument(
        "--cors-origin", action="append", dest="cors_origins", default=None, metavar="ORIGIN",
        help="allow this browser origin (repeat for more; default none)",
    )  # fmt: skip
    p.set_defaults(func=serve)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, overridden by the flags that were given."""
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {}
    for flag, _, _ in _FLAGS:
        dest = flag[2:].replace("-", "_")
        value = getattr(args, dest)
        if value is not None:
            overrides[_FIELD_FOR_FLAG.get(dest, dest)] = value
    if args.cors_origins is not None:
        overrides["cors_origins"] = args.cors_origins
    if args.root is not None:
        overrides["snapshot_root"] = args.root
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"invalid settings: {problems}") from None


def serve(args: argparse.Namespace) -> int:
    import os
    import sys

    # OpenMP threads that spin while waiting starve the other library's threads (torch and faiss
    # each bring an OpenMP runtime) and collapse on a busy host: measured in docs/BENCHMARKS.md.
    # Only effective before torch and faiss are loaded, which is the case here; a value the user
    # set wins.
    if "torch" not in sys.modules and "faiss" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from service.server import run

    run(settings_from_args(args))
    if os.getpid() == 1:
        # PID 1 of a container without an init: the SIGTERM that uvicorn re-raises after its clean
        # shutdown is ignored there, and the interpreter's teardown of torch and faiss would add
        # about 1.5 s to every `docker stop`. Everything is closed by now: leave at once.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
