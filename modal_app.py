"""HiDream-I1 on Modal: a GPU worker that scales to zero and starts fast.

Deploy in three commands (one deployment per variant; HIDREAM_VARIANT picks it, default ``fast``):

    modal secret create huggingface HF_TOKEN=hf_...          # Llama-3.1-8B-Instruct is a gated repo
    modal run modal_app.py::download --variant fast           # weights into a Volume, once (resumable)
    HIDREAM_VARIANT=fast modal deploy modal_app.py            # the worker, behind Modal proxy auth

Then point the gateway at it: ``HDG_BACKENDS=worker,...``, ``HDG_WORKER_URLS=<the web URL printed by
deploy>``, ``HDG_MODAL_KEY``/``HDG_MODAL_SECRET`` from a Modal proxy auth token.
Try it from a laptop: ``modal run modal_app.py --prompt "a lighthouse at dusk"`` writes ``hidream.png``.

Cold starts: weights live in a Volume (no download at boot), the pipeline is loaded once per container in
``@modal.enter(snap=True)`` and captured by a memory snapshot (CPU memory, and GPU memory where
HIDREAM_GPU_SNAPSHOT=1), so restored containers skip loading; compiled kernels are cached in a second
Volume so a new container does not recompile from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal

from inference.variants import VARIANTS  # pure Python: no torch needed where `modal deploy` runs

# --- Configuration, read where `modal deploy` runs -------------------------------------------------------
VARIANT = os.environ.get("HIDREAM_VARIANT", "fast")
GPU = os.environ.get("HIDREAM_GPU", "H100")
GPU_SNAPSHOT = os.environ.get("HIDREAM_GPU_SNAPSHOT", "0") == "1"  # alpha on Modal: opt in
COMPILE = os.environ.get("HIDREAM_COMPILE", "regional")  # "regional" or "none"
SCALEDOWN_WINDOW = int(os.environ.get("HIDREAM_SCALEDOWN_WINDOW", "300"))  # idle seconds before scaling to zero
MIN_CONTAINERS = int(os.environ.get("HIDREAM_MIN_CONTAINERS", "0"))
MAX_CONTAINERS = int(os.environ.get("HIDREAM_MAX_CONTAINERS", "4"))
WEIGHTS_DIR = Path(os.environ.get("HIDREAM_WEIGHTS_DIR", "/weights"))  # tests point this at a tiny model
CACHE_DIR = Path(os.environ.get("HIDREAM_CACHE_DIR", "/cache"))
LLAMA_REPO = "meta-llama/Meta-Llama-3.1-8B-Instruct"

app = modal.App(f"hidream-{VARIANT}")

# --- The image: pinned versions, and our inference package --------------------------------------------------
image = (
    modal.Image.debian_slim(python_version="3.11")
    # Every package pinned with its hashes: infra/modal/requirements.txt is compiled from requirements.in for
    # this Python and platform (see infra/modal/README.md). Absolute, since `modal deploy` may run elsewhere.
    .uv_pip_install(
        requirements=[str(Path(__file__).parent / "infra" / "modal" / "requirements.txt")],
        extra_options="--require-hashes",  # a package missing from the lock, or a changed file, fails the build
        uv_version="0.13.9",  # the uv that compiled the lock, not whatever `latest` is on build day
    )
    .env(
        {
            "HF_XET_HIGH_PERFORMANCE": "1",  # hf-xet, the hub's download backend: more parallel transfers
            "TORCHINDUCTOR_CACHE_DIR": str(CACHE_DIR / "inductor"),  # compiled kernels survive containers
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        }
    )
    .add_local_python_source("inference")
)

# --- Volumes: weights (written once by `download`) and the compile cache ------------------------------------
weights = modal.Volume.from_name("hidream-weights", create_if_missing=True)
compile_cache = modal.Volume.from_name("hidream-compile-cache", create_if_missing=True)
VOLUMES: dict[str | os.PathLike[str], modal.Volume] = {str(WEIGHTS_DIR): weights, str(CACHE_DIR): compile_cache}

with image.imports():  # heavy imports happen in the container, not where `modal deploy` runs
    import torch


@app.function(image=image, volumes=VOLUMES, secrets=[modal.Secret.from_name("huggingface")], timeout=4 * 3600)
def download(variant: str = VARIANT) -> None:
    """Fetch a variant and Llama-3.1-8B-Instruct into the weights Volume. Safe to re-run: it resumes."""
    from huggingface_hub import snapshot_download

    for repo, target in ((VARIANTS[variant].repo_id, WEIGHTS_DIR / variant), (LLAMA_REPO, WEIGHTS_DIR / "llama")):
        print(f"downloading {repo} -> {target}")
        # snapshot_download skips files already complete and resumes partial ones; it shows progress bars.
        snapshot_download(repo, local_dir=target, allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer*"])
        weights.commit()  # after each repo, so an interrupted run keeps what it finished
    print("done")


# The GPU class's options, named so the offline tests can check them.
CLS_OPTIONS: dict[str, Any] = {
    "gpu": GPU,
    "timeout": 600,
    "scaledown_window": SCALEDOWN_WINDOW,  # stay warm this long after the last request
    "min_containers": MIN_CONTAINERS,  # >0 keeps warm GPUs (and bills for them)
    "max_containers": MAX_CONTAINERS,  # caps spend under a burst; the gateway fails over past it
    "enable_memory_snapshot": True,
    "experimental_options": {"enable_gpu_snapshot": True} if GPU_SNAPSHOT else {},
}


@app.cls(image=image, volumes=VOLUMES, **CLS_OPTIONS)
@modal.concurrent(max_inputs=8)  # requests queue in the worker's own bounded queue, one generation at a time
class HiDream:
    """One GPU, one loaded pipeline, serving the worker protocol and a Modal method."""

    @modal.enter(snap=True)
    def load(self) -> None:
        """Load once; the memory snapshot captures the result. Without GPU snapshots, load to CPU memory."""
        from inference.runner import HiDreamRunner

        # Without GPU snapshots there is no GPU while the snapshot is taken: load to CPU memory, and move to
        # the GPU after restore (still far faster than reading 60 GB from disk).
        device = "cuda" if GPU_SNAPSHOT and torch.cuda.is_available() else "cpu"
        model_dir = WEIGHTS_DIR / VARIANT
        llama = WEIGHTS_DIR / "llama"
        dtype = torch.bfloat16
        self.runner = HiDreamRunner.load(
            model_dir,
            llama_path=llama if llama.exists() else None,
            device=device,
            dtype=dtype,
            fast_moe=False,  # patched after the move: the restacked experts must live on their final device
        )

    @modal.enter(snap=False)
    def start(self) -> None:
        """After restore: move to the GPU, switch on the fast paths, warm up, and start the queue."""
        from inference.moe import patch_moe
        from inference.serving import GenerationQueue

        runner = self.runner
        if torch.cuda.is_available() and runner.device != "cuda":
            runner.pipe.to("cuda")
            runner.device = "cuda"
        patch_moe(runner.pipe.transformer)
        if COMPILE == "regional" and runner.device == "cuda":
            from inference.runner import GenerateParams, compile_blocks

            compile_blocks(runner.pipe.transformer)
            # Compile now, not on a tenant's request, then keep the kernels for the next container.
            runner.generate(GenerateParams("warm-up", VARIANTS[VARIANT], 1024, 1024, seed=0, num_inference_steps=2))
            compile_cache.commit()
        self.queue = GenerationQueue(lambda: runner, queue_size=8)
        self.queue.start()

    @modal.method()
    def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """The worker protocol's ``POST /generate``, for callers that use the Modal SDK."""
        from inference.worker import WorkerRequest, generation_body

        return generation_body(self.runner.generate(WorkerRequest.model_validate(job).params()))

    @modal.asgi_app(requires_proxy_auth=True)
    def web(self) -> Any:
        """The worker HTTP app (inference/worker.py); Modal's proxy auth guards it, so no token of its own."""
        from inference.worker import create_worker_app

        return create_worker_app(self.queue, token=None, variants=frozenset({VARIANT}))


@app.local_entrypoint()
def main(prompt: str = "a lighthouse on a cliff at dusk", seed: int = 0, out: str = "hidream.png") -> None:
    """``modal run modal_app.py --prompt ...``: one image from the deployed class, written to ``out``."""
    import base64

    result = HiDream().generate.remote(
        {"variant": VARIANT, "prompt": prompt, "width": 1024, "height": 1024, "seed": seed}
    )
    Path(out).write_bytes(base64.b64decode(result["images"][0]))
    print(f"wrote {out} ({result['width']}x{result['height']}, {result['timings']})")
