"""Backends run image jobs. Each is one small object behind the ``Backend`` protocol."""

from gateway.backends.base import Backend, BackendInputError, ImageJob, ImageResult

__all__ = ["Backend", "BackendInputError", "ImageJob", "ImageResult"]
