"""The example kdgate configs under deploy/ load with the real settings model, and the files
generated from other files (PrometheusRule) are current."""

from __future__ import annotations

import base64
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from kdgate.service.settings import load_settings
from kdgate.service.traffic_store import TrafficStore

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SECRET = "whsec_" + base64.b64encode(b"a real secret for the test: 32 b").decode()


def test_gateway_config_shadows_a_remote_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDGATE_WEBHOOK__SECRET", SECRET)
    settings = load_settings(DEPLOY / "gateway.yaml", environ={})
    (model,) = settings.models
    assert model.teacher is not None and model.teacher.url == "http://teacher:8001"
    assert model.teacher.model == "digits-teacher"
    assert all(student.card.is_file() for student in model.students)
    assert settings.webhook.url is not None


def test_gateway_config_needs_the_webhook_secret_from_the_environment() -> None:
    with pytest.raises(ValueError, match=r"webhook\.secret"):
        load_settings(DEPLOY / "gateway.yaml", environ={})


def test_teacher_config_serves_the_teacher_under_the_gateways_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KDGATE_WEBHOOK__SECRET", SECRET)
    teacher = load_settings(DEPLOY / "teacher.yaml", environ={})
    gateway = load_settings(DEPLOY / "gateway.yaml", environ={})
    (served,) = teacher.models
    assert gateway.models[0].teacher is not None
    assert served.name == gateway.models[0].teacher.model
    assert served.teacher is None and served.traffic.shadow_fraction == 0
    assert served.students[0].card.is_file()


def test_image_config_uses_the_models_baked_into_the_image() -> None:
    settings = load_settings(DEPLOY / "kubernetes" / "base" / "config.yaml", environ={})
    (model,) = settings.models
    cards = [s.card for s in model.students] + [model.teacher.card if model.teacher else None]
    for card in cards:
        assert card is not None and card.is_absolute()
        relative = card.relative_to("/opt/kdgate")  # the Dockerfile copies models/ there
        assert (ROOT / relative).is_file(), relative


def test_dockerfile_is_slim_non_root_without_torch() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    (extras,) = re.findall(r"pip install .*-c constraints\.txt '\.\[([^\]]*)\]'", text)
    assert extras.split(",") == ["drift"], "the serving image must not install torch (train)"
    assert "USER 10001" in text
    assert "/v2/health/ready" in text.split("HEALTHCHECK")[1]
    assert 'CMD ["serve", "--config", "/etc/kdgate/config.yaml", "--host", "0.0.0.0"]' in text


def test_prometheusrule_wraps_the_current_rule_files() -> None:
    path = DEPLOY / "kubernetes" / "render_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("render_prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (DEPLOY / "kubernetes" / "base" / "prometheusrule.yaml").read_text()
    assert committed == module.render(), (
        f"stale PrometheusRule: run python {path.relative_to(ROOT)}"
    )


def test_kubernetes_pods_are_a_fleet_and_the_image_default_is_one_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Deployment's plain env turns the image config into fleet mode: the pods' monitors
    evaluate, and retrain requests come once from the PrometheusRule through Alertmanager."""
    config = DEPLOY / "kubernetes" / "base" / "config.yaml"
    assert load_settings(config, environ={}).slo.evaluator == "local"
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for variable in container["env"]:
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    # The Secret's value (from secretKeyRef), as the pod would get it.
    monkeypatch.setenv("KDGATE_WEBHOOK__SECRET", "whsec_" + base64.b64encode(bytes(32)).decode())
    assert load_settings(config, environ={}).slo.evaluator == "fleet"


def test_the_kubernetes_traffic_file_is_valid_and_agrees_with_the_config() -> None:
    base = DEPLOY / "kubernetes" / "base"
    settings = load_settings(base / "config.yaml", environ={})
    assert settings.traffic.read_only is True
    assert settings.traffic_file == Path("/etc/kdgate-traffic/traffic.yaml")
    # Read from the repository copy, as the pod reads it from the mounted ConfigMap.
    restored = TrafficStore(base / "traffic.yaml").restore(settings)
    assert restored.differences == {}
    assert restored.settings == settings
