"""Settings: one pydantic-settings class, environment prefix ``DISTILL_``."""

from __future__ import annotations

import ipaddress
import logging
from contextlib import suppress
from functools import cached_property
from pathlib import Path
from typing import Literal

import psutil
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.distill.cage import Isolation, isolation


class Settings(BaseSettings):
    """Everything configurable. The embedded defaults need no server at all."""

    model_config = SettingsConfigDict(env_prefix="DISTILL_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".distill")
    database_url: str | None = None  # default: sqlite under data_dir
    broker_url: str | None = None  # default: a SQLite-backed kombu transport under data_dir
    storage_url: str | None = None  # default: file://<data_dir>/blobs; or s3://bucket/prefix
    s3_endpoint_url: str | None = None  # for MinIO and other S3-compatible stores

    auth: Literal["on", "off"] = "on"
    # How long the API remembers which tenant a key belongs to: a revoked key keeps working for
    # at most this long. 0: look every request's key up in the database.
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    max_upload_bytes: int = Field(default=10 * 1024**3, gt=0)

    # Budgets: a job over any of them is refused at submission (422 over_budget). None: no limit.
    max_student_parameters: int | None = Field(default=200_000_000, gt=0)
    max_optimizer_steps: int | None = Field(default=1_000_000, gt=0)
    max_job_minutes: float | None = Field(default=24 * 60, gt=0)
    # Quotas per tenant: queued and running jobs (429 beyond), bytes of stored uploads (413).
    max_active_jobs_per_tenant: int = Field(default=100, gt=0)
    max_tenant_storage_bytes: int = Field(default=50 * 1024**3, gt=0)

    # Deployment. With a token set, /metrics asks for it and /readyz shows its checks only to it.
    operator_token: str | None = Field(default=None, min_length=16)
    # `distill api`/`serve` refuse auth off on an address other machines can reach unless set.
    allow_unauthenticated_public: bool = False

    # Worker and reconciler.
    heartbeat_seconds: float = Field(default=2.0, gt=0)
    lease_seconds: float = Field(default=30.0, gt=0)  # a job whose heartbeat is older is stale
    max_attempts: int = Field(default=3, ge=1)
    reconcile_seconds: float = Field(default=5.0, gt=0)
    requeue_after_seconds: float = Field(default=30.0, gt=0)  # re-send a queued job this old
    gpu_workers: bool = False  # route jobs that want a GPU to the gpu queue
    # A job process whose memory (RSS, its children included) passes this is stopped and the job
    # fails ``out_of_memory`` (not retried); a job estimated above it is refused at submission.
    # Unset: 80% of the machine's (or cgroup's) memory shared by the worker's concurrent jobs.
    job_memory_mb: int | None = Field(default=None, gt=0)
    # What a job process may write (checkpoints, artifacts, TensorBoard files) before it is
    # stopped and the job fails ``out_of_disk``.
    job_disk_mb: int = Field(default=20 * 1024, gt=0)
    worker_concurrency: int = Field(default=1, ge=1)  # set by `distill worker --concurrency`

    # Teacher-output caches shared by a tenant's jobs on this worker machine (causal LMs' top-k
    # logits, sequence-level generations), one folder per tenant. Default: <data_dir>/lm-cache.
    lm_cache_dir: Path | None = None
    # Optional: every job's per-epoch metrics as TensorBoard scalars under <dir>/<job id>.
    tensorboard_dir: Path | None = None

    # Sandbox for opening uploaded models.
    inspect_timeout_seconds: float = Field(default=60.0, gt=0)
    inspect_memory_mb: int = Field(default=4096, gt=0)
    # Keep one sandbox process started (torch imported) for the next upload: seconds faster,
    # at the cost of one idle interpreter (about 300 MB) per API process.
    warm_sandbox: bool = True
    # Every process that opens an uploaded model runs in a bubblewrap cage (docs/SECURITY.md).
    # "on": caged where a cage can be built; where it cannot, TorchScript and torch.export
    # uploads are refused. "off": the operator runs uploads uncaged, knowingly (warned at start).
    cage: Literal["on", "off"] = "on"

    @model_validator(mode="after")
    def _production_needs_servers(self) -> Settings:
        if self.environment == "production":
            missing = [
                name
                for name in ("database_url", "broker_url", "storage_url")
                if getattr(self, name) is None
            ]
            if missing:
                env = ", ".join(f"DISTILL_{m.upper()}" for m in missing)
                raise ValueError(f"production needs {env}; set them or use environment=development")
            if self.auth == "off":
                raise ValueError("DISTILL_AUTH=off is refused in production")
        return self

    @model_validator(mode="after")
    def _default_job_memory(self) -> Settings:
        if self.job_memory_mb is None:
            self.job_memory_mb = default_job_memory_mb(self.worker_concurrency)
        return self

    @cached_property
    def isolation(self) -> Isolation:
        """How uploaded models are opened on this machine under the ``cage`` setting."""
        return isolation(self.cage)

    @cached_property
    def teacher_cache_root(self) -> Path:
        return (self.lm_cache_dir or self.data_dir / "lm-cache").resolve()

    @cached_property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'distill.db').resolve()}"

    @cached_property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @cached_property
    def storage(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'blobs').resolve()}"


def warn_about_isolation(settings: Settings, log: logging.Logger) -> None:
    """Say loudly at start when uploaded models will not be caged."""
    found = settings.isolation
    if found.caged:
        return
    if found.programs_allowed:
        log.warning(
            "UPLOADED MODELS RUN UNCAGED (%s): a TorchScript or torch.export upload can read "
            "and write every file this process can, and reach the network. Do not run it so "
            "for tenants you do not trust.",
            found.reason,
        )
    else:
        log.warning(
            "no cage for uploaded models here (%s): TorchScript and torch.export uploads are "
            "refused; install bubblewrap, or set DISTILL_CAGE=off to accept them uncaged",
            found.reason,
        )


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when it is smaller (a container)."""
    total = psutil.virtual_memory().total
    with suppress(OSError, ValueError):
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text != "max":
            total = min(total, int(text))
    return total


def default_job_memory_mb(concurrency: int) -> int:
    """80% of this machine's memory shared by ``concurrency`` jobs (the rest: the worker, the
    OS), at least 256 MiB."""
    return max(256, int(machine_memory_bytes() * 0.8 / concurrency / 2**20))


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address the API binds to."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whoever resolves it can reach it


def public_auth_warning(settings: Settings, host: str) -> str | None:
    """Refuse (ValueError) to serve without auth on an address other machines can reach, unless
    the operator allowed it; the warning to print loudly when allowed, else None."""
    if settings.auth == "on" or is_loopback(host):
        return None
    if not settings.allow_unauthenticated_public:
        raise ValueError(
            f"refusing to serve with DISTILL_AUTH=off on {host}, which other machines can reach: "
            "anyone there could use and read every tenant's models, data and jobs. Bind to "
            "127.0.0.1, or turn auth on (create keys with `distill keys create --tenant NAME`), "
            "or set DISTILL_ALLOW_UNAUTHENTICATED_PUBLIC=1 if a gateway in front authenticates"
        )
    return (
        f"WARNING: auth is off on {host} (DISTILL_ALLOW_UNAUTHENTICATED_PUBLIC=1): anyone who can "
        "reach this address can use and read every tenant's models, data and jobs"
    )


def get_settings() -> Settings:
    """Settings read from the environment now (tests and `distill serve` change it)."""
    return Settings()
