"""Pure renderers: a parsed kubetune object and the operator's configuration in, Kubernetes objects
(plain dicts) out. No API calls and no kopf here, so every decision about what the cluster runs is
unit-tested without a cluster; the handlers create and patch what these functions return."""

from .adapterdeployment import AdapterDeploymentObjects, render_adapterdeployment
from .common import RenderError, owner_reference
from .finetunejob import (
    FineTuneJobObjects,
    check_renderable,
    config_map_name,
    master_addr,
    name_problems,
    render_finetunejob,
    service_name,
    trainer_config,
)

__all__ = [
    "AdapterDeploymentObjects",
    "render_adapterdeployment",
    "FineTuneJobObjects",
    "RenderError",
    "check_renderable",
    "config_map_name",
    "master_addr",
    "name_problems",
    "owner_reference",
    "render_finetunejob",
    "service_name",
    "trainer_config",
]
