"""Where the evaluation's on-disk caches live by default: the converted FID weights
(`weights`) and the real images' reference statistics (`reference_cache`)."""

import os


def default_cache_dir() -> str:
    """`$KERAS_PROGDIST_CACHE`, else `~/.cache/keras_progdist`."""
    root = os.environ.get("KERAS_PROGDIST_CACHE")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "keras_progdist")
    return root
