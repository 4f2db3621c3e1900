"""The deployment files: ``deploy/k8s/`` against the Kubernetes schemas, and every flag and ``COMMUTATOR_*``
variable that a manifest or ``docker/compose.yaml`` sets checked to exist in its role's config.

Flags and variables: every manifest in ``deploy/k8s/`` (``command``/``args``/``env``/``envFrom`` of each
container, ConfigMaps resolved) and ``docker/compose.yaml`` (``entrypoint``/``command``/``environment`` of each
service, YAML anchors and merge keys resolved by the YAML loader). A container is a role's when its command
runs ``python -m commutator.<role>`` (or, with the image's ``python -m`` entrypoint, starts with
``commutator.<role>``), else when its image is ``commutator/<role>`` or its compose build target is the role.
The known names come from the role's config dataclass the way :mod:`commutator.common.config` derives them
(field ``foo_bar``: ``--foo-bar``, ``--no-foo-bar`` for a boolean, ``COMMUTATOR_FOO_BAR``), not from
``--help``; then the role's own loader reads the whole command line and environment, so a bad value
(``--router-mode=bogus``, ``--grpc-port=x``) fails too.

Manifests: valid against the schemas ``kubernetes-validate`` ships (strict, offline), and held to what the
roles do: probes on the port each serves ``/health`` and ``/live`` on, the pod IP advertised, a termination
grace that covers the drain grace, the planner's rights limited to scaling the worker Deployments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from commutator.common import config as cfg
from commutator.decode.config import DecodeConfig
from commutator.frontend.config import FrontendConfig
from commutator.prefill.config import PrefillConfig
from commutator.router.config import RouterServiceConfig

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
K8S_DIR = REPO / "deploy" / "k8s"
COMPOSE_FILE = REPO / "docker" / "compose.yaml"

ROLES: dict[str, type[Any]] = {
    "frontend": FrontendConfig,
    "router": RouterServiceConfig,
    "decode": DecodeConfig,
    "prefill": PrefillConfig,
}
# Variables every process reads outside its config dataclass: name -> the module that reads it.
PROCESS_ENV = {
    "COMMUTATOR_LOG": "commutator.common.logging",
    "COMMUTATOR_LOG_FORMAT": "commutator.common.logging",
    "COMMUTATOR_PROFILE": "commutator.common.runtime",
    "COMMUTATOR_MODEL_DIR": "commutator.engines.tiny_model",
}
# What the pod IP (valueFrom status.podIP) stands for when a config is loaded; other values the files do not
# hold (a secret, compose's pass-through `- KEY`) are None: their names are checked, their values are not.
POD_IP = "10.0.0.1"


@dataclasses.dataclass(frozen=True)
class Container:
    """One process a deployment file starts: its command line, environment, image and where it is written."""

    where: str
    image: str
    argv: tuple[str, ...]
    env: Mapping[str, str | None]
    build_target: str = ""


# ---- the names a role knows ------------------------------------------------------------------------------


def _leaves(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            yield from _leaves(hints[f.name])
        else:
            yield f, hints[f.name]


def known_flags(cls: type[Any]) -> set[str]:
    flags = set()
    for f, tp in _leaves(cls):
        is_bool = tp is bool
        if is_bool and f.name.startswith("no_") and f.default is False:
            flags.add(cfg.flag_name(f.name))  # the single switch --no-foo
        elif is_bool:
            flags |= {cfg.flag_name(f.name), "--no-" + f.name.replace("_", "-")}
        else:
            flags.add(cfg.flag_name(f.name))
    return flags


def known_env(cls: type[Any]) -> set[str]:
    return {cfg.env_var(f.name) for f, _ in _leaves(cls)}


# ---- reading the files -----------------------------------------------------------------------------------


def _resolve_k8s_refs(text: str, env: Mapping[str, str | None]) -> str:
    """Kubernetes' ``$(VAR)`` in a command or argument: the container's variable, ``$$`` for a literal ``$``."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m[0] == "$$" else (env.get(m[1]) or m[0]), text)


def _k8s_value(var: Mapping[str, Any]) -> str | None:
    if "value" in var:
        return str(var["value"])
    if var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
        return POD_IP
    return None


def k8s_docs(path_or_text: Path | str, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """The objects of a manifest file (or text), each with where it is written."""
    if isinstance(path_or_text, Path):
        where, path_or_text = str(path_or_text.relative_to(REPO)), path_or_text.read_text()
    return [(where, d) for d in yaml.safe_load_all(path_or_text) if isinstance(d, dict)]


def k8s_containers(docs: Iterable[tuple[str, dict[str, Any]]]) -> list[Container]:
    """The containers (init containers too) of every workload among ``docs`` (objects with the file each is
    in); ``envFrom`` ConfigMaps resolved from the ConfigMaps among ``docs`` (a missing one is an error)."""
    docs = list(docs)
    config_maps = {d["metadata"]["name"]: d.get("data") or {} for _, d in docs if d.get("kind") == "ConfigMap"}
    out = []
    for where, doc in docs:
        spec = doc.get("spec") or {}
        pod = (spec.get("jobTemplate", {}).get("spec", spec).get("template") or {}).get("spec")
        if doc.get("kind") == "Pod":
            pod = spec
        if not pod:
            continue
        for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            label = f"{where}: {doc['kind']}/{doc['metadata']['name']} container {c['name']}"
            env: dict[str, str | None] = {}
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref is None:
                    continue  # secretRef: its keys are not in the files
                if ref["name"] not in config_maps:
                    raise AssertionError(f"{label}: envFrom ConfigMap {ref['name']!r} is not among the manifests")
                env.update({source.get("prefix", "") + k: str(v) for k, v in config_maps[ref["name"]].items()})
            for var in c.get("env", []):
                env[var["name"]] = _k8s_value(var)
            env = {k: None if v is None else _resolve_k8s_refs(v, env) for k, v in env.items()}
            argv = tuple(_resolve_k8s_refs(str(a), env) for a in [*c.get("command", []), *c.get("args", [])])
            out.append(Container(label, c.get("image", ""), argv, env))
    return out


def _interpolate(text: str) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` as if no variable were set; ``$$``: ``$``."""
    return re.sub(r"\$\$|\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: "$" if m[0] == "$$" else (m[2] or ""), text)


def _words(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(_interpolate(value))
    return [_interpolate(str(v)) for v in value]


def compose_containers(doc: Any, where: str) -> list[Container]:
    out = []
    for name, svc in ((doc or {}).get("services") or {}).items():
        environment = svc.get("environment") or {}
        if isinstance(environment, list):  # ["KEY=value", "KEY"]
            environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
        env = {k: None if v is None else _interpolate(str(v)) for k, v in environment.items()}
        argv = tuple(_words(svc.get("entrypoint")) + _words(svc.get("command")))
        build = svc.get("build")
        target = build.get("target", "") if isinstance(build, dict) else ""
        dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
        image = svc.get("image", "") or ("commutator" if "Dockerfile" in dockerfile else "")
        out.append(Container(f"{where}: service {name}", image, argv, env, target))
    return out


def all_containers() -> list[Container]:
    docs = [d for path in sorted(K8S_DIR.glob("*.yaml")) if path.name != "kustomization.yaml" for d in k8s_docs(path)]
    containers = k8s_containers(docs)
    if COMPOSE_FILE.exists():
        containers += compose_containers(yaml.safe_load(COMPOSE_FILE.read_text()), str(COMPOSE_FILE.relative_to(REPO)))
    return containers


# ---- which role, and the check ---------------------------------------------------------------------------


def module_of(c: Container) -> tuple[str | None, tuple[str, ...]]:
    """The ``commutator.*`` module a container runs and the arguments it gets, or (None, argv)."""
    argv = c.argv
    for i, word in enumerate(argv):
        if word == "-m" and i + 1 < len(argv) and argv[i + 1].startswith("commutator."):
            return argv[i + 1], argv[i + 2 :]
    if argv and argv[0].startswith("commutator."):  # the image's entrypoint is `python -m`
        return argv[0], argv[1:]
    return None, argv


def role_of(c: Container) -> tuple[str | None, tuple[str, ...]]:
    """(role, its arguments): the role is the ``commutator.*`` module after ``commutator.`` (a non-role module
    such as ``engines.tiny_model`` too), None for a container that is not Commutator's. ValueError for a
    Commutator container whose role cannot be told, or an image named for no role."""
    module, args = module_of(c)
    if module is not None:
        return module.removeprefix("commutator."), args
    name = c.image.rsplit(":", 1)[0] if ":" in c.image.rsplit("/", 1)[-1] else c.image
    m = re.fullmatch(r"(?:.*/)?commutator[/-](\w+)", name)
    if m:
        if m[1] not in ROLES:
            raise ValueError(f"{c.where}: image {c.image} is named for no role (roles: {', '.join(ROLES)})")
        return m[1], args
    if c.build_target in ROLES:
        return c.build_target, args
    if "commutator" in c.image or any(k.startswith(cfg.ENV_PREFIX) for k in c.env):
        raise ValueError(f"{c.where}: a Commutator container whose role cannot be told (command {list(c.argv)})")
    return None, args


def _runnable(module: str) -> bool:
    """Whether ``python -m module`` runs something: a module, or a package with a ``__main__``."""
    try:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(module + ".__main__")
    except ImportError:
        return False
    return spec is not None


def problems(c: Container) -> list[str]:
    """What is wrong with the flags and variables ``c`` sets; empty when nothing is."""
    try:
        role, args = role_of(c)
    except ValueError as exc:
        return [str(exc)]
    if role is None:
        return []
    if not _runnable("commutator." + role):
        return [f"{c.where}: python -m commutator.{role} runs nothing (no such module, or a package without __main__)"]
    ours = {k: v for k, v in c.env.items() if k.startswith(cfg.ENV_PREFIX)}
    if role not in ROLES:
        # Another commutator module (the tiny model's builder): its flags are its own argparse's; the
        # variables it inherits must still be ones some role reads.
        everyone = set(PROCESS_ENV).union(*(known_env(cls) for cls in ROLES.values()))
        return [f"{c.where}: {k} is read by no role" for k in sorted(set(ours) - everyone)]
    cls = ROLES[role]
    out = []
    flags, env = known_flags(cls), known_env(cls) | set(PROCESS_ENV)
    for word in args:
        if word.startswith("--") and word.split("=", 1)[0] not in flags:
            out.append(f"{c.where}: {word.split('=', 1)[0]} is no flag of {role} ({cls.__name__})")
    for k in sorted(set(ours) - env):
        out.append(f"{c.where}: {k} is no variable of {role} ({cls.__name__})")
    if out:
        return out
    try:
        effective_config(cls, args, {k: v for k, v in ours.items() if v is not None}, role)
    except ValueError as exc:
        out.append(f"{c.where}: {role} rejects its settings: {exc}")
    return out


def effective_config(cls: type[Any], args: Iterable[str], env: Mapping[str, str], role: str = "") -> Any:
    """The config the role's own loader makes of ``args`` and ``env``; ValueError with its message if it
    refuses them (the loader exits with a usage message, as the process would)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cfg.load(cls, list(args), env=dict(env), prog=f"python -m commutator.{role}")
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1]) from None


def role_containers() -> list[tuple[Container, str, tuple[str, ...]]]:
    out = []
    for c in all_containers():
        role, args = role_of(c)
        if role in ROLES:
            out.append((c, role, args))
    return out


# ---- tests -----------------------------------------------------------------------------------------------


def test_every_file_sets_only_flags_and_variables_its_role_has() -> None:
    containers = all_containers()
    found = [p for c in containers for p in problems(c)]
    assert found == [], "\n".join(found)
    roles = {role_of(c)[0] for c in containers}
    # The check saw what it should: every role of the manifests, and the compose file's services.
    assert {"frontend", "router", "decode", "prefill"} <= roles
    assert any(c.where.startswith("docker/compose.yaml") and role_of(c)[0] in ROLES for c in containers)


def test_process_variables_are_read_where_the_check_says() -> None:
    for name, module in PROCESS_ENV.items():
        assert name in inspect.getsource(importlib.import_module(module)), f"{module} no longer reads {name}"


def test_known_names_follow_the_config_rules() -> None:
    flags = known_flags(DecodeConfig)
    assert {"--engine", "--grpc-port", "--advertise-host", "--drain-grace-s", "--speedup-ratio"} <= flags
    assert {"--kv-events", "--no-kv-events", "--router-replica-sync"} <= known_flags(FrontendConfig)
    assert "--no-uvloop" in flags and "--no-no-uvloop" not in flags and "--uvloop" not in flags
    assert "COMMUTATOR_ADVERTISE_HOST" in known_env(RouterServiceConfig)
    assert "COMMUTATOR_ADVERTISE_HOST" not in known_env(FrontendConfig)  # the frontend serves no gRPC
    # The parser agrees: every name the check accepts, the role's loader takes.
    for cls in ROLES.values():
        parser_flags = {s for a in cfg.parser(cls)._actions for s in a.option_strings} - {"-h", "--help"}
        assert known_flags(cls) == parser_flags


BAD_MANIFEST = """
apiVersion: v1
kind: ConfigMap
metadata: {name: shared}
data:
  COMMUTATOR_ETCD_ENDPOINTS: etcd:2379
  COMMUTATOR_NO_SUCH_SETTING: "1"
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: decode}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers:
        - name: decode
          image: commutator/decode:latest
          args: ["--engine=mocker", "--no-such-flag", "7", "--grpc-port", "50051"]
          envFrom: [{configMapRef: {name: shared}}]
          env:
            - name: COMMUTATOR_ADVERTISE_HOST
              valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - name: frontend
          image: registry.example/commutator/frontend:1.0
          command: [python, -m, commutator.frontend]
          args: ["--router-mode=bogus"]
          env: [{name: COMMUTATOR_GRPC_HOST, value: 0.0.0.0}]
        - name: stranger
          image: commutator/unknown:latest
          env: [{name: COMMUTATOR_LOG, value: info}]
        - name: planner
          image: commutator/planner:latest
          command: [python, -m, commutator.planner]
"""

BAD_COMPOSE = """
x-common: &common
  image: commutator:latest
  environment: &env
    COMMUTATOR_NATS_URL: nats://nats:4222
    COMMUTATOR_NATS_URLS: nats://nats:4222
services:
  etcd:
    image: quay.io/coreos/etcd:v3.5.17
    command: [etcd, --name=etcd]
  router:
    <<: *common
    command: commutator.router --grpc-port ${ROUTER_PORT:-50051} --router-replica-sink
  decode:
    <<: *common
    entrypoint: [python, -m]
    command: [commutator.decode, --engine, mocker]
    environment:
      <<: *env
      COMMUTATOR_SPEEDUP_RATIO: "1"
  prefill:
    build: {context: .., dockerfile: docker/Dockerfile, target: prefill}
    command: [--max-concurrent-prefills, "2", --stream-intervall-ms, "1"]
  model:
    <<: *common
    command: [commutator.engines.tiny_model, /models/tiny-llama]
"""


def test_a_bad_manifest_is_caught_with_each_unknown_name() -> None:
    found = [p for c in k8s_containers(k8s_docs(BAD_MANIFEST, "bad.yaml")) for p in problems(c)]
    assert found == [
        "bad.yaml: Deployment/decode container decode: --no-such-flag is no flag of decode (DecodeConfig)",
        "bad.yaml: Deployment/decode container decode: COMMUTATOR_NO_SUCH_SETTING is no variable of decode"
        " (DecodeConfig)",
        "bad.yaml: Deployment/decode container frontend: COMMUTATOR_GRPC_HOST is no variable of frontend"
        " (FrontendConfig)",
        "bad.yaml: Deployment/decode container stranger: image commutator/unknown:latest is named for no role"
        " (roles: frontend, router, decode, prefill)",
        "bad.yaml: Deployment/decode container planner: python -m commutator.planner runs nothing (no such module,"
        " or a package without __main__)",
    ]


def test_a_bad_compose_file_is_caught_through_anchors_and_merge_keys() -> None:
    containers = compose_containers(yaml.safe_load(BAD_COMPOSE), "compose.yaml")
    assert [role_of(c)[0] for c in containers] == [None, "router", "decode", "prefill", "engines.tiny_model"]
    found = [p for c in containers for p in problems(c)]
    assert found == [
        "compose.yaml: service router: --router-replica-sink is no flag of router (RouterServiceConfig)",
        "compose.yaml: service router: COMMUTATOR_NATS_URLS is no variable of router (RouterServiceConfig)",
        "compose.yaml: service decode: COMMUTATOR_NATS_URLS is no variable of decode (DecodeConfig)",
        "compose.yaml: service prefill: --stream-intervall-ms is no flag of prefill (PrefillConfig)",
        "compose.yaml: service model: COMMUTATOR_NATS_URLS is read by no role",
    ]


def test_a_bad_value_is_caught_by_the_roles_own_loader() -> None:
    [c] = [c for c in k8s_containers(k8s_docs(BAD_MANIFEST, "bad.yaml")) if c.where.endswith("frontend")]
    c = dataclasses.replace(c, env={})
    [problem] = problems(c)
    assert "frontend rejects its settings" in problem and "bogus" in problem


def test_a_commutator_container_of_no_known_role_is_an_error() -> None:
    c = Container("x.yaml: service mystery", "commutator:latest", ("--engine", "mocker"), {})
    assert problems(c) == [
        "x.yaml: service mystery: a Commutator container whose role cannot be told (command ['--engine', 'mocker'])"
    ]


# ---- the Kubernetes manifests ----------------------------------------------------------------------------

MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest and the newest Kubernetes the manifests are checked against (README.md names the range).
K8S_VERSIONS = ["1.29", "1.37"]


def _all_k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [d for path in MANIFESTS for d in k8s_docs(path)]


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(w, d) for w, d in _all_k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    import kubernetes_validate

    docs = k8s_docs(path)
    assert docs, f"{path.name} holds no object"
    for _, doc in docs:
        try:  # strict: a misspelt or misplaced field is an error too
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc}")


def test_the_schema_check_rejects_a_broken_manifest() -> None:
    import kubernetes_validate

    doc = yaml.safe_load((K8S_DIR / "router.yaml").read_text().split("---")[1])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc = yaml.safe_load((K8S_DIR / "router.yaml").read_text().split("---")[1])
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=False)


def test_kustomization_lists_every_manifest_and_one_namespace() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    namespace = kustomization["namespace"]
    assert [d["metadata"]["name"] for _, d in _all_k8s_docs() if d["kind"] == "Namespace"] == [namespace]
    for _, doc in _all_k8s_docs():
        for subject in doc.get("subjects", []):
            assert subject.get("namespace") == namespace, f"{doc['metadata']['name']}: subject in another namespace"
    names = [(d["kind"], d["metadata"]["name"]) for _, d in _all_k8s_docs()]
    assert len(names) == len(set(names)), "an object is defined twice"


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = doc["spec"]["template"]["spec"]
    return pod


def _role_pods() -> list[tuple[str, dict[str, Any], dict[str, Any], str, Any]]:
    """(file, workload, its role container, role, the container's effective config) per role workload."""
    containers = {c.where: c for c in k8s_containers(_all_k8s_docs())}
    out = []
    for where, doc in _workloads():
        for spec in _pod(doc)["containers"]:
            c = containers[f"{where}: {doc['kind']}/{doc['metadata']['name']} container {spec['name']}"]
            role, args = role_of(c)
            if role in ROLES:
                env = {k: v for k, v in c.env.items() if k.startswith(cfg.ENV_PREFIX) and v is not None}
                out.append((where, doc, spec, role, effective_config(ROLES[role], args, env, role)))
    return out


def test_every_role_has_a_deployment_a_service_and_its_image() -> None:
    pods = _role_pods()
    assert sorted(role for *_, role, _ in pods) == sorted(ROLES)
    services = {d["metadata"]["name"]: d for _, d in _all_k8s_docs() if d["kind"] == "Service"}
    for _, doc, spec, role, _ in pods:
        assert doc["kind"] == "Deployment" and doc["metadata"]["name"] == role
        assert spec["image"] == f"commutator/{role}:latest"  # docker build --target ROLE -t commutator/ROLE
        for init in _pod(doc).get("initContainers", []):
            assert init["image"] == spec["image"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = services[role]
        assert service["spec"]["selector"].items() <= labels.items(), f"Service {role} selects no pod of {role}"
        port_names = {p["name"] for p in spec["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {role}: port {port['targetPort']} not on the pod"


def _port(spec: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    [number] = [p["containerPort"] for p in spec["ports"] if p["name"] == ref]
    return int(number)


def test_probes_ask_each_role_for_health_and_life_where_it_serves_them() -> None:
    for _, _, spec, role, config in _role_pods():
        # The frontend serves /health and /live on its HTTP port; every other role on its status server.
        port = config.http_port if role == "frontend" else config.runtime.metrics_port
        if role != "frontend":
            assert config.runtime.metrics_host == "0.0.0.0", f"{role}: status server unreachable by the kubelet"
        assert port > 0, f"{role}: no fixed port to probe"
        ready, live = spec["readinessProbe"]["httpGet"], spec["livenessProbe"]["httpGet"]
        assert (ready["path"], _port(spec, ready["port"])) == ("/health", port), role
        assert (live["path"], _port(spec, live["port"])) == ("/live", port), role
        if "startupProbe" in spec:
            assert _port(spec, spec["startupProbe"]["httpGet"]["port"]) == port
        assert spec["resources"]["requests"].keys() >= {"cpu", "memory"}, f"{role}: no resource requests"


def test_grpc_roles_advertise_the_pod_ip_and_serve_on_every_interface() -> None:
    grpc_roles = 0
    for _, _, spec, role, config in _role_pods():
        if not hasattr(config, "grpc"):
            continue
        grpc_roles += 1
        env = {e["name"]: e for e in spec.get("env", [])}
        advertise = env["COMMUTATOR_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert advertise == "status.podIP", role
        assert config.grpc.advertise_host == POD_IP  # the role reads it
        assert config.grpc.grpc_host == "0.0.0.0", role
        assert config.grpc.grpc_port == _port(spec, "grpc") > 0, role
        if hasattr(config, "worker"):
            assert config.worker.stream_port == _port(spec, "stream") > 0, role
    assert grpc_roles == 3  # router, decode, prefill


def test_termination_grace_covers_the_drain_grace() -> None:
    for _, doc, spec, role, config in _role_pods():
        drain_s = config.drain_grace_s if role == "frontend" else config.grpc.drain_grace_s
        pre_stop = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        grace_s = _pod(doc)["terminationGracePeriodSeconds"]
        # 5 s or more for the last flushes and the deregistration after the drain.
        assert grace_s >= pre_stop_s + drain_s + 5, f"{role}: {grace_s} s to stop, {pre_stop_s} + {drain_s} s needed"


def test_etcd_and_nats_keep_their_data_on_a_volume_claim() -> None:
    sets = {d["metadata"]["name"]: d for _, d in _workloads() if d["kind"] == "StatefulSet"}
    assert sets.keys() == {"etcd", "nats"}
    for name, doc in sets.items():
        [claim] = doc["spec"]["volumeClaimTemplates"]
        [container] = _pod(doc)["containers"]
        assert any(m["name"] == claim["metadata"]["name"] for m in container["volumeMounts"]), name
        assert {"readinessProbe", "livenessProbe"} <= container.keys(), name
    assert "--jetstream" in _pod(sets["nats"])["containers"][0]["args"]
    config_map = next(d for _, d in _all_k8s_docs() if d["kind"] == "ConfigMap")["data"]
    services = {d["metadata"]["name"]: d for _, d in _all_k8s_docs() if d["kind"] == "Service"}
    host, port = config_map["COMMUTATOR_ETCD_ENDPOINTS"].split(":")
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    host, port = config_map["COMMUTATOR_NATS_URL"].removeprefix("nats://").split(":")
    assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}


def test_planner_may_scale_exactly_the_worker_deployments() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _all_k8s_docs()}
    workers = sorted(doc["metadata"]["name"] for _, doc, _, role, _ in _role_pods() if role in ("decode", "prefill"))
    role = docs[("Role", "commutator-planner")]
    scale = [r for r in role["rules"] if "deployments/scale" in r["resources"]]
    assert len(scale) == 1 and set(scale[0]["verbs"]) >= {"get", "patch", "update"}
    assert sorted(scale[0]["resourceNames"]) == workers
    assert all(r["apiGroups"] == ["apps"] for r in role["rules"])
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    assert {("deployments", v) for v in ("get", "list", "patch", "update")} <= granted
    assert {res for res, _ in granted} == {"deployments", "deployments/scale"}  # nothing else
    binding = docs[("RoleBinding", "commutator-planner")]
    assert binding["roleRef"]["name"] == "commutator-planner"
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "commutator-planner")]
    assert ("ServiceAccount", "commutator-planner") in docs
