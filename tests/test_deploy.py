"""The container recipe and the Kubernetes manifests: the Dockerfile installs what the Makefile installs, and every
manifest is valid for a pinned Kubernetes version (kubernetes-validate's bundled schemas, strict: unknown fields are
errors) and agrees with the server's flags, ports and drain grace."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from embserve.client.cli import main
from embserve.server.config import DEFAULT_METRICS_PORT, DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
HEALTH_SERVICE = "embserve.v1.EmbeddingService"


def _makefile_vars() -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+) :?= (.+)$", (ROOT / "Makefile").read_text(), flags=re.M))


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _docker_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG ([A-Z_]+)=(\S*)$", _dockerfile(), flags=re.M))


def test_dockerfile_pins_the_makefile_versions() -> None:
    make, docker = _makefile_vars(), _docker_args()
    for var in ("TORCH_VERSION", "FBGEMM_VERSION", "TORCHREC_VERSION"):
        assert docker[var] == make[var], f"{var}: Dockerfile {docker[var]} != Makefile {make[var]}"
    # The same fbgemm wheels as the Makefile picks (CUDA hosts: fbgemm-gpu, others: fbgemm-gpu-cpu).
    assert re.search(r"echo fbgemm-gpu \|\| echo fbgemm-gpu-cpu", make["FBGEMM"])
    text = _dockerfile()
    assert "FBGEMM=fbgemm-gpu;" in text and "FBGEMM=fbgemm-gpu-cpu;" in text and docker["VARIANT"] == "cpu"


def test_dockerfile_installs_with_the_makefile_steps_in_order() -> None:
    text = _dockerfile()
    makefile = (ROOT / "Makefile").read_text()
    steps = [
        '"torch==${TORCH_VERSION}"',
        '"${FBGEMM}==${FBGEMM_VERSION}"',
        '--no-deps "torchrec==${TORCHREC_VERSION}"',
        'pip install ".[server]"',
    ]
    positions = [text.find(s) for s in steps]
    assert all(p >= 0 for p in positions), dict(zip(steps, positions))
    assert positions == sorted(positions)
    for make_step in (
        '"torch==$(TORCH_VERSION)"',
        '"$(FBGEMM)==$(FBGEMM_VERSION)"',
        '--no-deps "torchrec==$(TORCHREC_VERSION)"',
    ):
        assert make_step in makefile, f"the Makefile no longer has {make_step}: update the Dockerfile and this test"


def test_dockerfile_runs_unprivileged_and_serves_on_all_interfaces() -> None:
    text = _dockerfile()
    user = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert user and not user[-1].startswith(("root", "0:", "0")), user
    assert re.search(rf"^EXPOSE {DEFAULT_PORT} {DEFAULT_METRICS_PORT}$", text, flags=re.M)
    assert 'ENTRYPOINT ["embserve"]' in text
    assert re.search(r'^CMD \["serve", "--host", "0.0.0.0"', text, flags=re.M)
    assert (ROOT / "LICENSE").is_file()  # copied into the image


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs.append((path.name, doc))
    return docs


def _kind(kind: str) -> dict[str, Any]:
    found = [d for _, d in _documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize(("name", "doc"), _documents(), ids=[f"{n}:{d['kind']}" for n, d in _documents()])
def test_manifest_is_valid_for_the_pinned_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validator_rejects_what_kubernetes_would() -> None:
    """The schemas really are applied: an unknown field and a wrong type in the Deployment both fail."""
    deployment = _kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {**deployment, "spec": {**deployment["spec"], "replica": 2}}, KUBERNETES_VERSION, strict=True
        )
    bad = {**container, "readinessProbe": {"grpc": {"port": "grpc"}}}  # gRPC probes take a number, not a name
    spec = {**deployment["spec"]["template"]["spec"], "containers": [bad]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {
                **deployment,
                "spec": {**deployment["spec"], "template": {**deployment["spec"]["template"], "spec": spec}},
            },
            KUBERNETES_VERSION,
            strict=True,
        )


def _flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} appears {len(values)} times in {args}"
    return values[0]


def test_deployment_agrees_with_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[0] == "serve"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for arg in args[1:]:
        assert arg.split("=", 1)[0] in help_text, f"{arg} is not an `embserve serve` flag"

    grpc_port, metrics_port = int(_flag(args, "port")), int(_flag(args, "metrics-port"))
    assert _flag(args, "host") == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    # Native gRPC probes on the health service; readiness follows the embedding service, which drains first.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    # Kubernetes must wait out the drain: the grace period exceeds the server's, plus the preStop pause.
    grace = float(_flag(args, "grace-period"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    # A draining pod is not restarted by liveness before its drain ends.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The checkpoint and model come from the mounted volume.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert _flag(args, "checkpoint").startswith(mount["mountPath"] + "/")
    assert _flag(args, "model").startswith(mount["mountPath"] + "/")
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    assert claim == _kind("PersistentVolumeClaim")["metadata"]["name"]


def test_service_autoscaler_budget_and_scrape_select_the_deployment() -> None:
    deployment = _kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _kind("Service")["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS answers every pod, for dns:/// round robin
    assert service["selector"].items() <= labels.items()
    assert {p["name"]: p["targetPort"] for p in service["ports"]}["grpc"] == "grpc"
    assert _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 0 < hpa["minReplicas"] <= hpa["maxReplicas"]
    scrape = yaml.safe_load(_kind("ConfigMap")["data"]["prometheus.yml"])["scrape_configs"][0]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in scrape["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == labels["app.kubernetes.io/name"]


SHARDED = MANIFESTS / "sharded"


def _sharded_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(SHARDED.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs.append((path.name, doc))
    return docs


def _sharded(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _sharded_documents() if d["kind"] == kind}


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "doc"),
    _sharded_documents(),
    ids=[f"sharded/{n}:{d['kind']}:{d['metadata']['name']}" for n, d in _sharded_documents()],
)
def test_sharded_manifest_is_valid_for_the_pinned_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_sharded_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((SHARDED / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in SHARDED.glob("*.yaml") if p.name != "kustomization.yaml")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _check_pod(deployment: dict[str, Any], args: list[str]) -> None:
    """What every embserve pod must get right: ports, probes on the health service, the drain's grace, the
    model volume, an unprivileged user."""
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    grpc_port, metrics_port = int(_flag(args, "port")), int(_flag(args, "metrics-port"))
    assert _flag(args, "host") == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    grace = float(_flag(args, "grace-period"))
    assert pod["terminationGracePeriodSeconds"] > grace + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace
    assert pod["securityContext"]["runAsNonRoot"] is True
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    for flag in ("model", "plan"):
        assert _flag(args, flag).startswith(mount["mountPath"] + "/"), flag
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    assert claim in _sharded("PersistentVolumeClaim")


def test_sharded_deployments_agree_with_the_server_and_the_router(capsys: pytest.CaptureFixture[str]) -> None:
    serve_help, route_help = _help("serve", capsys), _help("route", capsys)
    deployments = _sharded("Deployment")
    shards: dict[int, dict[str, Any]] = {}
    routers = []
    for deployment in deployments.values():
        args = _container(deployment)["args"]
        assert args[0] in ("serve", "route")
        for arg in args[1:]:
            flag = arg.split("=", 1)[0]
            assert flag in (serve_help if args[0] == "serve" else route_help), (
                f"{arg} is not an `embserve {args[0]}` flag"
            )
        _check_pod(deployment, args)
        if args[0] == "serve":
            shard = int(_flag(args, "shard"))
            assert shard not in shards, f"two Deployments serve shard {shard}"
            assert _flag(args, "checkpoint").startswith("/models/")
            shards[shard] = deployment
        else:
            routers.append((deployment, args))
    assert sorted(shards) == list(range(len(shards))) and len(shards) >= 2
    assert len(routers) == 1
    router, args = routers[0]
    # One address per shard, naming that shard's Service on its gRPC port.
    addresses = [a.split("=", 1)[1] for a in args if a.startswith("--shard-address=")]
    given = {int(a.split("=", 1)[0]): a.split("=", 1)[1] for a in addresses}
    assert sorted(given) == sorted(shards) and len(addresses) == len(shards)
    services = _sharded("Service")
    for k, target in given.items():
        host, port = target.removeprefix("dns:///").rsplit(":", 1)
        service = services[host.split(".")[0]]
        assert service["spec"]["clusterIP"] == "None"  # headless: the router's dns:/// target resolves every replica
        assert int(port) == {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
        assert _selects(service["spec"]["selector"]) == [shards[k]["metadata"]["name"]], f"shard {k}'s Service"
    assert _flag(args, "plan") == _flag(_container(shards[0])["args"], "plan")


def _selects(selector: dict[str, str]) -> list[str]:
    """The sharded Deployments whose pods `selector` matches."""
    return [
        name
        for name, d in _sharded("Deployment").items()
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def test_each_sharded_deployment_has_its_own_service_and_budget() -> None:
    deployments = _sharded("Deployment")
    for kind in ("Service", "PodDisruptionBudget"):
        covered = []
        for name, doc in _sharded(kind).items():
            selector = doc["spec"]["selector"] if kind == "Service" else doc["spec"]["selector"]["matchLabels"]
            selected = _selects(selector)
            assert len(selected) == 1, f"{kind} {name} selects {selected}"
            covered += selected
        assert sorted(covered) == sorted(deployments), kind
    for name, deployment in deployments.items():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        assert deployment["spec"]["replicas"] >= 2, f"{name}: one replica leaves its shard down during a rollout"
