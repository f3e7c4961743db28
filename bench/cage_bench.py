"""What the cage costs: upload inspection and job start, caged against uncaged, alternating.

- Inspection: ``inspect_model_file`` of a small TorchScript model, as the API does at upload,
  with a warm spare child (the API's default) and with a cold one.
- Job start: the worker's child process from its start to its first message, with a stand-in
  engine that imports torch and reports at once (the part of a job's start the cage touches).
- Bare start: ``/bin/true`` in a cage against without one (what bubblewrap itself costs).

Rounds alternate caged and uncaged so that both see the same machine; medians and the spread
(min-max) are printed as JSON.

    python -m bench.cage_bench --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.distill import cage
from core.distill.inspect import INSPECTION_MODULES, inspect_model_file
from core.distill.sandbox import keep_warm, stop_warm
from worker.protocol import JobPayload


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _inspect_once(path: Path, isolation: cage.Isolation, warm: bool) -> float:
    if warm:
        keep_warm(INSPECTION_MODULES, isolation)
        time.sleep(10)  # the spare has done its imports, as between two uploads
    started = time.perf_counter()
    inspect_model_file(path, input_shape=[64], isolation=isolation)
    elapsed = time.perf_counter() - started
    stop_warm()
    return elapsed


def _job_start_once(tmp: Path, isolation: cage.Isolation) -> float:
    from worker.runner import _MessageChannel, _start_child

    work = Path(tempfile.mkdtemp(dir=tmp))
    (work / "inputs").mkdir()
    (work / "inputs" / "dataset.npz").write_bytes(b"-")
    payload = JobPayload(
        engine="bench.cage_bench:first_message_engine",
        spec={"teacher": {"model_id": "mdl_bench"}, "dataset_id": "ds_bench"},
        models={},
        dataset=str(work / "inputs" / "dataset.npz"),
        dataset_options={},
        out_dir=str(work / "output" / "out-1"),
        work_dir=str(work / "checkpoints"),
        scratch=str(work / "scratch"),
        caged=isolation.caged,
        max_seconds=60,
    )
    started = time.perf_counter()
    proc = _start_child(payload, isolation)
    channel = _MessageChannel(proc)
    while not channel.receive(0.05):
        pass
    elapsed = time.perf_counter() - started
    proc.kill()
    proc.wait()
    channel.close()
    return elapsed


def first_message_engine(spec: Any, *, progress: Any, **_: Any) -> Any:
    """A stand-in engine: import torch as the real one does, report, and end."""
    import torch  # noqa: F401

    class Event:
        type, data = "log", {"message": "started"}

    class Outcome:
        result, history, artifacts = {}, [], []

    progress(Event())
    return Outcome()


def _bare_start_once(isolation: cage.Isolation) -> float:
    """Starting the cage alone: ``/bin/true`` in it, against without it."""
    argv = ["/bin/true"]
    if isolation.caged:
        argv = cage.command(argv, scratch=None)
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(values), 3),
        "min_s": round(min(values), 3),
        "max_s": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    problem = cage.cage_problem()
    if problem is not None:
        raise SystemExit(f"no cage here: {problem}")
    kinds = {"caged": cage.isolation("on"), "uncaged": cage.isolation("off")}
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "small.pt"
        torch.jit.save(torch.jit.script(Small()), str(model))
        for _ in range(args.rounds):
            for name, isolation in kinds.items():
                for warm in (True, False):
                    key = f"inspect_{'warm' if warm else 'cold'}_{name}"
                    times.setdefault(key, []).append(_inspect_once(model, isolation, warm))
                key = f"job_start_{name}"
                times.setdefault(key, []).append(_job_start_once(tmp, isolation))
                key = f"bare_start_{name}"
                times.setdefault(key, []).append(_bare_start_once(isolation))
    result = {key: _summary(values) for key, values in sorted(times.items())}
    for what in ("inspect_warm", "inspect_cold", "job_start", "bare_start"):
        caged, uncaged = result[f"{what}_caged"], result[f"{what}_uncaged"]
        result[f"{what}_added_s"] = round(caged["median_s"] - uncaged["median_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
