"""All gateway configuration: environment variables prefixed ``HDG_``, optionally a TOML file named by HDG_CONFIG."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from inference.capacity import worker_max_in_flight

KNOWN_BACKENDS = ("local", "worker", "replicate", "fal")

# Tenant price per megapixel of output, per model (USD). Roughly the public list prices of hosted HiDream.
DEFAULT_PRICES: dict[str, Decimal] = {
    "hidream-i1-full": Decimal("0.05"),
    "hidream-i1-dev": Decimal("0.03"),
    "hidream-i1-fast": Decimal("0.01"),
}


class Cost(BaseModel):
    """What a backend charges us for one image: a flat price, a price per megapixel, or GPU time.

    Frozen: a price changes by replacing the Cost (JobRunner.set_costs), which also drops the estimates made from it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_image: Decimal = Decimal(0)
    per_megapixel: Decimal = Decimal(0)
    gpu_seconds: Decimal = Decimal(0)  # expected GPU seconds per image, priced at the GPU rate


def default_backend_costs() -> dict[str, dict[str, Cost]]:
    """List prices where public (fal full and fast per megapixel, Replicate fast per image), estimates elsewhere.

    Self-hosted GPU seconds per 1024x1024 image are stock diffusers on an H100 (../shared/specs/hidream.md):
    transformer steps x ms/step plus VAE decode and text encoders.
    """
    return {
        "fal": {
            "full": Cost(per_megapixel=Decimal("0.05")),
            "dev": Cost(per_megapixel=Decimal("0.03")),  # not published; between full and fast
            "fast": Cost(per_megapixel=Decimal("0.01")),
        },
        "replicate": {
            "full": Cost(per_image=Decimal("0.045")),  # not published; estimate
            "dev": Cost(per_image=Decimal("0.025")),  # not published; estimate
            "fast": Cost(per_image=Decimal("0.010")),
        },
        "worker": {
            "full": Cost(gpu_seconds=Decimal("20")),
            "dev": Cost(gpu_seconds=Decimal("6.5")),
            "fast": Cost(gpu_seconds=Decimal("4")),
        },
        "local": {v: Cost() for v in ("full", "dev", "fast")},
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
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    url_signing_secret: SecretStr | None = None
    url_ttl_seconds: int = Field(default=3600, ge=1)
    request_timeout_seconds: float = Field(default=300.0, gt=0)
    prices_usd_per_megapixel: dict[str, Decimal] = Field(default_factory=lambda: dict(DEFAULT_PRICES))

    # The job engine (gateway/engine.py).
    job_lease_seconds: float = Field(default=30.0, ge=1, description="a dead replica's jobs are taken over after")
    job_poll_seconds: float = Field(default=1.0, gt=0, description="how often idle runners look for due jobs")
    job_concurrency: int = Field(default=1000, ge=1, description="jobs one process runs (or waits on) at once")
    prediction_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="how long a Replicate-API prediction may queue and run before it fails"
    )

    # Replicas: shared rate limits, shared image storage, metrics.
    redis_url: SecretStr | None = Field(
        default=None, description="redis://host:6379/0; rate limits are shared through it (per process without)"
    )
    storage: Literal["local", "s3"] = Field(default="local", description="where images live: the data dir, or S3")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = Field(default=None, description="an S3-compatible server; None: AWS")
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_prefix: str = Field(default="", description="a key prefix inside the bucket, e.g. hdg/")
    metrics_max_tenants: int = Field(
        default=100, ge=0, description="tenants labelled by id in /metrics; the rest are counted as 'other'"
    )
    otel: bool = Field(
        default=False,
        description="FastAPI's OpenTelemetry instrumentation (its per-request check of the providers costs CPU)",
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="if set, /metrics needs 'Authorization: Bearer <token>'; open without"
    )

    # Routing, health and failover.
    route: str = Field(default="cheapest", description="default policy: cheapest, fastest, or a name list")
    attempt_timeout_seconds: float = Field(default=120.0, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_open_seconds: float = Field(default=30.0, gt=0)
    health_interval_seconds: float = Field(
        default=2.0, gt=0, description="how often backends that are down, open or loading are probed again"
    )
    # Backends (kinds, as in HDG_BACKENDS) that may be misconfigured: shown as such and never routed to, instead of
    # stopping the gateway at start.
    optional_backends: Annotated[list[str], NoDecode] = []
    backend_costs: dict[str, dict[str, Cost]] = Field(default_factory=default_backend_costs)

    # Self-hosted workers (ours on any GPU host, or the Modal deployment).
    worker_urls: Annotated[list[str], NoDecode] = []
    worker_token: SecretStr | None = None
    worker_variants: Annotated[list[str], NoDecode] = ["full", "dev", "fast"]
    # A Modal deployment at its default ceiling: containers x (one running + one waiting); inference/capacity.py.
    worker_max_in_flight: int = Field(default_factory=worker_max_in_flight, ge=1)
    worker_gpu_usd_per_second: Decimal = Decimal("0.001097")  # an H100 on Modal, $3.95 an hour
    modal_key: SecretStr | None = None
    modal_secret: SecretStr | None = None

    # Replicate and fal; tokens use the providers' own variable names.
    replicate_api_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("REPLICATE_API_TOKEN", "HDG_REPLICATE_API_TOKEN")
    )
    replicate_base_url: str = "https://api.replicate.com"
    replicate_models: dict[str, str] = Field(
        default_factory=lambda: {v: f"prunaai/hidream-l1-{v}" for v in ("full", "dev", "fast")}
    )
    fal_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("FAL_KEY", "HDG_FAL_KEY"))
    fal_base_url: str = "https://queue.fal.run"
    fal_apps: dict[str, str] = Field(
        default_factory=lambda: {v: f"fal-ai/hidream-i1-{v}" for v in ("full", "dev", "fast")}
    )
    provider_poll_seconds: float = Field(default=0.5, gt=0)
    provider_max_in_flight: int = Field(default=64, ge=1)

    # Outbound requests (gateway/outbound.py).
    # Webhooks may only reach public addresses, unless inside one of these CIDRs (e.g. 10.0.0.0/8,127.0.0.1/32).
    webhook_allowed_networks: Annotated[list[str], NoDecode] = []
    # Where provider outputs may be downloaded from: a host, "*.host" (any subdomain; both https on 443 only), or
    # an explicit origin such as http://127.0.0.1:8123. Defaults are the providers' documented delivery hosts.
    replicate_output_hosts: Annotated[list[str], NoDecode] = ["replicate.delivery", "*.replicate.delivery"]
    fal_output_hosts: Annotated[list[str], NoDecode] = ["fal.media", "*.fal.media"]
    output_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    output_timeout_seconds: float = Field(default=60.0, gt=0)

    # The web console (/console).
    console_session_hours: float = Field(
        default=12.0, gt=0, le=24 * 30, description="how long a console sign-in lasts before it must be repeated"
    )
    console_secure_cookie: bool = Field(
        default=False, description="always mark the console cookie Secure (it is whenever the request is https)"
    )
    console_sign_in_failures: int = Field(
        default=10, ge=1, description="failed console sign-ins allowed per client address per minute"
    )

    @field_validator("url_signing_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            # Anyone who guesses the key can sign a URL for any tenant's file.
            raise ValueError(
                "must be at least 32 characters; make one with: "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("prices_usd_per_megapixel")
    @classmethod
    def _prices(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        bad = {model: str(price) for model, price in value.items() if not price.is_finite() or price < 0}
        if bad:
            raise ValueError(f"prices must be finite and not negative: {bad}")
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        networks = []
        for entry in value:
            try:
                networks.append(str(ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                raise ValueError(f"{entry!r} is not a network in CIDR form, such as 10.0.0.0/8 or fd00::/8") from None
        return networks

    @field_validator(
        "backends",
        "optional_backends",
        "local_variants",
        "worker_urls",
        "worker_variants",
        "webhook_allowed_networks",
        "replicate_output_hosts",
        "fal_output_hosts",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("backends", "optional_backends")
    @classmethod
    def _known_backends(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(KNOWN_BACKENDS))
        if unknown:
            raise ValueError(f"unknown backends {unknown}; known: {list(KNOWN_BACKENDS)}")
        return value

    @field_validator("local_variants", "worker_variants")
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
