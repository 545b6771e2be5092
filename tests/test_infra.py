"""infra/: the compose file, its env file and the README agree (docker is not available here, so
the structure is checked, not run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
ROOT = INFRA.parent
# ${VAR}, ${VAR:-default}, ${VAR:?message}
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}")
PORT = re.compile(r"^\$\{BIND_ADDRESS:-127\.0\.0\.1\}:\$\{([A-Z_]+_PORT):-(\d+)\}:(\d+)$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module")
def readme() -> str:
    return (INFRA / "README.md").read_text()


def _compose_text() -> str:
    # `$$` escapes a literal `$` for the container's shell: not a compose variable.
    return (INFRA / "docker-compose.yml").read_text().replace("$$", "")


def test_services_and_references(compose) -> None:
    services = compose["services"]
    assert set(services) == {"minio", "minio-init", "postgres", "prefect", "ray-head"}
    for name, svc in services.items():
        assert svc.get("image"), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert services[dep].get("healthcheck") or cond["condition"] != "service_healthy", (name, dep)
        for vol in svc.get("volumes", []):
            named = vol.split(":")[0]
            assert named in compose["volumes"], f"{name}: volume {named} not declared"
        if svc.get("restart") != "no":  # long-running services report health
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "ports" not in services["postgres"]  # only the Prefect server reaches the database


def test_every_variable_is_set_in_the_env_file(env_example) -> None:
    found = list(VAR.finditer(_compose_text()))
    used = {m.group(1) for m in found}
    assert used, "no variables found"
    missing = sorted(v for v in used if v not in env_example)
    assert not missing, f"compose uses variables that infra/.env.example does not set: {missing}"
    # Required ones (${VAR:?...}) are exactly the credentials: each one is a placeholder to replace.
    required = {m.group(1) for m in found if m.group(2) == ":?"}
    assert {"MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING"} <= required
    for var in ("MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING"):
        assert "CHANGE" in env_example[var].upper(), f"{var}: .env.example must hold a placeholder, not a secret"
    # The Postgres password goes into a URL: letters and digits only.
    assert re.fullmatch(r"[A-Za-z0-9]+", env_example["POSTGRES_PASSWORD"])


def test_ports_agree_with_env_file_and_readme(compose, env_example, readme) -> None:
    published = {}
    for name, svc in compose["services"].items():
        for mapping in svc.get("ports", []):
            m = PORT.match(mapping)
            assert m, f"{name}: port {mapping!r} does not bind to ${{BIND_ADDRESS}} with a *_PORT variable"
            var, default, container = m.groups()
            assert default == container == env_example[var], (name, var, default, container, env_example[var])
            published[var] = (name, int(container))
    assert published == {
        "MINIO_API_PORT": ("minio", 9000),
        "MINIO_CONSOLE_PORT": ("minio", 9001),
        "PREFECT_PORT": ("prefect", 4200),
        "RAY_GCS_PORT": ("ray-head", 6379),
        "RAY_DASHBOARD_PORT": ("ray-head", 8265),
        "RAY_CLIENT_PORT": ("ray-head", 10001),
    }
    assert env_example["BIND_ADDRESS"] == "127.0.0.1"
    # The README's port table names each port with its compose service and variable.
    rows = {int(r[0]): r[2] for r in re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \|$", readme, re.M)}
    for var, (service, port) in published.items():
        assert port in rows, f"infra/README.md has no row for port {port}"
        assert f"`{service}`" in rows[port] and f"`{var}`" in rows[port], (port, rows[port])
    # The clients' URLs in the env file use the same ports.
    assert env_example["PREFECT_API_URL"].endswith(f":{env_example['PREFECT_PORT']}/api")
    assert env_example["UVIT_S3_ENDPOINT_URL"].endswith(f":{env_example['MINIO_API_PORT']}")
    assert env_example["RAY_ADDRESS"].endswith(f":{env_example['RAY_DASHBOARD_PORT']}")


def test_every_setting_is_documented_and_the_env_file_stays_out_of_git(env_example, readme) -> None:
    table = readme[readme.index("## Credentials and settings") :]
    for var in env_example:
        assert f"`{var}`" in table or (var.endswith("_PORT") and "`*_PORT`" in table), f"{var} undocumented"
    assert "infra/.env" in (ROOT / ".gitignore").read_text().split()


def test_images_match_the_client_versions(compose) -> None:
    pins = dict(re.findall(r'"([a-z\[\],]+)==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()))
    prefect = pins["prefect"]
    ray = next(v for k, v in pins.items() if k.startswith("ray"))
    assert compose["services"]["prefect"]["image"].startswith(f"prefecthq/prefect:{prefect}-")
    assert compose["services"]["ray-head"]["image"].startswith(f"rayproject/ray:{ray}-")


def test_ray_cluster_file() -> None:
    cluster = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    nodes = cluster["available_node_types"]
    assert cluster["head_node_type"] in nodes
    assert sum(n.get("max_workers", 0) for name, n in nodes.items() if name != cluster["head_node_type"]) > 0
    assert cluster["provider"]["type"] == "aws"
