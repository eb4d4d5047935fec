"""The Ray cluster a job runs on (ray is imported when called: importing it costs seconds)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Attach to RAY_ADDRESS (a cluster, or the one a submitted job runs in), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        log.info("no RAY_ADDRESS: starting a local Ray")
        ray.init(include_dashboard=False)
