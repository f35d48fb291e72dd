"""How much work one GPU takes at once, in one place.

A HiDream generation uses the whole GPU: two at once only share it and both finish later. So a GPU runs one
and keeps one more waiting, ready to start the moment the first ends. Modal's per-container concurrency, the
Modal worker's queue and the gateway's default ``HDG_WORKER_MAX_IN_FLIGHT`` are all derived from these numbers.
"""

from __future__ import annotations

RUNNING_PER_GPU = 1
QUEUED_PER_GPU = 1
JOBS_PER_GPU = RUNNING_PER_GPU + QUEUED_PER_GPU

# A Modal deployment's default ceiling (HIDREAM_MAX_CONTAINERS): it caps spend under a burst.
MODAL_MAX_CONTAINERS = 4


def worker_max_in_flight(gpus: int = MODAL_MAX_CONTAINERS) -> int:
    """Jobs a worker backend of ``gpus`` GPUs takes at once before the gateway routes elsewhere."""
    return gpus * JOBS_PER_GPU
