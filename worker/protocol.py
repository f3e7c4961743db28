"""What passes between a worker and its job process: the payload in, the messages out.

Both travel as JSON over pipes: the job process opens uploaded models, so the worker never
unpickles anything it sends. The payload is one line on the job process's standard input; each
message is one line on its standard output, an object whose ``kind`` names its class here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelInput:
    """One model file the job reads (a teacher or an uploaded student)."""

    path: str
    format: str
    arch: str | None = None
    arch_config: dict[str, Any] | None = None


SERVICE_ENGINE = "core.distill.pipeline:run_job"  # what every job runs; tests name stand-ins


@dataclass
class JobPayload:
    """Everything the job process needs, as the worker prepared it."""

    engine: str  # "module:function" with the signature of core.distill.pipeline.run_job
    spec: dict[str, Any]
    models: dict[str, ModelInput]  # by model reference (model id)
    dataset: str
    dataset_options: dict[str, Any]
    out_dir: str  # the artifacts; the engine stages them beside it, in its parent folder
    work_dir: str  # checkpoints
    scratch: str  # the job process's working folder
    caged: bool
    max_seconds: float
    tensorboard_dir: str | None = None
    # This tenant's teacher-output cache on this machine, shared by its jobs (not counted as
    # the job's own writing).
    cache_dir: str | None = None

    @property
    def inputs_dir(self) -> Path:
        """The folder holding the dataset and model files (read-only for the job)."""
        return Path(self.dataset).parent

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir).parent

    @property
    def engine_package(self) -> str:
        return self.engine.partition(":")[0].split(".")[0]

    def written_folders(self) -> list[Path]:
        """Every folder the job process may write into."""
        folders = [Path(self.work_dir), self.output_dir, Path(self.scratch)]
        return folders + ([Path(self.tensorboard_dir)] if self.tensorboard_dir else [])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobPayload:
        data = json.loads(text)
        data["models"] = {key: ModelInput(**m) for key, m in data["models"].items()}
        return cls(**data)


@dataclass
class Event:
    """A progress, metrics or log event of the running job."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    kind: str = "event"


@dataclass
class Outcome:
    """The job finished: its result, metric history and artifact files."""

    result: dict[str, Any]
    history: list[Any]
    artifacts: list[dict[str, str]]  # {"name", "kind", "path"}
    kind: str = "outcome"


@dataclass
class Failure:
    """The job failed with this error object ({"code", "message", …})."""

    error: dict[str, Any]
    kind: str = "error"


Message = Event | Outcome | Failure
_CLASSES: dict[str, type[Event] | type[Outcome] | type[Failure]] = {
    "event": Event,
    "outcome": Outcome,
    "error": Failure,
}


def _is_artifact(item: Any) -> bool:
    return isinstance(item, dict) and all(
        isinstance(item.get(key), str) for key in ("name", "kind", "path")
    )


def encode(message: Message) -> dict[str, Any]:
    return asdict(message)


def decode(data: Any) -> Message:
    """A message from its JSON object; ValueError for anything else."""
    if not isinstance(data, dict):
        raise ValueError("a message must be a JSON object")
    cls = _CLASSES.get(str(data.get("kind")))
    if cls is None:
        raise ValueError(f"unknown message kind {data.get('kind')!r}")
    try:
        message = cls(**data)
    except TypeError as exc:
        raise ValueError(f"malformed {cls.__name__} message: {exc}") from None
    if isinstance(message, Event) and not (
        isinstance(message.type, str) and isinstance(message.data, dict)
    ):
        raise ValueError("malformed event message")
    if isinstance(message, Outcome) and not (
        isinstance(message.result, dict)
        and isinstance(message.artifacts, list)
        and all(_is_artifact(item) for item in message.artifacts)
    ):
        raise ValueError("malformed outcome message")
    if isinstance(message, Failure) and not isinstance(message.error, dict):
        raise ValueError("malformed error message")
    return message
