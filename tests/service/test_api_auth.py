"""Auth: keys (CLI and library), 401s, auth off, and 404 across tenants for every resource."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli.app import app as cli
from core.auth import hash_key, revoke_key
from core.models import ApiKey, Tenant
from tests.service.api_support import (
    Api,
    build_api,
    insert_artifact,
    insert_dataset,
    insert_job,
    insert_model,
)
from tests.service.helpers import migrate, service_env


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    return url


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Api:
    return build_api(db_url, tmp_path)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer dk_not-a-real-key"},
    ],
)
def test_missing_or_invalid_key_is_401(api: Api, headers: dict[str, str]) -> None:
    r = api.client.get("/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized"
    assert "distill keys create" in r.json()["error"]["message"]


def test_keys_cli_creates_a_working_key_and_revokes_it(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = build_api(db_url, tmp_path, auth_cache_seconds=0)  # every request asks the database
    monkeypatch.setenv("DISTILL_DATABASE_URL", db_url)
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--tenant", "acme"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert key.startswith("dk_") and len(key) > 40

    with api.session() as s:
        row = s.scalars(select(ApiKey)).one()
        assert row.key_hash == hash_key(key) and key not in (row.key_hash, row.prefix)
        assert key.startswith(row.prefix)
        assert s.get(Tenant, row.tenant_id).name == "acme"

    headers = {"Authorization": f"Bearer {key}"}
    assert api.client.get("/v1/models", headers=headers).status_code == 200

    listed = runner.invoke(cli, ["keys", "list"])
    assert row.id in listed.stdout and key not in listed.stdout

    revoked = runner.invoke(cli, ["keys", "revoke", row.prefix])
    assert revoked.exit_code == 0, revoked.output
    r = api.client.get("/v1/models", headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]

    unknown = runner.invoke(cli, ["keys", "revoke", "dk_nothing"])
    assert unknown.exit_code == 1 and "no API key" in unknown.output


def test_a_revoked_key_stops_working_once_its_cache_entry_expires(
    db_url: str, tmp_path: Path
) -> None:
    api = build_api(db_url, tmp_path, auth_cache_seconds=0.5)
    tenant = api.tenant("acme")
    assert api.client.get("/v1/models", headers=tenant.headers).status_code == 200
    with api.session() as s:
        revoke_key(s, tenant.key)
        s.commit()
    # Still remembered: the API did not ask the database again.
    assert api.client.get("/v1/models", headers=tenant.headers).status_code == 200
    time.sleep(0.6)
    r = api.client.get("/v1/models", headers=tenant.headers)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    # An unknown key is never remembered as valid, and a failed lookup is not cached.
    assert api.client.get("/v1/models", headers={"Authorization": "Bearer dk_x"}).status_code == 401


def test_auth_off_uses_the_default_tenant(db_url: str, tmp_path: Path) -> None:
    api = build_api(db_url, tmp_path, auth="off")
    with api.session() as s:
        assert s.scalars(select(Tenant)).all() == []
    assert api.client.get("/v1/models").status_code == 200
    assert api.client.get("/v1/jobs").status_code == 200
    with api.session() as s:
        assert [t.name for t in s.scalars(select(Tenant))] == ["default"]


def test_every_resource_is_404_for_another_tenant(api: Api) -> None:
    owner, stranger = api.tenant(), api.tenant()
    with api.session() as s:
        model = insert_model(s, owner.id)
        dataset = insert_dataset(s, owner.id)
        job = insert_job(s, owner.id)
        artifact = insert_artifact(s, api.storage, job, b"student bytes")

    requests = [
        ("GET", f"/v1/models/{model.id}"),
        ("DELETE", f"/v1/models/{model.id}"),
        ("GET", f"/v1/datasets/{dataset.id}"),
        ("DELETE", f"/v1/datasets/{dataset.id}"),
        ("GET", f"/v1/jobs/{job.id}"),
        ("POST", f"/v1/jobs/{job.id}/cancel"),
        ("GET", f"/v1/jobs/{job.id}/events"),
        ("GET", f"/v1/jobs/{job.id}/artifacts"),
        ("GET", f"/v1/artifacts/{artifact.id}"),
        ("GET", f"/v1/artifacts/{artifact.id}/content"),
    ]
    for method, url in requests:
        theirs = api.client.request(method, url, headers=stranger.headers)
        assert theirs.status_code == 404, (method, url, theirs.text)
        assert theirs.json()["error"]["code"] == "not_found"
    # Nothing changed, and the owner still sees everything.
    for method, url in requests:
        if method == "GET":
            assert api.client.get(url, headers=owner.headers).status_code == 200, url
    assert api.client.get(f"/v1/jobs/{job.id}", headers=owner.headers).json()["status"] == "queued"
    # Lists only show the caller's own resources.
    for kind in ("models", "datasets", "jobs"):
        assert api.client.get(f"/v1/{kind}", headers=stranger.headers).json()["data"] == []
        assert len(api.client.get(f"/v1/{kind}", headers=owner.headers).json()["data"]) == 1


def test_keys_create_on_a_fresh_data_dir_sets_the_database_up_first(tmp_path: Path) -> None:
    # The first command of a user who turns auth on, before the service has ever started.
    data = tmp_path / "fresh"
    env = service_env(data_dir=str(data))
    cli_cmd = [sys.executable, "-c", "from cli.app import app; app(prog_name='distill')"]
    created = subprocess.run(
        [*cli_cmd, "keys", "create", "--tenant", "acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr[-2000:]
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("dk_") and "Traceback" not in created.stderr

    api = build_api(f"sqlite:///{data / 'distill.db'}", tmp_path, auth_cache_seconds=0)
    listed = api.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert listed.status_code == 200
