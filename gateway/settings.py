"""All gateway configuration: environment variables prefixed ``HDG_``, optionally a TOML file named by HDG_CONFIG."""

from __future__ import annotations

import os
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

KNOWN_BACKENDS = ("local",)

# Tenant price per megapixel of output, per model (USD). Roughly the public list prices of hosted HiDream.
DEFAULT_PRICES: dict[str, Decimal] = {
    "hidream-i1-full": Decimal("0.05"),
    "hidream-i1-dev": Decimal("0.03"),
    "hidream-i1-fast": Decimal("0.01"),
}


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Gateway settings; every field can be set as ``HDG_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="HDG_", extra="ignore")

    data_dir: Path = Path("hdg-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy async URL; default SQLite in the data dir")
    admin_token: SecretStr | None = None
    backends: Annotated[list[str], NoDecode] = ["local"]
    local_model: str = Field(default="tiny", description="'tiny' or a path to a diffusers HiDream directory")
    local_llama_path: Path | None = None
    local_variants: Annotated[list[str], NoDecode] = ["full", "dev", "fast"]
    local_device: str | None = None
    local_queue_size: int = Field(default=8, ge=0)
    public_url: str | None = None
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    url_signing_secret: SecretStr | None = None
    url_ttl_seconds: int = Field(default=3600, ge=1)
    request_timeout_seconds: float = Field(default=300.0, gt=0)
    prices_usd_per_megapixel: dict[str, Decimal] = Field(default_factory=lambda: dict(DEFAULT_PRICES))

    @field_validator("backends", "local_variants", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(KNOWN_BACKENDS))
        if unknown:
            raise ValueError(f"unknown backends {unknown}; known: {list(KNOWN_BACKENDS)}")
        return value

    @field_validator("local_variants")
    @classmethod
    def _known_variants(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - {"full", "dev", "fast"})
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: full, dev, fast")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: constructor arguments, then the environment, then the TOML file in HDG_CONFIG."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("HDG_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'gateway.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        """Where generated images are stored."""
        return self.data_dir / "files"

    @property
    def models_dir(self) -> Path:
        """Where the tiny model (and other local model caches) live."""
        return self.data_dir / "models"

    def signing_key(self) -> bytes:
        """The HMAC key for signed file URLs; generated once and kept in the data dir when not configured.

        Several replicas must share one key, so set HDG_URL_SIGNING_SECRET in a multi-replica deployment.
        """
        if self.url_signing_secret is not None:
            return self.url_signing_secret.get_secret_value().encode()
        path = self.data_dir / "url-signing.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(secrets.token_urlsafe(32))
            tmp.chmod(0o600)
            os.replace(tmp, path)
        return path.read_text().strip().encode()
