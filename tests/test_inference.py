"""The inference package on the tiny pipeline: loading, presets, resolutions, determinism, formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from inference.runner import GenerateParams, HiDreamRunner
from inference.tiny import build_tiny_pipeline
from inference.variants import RESOLUTIONS, VARIANTS, nearest_resolution, scheduler_config, variant_for_model


def test_variant_presets_match_hidreams_reference_settings() -> None:
    assert {n: (v.steps, v.guidance_scale, v.shift) for n, v in VARIANTS.items()} == {
        "full": (50, 5.0, 3.0),
        "dev": (28, 0.0, 6.0),
        "fast": (16, 0.0, 3.0),
    }
    assert scheduler_config(VARIANTS["full"])[0] == "UniPCMultistepScheduler"
    assert scheduler_config(VARIANTS["dev"]) == (
        "FlowMatchLCMScheduler",
        {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False},
    )
    assert variant_for_model("hidream-i1-dev") is VARIANTS["dev"] and variant_for_model("sdxl") is None


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ((1024, 1024), (1024, 1024)),
        ((512, 512), (1024, 1024)),
        ((1920, 1080), (1360, 768)),
        ((1080, 1920), (768, 1360)),
        ((1200, 900), (1168, 880)),
        ((900, 1200), (880, 1168)),
        ((1500, 1000), (1248, 832)),
        ((4096, 64), (1360, 768)),
    ],
)
def test_nearest_resolution(requested: tuple[int, int], expected: tuple[int, int]) -> None:
    assert nearest_resolution(*requested) == expected
    assert expected in RESOLUTIONS


def test_tiny_build_has_the_released_layout_and_is_idempotent(tiny_root: Path) -> None:
    index = json.loads((tiny_root / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "HiDreamImagePipeline"
    assert index["text_encoder_4"] == [None, None]  # Llama is loaded separately, as with the real weights
    assert (tiny_root / "llama" / "config.json").exists()
    stamp = (tiny_root / "tiny.json").stat().st_mtime_ns
    assert build_tiny_pipeline(tiny_root) == tiny_root
    assert (tiny_root / "tiny.json").stat().st_mtime_ns == stamp


def test_all_four_tokenizers_load_and_round_trip(tiny_root: Path) -> None:
    for sub in ("pipeline/tokenizer", "pipeline/tokenizer_2", "pipeline/tokenizer_3", "llama"):
        tok = AutoTokenizer.from_pretrained(tiny_root / sub)
        ids = tok("a red fox in the snow").input_ids
        assert len(ids) > 3
        assert "fox" in tok.decode(ids, skip_special_tokens=True)


def test_runner_generates_decodable_images_deterministically(runner: HiDreamRunner) -> None:
    params = GenerateParams("a castle", VARIANTS["dev"], 1248, 832, seed=1, num_inference_steps=2)
    first, again = runner.generate(params), runner.generate(params)
    assert first.images == again.images
    assert (first.width, first.height, first.content_type) == (1248, 832, "image/png")
    assert Image.open(io.BytesIO(first.images[0])).size == (1248, 832)
    assert first.timings["inference_s"] > 0


def test_full_variant_uses_classifier_free_guidance_with_a_negative_prompt(runner: HiDreamRunner) -> None:
    base = dict(prompt="a castle", variant=VARIANTS["full"], width=1024, height=1024, seed=3, num_inference_steps=2)
    plain = runner.generate(GenerateParams(**base))  # type: ignore[arg-type]
    negative = runner.generate(GenerateParams(**base, negative_prompt="fog"))  # type: ignore[arg-type]
    assert plain.images != negative.images


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(runner: HiDreamRunner, fmt: str, pil: str) -> None:
    gen = runner.generate(
        GenerateParams("x", VARIANTS["fast"], 1024, 1024, seed=0, num_inference_steps=1, output_format=fmt)  # type: ignore[arg-type]
    )
    assert Image.open(io.BytesIO(gen.images[0])).format == pil
