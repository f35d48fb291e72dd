"""Read a `modal.Image`'s layers offline: the Dockerfile commands Modal would send to its builder, base first.

Modal builds an image lazily: each method (``debian_slim``, ``uv_pip_install``, ``env``...) returns a layer whose
loader closes over its base layers and a function that writes its Dockerfile. Reading those closures lets a test
check what an image installs without Modal credentials or a network. Example::

    layers = image_layers(modal.Image.debian_slim().env({"A": "1"}))
    assert layers[-1] == ["FROM base", "ENV A=1"]
"""

from __future__ import annotations

import shlex
from typing import Any

import modal
from modal._image import LATEST_IMAGE_BUILDER_VERSION, DockerfileSpec
from modal._utils.async_utils import synchronizer


def _cells(layer: Any) -> dict[str, Any]:
    """The variables a layer's loader closes over, by name."""
    load = layer._load
    return dict(zip(load.__code__.co_freevars, (cell.cell_contents for cell in load.__closure__ or ()), strict=True))


def _specs(image: modal.Image) -> list[DockerfileSpec | None]:
    """Each layer's Dockerfile, base first; None for a layer that only adds local files (no Dockerfile)."""

    def walk(layer: Any) -> list[DockerfileSpec | None]:
        cells = _cells(layer)
        bases = list(cells.get("base_images", {}).values())
        if "base_image" in cells:
            bases.append(cells["base_image"])
        below = [spec for base in bases for spec in walk(base)]
        dockerfile_function = cells.get("dockerfile_function")
        return [*below, dockerfile_function(LATEST_IMAGE_BUILDER_VERSION) if dockerfile_function else None]

    return walk(synchronizer._translate_in(image))


def image_layers(image: modal.Image) -> list[list[str]]:
    """The Dockerfile commands of each layer of ``image``, base first ([] for a layer of local files)."""
    return [spec.commands if spec else [] for spec in _specs(image)]


def image_context_files(image: modal.Image) -> dict[str, str]:
    """The local files the image's layers send to the builder: build-context path -> local path."""
    return {name: path for spec in _specs(image) if spec for name, path in spec.context_files.items()}


def image_env(image: modal.Image) -> dict[str, str]:
    """The environment the image's ``ENV K=V`` commands set; a later layer wins."""
    env: dict[str, str] = {}
    for command in (command for layer in image_layers(image) for command in layer):
        if command.startswith("ENV "):
            key, _, value = command.removeprefix("ENV ").partition("=")
            env[key] = "".join(shlex.split(value))
    return env
