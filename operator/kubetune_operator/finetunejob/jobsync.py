"""Keeping an existing Job in step with its FineTuneJob: pure decisions over dicts.

A Job's pod template and completions cannot change; `suspend`, `activeDeadlineSeconds` and
`ttlSecondsAfterFinished` can. The reconciler patches those in place, and replaces a Job only when its
ConfigMap holds another trainer config than the spec now gives (resources or image changed while
suspended; runPolicy aside) and it is suspended, so no running training is ever cut short.
"""

from typing import Any

import yaml

from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.yamlsafe import ManifestError, load_all
from kubetune.contract import CONFIG_KEY

from .status import job_outcome, job_suspended

MUTABLE_FIELDS = ("activeDeadlineSeconds", "ttlSecondsAfterFinished")


def desired_suspend(ftj: FineTuneJob, existing: dict[str, Any]) -> bool:
    """spec.runPolicy.suspend, except that a queued job's resumption belongs to Kueue: the
    operator suspends it on request but never unsuspends it."""
    policy = ftj.spec.run_policy
    if policy.queue_name and not policy.suspend:
        return job_suspended(existing)
    return policy.suspend


def job_patch(ftj: FineTuneJob, existing: dict[str, Any], rendered: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch bringing the Job's mutable fields to the spec's values; None when in step
    or when the Job has finished (nothing about a finished Job is worth changing)."""
    if job_outcome(existing) is not None:
        return None
    have, want = existing.get("spec") or {}, rendered.get("spec") or {}
    spec: dict[str, Any] = {}
    suspend = desired_suspend(ftj, existing)
    if bool(have.get("suspend")) != suspend:
        spec["suspend"] = suspend
    for key in MUTABLE_FIELDS:
        if have.get(key) != want.get(key):
            spec[key] = want.get(key)  # None removes it
    return {"spec": spec} if spec else None


def trainer_settings(config_map: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trainer config a ConfigMap carries, without spec.runPolicy (suspend, deadlines and TTL
    change the Job in place, never its pods); None when there is none, or when what is there is not
    one mapping. Anyone who may edit ConfigMaps in the namespace may have written that text, so it
    is read with the manifest loader's limits (size, depth, aliases): hostile YAML is "another
    config", never an exception."""
    text = ((config_map or {}).get("data") or {}).get(CONFIG_KEY)
    if not isinstance(text, str):
        return None
    try:
        documents = load_all(text)
    except (ManifestError, yaml.YAMLError, RecursionError):  # the loader's own refusals, and what escapes them
        return None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        return None
    document: dict[str, Any] = documents[0]
    if isinstance(document.get("spec"), dict):
        document["spec"].pop("runPolicy", None)
    return document


def needs_replacement(
    existing_job: dict[str, Any], existing_cm: dict[str, Any] | None, rendered_cm: dict[str, Any]
) -> bool:
    """The Job must be replaced: its pods would run another trainer config than the spec now asks
    for (resources or image changed), and it is suspended and unfinished, so nothing is cut short."""
    return (
        job_suspended(existing_job)
        and job_outcome(existing_job) is None
        and trainer_settings(existing_cm) != trainer_settings(rendered_cm)
    )
