"""Programs the test suite runs on this host, and the Debian packages that have them.

`scripts/setup-test-env` installs the packages (`python3 tests/host_program.py` prints the ones
missing here); a test that runs a program calls `require(name)` and fails, naming the package,
when it is absent, rather than skipping and hiding what it did not check.
"""

from __future__ import annotations

import glob
import os
import shutil

# program -> Debian package
PROGRAMS = {
    "mosquitto": "mosquitto",  # a real broker for every MQTT test
    "mosquitto_passwd": "mosquitto",  # broker users for the auth and deploy tests
    "promtool": "prometheus",  # metric exposition, alert rules and their unit tests
    "prometheus": "prometheus",  # the dashboards' queries against a real Prometheus
    "amtool": "prometheus-alertmanager",  # the Alertmanager config and its routes
    "docker-compose": "docker-compose",  # parses deploy/compose.yaml (no container engine)
    "sqlite3": "sqlite3",  # the README's copy of a live recording
    "openssl": "openssl",  # TLS certificates for the TLS tests
    "curl": "curl",  # the README's metrics command and the operations page's requests
    "mosquitto_rr": "mosquitto-clients",  # the operations page's MQTT requests
    "systemd-analyze": "systemd",  # verifies the systemd units
    "unshare": "util-linux",  # network namespaces (partitions) and the systemd sandbox
    "setpriv": "util-linux",  # the systemd sandbox's user switch
    "mount": "mount",  # small tmpfs disks (a full disk under the outbox)
    "umount": "mount",
    "ip": "iproute2",  # a namespace's loopback taken down
    "nats-server": "nats-server",  # partitions: MQTT listener, JetStream and subject mapping
}
# file pattern -> Debian package: libraries and plugins the tests load
FILES = {
    "/usr/lib/*/libseccomp.so.2": "libseccomp2",  # the systemd sandbox's seccomp filters
    "/usr/lib/*/mosquitto_dynamic_security.so": "mosquitto",  # SUBACK refusals
}
SBIN = ("/usr/sbin", "/sbin")  # not on a normal user's PATH on Debian
SETUP = "scripts/setup-test-env"


def find(name: str) -> str | None:
    """The program's path on PATH or in the sbin directories; None if absent."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def require(name: str) -> str:
    """The program's path; the test fails, naming the package to install, if it is absent."""
    path = find(name)
    if path is None:
        import pytest

        pytest.fail(f"{name} not found: run {SETUP} (installs Debian's {PROGRAMS[name]})")
    return path


def require_file(pattern: str) -> str:
    """The first file matching one of FILES' patterns; fails like `require` if there is none."""
    found = sorted(glob.glob(pattern))
    if not found:
        import pytest

        pytest.fail(f"{pattern} not found: run {SETUP} (installs Debian's {FILES[pattern]})")
    return found[0]


def missing_packages() -> list[str]:
    """Debian packages whose programs or files are absent here."""
    missing = {package for name, package in PROGRAMS.items() if find(name) is None}
    missing |= {package for pattern, package in FILES.items() if not glob.glob(pattern)}
    return sorted(missing)


if __name__ == "__main__":
    print(" ".join(missing_packages()))
