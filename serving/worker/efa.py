"""EFA (Elastic Fabric Adapter) check at worker start.

On p5/p6 nodes the KV cache moves between prefill and decode workers over EFA (NIXL's UCX or
libfabric backends). Without an EFA device those libraries quietly fall back to TCP and the
transfer runs an order of magnitude slower with nothing in the logs. So a worker states what
it expects, ``--efa``:

    off       no check (nodes without EFA, laptops, CI)
    required  no EFA device -> refuse to start, with a one-line reason
    fallback  no EFA device -> start anyway, warn, and report efa="fallback" in
              strata_worker_info, so dashboards and alerts see it

An EFA device is an RDMA device whose kernel driver is ``efa``:
``/sys/class/infiniband/<dev>/device/driver -> .../drivers/efa``. Owns that probe and the
decision; no network I/O.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

EFAMode = Literal["off", "fallback", "required"]
EFAState = Literal["off", "ok", "fallback"]
SYSFS_INFINIBAND = Path("/sys/class/infiniband")
EFA_DRIVER = "efa"


class EFAUnavailable(RuntimeError):
    """``--efa required`` and the node has no EFA device."""


@dataclass(frozen=True, slots=True)
class EFAStatus:
    mode: EFAMode
    state: EFAState  # the strata_worker_info label: off | ok | fallback
    devices: tuple[str, ...]


def find_efa_devices(sysfs_dir: Path = SYSFS_INFINIBAND) -> tuple[str, ...]:
    """Names of the RDMA devices under ``sysfs_dir`` bound to the ``efa`` driver, sorted."""
    try:
        entries = sorted(sysfs_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return ()
    devices = []
    for entry in entries:
        try:
            driver = os.path.basename(os.readlink(entry / "device" / "driver"))
        except OSError:
            continue
        if driver == EFA_DRIVER:
            devices.append(entry.name)
    return tuple(devices)


def check_efa(mode: EFAMode, sysfs_dir: Path = SYSFS_INFINIBAND) -> EFAStatus:
    """Probe for EFA as ``mode`` asks; raises ``EFAUnavailable`` when required and missing."""
    if mode == "off":
        return EFAStatus(mode, "off", ())
    devices = find_efa_devices(sysfs_dir)
    if devices:
        logger.info("EFA devices: %s", ", ".join(devices))
        return EFAStatus(mode, "ok", devices)
    where = f"no RDMA device with driver {EFA_DRIVER!r} under {sysfs_dir}"
    if mode == "required":
        raise EFAUnavailable(
            f"EFA required (--efa required) but {where}: the pod must request "
            "vpc.amazonaws.com/efa on an EFA instance with the EFA device plugin running; "
            "use --efa fallback to run KV transfers over TCP instead"
        )
    logger.warning(
        'EFA fallback: %s; KV transfers run over TCP (strata_worker_info efa="fallback")',
        where,
    )
    return EFAStatus(mode, "fallback", ())
