"""A Ray cluster of several hosts on one Linux machine: each host is a network namespace (its own
address on a private bridge) and a PID namespace (its own process tree, so killing a host kills
every process on it, and Ray finds only that host's raylet).

    spec = ClusterSpec(workers=2)                    # head 10.213.0.1, workers .2 and .3
    with LocalCluster(spec) as cluster:              # up(); always down() at the end
        cluster.run("head", ["uvit", "train", "digits"], env={"RAY_ADDRESS": cluster.gcs_address})
        cluster.kill("w1")                           # the whole host goes, as a lost machine would
        cluster.start("w1")                          # capacity back

The bridge's own address (``spec.subnet + ".254"``) is the machine itself as seen from the hosts:
a service bound there (a loopback S3 for the checkpoints) is reachable from every host. The
namespaces have no default route, so nothing in them can reach anything but the bridge's /24.

Needs root and iproute2 (``ip``) and util-linux (``unshare``, ``nsenter``). The hosts share the
machine's filesystem (a shared file system, as a real cluster mounts for its data).
``infra/local-cluster`` starts and stops one from a shell; ``tests/test_multihost.py`` uses it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClusterSpec", "LocalCluster", "leftovers", "main"]

# Ray's GCS declares a node dead after `threshold` health checks in a row fail, one every `period`
# (Ray's defaults: 3 s x 5). A killed host refuses at once, so it is noticed in about 10 s; a busy
# one gets 5 s per answer before a check counts as failed.
HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "10",
}
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
# The hosts share one hostname, which resolves to loopback: gloo would then offer its peers 127.0.0.1.
# Naming the interface makes it use the host's own address (a real cluster whose hostnames resolve to
# 127.0.1.1 needs the same, or NCCL_SOCKET_IFNAME for NCCL).
HOST_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster: a head (``<prefix>-head``, ``<subnet>.1``) and `workers` worker hosts
    (``<prefix>-w1`` ... at ``<subnet>.2`` ...), on the bridge ``<prefix>-br`` (``<subnet>.254``).

    head_cpus 0 keeps the head for drivers and the job API (Ray's usual head setup), so work
    lands on the workers, `worker_cpus` logical CPUs each. `env` reaches every process on every
    host (credentials of the S3 the checkpoints go to, say). Ray's files and each host's log go
    under `state_dir`. Each directory in `private` is, on every worker host, an empty tmpfs of its
    own (that host's local disk): what a task writes there never reaches the driver's view of that
    path, so a run that works with `private` output directories works without a shared filesystem."""

    prefix: str = "uvit"
    subnet: str = "10.213.0"
    workers: int = 2
    worker_cpus: int = 1
    head_cpus: int = 0
    gcs_port: int = 6379
    dashboard_port: int = 8265
    state_dir: Path = Path("/tmp/uvit-local-cluster")
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 120.0
    private: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= len(self.prefix) <= 6 or not self.prefix.isalnum():  # interface names: 15 characters
            raise ValueError(f"prefix must be 1 to 6 letters or digits, got {self.prefix!r}")
        if not 1 <= self.workers <= 200:
            raise ValueError(f"workers must be 1 to 200, got {self.workers}")
        ipaddress.ip_network(f"{self.subnet}.0/24")  # raises on a malformed subnet

    @property
    def hosts(self) -> list[str]:
        return ["head"] + [f"w{k}" for k in range(1, self.workers + 1)]

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    @property
    def gateway(self) -> str:
        """The machine itself, as the hosts see it."""
        return f"{self.subnet}.254"


class LocalCluster:
    """Bring a `ClusterSpec` up, run commands on its hosts, lose and restore hosts, tear it down."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.inits: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ addresses
    @property
    def gcs_address(self) -> str:
        """What ``RAY_ADDRESS`` is on a host for drivers (``ray.init()``)."""
        return f"{self.spec.address('head')}:{self.spec.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job API (``ray job submit --address``), reachable from the machine and every host."""
        return f"http://{self.spec.address('head')}:{self.spec.dashboard_port}"

    def netns(self, host: str) -> str:
        return f"{self.spec.prefix}-{host}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Make the network, then start the head and every worker and wait until Ray lists them all;
        on any failure, take down what was made."""
        _check_can_build(self.spec)
        try:
            self._network()
            self.start("head")
            for host in self.spec.hosts[1:]:
                self.start(host, wait=False)
            self.wait_for_nodes(len(self.spec.hosts))
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Kill every host's processes and remove the namespaces and links; then check nothing is left."""
        for host in self.spec.hosts:
            self.kill(host)
        for host in self.spec.hosts:
            _ip("netns", "del", self.netns(host), check=False)
        _ip("link", "del", f"{self.spec.prefix}-br", check=False)
        _wait(lambda: not leftovers(self.spec.prefix), self.spec.timeout_s, "the cluster's namespaces and links to go")

    def _network(self) -> None:
        spec, bridge = self.spec, f"{self.spec.prefix}-br"
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{spec.gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for host in spec.hosts:
            ns, link = self.netns(host), self.netns(host)
            _ip("netns", "add", ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", link, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{spec.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    # ------------------------------------------------------------------ hosts
    def start(self, host: str, *, wait: bool = True) -> None:
        """Start Ray on `host` (the head's GCS, dashboard and job API, or a worker that joins it), as the
        first process of a new PID namespace in the host's network namespace."""
        spec = self.spec
        temp = spec.state_dir / "ray" / host
        temp.mkdir(parents=True, exist_ok=True)
        ray = [str(Path(sys.executable).with_name("ray")), "start", "--block"]  # this environment's Ray
        ray += ["--node-ip-address", spec.address(host), "--temp-dir", str(temp), "--disable-usage-stats"]
        if host == "head":
            ray += ["--head", "--port", str(spec.gcs_port), "--num-cpus", str(spec.head_cpus)]
            ray += ["--dashboard-host", spec.address(host), "--dashboard-port", str(spec.dashboard_port)]
        else:
            ray += ["--address", self.gcs_address, "--num-cpus", str(spec.worker_cpus)]
        log = (spec.state_dir / f"{host}.log").open("ab")
        argv = ["ip", "netns", "exec", self.netns(host), "unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        self.inits[host] = subprocess.Popen(
            argv + self._with_private_dirs(host, ray),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,
        )
        log.close()
        if wait and host == "head":
            _wait(self._head_ready, spec.timeout_s, f"the Ray head at {self.dashboard_url}")
        elif wait:
            self.wait_for_nodes(self._running_hosts())

    def _with_private_dirs(self, host: str, argv: list[str]) -> list[str]:
        """`argv`, run after mounting a fresh tmpfs on each `spec.private` directory (worker hosts only; the
        mounts live in the host's own mount namespace and go with it)."""
        if host == "head" or not self.spec.private:
            return argv
        for d in self.spec.private:
            Path(d).mkdir(parents=True, exist_ok=True)
        mounts = " && ".join(f"mount -t tmpfs {self.netns(host)}-disk {shlex.quote(str(d))}" for d in self.spec.private)
        return ["sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]

    def kill(self, host: str) -> None:
        """Lose `host`: SIGKILL its PID namespace's first process, which takes every process on the host
        with it (the kernel's rule for a PID namespace), then wait until none is left."""
        if not _netns_exists(self.netns(host)):
            self._reap(host)
            return
        for pid in _netns_pids(self.netns(host)):
            _signal(pid, signal.SIGKILL)
        _wait(lambda: not _netns_pids(self.netns(host)), self.spec.timeout_s, f"every process on {host} to exit")
        self._reap(host)

    def _reap(self, host: str) -> None:
        init = self.inits.pop(host, None)
        if init is not None:
            init.wait(timeout=self.spec.timeout_s)

    def run(self, host: str, argv: Sequence[str], *, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        """Start `argv` on `host` (inside its network and PID namespaces, in this directory) and return it."""
        init = self._host_pid(host)
        enter = ["nsenter", "-t", str(init), "--net", "--pid", "--mount", f"--wd={os.getcwd()}", "--"]
        return subprocess.Popen(enter + list(argv), env=self._env(env), **popen)

    def _host_pid(self, host: str) -> int:
        """The pid (in this PID namespace) of `host`'s first process: the child of its `unshare`."""
        init = self.inits.get(host)
        if init is None or init.poll() is not None:
            raise RuntimeError(f"host {host} is not running")
        children = Path(f"/proc/{init.pid}/task/{init.pid}/children").read_text().split()
        if not children:
            raise RuntimeError(f"host {host} has no first process yet")
        return int(children[0])

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What every process on a host starts with: this environment, with its Python's scripts (`ray`,
        `uvit`) first on PATH, Ray's settings above, the spec's `env`, then `extra`."""
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        base = {**os.environ, "PATH": path, **QUIET_ENV, **HEALTH_CHECK_ENV, **HOST_ENV}
        return {**base, **self.spec.env, **(extra or {})}

    # ------------------------------------------------------------------ readiness
    def _head_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _running_hosts(self) -> int:
        return sum(1 for host in self.spec.hosts if host in self.inits and self.inits[host].poll() is None)

    def alive_nodes(self) -> int:
        """How many nodes Ray's GCS lists as alive (asked from the head)."""
        ask = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        p = self.run("head", [sys.executable, "-c", ask], env={"RAY_ADDRESS": self.gcs_address}, **_quiet())
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            return -1
        return int(out.split()[-1]) if p.returncode == 0 and out.split() else -1

    def wait_for_nodes(self, n: int) -> None:
        """Wait until exactly `n` nodes are alive (a lost host also counts once Ray has noticed)."""
        _wait(self._head_ready, self.spec.timeout_s, f"the Ray head at {self.dashboard_url}")
        _wait(lambda: self.alive_nodes() == n, self.spec.timeout_s, f"{n} alive Ray nodes")


# ---------------------------------------------------------------------------- system helpers
def _quiet() -> dict:
    return {"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL, "text": True}


def _ip(*args: str, check: bool = True) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _netns_exists(ns: str) -> bool:
    return Path("/run/netns", ns).exists()


def _netns_pids(ns: str) -> list[int]:
    p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(pid) for pid in p.stdout.split()] if p.returncode == 0 else []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait(done, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


def leftovers(prefix: str) -> list[str]:
    """What a cluster named `prefix` left on this machine: its namespaces, links, and processes."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    left = [f"netns {n}" for n in names if n.startswith(f"{prefix}-")]
    left += [f"pid {pid} in {n}" for n in names if n.startswith(f"{prefix}-") for pid in _netns_pids(n)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines()
    left += [
        f"link {line.split(':')[1].strip()}" for line in links if line.split(":")[1].strip().startswith(f"{prefix}-")
    ]
    return left


def _check_can_build(spec: ClusterSpec) -> None:
    """Refuse early, saying why: not root, no iproute2/util-linux, names or subnet already in use."""
    if os.geteuid() != 0:
        raise PermissionError("a local multi-host cluster needs root (network namespaces)")
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: install iproute2 and util-linux")
    if left := leftovers(spec.prefix):
        raise RuntimeError(
            f"a cluster named {spec.prefix!r} is already here ({', '.join(left[:5])}); "
            f"stop it first (`infra/local-cluster down --prefix {spec.prefix}`)"
        )
    net = ipaddress.ip_network(f"{spec.subnet}.0/24")
    routes = subprocess.run(["ip", "-o", "route", "show"], capture_output=True, text=True).stdout.splitlines()
    for route in routes:
        dest = route.split()[0]
        if dest != "default" and ipaddress.ip_network(dest, strict=False).overlaps(net):
            raise RuntimeError(f"subnet {net} is already routed here ({route}); choose another with --subnet")


# ---------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """`up` starts a cluster and leaves it running; `down` stops it; `status` lists what is there."""
    parser = argparse.ArgumentParser(
        prog="infra/local-cluster",
        description="A Ray head and worker hosts on this machine, each in its own network and PID namespace "
        "(needs root). Jobs: `ray job submit --address http://<subnet>.1:8265 -- uvit train digits`.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--prefix", default="uvit", help="names of the namespaces and links (default: uvit)")
    parser.add_argument("--subnet", default="10.213.0", help="the hosts' /24, first three octets (default: 10.213.0)")
    parser.add_argument("--workers", type=int, default=2, help="worker hosts (default: 2)")
    parser.add_argument("--worker-cpus", type=int, default=1, help="logical CPUs per worker host (default: 1)")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/uvit-local-cluster"), help="Ray files, logs")
    args = parser.parse_args(argv)
    spec = ClusterSpec(args.prefix, args.subnet, args.workers, args.worker_cpus, state_dir=args.state_dir)
    if args.action == "status":
        print(_status(spec) or f"no cluster named {spec.prefix!r}")
        return 0
    cluster = LocalCluster(spec)
    if args.action == "down":  # a new handle: the hosts are found by their namespaces
        cluster.down()
        print(f"stopped {spec.prefix!r}; nothing left")
        return 0
    t0 = time.perf_counter()
    cluster.up()
    hosts = {host: spec.address(host) for host in spec.hosts}
    print(json.dumps({"hosts": hosts, "job_api": cluster.dashboard_url, "gcs": cluster.gcs_address}, indent=1))
    print(f"up in {time.perf_counter() - t0:.1f} s; logs in {spec.state_dir}; stop with `infra/local-cluster down`")
    return 0


def _status(spec: ClusterSpec) -> str:
    """One line per host (address, processes) and the bridge, of what is on this machine now."""
    lines = []
    for host in spec.hosts:
        ns = f"{spec.prefix}-{host}"
        if _netns_exists(ns):
            lines.append(f"{host:<6} {ns:<12} {spec.address(host):<15} {len(_netns_pids(ns))} processes")
    if any(item == f"link {spec.prefix}-br" for item in leftovers(spec.prefix)):
        lines.append(f"bridge {spec.prefix}-br    {spec.gateway}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
