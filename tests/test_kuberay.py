"""The Kubernetes files: every KubeRay manifest passes KubeRay's published CRD schema the way the API
server checks it, and the image (Dockerfile) holds what the manifests run.

No Kubernetes cluster or container daemon here: the schema check is KubeRay's own OpenAPI schema
(../shared/kuberay, KubeRay v1.7) through a JSON Schema validator, plus the API server's strict
field validation (an undeclared field is an error), written out below.
"""

from __future__ import annotations

import copy
import functools
import gzip
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT
from trainer.promote import retrain
from trainer.train import cli
from trainer.train.cluster import QUIET_ENV

CRDS = ROOT.parent / "shared" / "kuberay"
MANIFESTS = {"jobs/rayjob.yaml": "RayJob", "jobs/raycronjob.yaml": "RayCronJob"}
DOCKERFILE, DOCKERIGNORE = ROOT / "Dockerfile", ROOT / ".dockerignore"


@functools.cache
def crd_schema(kind: str) -> dict:
    name = {"RayJob": "ray.io_rayjobs.yaml.gz", "RayCronJob": "ray.io_raycronjobs.yaml.gz",
            "RayService": "ray.io_rayservices.yaml.gz"}[kind]
    if not (CRDS / name).exists():
        if CRDS.parent.is_dir():  # the team's shared/ is here (as in CI): a missing schema is a failure
            pytest.fail(f"{CRDS / name} is missing from the team's shared folder; the manifests cannot be checked")
        pytest.skip(f"the manifests are checked against KubeRay's CRD schemas in {CRDS}, which this "
                    "checkout has no shared/ folder beside it for")
    crd = yaml.safe_load(gzip.open(CRDS / name))
    assert crd["spec"]["names"]["kind"] == kind
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare, as strict field validation (kubectl's default) rejects
    them: wherever a schema lists `properties` and does not preserve unknown fields."""
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def problems(manifest: dict, kind: str) -> list[str]:
    """What the API server would refuse: schema errors (types, enums, required) and unknown fields."""
    schema = crd_schema(kind)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
    return errors + [f"{field}: unknown field" for field in unknown_fields(manifest, schema)]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def rayjob_of(doc: dict) -> dict:
    """The RayJob spec in a manifest: its own spec, or a RayCronJob's jobTemplate."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def job_spec(name: str) -> dict:
    return rayjob_of(load(name))


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_kuberays_crd_schema_with_strict_fields(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == MANIFESTS[name]
    assert problems(doc, MANIFESTS[name]) == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_check_rejects_an_unknown_field_and_a_missing_required_one(name):
    kind = MANIFESTS[name]
    unknown = copy.deepcopy(load(name))
    unknown["spec"]["concurrencyPolicy"] = "Forbid"  # what main's RayCronJob had: in no released schema
    assert problems(unknown, kind) == [".spec.concurrencyPolicy: unknown field"]
    missing, wrong_type = copy.deepcopy(load(name)), copy.deepcopy(load(name))
    del rayjob_of(missing)["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in p for p in problems(missing, kind))
    rayjob_of(wrong_type)["backoffLimit"] = "none"
    assert any("'none' is not of type 'integer'" in p for p in problems(wrong_type, kind))


# The spec main's RayCronJob shipped (commit d7deab0), beside its RayJob template: a Kubernetes
# CronJob's concurrencyPolicy, which no released RayCronJob schema has, and no timeZone.
MAINS_RAYCRONJOB_SPEC = """
schedule: "0 2 * * *"
concurrencyPolicy: Forbid
"""


def declared_fields(schema: dict) -> set[str]:
    """Every field name a schema declares, at any depth."""
    names = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                names |= set(value)
                names |= {n for item in value.values() for n in declared_fields(item)}
            else:
                names |= declared_fields(value)
    elif isinstance(schema, list):
        names |= {n for item in schema for n in declared_fields(item)}
    return names


def test_mains_raycronjob_would_have_been_refused():
    """The manifest main shipped (with concurrencyPolicy) fails the same check, for that field
    alone: rebuilt on today's job template, it is refused with that one reason. And the schema has
    no such field anywhere, so overlapping ticks are left to what the project owns (the model
    store's lock, as jobs/raycronjob.yaml says), not to a field the API server would refuse."""
    today = load("jobs/raycronjob.yaml")
    mains = {**copy.deepcopy(today), "spec": {**yaml.safe_load(MAINS_RAYCRONJOB_SPEC),
                                               "jobTemplate": copy.deepcopy(today["spec"]["jobTemplate"])}}
    assert problems(mains, "RayCronJob") == [".spec.concurrencyPolicy: unknown field"]
    declared = declared_fields(crd_schema("RayCronJob"))
    assert {"jobTemplate", "schedule", "suspend", "timeZone"} <= declared and "concurrencyPolicy" not in declared


def test_the_raycronjob_has_only_the_four_spec_fields_and_a_time_zone():
    spec = load("jobs/raycronjob.yaml")["spec"]
    assert set(spec) <= {"jobTemplate", "schedule", "suspend", "timeZone"} and spec["timeZone"] == "Etc/UTC"


def test_a_submitted_job_is_as_quiet_as_a_local_run():
    """The quiet environment is written twice, for a Ray the job starts (cluster.QUIET_ENV) and for
    a submitted job (jobs/runtime_env.yaml): the second holds the first, and adds only what a
    submitted job alone needs."""
    submitted = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    assert {name: submitted.get(name) for name in QUIET_ENV} == QUIET_ENV
    assert set(submitted) - set(QUIET_ENV) == {"PYTHONUNBUFFERED", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"}


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_job_gets_the_runtime_env_of_a_submitted_job(name):
    submitted = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    runtime_env = yaml.safe_load(job_spec(name)["runtimeEnvYAML"])
    assert runtime_env == {"env_vars": submitted}


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_cluster_fits_the_job_token_auth_no_training_on_the_head(name):
    spec = job_spec(name)
    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["cd", "/home/ray/mnist-ray-train", "&&"] and command[3] == "python"
    script, args = command[4], command[5:]
    assert (ROOT / script).is_file()
    parser = retrain.build_parser() if script == "jobs/retrain.py" else cli.build_parser()
    flags = parser.parse_args(args)
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["rayVersion"] == "2.60.0"
    head_cpus = int(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"])
    groups = cluster["workerGroupSpecs"]
    assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in groups)  # fixed size
    cpus = [int(g["rayStartParams"]["num-cpus"]) for g in groups for _ in range(g["replicas"])]
    training_pods = [c for c in cpus if c >= flags.cpus_per_worker]
    assert len(training_pods) >= flags.num_workers  # one worker per pod, each with its CPUs
    assert head_cpus == 0  # no training on the head: the driver reserves no CPU, Ray Data's split none
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    for pod in [cluster["headGroupSpec"], *groups]:
        for container in pod["template"]["spec"]["containers"]:
            assert container["image"].endswith("/mnist-ray-train:" + project()["version"])
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            paths = [v for k, v in vars(flags).items() if k in ("data", "store", "storage_path") and v]
            assert paths and all(any(p.startswith(m + "/") for m in mounts) for p in paths), (paths, mounts)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_image_is_ray_260_on_python_311_with_the_projects_pins_and_no_data():
    text = DOCKERFILE.read_text()
    pins = dict(re.match(r"([\w\[\],.-]+)==([\w.]+)", d).groups() for d in project()["dependencies"] if "==" in d)
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)-\$\{VARIANT\}$", text, re.MULTILINE)
    assert base and base.group(1) == next(v for k, v in pins.items() if k.startswith("ray["))
    assert f"{base.group(2)}.{base.group(3)}" in project()["requires-python"].replace(">=", "")
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE) and '"$VARIANT" = gpu' in text
    assert f'"tensorflow[and-cuda]=={pins["tensorflow"]}"' in text  # the GPU variant, at the same pin
    assert 'pip install --no-cache-dir ".[tracking]"' in text  # the project itself: exactly pyproject's pins
    assert re.search(r"^USER ray$", text, re.MULTILINE)  # the base image's non-root user
    assert re.search(r"^WORKDIR /home/ray/mnist-ray-train$", text, re.MULTILINE)  # where manifests cd
    copied = re.findall(r"^COPY --chown=ray:users (.+) \S+$", text, re.MULTILINE)
    assert {"trainer/", "jobs/"} <= {part for line in copied for part in line.split()}
    ignored = DOCKERIGNORE.read_text().split()
    assert {".git/", ".venv/", "models/", "ray_results/", "data/", "tests/", "*.npz", "*.parquet",
            "*.keras", "*.h5", "**/auth_token"} <= set(ignored)


def test_the_rayservice_passes_kuberays_crd_schema_and_serves_the_cronjobs_store():
    """jobs/rayservice.yaml: strict schema checks as for the jobs; its application builds with its
    args; it reads the store the RayCronJob promotes into, from the same volume claim."""
    from ray.serve import Application

    from trainer.serve import app

    doc = load("jobs/rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert problems(doc, "RayService") == []
    unknown, wrong_type = copy.deepcopy(doc), copy.deepcopy(doc)
    unknown["spec"]["serveConfig"] = {}  # the v1alpha1 field, gone from v1
    assert problems(unknown, "RayService") == [".spec.serveConfig: unknown field"]
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("'two' is not of type 'integer'" in p for p in problems(wrong_type, "RayService"))
    (application,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "trainer.serve.app:build" and application["route_prefix"] == "/"
    assert isinstance(app.build(application["args"]), Application)
    with pytest.raises(ValueError, match="give store or model"):
        app.build({"store": "/s", "model": "/m"})
    cron = retrain.build_parser().parse_args(shlex.split(job_spec("jobs/raycronjob.yaml")["entrypoint"])[5:])
    assert application["args"]["store"] == cron.store
    claims = {v["persistentVolumeClaim"]["claimName"] for v in doc["spec"]["rayClusterConfig"]["headGroupSpec"]
              ["template"]["spec"]["volumes"]}
    assert claims == {v["persistentVolumeClaim"]["claimName"] for v in
                      job_spec("jobs/raycronjob.yaml")["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(int(g["rayStartParams"]["num-cpus"]) * g["replicas"] for g in workers) >= int(application["args"]["replicas"])
