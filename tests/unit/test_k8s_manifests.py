"""Offline validation of the KubeRay deployment in k8s/: schemas, security policy and wiring to the repo.

Core kinds are validated with ``kubernetes-validate --strict`` (the newest Kubernetes version it bundles);
``ray.io/v1`` kinds with jsonschema against the KubeRay v1.7.0 CRD schemas in tests/assets/kuberay/, made strict
so a misspelled field fails. Pod templates embedded in RayJob/RayCluster are validated as core PodTemplates.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.fixtures_deploy import locked_versions, read_env_file
from volta.config import config_from_dict, load_config

K8S = REPO / "k8s"
ASSETS = REPO / "tests" / "assets" / "kuberay"
# What `kubectl apply -f k8s/` reads: every *.yaml, *.yml and *.json directly in k8s/ (no recursion).
MANIFESTS = sorted(p for ext in ("yaml", "yml", "json") for p in K8S.glob(f"*.{ext}"))
TEMPLATES = sorted((K8S / "templates").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.latest_version()
NAMESPACE = "volta"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


# ------------------------------------------------------------------------------------------------ helpers
def load_docs(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in MANIFESTS for d in load_docs(p)]


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in all_docs() if d["kind"] == kind]


def doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


VERSIONS = read_env_file(REPO / "docker" / "versions.env")
GPU_IMAGE = f"{VERSIONS['IMAGE_REGISTRY']}/volta-gpu:{VERSIONS['VOLTA_VERSION']}-{VERSIONS['CUDA_FLAVOR']}"
CPU_IMAGE = f"{VERSIONS['IMAGE_REGISTRY']}/volta-cpu:{VERSIONS['VOLTA_VERSION']}"


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster spec of a RayCluster, or the embedded rayClusterSpec of a RayJob."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


def ray_node_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, PodTemplateSpec) of every Ray head and worker group in a RayCluster/RayJob."""
    for spec in ray_cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker:{group['groupName']}", group["template"]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, PodTemplateSpec) of every pod a manifest creates."""
    yield from ray_node_templates(doc)
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "pod", doc["spec"]["template"]


def all_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}:{role}", tmpl)
        for _, doc in all_docs()
        for role, tmpl in pod_templates(doc)
    ]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("containers", [])) + list(pod_spec.get("initContainers", []))


def strict_schema(schema: Any) -> Any:
    """Inject ``additionalProperties: false`` wherever a schema lists properties without saying otherwise."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = strict_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(s) for s in out[key]]
    return out


def crd_validator(kind: str, strict: bool = True) -> jsonschema.Draft7Validator:
    name = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}[kind]
    schema = json.loads((ASSETS / f"{name}-v1.schema.json").read_text())
    return jsonschema.Draft7Validator(strict_schema(schema) if strict else schema)


def validate_ray(doc: dict[str, Any], strict: bool = True) -> None:
    errors = sorted(crd_validator(doc["kind"], strict).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        raise jsonschema.ValidationError(f"{'.'.join(map(str, first.path))}: {first.message}")


def as_pod_template(tmpl: dict[str, Any]) -> dict[str, Any]:
    """Wrap a PodTemplateSpec into a core PodTemplate object for kubernetes-validate."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "embedded", "namespace": NAMESPACE},
        "template": tmpl,
    }


def find_doc(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs_of_kind(kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} in k8s/, found {len(matches)}"
    return matches[0]


# ------------------------------------------------------------------------------------------ parse + schema
def test_manifests_exist_and_parse() -> None:
    assert MANIFESTS[0].name == "00-namespace.yaml"
    assert [d["kind"] for d in load_docs(MANIFESTS[0])] == ["Namespace"]  # applied first by `-f k8s/`
    kinds = {d["kind"] for _, d in all_docs()}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "RayJob",
        "RayCluster",
        "Deployment",
        "Service",
    } <= kinds
    assert {"PersistentVolumeClaim"} <= kinds
    for path, doc in all_docs():
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"].get("name"), path


@pytest.mark.parametrize(
    "item", [i for i in all_docs() if not i[1]["apiVersion"].startswith("ray.io/")], ids=doc_id
)
def test_core_objects_validate_strictly(item: tuple[Path, dict[str, Any]]) -> None:
    # validate() raises SchemaNotFoundError for an unknown kind instead of skipping it.
    kubernetes_validate.validate(item[1], K8S_VERSION, strict=True)


@pytest.mark.parametrize("item", [i for i in all_docs() if i[1]["apiVersion"] == "ray.io/v1"], ids=doc_id)
def test_ray_objects_validate_against_kuberay_crds(item: tuple[Path, dict[str, Any]]) -> None:
    validate_ray(item[1])


@pytest.mark.parametrize("item", [i for i in all_docs() if i[1]["apiVersion"] == "ray.io/v1"], ids=doc_id)
def test_embedded_pod_templates_validate_as_core_pod_templates(item: tuple[Path, dict[str, Any]]) -> None:
    templates = list(pod_templates(item[1]))
    assert templates
    for _, tmpl in templates:
        kubernetes_validate.validate(as_pod_template(tmpl), K8S_VERSION, strict=True)


def test_only_known_api_versions() -> None:
    for _, doc in all_docs():
        assert doc["apiVersion"] in ("v1", "apps/v1", "ray.io/v1"), doc["apiVersion"]


# ------------------------------------------------------------- the checks reject what they should (broken copies)
def test_strict_crd_schema_rejects_misspelled_fields() -> None:
    job = copy.deepcopy(find_doc("RayJob", "volta-pretrain"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    validate_ray(job, strict=False)  # the published schema alone lets the typo through...
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate_ray(job)  # ...the strict one does not

    cluster = copy.deepcopy(find_doc("RayCluster", "volta-interactive"))
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_ray(cluster)

    cluster = copy.deepcopy(find_doc("RayCluster", "volta-interactive"))
    cluster["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError):
        validate_ray(cluster)


def test_strict_core_validation_rejects_misspelled_fields() -> None:
    deployment = copy.deepcopy(find_doc("Deployment", "volta-dashboard"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"tcpSocket": {"port": 5000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    job = find_doc("RayJob", "volta-pretrain")
    tmpl = copy.deepcopy(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"])
    tmpl["spec"]["toleration"] = tmpl["spec"].pop("tolerations")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod_template(tmpl), K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------- policy
def pod_violations(name: str, tmpl: dict[str, Any]) -> list[str]:
    """What a reviewer would reject in a pod template: root, privilege, host access, missing resources."""
    spec = tmpl["spec"]
    found = [f"{name}: {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    found += [f"{name}: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True or pod_sc.get("runAsUser") != 1000:
        found.append(f"{name}: pod must set runAsNonRoot and runAsUser 1000")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    if spec.get("serviceAccountName") != "volta":
        found.append(f"{name}: serviceAccountName must be volta")
    for c in containers(spec):
        sc, where = c.get("securityContext", {}), f"{name}/{c['name']}"
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) != 1000:
            found.append(f"{where}: runAsUser must be 1000")
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
            found.append(f"{where}: privilege escalation")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            found.append(f"{where}: capabilities must drop ALL and add none")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            found.append(f"{where}: seccompProfile")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(kind, {})):
                found.append(f"{where}: resources.{kind} needs cpu and memory")
    return found


@pytest.mark.parametrize("named", all_pod_templates(), ids=lambda n: n[0])
def test_pods_run_restricted(named: tuple[str, dict[str, Any]]) -> None:
    assert pod_violations(*named) == []


def test_pod_policy_flags_a_broken_pod() -> None:
    name, tmpl = next(n for n in all_pod_templates() if n[0].endswith(":worker:gpu"))
    broken = copy.deepcopy(tmpl)
    spec = broken["spec"]
    spec["hostNetwork"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    spec["securityContext"]["runAsUser"] = 0
    container = spec["containers"][0]
    container["securityContext"] = {"privileged": True}
    del container["resources"]["limits"]["memory"]
    found = "\n".join(pod_violations(name, broken))
    for problem in ("hostNetwork", "hostPath", "runAsUser", "privilege", "capabilities", "resources.limits"):
        assert problem in found, problem


def test_ray_pods_drain_shm_and_tmp() -> None:
    seen = 0
    for _, doc in all_docs():
        for role, tmpl in ray_node_templates(doc):
            seen += 1
            spec, where = tmpl["spec"], f"{doc['metadata']['name']}:{role}"
            assert spec.get("terminationGracePeriodSeconds", 30) > 30, f"{where}: > Ray's 30 s drain timeout"
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
            shm = volumes[mounts["/dev/shm"]]
            assert shm["emptyDir"]["medium"] == "Memory", where
            assert "emptyDir" in volumes[mounts["/tmp/ray"]], where
    assert seen >= 6  # 2 RayJobs + 1 RayCluster, head + worker each


def test_gpu_workers_request_gpus_and_tolerate_gpu_taints() -> None:
    groups = [g for _, d in all_docs() for s in ray_cluster_specs(d) for g in s.get("workerGroupSpecs", [])]
    assert groups
    for group in groups:
        spec = group["template"]["spec"]
        res = spec["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert (
            res.get("requests", {}).get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"])
            == res["limits"]["nvidia.com/gpu"]
        )
        assert any(
            t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
            for t in spec.get("tolerations", [])
        ), group["groupName"]


def test_ray_clusters_use_token_auth_and_the_pinned_ray_version() -> None:
    specs = [s for _, d in all_docs() for s in ray_cluster_specs(d)]
    assert len(specs) == 3
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["rayVersion"] == locked_versions()["ray"]


def test_rayjobs_clean_up_and_retry() -> None:
    for job in docs_of_kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1


def test_no_plaintext_secrets() -> None:
    assert not docs_of_kind("Secret"), "Secrets belong in k8s/templates/ (placeholders) or kubectl create"
    for _, doc in all_docs():
        for _, tmpl in pod_templates(doc):
            for c in containers(tmpl["spec"]):
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{c['name']}: {env['name']} in plain text"
                        assert "secretKeyRef" in env.get("valueFrom", {}), env["name"]
                for source in c.get("envFrom", []):
                    assert "secretRef" in source or "configMapRef" in source
        runtime_env = doc.get("spec", {}).get("runtimeEnvYAML", "")
        assert not SECRET_NAME.search(runtime_env), "credentials must not travel in runtimeEnvYAML"
    text = "\n".join(p.read_text() for p in MANIFESTS)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is committed"


def test_secret_is_only_a_template_with_placeholders() -> None:
    assert TEMPLATES, "k8s/templates/ must hold the S3 Secret template"
    secrets = [d for p in TEMPLATES for d in load_docs(p) if d["kind"] == "Secret"]
    assert len(secrets) == 1
    secret = secrets[0]
    assert "data" not in secret
    assert secret["stringData"] and set(secret["stringData"].values()) == {"REPLACE_ME"}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert secret["metadata"]["namespace"] == NAMESPACE
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    # Every envFrom in the manifests names this Secret.
    refs = {
        s["secretRef"]["name"]
        for _, tmpl in all_pod_templates()
        for c in containers(tmpl["spec"])
        for s in c.get("envFrom", [])
        if "secretRef" in s
    }
    assert refs == {secret["metadata"]["name"]}
    # `kubectl apply -f k8s/` does not recurse into subfolders: the template is never applied by accident.
    assert all(p.parent != K8S for p in TEMPLATES)


def test_images_are_pinned_to_the_versions_file() -> None:
    images: set[str] = set()
    for _, doc in all_docs():
        for role, tmpl in pod_templates(doc):
            for c in containers(tmpl["spec"]):
                image = c["image"]
                images.add(image)
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest" and "/" not in tag, image
                if doc["kind"] in ("RayJob", "RayCluster"):
                    assert image == GPU_IMAGE, f"{role}: {image}"
    assert images == {GPU_IMAGE, CPU_IMAGE}


def test_namespace_is_set_on_every_namespaced_object() -> None:
    namespaces = docs_of_kind("Namespace")
    assert [n["metadata"]["name"] for n in namespaces] == [NAMESPACE]
    for _, doc in all_docs():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


# ---------------------------------------------------------------------------------------- wiring to the repo
def entrypoint_recipe(job: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The entrypoint argv and the recipe mapping it reads through the head pod's ConfigMap mount."""
    argv = shlex.split(job["spec"]["entrypoint"])
    config_path = Path(argv[argv.index("--config") + 1])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume_name = mounts[str(config_path.parent)]
    volume = next(v for v in head["volumes"] if v["name"] == volume_name)
    config_map = find_doc("ConfigMap", volume["configMap"]["name"])
    return argv, yaml.safe_load(config_map["data"][config_path.name])


@pytest.mark.parametrize(
    ("job_name", "script"),
    [("volta-pretrain", "orchestration/pretrain.py"), ("volta-sweep", "orchestration/sweep.py")],
)
def test_entrypoints_run_repo_scripts_with_a_valid_mounted_recipe(job_name: str, script: str) -> None:
    job = find_doc("RayJob", job_name)
    argv, recipe = entrypoint_recipe(job)
    assert argv[:2] == ["python", script]
    assert (REPO / script).is_file(), f"{script} is not in the repository"
    # The entrypoint path is relative: the head's working directory must be /app, where the image has the code.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["workingDir"] == "/app"
    config = config_from_dict(recipe)
    if script.endswith("sweep.py"):
        assert config.sweep.space, "the sweep recipe must define a search space"


def test_recipe_fits_the_cluster_it_runs_on() -> None:
    for job in docs_of_kind("RayJob"):
        _, recipe = entrypoint_recipe(job)
        config = config_from_dict(recipe)
        gpus = cpus = 0.0
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
            cpus += group["replicas"] * float(limits["cpu"])
        trials = (config.sweep.max_concurrent_trials or 1) if config.sweep.space else 1
        need_gpus = trials * config.ray.num_workers * config.ray.gpus_per_worker
        need_cpus = trials * config.ray.num_workers * config.ray.cpus_per_worker
        assert config.ray.use_gpu and need_gpus <= gpus, job["metadata"]["name"]
        assert need_cpus <= cpus, job["metadata"]["name"]


def test_cluster_recipe_keeps_the_base_recipe_science() -> None:
    _, recipe = entrypoint_recipe(find_doc("RayJob", "volta-pretrain"))
    cluster = config_from_dict(recipe)
    base = load_config(REPO / "configs" / "base.yaml")
    for section in ("model", "loss", "optim", "train", "eval"):
        assert getattr(cluster, section) == getattr(base, section), section
    assert cluster.data.train_shards == base.data.train_shards
    assert cluster.data.val_shards == base.data.val_shards


def test_recipes_track_to_the_dashboard_service() -> None:
    service = find_doc("Service", "volta-dashboard")
    port = service["spec"]["ports"][0]["port"]
    for job in docs_of_kind("RayJob"):
        _, recipe = entrypoint_recipe(job)
        assert config_from_dict(recipe).tracking.uri == f"http://{service['metadata']['name']}:{port}"


def test_dashboard_is_wired_and_probed() -> None:
    deployment = find_doc("Deployment", "volta-dashboard")
    service = find_doc("Service", "volta-dashboard")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"] and container["livenessProbe"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {d["metadata"]["name"] for d in docs_of_kind("PersistentVolumeClaim")}

    # The command is a valid `mlflow server` invocation for the installed MLflow, bound for the Service.
    from mlflow.cli import server

    command = container["command"]
    assert command[:2] == ["mlflow", "server"]
    params = server.make_context("server", list(command[2:])).params
    assert params["host"] == "0.0.0.0"
    assert int(params["port"]) == port_names[service["spec"]["ports"][0]["targetPort"]]
    allowed = params["allowed_hosts"].split(",")
    assert f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" in allowed
    assert "localhost:*" in allowed  # kubectl port-forward


def test_kustomization_lists_every_manifest_and_the_pinned_images() -> None:
    # Named `Kustomization` (no extension) so `kubectl apply -f k8s/` does not try to apply it.
    assert not list(K8S.glob("kustomization.*"))
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == [p.name for p in MANIFESTS]
    assert not any("templates" in r for r in kustomization["resources"])
    images = {i["name"]: i["newTag"] for i in kustomization["images"]}
    for image in (GPU_IMAGE, CPU_IMAGE):
        name, _, tag = image.rpartition(":")
        assert images[name] == tag
    assert len(images) == 2
