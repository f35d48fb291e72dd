"""modal_app.py offline: it imports without Modal credentials, and its class runs locally on the tiny model."""

from __future__ import annotations

import base64
import importlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from PIL import Image

from tests.fakes.server import ServerThread

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


def test_deployment_settings(modal_app: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert modal_app.app.name == "hidream-fast"
    options = modal_app.CLS_OPTIONS
    assert options["enable_memory_snapshot"] is True and options["experimental_options"] == {}
    assert (options["gpu"], options["scaledown_window"], options["min_containers"]) == ("H100", 120, 0)
    spec = modal_app.HiDream._get_class_service_function()._spec_
    assert spec.gpus == "H100"
    assert {str(p): repr(v) for p, v in spec.volumes.items()} == {
        str(modal_app.WEIGHTS_DIR): "modal.Volume.from_name('hidream-weights')",
        str(modal_app.CACHE_DIR): "modal.Volume.from_name('hidream-compile-cache')",
    }
    assert [s for s in modal_app.download._spec_.secrets]  # the Hugging Face token, for the gated Llama repo

    monkeypatch.setenv("HIDREAM_GPU_SNAPSHOT", "1")
    monkeypatch.setenv("HIDREAM_VARIANT", "full")
    monkeypatch.setenv("HIDREAM_GPU", "H200")
    sys.modules.pop("modal_app", None)
    again = importlib.import_module("modal_app")
    assert again.app.name == "hidream-full" and again.CLS_OPTIONS["gpu"] == "H200"
    assert again.CLS_OPTIONS["experimental_options"] == {"enable_gpu_snapshot": True}


def test_generate_runs_locally_through_the_enter_hooks(modal_app: ModuleType) -> None:
    obj = modal_app.HiDream()
    result = obj.generate.local(JOB)
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    assert image.size == (1248, 832) and image.format == "PNG"
    assert result["timings"]["inference_s"] > 0


def test_web_endpoint_is_the_worker_protocol(modal_app: ModuleType) -> None:
    obj = modal_app.HiDream()
    web = obj.web.local()
    with ServerThread(web) as server:
        health = httpx.get(f"{server.url}/health").json()
        assert health["variants"] == ["fast"]
        resp = httpx.post(f"{server.url}/generate", json=JOB, timeout=60)
        assert resp.status_code == 200 and resp.json()["width"] == 1248
        assert httpx.post(f"{server.url}/generate", json=JOB | {"variant": "full"}).status_code == 404


def test_compile_blocks_covers_every_transformer_block(modal_app: ModuleType, tiny_root: Path) -> None:
    from diffusers import HiDreamImageTransformer2DModel

    from inference.runner import compile_blocks

    transformer = HiDreamImageTransformer2DModel.from_pretrained(tiny_root / "pipeline" / "transformer")
    assert compile_blocks(transformer) == 2
