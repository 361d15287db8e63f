"""The search service's configuration: one pydantic-settings class read from `SBIR_*` variables.

`sbir serve` flags override the environment; validators refuse values that would be unsafe or
meaningless in production (a short admin token, a zero upload limit, a default k above the maximum).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_ADMIN_TOKEN_CHARS = 16
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything `create_app` and `run` need. Environment: `SBIR_<FIELD>` (e.g. SBIR_MAX_K=50)."""

    model_config = SettingsConfigDict(env_prefix="SBIR_", extra="ignore", frozen=True)

    snapshot_root: Path = Field(description="index root: the folder whose CURRENT names the live snapshot")
    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 to listen on all")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    device: str = Field("auto", description="torch device for the encoder: auto, cpu, cuda, cuda:1 ...")
    max_upload_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="largest request body accepted (413 past it)"
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="longest a client may take to send a request's head, and again its body (408 past it)",
    )
    max_k: int = Field(100, ge=1, le=10_000, description="largest k a client may ask for")
    default_k: int = Field(24, ge=1, description="k when the client gives none")
    max_batch: int = Field(16, ge=1, le=1024, description="most sketches encoded in one forward pass")
    max_wait_ms: float = Field(
        4.0, ge=0, le=1000, description="longest a sketch waits for others to join its batch"
    )
    batch_workers: int = Field(
        2,
        ge=1,
        le=8,
        description="batches in flight at once: with 2, a batch's forward pass runs while the one before it "
        "searches and looks up its metadata; one forward at a time, the other worker gathers meanwhile "
        "(docs/SERVICE.md)",
    )
    batch_forwards: Literal["one", "overlapping"] = Field(
        "one",
        description="one: one batch's forward pass at a time, the other batch workers keep gathering meanwhile "
        "(larger batches under load, less CPU a request); overlapping: each worker starts its forward after "
        "max_wait_ms even while another runs (the behaviour before 2026-11-30; docs/SERVICE.md)",
    )
    max_queue: int = Field(
        256,
        ge=1,
        description="searches in progress (reading, decoding, queued, encoding) before 503s are returned",
    )
    decode_threads: int = Field(2, ge=1, le=64, description="threads that parse and decode uploads")
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="intra-op threads of the encoder on the CPU (default: torch's, all cores)",
    )
    cpu_runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="how the backbone runs on the CPU: onnxruntime (about 2.6x faster), torch, or auto "
        "(onnxruntime unless it cannot export or disagrees with torch)",
    )
    cpu_precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="precision of the backbone on the CPU: auto encodes queries in the precision the snapshot "
        "was indexed in (int8 where the CPU has VNNI, by default); fp32 or int8 refuses a snapshot indexed "
        "in the other one",
    )
    query_twin: Literal["model", "off"] = Field(
        "model",
        description="model: encode each sketch as its model says (today's models: as drawn and with its "
        "strokes normalised, two images a query); off: as drawn only, one image a query (about twice the "
        "requests a second on the CPU, lower accuracy on drawing styles never trained on; docs/SERVICE.md)",
    )
    faiss_threads: int | None = Field(
        1,
        ge=1,
        le=256,
        description="OpenMP threads of the FAISS search. One by default: the search of a batch is short and "
        "the encoder and decoding keep the other cores busy; OpenMP threads that wait for a busy core "
        "stall the whole batch (docs/SERVICE.md)",
    )
    reload_interval_s: float = Field(
        2.0, ge=0, description="how often ROOT/CURRENT is polled for a new snapshot (0: never)"
    )
    max_thumbnail: int = Field(
        1024, ge=16, le=4096, description="largest side a /photos thumbnail may ask for"
    )
    admin_token: SecretStr | None = Field(
        None,
        description=f"bearer token for /admin/*; unset disables it (at least {MIN_ADMIN_TOKEN_CHARS} chars; "
        "prefer the environment variable to the flag: flags show in ps)",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated in the environment"
    )
    log_level: LogLevel = Field("info", description="uvicorn and sbir log level")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        secret = value.get_secret_value()
        if len(secret) < MIN_ADMIN_TOKEN_CHARS or secret.strip() != secret:
            raise ValueError(
                f"admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters without surrounding spaces"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is larger than max_k ({self.max_k})")
        return self
