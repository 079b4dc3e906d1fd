"""A Ray cluster of real hosts on one machine: network namespaces joined by a bridge.

Each host is a network namespace with an address of its own (10.77.0.1 the head, .2, .3 ...), its
own Ray temp dir, and one `ray start --block` with token auth (the token in the environment: no
shared file). The bridge lives in a namespace of its own too, so nothing is added to this machine's
network: every address stays inside namespaces the harness makes. A host's link can go down
(`cut`), as when a machine vanishes without a word: its packets are dropped, nothing is refused.

It needs root and `ip netns` (`available()` says why not). Everything it starts runs inside its
namespaces, so `close()` finds exactly those processes (`ip netns pids`), stops them by id, and
deletes the namespaces, whatever happened.

    with Hosts(workers=2, worker_cpus=1) as hosts:
        proc = hosts.run(hosts.head, [python, "jobs/train_mnist.py", "--address", hosts.gcs, ...])
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.77.0"
GCS_PORT = 6379
DASHBOARD_PORT = 8265


@dataclass(frozen=True)
class Host:
    name: str  # the network namespace
    address: str
    temp_dir: Path


def available() -> str | None:
    """None where the harness can run here, else why not (a skip reason)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "`ip` (iproute2) is not installed"
    probe = f"mnprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class Hosts:
    """A head (no CPUs, dashboard on or off) and `workers` hosts of `worker_cpus` CPUs each."""

    def __init__(self, workers: int = 2, worker_cpus: int = 1, dashboard: bool = True,
                 timeout_s: float = 180):
        self.tag = f"mn{os.getpid()}{secrets.token_hex(2)}"  # unique to this harness
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp"))  # short: Ray's sockets live under it
        self.switch = f"{self.tag}sw"
        self.hosts = [Host(f"{self.tag}h{i}", f"{SUBNET}.{i + 1}", self.root / f"h{i}") for i in range(workers + 1)]
        self.worker_cpus, self.dashboard, self.timeout_s = worker_cpus, dashboard, timeout_s
        self.token = secrets.token_hex(32)
        self.starts: list[subprocess.Popen] = []
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))},
                    "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.ray = os.path.join(bin_dir, "ray")

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def gcs(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    def __enter__(self) -> "Hosts":
        try:
            self._network()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _network(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ip("netns", "add", host.name)
            ip("-n", self.switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
            ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.name, "link", "set", "eth0", "up")
            ip("-n", host.name, "link", "set", "lo", "up")

    def _start(self) -> None:
        head = ["--head", "--port", str(GCS_PORT), "--num-cpus", "0"]
        head += (["--dashboard-host", self.head.address, "--dashboard-port", str(DASHBOARD_PORT)]
                 if self.dashboard else ["--include-dashboard", "false"])
        self._ray_start(self.head, head)
        self.wait_for_nodes(1)
        for host in self.hosts[1:]:
            self._ray_start(host, ["--address", self.gcs, "--num-cpus", str(self.worker_cpus)])
        self.wait_for_nodes(len(self.hosts))

    def _ray_start(self, host: Host, flags: list[str]) -> None:
        host.temp_dir.mkdir(parents=True)
        log = open(host.temp_dir / "start.log", "wb")
        self.starts.append(subprocess.Popen(
            ["ip", "netns", "exec", host.name, self.ray, "start", "--block", "--node-ip-address", host.address,
             "--temp-dir", str(host.temp_dir), "--disable-usage-stats", *flags],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def popen(self, host: Host, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start argv on `host` (inside its namespace), with the cluster's token."""
        return subprocess.Popen(["ip", "netns", "exec", host.name, *argv], env={**self.env, **(env or {})},
                                start_new_session=True, **kwargs)

    def run(self, host: Host, argv: list[str], timeout: float, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run argv on `host` to the end; its output captured (stdout and stderr as a person sees them)."""
        proc = self.popen(host, argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{argv[:3]} on {host.name} ran past {timeout:g}s; it printed:\n{out[-3000:]}"
                                 f"\n{err[-3000:]}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def wait_for_nodes(self, count: int) -> None:
        """Until the head's GCS lists `count` live nodes (a fresh driver each try asks it)."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + self.timeout_s
        while True:
            for start in self.starts:
                if start.poll() is not None:
                    raise RuntimeError(f"`ray start` on a host exited ({start.returncode}); see {self.root}/*/start.log")
            asked = self.run(self.head, [sys.executable, "-c", probe, self.gcs], timeout=self.timeout_s)
            lines = asked.stdout.split()
            if asked.returncode == 0 and lines and int(lines[-1]) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} Ray nodes did not come up in {self.timeout_s:g}s: {asked.stderr[-2000:]}")
            time.sleep(1)

    def cut(self, host: Host) -> None:
        """Take the host's link down: it vanishes silently (packets dropped, no connection refused)."""
        ip("-n", self.switch, "link", "set", f"v{self.hosts.index(host)}", "down")

    def pids(self) -> list[int]:
        """Every process running in this harness's namespaces."""
        found = []
        for name in [host.name for host in self.hosts] + [self.switch]:
            listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            found += [int(pid) for pid in listed.stdout.split()]
        return found

    def close(self) -> None:
        """Stop every process in the namespaces (each `ray start` first, so it can stop its own),
        delete the namespaces, remove the temp dirs."""
        for start in self.starts:
            if start.poll() is None:
                os.kill(start.pid, signal.SIGTERM)  # `ip netns exec` became ray start (it execs)
        deadline = time.monotonic() + 15
        while any(start.poll() is None for start in self.starts) and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(5):
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for start in self.starts:
            if start.poll() is None:
                start.wait(timeout=10)
        for name in [host.name for host in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
