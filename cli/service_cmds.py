"""`distill api`, `distill db …` and `distill keys …`: the production pieces of the service."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.app import app

db_app = typer.Typer(no_args_is_help=True, help="The database schema (Alembic migrations).")
keys_app = typer.Typer(no_args_is_help=True, help="API keys.")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")


def _database_url() -> str:
    from core.config import get_settings

    return get_settings().database


def _migrated_database_url() -> str:
    """The database URL, after bringing the schema up to date (a fresh data dir has none yet)."""
    from core.config import get_settings
    from core.schema import upgrade_database

    settings = get_settings()
    if settings.database.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.database)
    return settings.database


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes.")] = 1,
) -> None:
    """Run the HTTP API (uvicorn) configured by DISTILL_* settings."""
    import uvicorn

    from core.config import get_settings, public_auth_warning

    try:
        warning = public_auth_warning(get_settings(), host)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if warning:
        typer.secho(warning, err=True, fg="red", bold=True)

    # The factory is imported by each server process (a string is needed for workers > 1).
    uvicorn.run("api.main:app_from_env", factory=True, host=host, port=port, workers=workers)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database to the newest schema."""
    from core.schema import current_revision

    url = _migrated_database_url()
    typer.echo(f"database at revision {current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' removes every table.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Take the database back to an older schema (data in removed tables is lost)."""
    from core.schema import current_revision, downgrade_database

    if not yes:
        typer.confirm(f"downgrade the database to {revision}? data may be lost", abort=True)
    url = _database_url()
    downgrade_database(url, revision)
    typer.echo(f"database at revision {current_revision(url) or 'base'}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name (created when new).")],
) -> None:
    """Create an API key and print it (once: only its hash is stored)."""
    from core.auth import create_key
    from core.db import session_scope

    with session_scope(_migrated_database_url()) as session:
        row, key = create_key(session, tenant)
        key_id = row.id
    typer.echo(key)
    typer.echo(
        f"key id {key_id} for tenant '{tenant}'; store the key now, it is not shown again", err=True
    )


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id (key_…) or prefix (dk_…).")],
) -> None:
    """Revoke an API key; requests with it get 401 from now on."""
    from core.auth import revoke_key
    from core.db import session_scope
    from core.errors import DistillError

    try:
        with session_scope(_migrated_database_url()) as session:
            row = revoke_key(session, key)
            key_id = row.id
    except DistillError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key_id}")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
) -> None:
    """List API keys (id, prefix, tenant, created, revoked); never the keys themselves."""
    from core.auth import list_keys
    from core.db import session_scope

    with session_scope(_migrated_database_url()) as session:
        for row, name in list_keys(session, tenant):
            revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            typer.echo(
                f"{row.id}  {row.prefix}…  {name}  {row.created_at:%Y-%m-%d %H:%M}  {revoked}"
            )
