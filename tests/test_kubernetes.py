"""The Kubernetes manifests in deploy/kubernetes, checked offline (issue 12).

- Every manifest validates against the Kubernetes API's JSON schemas for the versions
  in ``KUBERNETES_VERSIONS`` (kubernetes-validate, strict: an unknown or misspelt field
  fails). Without kubernetes-validate these tests skip, and fail in CI.
- Each ``kustomization.yaml`` is rendered with the part of kustomize it uses (a list of
  ``resources``; anything else fails here until this file learns it): every file it
  lists exists and every manifest beside it is listed. Where ``kubectl`` is installed,
  ``kubectl kustomize`` must render the same objects.
- The corsproxy config in each ConfigMap passes ``corsproxy check`` (the real command,
  in a subprocess) without warnings, and the pod agrees with it: listen.port is the
  ``http`` containerPort and the Service's targetPort; admin.port is the probes' port,
  with /healthz and /readyz, on an admin listener the kubelet can reach; listen.workers
  is the CPU limit; terminationGracePeriodSeconds outlasts the preStop pause plus
  listen.shutdown_grace. In the sidecar, upstream.url is the API container's loopback
  port, and the API stops only after corsproxy has drained.
- Every container runs as the Dockerfile's non-root user with a read-only root, no
  privilege escalation, no capabilities and the runtime's seccomp profile, and has
  CPU and memory requests and limits.
- The sidecar example runs: its stand-in API (the manifest's own command) and
  corsproxy with the ConfigMap's config, ports moved to free loopback ones.
"""

from __future__ import annotations

import ast
import http.client
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
#: The oldest Kubernetes the manifests are for (the preStop ``sleep`` action is on by
#: default from 1.30) and the newest that kubernetes-validate 1.37.0 ships schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
#: The kustomization fields the renderer below understands.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources"}
#: corsproxy exits within listen.shutdown_grace "plus about a second" (README: "Stopping").
EXIT_ALLOWANCE = 1.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ORIGIN = "https://app.example.com"
RUN_TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# Reading the manifests
# ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the
    last one silently; kubectl refuses the file)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path``."""
    return [d for d in yaml.load_all(path.read_text(encoding="utf-8"), _StrictLoader) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def render(directory: Path) -> list[dict[str, Any]]:
    """``kustomize build directory`` for the subset used here: ``resources`` naming
    manifest files or directories with a kustomization of their own."""
    (kustomization,) = documents(directory / "kustomization.yaml")
    assert (kustomization.get("apiVersion"), kustomization.get("kind")) == (
        KUSTOMIZE_API, "Kustomization"
    ), f"{rel(directory / 'kustomization.yaml')}: not a {KUSTOMIZE_API} Kustomization"
    unknown = sorted(set(kustomization) - KUSTOMIZE_FIELDS)
    assert not unknown, (
        f"{rel(directory / 'kustomization.yaml')}: {unknown} are not rendered by "
        f"tests/test_kubernetes.py (it knows {sorted(KUSTOMIZE_FIELDS)}); teach render() them"
    )
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources") or []:
        target = directory / entry
        assert "://" not in entry and target.exists(), (
            f"{rel(directory / 'kustomization.yaml')}: resource {entry!r} does not exist"
        )
        objects += render(target) if target.is_dir() else documents(target)
    names = [key(o) for o in objects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"{rel(directory)}: rendered twice: {duplicates}"
    return objects


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def source_version() -> str:
    """``__version__`` as written in corsproxy/__init__.py (not the installed copy)."""
    tree = ast.parse((REPO / "corsproxy" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("corsproxy/__init__.py has no __version__")


def dockerfile_user() -> tuple[int, int | None]:
    """(uid, gid) of the Dockerfile's last USER instruction."""
    users = re.findall(r"^\s*USER\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert users, "the Dockerfile has no USER instruction"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER {users[-1]}: Kubernetes' runAsNonRoot needs a numeric uid"
    return int(uid), int(gid) if gid.isdigit() else None


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def memory_bytes(quantity: str | int) -> float:
    text = str(quantity)
    for unit, factor in _MEMORY_UNITS.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


# ---------------------------------------------------------------------------
# One pod: its corsproxy container, the config it mounts, and what that config says
# ---------------------------------------------------------------------------


@dataclass
class Pod:
    """A Deployment's pod template with its corsproxy container and config."""

    where: str  # "sidecar/deployment.yaml: Deployment api", for messages
    deployment: dict[str, Any]
    spec: dict[str, Any]
    proxy: dict[str, Any]  # the container running the corsproxy image
    others: list[dict[str, Any]]  # the other containers (the API, in the sidecar)
    config_text: str  # the corsproxy config, as mounted

    def port(self, container: dict[str, Any], ref: str | int) -> int:
        """A container port by number or name."""
        if isinstance(ref, int):
            return ref
        named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert ref in named, f"{self.where}: container {container['name']} has no port {ref!r}"
        return named[ref]


def is_corsproxy_image(image: str) -> bool:
    """``corsproxy:TAG`` or ``REGISTRY/.../corsproxy:TAG`` (a digest is allowed too)."""
    name = image.split("@", 1)[0]
    if name.rfind(":") > name.rfind("/"):  # a tag, not a registry's port
        name = name[: name.rfind(":")]
    return name == "corsproxy" or name.endswith("/corsproxy")


def pods() -> Iterator[tuple[Path, Pod]]:
    """Every Deployment running corsproxy, in every kustomization."""
    for directory in kustomization_dirs():
        objects = render(directory)
        config_maps = {o["metadata"]["name"]: o for o in by_kind(objects, "ConfigMap")}
        for deployment in by_kind(objects, "Deployment"):
            where = f"{rel(directory / 'kustomization.yaml')}: Deployment " + (
                deployment["metadata"]["name"]
            )
            spec = deployment["spec"]["template"]["spec"]
            proxies = [c for c in spec["containers"] if is_corsproxy_image(c["image"])]
            assert len(proxies) == 1, f"{where}: expected one corsproxy container"
            proxy = proxies[0]
            env = {e["name"]: e.get("value") for e in proxy.get("env", [])}
            config_path = env.get("CORSPROXY_CONFIG")
            assert config_path, f"{where}: set CORSPROXY_CONFIG to the mounted config file"
            mount = next(
                (m for m in proxy.get("volumeMounts", [])
                 if config_path.startswith(m["mountPath"].rstrip("/") + "/")),
                None,
            )
            assert mount is not None, f"{where}: nothing is mounted at {config_path}"
            assert "subPath" not in mount, (
                f"{where}: a subPath mount never sees ConfigMap updates (no live reload)"
            )
            volume = next(v for v in spec.get("volumes", []) if v["name"] == mount["name"])
            assert "configMap" in volume, f"{where}: {config_path} is not from a ConfigMap"
            name = volume["configMap"]["name"]
            assert name in config_maps, f"{where}: ConfigMap {name} is not in the kustomization"
            file_key = config_path[len(mount["mountPath"].rstrip("/")) + 1:]
            data = config_maps[name].get("data", {})
            assert file_key in data, f"{where}: ConfigMap {name} has no key {file_key!r}"
            others = [c for c in spec["containers"] if c is not proxy]
            yield directory, Pod(where, deployment, spec, proxy, others, data[file_key])


def all_pods() -> list[Pod]:
    return [pod for _, pod in pods()]


def pod_ids() -> list[str]:
    return [pod.where for pod in all_pods()]


@pytest.fixture(scope="module")
def effective(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each pod's config as corsproxy reads it (defaults filled in), by pod.where."""
    from corsproxy.config import load_config

    out = {}
    for i, pod in enumerate(all_pods()):
        path = tmp_path_factory.mktemp("config") / f"config-{i}.yaml"
        path.write_text(pod.config_text, encoding="utf-8")
        out[pod.where] = load_config(path)
    return out


def pre_stop_pause(where: str, container: dict[str, Any]) -> float:
    """Seconds the container's preStop hook waits (sleep action or exec sleep)."""
    hook = container.get("lifecycle", {}).get("preStop")
    assert hook, f"{where}: container {container['name']} has no preStop pause"
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert command[:1] in (["sleep"], ["/bin/sleep"]) and len(command) == 2, (
        f"{where}: container {container['name']}: preStop must be a pause, got {hook}"
    )
    return float(command[1])


# ---------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------


def kubernetes_validate():
    try:
        import kubernetes_validate as module
    except ImportError:
        message = "kubernetes-validate is not installed: pip install kubernetes-validate " \
                  "(in the test extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return module


def test_every_manifest_directory_has_manifests():
    assert manifest_files(), f"no manifests under {DEPLOY}"
    assert [rel(d) for d in kustomization_dirs()] == [".", "sidecar"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifest_is_valid_for_kubernetes(path: Path, version: str):
    kv = kubernetes_validate()
    docs = documents(path)
    assert docs, f"{rel(path)} holds no object"
    for doc in docs:
        name = f"{rel(path)}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            validated = kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            at = ".".join(str(p) for p in e.path) or "top level"
            pytest.fail(f"{name}: {at}: {e.message} (Kubernetes {version})")
        except kv.SchemaNotFoundError as e:
            pytest.fail(f"{name}: {e.message}")
        assert validated == version, f"{name}: validated against {validated}, not {version}"
        # No namespace in the files: `kubectl apply -k DIR -n NS` picks it.
        assert "namespace" not in doc["metadata"], f"{name}: remove metadata.namespace"


# ---------------------------------------------------------------------------
# Kustomizations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_kustomization_lists_every_manifest_beside_it(directory: Path):
    (kustomization,) = documents(directory / "kustomization.yaml")
    listed = {(directory / r).resolve() for r in kustomization.get("resources") or []}
    beside = {p.resolve() for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert sorted(map(str, beside - listed)) == [], "manifests the kustomization leaves out"
    assert render(directory), f"{rel(directory)} renders nothing"


def test_every_manifest_belongs_to_exactly_one_kustomization():
    owners: dict[Path, list[str]] = {p.resolve(): [] for p in manifest_files()}
    for directory in kustomization_dirs():
        (kustomization,) = documents(directory / "kustomization.yaml")
        for entry in kustomization.get("resources") or []:
            target = (directory / entry).resolve()
            if target in owners:
                owners[target].append(rel(directory))
    wrong = {rel(p): o for p, o in owners.items() if len(o) != 1}
    assert wrong == {}, "each manifest must be listed by exactly one kustomization"


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_kubectl_kustomize_renders_the_same_objects(directory: Path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the subset renderer above still ran)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=key)
    ours = sorted(render(directory), key=key)
    assert [key(o) for o in theirs] == [key(o) for o in ours]
    assert theirs == ours


# ---------------------------------------------------------------------------
# The corsproxy config in each ConfigMap, and the pod around it
# ---------------------------------------------------------------------------


def corsproxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CORSPROXY_", "PYTHON"))}


@pytest.mark.parametrize("pod", all_pods(), ids=pod_ids())
def test_configmap_config_passes_corsproxy_check(pod: Pod, tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(pod.config_text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "corsproxy", "check", "--config", str(config)],
        cwd=tmp_path, env=corsproxy_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: OK"), result.stdout
    assert result.stderr == "", f"corsproxy check warns:\n{result.stderr}"


@pytest.mark.parametrize("pod", all_pods(), ids=pod_ids())
def test_ports_agree_with_the_config(pod: Pod, effective: dict[str, Any]):
    config = effective[pod.where]
    listen_port = pod.port(pod.proxy, "http")
    assert listen_port == config.listen.port, f"{pod.where}: containerPort http vs listen.port"
    assert config.listen.host not in LOOPBACK, (
        f"{pod.where}: listen.host {config.listen.host} is unreachable from the Service"
    )
    assert config.admin.port is not None, f"{pod.where}: the probes need admin.port"
    assert pod.port(pod.proxy, "admin") == config.admin.port, (
        f"{pod.where}: containerPort admin vs admin.port"
    )
    assert config.admin.port != config.listen.port


@pytest.mark.parametrize("pod", all_pods(), ids=pod_ids())
def test_probes_ask_the_admin_listener(pod: Pod, effective: dict[str, Any]):
    config = effective[pod.where]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = pod.proxy.get(probe, {}).get("httpGet")
        assert get is not None, f"{pod.where}: corsproxy needs an httpGet {probe}"
        assert get["path"] == path, f"{pod.where}: {probe} path"
        assert pod.port(pod.proxy, get["port"]) == config.admin.port, (
            f"{pod.where}: {probe} port is not admin.port ({config.admin.port})"
        )
    # The kubelet connects to the pod IP: a loopback admin listener fails every probe.
    assert ipaddress.ip_address(config.admin.host).is_unspecified, (
        f"{pod.where}: admin.host {config.admin.host}: httpGet probes need 0.0.0.0"
    )


def services_for(directory: Path, pod: Pod) -> list[dict[str, Any]]:
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    return [
        s for s in by_kind(render(directory), "Service")
        if s["spec"]["selector"].items() <= labels.items()
    ]


@pytest.mark.parametrize("directory,pod", list(pods()), ids=pod_ids())
def test_service_exposes_the_proxy_port_only(directory: Path, pod: Pod, effective):
    config = effective[pod.where]
    services = services_for(directory, pod)
    assert len(services) == 1, f"{pod.where}: expected one Service selecting its pods"
    ports = services[0]["spec"]["ports"]
    targets = [pod.port(pod.proxy, p.get("targetPort", p["port"])) for p in ports]
    assert targets == [config.listen.port], (
        f"{pod.where}: the Service must target listen.port only (not admin.port, not the API)"
    )


@pytest.mark.parametrize("pod", all_pods(), ids=pod_ids())
def test_workers_match_the_cpu_limit(pod: Pod, effective: dict[str, Any]):
    workers = effective[pod.where].listen.workers
    limit = cpu_cores(pod.proxy["resources"]["limits"]["cpu"])
    if workers == 0:  # auto: one per CPU of the cgroup quota the limit becomes, rounded up
        assert limit >= 1, f"{pod.where}: workers auto under a CPU limit below one CPU"
        return
    assert limit == workers, f"{pod.where}: CPU limit {limit} for {workers} worker(s)"


@pytest.mark.parametrize("pod", all_pods(), ids=pod_ids())
def test_grace_period_outlasts_the_pause_and_the_drain(pod: Pod, effective: dict[str, Any]):
    grace = pod.spec["terminationGracePeriodSeconds"]
    pause = pre_stop_pause(pod.where, pod.proxy)
    drain = effective[pod.where].listen.shutdown_grace
    assert pause > 0
    assert grace > pause + drain + EXIT_ALLOWANCE, (
        f"{pod.where}: terminationGracePeriodSeconds {grace} <= preStop {pause} + "
        f"listen.shutdown_grace {drain} + {EXIT_ALLOWANCE}: corsproxy would be SIGKILLed"
    )
    for other in pod.others:
        # The API must serve until corsproxy's in-flight requests are done.
        other_pause = pre_stop_pause(pod.where, other)
        assert other_pause >= pause + drain, (
            f"{pod.where}: container {other['name']} stops before corsproxy has drained"
        )
        assert grace > other_pause, f"{pod.where}: {other['name']} is killed in its pause"


@pytest.mark.parametrize("pod", all_pods(), ids=pod_ids())
def test_image_is_this_version(pod: Pod):
    assert pod.proxy["image"] == f"corsproxy:{source_version()}", (
        f"{pod.where}: the image tag is not corsproxy/__init__.py's __version__"
    )


def test_sidecar_upstream_is_the_api_container(effective: dict[str, Any]):
    sidecars = [pod for pod in all_pods() if pod.others]
    assert sidecars, "no sidecar example"
    for pod in sidecars:
        url = urlsplit(effective[pod.where].upstream.url)
        assert url.hostname in LOOPBACK, f"{pod.where}: upstream.url must be the pod's loopback"
        api_ports = {
            (c["name"], p["containerPort"]) for c in pod.others for p in c.get("ports", [])
        }
        matching = [name for name, port in api_ports if port == url.port]
        assert matching, f"{pod.where}: upstream.url port {url.port} is no API container port"
        for container in pod.others:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "API_PORT" in env:  # the stand-in API reads its address from its env
                assert int(env["API_PORT"]) == url.port
                assert env["API_HOST"] in LOOPBACK, "the API must be reachable via corsproxy only"
        assert effective[pod.where].admin.ready_checks_upstream, (
            f"{pod.where}: nothing else makes the pod unready while its API is down"
        )


def test_standalone_autoscaling_and_disruption_budget():
    objects = render(DEPLOY)
    (deployment,) = by_kind(objects, "Deployment")
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"], "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert (metric["type"], metric["resource"]["name"]) == ("Resource", "cpu")
    (proxy,) = deployment["spec"]["template"]["spec"]["containers"]
    target = metric["resource"]["target"]
    if target["type"] == "AverageValue":
        at = cpu_cores(target["averageValue"])
    else:
        at = cpu_cores(proxy["resources"]["requests"]["cpu"]) * target["averageUtilization"] / 100
    assert at < cpu_cores(proxy["resources"]["limits"]["cpu"]), (
        "the HPA must add pods before a pod reaches its CPU limit"
    )
    assert hpa["spec"]["minReplicas"] >= 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


# ---------------------------------------------------------------------------
# Every container: non-root, locked down, with resources
# ---------------------------------------------------------------------------


def containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for doc in documents(path):
            spec = doc.get("spec", {}).get("template", {}).get("spec")
            if spec is None:
                continue
            for c in spec.get("initContainers", []) + spec["containers"]:
                out.append((f"{rel(path)}: {doc['metadata']['name']}/{c['name']}", c))
    return out


@pytest.mark.parametrize(
    "container", [c for _, c in containers()], ids=[name for name, _ in containers()]
)
def test_container_is_locked_down(container: dict[str, Any]):
    uid, gid = dockerfile_user()
    context = container.get("securityContext", {})
    assert context.get("runAsNonRoot") is True
    assert context.get("runAsUser") == uid, "the Dockerfile's USER"
    if gid is not None:
        assert context.get("runAsGroup") == gid
    assert context.get("readOnlyRootFilesystem") is True
    assert context.get("allowPrivilegeEscalation") is False
    assert context.get("capabilities") == {"drop": ["ALL"]}
    assert context.get("seccompProfile") == {"type": "RuntimeDefault"}


@pytest.mark.parametrize(
    "container", [c for _, c in containers()], ids=[name for name, _ in containers()]
)
def test_container_has_requests_and_limits(container: dict[str, Any]):
    resources = container.get("resources", {})
    for resource, parse in (("cpu", cpu_cores), ("memory", memory_bytes)):
        request = resources.get("requests", {}).get(resource)
        limit = resources.get("limits", {}).get(resource)
        assert request is not None and limit is not None, f"{resource} request and limit"
        assert 0 < parse(request) <= parse(limit), f"{resource}: request {request} > {limit}"


# ---------------------------------------------------------------------------
# The sidecar example, run on loopback
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def wait_until(what: str, check, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen, what: str) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"{what} ignored SIGTERM") from None


def test_sidecar_example_runs_on_loopback(tmp_path: Path):
    (pod,) = [p for p in all_pods() if p.others]
    (api,) = pod.others
    assert api["command"][0] == "python"
    proxy_port, admin_port, api_port = free_port(), free_port(), free_port()

    config = yaml.safe_load(pod.config_text)
    config["listen"].update(host="127.0.0.1", port=proxy_port)
    config["admin"].update(host="127.0.0.1", port=admin_port)
    config["upstream"]["url"] = f"http://127.0.0.1:{api_port}"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    env = corsproxy_env()
    with (tmp_path / "proxy.log").open("wb") as log:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "corsproxy", *pod.proxy["args"]],
            cwd=tmp_path, env={**env, "CORSPROXY_CONFIG": str(config_path)},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
    api_proc = None
    try:
        # Without its API the pod is not ready (admin.ready_checks_upstream).
        status = wait_until("/readyz", lambda: get(admin_port, "/readyz")[0])
        assert status == 503
        api_env = {e["name"]: e["value"] for e in api["env"]}
        api_proc = subprocess.Popen(
            [sys.executable, *api["command"][1:]],
            cwd=tmp_path, env={**env, **api_env, "API_PORT": str(api_port)},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until("the pod to be ready", lambda: get(admin_port, "/readyz")[0] == 200)
        assert get(admin_port, "/healthz")[0] == 200
        status, headers, body = get(proxy_port, "/items", {"Origin": ORIGIN})
        assert status == 200, body
        assert headers.get("Access-Control-Allow-Origin") == ORIGIN  # the API's "*" is gone
        assert b'"apple"' in body
    finally:
        proxy_rc = stop(proxy, "corsproxy")
        api_rc = stop(api_proc, "the stand-in API") if api_proc is not None else 0
    assert proxy_rc == 0, (tmp_path / "proxy.log").read_text()
    assert api_rc == 0, "the stand-in API must exit 0 on SIGTERM"
