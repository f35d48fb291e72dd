"""The deployment files in infra/: they parse, name only real settings and metrics, and agree with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import AliasChoices, SecretStr

from gateway.backends.config import misconfigured
from gateway.cli import Invocation, parse
from gateway.settings import Settings
from tests.conftest import GatewayFactory

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
DASHBOARD = INFRA / "grafana" / "hidream-gateway.json"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (a container must listen beyond its own loopback)
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR.
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


# --- helpers -----------------------------------------------------------------------------------------------


def settings_variables() -> dict[str, str]:
    """Every environment variable Settings reads, mapped to its field name."""
    names: dict[str, str] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update({str(choice): field_name for choice in alias.choices})
        else:
            names[f"HDG_{field_name.upper()}"] = field_name
    return names


def secret_fields() -> set[str]:
    """Fields typed SecretStr: their values must never be written into a manifest."""
    return {
        name
        for name, field in Settings.model_fields.items()
        if field.annotation is SecretStr or SecretStr in typing.get_args(field.annotation)
    }


def is_setting_name(name: str) -> bool:
    return name.startswith("HDG_") or name in {"REPLICATE_API_TOKEN", "FAL_KEY"}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose reads them (no inline comments are used in the example)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Fill ``${...}`` the way docker compose does; a missing required variable fails the test."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        given = env.get(name)
        missing = given is None or (given == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("?") and missing:
            pytest.fail(f"compose needs {name} ({arg}) and the env file does not set it")
        if op is not None and op.endswith("-") and missing:
            return arg
        return given or ""

    return INTERPOLATION.sub(substitute, value)


def referenced_variables(value: str) -> set[str]:
    return {m.group("braced") or m.group("bare") for m in INTERPOLATION.finditer(value) if m.group(0) != "$$"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s(kind: str) -> dict[str, Any]:
    """The one manifest of ``kind`` in infra/k8s (the Secret's is the example)."""
    found = [doc for path in K8S.glob("*.yaml") for doc in load_documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


def pod_containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = manifest["spec"]["template"]["spec"]["containers"]
    return containers


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    names = [entry["name"] for entry in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env entries in {container['name']}"
    return {entry["name"]: entry for entry in container.get("env", [])}


def parse_cli(argv: list[str]) -> Invocation:
    """The command as `hidream-gateway` would parse it; an unknown command or flag fails the test."""
    assert argv[0] == "hidream-gateway", argv
    return parse(argv[1:])


def isolated_settings(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings built from exactly ``env``, as a gateway process with that environment would build them."""
    for name in settings_variables():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HDG_CONFIG", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def gateway_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The long-running gateway replicas: services whose command is `hidream-gateway serve`."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [])[:2] == ["hidream-gateway", "serve"]
    }


def service_env(service: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    raw = service.get("environment", {})
    assert isinstance(raw, dict), "write compose environments as mappings"
    return {key: interpolate(str(value), env) for key, value in raw.items()}


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (continuation lines joined), in order; the first entry is its FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = rest.split()
            current = []
            stages[parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"] = current
        current.append((instruction, rest.strip()))
    return stages


def stage_chain(stages: dict[str, list[tuple[str, str]]], name: str) -> Iterator[list[tuple[str, str]]]:
    """A stage and the stages it is built on, nearest first."""
    while name in stages:
        yield stages[name]
        name = stages[name][0][1].split()[0]


# --- every file parses and names only real settings ------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path: Path) -> None:
    documents = load_documents(path)
    assert documents and all(isinstance(doc, dict) for doc in documents)


def manifest_variables(compose: dict[str, Any], example_env: dict[str, str]) -> dict[str, set[str]]:
    """Every variable name set anywhere in infra/, by the file that sets it."""
    found: dict[str, set[str]] = {}
    compose_names = set(example_env)  # what .env feeds in, and what each service's environment sets
    for service in compose["services"].values():
        for key, value in service.get("environment", {}).items():
            compose_names |= {key, *referenced_variables(str(value))}
    found["compose.yaml"] = compose_names
    found[".env.example"] = set(example_env)
    found["k8s ConfigMap"] = set(k8s("ConfigMap")["data"])
    found["k8s Secret example"] = set(k8s("Secret")["stringData"])
    for kind in ("Deployment", "Job"):
        names: set[str] = set()
        for container in pod_containers(k8s(kind)):
            for entry in container_env(container).values():
                names.add(entry["name"])
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["key"])
        found[f"k8s {kind}"] = names
    found["Dockerfile"] = {
        match.group(1)
        for stage in dockerfile_stages().values()
        for instruction, rest in stage
        if instruction == "ENV"
        for match in re.finditer(r"(\w+)=", rest)
    }
    return found


def test_every_hdg_variable_in_infra_is_a_setting(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    known = settings_variables()
    unknown = {
        where: sorted(name for name in names if is_setting_name(name) and name not in known)
        for where, names in manifest_variables(compose, example_env).items()
    }
    assert {where: names for where, names in unknown.items() if names} == {}


def test_the_compose_gateways_settings_are_accepted(
    compose: dict[str, Any], example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = gateway_services(compose)
    env = service_env(next(iter(services.values())), example_env)
    settings = isolated_settings(env, monkeypatch)
    assert settings.storage == "s3" and settings.s3_bucket and settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None
    assert settings.resolved_database_url.startswith("postgresql+asyncpg://gateway:")
    assert settings.redis_url is not None and settings.url_signing_secret is not None
    assert settings.metrics_token is not None and settings.admin_token is not None
    assert settings.public_url == f"http://localhost:{example_env['LB_PORT']}"
    assert "local" not in settings.backends  # each replica would load its own model
    assert settings.worker_urls == ["http://tiny-worker:9000"]
    # The example's provider keys are empty: the replicas start, with both providers shown as misconfigured.
    assert set(misconfigured(settings)) == {"fal", "replicate"}


def test_the_k8s_settings_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Secret example's placeholders stand in for real secrets: they have the right shapes.
    env = {**k8s("ConfigMap")["data"], **k8s("Secret")["stringData"]}
    settings = isolated_settings(env, monkeypatch)
    assert settings.storage == "s3" and settings.s3_bucket
    assert settings.resolved_database_url.startswith("postgresql+asyncpg://")
    assert settings.redis_url is not None and settings.url_signing_secret is not None
    assert settings.public_url and settings.public_url.startswith("https://")
    assert "local" not in settings.backends
    misconfigured(settings)  # the pods start (a provider without a usable key in the Secret is only skipped)


# --- compose: two replicas sharing one state ----------------------------------------------------------------


def test_compose_runs_two_replicas_on_the_same_shared_state(
    compose: dict[str, Any], example_env: dict[str, str]
) -> None:
    services = gateway_services(compose)
    assert len(services) == 2
    envs = [service_env(service, example_env) for service in services.values()]
    shared = [
        "HDG_DATABASE_URL",
        "HDG_REDIS_URL",
        "HDG_STORAGE",
        "HDG_S3_BUCKET",
        "HDG_S3_ENDPOINT_URL",
        "HDG_S3_REGION",
        "HDG_S3_ACCESS_KEY_ID",
        "HDG_S3_SECRET_ACCESS_KEY",
        "HDG_URL_SIGNING_SECRET",
        "HDG_PUBLIC_URL",
    ]
    for name in shared:
        values = {env.get(name) for env in envs}
        assert len(values) == 1 and None not in values and "" not in values, name
    assert envs[0] == envs[1]  # nothing else differs either: the replicas are interchangeable

    # The bucket the one-shot service creates is the one the replicas use.
    bucket_env = service_env(compose["services"]["minio-bucket"], example_env)
    assert bucket_env["BUCKET"] == envs[0]["HDG_S3_BUCKET"]
    # The MinIO root credentials are the replicas' S3 keys.
    minio_env = service_env(compose["services"]["minio"], example_env)
    assert minio_env["MINIO_ROOT_USER"] == envs[0]["HDG_S3_ACCESS_KEY_ID"]
    assert minio_env["MINIO_ROOT_PASSWORD"] == envs[0]["HDG_S3_SECRET_ACCESS_KEY"]
    postgres_env = service_env(compose["services"]["postgres"], example_env)
    database = urlsplit(envs[0]["HDG_DATABASE_URL"])
    assert (database.username, database.password, database.hostname, database.path) == (
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
        "postgres",
        f"/{postgres_env['POSTGRES_DB']}",
    )
    assert urlsplit(envs[0]["HDG_REDIS_URL"]).hostname == "redis"


def test_compose_migrates_once_before_the_replicas_start(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["hidream-gateway", "db", "upgrade"]
    assert parse_cli(migrate["command"]).command == "db upgrade"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in gateway_services(compose).items():
        conditions = {dep: spec["condition"] for dep, spec in service["depends_on"].items()}
        assert conditions["migrate"] == "service_completed_successfully", name
        assert conditions["minio-bucket"] == "service_completed_successfully", name
        assert conditions["postgres"] == conditions["redis"] == "service_healthy", name
        args = parse_cli(service["command"])
        assert (args.command, args.params["host"], args.params["port"]) == ("serve", ALL_INTERFACES, 8000)
        assert service["healthcheck"]["test"][0] == "CMD" and "/healthz" in " ".join(service["healthcheck"]["test"])
        # The migration runs with the replicas' own settings, so a bad value stops the stack before it serves.
        assert service_env(migrate, example_env) == service_env(service, example_env)


def test_the_load_balancer_and_prometheus_reach_every_replica(compose: dict[str, Any]) -> None:
    replicas = {f"{name}:8000" for name in gateway_services(compose)}
    nginx = (INFRA / "nginx.conf").read_text()
    upstream = re.search(r"upstream\s+\w+\s*\{(?P<body>[^}]*)\}", nginx)
    assert upstream is not None
    assert set(re.findall(r"^\s*server\s+(\S+:\d+)", upstream.group("body"), re.MULTILINE)) == replicas
    lb = compose["services"]["lb"]
    assert {name: spec["condition"] for name, spec in lb["depends_on"].items()} == dict.fromkeys(
        gateway_services(compose), "service_healthy"
    )

    prometheus = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert {target for group in job["static_configs"] for target in group["targets"]} == replicas
    # The bearer token Prometheus sends is HDG_METRICS_TOKEN, handed over as a compose secret.
    (secret,) = (entry["source"] for entry in compose["services"]["prometheus"]["secrets"])
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret] == {"environment": "HDG_METRICS_TOKEN"}


def test_compose_takes_every_secret_from_the_env_file(compose: dict[str, Any], example_env: dict[str, str]) -> None:
    secret_names = {name for name, field in settings_variables().items() if field in secret_fields()}
    for service_name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            value = str(value)
            holds_secret = key in secret_names or "PASSWORD" in key
            if "://" in value:  # a URL holds a secret only in its user info (redis://redis:6379/0 holds none)
                holds_secret = "@" in value
            assert not holds_secret or "${" in value, f"{service_name}.{key} is written inline"
    # Every variable compose reads is in the example, and the example has nothing compose ignores.
    used = set().union(
        *(
            referenced_variables(str(v))
            for s in compose["services"].values()
            for v in s.get("environment", {}).values()
        ),
        *(referenced_variables(str(p)) for s in compose["services"].values() for p in s.get("ports", [])),
        {spec["environment"] for spec in compose.get("secrets", {}).values()},
    )
    assert used == set(example_env)


def test_compose_mounts_only_files_that_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), volume
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
            assert build["target"] in dockerfile_stages()
    provider = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/hidream-gateway.yaml").read_text())
    grafana_mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert Path(grafana_mounts["./grafana/hidream-gateway.json"]).parent == Path(
        provider["providers"][0]["options"]["path"]
    )
    datasources = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert [ds["type"] for ds in datasources["datasources"]] == ["prometheus"]


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_accepts_the_file() -> None:
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    command = ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "tiny-worker"]
    result = subprocess.run(
        [*command, "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- the image --------------------------------------------------------------------------------------------


def test_the_image_is_the_gateway_without_the_inference_extra() -> None:
    stages = dockerfile_stages()
    first = next(iter(stages.values()))
    assert first[0][1].split()[0] == "python:3.11-slim"
    assert list(stages)[-1] == "gateway"  # the default target of `docker build`
    chain = list(stage_chain(stages, "gateway"))
    runs = [rest for stage in chain for instruction, rest in stage if instruction == "RUN"]
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs)
    assert not any("inference" in run or "torch" in run for run in runs)
    users = [rest for instruction, rest in chain[0] if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (cmd,) = [rest for instruction, rest in chain[0] if instruction == "CMD"]
    args = parse_cli(json.loads(cmd))
    assert (args.command, args.params["host"], args.params["port"]) == ("serve", ALL_INTERFACES, 8000)
    (worker_cmd,) = [rest for instruction, rest in stages["tiny-worker"] if instruction == "CMD"]
    assert parse_cli(json.loads(worker_cmd)).command == "worker"


def test_the_gateway_serves_without_the_inference_packages(tmp_path: Path) -> None:
    """What the image relies on: with the inference extra's packages missing, the gateway imports and serves."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}

    missing = sorted(names(pyproject["optional-dependencies"]["inference"]) - names(pyproject["dependencies"]))
    assert "torch" in missing
    script = (
        "import sys\n"
        f"for name in {missing!r}:\n"
        "    sys.modules[name] = None  # import fails as if not installed\n"
        "from fastapi.testclient import TestClient\n"
        "from gateway.app import create_app\n"
        "from gateway.cli import main\n"
        "from gateway.settings import Settings\n"
        f"settings = Settings(data_dir={str(tmp_path)!r}, backends=['fal', 'replicate'], fal_key='id:secret',\n"
        "    replicate_api_token='r8_token')\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.get('/healthz').status_code == 200\n"
        "    ready = client.get('/readyz')\n"
        "    assert ready.status_code == 200, ready.text\n"
        "print('served')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0 and "served" in result.stdout, result.stderr


# --- Kubernetes --------------------------------------------------------------------------------------------


def test_the_deployment_runs_two_probed_non_root_replicas() -> None:
    deployment = k8s("Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod_containers(deployment)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (port,) = container["ports"]
    args = parse_cli(container["command"] + container["args"])
    assert (args.command, args.params["host"], args.params["port"]) == ("serve", ALL_INTERFACES, port["containerPort"])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in (port["name"], port["containerPort"]), probe
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_env_comes_from_the_configmap_and_the_secret() -> None:
    configmap, secret = k8s("ConfigMap"), k8s("Secret")
    for kind in ("Deployment", "Job"):
        for container in pod_containers(k8s(kind)):
            assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
            for name, entry in container_env(container).items():
                ref = entry["valueFrom"]["secretKeyRef"]  # no inline values: the rest is in the ConfigMap
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] == name, name
                assert name in secret["stringData"], name
    # The Secret is an example: every value a visible placeholder, and kustomize never applies it.
    assert all("REPLACE-ME" in value for value in secret["stringData"].values())
    secret_names = {name for name, field in settings_variables().items() if field in secret_fields()}
    assert not secret_names & set(configmap["data"])


def test_k8s_pods_never_serve_metrics_without_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Service forwards every path, /metrics (spend per tenant) included: a pod starts only with its token."""
    (container,) = pod_containers(k8s("Deployment"))
    required = {
        name
        for name, entry in container_env(container).items()
        if entry["valueFrom"]["secretKeyRef"].get("optional", False) is False
    }
    assert {"HDG_METRICS_TOKEN", "HDG_ADMIN_TOKEN"} <= required
    # A pod given just the required keys of the Secret has the token, so /metrics answers 401 to anyone without it.
    env = {**k8s("ConfigMap")["data"], **{name: k8s("Secret")["stringData"][name] for name in required}}
    assert isolated_settings(env, monkeypatch).metrics_token is not None
    # The scrape job that honours the annotations is documented beside them, sending the token as compose's does.
    documented = re.search(r"^\s*#\s+(authorization: \{.*\})$", (K8S / "deployment.yaml").read_text(), re.MULTILINE)
    assert documented is not None
    authorization = yaml.safe_load(documented.group(1))["authorization"]
    (compose_job,) = yaml.safe_load((INFRA / "prometheus.yml").read_text())["scrape_configs"]
    assert authorization.keys() == compose_job["authorization"].keys()
    assert authorization["type"] == "Bearer" and authorization["credentials_file"].startswith("/")


def test_the_migration_job_upgrades_the_database() -> None:
    job = k8s("Job")
    (container,) = pod_containers(job)
    assert container["command"] == ["hidream-gateway", "db", "upgrade"]
    assert parse_cli(container["command"]).command == "db upgrade"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert container["image"] == pod_containers(k8s("Deployment"))[0]["image"]


def test_the_service_hpa_and_budget_select_the_gateway_pods() -> None:
    deployment, service, hpa, pdb = (
        k8s("Deployment"),
        k8s("Service"),
        k8s("HorizontalPodAutoscaler"),
        k8s("PodDisruptionBudget"),
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = k8s("Job")["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items() and not selector.items() <= job_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == selector == pdb["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == manifests


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(built.stdout))
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "PodDisruptionBudget", "Service"]
    )


# --- the Grafana dashboard -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_the_dashboard_is_a_grafana_model_on_a_prometheus_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    for expr in dashboard_queries(dashboard):
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), expr


def test_the_dashboard_queries_only_metrics_the_gateway_exports(
    make_gateway: GatewayFactory, sqlite_url: str, dashboard: dict[str, Any]
) -> None:
    # Redis configured, so the gateway exports hdg_redis_up too (it is left out without Redis).
    gateway = make_gateway(sqlite_url, redis_url="redis://127.0.0.1:6379/0", metrics_token="scrape-token")
    scraped = gateway.client.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
    assert scraped.status_code == 200, scraped.text
    series_of: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
    for family in text_string_to_metric_families(scraped.text):
        if family.name.startswith("hdg_"):
            series_of[family.name] = {family.name + s for s in suffixes.get(family.type, [""])}
    queried = {name for expr in dashboard_queries(dashboard) for name in re.findall(r"\bhdg_\w+", expr)}
    exported = set().union(*series_of.values())
    assert queried - exported == set()
    # And every metric the gateway exports has a panel.
    assert {family for family, series in series_of.items() if not series & queried} == set()
