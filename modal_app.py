"""HiDream-I1 on Modal: a GPU worker that scales to zero and starts fast.

Deploy in three commands (one deployment per variant; HIDREAM_VARIANT picks it, default ``fast``):

    modal secret create huggingface HF_TOKEN=hf_...          # Llama-3.1-8B-Instruct is a gated repo
    modal run modal_app.py::download --variant fast           # weights into a Volume, once (resumable)
    HIDREAM_VARIANT=fast modal deploy modal_app.py            # the worker, behind Modal proxy auth

Then point the gateway at it: ``HDG_BACKENDS=worker,...``, ``HDG_WORKER_URLS=<the web URL printed by
deploy>``, ``HDG_MODAL_KEY``/``HDG_MODAL_SECRET`` from a Modal proxy auth token.
Try it from a laptop: ``modal run modal_app.py --prompt "a lighthouse at dusk"`` writes ``hidream.png``.

Deploy-time settings (``HIDREAM_*``, see ``Deployment``) are written into the image's environment, because
Modal imports this file again inside each container, where the deploying shell's variables are not set.

Cold starts: weights live in a Volume (no download at boot); the pipeline is loaded once, in
``@modal.enter(snap=True)``, and captured by a memory snapshot (CPU memory by default: loaded without touching
CUDA, moved to the GPU after restore; with HIDREAM_GPU_SNAPSHOT=1 the GPU memory too, compiled and warmed
before the snapshot), so restored containers skip loading; compiled kernels are cached in a second Volume so a
new container loads them instead of compiling. README.md has the phases and what each costs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import modal

from inference.capacity import JOBS_PER_GPU, MODAL_MAX_CONTAINERS, QUEUED_PER_GPU  # pure Python, as is:
from inference.variants import VARIANTS  # no torch needed where `modal deploy` runs


# --- Deployment settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deployment:
    """What ``modal deploy`` was told, as ``HIDREAM_*`` variables (``HIDREAM_VARIANT=full``, ...).

    Modal imports this file twice: where ``modal deploy`` runs, and again inside every container, where the
    deploying shell's environment is not set. So the values are read once at deploy time and written into the
    image's environment (below); the container reads the same values back from there.
    """

    variant: str = "fast"
    gpu: str = "H100"
    gpu_snapshot: bool = False  # GPU memory snapshots are alpha on Modal: opt in
    compile: str = "regional"  # or "none"
    scaledown_window: int = 300  # idle seconds before scaling to zero
    min_containers: int = 0  # >0 keeps warm GPUs (and bills for them)
    max_containers: int = MODAL_MAX_CONTAINERS  # caps spend under a burst; the gateway fails over past it
    weights_dir: str = "/weights"  # tests point these two at local directories
    cache_dir: str = "/cache"

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str]) -> Deployment:
        """Read ``HIDREAM_<FIELD>`` for each field; refuse bad values with a message that names the variable."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"HIDREAM_{f.name.upper()}"
            raw = env.get(name)
            if raw is None:
                continue
            if f.type == "bool":
                if raw not in ("0", "1"):
                    raise ValueError(f"{name} must be 0 or 1, not {raw!r}")
                values[f.name] = raw == "1"
            elif f.type == "int":
                if not raw.isdigit():
                    raise ValueError(f"{name} must be a whole number, not {raw!r}")
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        deployment = cls(**values)
        if deployment.variant not in VARIANTS:
            raise ValueError(f"HIDREAM_VARIANT must be one of {sorted(VARIANTS)}, not {deployment.variant!r}")
        if deployment.compile not in ("regional", "none"):
            raise ValueError(f"HIDREAM_COMPILE must be regional or none, not {deployment.compile!r}")
        if not 0 <= deployment.min_containers <= deployment.max_containers or deployment.max_containers < 1:
            raise ValueError("need 0 <= HIDREAM_MIN_CONTAINERS <= HIDREAM_MAX_CONTAINERS and at least 1 container")
        return deployment

    def env(self) -> dict[str, str]:
        """The ``HIDREAM_*`` variables that give back this deployment (for the image's environment)."""
        as_text = {bool: lambda v: "1" if v else "0"}
        return {f"HIDREAM_{k.upper()}": as_text.get(type(v), str)(v) for k, v in asdict(self).items()}


DEPLOY = Deployment.from_env(os.environ)
VARIANT = DEPLOY.variant
WEIGHTS_DIR, CACHE_DIR = Path(DEPLOY.weights_dir), Path(DEPLOY.cache_dir)
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
            **DEPLOY.env(),  # the deploy-time settings, for the container's import of this file
        }
    )
    .add_local_python_source("inference")
)

# --- Volumes: weights (written once by `download`) and the compile cache ------------------------------------
weights = modal.Volume.from_name("hidream-weights", create_if_missing=True)
compile_cache = modal.Volume.from_name("hidream-compile-cache", create_if_missing=True)
VOLUMES: dict[str | os.PathLike[str], modal.Volume] = {str(WEIGHTS_DIR): weights, str(CACHE_DIR): compile_cache}


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
    "gpu": DEPLOY.gpu,
    "timeout": 600,  # one request
    # Enter hooks: with GPU snapshots the first container loads ~63 GB, compiles and warms up before its snapshot.
    "startup_timeout": 1800,
    "scaledown_window": DEPLOY.scaledown_window,  # stay warm this long after the last request
    "min_containers": DEPLOY.min_containers,
    "max_containers": DEPLOY.max_containers,
    "enable_memory_snapshot": True,
    "experimental_options": {"enable_gpu_snapshot": True} if DEPLOY.gpu_snapshot else {},
}
# One generation at a time per GPU, and one waiting behind it so the GPU never idles between jobs: Modal aims
# for one input per container and scales out past that (target_inputs), and lets a container take a second
# while a new one starts (max_inputs). The gateway's HDG_WORKER_MAX_IN_FLIGHT default is
# max_containers x JOBS_PER_GPU, from the same numbers (inference/capacity.py).
CONCURRENCY: dict[str, int] = {"max_inputs": JOBS_PER_GPU, "target_inputs": 1}


@app.cls(image=image, volumes=VOLUMES, **CLS_OPTIONS)
@modal.concurrent(**CONCURRENCY)
class HiDream:
    """One GPU, one loaded pipeline, serving the worker protocol and a Modal method through one queue."""

    @modal.enter(snap=True)
    def load(self) -> None:
        """Load once; the memory snapshot captures the result.

        With CPU memory snapshots no GPU is attached yet: load to CPU memory and touch nothing of CUDA (torch
        would remember "no GPU" in every restored container). With GPU snapshots, load to the GPU and bring
        everything up here, so a restored container skips the compile too.
        """
        from inference import startup

        llama = WEIGHTS_DIR / "llama"
        self.times = startup.StartupTimes()
        self.runner = startup.load(
            WEIGHTS_DIR / VARIANT,
            llama_dir=llama if llama.exists() else None,
            device="cuda" if DEPLOY.gpu_snapshot else "cpu",
            times=self.times,
        )
        if DEPLOY.gpu_snapshot:
            self._bring_up()
            self._keep_compiled_kernels()

    @modal.enter(snap=False)
    def start(self) -> None:
        """After restore: move to the GPU, switch on the fast paths, warm up (unless the snapshot has it all),
        and start the queue."""
        from inference.serving import GenerationQueue

        if not DEPLOY.gpu_snapshot:
            self._bring_up()
        runner = self.runner
        self.queue = GenerationQueue(lambda: runner, queue_size=QUEUED_PER_GPU)
        self.queue.start()
        if not DEPLOY.gpu_snapshot:
            self._keep_compiled_kernels()  # after the queue starts: a slow commit delays nothing

    def _bring_up(self) -> None:
        from inference import startup

        startup.bring_up(
            self.runner,
            VARIANTS[VARIANT],
            compile_mode="regional" if DEPLOY.compile == "regional" else "none",
            require_gpu=not modal.is_local(),  # `.local()` runs on a laptop or CI without one
            times=self.times,
        )
        print(f"start-up phases: {self.times.summary()}")

    def _keep_compiled_kernels(self) -> None:
        """Commit the compile cache, so kernels compiled by this container serve the next one."""
        if DEPLOY.compile == "regional" and not modal.is_local():
            try:
                compile_cache.commit()
            except Exception as exc:  # a cache that failed to persist costs the next container time, not this one
                print(f"compile cache not committed: {exc!r}")

    @modal.method()
    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """The worker protocol's ``POST /generate``, for callers that use the Modal SDK; same queue as the web.

        Errors are built-in exceptions (``ValueError`` for a bad job, ``RuntimeError`` when busy), so a caller
        without this package can still unpickle them.
        """
        from pydantic import ValidationError

        from inference.serving import NotLoaded, QueueFull
        from inference.worker import WorkerRequest, generation_body

        try:
            request = WorkerRequest.model_validate(job)
        except ValidationError as exc:
            raise ValueError(f"invalid job: {exc}") from None
        if request.variant != VARIANT:  # these weights would run another variant's presets and mislabel it
            raise ValueError(f"this deployment serves {VARIANT!r}, not {request.variant!r}")
        try:
            generation = await self.queue.submit(request.params(), timeout=request.timeout_s)
        except QueueFull as exc:
            raise RuntimeError(f"busy: {exc}") from None
        except NotLoaded as exc:  # not worth retrying here: the container is broken or stopping
            raise RuntimeError(f"not available: {exc}") from None
        return generation_body(generation)

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
