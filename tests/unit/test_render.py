"""Renderers: a FineTuneJob becomes a ConfigMap, a headless Service and an Indexed Job that a cluster
accepts and that run the trainer correctly: owned by the FineTuneJob, restricted pod security, the
env torchrun needs, GPUs and volumes as the spec asks, and a config the trainer parses unchanged."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from kubetune import contract
from kubetune.api import FineTuneJob, check_file
from kubetune.api.finetunejob import TrainingPlan
from kubetune.contract import TrainerConfig
from kubetune.planning import Plan
from kubetune_operator.config import ENV_VARS, OperatorConfig
from kubetune_operator.finetunejob import render as r
from kubetune_operator.finetunejob.render import name_problems, render_finetunejob
from kubetune_operator.render_common import RenderError, dns_label, operator_peer, owner_reference
from tests.examples import EXAMPLES, REPO

UID = "0b7c5d2e-1111-4c3e-9a6f-2d9d7f1e0a42"
CONFIG = OperatorConfig()
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load(example: str, **metadata) -> FineTuneJob:
    """The example's FineTuneJob as the API server would hand it to the operator (with a uid)."""
    [job] = [c.obj for c in check_file(EXAMPLES / example) if c.kind == "FineTuneJob" and c.ok]
    for key, value in {"uid": UID, **metadata}.items():
        setattr(job.metadata, key, value)
    return job


def edited(example: str, edit, **metadata) -> FineTuneJob:
    """The example with its wire form changed by `edit(doc)`, re-parsed (so rules still apply)."""
    job = load(example, **metadata)
    doc = job.to_wire()
    edit(doc)
    return FineTuneJob.model_validate(doc)


def render(example_or_job, config=CONFIG, plan=None):
    job = load(example_or_job) if isinstance(example_or_job, str) else example_or_job
    return render_finetunejob(job, config, plan)


def pod(objects) -> dict:
    return objects.job["spec"]["template"]["spec"]


def container(objects) -> dict:
    [trainer] = pod(objects)["containers"]
    return trainer


def env(objects) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


def mounts(objects) -> dict:
    return {m["mountPath"]: m for m in container(objects)["volumeMounts"]}


def volumes(objects) -> dict:
    return {v["name"]: v for v in pod(objects)["volumes"]}


def parsed_config(objects) -> TrainerConfig:
    return TrainerConfig.model_validate(yaml.safe_load(objects.config_map["data"]["trainer.yaml"]))


ALL = ["full-fsdp-2x8.yaml", "cpu-one-pod.yaml", "qlora-1gpu.yaml", "kueue-queued.yaml"]


# --- every object ------------------------------------------------------------------------------


@pytest.mark.parametrize("example", ALL)
def test_every_object_is_owned_by_the_finetunejob_and_in_its_namespace(example):
    job = load(example)
    objects = render(job)
    assert [o["kind"] for o in objects.all()] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    for obj in objects.all():
        assert obj["metadata"]["namespace"] == job.metadata.namespace
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": job.metadata.name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "kubetune"
        assert labels["app.kubernetes.io/instance"] == labels["kubetune.io/job"] == job.metadata.name


@pytest.mark.parametrize("example", ALL)
def test_names_are_derived_from_the_job_name(example):
    job = load(example)
    objects = render(job)
    name = job.metadata.name
    assert objects.job["metadata"]["name"] == name
    assert objects.service["metadata"]["name"] == f"{name}-workers" == pod(objects)["subdomain"]
    config_map = objects.config_map["metadata"]["name"]
    assert config_map == f"{name}-trainer-config" == volumes(objects)["config"]["configMap"]["name"]


def test_trainer_service_does_not_collide_with_an_adapterdeployment_of_the_same_name():
    # cpu-one-pod.yaml pairs FineTuneJob and AdapterDeployment `one-pod`; the latter serves
    # on Service `one-pod`.
    names = {c.kind: c.name for c in check_file(EXAMPLES / "cpu-one-pod.yaml")}
    assert names["FineTuneJob"] == names["AdapterDeployment"]
    assert render("cpu-one-pod.yaml").service["metadata"]["name"] != names["AdapterDeployment"]


@pytest.mark.parametrize("example", ALL)
def test_pods_run_under_the_restricted_profile_without_an_api_token(example):
    objects = render(example)
    spec = pod(objects)
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(objects)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("example", ALL)
def test_every_path_the_trainer_writes_is_on_a_writable_mount(example):
    objects = render(example)
    runtime = parsed_config(objects).runtime
    variables = env(objects)
    writable = [path for path, m in mounts(objects).items() if not m.get("readOnly")]
    written = [runtime.cache_dir, "/tmp", *(variables[v] for v in ("HOME", "TMPDIR", "HF_HOME", "XDG_CACHE_HOME"))]
    for path in written:
        assert any(path == w or path.startswith(w + "/") for w in writable), path
    assert "HF_HUB_OFFLINE" not in variables  # hf:// models download in the pod
    assert container(objects)["terminationMessagePath"] == runtime.termination_message_path == "/dev/termination-log"
    assert container(objects)["terminationMessagePolicy"] == "FallbackToLogsOnError"


@pytest.mark.parametrize("example", ALL)
def test_mounts_and_volumes_agree(example):
    objects = render(example)
    names = [v["name"] for v in pod(objects)["volumes"]]
    assert len(names) == len(set(names))
    assert all(DNS_LABEL.match(n) and len(n) <= 63 for n in names)
    paths = [m["mountPath"] for m in container(objects)["volumeMounts"]]
    assert len(paths) == len(set(paths))
    assert {m["name"] for m in container(objects)["volumeMounts"]} == set(names)


@pytest.mark.parametrize("example", ALL)
def test_grace_period_covers_the_trainers_checkpoint_time(example):
    objects = render(example)
    assert pod(objects)["terminationGracePeriodSeconds"] >= parsed_config(objects).runtime.grace_seconds


@pytest.mark.parametrize("example", ALL)
def test_pod_failure_policy_ignores_disruptions_first_and_fails_fast_on_bad_input(example):
    objects = render(example)
    rules = objects.job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail = [rule for rule in rules if rule["action"] == "FailJob"]
    assert fail == [{"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}]
    preempted = [rule for rule in rules if rule.get("onExitCodes", {}).get("values") == [143]]
    assert preempted and preempted[0]["action"] == "Ignore"
    for rule in rules:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == container(objects)["name"]
            assert 0 not in rule["onExitCodes"]["values"]  # the API server rejects 0 with operator In


@pytest.mark.parametrize("example", ALL)
def test_every_variable_the_command_references_is_defined(example):
    objects = render(example)
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(container(objects)["command"])))
    assert referenced <= set(env(objects))


# --- per example -------------------------------------------------------------------------------


def test_two_nodes_of_eight_gpus_run_torchrun_with_rank_from_the_completion_index():
    objects = render("full-fsdp-2x8.yaml")
    spec = objects.job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 5 and spec["activeDeadlineSeconds"] == 172800
    assert "ttlSecondsAfterFinished" not in spec and spec["suspend"] is False
    variables = env(objects)
    assert variables["NNODES"] == "2"
    assert variables["NPROC_PER_NODE"] == "8"
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert variables["NODE_RANK"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": index}}
    assert variables["MASTER_ADDR"] == "llama8b-full-0.llama8b-full-workers"
    assert variables["MASTER_PORT"] == "29500"
    # `kubetune train` reads those variables and starts torchrun itself (tests/trainer/test_launch.py)
    assert container(objects)["command"] == ["kubetune", "train", "-f", "/etc/kubetune/config/trainer.yaml"]


def test_gpus_cpu_and_memory_are_requested_and_limited():
    resources = container(render("full-fsdp-2x8.yaml"))["resources"]
    assert resources["limits"] == {"cpu": "96", "memory": "1000Gi", "nvidia.com/gpu": "8"}
    assert resources["requests"] == resources["limits"]


def test_placement_passes_through():
    spec = pod(render("full-fsdp-2x8.yaml"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "training-high"
    assert "affinity" not in spec


def test_affinity_and_another_gpu_resource_pass_through():
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
            }
        }
    }

    def edit(doc):
        doc["spec"]["resources"].update(affinity=affinity, gpuResource="amd.com/gpu")

    objects = render(edited("full-fsdp-2x8.yaml", edit))
    assert pod(objects)["affinity"] == affinity
    assert container(objects)["resources"]["limits"]["amd.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in container(objects)["resources"]["limits"]


def test_input_claims_are_read_only_and_the_output_claim_writable():
    # model pvc://models/..., data pvc://datasets/..., output pvc://models/...-domain: models is written.
    objects = render("full-fsdp-2x8.yaml")
    paths = mounts(objects)
    assert paths["/mnt/pvc/models"]["readOnly"] is False
    assert paths["/mnt/pvc/datasets"]["readOnly"] is True
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in volumes(objects).values()
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models": False, "datasets": True}  # one volume per claim, validation file included


def test_what_the_evaluation_reads_is_mounted_too():
    def edit(doc):
        doc["spec"]["evaluation"] = {
            "uri": "pvc://heldout/eval.jsonl",
            "referenceUri": "configmap://reference-text/general.txt",
            "benchmarks": {"tasks": ["support_qa"], "taskUri": "pvc://benchmarks/tasks"},
        }

    objects = render(edited("full-fsdp-2x8.yaml", edit))
    paths = mounts(objects)
    assert paths["/mnt/pvc/heldout"]["readOnly"] is True and paths["/mnt/pvc/benchmarks"]["readOnly"] is True
    config_maps = [v["configMap"]["name"] for v in volumes(objects).values() if "configMap" in v]
    assert "reference-text" in config_maps


def test_shared_memory_from_the_spec():
    shm = volumes(render("full-fsdp-2x8.yaml"))["dshm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert mounts(render("full-fsdp-2x8.yaml"))["/dev/shm"]["name"] == "dshm"


def test_cpu_job_runs_one_process_without_gpus_or_torchrun():
    objects = render("cpu-one-pod.yaml")
    assert container(objects)["command"] == ["kubetune", "train", "-f", "/etc/kubetune/config/trainer.yaml"]
    assert not {"NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT"} & set(env(objects))
    resources = container(objects)["resources"]
    assert resources == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    assert volumes(objects)["dshm"]["emptyDir"]["sizeLimit"] == "1Gi"  # 1Gi minimum on CPU
    paths = mounts(objects)
    assert paths["/mnt/pvc/models"]["readOnly"] is True
    assert paths["/mnt/pvc/datasets"]["readOnly"] is True
    assert paths["/mnt/pvc/adapters"]["readOnly"] is False
    assert QUEUE not in objects.job["metadata"]["labels"]


def two_nodes(doc):
    doc["spec"]["resources"].update(nodes=2)
    doc["spec"]["hyperparameters"].update(globalBatchSize=16)  # a multiple of micro-batch 8 x world size 2


def test_cpu_job_with_several_nodes_gets_torchrun_settings_with_one_process_each():
    objects = render(edited("cpu-one-pod.yaml", two_nodes))
    assert env(objects)["NNODES"] == "2" and env(objects)["NPROC_PER_NODE"] == "1"


def test_qlora_on_one_gpu_downloads_from_the_hub_with_the_secret_and_writes_to_s3():
    objects = render("qlora-1gpu.yaml")
    trainer = container(objects)
    assert trainer["command"][0] == "kubetune"
    assert "NNODES" not in env(objects)  # one GPU, one process: no torchrun
    assert trainer["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert not [v for v in volumes(objects).values() if "persistentVolumeClaim" in v]  # hf:// in, s3:// out
    assert trainer["resources"]["limits"] == {"memory": "48Gi", "nvidia.com/gpu": "1"}
    assert trainer["resources"]["requests"] == {"cpu": CONFIG.default_cpu, "memory": "48Gi", "nvidia.com/gpu": "1"}
    assert volumes(objects)["dshm"]["emptyDir"]["sizeLimit"] == "1Gi"


def test_no_secret_no_env_from():
    assert "envFrom" not in container(render("cpu-one-pod.yaml"))


def ref(secret):
    return {"name": secret} if secret else None


def with_trackers(mlflow_secret=None, wandb_secret=None, model_secret=None):
    def edit(doc):
        doc["spec"]["tracking"] = {
            "mlflow": {"trackingUri": "https://mlflow.example.com", "secretRef": ref(mlflow_secret)},
            "wandb": {"project": "p", "mode": "offline", "secretRef": ref(wandb_secret)},
        }
        if model_secret:
            doc["spec"]["model"]["secretRef"] = {"name": model_secret}

    return edit


def test_the_trackers_secrets_become_the_trainers_environment_with_the_models_last():
    """Kubernetes lets the last envFrom source win a key: the model's Secret (the job's storage
    credentials) comes last, so a tracker's Secret holding AWS_* cannot replace them."""
    objects = render(edited("cpu-one-pod.yaml", with_trackers("mlflow-token", "wandb-key", "hf-token")))
    assert container(objects)["envFrom"] == [
        {"secretRef": {"name": "mlflow-token"}},
        {"secretRef": {"name": "wandb-key"}},
        {"secretRef": {"name": "hf-token"}},
    ]
    assert "HOME" in env(objects)  # the container's own env still wins over every Secret


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        (("shared", "shared", "shared"), ["shared"]),
        (("hf-token", None, "hf-token"), ["hf-token"]),
        (("shared", "shared", None), ["shared"]),
        ((None, "wandb-key", None), ["wandb-key"]),
        ((None, None, None), None),
    ],
)
def test_each_secret_is_named_once_and_trackers_without_secrets_add_nothing(secrets, expected):
    objects = render(edited("cpu-one-pod.yaml", with_trackers(*secrets)))
    names = [source["secretRef"]["name"] for source in container(objects).get("envFrom", [])] or None
    assert names == expected


QUEUE = "kueue.x-k8s.io/queue-name"


def test_queued_job_carries_the_kueue_label_and_is_created_suspended_for_kueue_to_admit():
    objects = render("kueue-queued.yaml")
    job = objects.job
    assert job["metadata"]["labels"][QUEUE] == "team-a"
    assert QUEUE not in job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["suspend"] is True
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert env(objects)["NNODES"] == "1" and env(objects)["NPROC_PER_NODE"] == "8"
    assert mounts(objects)["/mnt/pvc/team-a-data"]["readOnly"] is True
    assert mounts(objects)["/mnt/pvc/team-a-adapters"]["readOnly"] is False


def test_suspend_follows_run_policy():
    suspended = edited("cpu-one-pod.yaml", lambda doc: doc["spec"].setdefault("runPolicy", {}).update(suspend=True))
    objects = render(suspended)
    assert objects.job["spec"]["suspend"] is True
    assert render("cpu-one-pod.yaml").job["spec"]["suspend"] is False


def test_configmap_datasets_are_mounted_read_only_where_the_trainer_looks():
    def edit(doc):
        dataset = doc["spec"]["dataset"]
        dataset.update(uri="configmap://support.chats/train.jsonl", validation={"uri": "configmap://evals/eval.jsonl"})

    objects = render(edited("cpu-one-pod.yaml", edit))
    paths = mounts(objects)
    for name in ("support.chats", "evals"):
        mount = paths[f"/etc/kubetune/configmaps/{name}"]
        assert mount["readOnly"] is True
        assert volumes(objects)[mount["name"]]["configMap"] == {"name": name}
    assert "/mnt/pvc/datasets" not in paths


def test_one_claim_for_input_and_output_is_mounted_once_and_writable():
    objects = render(edited("cpu-one-pod.yaml", lambda doc: doc["spec"]["output"].update(uri="pvc://models/out")))
    claims = [v for v in volumes(objects).values() if "persistentVolumeClaim" in v]
    assert sorted(v["persistentVolumeClaim"]["claimName"] for v in claims) == ["datasets", "models"]
    assert mounts(objects)["/mnt/pvc/models"]["readOnly"] is False


def test_image_from_the_spec_or_the_operator_default():
    assert container(render("cpu-one-pod.yaml"))["image"] == CONFIG.trainer_image
    custom = OperatorConfig(
        trainer_image="registry.local/trainer:dev",
        image_pull_policy="Never",
        image_pull_secrets=("regcred",),
        allowed_images=("example.com/",),
    )
    objects = render(load("cpu-one-pod.yaml"), custom)
    assert container(objects)["image"] == "registry.local/trainer:dev"
    assert container(objects)["imagePullPolicy"] == "Never"
    assert pod(objects)["imagePullSecrets"] == [{"name": "regcred"}]
    pinned = edited("cpu-one-pod.yaml", lambda doc: doc["spec"].update(image="example.com/my-trainer:1"))
    assert container(render(pinned, custom))["image"] == "example.com/my-trainer:1"


# --- the Service -------------------------------------------------------------------------------


def test_service_is_headless_publishes_unready_pods_and_selects_only_this_jobs_trainers():
    objects = render("full-fsdp-2x8.yaml")
    spec = objects.service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    pod_labels = objects.job["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    assert spec["selector"]["kubetune.io/job"] == "llama8b-full"
    assert spec["selector"]["app.kubernetes.io/component"] == "trainer"
    assert {p["name"]: p["port"] for p in spec["ports"]} == {"master": 29500, "metrics": 9090}
    assert {p["name"]: p["containerPort"] for p in container(objects)["ports"]} == {"master": 29500, "metrics": 9090}


def test_ports_follow_the_operator_config_and_metrics_port_zero_is_off():
    objects = render(load("full-fsdp-2x8.yaml"), OperatorConfig(master_port=23456, trainer_metrics_port=0))
    assert [p["name"] for p in objects.service["spec"]["ports"]] == ["master"]
    assert [p["containerPort"] for p in container(objects)["ports"]] == [23456]
    assert env(objects)["MASTER_PORT"] == "23456"
    assert parsed_config(objects).runtime.metrics_port == 0


# --- the trainer's config ----------------------------------------------------------------------


@pytest.mark.parametrize("example", ALL)
def test_config_map_round_trips_into_the_trainer_config(example):
    job = load(example)
    config = parsed_config(render(job))
    assert config.spec == job.spec
    runtime = config.runtime
    assert (runtime.job_name, runtime.namespace, runtime.local) == (job.metadata.name, job.metadata.namespace, False)
    assert runtime.metrics_port == CONFIG.trainer_metrics_port
    assert runtime.cache_dir == "/scratch/cache"
    assert runtime.termination_message_path == "/dev/termination-log"
    assert runtime.grace_seconds == CONFIG.checkpoint_grace_seconds


@pytest.mark.parametrize("example", ALL)
def test_the_trainers_own_loader_accepts_the_rendered_config(example, tmp_path):
    from kubetune_trainer.launch import load_config  # imports no torch: only the API models and yaml

    objects = render(example)
    path = tmp_path / "trainer.yaml"
    path.write_text(objects.config_map["data"]["trainer.yaml"])
    assert load_config(path) == parsed_config(objects)


def test_the_plan_pins_strategy_auto():
    job = load("kueue-queued.yaml")  # strategy auto, 1 x 8 GPUs
    plan = Plan(
        world_size=8,
        strategy="fsdp",
        micro_batch=2,
        grad_accumulation=4,
        trainable_params=1,
        total_params=2,
        estimated_gpu_memory_gib=20.0,
        fits=True,
    )
    config = parsed_config(render(job, plan=plan))
    assert config.spec.distributed.strategy == "fsdp"
    assert config.spec.model_copy(update={"distributed": job.spec.distributed}) == job.spec

    # The status' TrainingPlan works as well; a plan never overrides an explicit strategy.
    def strategy(job, plan):
        return parsed_config(render(job, plan=plan)).spec.distributed.strategy

    assert strategy(job, TrainingPlan(world_size=8, strategy="deepspeed-zero3")) == "deepspeed-zero3"
    assert strategy(load("full-fsdp-2x8.yaml"), TrainingPlan(world_size=16, strategy="ddp")) == "fsdp"


def test_a_plan_that_would_break_an_api_rule_leaves_auto_to_the_trainer():
    job = edited("kueue-queued.yaml", lambda doc: doc["spec"]["distributed"].update(offload="cpu"))
    config = parsed_config(render(job, plan=TrainingPlan(world_size=8, strategy="ddp")))  # ddp + offload is invalid
    assert config.spec.distributed.strategy == "auto"


def test_a_plan_for_another_world_size_is_refused():
    with pytest.raises(RenderError, match="plan is for world size 4 but resources give 16"):
        render("full-fsdp-2x8.yaml", plan=TrainingPlan(world_size=4, strategy="fsdp"))


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("example", ALL)
def test_the_same_input_renders_the_same_objects(example):
    first, second = render(example), render(example)  # parsed twice: separate objects
    assert first == second
    assert yaml.safe_dump_all(first.all()) == yaml.safe_dump_all(second.all())


def test_the_job_records_a_hash_of_its_config_that_changes_with_it():
    hash_of = lambda objects: objects.job["metadata"]["annotations"]["kubetune.io/config-hash"]  # noqa: E731
    base = render("cpu-one-pod.yaml")
    assert re.fullmatch(r"[0-9a-f]{16}", hash_of(base))
    more_nodes = render(edited("cpu-one-pod.yaml", two_nodes))
    assert hash_of(more_nodes) != hash_of(base)


def test_rendered_objects_are_independent_of_each_other():
    objects = render("cpu-one-pod.yaml")
    objects.job["spec"]["template"]["spec"]["volumes"].clear()
    container(objects)["securityContext"]["runAsUser"] = 0
    fresh = render("cpu-one-pod.yaml")
    assert pod(fresh)["volumes"] and container(fresh)["securityContext"]["runAsUser"] == 1000


# --- what cannot be rendered -------------------------------------------------------------------


def test_longest_allowed_name_fits_every_dns_label():
    name = "a" * r.MAX_JOB_NAME

    def most_nodes(doc):
        doc["spec"]["resources"].update(nodes=512, gpusPerNode=1)
        doc["spec"]["hyperparameters"].update(globalBatchSize=512)

    objects = render(edited("full-fsdp-2x8.yaml", most_nodes, name=name))
    assert len(objects.service["metadata"]["name"]) == 63
    assert len(r.pod_hostname(name, 511)) <= 63
    for obj in objects.all():
        assert all(len(value) <= 63 for value in obj["metadata"]["labels"].values())


def test_a_name_too_long_for_the_service_and_hostnames_fails_clearly():
    name = "a" * (r.MAX_JOB_NAME + 1)
    with pytest.raises(RenderError) as error:
        render(load("full-fsdp-2x8.yaml", name=name))
    assert "metadata.name must be at most 55 characters: it names the trainer Service" in str(error.value)


@pytest.mark.parametrize("name", ["llama.8b", "8b-run"])
def test_a_name_that_cannot_name_a_service_fails_clearly(name):
    with pytest.raises(RenderError, match="start with a letter and end with a letter or digit"):
        render(load("cpu-one-pod.yaml", name=name))


def test_name_problems_is_empty_for_good_names():
    assert name_problems("tiny-support", nodes=512) == []
    assert name_problems(None) == ["metadata.name is required"]


@pytest.mark.parametrize(
    "field, message", [("uid", "metadata.uid is required"), ("namespace", "metadata.namespace is required")]
)
def test_missing_metadata_fails_clearly(field, message):
    with pytest.raises(RenderError, match=message):
        render(load("cpu-one-pod.yaml", **{field: None}))


def test_a_spec_that_fails_validation_is_not_rendered():
    job = edited("cpu-one-pod.yaml", lambda doc: doc["spec"]["model"].update(uri="file:///models/tiny"))
    with pytest.raises(RenderError) as error:
        render(job)
    assert "spec.model.uri" in str(error.value) and "file:// only works with `kubetune train`" in str(error.value)


def test_every_problem_is_reported_at_once():
    job = edited("cpu-one-pod.yaml", lambda doc: doc["spec"]["model"].update(uri="file:///m"), name="x.y", uid=None)
    message = str(pytest.raises(RenderError, render, job).value)
    assert "(no dots)" in message and "metadata.uid" in message and "spec.model.uri" in message


# --- against the Kubernetes schema -------------------------------------------------------------


@pytest.mark.parametrize("example", ALL)
def test_every_field_is_one_the_kubernetes_api_knows(example):
    """The client's typed models drop keys they do not know, so a misspelt field would not survive
    the round trip (the cluster tier checks the same against a real API server)."""
    client = pytest.importorskip(
        "kubernetes.client", reason="NOT RUN: needs the kubernetes client (the [operator] extra)"
    )
    import json

    api = client.ApiClient()
    for obj, kind in zip(render(example).all(), ["V1ConfigMap", "V1Service", "V1NetworkPolicy", "V1Job"], strict=True):
        response = type("Response", (), {"data": json.dumps(obj)})()
        assert api.sanitize_for_serialization(api.deserialize(response, kind)) == obj, kind


# --- helpers -----------------------------------------------------------------------------------


def test_owner_reference_from_parsed_metadata_or_kopfs_mapping():
    job = load("cpu-one-pod.yaml")
    expected = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "one-pod",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert owner_reference(job.metadata, "FineTuneJob") == expected
    assert owner_reference({"name": "one-pod", "uid": UID, "namespace": "default"}, "FineTuneJob") == expected
    with pytest.raises(RenderError, match="needs name and uid"):
        owner_reference({"name": "tiny-support"}, "FineTuneJob")


@pytest.mark.parametrize("name", ["datasets", "x" * 63, "team.a.data", "a" * 40 + "." + "b" * 40])
def test_volume_names_are_valid_dns_labels_and_distinct(name):
    label = dns_label("pvc", name)
    assert DNS_LABEL.match(label) and len(label) <= 63
    assert dns_label("pvc", name) == label  # deterministic
    if name == "datasets":
        assert label == "pvc-datasets"
    assert dns_label("pvc", name + "x") != label


def test_training_pods_point_the_trainer_at_the_contracts_mount_roots():
    variables = env(render("cpu-one-pod.yaml"))
    assert variables[contract.PVC_ROOT_ENV] == contract.PVC_ROOT
    assert variables[contract.CONFIGMAP_ROOT_ENV] == contract.CONFIGMAP_ROOT


def test_rendering_imports_neither_torch_nor_the_trainer_nor_kopf():
    heavy = "{'torch', 'transformers', 'boto3', 'kubetune_trainer', 'kopf', 'kubernetes'}"
    code = (
        "import sys, kubetune_operator.finetunejob.render, kubetune_operator.adapterdeployment.render, "
        "kubetune_operator.finetunejob.status, kubetune_operator.finetunejob.admission, "
        "kubetune_operator.finetunejob.jobsync, kubetune_operator.adapterdeployment.status, "
        "kubetune_operator.adapterdeployment.adapters, kubetune_operator.conditions, kubetune_operator.config; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("core", "operator"))},
    )
    assert result.stdout.strip() == "[]"


# --- the operator's configuration --------------------------------------------------------------


def test_config_defaults():
    config = OperatorConfig.from_env({})
    assert config == OperatorConfig()
    assert config.trainer_image.startswith("ghcr.io/kubetune/trainer:")
    assert config.image_pull_policy == "IfNotPresent"
    assert config.watches_all_namespaces and config.namespaces == ()
    assert config.metrics_scrape_interval_seconds == 15.0
    assert (config.trainer_metrics_port, config.master_port) == (9090, 29500)


def test_config_from_environment_variables():
    config = OperatorConfig.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "registry.local/trainer:dev",
            "KUBETUNE_NAMESPACES": "ml, team-a,",
            "KUBETUNE_MASTER_PORT": "23456",
            "KUBETUNE_DEFAULT_CPU": "",
            "KUBETUNE_PVC_ROOT": "/elsewhere",
        }
    )
    assert config.trainer_image == "registry.local/trainer:dev"
    assert config.namespaces == ("ml", "team-a") and not config.watches_all_namespaces
    assert config.master_port == 23456
    assert config.default_cpu is None  # empty turns the default request off
    assert "cpu" not in container(render(load("qlora-1gpu.yaml"), config))["resources"]["requests"]


def test_config_file_then_environment(tmp_path):
    path = tmp_path / "operator.yaml"
    path.write_text(
        "trainerImage: from-file:1\nservingImage: serve-file:1\nnamespaces: [a, b]\ntrainer_metrics_port: 9100\n"
    )
    config = OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path), "KUBETUNE_SERVING_IMAGE": "serve-env:2"})
    assert config.trainer_image == "from-file:1"
    assert config.serving_image == "serve-env:2"  # the variable wins over the file
    assert config.namespaces == ("a", "b") and config.trainer_metrics_port == 9100


def test_a_bad_variable_is_named():
    with pytest.raises(ValueError, match="KUBETUNE_MASTER_PORT: .*less than or equal to 65535"):
        OperatorConfig.from_env({"KUBETUNE_MASTER_PORT": "70000"})
    with pytest.raises(ValueError, match="KUBETUNE_IMAGE_PULL_POLICY"):
        OperatorConfig.from_env({"KUBETUNE_IMAGE_PULL_POLICY": "Sometimes"})


def test_a_bad_file_is_named(tmp_path):
    path = tmp_path / "operator.yaml"
    path.write_text("trainerImagee: typo\n")
    with pytest.raises(ValueError, match="operator.yaml: trainerImagee: Extra inputs are not permitted"):
        OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})
    with pytest.raises(ValueError, match="KUBETUNE_CONFIG=.*missing.yaml"):
        OperatorConfig.from_env({"KUBETUNE_CONFIG": str(tmp_path / "missing.yaml")})
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})


def test_every_field_has_a_variable():
    assert set(ENV_VARS) == set(OperatorConfig.model_fields)
    assert all(var.startswith("KUBETUNE_") and var.isupper() for var in ENV_VARS.values())


# --- the training pods' NetworkPolicy ----------------------------------------------------------


def test_training_pods_accept_only_their_own_job_and_the_operators_scrape():
    config = OperatorConfig(operator_namespace="kubetune-system")
    job = load("full-fsdp-2x8.yaml")
    objects = render(job, config)
    policy = objects.network_policy
    name = job.metadata.name
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["name"] == f"{name}-trainer"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": r.selector(name)}
    template_labels = objects.job["spec"]["template"]["metadata"]["labels"]
    assert r.selector(name).items() <= template_labels.items()  # it selects exactly this job's pods
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open: datasets and models come from https/hf/s3
    peers, scrape = spec["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": r.selector(name)}}]}  # every port: rendezvous, NCCL
    assert scrape["ports"] == [{"port": config.trainer_metrics_port, "protocol": "TCP"}]
    [source] = scrape["from"]
    assert source["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}}
    assert source["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kubetune",
                                                     "app.kubernetes.io/component": "operator"}}  # fmt: skip


def test_configured_metrics_scrapers_reach_the_metrics_port_too():
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    config = OperatorConfig(operator_namespace="kubetune-system", metrics_scrapers=(prometheus,))
    peers, scrape = render("cpu-one-pod.yaml", config).network_policy["spec"]["ingress"]
    assert scrape["from"] == [operator_peer(config), prometheus]
    assert scrape["ports"] == [{"port": config.trainer_metrics_port, "protocol": "TCP"}]
    assert peers["from"] == [{"podSelector": {"matchLabels": r.selector("one-pod")}}]  # not the rendezvous


@pytest.mark.parametrize("bad", [[{"nope": {}}], [{}], ["podSelector"], "[{"])
def test_a_metrics_scraper_that_is_not_a_network_policy_peer_stops_the_operator(bad):
    environ = {"KUBETUNE_OPERATOR_METRICS_SCRAPERS": bad if isinstance(bad, str) else json.dumps(bad)}
    with pytest.raises(ValueError, match="KUBETUNE_OPERATOR_METRICS_SCRAPERS"):
        OperatorConfig.from_env(environ)


def test_without_metrics_the_policy_admits_only_the_jobs_own_pods():
    policy = render("cpu-one-pod.yaml", OperatorConfig(trainer_metrics_port=0)).network_policy
    assert len(policy["spec"]["ingress"]) == 1


def test_an_operator_of_unknown_namespace_is_matched_by_its_labels_in_any_namespace():
    [_, scrape] = render("cpu-one-pod.yaml", OperatorConfig()).network_policy["spec"]["ingress"]
    assert scrape["from"][0]["namespaceSelector"] == {}


def test_network_policies_can_be_turned_off():
    objects = render("cpu-one-pod.yaml", OperatorConfig(network_policies=False))
    assert objects.network_policy is None and [o["kind"] for o in objects.all()] == ["ConfigMap", "Service", "Job"]
