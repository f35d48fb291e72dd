"""Migrations match the models on both databases; settings come from the environment and TOML."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from gateway.app import url_signing_key
from gateway.settings import Settings
from gateway.storage.db import open_database, session_factory, upgrade
from gateway.storage.files import LocalFileStore
from gateway.storage.models import Base


def test_migrations_create_exactly_the_models_schema(database_url: str) -> None:
    async def diff() -> tuple[list[object], set[str]]:
        async with open_database(database_url) as engine, engine.connect() as conn:

            def compare(sync_conn: object) -> tuple[list[object], set[str]]:
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})  # type: ignore[arg-type]
                return compare_metadata(ctx, Base.metadata), set(inspect(sync_conn).get_table_names())  # type: ignore[arg-type]

            return await conn.run_sync(compare)

    changes, tables = asyncio.run(diff())
    assert changes == []
    assert {"tenants", "api_keys", "predictions", "files", "usage_events"} <= tables


def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    async def twice() -> None:
        async with open_database(database_url):
            pass
        async with open_database(database_url):
            pass

    asyncio.run(twice())


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HDG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HDG_BACKENDS", "local")
    monkeypatch.setenv("HDG_LOCAL_VARIANTS", "fast, dev")
    monkeypatch.setenv("HDG_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("HDG_PRICES_USD_PER_MEGAPIXEL", '{"hidream-i1-fast": "0.02"}')
    settings = Settings()
    assert settings.local_variants == ["fast", "dev"]
    assert settings.prices_usd_per_megapixel == {"hidream-i1-fast": Decimal("0.02")}
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path.resolve() / 'gateway.db'}"
    assert "s3cret" not in repr(settings)  # secrets are SecretStr


def test_settings_from_toml_file_with_env_taking_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "hdg.toml"
    config.write_text('max_prompt_chars = 500\npublic_url = "https://img.example.com"\n')
    monkeypatch.setenv("HDG_CONFIG", str(config))
    monkeypatch.setenv("HDG_PUBLIC_URL", "https://override.example.com")
    settings = Settings()
    assert settings.max_prompt_chars == 500
    assert settings.public_url == "https://override.example.com"


def test_unknown_backend_or_variant_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown backends"):
        Settings(backends=["local", "midjourney"])
    with pytest.raises(ValidationError, match="unknown variants"):
        Settings(local_variants=["turbo"])


def _signing_key(settings: Settings) -> bytes:
    async def main() -> bytes:
        async with open_database(settings.resolved_database_url) as engine:
            return await url_signing_key(settings, session_factory(engine))

    return asyncio.run(main())


def test_signing_key_is_made_once_and_shared_through_the_database(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first = _signing_key(Settings(data_dir=tmp_path / "a", database_url=db))
    # Another process with its own data dir, on the same database: the same key, so URLs verify on both.
    assert _signing_key(Settings(data_dir=tmp_path / "b", database_url=db)) == first and len(first) >= 32
    assert _signing_key(Settings(data_dir=tmp_path / "c", database_url=db, url_signing_secret="f" * 32)) == b"f" * 32
    # A key file an older version wrote is adopted on a database that has none yet, so its URLs stay valid.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "url-signing.key").write_text("legacy-key-written-by-an-older-version-0123456789\n")
    assert _signing_key(Settings(data_dir=tmp_path / "d")) == b"legacy-key-written-by-an-older-version-0123456789"
    # A key anyone could guess is refused: too short in the settings, replaced when found in an old file.
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(url_signing_secret="   short   ")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "url-signing.key").write_text("  \n")
    assert len(_signing_key(Settings(data_dir=tmp_path / "e"))) >= 32


def test_file_store_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files")
    saved = asyncio.run(store.save(tenant_id="ten_a", file_id="file_1", content_type="image/png", data=b"\x89PNG"))
    assert asyncio.run(store.read(saved.path)) == b"\x89PNG"
    with pytest.raises(ValueError, match="escapes"):
        asyncio.run(store.read("../../etc/passwd"))


def test_migration_0005_keeps_every_tenant_and_makes_names_unique_regardless_of_case(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url, migrate=False) as engine:
            await upgrade(engine, "0004")
            async with engine.begin() as conn:
                for i, name in enumerate(("Acme", "acme", "ACME", "Globex")):
                    await conn.execute(
                        text("INSERT INTO tenants (id, name, status, created_at) VALUES (:id, :name, 'active', :at)"),
                        {"id": f"ten_{i}", "name": name, "at": datetime(2026, 1, 1 + i, tzinfo=UTC)},
                    )
            await upgrade(engine, "head")
            async with engine.begin() as conn:
                names = dict((await conn.execute(text("SELECT id, name FROM tenants"))).all())
            assert names == {"ten_0": "Acme", "ten_1": "acme (ten_1)", "ten_2": "ACME (ten_2)", "ten_3": "Globex"}
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(
                        text("INSERT INTO tenants (id, name, status, created_at) VALUES (:id, :name, 'active', :at)"),
                        {"id": "ten_9", "name": "GLOBEX", "at": datetime(2026, 2, 1, tzinfo=UTC)},
                    )

    asyncio.run(main())


def test_every_setting_has_a_row_in_the_readme_settings_table() -> None:
    """The README's table is the operator's reference: a setting missing from it is one nobody finds."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first_cells = re.findall(r"^\| ([^|]+) \|", readme, re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`(?:HDG_)?([A-Z0-9_]+)`", cell)}
    assert sorted(n.upper() for n in Settings.model_fields if n.upper() not in documented) == []
