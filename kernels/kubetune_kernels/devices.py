"""Whether a CUDA device can run Triton kernels: one answer for Liger's kernels and ours."""

import functools

import torch

# Triton's NVIDIA backend still carries code paths for sm_70 (Volta); older GPUs are out.
MIN_CUDA_CAPABILITY = (7, 0)


@functools.cache
def cuda_problem(device_index: int) -> str | None:
    """Why CUDA device `device_index` cannot run Triton, or None; asked once per device and process.
    Never raises: a broken driver is a reason, not a crash."""
    try:
        capability = torch.cuda.get_device_capability(device_index)
    except Exception as exc:  # noqa: BLE001
        return f"CUDA device not usable: {exc}"
    if torch.version.hip is None and capability < MIN_CUDA_CAPABILITY:
        return f"GPU compute capability {capability[0]}.{capability[1]} is below Triton's 7.0"
    return None
