"""systemd/oteo.service: `systemd-analyze verify` and `security`, and the daemon in its sandbox.

systemd is not PID 1 here, so the sandbox is rebuilt from the unit's directives with the same
kernel mechanisms systemd uses, and the real `oteo run` is started inside it:

- `unshare --mount --ipc --uts`: a private mount namespace (PrivateMounts), IPC namespace
  (PrivateIPC) and host name namespace (ProtectHostname);
- in it, as root: every mount read-only (ProtectSystem=strict, ProtectKernelTunables,
  ProtectControlGroups), a writable state directory, read-only configuration and credential
  directories, an empty /tmp and /var/tmp (PrivateTmp), a /dev holding only the pseudo devices
  (PrivateDevices), an empty read-only /root and /home (ProtectHome), a new procfs with
  `hidepid=invisible` (ProtectProc=invisible; `subset=pid` too if the unit sets ProcSubset=pid);
- `setpriv`: uid/gid 65534 without groups (DynamicUser), no_new_privs (NoNewPrivileges), empty
  bounding, inheritable and ambient sets (CapabilityBoundingSet=, AmbientCapabilities=), the
  unit's UMask;
- libseccomp (through ctypes, as systemd uses it): the unit's SystemCallFilter= allow-list with
  SystemCallErrorNumber=, native architecture only (SystemCallArchitectures=native),
  MemoryDenyWriteExecute, RestrictAddressFamilies, RestrictNamespaces, RestrictSUIDSGID,
  LockPersonality (RestrictRealtime: the scheduler calls are in the filtered @resources).

The paths differ from a systemd install: everything the service sees of the test lives on a
tmpfs over /srv (/srv/etc = ConfigurationDirectory, /srv/state = StateDirectory,
/srv/credentials = LoadCredential's directory, /srv/notify = $NOTIFY_SOCKET's directory), and
ExecStart's /opt/oteo/venv/bin/oteo becomes this interpreter's `oteo`. The interpreter may live
under /root (pyenv), so that one directory is bound back into the emptied /root.

Not emulated: IPAddressDeny/IPAddressAllow (cgroup BPF), DevicePolicy (cgroup device
controller), MemoryMax/TasksMax (cgroup limits; the daemon's peak RSS and thread count are
checked against them instead), ProtectKernelModules/ProtectKernelLogs/ProtectClock beyond the
capabilities and system calls they remove, RemoveIPC.

This file is also the sandbox launcher: the tests run it as a script (`sandbox`, `seccomp` and
`probe` modes at the bottom).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import free_port, oteo_command, toml_text, wait_until

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "oteo.service"
DEMO_MODEL = REPO / "models" / "demo.onnx"
MAX_EXPOSURE = 2.0
UNIT_OTEO = "/opt/oteo/venv/bin/oteo"
UNIT_ETC = "/etc/oteo/"
SANDBOX = "/srv"  # an existing directory: the sandbox mounts its own tmpfs over it
SERVICE_UID = 65534
WATCHDOG_USEC = 2_000_000  # 2 s: the daemon pings every second
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT_S = 20.0


# -- the unit file -----------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of every section (keys do not repeat across our sections)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or line.startswith("["):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {raw!r}"
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_directives(UNIT.read_text(encoding="utf-8"))


def the(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, found {values}"
    return values[0]


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not found: install Debian's systemd package")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


def test_unit_has_the_required_directives(unit: dict[str, list[str]]) -> None:
    assert the(unit, "Type") == "notify"
    assert the(unit, "NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s", the(unit, "WatchdogSec"))
    assert the(unit, "Restart") == "on-failure"
    assert the(unit, "RestartPreventExitStatus") == "78"
    assert the(unit, "ExecStart") == f"{UNIT_OTEO} run --config {UNIT_ETC}oteo.toml"
    assert the(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert the(unit, "DynamicUser") == "yes"
    assert the(unit, "StateDirectory") == "oteo"
    assert the(unit, "ConfigurationDirectory") == "oteo"
    assert the(unit, "LoadCredential") == "mqtt-password:/etc/oteo/mqtt-password"
    assert the(unit, "MemoryMax") == "512M"
    assert the(unit, "ProtectSystem") == "strict"
    assert the(unit, "CapabilityBoundingSet") == ""
    assert the(unit, "IPAddressDeny") == "any"
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_verify_passes_with_an_existing_binary(tmp_path: Path) -> None:
    """verify insists that ExecStart's binary exists: the copy runs this environment's oteo."""
    script = Path(oteo_command()[0])
    assert script.name == "oteo", "no `oteo` console script beside this interpreter"
    text = UNIT.read_text(encoding="utf-8")
    assert UNIT_OTEO in text
    copy = tmp_path / "oteo.service"
    copy.write_text(text.replace(UNIT_OTEO, str(script)), encoding="utf-8")
    result = analyze("verify", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_of_the_committed_unit_only_misses_the_venv() -> None:
    result = analyze("verify", str(UNIT))
    if Path(UNIT_OTEO).exists():
        assert result.returncode == 0, result.stdout + result.stderr
        return
    complaints = (result.stdout + result.stderr).strip().splitlines()
    assert complaints == [
        f"oteo.service: Command {UNIT_OTEO} is not executable: No such file or directory"
    ]


def test_security_exposure_is_at_most_2() -> None:
    result = analyze(
        "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", str(UNIT)
    )
    found = re.search(r"Overall exposure level for oteo\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure = float(found.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


# -- retraining: oteo-retrain.service + oteo-retrain.timer ------------------------------------

RETRAIN = REPO / "systemd" / "oteo-retrain.service"
TIMER = REPO / "systemd" / "oteo-retrain.timer"
TRAIN_OTEO = "/opt/oteo/train-venv/bin/oteo"
# oteo.service settings the retraining unit deliberately does not share, and why.
RETRAIN_EXCEPTIONS = {
    "MemoryDenyWriteExecute",  # PyTorch's oneDNN generates its kernels at run time
    "IPAddressAllow",  # no network at all (PrivateNetwork=yes)
    "RestrictAddressFamilies",  # AF_UNIX only
    "LoadCredential",  # reads no secret
}
SANDBOX_KEYS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "DevicePolicy", "PrivateIPC",
    "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    "MemoryDenyWriteExecute", "NoNewPrivileges", "RemoveIPC", "CapabilityBoundingSet",
    "AmbientCapabilities", "SystemCallArchitectures", "SystemCallFilter",
    "SystemCallErrorNumber", "UMask", "DynamicUser", "StateDirectory", "StateDirectoryMode",
    "IPAddressDeny", "IPAddressAllow", "RestrictAddressFamilies", "LoadCredential",
)  # fmt: skip


def test_retrain_units_pass_verify_with_an_existing_training_environment(tmp_path: Path) -> None:
    """verify wants ExecStart's binary: the copies run this environment's oteo (it has torch)."""
    script = str(Path(oteo_command()[0]))
    for source in (RETRAIN, TIMER):
        text = source.read_text(encoding="utf-8").replace(TRAIN_OTEO, script)
        (tmp_path / source.name).write_text(text, encoding="utf-8")
    result = analyze("verify", str(tmp_path / RETRAIN.name), str(tmp_path / TIMER.name))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_retrain_service_is_skipped_without_the_training_environment() -> None:
    retrain = unit_directives(RETRAIN.read_text(encoding="utf-8"))
    assert the(retrain, "ConditionPathExists") == TRAIN_OTEO
    assert the(retrain, "ExecStart").startswith(f"{TRAIN_OTEO} retrain --store /var/lib/oteo/")
    assert "--promote" in the(retrain, "ExecStart")
    assert the(retrain, "Type") == "oneshot"
    timer = unit_directives(TIMER.read_text(encoding="utf-8"))
    assert the(timer, "OnCalendar") and the(timer, "Persistent") == "true"
    assert the(timer, "WantedBy") == "timers.target"


def test_retrain_service_is_hardened_like_oteo_service(unit: dict[str, list[str]]) -> None:
    retrain = unit_directives(RETRAIN.read_text(encoding="utf-8"))
    for key in SANDBOX_KEYS:
        if key in RETRAIN_EXCEPTIONS:
            continue
        assert retrain.get(key) == unit.get(key), f"{key}= differs from oteo.service"
    # The same dynamic user as the daemon: the recording and the live model are its files.
    assert the(retrain, "User") == "oteo" and the(retrain, "DynamicUser") == "yes"
    assert the(retrain, "PrivateNetwork") == "yes"
    assert "MemoryDenyWriteExecute" not in retrain
    result = analyze(
        "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", str(RETRAIN)
    )
    found = re.search(
        r"Overall exposure level for oteo-retrain\.service: (\d+\.\d+)", result.stdout
    )
    assert found, result.stdout + result.stderr
    print(f"oteo-retrain.service exposure: {found.group(1)}")
    assert float(found.group(1)) <= MAX_EXPOSURE and result.returncode == 0, result.stdout


TRAIN_CONV1D = """
from pathlib import Path
from training.data import from_array
from training.config import FitConfig
from training.config import ModelConfig
from training.config import TrainOptions
from training.pipeline import train
from training.simulator import CHANNELS, simulate

table = from_array(simulate(2000, seed=1).values, 1.0, channels=CHANNELS)
cfg = ModelConfig(channels=8, window=16, hidden=16, code_size=4, architecture="conv1d")
train(table, TrainOptions(model=cfg, fit=FitConfig(max_epochs=1, progress=False)), Path(OUT))
"""


def test_trainer_runs_under_the_retrain_units_system_call_filters(tmp_path: Path) -> None:
    """The unit's seccomp directives, built as systemd builds them, around a real training run
    (conv1d: the architecture whose oneDNN kernels MemoryDenyWriteExecute= would break)."""
    retrain = unit_directives(RETRAIN.read_text(encoding="utf-8"))
    families = the(retrain, "RestrictAddressFamilies").split()
    spec = {
        "allow": resolve_filter(retrain["SystemCallFilter"]),
        "errno": getattr(errno, the(retrain, "SystemCallErrorNumber")),
        "families": [int(getattr(socket, family)) for family in families],
        "mdwe": retrain.get("MemoryDenyWriteExecute") == ["yes"],
        "namespaces": the(retrain, "RestrictNamespaces") == "yes",
        "suid": the(retrain, "RestrictSUIDSGID") == "yes",
        "personality": the(retrain, "LockPersonality") == "yes",
    }
    out = tmp_path / "m.onnx"
    code = TRAIN_CONV1D.replace("OUT", repr(str(out)))
    result = subprocess.run(
        [sys.executable, __file__, "seccomp", json.dumps(spec), "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 0


# -- the sandbox, rebuilt from the unit ---------------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own @group tables (`systemd-analyze syscall-filter`)."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
        elif not line.strip():
            current = None
    assert "@system-service" in groups and "@default" in groups, "no syscall groups"
    return groups


def resolve_filter(values: list[str]) -> list[str]:
    """SystemCallFilter= lines as systemd combines them: allow-list minus `~` lines."""
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(entry) for entry in groups[name]))

    allowed: set[str] = set()
    for value in values:
        names = value.lstrip("~").split()
        members = set().union(*(expand(name) for name in names))
        allowed = allowed - members if value.startswith("~") else allowed | members
    # systemd always lets the service exec and exit.
    return sorted(allowed | {"execve", "exit", "exit_group", "rt_sigreturn", "sigreturn"})


TMPS = ("/tmp", "/var/tmp")


def spec_keep() -> list[str]:
    """What the sandbox binds back from under the home and temporary directories."""
    keep = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), REPO}
    tops = ("/root", "/home", *TMPS)
    return sorted(str(p) for p in keep if any(str(p).startswith(h + "/") for h in tops))


def sandbox_spec(
    unit: dict[str, list[str]], sources: dict[str, tuple[Path, bool]], env: dict[str, str]
) -> dict[str, Any]:
    families = the(unit, "RestrictAddressFamilies").split()
    homes = ("/root", "/home")
    environment = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/"}
    for assignment in unit.get("Environment", []):
        environment.update(item.split("=", 1) for item in assignment.split())
    environment.update(env)
    return {
        "binds": {name: [str(path), writable] for name, (path, writable) in sources.items()},
        # Hidden by ProtectHome or PrivateTmp, so bound back (CI may clone under /tmp).
        "keep": spec_keep(),
        "homes": list(homes),
        "python": sys.executable,
        "uid": SERVICE_UID,
        "umask": int(the(unit, "UMask"), 8),
        "proc": ",".join(
            [f"hidepid={the(unit, 'ProtectProc')}"]
            + (["subset=pid"] if unit.get("ProcSubset") == ["pid"] else [])
        ),
        "env": environment,
        "seccomp": {
            "allow": resolve_filter(unit["SystemCallFilter"]),
            "errno": getattr(errno, the(unit, "SystemCallErrorNumber")),
            "families": [int(getattr(socket, family)) for family in families],
            "mdwe": the(unit, "MemoryDenyWriteExecute") == "yes",
            "namespaces": the(unit, "RestrictNamespaces") == "yes",
            "suid": the(unit, "RestrictSUIDSGID") == "yes",
            "personality": the(unit, "LockPersonality") == "yes",
        },
    }


def sandbox_command(spec: dict[str, Any], command: list[str]) -> list[str]:
    return [
        "unshare",
        "--mount",
        "--ipc",
        "--uts",
        "--propagation",
        "private",
        "--",
        sys.executable,
        __file__,
        "sandbox",
        json.dumps(spec),
        "--",
        *command,
    ]


@pytest.fixture(scope="module")
def sandbox_support() -> None:
    """Fail fast, naming what is missing, where the sandbox cannot be built."""
    if os.geteuid() != 0:
        pytest.fail("the sandbox emulation needs root (mount namespaces, setpriv --reuid)")
    for tool in ("unshare", "setpriv", "mount", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found (util-linux / mosquitto)")
    if not os.path.isdir(SANDBOX):
        pytest.fail(f"{SANDBOX} does not exist: the sandbox needs it as a mount point")
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError as exc:
        pytest.fail(f"libseccomp.so.2 cannot be loaded ({exc}): install libseccomp2")
    check = subprocess.run(
        [
            "unshare",
            "--mount",
            "--ipc",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-ec",
            f"mount -n -t tmpfs none {SANDBOX}; mount -n -o remount,bind,ro /; "
            "mount -n -t proc -o hidepid=invisible proc /proc",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if check.returncode != 0:
        pytest.fail(f"cannot build the sandbox here (unshare/mount refused): {check.stderr}")


@dataclass
class Notice:
    at: float
    pid: int
    uid: int
    fields: dict[str, str]


class NotifyListener:
    """The service manager's side of sd_notify: a datagram socket that checks the sender."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.notices: list[Notice] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(str(path))
        path.chmod(0o777)  # like /run/systemd/notify: any service user may send
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds_size = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                continue
            pid = uid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _gid = struct.unpack("3i", payload[:creds_size])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.notices.append(Notice(time.monotonic(), pid, uid, fields))

    def all(self, key: str | None = None) -> list[Notice]:
        with self._lock:
            return [n for n in self.notices if key is None or key in n.fields]

    def wait(self, key: str, count: int = 1, timeout_s: float = 10.0) -> list[Notice]:
        found = wait_until(lambda: len(self.all(key)) >= count and self.all(key), timeout_s)
        assert found, f"no {count}x {key} notification in {timeout_s} s; got {self.all()}"
        return list(found)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def http_post(port: int, path: str, doc: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(port: int, name: str) -> float | None:
    status, body = http_get(port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def mounts_of(pid: int) -> dict[str, tuple[str, str, str]]:
    """Mount point -> (per-mount options, fs type, super options) as the process sees them."""
    seen: dict[str, tuple[str, str, str]] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        rest = fields[fields.index("-") + 1 :]
        seen[_unescape(fields[4])] = (fields[5], rest[0], rest[2])
    return seen


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


@dataclass
class SandboxDirs:
    etc: Path
    state: Path
    credentials: Path
    notify: Path

    @classmethod
    def make(cls, root: Path) -> SandboxDirs:
        root.mkdir(exist_ok=True)
        dirs = cls(root / "etc", root / "state", root / "credentials", root / "notify")
        for path in (dirs.etc, dirs.notify):
            path.mkdir(mode=0o755)
        for path in (dirs.state, dirs.credentials):
            path.mkdir(mode=0o700)
            os.chown(path, SERVICE_UID, SERVICE_UID)
        return dirs

    def sources(self) -> dict[str, tuple[Path, bool]]:
        return {
            "etc": (self.etc, False),
            "state": (self.state, True),
            "credentials": (self.credentials, False),
            "notify": (self.notify, False),
        }


def sandbox_env() -> dict[str, str]:
    return {
        "STATE_DIRECTORY": f"{SANDBOX}/state",
        "CREDENTIALS_DIRECTORY": f"{SANDBOX}/credentials",
        "NOTIFY_SOCKET": f"{SANDBOX}/notify/notify.sock",
    }


def service_config(dirs: SandboxDirs, broker_url: str, port: int) -> dict[str, Any]:
    """A config as an operator writes it for the unit: absolute paths, no state_dir."""
    shutil.copyfile(DEMO_MODEL, dirs.etc / "model.onnx")
    (dirs.etc / "model.onnx").chmod(0o644)
    return {
        "instance": "sandbox",
        "model": {"path": f"{SANDBOX}/etc/model.onnx", "onnx_threads": 1},
        "mqtt": {"url": broker_url, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        "http": {"bind": "127.0.0.1", "port": port},
    }


def write_config(dirs: SandboxDirs, config: dict[str, Any]) -> Path:
    path = dirs.etc / "oteo.toml"
    path.write_text(toml_text(config), encoding="utf-8")
    path.chmod(0o644)
    return path


def exec_start(unit: dict[str, list[str]]) -> list[str]:
    """The unit's ExecStart= with this environment's `oteo` and the sandbox's /etc/oteo."""
    words = the(unit, "ExecStart").split()
    assert words[0] == UNIT_OTEO
    return [*oteo_command(), *(word.replace(UNIT_ETC, f"{SANDBOX}/etc/") for word in words[1:])]


def test_sandbox_restrictions_hold(
    tmp_path: Path, unit: dict[str, list[str]], sandbox_support: None
) -> None:
    """A probe in the same sandbox: each emulated directive really restricts."""
    dirs = SandboxDirs.make(tmp_path)
    spec = sandbox_spec(unit, dirs.sources(), sandbox_env())
    result = subprocess.run(
        sandbox_command(spec, [sys.executable, __file__, "probe"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": CLEAN_PATH},
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    expected = {
        "uid": [SERVICE_UID, SERVICE_UID, []],
        "NoNewPrivs": "1",
        "CapBnd": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapAmb": "0000000000000000",
        "Seccomp": "2",
        "umask": "0o77",
        "write /usr": "EROFS",
        "write /etc": "EROFS",
        "write /sys/fs/cgroup": "EROFS",
        "write /srv/etc": "EROFS",
        "write /srv/state": "ok",
        "write /tmp": "ok",
        # PrivateTmp: empty, but for the test's own interpreter or checkout bound back in.
        "/tmp entries": sorted({Path(k).parts[2] for k in spec_keep() if k.startswith("/tmp/")}),
        "/home entries": [],
        "write /root": "EROFS",
        "/proc/cpuinfo": True,  # onnxruntime's cpuinfo needs it: no ProcSubset=pid
        "/proc/1": False,
        "/proc/self": True,
        "/dev/sda or vda": False,
        "/dev/null": True,
        "/sys/devices/system/cpu/online": True,
        "mmap W+X": "EPERM",
        "mmap X": "ok",
        "socket AF_NETLINK": "EAFNOSUPPORT",
        "socket AF_PACKET": "EAFNOSUPPORT",
        "socket AF_INET6": "ok",
        "sched_setaffinity": "EPERM",
        "setpriority": "EPERM",
        "unshare CLONE_NEWUSER": "EPERM",
        "chmod u+s": "EPERM",
        "personality": "EPERM",
        "sethostname": "EPERM",
        "mount": "EPERM",
        "thread": "ok",
    }
    assert {key: got.get(key) for key in expected} == expected


def test_bad_model_exits_78_in_the_sandbox(
    tmp_path: Path, unit: dict[str, list[str]], sandbox_support: None
) -> None:
    """RestartPreventExitStatus=78: what the daemon returns for a model it cannot use."""
    dirs = SandboxDirs.make(tmp_path)
    config = service_config(dirs, "mqtt://127.0.0.1:1", free_port())
    (dirs.etc / "model.onnx").write_bytes(b"not an onnx file")
    write_config(dirs, config)
    notify = NotifyListener(dirs.notify / "notify.sock")
    try:
        result = subprocess.run(
            sandbox_command(sandbox_spec(unit, dirs.sources(), sandbox_env()), exec_start(unit)),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={"PATH": CLEAN_PATH},
        )
    finally:
        notify.close()
    assert result.returncode == int(the(unit, "RestartPreventExitStatus")), result.stderr
    assert "model.onnx" in result.stderr
    assert not notify.all("READY")


@pytest.mark.timeout(90)
def test_daemon_serves_in_the_sandbox(
    tmp_path: Path, unit: dict[str, list[str]], make_broker: Any, sandbox_support: None
) -> None:
    # A broker that refuses anonymous clients: the daemon must read its credential.
    password = secrets.token_hex(16)
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "oteo", password],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o600)
    broker = make_broker(allow_anonymous=False, password_file=passwd)

    dirs = SandboxDirs.make(tmp_path / "service")
    credential = dirs.credentials / "mqtt-password"
    credential.write_text(password + "\n", encoding="utf-8")
    credential.chmod(0o400)  # as systemd hands credentials over: the service user's, 0400
    os.chown(credential, SERVICE_UID, SERVICE_UID)
    port = free_port()
    config = service_config(dirs, broker.url, port)
    config["mqtt"]["username"] = "oteo"
    config["mqtt"]["password_file"] = "${CREDENTIALS_DIRECTORY}/mqtt-password"
    config_path = write_config(dirs, config)
    command = exec_start(unit)
    notify = NotifyListener(dirs.notify / "notify.sock")
    env = {**sandbox_env(), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    spec = sandbox_spec(unit, dirs.sources(), env)
    log_path = tmp_path / "oteo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            sandbox_command(spec, command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={"PATH": CLEAN_PATH},
        )
    try:
        _exercise(proc, port, notify, dirs, config, config_path, unit)
    except BaseException:
        print(log_path.read_text(errors="replace")[-6000:])
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        notify.close()
    text = log_path.read_text(errors="replace")
    assert "sd_notify failed" not in text, text
    assert "Traceback" not in text, text
    assert "cpuinfo" not in text, text  # onnxruntime detected the CPU (see ProcSubset)


def _exercise(
    proc: subprocess.Popen[bytes],
    port: int,
    notify: NotifyListener,
    dirs: SandboxDirs,
    config: dict[str, Any],
    config_path: Path,
    unit: dict[str, list[str]],
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not notify.all("READY") and time.monotonic() < deadline:
        assert proc.poll() is None, f"oteo exited with {proc.returncode} before READY=1"
        time.sleep(0.05)
    assert notify.all("READY"), "no READY=1"
    # READY=1 means the model is loaded and HTTP is up: the first request must succeed.
    assert http_get(port, "/healthz")[0] == 200
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, 10), "MQTT not connected"

    # What the daemon process itself runs under (read from outside the sandbox).
    status = proc_status(proc.pid)
    assert status["Uid"].split() == [str(SERVICE_UID)] * 4
    assert status["Groups"] == ""
    assert (status["NoNewPrivs"], status["Seccomp"], status["Seccomp_filters"]) == ("1", "2", "2")
    assert status["CapBnd"] == status["CapEff"] == status["CapPrm"] == "0000000000000000"
    for ns in ("mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{proc.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    mounts = mounts_of(proc.pid)
    assert mounts["/"][0].startswith("ro")
    assert mounts["/proc"][1] == "proc" and "hidepid=invisible" in mounts["/proc"][2]
    assert mounts["/tmp"][1] == mounts["/dev"][1] == "tmpfs"
    assert mounts[f"{SANDBOX}/state"][0].startswith("rw")
    assert mounts[f"{SANDBOX}/etc"][0].startswith("ro")
    outbox = dirs.state / "outbox.sqlite3"
    assert outbox.exists() and outbox.stat().st_uid == SERVICE_UID
    assert outbox.stat().st_mode & 0o777 == 0o600  # UMask=0077

    # Every notification comes from the main process (NotifyAccess=main) as the service user.
    senders = {(n.pid, n.uid) for n in notify.all()}
    assert senders == {(proc.pid, SERVICE_UID)}

    # WATCHDOG=1 every WatchdogSec/2 from the main loop.
    pings = notify.wait("WATCHDOG", count=3, timeout_s=6)
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert all(0.5 < gap < 1.8 for gap in gaps), gaps

    # Inference runs in the sandbox (no W+X memory, no scheduler calls).
    window = [[0.0] * 8 for _ in range(32)]
    code, reply = http_post(port, "/v1/ops/score", {"windows": [window, window]})
    assert code == 200 and len(reply["score"]) == 2, reply

    # SIGHUP (ExecReload) re-reads config and model; two ORT threads now.
    config["model"]["onnx_threads"] = 2
    config_path.write_text(toml_text(config), encoding="utf-8")
    before = len(notify.all("READY"))
    proc.send_signal(signal.SIGHUP)
    notify.wait("RELOADING")
    notify.wait("READY", count=before + 1)
    reloads = wait_until(lambda: metric(port, 'oteo_model_reloads_total{result="ok"}'), 10)
    assert reloads == 1.0
    code, reply = http_post(port, "/v1/ops/score", {"windows": [window]})
    assert code == 200 and len(reply["score"]) == 1, reply

    # MemoryMax and TasksMax leave room: peak RSS and threads measured from outside.
    status = proc_status(proc.pid)
    peak_rss = int(status["VmHWM"].split()[0]) * 1024
    memory_max = int(the(unit, "MemoryMax").rstrip("M")) * 1024 * 1024
    print(f"peak RSS {peak_rss / 2**20:.0f} MiB, {status['Threads']} threads")
    assert peak_rss < memory_max / 2
    assert int(status["Threads"]) < int(the(unit, "TasksMax")) / 2

    # SIGTERM: STOPPING=1, then exit 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert notify.all("STOPPING"), "no STOPPING=1"
    assert {(n.pid, n.uid) for n in notify.all()} == {(proc.pid, SERVICE_UID)}


# -- script modes: run by the tests above, inside the sandbox ----------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", "--no-mtab", *args], check=True)


def _enter_sandbox(spec: dict[str, Any], command: list[str]) -> None:
    """As root in fresh mount/IPC/UTS namespaces: build the file system view, drop to the user."""
    # Stage what the service needs from /tmp and /root on a tmpfs before those are hidden.
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "oteo-sandbox", SANDBOX)
    for name, (source, writable) in spec["binds"].items():
        target = f"{SANDBOX}/{name}"
        os.mkdir(target)
        _mount("--bind", source, target)
        if not writable:
            _mount("-o", "remount,bind,ro,nosuid,nodev,noexec", target)
    for index, keep in enumerate(spec["keep"]):
        os.makedirs(f"{SANDBOX}/.keep/{index}")
        _mount("--bind", keep, f"{SANDBOX}/.keep/{index}")
        _mount("-o", "remount,bind,ro", f"{SANDBOX}/.keep/{index}")
    # PrivateDevices: only the pseudo devices.
    dev = f"{SANDBOX}/.dev"
    os.mkdir(dev)
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,noexec", "oteo-dev", dev)
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        Path(f"{dev}/{node}").touch()
        _mount("--bind", f"/dev/{node}", f"{dev}/{node}")
    os.mkdir(f"{dev}/shm")
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,noexec", "oteo-shm", f"{dev}/shm")
    for index, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{index}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", f"{dev}/fd")

    # ProtectSystem=strict (+ ProtectKernelTunables, ProtectControlGroups for /sys): every
    # mount read-only but the API file systems /proc and /dev, and the staging tmpfs.
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        targets.append((_unescape(fields[4]), fields[5]))
    for target, options in sorted(set(targets), key=lambda item: item[0].count("/")):
        if any(target == top or target.startswith(top + "/") for top in ("/proc", "/dev", SANDBOX)):
            continue
        flags = [flag for flag in options.split(",") if flag in ("nosuid", "nodev", "noexec")]
        _mount("-o", ",".join(["remount", "bind", "ro", *flags]), target)

    _mount("--move", dev, "/dev")
    # ProtectHome: empty, read-only; an interpreter that lives there is bound back.
    for home in spec["homes"]:
        if os.path.isdir(home):
            _mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "oteo-home", home)
    # PrivateTmp
    for tmp in TMPS:
        if os.path.isdir(tmp):
            _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "oteo-tmp", tmp)
    for index, keep in enumerate(spec["keep"]):
        os.makedirs(keep, exist_ok=True)
        _mount("--move", f"{SANDBOX}/.keep/{index}", keep)
    for home in spec["homes"]:
        if os.path.isdir(home):
            _mount("-o", "remount,bind,ro,nosuid,nodev", home)
    _mount("-o", "remount,bind,ro,nosuid,nodev", SANDBOX)
    # ProtectProc=invisible (and ProcSubset=pid if set)
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec," + spec["proc"], "proc", "/proc")

    env = dict(spec["env"])
    if "WATCHDOG_USEC" in env:
        env["WATCHDOG_PID"] = str(os.getpid())  # the exec chain keeps this pid
    os.umask(spec["umask"])
    os.chdir("/")
    uid = str(spec["uid"])
    setpriv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    stage2 = [spec["python"], __file__, "seccomp", json.dumps(spec["seccomp"]), "--", *command]
    os.execvpe("setpriv", setpriv + stage2, env)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 1, 4, 5, 7
AF_MAX = 46
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


def _seccomp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _install_seccomp(spec: dict[str, Any]) -> None:
    """The unit's seccomp-based directives, built with libseccomp as systemd builds them."""
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def rule(ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call of this architecture
        array = (_ArgCmp * len(cmps))(*(_ArgCmp(*c) for c in cmps)) if cmps else None
        rc = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}")

    def load(ctx: int) -> None:
        rc = lib.seccomp_load(ctx)
        lib.seccomp_release(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load")

    eperm = _seccomp_errno(errno.EPERM)
    # Argument checks, in a default-allow filter (systemd installs one filter per directive).
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if spec["mdwe"]:
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        for name in ("mmap", "mmap2"):
            rule(ctx, eperm, name, (2, SCMP_CMP_MASKED_EQ, wx, wx))
        for name in ("mprotect", "pkey_mprotect"):
            rule(ctx, eperm, name, (2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        rule(ctx, eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, 0o100000, 0o100000))  # SHM_EXEC
    refused = _seccomp_errno(errno.EAFNOSUPPORT)
    for family in range(AF_MAX):
        if family not in spec["families"]:
            rule(ctx, refused, "socket", (0, SCMP_CMP_EQ, family, 0))
    rule(ctx, refused, "socket", (0, SCMP_CMP_GE, AF_MAX, 0))
    if spec["namespaces"]:
        for flag in NAMESPACE_FLAGS:
            for name in ("unshare", "clone"):
                rule(ctx, eperm, name, (0, SCMP_CMP_MASKED_EQ, flag, flag))
        rule(ctx, eperm, "setns")
        rule(ctx, _seccomp_errno(errno.ENOSYS), "clone3")  # flags unreadable: glibc falls back
    if spec["suid"]:
        for name, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2)):
            for bit in (0o4000, 0o2000):
                rule(ctx, eperm, name, (arg, SCMP_CMP_MASKED_EQ, bit, bit))
    if spec["personality"]:
        rule(ctx, eperm, "personality", (0, SCMP_CMP_NE, 0, 0))  # PER_LINUX only
    load(ctx)
    # SystemCallFilter= (allow-list) with SystemCallErrorNumber=; native architecture only
    # (libseccomp kills calls from other ABIs by default). Loaded last: it refuses seccomp().
    ctx = lib.seccomp_init(_seccomp_errno(spec["errno"]))
    for name in spec["allow"]:
        rule(ctx, SCMP_ACT_ALLOW, name)
    load(ctx)


def _attempt(call: Any) -> str:
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    if isinstance(result, int) and result < 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    if hasattr(result, "close"):
        result.close()
    return "ok"


def _write(directory: str) -> str:
    def call() -> None:
        path = Path(directory) / f"probe-{os.getpid()}"
        path.write_text("x")
        path.unlink()

    return _attempt(call)


def _probe() -> dict[str, Any]:
    """Inside the sandbox: what each restriction allows. Printed as JSON for the test."""
    libc = ctypes.CDLL(None, use_errno=True)
    status = dict(
        (key, value.strip())
        for key, _, value in (
            line.partition(":") for line in Path("/proc/self/status").read_text().splitlines()
        )
    )
    state = Path(os.environ["STATE_DIRECTORY"])
    suid_file = state / "suid"
    suid_file.write_text("x")
    umask = os.umask(0o077)
    thread_ok: list[bool] = []
    worker = threading.Thread(target=lambda: thread_ok.append(True))
    worker.start()
    worker.join()
    found = {
        "uid": [os.getuid(), os.getgid(), os.getgroups()],
        **{key: status.get(key) for key in ("NoNewPrivs", "CapBnd", "CapEff", "CapAmb")},
        "Seccomp": status.get("Seccomp"),
        "umask": oct(umask),
        **{
            f"write {d}": _write(d)
            for d in ("/usr", "/etc", "/sys/fs/cgroup", f"{SANDBOX}/etc", str(state), "/tmp")
        },
        "write /root": _write("/root"),
        "/tmp entries": sorted(os.listdir("/tmp")),
        "/home entries": sorted(os.listdir("/home")) if os.path.isdir("/home") else [],
        "/proc/cpuinfo": os.path.exists("/proc/cpuinfo"),
        "/proc/1": os.path.exists("/proc/1"),
        "/proc/self": os.path.exists("/proc/self/status"),
        "/dev/sda or vda": any(os.path.exists(f"/dev/{d}") for d in ("sda", "vda", "nvme0")),
        "/dev/null": os.path.exists("/dev/null"),
        "/sys/devices/system/cpu/online": os.path.exists("/sys/devices/system/cpu/online"),
        "mmap W+X": _attempt(
            lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        ),
        "mmap X": _attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)),
        "socket AF_NETLINK": _attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
        "socket AF_PACKET": _attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
        "socket AF_INET6": _attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM)),
        "sched_setaffinity": _attempt(lambda: os.sched_setaffinity(0, {0})),
        "setpriority": _attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 1)),
        "unshare CLONE_NEWUSER": _attempt(lambda: libc.unshare(0x10000000)),
        "chmod u+s": _attempt(lambda: os.chmod(suid_file, 0o4755)),
        "personality": _attempt(lambda: libc.personality(0x0008)),
        "sethostname": _attempt(lambda: socket.sethostname("probe")),
        "mount": _attempt(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        "thread": "ok" if thread_ok else "failed",
    }
    suid_file.unlink()
    return found


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "sandbox":
        _enter_sandbox(json.loads(rest[0]), rest[2:])
    elif mode == "seccomp":
        _install_seccomp(json.loads(rest[0]))
        os.execv(rest[2], rest[2:])
    elif mode == "probe":
        print(json.dumps(_probe()))
    else:
        sys.exit(f"unknown mode {mode}")
