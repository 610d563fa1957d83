"""Every object in launch/k8s/ against the API schemas a cluster would check it with.

- Kubernetes objects: the OpenAPI schemas of Kubernetes KUBERNETES_VERSION as JSON Schema,
  shipped by the `kubernetes-validate` package (dev extra), in their strict form: an unknown
  field is an error, as `kubectl apply` (server-side field validation "Strict") makes it.
- The PyTorchJob: the openAPIV3Schema of the Kubeflow training operator's PyTorchJob CRD
  (v1.9.0), kept in schemas/, made strict the same way (every object schema that lists its
  properties gets additionalProperties: false, which is what the API server's structural-
  schema field validation does); its metadata and pod templates, which the CRD leaves open
  or the operator turns into Pods, are also checked against Kubernetes' ObjectMeta and
  PodTemplateSpec. CEL rules (x-kubernetes-validations) are not evaluated.

KUBERNETES_VERSION is 1.31: the training operator v1.9 is built against it, and the Indexed
Job's podFailurePolicy is GA from it on; later versions keep these fields.

Regenerate schemas/kubeflow.org_pytorchjobs.v1.9.0.json from a checkout of
github.com/kubeflow/training-operator at tag v1.9.0:
    python - <<'EOF'
    import json, yaml
    crd = yaml.safe_load(open("manifests/base/crds/kubeflow.org_pytorchjobs.yaml"))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    strip = lambda n: ({k: strip(v) for k, v in n.items() if k != "description"} if isinstance(n, dict)
                       else [strip(v) for v in n] if isinstance(n, list) else n)
    print(json.dumps(strip(schema), indent=1))   # then restore the "$comment" with the provenance
    EOF
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")
import jsonschema  # noqa: E402  (kubernetes-validate's dependency)
from referencing import Registry, Resource  # noqa: E402

KUBERNETES_VERSION = "1.31"
K8S = ROOT / "launch" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
PYTORCHJOB_SCHEMA = Path(__file__).parent / "schemas" / "kubeflow.org_pytorchjobs.v1.9.0.json"
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"


class ManifestInvalid(AssertionError):
    pass


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def every_object() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in MANIFESTS for doc in documents(path)]


@cache
def kubernetes_definitions() -> Resource:
    """The `$defs` of every Kubernetes type at KUBERNETES_VERSION, strict (as shipped)."""
    from importlib.resources import files

    from kubernetes_validate.utils import all_versions, major_minor

    shipped = [version for version in all_versions() if major_minor(version) == KUBERNETES_VERSION]
    assert shipped, f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for {KUBERNETES_VERSION}"
    schemas = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{shipped[-1]}-local-strict"
    text = (schemas / "_definitions.json").read_text()
    return Resource.from_contents(json.loads(text))


def strict(schema: object) -> object:
    """The CRD schema with unknown fields made errors: every object schema that lists its
    properties and says nothing about others (or about preserving them) forbids them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) if key != "properties" else {name: strict(sub) for name, sub in value.items()}
              for key, value in schema.items()}
    if ("properties" in result and "additionalProperties" not in result
            and not result.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@cache
def pytorchjob_schema() -> dict:
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    schema.pop("$comment")
    return strict(schema)


def errors_against(schema: dict, instance: object) -> list[jsonschema.ValidationError]:
    registry = Registry().with_resource(DEFINITIONS_ID, kubernetes_definitions())
    return list(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(instance))


def kubernetes_type(name: str) -> dict:
    return {"$ref": f"{DEFINITIONS_ID}#/$defs/{name}"}


def describe(error: jsonschema.ValidationError, where: str = "") -> str:
    path = ".".join(str(part) for part in error.absolute_path)
    return f"{where}{path or '(top)'}: {error.message}"


def validate(doc: dict) -> None:
    """Raises ManifestInvalid naming every field that the cluster would reject."""
    if (doc.get("apiVersion"), doc.get("kind")) == ("kubeflow.org/v1", "PyTorchJob"):
        problems = [describe(e) for e in errors_against(pytorchjob_schema(), doc)]
        problems += [describe(e, "metadata.") for e in
                     errors_against(kubernetes_type("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                                    doc.get("metadata", {}))]
        for role, replica in doc.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
            if isinstance(replica, dict) and "template" in replica:
                problems += [describe(e, f"spec.pytorchReplicaSpecs.{role}.template.") for e in
                             errors_against(kubernetes_type("io.k8s.api.core.v1.PodTemplateSpec"),
                                            replica["template"])]
    else:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            problems = []
        except kubernetes_validate.ValidationError as error:
            problems = [describe(error)]
    if problems:
        raise ManifestInvalid("; ".join(dict.fromkeys(problems)))


@pytest.mark.parametrize("name, doc", every_object(), ids=[name for name, _ in every_object()])
def test_manifest_is_valid_for_the_cluster(name, doc):
    validate(doc)


def test_every_manifest_file_has_objects_of_known_kinds():
    kinds = sorted(doc["kind"] for _, doc in every_object())
    assert kinds == ["ConfigMap", "ConfigMap", "CronJob", "Job", "Job", "Job", "PersistentVolumeClaim", "PyTorchJob",
                     "Secret", "Secret", "Service"]


def changed(name: str, path: list, value: object) -> dict:
    """A deep copy of the manifest object `name` with the field at `path` set to `value`
    (the PyTorchJob's replicas share one template through a YAML anchor: copy first)."""
    doc = copy.deepcopy(dict(every_object())[name])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


CONTAINER = ["spec", "template", "spec", "containers", 0]
MASTER = ["spec", "pytorchReplicaSpecs", "Master"]


@pytest.mark.parametrize("name, path, value, message", [
    # unknown fields
    ("indexed-job.yaml:Job/gapm-train", ["spec", "completionMod"], "Indexed", "Additional properties"),
    ("indexed-job.yaml:Job/gapm-train", [*CONTAINER, "gpus"], 8, "Additional properties"),
    ("indexed-job.yaml:Service/gapm-train", ["spec", "clusterIp"], "None", "Additional properties"),
    ("eval-cronjob.yaml:CronJob/gapm-eval", ["spec", "concurrency"], "Forbid", "Additional properties"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", ["spec", "runPolicy", "backoffLimits"], 20, "Additional properties"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", [*MASTER, "restart"], "OnFailure", "Additional properties"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", [*MASTER, "template", "spec", "containers", 0, "imagePullPolicyy"],
     "IfNotPresent", "Additional properties"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", ["metadata", "label"], {"a": "b"}, "Additional properties"),
    # wrong types and values
    ("indexed-job.yaml:Job/gapm-train", ["spec", "completions"], "2", "is not of type"),
    ("indexed-job.yaml:Job/gapm-train", [*CONTAINER, "ports", 0, "containerPort"], "29500", "is not of type"),
    ("eval-cronjob.yaml:CronJob/gapm-eval", ["spec", "startingDeadlineSeconds"], [600], "is not of type"),
    ("storage.yaml:PersistentVolumeClaim/gapm-runs", ["spec", "accessModes"], "ReadWriteMany", "is not of type"),
    ("configmap.yaml:ConfigMap/gapm-experiment", ["data", "experiment.yaml"], {"name": "x"}, "is not of type"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", [*MASTER, "replicas"], "1", "is not of type"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", [*MASTER, "restartPolicy"], 1, "is not of type"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", [*MASTER, "template", "spec", "containers", 0, "args"],
     "--config /etc/gapm/experiment.yaml", "is not of type"),
    ("pytorchjob.yaml:PyTorchJob/gapm-train", [*MASTER, "template", "spec", "terminationGracePeriodSeconds"], "3m",
     "is not of type"),
])
def test_an_unknown_field_or_a_wrong_type_is_rejected(name, path, value, message):
    with pytest.raises(ManifestInvalid, match=message) as raised:
        validate(changed(name, path, value))
    assert str(path[-1]) in str(raised.value)  # the message names the field


def test_the_kept_crd_schema_is_the_pytorchjob_v1_schema():
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    assert "training-operator" in schema["$comment"] and "v1.9.0" in schema["$comment"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["pytorchReplicaSpecs"]
    replica = spec["properties"]["pytorchReplicaSpecs"]["additionalProperties"]
    assert set(replica["properties"]) == {"replicas", "restartPolicy", "template"}
    assert set(spec["properties"]["runPolicy"]["properties"]) >= {"backoffLimit", "cleanPodPolicy"}
