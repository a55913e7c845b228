"""Errors raised while reading media and manifests.

Every message names the input (a path, or `file:line` for a manifest entry) and what is wrong with it.
All are `ValueError`s, so callers that only care about "bad input" can catch one type.
"""

from __future__ import annotations


class MediaDecodeError(ValueError):
    """A media file exists but cannot be used: unreadable, not media, or nothing decodes."""


class VideoDecodeError(MediaDecodeError):
    """A video file is unreadable, is not a video, has no video stream, or no frame decodes."""


class ImageDecodeError(MediaDecodeError):
    """An image file is unreadable or is not an image."""


class ManifestError(ValueError):
    """A manifest line does not parse or a record is malformed; the message starts with `file:line`."""
