"""modal_app.py offline: it imports without Modal credentials, its settings reach the container, and its class
runs locally on the tiny model through the same hooks and queue a container uses."""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.settings import Settings
from inference import capacity
from tests.fakes.server import ServerThread

ROOT = Path(__file__).resolve().parent.parent
JOB = {"variant": "fast", "prompt": "a fox", "width": 1248, "height": 832, "seed": 1, "num_inference_steps": 1}


@pytest.fixture
def modal_app(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The module, configured the way a deployment is, with its weights Volume standing in as a directory."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "fast").symlink_to(tiny_root / "pipeline")
    (weights / "llama").symlink_to(tiny_root / "llama")
    for key in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HIDREAM_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("HIDREAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HIDREAM_SCALEDOWN_WINDOW", "120")
    monkeypatch.setenv("HIDREAM_COMPILE", "none")
    sys.modules.pop("modal_app", None)
    yield importlib.import_module("modal_app")
    sys.modules.pop("modal_app", None)


def test_deployment_settings(modal_app: ModuleType) -> None:
    assert modal_app.app.name == "hidream-fast"
    options = modal_app.CLS_OPTIONS
    assert options["enable_memory_snapshot"] is True and options["experimental_options"] == {}
    assert (options["gpu"], options["scaledown_window"], options["min_containers"]) == ("H100", 120, 0)
    assert options["startup_timeout"] == 1800  # a first GPU-snapshot boot loads, compiles and warms up
    spec = modal_app.HiDream._get_class_service_function()._spec_
    assert spec.gpus == "H100"
    assert {str(p): repr(v) for p, v in spec.volumes.items()} == {
        str(modal_app.WEIGHTS_DIR): "modal.Volume.from_name('hidream-weights')",
        str(modal_app.CACHE_DIR): "modal.Volume.from_name('hidream-compile-cache')",
    }
    assert [s for s in modal_app.download._spec_.secrets]  # the Hugging Face token, for the gated Llama repo


def test_bad_deploy_settings_fail_at_deploy_with_the_variable_named(modal_app: ModuleType) -> None:
    deployment = modal_app.Deployment
    for env, name in (
        ({"HIDREAM_VARIANT": "turbo"}, "HIDREAM_VARIANT"),
        ({"HIDREAM_GPU_SNAPSHOT": "yes"}, "HIDREAM_GPU_SNAPSHOT"),
        ({"HIDREAM_MAX_CONTAINERS": "four"}, "HIDREAM_MAX_CONTAINERS"),
        ({"HIDREAM_COMPILE": "max-autotune"}, "HIDREAM_COMPILE"),
        ({"HIDREAM_MIN_CONTAINERS": "5", "HIDREAM_MAX_CONTAINERS": "2"}, "HIDREAM_MIN_CONTAINERS"),
    ):
        with pytest.raises(ValueError, match=name):
            deployment.from_env(env)


# What a deployment sees of its settings, printed as JSON by a fresh interpreter.
_PROBE = """
import json, modal_app
from tests.modal_image import image_env
d = modal_app.DEPLOY
print(json.dumps({
    "deploy": {k: getattr(d, k) for k in d.__dataclass_fields__},
    "app": modal_app.app.name,
    "image_env": image_env(modal_app.image),
    "options": {k: modal_app.CLS_OPTIONS[k] for k in ("gpu", "scaledown_window", "min_containers", "max_containers")},
    "gpu_snapshot": modal_app.CLS_OPTIONS["experimental_options"],
}))
"""


def _probe(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_deploy_settings_reach_the_container() -> None:
    """`HIDREAM_VARIANT=full ... modal deploy`: the container, which imports modal_app again without the
    deploying shell's variables, reads the same settings back from its image's environment."""
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("HIDREAM_", "MODAL_"))}
    bare["PYTHONPATH"] = str(ROOT)
    said = {
        "HIDREAM_VARIANT": "full",
        "HIDREAM_GPU": "H200",
        "HIDREAM_GPU_SNAPSHOT": "1",
        "HIDREAM_COMPILE": "none",
        "HIDREAM_SCALEDOWN_WINDOW": "60",
        "HIDREAM_MIN_CONTAINERS": "1",
        "HIDREAM_MAX_CONTAINERS": "2",
    }
    deploying = _probe(bare | said)
    assert deploying["app"] == "hidream-full"
    assert deploying["options"] == {"gpu": "H200", "scaledown_window": 60, "min_containers": 1, "max_containers": 2}
    assert deploying["gpu_snapshot"] == {"enable_gpu_snapshot": True}
    assert said.items() <= deploying["image_env"].items()

    # Inside the container: no HIDREAM_* from the shell, only what the image's ENV lines set.
    container = _probe(bare | deploying["image_env"])
    assert container["deploy"] == deploying["deploy"]
    assert container["deploy"]["variant"] == "full" and container["deploy"]["gpu_snapshot"] is True
    assert container["deploy"]["compile"] == "none" and container["deploy"]["max_containers"] == 2
    # Without the image's environment the container would have served the default variant: the test can fail.
    assert _probe(bare)["deploy"]["variant"] == "fast"


def test_concurrency_matches_one_gpu_and_the_gateways_default(modal_app: ModuleType) -> None:
    assert modal_app.CONCURRENCY == {"max_inputs": capacity.JOBS_PER_GPU, "target_inputs": 1}
    assert capacity.RUNNING_PER_GPU == 1
    # The gateway sends a worker at most what a default deployment holds: containers x jobs per GPU.
    default_in_flight = Settings(_env_file=None).worker_max_in_flight  # type: ignore[call-arg]
    assert default_in_flight == modal_app.DEPLOY.max_containers * capacity.JOBS_PER_GPU == 8


def _entered(modal_app: ModuleType) -> Any:
    """An instance whose enter hooks have run (load, then start), as in a container. Modal's ``.local()`` runs
    them before a sync method but not before an async one, so go through the sync web method first."""
    obj = modal_app.HiDream()
    obj.web.local()
    return obj


def test_generate_runs_locally_through_the_enter_hooks(modal_app: ModuleType) -> None:
    obj = _entered(modal_app)
    result = asyncio.run(obj.generate.local(JOB))
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    assert image.size == (1248, 832) and image.format == "PNG"
    assert result["timings"]["inference_s"] > 0


def test_the_modal_method_shares_the_one_queue(modal_app: ModuleType) -> None:
    """Three jobs at once on one container: two are taken (one runs, one waits), the third is refused rather
    than run beside them. Modal's max_inputs keeps a third from arriving at all."""
    obj = _entered(modal_app)

    async def three() -> list[Any]:
        return await asyncio.gather(*(obj.generate.local(JOB) for _ in range(3)), return_exceptions=True)

    outcomes = asyncio.run(three())
    assert sum(isinstance(o, dict) for o in outcomes) == capacity.JOBS_PER_GPU
    refused = [o for o in outcomes if not isinstance(o, dict)]
    assert [type(o) for o in refused] == [RuntimeError] and "busy" in str(refused[0])


def test_the_modal_method_serves_only_the_deployed_variant(modal_app: ModuleType) -> None:
    obj = _entered(modal_app)
    with pytest.raises(ValueError, match="serves 'fast', not 'full'"):
        asyncio.run(obj.generate.local(JOB | {"variant": "full"}))
    with pytest.raises(ValueError, match="invalid job") as refused:  # a built-in error, not pydantic's
        asyncio.run(obj.generate.local(JOB | {"width": 5}))
    assert type(refused.value) is ValueError


def test_web_endpoint_is_the_worker_protocol(modal_app: ModuleType) -> None:
    obj = modal_app.HiDream()
    web = obj.web.local()
    with ServerThread(web) as server:
        health = httpx.get(f"{server.url}/health").json()
        assert health["variants"] == ["fast"] and health["capacity"] == capacity.JOBS_PER_GPU
        resp = httpx.post(f"{server.url}/generate", json=JOB, timeout=60)
        assert resp.status_code == 200 and resp.json()["width"] == 1248
        assert httpx.post(f"{server.url}/generate", json=JOB | {"variant": "full"}).status_code == 404


# A CUDA build of torch with no GPU attached, as in Modal's snap=True phase under CPU memory snapshots. On such a
# build torch.cuda.is_available() and device_count() ask the driver (torch._C._cuda_getDeviceCount), and c10
# caches the answer for the life of the process; here they answer 0 and record who asked. torch.accelerator
# reports CUDA, as it does on that build. Installed before anything else is imported, so import-time queries
# (diffusers picks a default device when it is imported) are seen too.
_SNAPSHOT_PROBE = """
import json, traceback
import torch
asked = []
def driver(answer):
    def ask(*args, **kwargs):
        asked.append("".join(traceback.format_stack(limit=12)[:-1]))
        return answer
    return ask
def recorded(real):
    def call(*args, **kwargs):
        asked.append("".join(traceback.format_stack(limit=12)[:-1]))
        return real(*args, **kwargs)
    return call
torch.cuda.is_available, torch.cuda.device_count = driver(False), driver(0)
for name in ("init", "_lazy_init", "current_device", "set_device", "get_device_properties", "synchronize"):
    setattr(torch.cuda, name, recorded(getattr(torch.cuda, name)))
# On a CUDA build these ask whether CUDA is there, which fills the same cache.
torch.Tensor.is_pinned, torch.Tensor.pin_memory = recorded(torch.Tensor.is_pinned), recorded(torch.Tensor.pin_memory)
torch._C._accelerator_getAccelerator = lambda: torch.device("cuda")
import modal_app
from modal._partial_function import _find_callables_for_obj, _PartialFunctionFlags
obj = modal_app.HiDream._get_user_cls()()
for hook in _find_callables_for_obj(obj, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT).values():
    hook()
before = list(asked)
loaded = {"device": obj.runner.device, "dtype": str(obj.runner.pipe.transformer.dtype)}
for hook in _find_callables_for_obj(obj, _PartialFunctionFlags.ENTER_POST_SNAPSHOT).values():
    hook()
print(json.dumps({"before": before, "after": len(asked), **loaded}))
"""


def test_snapshot_load_never_asks_the_driver_for_gpus(modal_app: ModuleType) -> None:
    """The snap=True hook runs before a CPU memory snapshot, with no GPU attached. If anything there asked the
    driver how many GPUs there are, every restored container would keep the answer (0) and stay off the GPU."""
    env = {k: v for k, v in os.environ.items() if k.startswith("HIDREAM_")} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT_PROBE],
        env=os.environ | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == [], "asked before the snapshot:\n" + "\n".join(got["before"][:2])
    assert (got["device"], got["dtype"]) == ("cpu", "torch.bfloat16")
    assert got["after"] >= 1  # after the restore, start() asks: that is where the GPU is found
