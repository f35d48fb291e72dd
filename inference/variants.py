"""HiDream-I1 variants, their recommended settings, and the resolutions the model was trained on."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

SchedulerKind = Literal["flow_unipc", "flash_flow_euler"]


@dataclass(frozen=True)
class Variant:
    """One released HiDream-I1 checkpoint and the settings HiDream's reference script uses for it."""

    name: str
    steps: int
    guidance_scale: float
    shift: float
    scheduler: SchedulerKind
    repo_id: str

    @property
    def model_id(self) -> str:
        """The public model name clients send, e.g. ``hidream-i1-fast``."""
        return f"hidream-i1-{self.name}"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("full", 50, 5.0, 3.0, "flow_unipc", "HiDream-ai/HiDream-I1-Full"),
        Variant("dev", 28, 0.0, 6.0, "flash_flow_euler", "HiDream-ai/HiDream-I1-Dev"),
        Variant("fast", 16, 0.0, 3.0, "flash_flow_euler", "HiDream-ai/HiDream-I1-Fast"),
    )
}

MODEL_IDS: dict[str, Variant] = {v.model_id: v for v in VARIANTS.values()}

# The seven (width, height) pairs HiDream-I1 was trained on; all have about one megapixel.
RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (768, 1360),
    (1360, 768),
    (880, 1168),
    (1168, 880),
    (1248, 832),
    (832, 1248),
)


def variant_for_model(model_id: str) -> Variant | None:
    """Look up a variant by its public model name; None when unknown."""
    return MODEL_IDS.get(model_id)


@functools.lru_cache(maxsize=4096)  # a pure function of two bounded sides, on every request's path
def nearest_resolution(width: int, height: int) -> tuple[int, int]:
    """Map any requested size to the supported resolution with the closest aspect ratio.

    Aspect ratio is compared on a log scale so that 2:1 and 1:2 are equally far from 1:1;
    ties go to the larger area match, then to the list order (square first).
    """
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    target = math.log(width / height)
    area = width * height

    def distance(res: tuple[int, int]) -> tuple[float, int]:
        return (round(abs(math.log(res[0] / res[1]) - target), 9), abs(res[0] * res[1] - area))

    return min(RESOLUTIONS, key=distance)


def scheduler_config(variant: Variant) -> tuple[str, dict[str, Any]]:
    """The diffusers scheduler class name and its config for a variant."""
    if variant.scheduler == "flow_unipc":
        return "UniPCMultistepScheduler", {
            "num_train_timesteps": 1000,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": variant.shift,
        }
    return "FlowMatchLCMScheduler", {
        "num_train_timesteps": 1000,
        "shift": variant.shift,
        "use_dynamic_shifting": False,
    }
