"""Jobs that cannot run are refused at submission (422), from what the uploads recorded.

A cnn student on tabular data and fitnet with a tree-ensemble ONNX teacher used to get 201
and fail only once a worker ran them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier

from tests.service.api_support import Api, build_api
from tests.service.helpers import migrate


@pytest.fixture(scope="module")
def tabular() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)  # (569, 30): tabular, not images
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture
def api(tmp_path: Path) -> Api:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    return build_api(url, tmp_path)


def _upload(api: Api, headers: dict[str, str], route: str, name: str, data: bytes) -> str:
    r = api.client.post(route, files={"file": (name, data)}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _onnx(model: object, x: np.ndarray) -> bytes:
    return to_onnx(model, x[:1], options={"zipmap": False}).SerializeToString()


def _submit(api: Api, headers: dict[str, str], spec: dict[str, object]) -> dict[str, object]:
    r = api.client.post("/v1/jobs", json=spec, headers=headers)
    return {"http": r.status_code, **r.json()}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_students_and_methods_that_cannot_run_are_refused_at_submission(
    api: Api, tabular: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = tabular
    headers = {"Authorization": f"Bearer {api.tenant().key}"}
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(x, y)
    mlp = MLPClassifier((16,), max_iter=20, random_state=0).fit(x, y)
    trees = _upload(api, headers, "/v1/models", "forest.onnx", _onnx(forest, x))
    net = _upload(api, headers, "/v1/models", "mlp.onnx", _onnx(mlp, x))
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    dataset = _upload(api, headers, "/v1/datasets", "cancer.npz", buf.getvalue())

    def spec(teacher: str, **extra: object) -> dict[str, object]:
        return {"teacher": {"model_id": teacher}, "dataset_id": dataset, **extra}

    cnn = _submit(api, headers, spec(trees, student={"preset": "cnn"}))
    assert cnn["http"] == 422, cnn
    assert cnn["error"]["details"]["field"] == "student.preset"
    assert "(C, H, W)" in cnn["error"]["message"] and "'N', 30" in cnn["error"]["message"]

    staged = _submit(
        api, headers, spec(trees, stages=[{"student": {"preset": "mlp"}}, {"student": {}}])
    )
    assert staged["http"] == 201, staged  # mlp stages take (N, 30)
    staged = _submit(
        api,
        headers,
        spec(trees, stages=[{"student": {"preset": "mlp"}}, {"student": {"preset": "resnet"}}]),
    )
    assert (
        staged["http"] == 422 and staged["error"]["details"]["field"] == "stages.1.student.preset"
    )

    fitnet = _submit(api, headers, spec(trees, distillation={"method": "fitnet"}))
    assert fitnet["http"] == 422, fitnet
    assert fitnet["error"]["details"]["field"] == "distillation.method"
    assert "penultimate features" in fitnet["error"]["message"]
    rkd = _submit(api, headers, spec(trees, distillation={"method": "rkd"}))
    assert rkd["http"] == 422, rkd

    # What can run still gets 201: kd from the forest; fitnet from a teacher with a final
    # MatMul (an MLP's features are its hidden layer).
    assert _submit(api, headers, spec(trees))["http"] == 201
    ok = _submit(api, headers, spec(net, distillation={"method": "fitnet"}))
    assert ok["http"] == 201, ok
