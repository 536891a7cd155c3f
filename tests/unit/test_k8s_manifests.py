"""Offline validation of the KubeRay deployment in k8s/: schemas, security policy and wiring to the repo.

Three folders, each applied on its own with ``kubectl apply -f DIR`` or ``-k DIR``: k8s/ (namespace, service
account, recipes, dashboard, NetworkPolicies, the pre-training RayJob), k8s/sweep/ and k8s/interactive/.
Core kinds are validated with ``kubernetes-validate --strict`` (the newest Kubernetes version it bundles);
``ray.io/v1`` kinds with jsonschema against the KubeRay v1.7.0 CRD schemas in tests/assets/kuberay/, made strict
so a misspelled field fails. Pod templates embedded in RayJob/RayCluster are validated as core PodTemplates.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
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
# The folders a user applies, each on its own; k8s/images/ is the kustomize component holding the image names.
FOLDERS = {"base": K8S, "sweep": K8S / "sweep", "interactive": K8S / "interactive"}
IMAGES_COMPONENT = K8S / "images"


def folder_manifests(folder: Path) -> list[Path]:
    """What `kubectl apply -f DIR` reads: every *.yaml, *.yml and *.json directly in DIR (no recursion)."""
    return sorted(p for ext in ("yaml", "yml", "json") for p in folder.glob(f"*.{ext}"))


MANIFESTS = folder_manifests(K8S)
ALL_MANIFESTS = [p for folder in FOLDERS.values() for p in folder_manifests(folder)]
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
    """Every object of the three folders."""
    return [(p, d) for p in ALL_MANIFESTS for d in load_docs(p)]


def folder_docs(folder: Path) -> list[dict[str, Any]]:
    return [d for p in folder_manifests(folder) for d in load_docs(p)]


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in all_docs() if d["kind"] == kind]


def doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


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
    assert len(matches) == 1, f"expected one {kind}/{name} in the k8s/ folders, found {len(matches)}"
    return matches[0]


# ------------------------------------------------------------------------------------------ parse + schema
def test_manifests_exist_and_parse() -> None:
    assert MANIFESTS[0].name == "00-namespace.yaml"
    assert [d["kind"] for d in load_docs(MANIFESTS[0])] == ["Namespace"]  # applied first by `-f k8s/`
    for path, doc in all_docs():
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"].get("name"), path


def kinds_and_names(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def test_each_folder_starts_exactly_what_it_says() -> None:
    # `kubectl apply -f k8s/`: the shared objects and the pre-training job (8 GPUs), nothing else that takes GPUs.
    assert kinds_and_names(folder_docs(K8S)) == [
        ("ConfigMap", "volta-recipes"),
        ("Deployment", "volta-dashboard"),
        ("Namespace", "volta"),
        ("NetworkPolicy", "volta-dashboard"),
        ("NetworkPolicy", "volta-default-deny-ingress"),
        ("NetworkPolicy", "volta-ray"),
        ("PersistentVolumeClaim", "volta-dashboard"),
        ("RayJob", "volta-pretrain"),
        ("Service", "volta-dashboard"),
        ("ServiceAccount", "volta"),
    ]
    assert kinds_and_names(folder_docs(FOLDERS["sweep"])) == [("RayJob", "volta-sweep")]
    assert kinds_and_names(folder_docs(FOLDERS["interactive"])) == [("RayCluster", "volta-interactive")]
    # The subfolders hold their manifests and Kustomization only (nothing nested that -R would pick up).
    for folder in (FOLDERS["sweep"], FOLDERS["interactive"], IMAGES_COMPONENT):
        extra = (
            {p.name for p in folder.iterdir()}
            - {p.name for p in folder_manifests(folder)}
            - {"Kustomization"}
        )
        assert not extra, f"{folder.relative_to(REPO)}: unexpected {sorted(extra)}"
    assert not folder_manifests(IMAGES_COMPONENT)


def test_the_pretraining_job_can_be_left_out_by_label() -> None:
    # docs/kubernetes.md: `kubectl apply -f k8s/ -l app.kubernetes.io/component!=pretrain` sets up the shared objects
    # for the sweep or the interactive cluster without starting pre-training.
    left_out = [
        d
        for d in folder_docs(K8S)
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "pretrain"
    ]
    assert kinds_and_names(left_out) == [("RayJob", "volta-pretrain")]


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
        assert doc["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1", "ray.io/v1"), doc["apiVersion"]


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
# Pod Security Standards, `restricted` profile (which includes `baseline`), as the namespace enforces it:
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ . Written out rule by rule so a manifest
# that the API server would reject fails here first.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
PROFILE_TYPES = {"RuntimeDefault", "Localhost"}


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers, init containers and ephemeral containers: PSS checks all three."""
    return containers(pod_spec) + list(pod_spec.get("ephemeralContainers", []))


def handlers(c: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The probe and lifecycle handlers of a container (httpGet/tcpSocket may name a host)."""
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in c:
            yield c[probe]
    yield from c.get("lifecycle", {}).values()


def restricted_violations(name: str, tmpl: dict[str, Any]) -> list[str]:
    """Every rule of the `restricted` Pod Security Standard that a pod template breaks."""
    spec, found = tmpl["spec"], []
    pod_sc = spec.get("securityContext", {})
    annotations = tmpl.get("metadata", {}).get("annotations", {})
    # baseline
    found += [f"{name}: {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        found.append(f"{name}: hostProcess")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"{name}: volume {volume['name']} of type {sorted(kinds)} (hostPath and others)")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"{name}: unsafe sysctl {sysctl['name']}")
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            found.append(f"{name}: AppArmor annotation {value}")
    # restricted, pod level: non-root and seccomp here count for every container that does not override them
    if pod_sc.get("runAsUser") == 0:
        found.append(f"{name}: pod runAsUser 0")
    for c in all_containers(spec):
        sc, where = c.get("securityContext", {}), f"{name}/{c['name']}"
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where}: hostPort")
        if any(h.get(kind, {}).get("host") for h in handlers(c) for kind in ("httpGet", "tcpSocket")):
            found.append(f"{where}: probe or lifecycle handler with a host")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount")
        for context in (pod_sc, sc):
            se = context.get("seLinuxOptions", {})
            if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
                found.append(f"{where}: seLinuxOptions")
            if context.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in PROFILE_TYPES:
                found.append(f"{where}: appArmorProfile")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser 0")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") not in PROFILE_TYPES:
            found.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
    return found


def pod_violations(name: str, tmpl: dict[str, Any]) -> list[str]:
    """The restricted profile plus what this project asks on top: UID 1000 (the images' user), the volta service
    account, and cpu/memory requests and limits on every container."""
    spec = tmpl["spec"]
    found = restricted_violations(name, tmpl)
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True or pod_sc.get("runAsUser") != 1000:
        found.append(f"{name}: pod must set runAsNonRoot and runAsUser 1000")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    if spec.get("serviceAccountName") != "volta":
        found.append(f"{name}: serviceAccountName must be volta")
    for c in containers(spec):
        sc, where = c.get("securityContext", {}), f"{name}/{c['name']}"
        if sc.get("runAsUser", pod_sc.get("runAsUser")) != 1000:
            found.append(f"{where}: runAsUser must be 1000")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            found.append(f"{where}: capabilities must drop ALL and add none")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(kind, {})):
                found.append(f"{where}: resources.{kind} needs cpu and memory")
    return found


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = find_doc("Namespace", NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode
    assert labels.get("pod-security.kubernetes.io/enforce-version", "latest") == "latest"


@pytest.mark.parametrize("named", all_pod_templates(), ids=lambda n: n[0])
def test_pods_run_restricted(named: tuple[str, dict[str, Any]]) -> None:
    assert pod_violations(*named) == []


def test_every_pod_of_every_folder_is_checked() -> None:
    names = [n for n, _ in all_pod_templates()]
    for owner in ("RayJob/volta-pretrain", "RayJob/volta-sweep", "RayCluster/volta-interactive"):
        assert f"{owner}:head" in names and f"{owner}:worker:gpu" in names, owner
    assert "RayJob/volta-pretrain:submitter" in names and "RayJob/volta-sweep:submitter" in names
    assert "Deployment/volta-dashboard:pod" in names


def test_pod_policy_flags_a_broken_pod() -> None:
    name, tmpl = next(n for n in all_pod_templates() if n[0].endswith(":worker:gpu"))
    broken = copy.deepcopy(tmpl)
    spec = broken["spec"]
    spec["hostNetwork"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    spec["volumes"].append({"name": "nfs", "nfs": {"server": "nfs.example", "path": "/"}})
    spec["securityContext"]["runAsUser"] = 0
    spec["securityContext"]["sysctls"].append({"name": "kernel.msgmax", "value": "65536"})
    container = spec["containers"][0]
    container["securityContext"] = {"privileged": True, "procMount": "Unmasked"}
    container["ports"] = [{"containerPort": 80, "hostPort": 80}]
    del container["resources"]["limits"]["memory"]
    found = "\n".join(pod_violations(name, broken))
    for problem in (
        "hostNetwork",
        "hostPath",
        "nfs",
        "pod runAsUser 0",
        "unsafe sysctl kernel.msgmax",
        "privileged",
        "procMount",
        "hostPort",
        "allowPrivilegeEscalation",
        "capabilities",
        "resources.limits",
    ):
        assert problem in found, problem

    # Each container-level rule on its own, on an otherwise compliant pod.
    for change, problem in (
        ({"allowPrivilegeEscalation": True}, "allowPrivilegeEscalation"),
        ({"runAsNonRoot": False}, "runAsNonRoot"),
        ({"runAsUser": 0}, "runAsUser 0"),
        ({"seccompProfile": {"type": "Unconfined"}}, "seccompProfile"),
        ({"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}, "capabilities"),
        ({"capabilities": {"drop": ["NET_RAW"]}}, "capabilities"),
        ({"seLinuxOptions": {"type": "spc_t"}}, "seLinuxOptions"),
        ({"appArmorProfile": {"type": "Unconfined"}}, "appArmorProfile"),
    ):
        one = copy.deepcopy(tmpl)
        one["spec"]["containers"][0]["securityContext"].update(change)
        assert any(problem in v for v in restricted_violations(name, one)), change
    assert restricted_violations(name, tmpl) == []


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


def test_secret_refs_are_optional_so_pods_start_without_the_secret() -> None:
    # Without the volta-s3 Secret a pod still starts (an IAM role may provide credentials); if nothing does, the
    # driver's preflight stops the job with one line naming both ways (tests/unit/test_s3_credentials.py).
    refs = 0
    for name, tmpl in all_pod_templates():
        for c in containers(tmpl["spec"]):
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    refs += 1
                    assert source["secretRef"].get("optional") is True, f"{name}/{c['name']}"
            for env in c.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    refs += 1
                    assert ref.get("optional") is True, f"{name}/{c['name']}: {env['name']}"
        for volume in tmpl["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"].get("optional") is True, f"{name}: volume {volume['name']}"
    assert refs == 6  # head and workers of the three Ray clusters


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


# ----------------------------------------------------------------------------------------------- network
# Ray's node-to-node ports that `ray start` would otherwise pick at random, and the worker-process range: every
# Ray group pins them to the same values so one NetworkPolicy can name them (k8s/04-networkpolicy.yaml).
RAY_PORT_PARAMS = (
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "metrics-export-port",
)
# The head's client-facing ports and Ray's defaults for them.
HEAD_PORT_DEFAULTS = {"port": 6379, "dashboard-port": 8265, "ray-client-server-port": 10001}
EPHEMERAL_SYSCTL = "net.ipv4.ip_local_port_range"
OPERATOR_PEER = {
    "namespaceSelector": {},
    "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}},
}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes LabelSelector matches a pod's labels (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def port_ranges(rule: dict[str, Any]) -> set[tuple[int, int]]:
    """The (first, last) TCP port ranges a NetworkPolicy rule admits."""
    out = set()
    for port in rule["ports"]:
        assert port.get("protocol", "TCP") == "TCP", port
        assert isinstance(port["port"], int), "name ports by number: named ports differ between pods"
        out.add((port["port"], port.get("endPort", port["port"])))
    return out


def ray_groups() -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(where, rayStartParams, pod template) of every head and worker group of every Ray cluster."""
    out = []
    for _, doc in all_docs():
        for spec in ray_cluster_specs(doc):
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            out.append(
                (f"{where}:head", spec["headGroupSpec"]["rayStartParams"], spec["headGroupSpec"]["template"])
            )
            for group in spec["workerGroupSpecs"]:
                out.append((f"{where}:{group['groupName']}", group["rayStartParams"], group["template"]))
    return out


def ephemeral_range(tmpl: dict[str, Any]) -> tuple[int, int]:
    sysctls = {s["name"]: s["value"] for s in tmpl["spec"]["securityContext"].get("sysctls", [])}
    low, high = sysctls[EPHEMERAL_SYSCTL].split()
    return int(low), int(high)


def policy(name: str) -> dict[str, Any]:
    return find_doc("NetworkPolicy", name)["spec"]


def test_every_ray_group_pins_the_same_node_to_node_ports() -> None:
    groups = ray_groups()
    assert len(groups) == 6
    pinned = {
        where: {k: int(params[k]) for k in (*RAY_PORT_PARAMS, "min-worker-port", "max-worker-port")}
        for where, params, _ in groups
    }
    assert len({tuple(sorted(p.items())) for p in pinned.values()}) == 1, pinned
    ports = next(iter(pinned.values()))
    ephemeral = {ephemeral_range(tmpl) for _, _, tmpl in groups}
    assert len(ephemeral) == 1, ephemeral
    low, _ = ephemeral.pop()
    workers = (ports["min-worker-port"], ports["max-worker-port"])
    assert workers[0] <= workers[1] and workers[1] < low, "worker ports must not overlap the ephemeral range"
    single = [ports[k] for k in RAY_PORT_PARAMS]
    assert len(set(single)) == len(single)
    assert not any(workers[0] <= p <= workers[1] for p in single)


def test_ray_start_params_are_options_of_the_installed_ray_start() -> None:
    # KubeRay turns every key into `ray start --key=value`; an unknown one stops the pod.
    from ray.scripts.scripts import start

    options = {opt.removeprefix("--") for param in start.params for opt in param.opts}
    for where, params, _ in ray_groups():
        assert set(params) <= options, f"{where}: {sorted(set(params) - options)}"


def test_ingress_is_denied_by_default_and_egress_is_open() -> None:
    policies = docs_of_kind("NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies} == {NAMESPACE}
    deny = policy("volta-default-deny-ingress")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"], "egress stays open (S3, DNS, the model hub)"
        assert "egress" not in p["spec"]


def test_every_peer_is_in_the_namespace_except_the_operator_on_the_dashboard_port() -> None:
    for p in docs_of_kind("NetworkPolicy"):
        for rule in p["spec"].get("ingress", []):
            assert rule.get("ports"), f"{p['metadata']['name']}: a rule without ports admits every port"
            for peer in rule["from"]:
                if peer == OPERATOR_PEER:
                    assert p["metadata"]["name"] == "volta-ray" and port_ranges(rule) == {(8265, 8265)}
                else:  # a podSelector alone selects pods of the policy's own namespace
                    assert set(peer) == {"podSelector"}, f"{p['metadata']['name']}: {peer}"


def test_ray_policy_selects_the_ray_pods_and_dashboard_policy_the_dashboard() -> None:
    ray, dashboard = policy("volta-ray")["podSelector"], policy("volta-dashboard")["podSelector"]
    for name, tmpl in all_pod_templates():
        labels = tmpl["metadata"]["labels"]
        is_ray = name.endswith(":head") or ":worker:" in name
        assert selects(ray, labels) == is_ray, name
        assert selects(dashboard, labels) == name.startswith("Deployment/volta-dashboard"), name
        assert selects(policy("volta-default-deny-ingress")["podSelector"], labels)


def test_ray_policy_admits_exactly_the_ports_ray_listens_on() -> None:
    spec = policy("volta-ray")
    rules = spec["ingress"]
    from_namespace = [r for r in rules if r["from"] == [{"podSelector": {}}]]
    from_ray = [r for r in rules if r["from"] == [{"podSelector": spec["podSelector"]}]]
    from_operator = [r for r in rules if r["from"] == [OPERATOR_PEER]]
    assert len(from_namespace) == len(from_ray) == len(from_operator) == 1 and len(rules) == 3

    # Any pod of the namespace: the head's GCS, dashboard/job API and Ray client ports, as `ray start --head`
    # opens them (Ray's defaults unless rayStartParams say otherwise) and as every head container declares them.
    head_ports = set()
    for _, doc in all_docs():
        for spec_ in ray_cluster_specs(doc):
            params = spec_["headGroupSpec"]["rayStartParams"]
            opened = {int(params.get(k, default)) for k, default in HEAD_PORT_DEFAULTS.items()}
            container = spec_["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert {p["containerPort"] for p in container["ports"]} == opened
            head_ports |= {(port, port) for port in opened}
    assert head_ports == {(6379, 6379), (8265, 8265), (10001, 10001)}
    assert port_ranges(from_namespace[0]) == head_ports

    # Other Ray pods: the pinned ports, the worker-process range and the ephemeral range of the sysctl.
    _, params, tmpl = ray_groups()[0]
    expected = {(int(params[k]), int(params[k])) for k in RAY_PORT_PARAMS}
    expected.add((int(params["min-worker-port"]), int(params["max-worker-port"])))
    expected.add(ephemeral_range(tmpl))
    assert port_ranges(from_ray[0]) == expected


def test_dashboard_policy_admits_the_mlflow_port_only() -> None:
    pod = find_doc("Deployment", "volta-dashboard")["spec"]["template"]["spec"]
    ports = {(p["containerPort"], p["containerPort"]) for p in pod["containers"][0]["ports"]}
    (rule,) = policy("volta-dashboard")["ingress"]
    assert rule["from"] == [{"podSelector": {}}]
    assert port_ranges(rule) == ports == {(5000, 5000)}


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


def kustomization(folder: Path) -> dict[str, Any]:
    # Named `Kustomization` (no extension) so `kubectl apply -f DIR` does not try to apply it.
    assert not list(folder.glob("kustomization.*")), folder
    return yaml.safe_load((folder / "Kustomization").read_text())


def test_each_folder_has_a_kustomization_listing_its_manifests() -> None:
    for folder in FOLDERS.values():
        k = kustomization(folder)
        assert k["kind"] == "Kustomization", folder
        assert k["resources"] == [p.name for p in folder_manifests(folder)], folder
        assert not any("templates" in r for r in k["resources"])
        # The images are set in one place: the component, never per folder.
        assert "images" not in k, f"{folder}: set images in k8s/images/Kustomization"
        assert k["components"] == [str(IMAGES_COMPONENT.relative_to(K8S)) if folder == K8S else "../images"]


def test_images_are_set_in_one_place_equal_to_the_versions_file() -> None:
    component = kustomization(IMAGES_COMPONENT)
    assert component["kind"] == "Component"
    images = {i["name"]: i for i in component["images"]}
    assert len(images) == 2
    # `-f` applies the manifests' literal images (test_images_are_pinned_to_the_versions_file), `-k` the
    # component's: the same until a user sets newName/newTag there.
    for image in (GPU_IMAGE, CPU_IMAGE):
        name, _, tag = image.rpartition(":")
        assert images[name] == {"name": name, "newTag": tag}, images[name]


KUBECTL = shutil.which("kubectl")


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` (offline): what `kubectl apply -k DIR` would apply."""
    assert KUBECTL
    out = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def rendered_images(docs: list[dict[str, Any]]) -> set[str]:
    return {c["image"] for doc in docs for _, tmpl in pod_templates(doc) for c in containers(tmpl["spec"])}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_apply_k_equals_apply_f_and_the_component_retags_every_folder(tmp_path: Path) -> None:
    for folder in FOLDERS.values():
        rendered = kustomize(folder)
        assert kinds_and_names(rendered) == kinds_and_names(folder_docs(folder)), folder
        assert rendered_images(rendered) == rendered_images(folder_docs(folder)), folder

    # Setting newName/newTag once in the component changes every container of every folder.
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    component = yaml.safe_load((copy_dir / "images" / "Kustomization").read_text())
    for image in component["images"]:
        image.update(newName=f"my.registry.io/team/{image['name'].rsplit('/', 1)[1]}", newTag="9.9.9")
    (copy_dir / "images" / "Kustomization").write_text(yaml.safe_dump(component))
    seen: set[str] = set()
    for folder in FOLDERS.values():
        images = rendered_images(kustomize(copy_dir / folder.relative_to(K8S)))
        assert images and all(i.startswith("my.registry.io/team/") and i.endswith(":9.9.9") for i in images)
        seen |= images
    assert seen == {"my.registry.io/team/volta-gpu:9.9.9", "my.registry.io/team/volta-cpu:9.9.9"}
