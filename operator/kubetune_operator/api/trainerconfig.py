"""The trainer's configuration: the FineTuneJob spec plus what the operator (or `kubetune train`) adds.

The operator renders this into the job's ConfigMap; the trainer parses it with the same models,
so the user's spec reaches the training process without a second definition of any field.
"""

from pydantic import Field

from .common import MAX_NAME, ApiModel
from .finetunejob import FineTuneJobSpec


# The trainer's exit codes, a contract with the Job's podFailurePolicy that the operator renders.
EXIT_INVALID_INPUT = 2  # the config, the data or a URI is wrong: retrying cannot help
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after a checkpoint was written: the retry resumes
NON_RETRYABLE_EXIT_CODES = (EXIT_INVALID_INPUT,)


class RuntimeSettings(ApiModel):
    """Set by the operator for pods, or by `kubetune train` for local runs; not part of the user API."""

    job_name: str = Field(default="local", max_length=MAX_NAME, description="The FineTuneJob's name (labels, logs).")
    namespace: str = Field(default="default", max_length=63, description="The FineTuneJob's namespace.")
    local: bool = Field(default=False, description="A run on this machine: file:// URIs allowed.")
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="Prometheus port on rank 0; 0 disables it.")
    cache_dir: str = Field(default="/scratch/cache", description="Writable scratch for downloads and staging.")
    termination_message_path: str = Field(
        default="/dev/termination-log", description="Where the short JSON result goes (the pod's termination message)."
    )
    grace_seconds: int = Field(default=30, ge=1, description="Time between SIGTERM and SIGKILL; a checkpoint must fit in it.")


class TrainerConfig(ApiModel):
    """What the trainer reads from its config file."""

    spec: FineTuneJobSpec
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
