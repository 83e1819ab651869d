"""Static checks of the deployment files: the compose profiles, the nginx
template's streaming settings, the Prometheus/Grafana wiring to the metrics
the server really exports, the Kubernetes manifests, and the Dockerfile's
promises. (``make docker-check`` builds and runs them for real.)"""

import json
import re

import yaml

from server.metrics import Metrics
from tests.deploy.conftest import NGINX_TEMPLATE, REPO


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_and_profiles() -> None:
    services = load_compose()["services"]
    assert "profiles" not in services["tokenstep"]
    assert services["tokenstep"]["ports"] == ["${TOKENSTEP_HOST_PORT:-8000}:8000"]
    assert {name: service.get("profiles") for name, service in services.items() if name != "tokenstep"} == {
        "replica": ["scale"],
        "nginx": ["scale"],
        "prometheus": ["observability"],
        "grafana": ["observability"],
    }
    for name in ("tokenstep", "replica"):
        service = services[name]
        assert service["healthcheck"]["test"] == ["CMD", "python", "/opt/tokenstep/healthcheck.py"]
        assert any(volume.endswith(":/models:ro") for volume in service["volumes"])
        assert "hf-cache:/cache" in service["volumes"]


def test_compose_bind_mounts_exist() -> None:
    for service in load_compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./docker/"):
                assert (REPO / source).exists(), f"{source} is mounted but missing"


def test_nginx_template_is_safe_for_server_sent_events() -> None:
    template = NGINX_TEMPLATE.read_text()
    for directive in (
        "least_conn;",
        "hash $http_x_session_id consistent;",
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "keepalive 32;",
    ):
        assert directive in template
    read_timeout_s = int(re.search(r"proxy_read_timeout (\d+)s;", template).group(1))
    assert read_timeout_s >= 600, "a long generation must not hit the proxy's read timeout"


def test_compose_sets_every_nginx_template_variable() -> None:
    used = set(re.findall(r"\$\{(\w+)\}", NGINX_TEMPLATE.read_text()))
    assert used == set(load_compose()["services"]["nginx"]["environment"])


def exported_metric_names() -> set[str]:
    """Names in a real /metrics scrape (histograms) plus the engine collector's
    families (only reported once a model is loaded), as Prometheus sees them."""
    scraped = Metrics(lambda: None).render().decode()
    names = {line.split()[2] for line in scraped.splitlines() if line.startswith("# TYPE")}
    source = (REPO / "server" / "metrics.py").read_text()
    names |= set(re.findall(r'GaugeMetricFamily\(\s*"(\w+)"', source))
    names |= {f"{name}_total" for name in re.findall(r'CounterMetricFamily\(\s*"(\w+)"', source)}
    return names


def test_grafana_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "tokenstep.json").read_text())
    exported = exported_metric_names()
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\btokenstep_\w+", target["expr"])}
    assert queried <= exported, f"dashboard queries unknown metrics: {queried - exported}"
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("first token", "inter-token", "tokens per second", "running", "kv cache", "preemptions"):
        assert topic in titles


def test_prometheus_scrapes_every_tokenstep_service() -> None:
    config = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    [discovery] = job["dns_sd_configs"]
    assert job["metrics_path"] == "/metrics" and discovery["port"] == 8000
    assert set(discovery["names"]) == {"tokenstep", "replica"}


def test_kubernetes_manifests() -> None:
    documents = {}
    for path in sorted((REPO / "docker" / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    assert set(documents) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    deployment, service, autoscaler = documents["Deployment"], documents["Service"], documents["HorizontalPodAutoscaler"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [port] = container["ports"]
    assert port["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]


def test_dockerfile_promises() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    # BuildKit would pull a frontend image for a syntax line: no registry in CI.
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.MULTILINE | re.IGNORECASE)
    assert dockerfile.count("\nFROM ") >= 2, "multi-stage"
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert "\nEXPOSE 8000\n" in dockerfile and "\nHEALTHCHECK " in dockerfile
    assert "python -m venv /opt/venv" in dockerfile, "the CI stand-in base allows no system pip installs"
