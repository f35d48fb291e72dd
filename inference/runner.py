"""Load a HiDream-I1 diffusers pipeline from local directories and generate encoded images."""

from __future__ import annotations

import functools
import inspect
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inference.variants import VARIANTS, Variant, scheduler_config

if TYPE_CHECKING:
    import torch
    from diffusers import HiDreamImagePipeline

OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerateParams:
    """One generation request, already validated and resolved to a supported resolution."""

    prompt: str
    variant: Variant
    width: int
    height: int
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    output_format: OutputFormat = "png"
    quality: int = 90

    @classmethod
    def of(cls, *, variant: str, **fields: Any) -> GenerateParams:
        """Params from plain fields, the variant given by name (``"fast"``)."""
        return cls(variant=VARIANTS[variant], **fields)

    @property
    def steps(self) -> int:
        """Steps to run: the request's, else the variant's recommendation."""
        return self.num_inference_steps or self.variant.steps

    @property
    def guidance(self) -> float:
        """Guidance scale to use: the request's, else the variant's recommendation."""
        return self.variant.guidance_scale if self.guidance_scale is None else self.guidance_scale


@dataclass
class Generation:
    """Encoded images with the size they really have and where the time went."""

    images: list[bytes]
    width: int
    height: int
    content_type: str
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


def pick_device() -> str:
    """The best local device: CUDA if present, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> Any:
    """bf16 on GPUs (HiDream's released dtype), fp32 on the CPU (whose bf16 matmuls are slow)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def encode_image(image: Any, fmt: OutputFormat, quality: int) -> bytes:
    """Encode a PIL image as PNG, JPEG or WebP bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


class HiDreamRunner:
    """A loaded pipeline that serves any variant's presets; one generation runs at a time.

    Example::

        runner = HiDreamRunner.load("/weights/HiDream-I1-Fast", llama_path="/weights/llama-3.1-8b")
        gen = runner.generate(GenerateParams("a red fox", VARIANTS["fast"], 1024, 1024, seed=7))
    """

    def __init__(self, pipe: HiDreamImagePipeline, *, device: str, load_seconds: float = 0.0) -> None:
        self.pipe = pipe
        self.device = device
        self.load_seconds = load_seconds
        self._lock = threading.Lock()
        self._schedulers = {name: _make_scheduler(v) for name, v in VARIANTS.items()}
        # Schedulers whose step draws noise (the flash flow-match one): they get each image's own generator.
        self._noisy_steps = {
            name for name, sch in self._schedulers.items() if "generator" in inspect.signature(sch.step).parameters
        }

    @classmethod
    def load(
        cls,
        model_path: Path | str,
        *,
        llama_path: Path | str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        fast_moe: bool = True,
        fast_load: bool = True,
    ) -> HiDreamRunner:
        """Load the pipeline from ``model_path``; Llama from ``llama_path`` when it is kept apart.

        ``fast_moe`` swaps the transformer's MoE layers for the device-side path (inference/moe.py):
        same outputs within floating-point tolerance, no host sync per block. ``fast_load`` reads the
        transformer (most of the bytes) with inference/loading.py's parallel reader.
        """
        from diffusers import HiDreamImagePipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers import AutoTokenizer, LlamaForCausalLM
        from transformers.utils import logging as transformers_logging

        # Progress bars are noise in a server's log.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        start = time.perf_counter()
        # Ask CUDA only when the caller did not say: a process that loads before a CPU memory snapshot must
        # not touch CUDA at all (torch would remember "no GPU" in every restored container).
        device = device or pick_device()
        dtype = dtype or default_dtype(device)
        extra: dict[str, Any] = {}
        if llama_path is not None:
            extra["tokenizer_4"] = AutoTokenizer.from_pretrained(llama_path)
            # HiDream reads every hidden layer of Llama; eager attention can also return attentions.
            extra["text_encoder_4"] = LlamaForCausalLM.from_pretrained(
                llama_path,
                output_hidden_states=True,
                output_attentions=True,
                attn_implementation="eager",
                dtype=dtype,
            )
        transformer_dir = Path(model_path) / "transformer"
        if fast_load and any(transformer_dir.glob("*.safetensors")):
            from diffusers import HiDreamImageTransformer2DModel

            from inference.loading import load_model

            extra["transformer"], _stats = load_model(
                HiDreamImageTransformer2DModel, transformer_dir, device=device, dtype=dtype
            )
        pipe = HiDreamImagePipeline.from_pretrained(str(model_path), dtype=dtype, **extra)
        pipe.to(device)
        if fast_moe:
            from inference.moe import patch_moe

            patch_moe(pipe.transformer)  # after .to(): it restacks the experts' weights where they live
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device=device, load_seconds=time.perf_counter() - start)

    def to(self, device: str) -> None:
        """Move the whole pipeline to ``device`` (after a CPU memory snapshot is restored, for example)."""
        with self._lock:
            self.pipe.to(device)
            self.device = device

    def generate(self, params: GenerateParams) -> Generation:
        """Run the pipeline and return encoded images; the same params and seed give the same pixels."""
        import torch

        with self._lock:
            self.pipe.scheduler = self._schedulers[params.variant.name]
            # One generator per image: image i depends only on seed + i, whatever n is.
            generators = [
                torch.Generator(device=self.device).manual_seed((params.seed + i) % (MAX_SEED + 1))
                for i in range(params.n)
            ]
            start = time.perf_counter()
            cuda = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
            # fork_rng: nothing here may move the process's global RNG, and nothing may depend on it.
            noisy = params.variant.name in self._noisy_steps
            with _per_image_step_noise(self.pipe.scheduler, generators, noisy), torch.random.fork_rng(devices=cuda):
                torch.manual_seed(params.seed)
                with torch.inference_mode():
                    out = self.pipe(
                        prompt=[params.prompt] * params.n,
                        negative_prompt=[params.negative_prompt or ""] * params.n if params.guidance > 1.0 else None,
                        width=params.width,
                        height=params.height,
                        num_inference_steps=params.steps,
                        guidance_scale=params.guidance,
                        generator=generators,
                        output_type="pil",
                    )
            infer_s = time.perf_counter() - start
        start = time.perf_counter()
        encoded = [encode_image(img, params.output_format, params.quality) for img in out.images]
        width, height = out.images[0].size
        return Generation(
            images=encoded,
            width=width,
            height=height,
            content_type=CONTENT_TYPES[params.output_format],
            seed=params.seed,
            timings={"inference_s": infer_s, "encode_s": time.perf_counter() - start},
        )


@contextmanager
def _per_image_step_noise(scheduler: Any, generators: list[Any], noisy: bool) -> Iterator[None]:
    """Schedulers that draw noise in ``step`` (the flash flow-match one does, every step) draw image i's
    noise from generator i, so image i depends on ``seed + i`` alone, whatever ``n`` is.

    The pipeline calls ``scheduler.step`` without a generator; left alone, the scheduler draws the whole
    batch's noise from torch's global RNG, and image 1 of (seed 5, n=2) differs from image 0 of (seed 6, n=1).
    """
    if not noisy:
        yield  # deterministic given the initial latents (flow UniPC)
        return
    scheduler.step = functools.partial(scheduler.step, generator=generators)
    try:
        yield
    finally:
        del scheduler.step  # back to the class's method


def compile_blocks(transformer: Any, *, backend: str = "inductor") -> int:
    """Regional compilation: each transformer block compiled in place; returns how many.

    Every block of a kind shares one compiled graph per shape class. Images are always padded to the
    transformer's ``max_seq`` tokens and prompts to fixed lengths, so only two things vary between requests:
    the batch (n images, doubled by guidance) and whether a padding mask is passed (non-square sizes).
    ``dynamic=None`` lets dynamo specialise batch 1 and make the batch symbolic the first time it changes,
    so ``warm_up``'s four runs compile everything a tenant can ask for.
    """
    blocks = [*transformer.double_stream_blocks, *transformer.single_stream_blocks]
    for block in blocks:
        block.compile(backend=backend, dynamic=None)
    return len(blocks)


# (width, height, n) at guidance 0: batch 1 and batch 2, square (no mask) and non-square (masked). Every other
# request (other sizes, n up to 4, guidance doubling the batch) reuses one of these graphs.
WARM_UP_SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1), (1024, 1024, 2), (1248, 832, 1), (1248, 832, 2))


def warm_up(runner: HiDreamRunner, variant: Variant) -> None:
    """Run each shape class once, so compiles (or compile-cache loads) happen now and not on a tenant's request."""
    for width, height, n in WARM_UP_SHAPES:
        runner.generate(
            GenerateParams("warm-up", variant, width, height, seed=0, n=n, num_inference_steps=1, guidance_scale=0.0)
        )


def _make_scheduler(variant: Variant) -> Any:
    import diffusers

    cls_name, config = scheduler_config(variant)
    return getattr(diffusers, cls_name).from_config(config)
