"""The kernel's cap on the hub tincd's UDP receive buffer: ``net.core.rmem_max``.

The hub's tinc.conf asks for ``UDPRcvBuf = roster.HUB_UDP_RCVBUF`` (why: roster.py). tinc 1.0
sets it with SO_RCVBUF, which the kernel silently caps at net.core.rmem_max (212992 on stock
kernels: then the buffer is only twice the default and a fleet's burst of PMTU probe replies
still overflows it). ``tinc-hub init`` on a real install (any ``--init`` but ``none``) raises the cap
to the buffer it asks for when it is lower: a sysctl.d file for the next boots and the running
value now, before tincd (re)starts (tincd sizes its socket when it opens it). A larger cap is
never lowered; where /proc/sys cannot be written (a container) it says so and goes on.
"""

from pathlib import Path
from typing import Optional

from bootstrap import bootstrap

RMEM_MAX = Path("/proc/sys/net/core/rmem_max")
SYSCTL_FILE = Path("/etc/sysctl.d/60-tinc-hub.conf")
SYSCTL_MARKER = "# Written by tinc-hub init: the cap on the hub tincd's UDPRcvBuf (its tinc.conf)."


def render_sysctl_conf(wanted: int) -> str:
    return f"{SYSCTL_MARKER}\nnet.core.rmem_max = {int(wanted)}\n"


def read_rmem_max(path: Path = RMEM_MAX) -> Optional[int]:
    """The running cap in bytes; None when it cannot be read or is not a plain number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and len(text) <= 19 else None


def plan_rmem_max(wanted: int, current: Optional[int], sysctl_file: Path = SYSCTL_FILE,
                  rmem_max: Path = RMEM_MAX) -> bootstrap.Plan:
    """Nothing when the cap is unknown or already at least `wanted`; else the sysctl.d file
    and the running value."""
    if current is None or current >= wanted:
        return bootstrap.Plan()
    return bootstrap.Plan(files=(bootstrap.FileSpec(str(sysctl_file), render_sysctl_conf(wanted)),),
                          actions=(f"net.core.rmem_max {current} -> {wanted} now ({rmem_max}):"
                                   " the cap on the hub tincd's UDPRcvBuf",))


def apply_rmem_max(plan: bootstrap.Plan, wanted: int, rmem_max: Path = RMEM_MAX) -> bool:
    """Write the plan's file, then the running value (a warning, not a failure, when the
    kernel refuses it). True when the running cap was raised."""
    bootstrap.apply_files(plan.files)
    if plan.files:
        try:
            rmem_max.write_text(f"{int(wanted)}\n")
            return True
        except OSError as exc:
            bootstrap.REPORT.step(
                f"warning: could not raise net.core.rmem_max to {wanted} ({exc.strerror}): the"
                " hub tincd's UDP buffer stays small and drops packets with many nodes (hint: in"
                f" a container set it on the host: sysctl -w net.core.rmem_max={wanted})")
    return False
