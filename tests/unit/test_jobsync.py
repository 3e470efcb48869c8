"""Keeping an existing Job in step: suspend, deadlines and TTL patched in place; a suspended Job
whose trainer config changed is replaced; Kueue keeps control of a queued job's resumption."""

import copy

from kubetune.api import FineTuneJob
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob import jobsync as j
from kubetune_operator.finetunejob.render import render_finetunejob
from kubetune_operator.render_common import owned_by

UID = "u-1"


def ftj(suspend=False, deadline=None, queue=None, cpu="2"):
    policy = {"suspend": suspend, **({"activeDeadlineSeconds": deadline} if deadline else {}),
              **({"queueName": queue} if queue else {})}  # fmt: skip
    return FineTuneJob.model_validate({
        "metadata": {"name": "tiny", "namespace": "ml", "uid": UID, "generation": 1},
        "spec": {
            "model": {"uri": "pvc://models/tiny"}, "dataset": {"uri": "pvc://data/a.jsonl", "format": "chat"},
            "hyperparameters": {"maxSteps": 10, "globalBatchSize": 8}, "resources": {"gpusPerNode": 0, "cpu": cpu},
            "output": {"uri": "pvc://out/tiny"}, "runPolicy": policy,
        },
    })  # fmt: skip


def objects(job):
    return render_finetunejob(job, OperatorConfig())


def existing(job):
    """The rendered Job as the API server returns it (+ status)."""
    out = copy.deepcopy(objects(job).job)
    out["status"] = {"active": 1}
    return out


def test_in_step_means_no_patch():
    assert j.job_patch(ftj(), existing(ftj()), objects(ftj()).job) is None


def test_suspend_and_deadline_are_patched():
    job = ftj(suspend=True, deadline=600)
    suspend = {"spec": {"suspend": True, "activeDeadlineSeconds": 600}}
    assert j.job_patch(job, existing(ftj()), objects(job).job) == suspend
    resume = {"spec": {"suspend": False, "activeDeadlineSeconds": None}}
    assert j.job_patch(ftj(), existing(job), objects(ftj()).job) == resume


def test_kueue_owns_a_queued_jobs_resumption():
    queued = ftj(queue="gpus")
    admitted_by_kueue = existing(queued)
    admitted_by_kueue["spec"]["suspend"] = False
    assert j.job_patch(queued, admitted_by_kueue, objects(queued).job) is None
    asked_to_suspend = ftj(suspend=True, queue="gpus")
    assert j.job_patch(asked_to_suspend, admitted_by_kueue, objects(queued).job) == {"spec": {"suspend": True}}


def test_a_finished_job_is_left_alone():
    done = existing(ftj())
    done["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    assert j.job_patch(ftj(suspend=True), done, objects(ftj()).job) is None


def test_replacement_only_for_a_suspended_job_with_another_trainer_config():
    old, new = objects(ftj(suspend=True)), objects(ftj(suspend=True, cpu="4"))
    suspended = existing(ftj(suspend=True))
    assert j.needs_replacement(suspended, old.config_map, new.config_map)
    assert not j.needs_replacement(suspended, old.config_map, objects(ftj(suspend=True, deadline=60)).config_map)
    assert not j.needs_replacement(existing(ftj()), old.config_map, new.config_map)  # running: never cut short


def test_ownership():
    job = existing(ftj())
    assert owned_by(job, UID) and not owned_by(job, "other") and not owned_by(job, None)


def test_a_config_map_edited_into_hostile_yaml_reads_as_another_config_without_raising():
    """Whoever may edit ConfigMaps in the namespace may write anything into the trainer config."""
    import time

    rendered = objects(ftj(suspend=True)).config_map
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    hostile = ["[" * 100_000 + "]" * 100_000, bomb, "spec: !!python/object:os.system x", "\x00", "- a\n- b"]
    started = time.monotonic()
    for text in hostile:
        edited = copy.deepcopy(rendered)
        edited["data"]["trainer.yaml"] = text
        assert j.trainer_settings(edited) is None
        assert j.needs_replacement({"spec": {"suspend": True}, "status": {}}, edited, rendered)
    assert time.monotonic() - started < 5
