"""infra/k8s: every manifest parses; ray.io objects validate strictly against the KubeRay v1 CRDs; core objects have
their required fields; entrypoints, Hydra overrides and the RayService's import path and deployments are real.

Offline only: nothing is applied to a cluster and Ray is not started.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ernie_platform.configs import register_configs, validate_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
CONF_DIR = REPO / "conf"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "rayclusters.yaml", "RayJob": "rayjobs.yaml", "RayService": "rayservices.yaml"}
VARIANTS = ("cpu-demo", "gpu")

MANIFEST_FILES = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))


def _load_all() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for f in MANIFEST_FILES:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                docs.append((str(f.relative_to(K8S)), doc))
    return docs


DOCS = _load_all()


def _id(item: tuple[str, dict[str, Any]]) -> str:
    f, d = item
    return f"{f}:{d.get('kind')}/{d.get('metadata', {}).get('name')}"


def _of_kind(*kinds: str) -> list[tuple[str, dict[str, Any]]]:
    return [x for x in DOCS if x[1].get("kind") in kinds]


# --- strict CRD schemas ---------------------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Copy of an openAPIV3Schema that rejects unknown fields (kubeconform -strict) and knows int-or-string."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = CRD_DIR / CRD_FILES[kind]
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def validate_ray_object(doc: dict[str, Any]) -> None:
    schema = crd_schema(doc["kind"])
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} violates the CRD:\n" + "\n".join(lines))


needs_crds = pytest.mark.skipif(
    not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()),
    reason=f"KubeRay CRDs not found at {CRD_DIR} (rayclusters/rayjobs/rayservices.yaml): strict validation skipped",
)


# --- Hydra ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


def compose_validated(overrides: list[str]) -> Any:
    cfg = compose(config_name="config", overrides=overrides)
    validate_config(cfg)
    return cfg


def args_given(app: dict[str, Any]) -> bool:
    return bool(app.get("args"))


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


# --- tests ----------------------------------------------------------------------------------------------------------


def test_manifests_present_and_parse() -> None:
    assert MANIFEST_FILES, f"no manifests under {K8S}"
    kinds = {d["kind"] for _, d in DOCS}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    for f, d in DOCS:
        assert d.get("apiVersion") and d.get("kind"), f
        assert d.get("metadata", {}).get("name"), f"{f}: {d.get('kind')} without metadata.name"
    for variant in VARIANTS:
        files = {f for f, _ in DOCS if f.startswith(f"{variant}/")}
        for name in ("raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-posttrain.yaml", "rayservice.yaml",
                     "storage.yaml"):  # fmt: skip
            assert f"{variant}/{name}" in files


@needs_crds
@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob", "RayService"), ids=_id)
def test_ray_objects_valid_against_crd(item: tuple[str, dict[str, Any]]) -> None:
    f, doc = item
    assert doc["apiVersion"] == "ray.io/v1", f
    validate_ray_object(doc)


@needs_crds
@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("RayCluster", lambda d: d["spec"].__setitem__("enableInTreeAutoScaling", True)),  # misspelt key
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("maxReplica", 3)),
        ("RayJob", lambda d: d["spec"].__setitem__("entryPoint", "python -m x")),
        ("RayService", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].__setitem__("bogus", 1)),
    ],
)
def test_unknown_field_rejected(kind: str, mutate: Any) -> None:
    doc = copy.deepcopy(_of_kind(kind)[0][1])
    validate_ray_object(doc)
    mutate(doc)
    with pytest.raises(AssertionError, match="Additional properties are not allowed"):
        validate_ray_object(doc)


@needs_crds
def test_int_or_string_accepted_and_type_checked() -> None:
    doc = copy.deepcopy(_of_kind("RayCluster")[0][1])
    res = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"] = 2
    validate_ray_object(doc)
    res["limits"]["cpu"] = [2]
    with pytest.raises(AssertionError):
        validate_ray_object(doc)


def test_ray_clusters_autoscale_and_mount_shared_storage() -> None:
    clusters = [(f, d["spec"]) for f, d in _of_kind("RayCluster")]
    clusters += [(f, d["spec"]["rayClusterConfig"]) for f, d in _of_kind("RayService")]
    for f, spec in clusters:
        assert spec["enableInTreeAutoscaling"] is True and "autoscalerOptions" in spec, f
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            pod = g["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}  # fmt: skip
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert claims.get(mounts.get("/mnt/runs")) == "ernie-runs", f"{f}: /mnt/runs not on the ernie-runs PVC"
        for w in spec["workerGroupSpecs"]:
            assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"], f
    gpu = [spec for f, spec in clusters if f.startswith("gpu/")]
    assert gpu and all({"cpu", "gpu"} <= {w["groupName"] for w in s["workerGroupSpecs"]} for s in gpu)
    for s in gpu:
        (g,) = [w for w in s["workerGroupSpecs"] if w["groupName"] == "gpu"]
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_core_objects_required_fields() -> None:
    for f, d in _of_kind("Deployment"):
        spec = d["spec"]
        match = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert match and all(labels.get(k) == v for k, v in match.items()), f"{f}: selector does not match template"
        containers = spec["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers), f
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["template"]["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v}  # fmt: skip
        pvcs = {d2["metadata"]["name"] for _, d2 in _of_kind("PersistentVolumeClaim")}
        assert claims <= pvcs, f"{f}: claims {claims - pvcs} have no PersistentVolumeClaim manifest"
    deployments = {d["metadata"]["name"]: d for _, d in _of_kind("Deployment")}
    for f, d in _of_kind("Service"):
        spec = d["spec"]
        assert spec["selector"] and spec["ports"], f
        assert all("port" in p for p in spec["ports"]), f
        targets = [dep for dep in deployments.values()
                   if all(dep["spec"]["template"]["metadata"]["labels"].get(k) == v
                          for k, v in spec["selector"].items())]  # fmt: skip
        assert targets, f"{f}: Service {d['metadata']['name']} selects no Deployment"
    for f, d in _of_kind("PersistentVolumeClaim"):
        spec = d["spec"]
        assert spec["accessModes"] and set(spec["accessModes"]) <= {
            "ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"}, f  # fmt: skip
        assert spec["resources"]["requests"]["storage"], f
    (gpu_runs,) = [d for f, d in _of_kind("PersistentVolumeClaim") if f == "gpu/storage.yaml"]
    assert gpu_runs["spec"]["accessModes"] == ["ReadWriteMany"]


def test_mlflow_server_and_tracking_uri() -> None:
    (mlflow,) = [d for _, d in _of_kind("Deployment") if d["metadata"]["name"] == "ernie-mlflow"]
    c = mlflow["spec"]["template"]["spec"]["containers"][0]
    cmd = " ".join(c.get("command", []) + c.get("args", []))
    for part in ("mlflow server", "--backend-store-uri=sqlite:////mlflow/mlflow.db",
                 "--artifacts-destination=/mlflow/artifacts", "--host=0.0.0.0"):  # fmt: skip
        assert part in cmd
    (svc,) = [d for _, d in _of_kind("Service") if d["metadata"]["name"] == "ernie-mlflow"]
    uri = f"http://ernie-mlflow:{svc['spec']['ports'][0]['port']}"
    for f, d in _of_kind("RayCluster"):
        for g in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]:
            env = {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0].get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == uri, f"{f}: {g.get('groupName', 'head')}"


# --- security: restricted pods, Secrets, MLflow basic auth -----------------------------------------------------------

RAY_UID = 1000  # the user `ray` of the rayproject/ray base images (docker/Dockerfile*: USER ray)
DOCS_K8S = REPO / "docs" / "kubernetes.md"


def _pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every PodSpec (a mapping with `containers`) anywhere in a manifest, with its path: Deployment templates, Ray
    head/worker group templates, RayJob submitter templates — whatever a future manifest adds."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for k, v in node.items():
            yield from _pod_specs(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _pod_specs(v, f"{where}[{i}]")


def restricted_violations(pod: dict[str, Any], extra: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """What keeps each container of `pod` (plus `extra`: name -> container securityContext of containers KubeRay
    injects, e.g. the autoscaler) from Kubernetes' "restricted" profile, with uid 1000."""
    psc = pod.get("securityContext") or {}
    containers = {c["name"]: c.get("securityContext") or {} for c in pod["containers"] + pod.get("initContainers", [])}
    containers.update(extra or {})
    out = []
    for name, csc in containers.items():
        eff = {**{k: psc[k] for k in ("runAsNonRoot", "runAsUser", "seccompProfile") if k in psc}, **csc}
        if eff.get("runAsNonRoot") is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if eff.get("runAsUser") != RAY_UID:
            out.append(f"{name}: runAsUser is {eff.get('runAsUser')}, not {RAY_UID}")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
            out.append(f"{name}: capabilities do not drop ALL (or add some)")
        if csc.get("privileged"):
            out.append(f"{name}: privileged")
        if (eff.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            out.append(f"{name}: seccompProfile is not RuntimeDefault")
    return out


def _all_pods() -> list[tuple[str, dict[str, Any], dict[str, dict[str, Any]]]]:
    """(id, pod spec, injected containers' securityContexts) of every pod template in infra/k8s."""
    pods = []
    for f, doc in DOCS:
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
        autoscaler = cluster.get("autoscalerOptions") if doc["kind"] in ("RayCluster", "RayService", "RayJob") else None
        for where, pod in _pod_specs(doc):
            extra = {}
            if autoscaler is not None and where.endswith("headGroupSpec.template.spec"):
                extra["autoscaler"] = autoscaler.get("securityContext") or {}
            pods.append((f"{_id((f, doc))}:{where}", pod, extra))
    return pods


PODS = _all_pods()


def test_pod_inventory() -> None:
    """Every kind that makes pods is covered: the MLflow Deployment, Ray head and worker groups, RayJob submitters."""
    found = [(d["kind"], where) for _, d in DOCS for where, _ in _pod_specs(d)]
    assert ("Deployment", "spec.template.spec") in found
    for kind, prefix in (("RayCluster", "spec"), ("RayService", "spec.rayClusterConfig")):
        assert (kind, f"{prefix}.headGroupSpec.template.spec") in found
        assert (kind, f"{prefix}.workerGroupSpecs[0].template.spec") in found
    # Without submitterPodTemplate KubeRay runs `ray job submit` in a default pod that has no securityContext.
    submitters = [w for k, w in found if k == "RayJob" and w == "spec.submitterPodTemplate.spec"]
    assert len(submitters) == len(_of_kind("RayJob")), "a RayJob without submitterPodTemplate"
    assert len(PODS) == len(found)


@pytest.mark.parametrize(("where", "pod", "extra"), PODS, ids=[p[0] for p in PODS])
def test_pods_are_restricted(where: str, pod: dict[str, Any], extra: dict[str, dict[str, Any]]) -> None:
    assert not restricted_violations(pod, extra), f"{where}: {restricted_violations(pod, extra)}"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["securityContext"].pop("runAsNonRoot"),
        lambda p: p["securityContext"].__setitem__("runAsUser", 0),
        lambda p: p["securityContext"].pop("seccompProfile"),
        lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].__setitem__("drop", ["NET_RAW"]),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].__setitem__("add", ["SYS_ADMIN"]),
        lambda p: p["containers"][0]["securityContext"].__setitem__("privileged", True),
        lambda p: p.setdefault("initContainers", []).append({"name": "init", "image": "x"}),
    ],
)
def test_restricted_check_catches(mutate: Any) -> None:
    pod = copy.deepcopy(PODS[0][1])
    assert not restricted_violations(pod)
    mutate(pod)
    assert restricted_violations(pod)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(env: dict[str, Any] | None) -> tuple[str, str] | None:
    """(secret, key) of an env entry set from a Secret, required (pods do not start without it); else None."""
    ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or "value" in (env or {}) or ref.get("optional"):
        return None
    return ref["name"], ref["key"]


def test_serve_api_key_from_secret() -> None:
    """Every container of every RayService (an Ingress replica may land on any of them) has the bearer key from a
    Secret, and no manifest carries the key itself."""
    services = _of_kind("RayService")
    assert services
    for f, doc in services:
        for where, pod in _pod_specs(doc):
            for c in pod["containers"]:
                ref = _secret_ref(_env(c).get("ERNIE_API_KEY"))
                assert ref == ("ernie-serve-api-key", "api-key"), f"{f}:{where}/{c['name']}: ERNIE_API_KEY is {ref}"
        (app,) = serve_config(doc)["applications"]
        assert "serve.api_key" not in app.get("args", {}), f"{f}: a plaintext serve.api_key in the manifest"


def test_serve_api_key_env_is_the_one_the_app_reads() -> None:
    auth = pytest.importorskip("ernie_platform.serving.auth")
    assert auth.API_KEY_ENV == "ERNIE_API_KEY", "the RayService manifests set ERNIE_API_KEY"


def _mlflow() -> tuple[dict[str, Any], dict[str, Any]]:
    (dep,) = [d for _, d in _of_kind("Deployment") if d["metadata"]["name"] == "ernie-mlflow"]
    pod = dep["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _load_mlflow_module(name: str) -> Any:
    """A module of mlflow/server/auth loaded from its file: importing the package needs Flask-WTF (the `auth` extra),
    which the test environment does not have; these two modules need only mlflow itself."""
    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_k8s_test_mlflow_auth_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_basic_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`mlflow server --app-name basic-auth` with what MLflow 3.17's auth app reads (mlflow/server/auth): the admin
    user and password (MLFLOW_AUTH_ADMIN_*) and the CSRF key (MLFLOW_FLASK_SERVER_SECRET_KEY) from a Secret, and an
    ini file (MLFLOW_AUTH_CONFIG_PATH) from a mounted ConfigMap whose user database is on the persistent volume."""
    pod, c = _mlflow()
    argv = c.get("command", []) + c.get("args", [])
    pairs = set(zip(argv, argv[1:]))
    assert "--app-name=basic-auth" in argv or ("--app-name", "basic-auth") in pairs, f"no basic-auth app: {argv}"
    env = _env(c)
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):  # fmt: skip
        assert _secret_ref(env.get(name)) == ("ernie-mlflow-auth", key), name

    # The ini file: mounted from a ConfigMap of this repo, parsed by MLflow's own reader.
    ini_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (cm_name,) = [volumes[mounts[str(ini_path.parent)]]["configMap"]["name"]]
    (cm,) = [d for _, d in _of_kind("ConfigMap") if d["metadata"]["name"] == cm_name]
    (tmp_path / ini_path.name).write_text(cm["data"][ini_path.name])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / ini_path.name))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "x" * 24)
    auth = _load_mlflow_module("config").read_auth_config()
    assert auth.admin_username == "admin" and auth.admin_password == "x" * 24  # the environment (Secret) is used
    permissions = _load_mlflow_module("permissions")
    assert auth.default_permission in permissions.ALL_PERMISSIONS
    db = auth.database_uri.removeprefix("sqlite:///")
    pvc_mounts = [m for m, n in mounts.items() if "persistentVolumeClaim" in volumes[n]]
    assert auth.database_uri.startswith("sqlite:////") and any(db.startswith(m + "/") for m in pvc_mounts), (
        f"the basic-auth user database {auth.database_uri} is not on a persistent volume ({pvc_mounts})"
    )

    (svc,) = [d for _, d in _of_kind("Service") if d["metadata"]["name"] == "ernie-mlflow"]
    assert svc["spec"].get("type") == "ClusterIP", "the MLflow Service must stay inside the cluster"
    # Every pod that logs to the tracking server signs in.
    for f, doc in DOCS:
        for where, p in _pod_specs(doc):
            for ctr in p["containers"]:
                e, at = _env(ctr), f"{f}:{where}/{ctr['name']}"
                if "MLFLOW_TRACKING_URI" in e:
                    assert _secret_ref(e.get("MLFLOW_TRACKING_USERNAME")) == ("ernie-mlflow-auth", "username"), at
                    assert _secret_ref(e.get("MLFLOW_TRACKING_PASSWORD")) == ("ernie-mlflow-auth", "password"), at


def test_image_lock_has_mlflow_auth_extra() -> None:
    # `mlflow server --app-name basic-auth` (infra/k8s/mlflow.yaml) imports Flask-WTF, which only mlflow[auth] brings.
    for lock in ("lock-cpu.txt", "lock-gpu.txt"):
        text = (REPO / "requirements" / lock).read_text().lower()
        assert "\nflask-wtf==" in text, f"requirements/{lock} has no flask-wtf"


def test_referenced_secrets_are_documented() -> None:
    """Every Secret a manifest needs is created, with every key it reads, by a `kubectl create secret generic` line
    of docs/kubernetes.md (a missing Secret keeps the pods from starting)."""
    needed: dict[str, set[str]] = {}
    for _, doc in DOCS:
        for _, pod in _pod_specs(doc):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    ref = ((e.get("valueFrom") or {}).get("secretKeyRef")) or None
                    if ref:
                        needed.setdefault(ref["name"], set()).add(ref["key"])
    assert {"ernie-serve-api-key", "ernie-mlflow-auth"} <= set(needed)
    text = DOCS_K8S.read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if "kubectl create secret generic" in line]
    for name, keys in needed.items():
        cmd = [c for c in commands if f"kubectl create secret generic {name} " in c]
        assert cmd, f"docs/kubernetes.md does not create the Secret {name}"
        for key in keys:
            assert f"--from-literal={key}=" in cmd[0] or f"--from-file={key}=" in cmd[0], f"{name}: key {key}"


RUNS = "/mnt/runs"
WORKLOADS = {"workloads.pretrain": "+stage=", "workloads.posttrain": "+algo="}  # module -> override it must have


def _commands(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(module, overrides) of every `python -m X ...` in the entrypoint; commands may be chained with `&&` only."""
    lexer = shlex.shlex(doc["spec"]["entrypoint"], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    commands: list[list[str]] = [[]]
    for tok in tokens:
        if tok == "&&":
            commands.append([])
        else:
            assert not set(tok) <= set("();<>|&"), f"shell operator {tok!r} in the entrypoint: chain with && only"
            commands[-1].append(tok)
    out = []
    for argv in commands:
        assert argv[:2] == ["python", "-m"] and len(argv) > 2, argv
        out.append((argv[2], argv[3:]))
    return out


def _pretrain_text_runs() -> set[str]:
    """run.name of the pretraining stages whose export is a text model (post-training cannot start from `mm`)."""
    return {compose_validated([f"+stage={stage}"]).run.name for stage in ("text", "long")}


def test_entrypoint_parser_splits_chains() -> None:
    doc = {"spec": {"entrypoint": "python -m a x=1 && python -m b +algo=sft y='a b'"}}
    assert _commands(doc) == [("a", ["x=1"]), ("b", ["+algo=sft", "y=a b"])]
    for bad in ("python -m a; python -m b", "python -m a | tee log", "python -m a || python -m b", "python -m a &"):
        with pytest.raises(AssertionError):
            _commands({"spec": {"entrypoint": bad}})


@pytest.mark.parametrize("item", _of_kind("RayJob"), ids=_id)
def test_rayjob_entrypoint_module_and_overrides(item: tuple[str, dict[str, Any]], hydra_conf: None) -> None:
    f, doc = item
    earlier_runs: list[str] = []
    for module, overrides in _commands(doc):
        assert module in WORKLOADS, f"{f}: {module} is not one of {sorted(WORKLOADS)}"
        assert importlib.util.find_spec(module) is not None, f"{f}: no module {module}"
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{f}: {module} is not runnable with -m"
        group = WORKLOADS[module]
        assert any(o.startswith(group) for o in overrides), f"{f}: {module} without a {group}... override"
        assert f"run.storage_path={RUNS}" in overrides, f"{f}: {module} does not write to the {RUNS} volume"
        cfg = compose_validated(overrides)
        assert cfg.run.storage_path == RUNS
        if module == "workloads.posttrain":
            (algo,) = [o.removeprefix("+algo=") for o in overrides if o.startswith("+algo=")]
            assert cfg.algo.name == algo, f"{f}: +algo={algo} composed to algo.name={cfg.algo.name}"
            if cfg.model.path is not None:  # an export on the volume: a text pretraining stage or an earlier command
                starts = {f"{RUNS}/{name}/export" for name in [*earlier_runs, *_pretrain_text_runs()]}
                assert cfg.model.path in starts, f"{f}: model.path={cfg.model.path} is none of {sorted(starts)}"
        else:
            assert cfg.algo.name is None, f"{f}: {module} with an algo"
        assert cfg.run.name not in earlier_runs, f"{f}: two commands write run.name={cfg.run.name}"
        earlier_runs.append(cfg.run.name)
    selector = doc["spec"]["clusterSelector"]["ray.io/cluster"]
    variant_clusters = {d["metadata"]["name"] for g, d in _of_kind("RayCluster") if g.split("/")[0] == f.split("/")[0]}
    assert selector in variant_clusters, f"{f}: clusterSelector names no RayCluster of its variant"


def _quantity(v: Any) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _cluster_nodes(spec: dict[str, Any]) -> list[dict[str, float]]:
    """The Ray resources of every pod the cluster can have at most: the head and maxReplicas of each group."""

    def node(group: dict[str, Any]) -> dict[str, float]:
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpus = params.get("num-cpus", limits.get("cpu", 0))
        gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
        return {"CPU": _quantity(cpus), "GPU": _quantity(gpus)}

    nodes = [node(spec["headGroupSpec"])]
    for g in spec["workerGroupSpecs"]:
        nodes += [node(g) for _ in range(g["maxReplicas"])]
    return nodes


def _demand(cfg: Any, entrypoint_cpus: float) -> list[dict[str, float]]:
    """Ray resource bundles of one command: the driver, the Ray Train workers and (RLVR/UPO) the rollout actors."""
    t = cfg.trainer
    bundles = [{"CPU": float(entrypoint_cpus), "GPU": 0.0}]
    bundles += [{"CPU": float(t.cpus_per_worker), "GPU": 1.0 if t.use_gpu else 0.0}] * int(t.num_workers)
    if cfg.algo.name in ("rlvr", "upo"):
        r = cfg.algo.rollout
        bundles += [{"CPU": float(r.cpus_per_actor), "GPU": float(r.gpus_per_actor)}] * int(r.num_actors)
    return bundles


def _fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b["GPU"], b["CPU"]), reverse=True):  # first fit, largest first
        for n in free:
            if all(n[k] >= b[k] for k in b):
                for k in b:
                    n[k] -= b[k]
                break
        else:
            return False
    return True


def test_fit_check_rejects_oversized_demand() -> None:
    nodes = [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert _fits([{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.0}, {"CPU": 3.0, "GPU": 0.0}], nodes)
    assert not _fits([{"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], nodes)  # a second GPU
    assert not _fits([{"CPU": 3.0, "GPU": 0.0}] * 3, nodes)  # 9 CPUs but only 2 + 8, in pieces of 2 and 8


@pytest.mark.parametrize("item", _of_kind("RayJob"), ids=_id)
def test_rayjob_fits_its_cluster(item: tuple[str, dict[str, Any]], hydra_conf: None) -> None:
    """Each command's driver + Ray Train workers + rollout actors fit on the selected RayCluster at its largest."""
    f, doc = item
    selector = doc["spec"]["clusterSelector"]["ray.io/cluster"]
    (cluster,) = [d["spec"] for _, d in _of_kind("RayCluster") if d["metadata"]["name"] == selector]
    nodes = _cluster_nodes(cluster)
    for module, overrides in _commands(doc):
        cfg = compose_validated(overrides)
        bundles = _demand(cfg, doc["spec"].get("entrypointNumCpus", 0))
        assert _fits(bundles, nodes), f"{f}: {module} {' '.join(overrides)} needs {bundles}; {selector} has {nodes}"


def test_bad_override_is_caught(hydra_conf: None) -> None:
    with pytest.raises(Exception):  # noqa: B017 - Hydra's composition error or validate_config's ValueError
        compose_validated(["+stage=mm", "trainer.num_wrokers=2"])


@pytest.mark.parametrize("item", _of_kind("RayService"), ids=_id)
def test_rayservice_import_path_args_and_deployments(
    item: tuple[str, dict[str, Any]], hydra_conf: None, tmp_path: Path
) -> None:
    f, doc = item
    sc = serve_config(doc)
    (app,) = sc["applications"]
    module_name, attr = app["import_path"].split(":")
    module = importlib.import_module(module_name)
    if attr == "app":  # built on first access (PEP 562); its builder is what takes `args`
        assert not args_given(app) and callable(module.__getattr__)
        target = module.build_app
    else:
        target = getattr(module, attr)
    assert callable(target), f"{f}: {app['import_path']} is not a callable builder"

    from workloads.serve.app import _overrides

    args = app.get("args", {})
    cfg = compose_validated(_overrides(args))
    assert cfg.run.storage_path == "/mnt/runs"

    # Build the Serve application graph (no Ray started): the model path is only read at build time, so point it at
    # the built-in demo model, with an empty storage directory.
    local = {**args, "model.path": None, "run.storage_path": str(tmp_path)}
    application = target(local)
    built: dict[str, Any] = {}
    stack = [application]
    while stack:
        bound = stack.pop()._bound_deployment
        built[bound.name] = bound
        stack += [a for a in (*bound.init_args, *bound.init_kwargs.values()) if hasattr(a, "_bound_deployment")]
    assert {"Ingress", "Prefill", "Decode"} <= set(built), sorted(built)

    for dep in app["deployments"]:
        assert dep["name"] in built, f"{f}: deployment {dep['name']} is not in the app ({sorted(built)})"
        node = {"Ingress": "ingress", "Prefill": "prefill", "Decode": "decode", "Engine": "colocated"}[dep["name"]]
        s = cfg.serve[node]
        if "autoscaling_config" in dep:
            assert s.autoscaling_config.enabled, f"{f}: {node} autoscales in deployments: but not in args"
            for k, v in dep["autoscaling_config"].items():
                assert s.autoscaling_config[k] == v, f"{f}: {dep['name']}.autoscaling_config.{k} != args"
        for k, v in dep.get("ray_actor_options", {}).items():
            assert s.ray_actor_options[k] == v, f"{f}: {dep['name']}.ray_actor_options.{k} != args"
    autoscaled = {d["name"] for d in app["deployments"] if "autoscaling_config" in d}
    assert {"Prefill", "Decode"} <= autoscaled
