"""labkit: the lab and the test harnesses of tinc-hub (not shipped to hubs or nodes).

- ``labkit.netlab``: network namespaces and the NAT topology, hub and node drivers, the one
  namespace teardown and the one at-exit cleanup list, ``lab demo`` / ``lab cleanup``.
- ``labkit.nspawn``: booted Debian containers (systemd or SysV) in a netlab host's namespace.
- ``labkit.loopback_hub``: the real ``tinc-hub serve`` on 127.0.0.1 and a concurrent
  enrolment client (load tests, bench/).
- ``labkit.cli``: the ``lab`` command line (up, status, shell, down).
"""
