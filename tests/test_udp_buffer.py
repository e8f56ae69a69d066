"""The hub tincd's UDP receive buffer (issue 14): tinc.conf asks for HUB_UDP_RCVBUF, and
`tinc-hub init` raises the kernel's cap (net.core.rmem_max) to it when it is lower. The real
/proc and /etc are not touched here: the functions take their paths (tests/test_fleet.py
measures the buffer's effect with real tincd)."""

from pathlib import Path

import pytest

from tinc_hub import udp_buffer
from tinc_hub.roster import HUB_UDP_RCVBUF, render_hub_tinc_conf


def test_hub_tinc_conf_asks_for_the_buffer():
    lines = render_hub_tinc_conf("hub1", "fleet", 655).splitlines()
    assert "UDPRcvBuf = %d" % HUB_UDP_RCVBUF in lines
    assert HUB_UDP_RCVBUF >= 4 * 1024 * 1024  # the measured need of a few hundred nodes


@pytest.mark.parametrize("current", [None, HUB_UDP_RCVBUF, 2 * HUB_UDP_RCVBUF])
def test_a_cap_that_is_large_enough_or_unknown_is_left_alone(current):
    assert udp_buffer.plan_rmem_max(HUB_UDP_RCVBUF, current) == udp_buffer.bootstrap.Plan()


@pytest.mark.parametrize("text, value", [("212992\n", 212992), ("8388608", 8388608),
                                         ("", None), ("-1\n", None), ("0x10\n", None),
                                         ("1" * 30, None), ("12 34\n", None)])
def test_the_running_cap_is_read_strictly(tmp_path: Path, text, value):
    path = tmp_path / "rmem_max"
    path.write_text(text)
    assert udp_buffer.read_rmem_max(path) == value
    assert udp_buffer.read_rmem_max(tmp_path / "missing") is None


def test_a_small_cap_is_raised_now_and_for_the_next_boots(tmp_path: Path):
    sysctl_file, rmem_max = tmp_path / "sysctl.d" / "60-tinc-hub.conf", tmp_path / "rmem_max"
    rmem_max.write_text("212992\n")
    plan = udp_buffer.plan_rmem_max(HUB_UDP_RCVBUF, 212992, sysctl_file, rmem_max)
    assert [spec.path for spec in plan.files] == [str(sysctl_file)]
    assert "212992 -> %d" % HUB_UDP_RCVBUF in plan.actions[0]
    assert udp_buffer.apply_rmem_max(plan, HUB_UDP_RCVBUF, rmem_max) is True
    assert udp_buffer.read_rmem_max(rmem_max) == HUB_UDP_RCVBUF
    assert sysctl_file.read_text().splitlines()[1:] == [
        "net.core.rmem_max = %d" % HUB_UDP_RCVBUF]
    assert sysctl_file.stat().st_mode & 0o777 == 0o644


def test_a_refused_cap_is_a_warning_not_a_failure(tmp_path: Path, capsys):
    rmem_max = tmp_path / "not-writable"  # a directory: refused to root too, as a read-only /proc/sys
    rmem_max.mkdir()
    plan = udp_buffer.plan_rmem_max(HUB_UDP_RCVBUF, 212992, tmp_path / "60-tinc-hub.conf",
                                    rmem_max)
    assert udp_buffer.apply_rmem_max(plan, HUB_UDP_RCVBUF, rmem_max) is False
    assert "warning: could not raise net.core.rmem_max" in capsys.readouterr().err
    assert (tmp_path / "60-tinc-hub.conf").exists()
