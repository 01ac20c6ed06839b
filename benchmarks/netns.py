"""Throwaway Linux network namespaces (and an nginx inside one) for tests and benchmarks.

This module is standard-library only.  It wraps ``ip netns`` so that a test or
benchmark can get a private, isolated loopback interface, tune it (MTU,
segmentation/receive offloads), run programs inside it and be sure that
everything is torn down afterwards::

    from netns import Netns, netns_available, start_nginx

    ok, why = netns_available()
    if not ok:
        raise SystemExit(f"cannot create network namespaces: {why}")

    with Netns(mtu=1500, offloads=False) as ns:
        server = start_nginx(ns, "/tmp/docroot", port=8080, workdir="/tmp/work")
        ns.run(["curl", "-s", "http://127.0.0.1:8080/"], check=True)
        server.stop()
    # the namespace and every process still running inside it are gone here

Rules this module follows (and that its callers should follow too):

* Traffic stays inside the namespace: the namespace only has ``lo``; nothing
  in here creates veth pairs, routes or addresses that reach the host or the
  outside world.
* Every namespace gets a unique name (``<prefix>-<pid>-<random>``), so
  parallel runs never collide and a stale namespace from a crashed run is
  easy to spot (``ip netns list``).
* Cleanup always happens: on ``with`` exit (normal, exception, Ctrl-C), and as
  a fallback at interpreter exit (``atexit``).  Cleanup kills the processes
  still living in the namespace (SIGTERM, then SIGKILL) before
  ``ip netns del``.  Only those processes are signalled, by pid.
* Children started with :meth:`Netns.popen` get their own session by default,
  so a Ctrl-C in the terminal reaches only the Python driver, which can then
  shut the children down in an orderly way (e.g. let tcpdump flush its file).

Requirements: root (CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2; ``ethtool`` for
offload control; ``nginx`` for :func:`start_nginx`.
"""

from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "Netns",
    "NetnsError",
    "NginxServer",
    "netns_available",
    "start_nginx",
]

IP = shutil.which("ip") or "/usr/sbin/ip"

# Offload features we try to toggle on lo.  Some are "[fixed]" on loopback
# (lro usually is); ethtool then just reports it cannot change them.
OFFLOAD_FEATURES = ("gro", "gso", "tso", "lro")


class NetnsError(RuntimeError):
    """A namespace operation failed."""


def _cmd_list(cmd: str | Sequence[str]) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    return [str(c) for c in cmd]


def netns_available() -> tuple[bool, str]:
    """Tell whether this process can create and use network namespaces.

    Returns ``(True, "ok")`` or ``(False, reason)``.  The check is real: it
    creates a probe namespace, runs ``ip link set lo up`` in it and deletes it.
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "not running as root (ip netns needs CAP_SYS_ADMIN/CAP_NET_ADMIN)"
    if not os.path.exists(IP):
        return False, "iproute2 'ip' command not found"
    name = f"replay-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        r = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return False, f"'ip netns add' failed: {r.stderr.strip() or r.returncode}"
        r = subprocess.run([IP, "netns", "exec", name, IP, "link", "set", "lo", "up"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return False, f"'ip netns exec' failed: {r.stderr.strip() or r.returncode}"
        return True, "ok"
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"ip netns unusable: {exc}"
    finally:
        subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=10)


class Netns:
    """A uniquely named, throwaway network namespace with ``lo`` up.

    Parameters
    ----------
    name_prefix:
        Prefix of the namespace name; the full name is ``prefix-PID-RANDOM``.
    mtu:
        If given, MTU of ``lo`` inside the namespace (e.g. 1500 to see
        Ethernet-sized segments instead of 64 KiB loopback packets).
    offloads:
        ``None`` leaves the defaults, ``False`` turns gro/gso/tso/lro off,
        ``True`` turns them on (where the driver allows it).  The outcome is in
        :attr:`offload_report`.

    Use it as a context manager; :meth:`close` is idempotent and also runs
    at interpreter exit if the ``with`` block was never left normally.
    """

    def __init__(self, name_prefix: str = "replay", *, mtu: int | None = None,
                 offloads: bool | None = None) -> None:
        self.name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.mtu = mtu
        self.offloads = offloads
        self.offload_report: str = ""
        self._created = False
        self._children: list[subprocess.Popen] = []

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> "Netns":
        self.create()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def create(self) -> "Netns":
        """Create the namespace, bring ``lo`` up, apply MTU and offloads."""
        if self._created:
            return self
        r = subprocess.run([IP, "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise NetnsError(f"ip netns add {self.name}: {r.stderr.strip()}")
        self._created = True
        atexit.register(self.close)
        try:
            self.run([IP, "link", "set", "lo", "up"], check=True, capture_output=True)
            if self.mtu is not None:
                self.set_mtu(self.mtu)
            if self.offloads is not None:
                self.set_offloads(self.offloads)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill whatever still runs in the namespace and delete it."""
        if not self._created:
            return
        self._created = False
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
        # 1. our own children: polite first
        for p in self._children:
            if p.poll() is None:
                _signal(p.pid, signal.SIGTERM)
        _wait_all(self._children, 3.0)
        for p in self._children:
            if p.poll() is None:
                _signal(p.pid, signal.SIGKILL)
        _wait_all(self._children, 2.0)
        # 2. anything else living in the namespace (e.g. nginx workers)
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                _signal(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.pids():
                time.sleep(0.05)
        subprocess.run([IP, "netns", "del", self.name], capture_output=True)

    # -- configuration ---------------------------------------------------
    def set_mtu(self, mtu: int) -> None:
        self.run([IP, "link", "set", "dev", "lo", "mtu", str(int(mtu))],
                 check=True, capture_output=True)
        self.mtu = mtu

    def set_offloads(self, on: bool, features: Iterable[str] = OFFLOAD_FEATURES) -> str:
        """Switch offloads on ``lo`` on/off one by one; return a short report.

        Features fixed by the driver (lro on lo) cannot change; that is noted,
        not raised.  The report also lists what ``ethtool -k`` says afterwards.
        """
        if not shutil.which("ethtool"):
            self.offload_report = "ethtool not installed; offloads unchanged"
            return self.offload_report
        state = "on" if on else "off"
        notes = []
        for feat in features:
            r = self.run(["ethtool", "-K", "lo", feat, state], capture_output=True, text=True)
            msg = (r.stderr or r.stdout).strip().replace("\n", " ")
            if r.returncode != 0 or msg:
                notes.append(f"{feat}: rc={r.returncode} {msg}".strip())
        now = self.offload_state()
        self.offload_report = (
            "requested " + state + ": "
            + ", ".join(f"{k}={v}" for k, v in now.items())
            + (" (" + "; ".join(notes) + ")" if notes else "")
        )
        return self.offload_report

    def offload_state(self) -> dict[str, str]:
        """Current gro/gso/tso/lro state of ``lo`` as reported by ``ethtool -k``."""
        long_names = {
            "tcp-segmentation-offload": "tso",
            "generic-segmentation-offload": "gso",
            "generic-receive-offload": "gro",
            "large-receive-offload": "lro",
        }
        r = self.run(["ethtool", "-k", "lo"], capture_output=True, text=True)
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            key, _, val = line.strip().partition(":")
            if key in long_names:
                out[long_names[key]] = val.strip()
        return out

    def link_mtu(self) -> int:
        r = self.run(["cat", "/sys/class/net/lo/mtu"], capture_output=True, text=True, check=True)
        return int(r.stdout.strip())

    # -- running things --------------------------------------------------
    def argv(self, cmd: str | Sequence[str]) -> list[str]:
        """The argv that runs *cmd* inside the namespace."""
        return [IP, "netns", "exec", self.name, *_cmd_list(cmd)]

    def run(self, cmd: str | Sequence[str], **kw) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the namespace (a str is run by /bin/sh)."""
        if not self._created:
            raise NetnsError(f"namespace {self.name} does not exist")
        return subprocess.run(self.argv(cmd), **kw)

    def popen(self, cmd: str | Sequence[str], **kw) -> subprocess.Popen:
        """``subprocess.Popen`` inside the namespace.

        ``ip netns exec`` execs the command, so ``Popen.pid`` is the command's
        own pid.  The child gets its own session (``start_new_session=True``)
        unless told otherwise, and is killed by :meth:`close` if still alive.
        """
        if not self._created:
            raise NetnsError(f"namespace {self.name} does not exist")
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.argv(cmd), **kw)
        self._children.append(p)
        return p

    def pids(self) -> list[int]:
        """Pids of all processes whose network namespace is this one."""
        r = subprocess.run([IP, "netns", "pids", self.name], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split() if x.isdigit()]

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> bool:
        """Wait until a TCP connect to host:port inside the namespace succeeds."""
        probe = textwrap.dedent(f"""
            import socket, sys, time
            end = time.monotonic() + {float(timeout)!r}
            while time.monotonic() < end:
                try:
                    socket.create_connection(({host!r}, {int(port)}), timeout=0.5).close()
                    sys.exit(0)
                except OSError:
                    time.sleep(0.05)
            sys.exit(1)
        """)
        r = self.run([sys.executable, "-c", probe], timeout=timeout + 5)
        return r.returncode == 0

    def __repr__(self) -> str:
        return f"Netns({self.name!r}, mtu={self.mtu}, offloads={self.offloads})"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


# ----------------------------------------------------------------------
# nginx
# ----------------------------------------------------------------------

ACCESS_LOG_FORMAT = '$remote_addr:$remote_port [$time_local] "$request" $status $body_bytes_sent $request_length'


class NginxServer:
    """A running nginx inside a :class:`Netns` (see :func:`start_nginx`)."""

    def __init__(self, ns: Netns, proc: subprocess.Popen, workdir: Path, port: int) -> None:
        self.ns = ns
        self.proc = proc
        self.workdir = workdir
        self.port = port
        self.conf_path = workdir / "nginx.conf"
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        self.pid_path = workdir / "nginx.pid"

    def access_log_lines(self) -> int:
        try:
            with open(self.access_log, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful stop (SIGQUIT: finish in-flight requests, flush logs), then force."""
        if self.proc.poll() is None:
            _signal(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    _signal(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(3)
        return self.proc.returncode

    def __enter__(self) -> "NginxServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _reachable_by_others(path: Path) -> bool:
    """Whether a user who is neither the owner nor in the group can reach *path* (x on every
    directory above it, r and x on the directory itself)."""
    path = path.resolve()
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in (path, *path.parents))


def _worker_user(root_dir: str | os.PathLike) -> str:
    """An unprivileged user for nginx workers when we run as root; root itself when the docroot
    lies below a directory only its owner can enter (pytest's ``tmp_path`` does: every file would
    be a 403 or 404, and a client waiting for a body would wait for nothing)."""
    if not _reachable_by_others(Path(root_dir)):
        return "root"
    for user in ("www-data", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    return "root"


def nginx_conf(root_dir: str | os.PathLike, port: int, workdir: str | os.PathLike, *,
               workers: int = 1, extra_server: str = "", extra_http: str = "") -> str:
    """Render the minimal nginx.conf used by :func:`start_nginx`.

    * ``location /`` serves *root_dir* as static files (ETag/Last-Modified, so
      conditional requests give 304, Range gives 206).
    * ``location /gz/`` always gzips (``gzip_min_length 0``) and so answers
      HTTP/1.1 clients with ``Transfer-Encoding: chunked`` +
      ``Content-Encoding: gzip`` when they send ``Accept-Encoding: gzip``.
    * gzip is on for text and JSON everywhere else too.
    """
    workdir = Path(workdir)
    user = f"user {_worker_user(root_dir)};" if os.geteuid() == 0 else ""
    return textwrap.dedent(f"""\
        # generated by benchmarks/netns.py -- throwaway config, do not edit
        {user}
        daemon off;
        master_process on;
        worker_processes {int(workers)};
        pid {workdir}/nginx.pid;
        error_log {workdir}/error.log warn;

        events {{
            worker_connections 4096;
        }}

        http {{
            include /etc/nginx/mime.types;
            default_type application/octet-stream;

            log_format replay '{ACCESS_LOG_FORMAT}';
            access_log {workdir}/access.log replay;

            client_body_temp_path {workdir}/tmp/body;
            proxy_temp_path {workdir}/tmp/proxy;
            fastcgi_temp_path {workdir}/tmp/fastcgi;
            uwsgi_temp_path {workdir}/tmp/uwsgi;
            scgi_temp_path {workdir}/tmp/scgi;

            sendfile on;
            tcp_nopush on;
            keepalive_timeout 65;
            keepalive_requests 100000;
            client_max_body_size 8m;
            client_body_buffer_size 256k;

            gzip on;
            gzip_vary on;
            gzip_min_length 256;
            gzip_types text/plain text/css text/xml application/json application/javascript;

            {extra_http}

            server {{
                listen 127.0.0.1:{int(port)} reuseport;
                server_name localhost;
                root {root_dir};

                location / {{
                    try_files $uri $uri/ =404;
                }}

                # chunked + gzip: gzip drops Content-Length, HTTP/1.1 => chunked
                location /gz/ {{
                    gzip on;
                    gzip_min_length 0;
                    gzip_comp_level 1;
                    gzip_types text/plain text/csv application/json;
                    chunked_transfer_encoding on;
                }}

                {extra_server}
            }}
        }}
        """)


def start_nginx(ns: Netns, root_dir: str | os.PathLike, port: int = 8080,
                workdir: str | os.PathLike | None = None, *, workers: int = 1,
                extra_server: str = "", extra_http: str = "",
                conf_text: str | None = None, timeout: float = 10.0) -> NginxServer:
    """Write a minimal nginx.conf into *workdir* and run nginx in *ns*.

    nginx runs in the foreground (``daemon off``) as a child of this process,
    with its error log, access log, pid file and temp dirs in *workdir*.
    Returns once 127.0.0.1:*port* accepts connections inside the namespace.
    *extra_server* / *extra_http* are raw config snippets spliced into the
    server / http blocks; *conf_text* replaces the whole config.
    """
    if not shutil.which("nginx"):
        raise NetnsError("nginx not installed")
    if workdir is None:
        import tempfile
        workdir = tempfile.mkdtemp(prefix="replay-nginx-")
    workdir = Path(workdir).resolve()
    root_dir = Path(root_dir).resolve()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    # Workers run unprivileged: make the (usually mkdtemp'd, mode 0700) workdir
    # and docroot traversable.  Their parents are left alone and must already
    # be traversable (e.g. /tmp).
    for d in (workdir, workdir / "tmp", root_dir):
        try:
            os.chmod(d, os.stat(d).st_mode | 0o755)
        except OSError:
            pass
    conf = conf_text if conf_text is not None else nginx_conf(
        root_dir, port, workdir, workers=workers,
        extra_server=extra_server, extra_http=extra_http)
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)

    test = ns.run(["nginx", "-t", "-q", "-p", str(workdir), "-e", str(workdir / "error.log"),
                   "-c", str(conf_path)], capture_output=True, text=True)
    if test.returncode != 0:
        raise NetnsError(f"nginx config test failed:\n{test.stderr}")

    proc = ns.popen(["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"),
                     "-c", str(conf_path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = NginxServer(ns, proc, workdir, port)
    if not ns.wait_port(port, timeout=timeout) or proc.poll() is not None:
        server.stop()
        err = server.error_log.read_text() if server.error_log.exists() else ""
        raise NetnsError(f"nginx did not start on port {port} in {ns.name}:\n{err}")
    return server
