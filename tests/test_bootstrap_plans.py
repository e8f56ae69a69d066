"""Plans of bootstrap.py per system: fixture trees -> package commands, init, unit, rc.local.

Each system row is checked twice: with the `distro` package and with bootstrap.py's own
parsers, which must give the same answers.
"""

import os

import pytest

from support import FIXTURE_SYSTEMS, bootstrap

APT = ("apt-get", "-o", "DPkg::Lock::Timeout=300")

# system -> (os id, version, family, package commands, auto init, unit, umbrella, rc.local)
ROWS = {
    "centos-6": ("centos", "6.10", "rhel",
                 [("yum", "install", "-y", "epel-release"), ("yum", "install", "-y", "tinc")],
                 "rc.local", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    "centos-7": ("centos", "7", "rhel",
                 [("yum", "install", "-y", "epel-release"), ("yum", "install", "-y", "tinc")],
                 "systemd", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    "rocky-8": ("rocky", "8.9", "rhel",
                [("dnf", "install", "-y", "epel-release"), ("dnf", "install", "-y", "tinc")],
                "systemd", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    "rocky-9": ("rocky", "9.3", "rhel",
                [("dnf", "install", "-y", "epel-release"), ("dnf", "install", "-y", "tinc")],
                "systemd", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    "alma-8": ("almalinux", "8.10", "rhel",
               [("dnf", "install", "-y", "epel-release"), ("dnf", "install", "-y", "tinc")],
               "systemd", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    "alma-9": ("almalinux", "9.4", "rhel",
               [("dnf", "install", "-y", "epel-release"), ("dnf", "install", "-y", "tinc")],
               "systemd", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    "fedora-40": ("fedora", "40", "fedora", [("dnf", "install", "-y", "tinc")],
                  "systemd", "tinc@NET.service", None, "/etc/rc.d/rc.local"),
    # tinc installed from EPEL / Fedora: both units shipped; presets leave tinc.service
    # disabled, so it is enabled with the instance
    "rocky-9-tinc-installed": ("rocky", "9.3", "rhel", [], "systemd", "tinc@NET.service",
                               "tinc.service", "/etc/rc.d/rc.local"),
    "fedora-40-tinc-installed": ("fedora", "40", "fedora", [], "systemd", "tinc@NET.service",
                                 "tinc.service", "/etc/rc.d/rc.local"),
    "fedora-tincd-unit": ("fedora", "28", "fedora", [],
                          "systemd", "tincd@NET.service", None, "/etc/rc.d/rc.local"),
    "ubuntu-18.04": ("ubuntu", "18.04", "debian",
                     [APT + ("update",), APT + ("install", "-y", "tinc")],
                     "systemd", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
    "ubuntu-20.04": ("ubuntu", "20.04", "debian",
                     [APT + ("update",), APT + ("install", "-y", "tinc")],
                     "systemd", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
    "ubuntu-22.04": ("ubuntu", "22.04", "debian", [],
                     "systemd", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
    "ubuntu-24.04": ("ubuntu", "24.04", "debian",
                     [APT + ("update",), APT + ("install", "-y", "tinc")],
                     "systemd", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
    "debian-11": ("debian", "11", "debian",
                  [APT + ("update",), APT + ("install", "-y", "tinc")],
                  "sysv", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
    "debian-12": ("debian", "12", "debian",
                  [APT + ("update",), APT + ("install", "-y", "tinc")],
                  "systemd", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
    "debian-12-sysv": ("debian", "12", "debian", [],
                       "sysv", "tinc@NET.service", "tinc.service", "/etc/rc.local"),
}


def test_every_fixture_has_a_row():
    assert sorted(os.listdir(FIXTURE_SYSTEMS)) == sorted(ROWS)


@pytest.mark.parametrize("use_distro", [True, False], ids=["distro", "builtin"])
@pytest.mark.parametrize("system", sorted(ROWS))
def test_system_plan(system, use_distro):
    os_id, version, family, commands, init, unit, umbrella, rc_local = ROWS[system]
    facts = bootstrap.detect_system(os.path.join(FIXTURE_SYSTEMS, system), use_distro)
    assert (facts.os.id, facts.os.version, facts.family) == (os_id, version, family)
    assert list(bootstrap.plan_install(facts).commands) == commands
    assert bootstrap.resolve_init("auto", facts) == init
    assert bootstrap.service_unit(facts, "NET") == unit
    assert facts.umbrella_unit == umbrella
    assert facts.rc_local == rc_local


@pytest.mark.parametrize("system", sorted(ROWS))
def test_distro_and_builtin_parsers_agree(system):
    root = os.path.join(FIXTURE_SYSTEMS, system)
    with_distro = bootstrap._os_info_distro(root)
    assert with_distro is not None, "the distro package must be importable in the test env"
    assert with_distro == bootstrap._os_info_builtin(root)


def test_unknown_system_without_tinc_is_unsupported(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text("ID=plan9\nVERSION_ID=4\n")
    facts = bootstrap.detect_system(str(tmp_path), use_distro=False)
    with pytest.raises(bootstrap.BootstrapError) as err:
        bootstrap.plan_install(facts)
    assert err.value.code == bootstrap.EXIT_UNSUPPORTED


def test_systemd_boot_plan_enables_umbrella_and_instance():
    facts = bootstrap.detect_system(os.path.join(FIXTURE_SYSTEMS, "ubuntu-22.04"))
    plan = bootstrap.plan_boot("middle-earth", "systemd", facts)
    assert plan.commands == (("systemctl", "enable", "tinc.service"),
                             ("systemctl", "enable", "tinc@middle-earth.service"))
    assert plan.files == ()


@pytest.mark.parametrize("system", ["rocky-9-tinc-installed", "fedora-40-tinc-installed"])
def test_rpm_presets_are_overridden_by_enabling_the_umbrella_unit(system):
    facts = bootstrap.detect_system(os.path.join(FIXTURE_SYSTEMS, system))
    plan = bootstrap.plan_boot("middle-earth", "systemd", facts)
    assert plan.commands == (("systemctl", "enable", "tinc.service"),
                             ("systemctl", "enable", "tinc@middle-earth.service"))


def test_old_rpm_unit_name_is_detected():
    facts = bootstrap.detect_system(os.path.join(FIXTURE_SYSTEMS, "fedora-tincd-unit"))
    plan = bootstrap.plan_boot("vpn", "systemd", facts)
    assert plan.commands == (("systemctl", "enable", "tincd@vpn.service"),)


def test_centos6_rc_local_plan_is_executable_and_in_rc_d():
    facts = bootstrap.detect_system(os.path.join(FIXTURE_SYSTEMS, "centos-6"), False)
    plan = bootstrap.plan_boot("middle-earth", bootstrap.resolve_init("auto", facts), facts,
                               rc_local_text="#!/bin/sh\ntouch /var/lock/subsys/local\n")
    (spec,) = plan.files
    assert spec.path == "/etc/rc.d/rc.local" and spec.mode == 0o755
    assert spec.content == ("#!/bin/sh\ntouch /var/lock/subsys/local\n"
                            "tincd -n middle-earth\n")


def test_rc_local_line_goes_before_exit_0_and_only_once():
    debian = "#!/bin/sh -e\n#\n# rc.local\n\nexit 0\n"
    once = bootstrap.render_rc_local(debian, "middle-earth")
    assert once == "#!/bin/sh -e\n#\n# rc.local\n\ntincd -n middle-earth\nexit 0\n"
    assert bootstrap.render_rc_local(once, "middle-earth") == once
    assert bootstrap.render_rc_local(None, "x").count("tincd -n x") == 1
    assert bootstrap.remove_rc_local_line(once, "middle-earth") == debian


def test_nets_boot_adds_and_removes_once():
    text = bootstrap.render_nets_boot("## comment\nother\n", "vpn")
    assert text == "## comment\nother\nvpn\n"
    assert bootstrap.render_nets_boot(text, "vpn") == text
    assert bootstrap.render_nets_boot(text, "vpn", present=False) == "## comment\nother\n"


@pytest.mark.parametrize("init,expected", [("none", "none"), ("rc.local", "rc.local"),
                                           ("sysv", "sysv"), ("systemd", "systemd")])
def test_explicit_init_wins(init, expected):
    facts = bootstrap.detect_system(os.path.join(FIXTURE_SYSTEMS, "centos-6"))
    assert bootstrap.resolve_init(init, facts) == expected
