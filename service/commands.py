"""`sbir serve ROOT`: the search service on the snapshot that ROOT/CURRENT names.

Every flag has an `SBIR_*` environment variable (see service.settings); a flag given wins.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

from pydantic.fields import FieldInfo

from model.ground.errors import UserError

# Every flag is a Settings field: its name, type, help and default come from service.settings, so a
# default is written once. Flags default to None: only those given override the environment.
_NOT_FLAGS = ("snapshot_root", "cors_origins")  # the positional ROOT; --cors-origin, repeatable
_FLAG_NAMES = {"reload_interval_s": "--reload-interval", "request_timeout_s": "--request-timeout"}


def _flag_type(annotation: object) -> type:
    """The argparse type of a Settings field: int or float where it is one (also `int | None`),
    else str (Literal choices, SecretStr: Settings validates them)."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (types.UnionType, typing.Union) else ()
    for kind in (annotation, *kinds):
        if kind in (int, float):
            return kind
    return str


def _flag_help(name: str, field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    said = "" if default is None else f"; default {default}"
    return f"{field.description}{said} (env SBIR_{name.upper()})".replace("%", "%%")


def serve_flags() -> list[tuple[str, str, type, str]]:
    """(flag, Settings field, type, help) of every `sbir serve` flag but --cors-origin."""
    from service.settings import Settings

    return [
        (_FLAG_NAMES.get(name, "--" + name.replace("_", "-")), name, _flag_type(field.annotation),
         _flag_help(name, field))
        for name, field in Settings.model_fields.items()
        if name not in _NOT_FLAGS
    ]  # fmt: skip


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
    for flag, name, kind, text in serve_flags():
        p.add_argument(flag, dest=name, type=kind, default=None, help=text, metavar=flag[2:].upper().replace("-", "_"))
    p.add_argument(
        "--cors-origin", action="append", dest="cors_origins", default=None, metavar="ORIGIN",
        help="allow this browser origin (repeat for more; default none; env SBIR_CORS_ORIGINS, comma-separated)",
    )  # fmt: skip
    p.set_defaults(func=serve)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, overridden by the flags that were given."""
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {}
    for _, name, _, _ in serve_flags():
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
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
