"""Every rendered manifest validates offline, and the workloads keep deploy/README.md's promises."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engine.settings import Settings
from tests.deploy.conftest import DEPLOY, OVERLAYS, ROOT, find, render

# Renders the overlays with kubectl.
pytestmark = pytest.mark.slow

K8S_VERSION = kubernetes_validate.utils.latest_version()
SCHEMAS = Path(__file__).parent / "schemas"
PRIVATE_RANGES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
)
QUEUE = "cargolint.webhooks.events"
_WORKER = "cargolint-webhooks-worker"
_API = "cargolint-webhooks-api"

Doc = dict[str, Any]


def _cr_schema(doc: Doc) -> Doc | None:
    group_version = doc["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group_version}_{doc['kind']}.json"
    return json.loads(path.read_text()) if path.exists() else None


def validate(doc: Doc) -> None:
    """Strict Kubernetes schema for built-in kinds; our CRD stand-ins for custom resources."""
    schema = _cr_schema(doc)
    if schema is not None:
        jsonschema.validate(doc, schema)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def deployments(docs: tuple[Doc, ...]) -> list[Doc]:
    return [d for d in docs if d["kind"] == "Deployment"]


def settings_env(docs: tuple[Doc, ...]) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return dict(config["data"])


def secret_example() -> Doc:
    docs: list[Doc] = list(yaml.safe_load_all((DEPLOY / "secret.example.yaml").read_text()))
    (secret,) = docs
    return secret


@pytest.mark.parametrize("path", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_rendered_manifest_validates(path: str) -> None:
    docs = render(path)
    assert docs
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{path}: no schema for {doc['apiVersion']} {doc['kind']}")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_secret_example_validates_and_holds_placeholders_only() -> None:
    secret = secret_example()
    validate(secret)
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert "CHANGE_ME" in value, f"{key} must be a placeholder"


def test_the_validators_are_strict() -> None:
    """Guard the tests above: an unknown field is an error, not a silent pass."""
    worker = copy.deepcopy(find(render("base"), "Deployment", "cargolint-webhooks-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(worker)
    scaled = copy.deepcopy(find(render("overlays/production"), "ScaledObject", _WORKER))
    scaled["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    rules = find(render("overlays/production"), "PrometheusRule", "cargolint-webhooks")
    rule = copy.deepcopy(rules)
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_valid_and_known(overlay: str) -> None:
    """The ConfigMap (with the example Secret) builds Settings, and holds no unknown variable."""
    env = settings_env(render(f"overlays/{overlay}"))
    known = set(re.findall(r'"(CARGOLINT_[A-Z_]+)"', (ROOT / "engine/settings.py").read_text()))
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    secrets = dict(secret_example()["stringData"])
    secrets.pop("CARGOLINT_SECRET_KEY")  # a placeholder is, rightly, not a valid Fernet key
    settings = Settings.from_env({**env, **secrets})
    assert settings.api_host == "0.0.0.0"  # reachable through the Service
    assert settings.metrics_port == 9100


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_hardened_sized_and_spread(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    grace = float(settings_env(docs)["CARGOLINT_SHUTDOWN_GRACE"])
    assert {d["metadata"]["name"] for d in deployments(docs)} == {_API, _WORKER}
    for deployment in deployments(docs):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > grace, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) >= {"cpu", "memory"}, where
        keys = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
        assert "kubernetes.io/hostname" in keys, name
        assert len(keys) == len(set(keys)), f"{name}: one constraint per topology key"
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname", name


def test_production_spreads_workers_hard() -> None:
    worker = find(render("overlays/production"), "Deployment", _WORKER)
    (hostname,) = [
        c
        for c in worker["spec"]["template"]["spec"]["topologySpreadConstraints"]
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    assert hostname["whenUnsatisfiable"] == "DoNotSchedule"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_use_the_metrics_port(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    port = int(settings_env(docs)["CARGOLINT_METRICS_PORT"])
    worker = find(docs, "Deployment", _WORKER)
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["worker"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_run_before_the_app_starts(overlay: str) -> None:
    """Each pod's first init container runs `migrate` from the same image and settings."""
    for deployment in deployments(render(f"overlays/{overlay}")):
        pod = deployment["spec"]["template"]["spec"]
        (app,) = pod["containers"]
        migrate = pod["initContainers"][0]
        assert migrate["args"] == ["migrate"]
        assert migrate["image"] == app["image"]
        assert migrate["envFrom"] == app["envFrom"]
        assert app["image"].startswith("registry.example.com/cargolint/cargolint-webhooks:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for deployment in deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, deployment["metadata"]["name"]


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}
    return bool(selector["matchLabels"].items() <= labels.items())


@pytest.mark.parametrize("name", [_WORKER, _API])
def test_network_policy_allows_public_https_but_no_private_range(name: str) -> None:
    docs = render("overlays/production")
    policy = find(docs, "NetworkPolicy", name)
    pod_labels = find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"], pod_labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    allowed: dict[str, set[int]] = {}
    for rule in policy["spec"]["egress"]:
        assert rule.get("to"), "an egress rule without `to` would allow every destination"
        ports = {p["port"] for p in rule["ports"]}
        for peer in rule["to"]:
            if "ipBlock" in peer:
                block = peer["ipBlock"]
                assert ports == {443}, "the internet is reachable on 443 only"
                network = ipaddress.ip_network(block["cidr"])
                excepted = [ipaddress.ip_network(e) for e in block["except"]]
                if network.version == 4:
                    assert network.prefixlen == 0
                    for private in map(ipaddress.ip_network, PRIVATE_RANGES):
                        assert any(private.subnet_of(e) for e in excepted), private  # type: ignore[arg-type]
            else:
                target = peer["podSelector"]["matchLabels"]
                key = target.get("app.kubernetes.io/name") or target.get("k8s-app")
                allowed.setdefault(key, set()).update(ports)
    assert allowed == {"kube-dns": {53}, "postgresql": {5432}, "rabbitmq": {5672, 5671}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_one_autoscaler_owns_the_worker(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    worker = find(docs, "Deployment", _WORKER)
    assert "replicas" not in worker["spec"], "apply must not reset the autoscaler's count"
    owners = [
        d
        for d in docs
        if d["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}
        and d["spec"]["scaleTargetRef"]["name"] == _WORKER
    ]
    assert len(owners) == 1, [d["kind"] for d in owners]
    assert owners[0]["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_keda_scales_on_the_events_queue_with_the_workers_credentials() -> None:
    docs = render("overlays/production")
    scaled = find(docs, "ScaledObject", _WORKER)
    (rabbit,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"]
    assert rabbit["metadata"]["queueName"] == QUEUE
    assert rabbit["metadata"]["mode"] == "QueueLength"
    auth = find(docs, "TriggerAuthentication", rabbit["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref == {"parameter": "host", "name": "cargolint-webhooks", "key": "CARGOLINT_AMQP_URL"}
    assert ref["key"] in secret_example()["stringData"]
    assert scaled["spec"]["minReplicaCount"] >= 2


def test_monitors_select_the_pods_and_ports_that_serve_metrics() -> None:
    docs = render("overlays/production")
    pod_monitor = find(docs, "PodMonitor", _WORKER)
    worker = find(docs, "Deployment", _WORKER)["spec"]["template"]
    assert _selects(pod_monitor["spec"]["selector"], worker["metadata"]["labels"])
    worker_ports = {p["name"] for c in worker["spec"]["containers"] for p in c["ports"]}
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in worker_ports
        assert endpoint["path"] == "/metrics"
    service_monitor = find(docs, "ServiceMonitor", _API)
    service = find(docs, "Service", _API)
    assert _selects(service_monitor["spec"]["selector"], service["metadata"]["labels"])
    for endpoint in service_monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
    api_pod = find(docs, "Deployment", _API)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= api_pod.items()


def test_small_overlay_needs_no_custom_resource_definitions() -> None:
    kinds = {d["kind"] for d in render("overlays/small")}
    assert not kinds & {"ScaledObject", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert "HorizontalPodAutoscaler" in kinds


def test_production_overlay_brings_autoscaling_and_monitoring() -> None:
    kinds = {d["kind"] for d in render("overlays/production")}
    wanted = {"ScaledObject", "TriggerAuthentication", "PodMonitor", "ServiceMonitor"}
    assert kinds >= wanted | {"PrometheusRule"}
    assert "HorizontalPodAutoscaler" not in kinds
