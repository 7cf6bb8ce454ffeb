"""Throwaway PostgreSQL clusters: the demo's embedded default and the test suite's servers.

A cluster lives in a temporary directory, listens on a free loopback port and on a
unix socket inside that directory, runs with ``wal_level=logical``, and is removed
when stopped. PostgreSQL refuses to run as root, so when we are root the server runs
as an unprivileged system user (created on first use if needed).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pgherald.errors import ConfigError

UNPRIVILEGED_USER = "pgherald"
DEFAULT_SETTINGS: Mapping[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "100",
    "fsync": "on",
    "synchronous_commit": "on",
    "shared_buffers": "128MB",
    "logical_decoding_work_mem": "64MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "max_prepared_transactions": "10",
    "wal_sender_timeout": "60s",
}


@dataclass(frozen=True)
class PgBinaries:
    """Where a PostgreSQL installation's server programs are, and which major version it is."""

    bindir: Path
    version: int

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def _version_of(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "postgres (PostgreSQL) 15.19 (Debian ...)"
    return int(out.split(")")[1].split()[0].split(".")[0])


def system_binaries() -> PgBinaries | None:
    """The newest PostgreSQL server installed on the system, if any."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(os.path.realpath(found)).parent))
    for bindir in candidates:
        path = Path(bindir)
        if (path / "initdb").exists() and (path / "postgres").exists():
            return PgBinaries(path, _version_of(path))
    return None


def pgserver_binaries() -> PgBinaries | None:
    """The PostgreSQL that the ``pgserver`` wheel ships (``pip install pgherald[embedded]``)."""
    try:
        import pgserver  # noqa: F401
    except ImportError:
        return None
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bindir / "postgres").exists():
        return None
    return PgBinaries(bindir, _version_of(bindir))


def find_binaries(prefer: str = "system") -> PgBinaries:
    """System binaries when installed, else pgserver's; ``prefer='pgserver'`` reverses that."""
    order = (
        (pgserver_binaries, system_binaries)
        if prefer == "pgserver"
        else (system_binaries, pgserver_binaries)
    )
    for finder in order:
        found = finder()
        if found is not None:
            return found
    raise ConfigError(
        "no PostgreSQL server programs found: install PostgreSQL (e.g. apt-get install postgresql) "
        "or the embedded extra (pip install 'pgherald[embedded]')"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ensure_unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                UNPRIVILEGED_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(UNPRIVILEGED_USER)


def _open_to_others(path: Path) -> bool:
    """Whether every directory from the root down to ``path`` lets other users through."""
    return all(part.stat().st_mode & 0o001 for part in (path, *path.parents))


def _traversable(base: str) -> str:
    """``base`` if every directory above it lets others through, else the system's /tmp.

    The server runs as an unprivileged user, which must reach its data directory; a root-owned
    0700 temporary directory (pytest's, for one) would stop it.
    """
    path = Path(base).resolve()
    return str(path) if _open_to_others(path) else "/tmp"


def _reachable_binaries(binaries: PgBinaries) -> PgBinaries:
    """Binaries the unprivileged server user can run, copying the installation if need be.

    pgserver's PostgreSQL lives inside a virtual environment, which may sit in a directory
    only root can enter (a fresh clone in a 0700 temporary directory, say). Then its whole
    installation (bin, lib, share; about 35 MB) is copied once to a world-readable place.
    """
    bindir = binaries.bindir.resolve()
    if _open_to_others(bindir):
        return binaries
    install = bindir.parent  # .../site-packages/pgserver/pginstall
    # The programs find their libraries through RPATH $ORIGIN/../../../pgserver.libs (the
    # wheel's vendored libraries beside the package), so the copy keeps that layout.
    package_root = install.parent.parent
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target = Path("/tmp") / f"pgherald-pginstall-{binaries.version}-{digest}"
    relative = install.relative_to(package_root)
    if not (target / relative / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="pgherald-pginstall-", dir="/tmp"))
        shutil.copytree(install, staging / relative, symlinks=True)
        libs = package_root / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
        for directory in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            directory.chmod(0o755)
        with contextlib.suppress(OSError):  # another process copied it first
            staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return PgBinaries(target / relative / "bin", binaries.version)


class EmbeddedCluster:
    """A PostgreSQL cluster in a temporary directory, owned by this process.

    Use as a context manager, or call ``start()`` and ``stop()``. ``kill()`` and
    ``restart()`` exist for fault tests (an immediate shutdown is a crash).
    """

    def __init__(
        self,
        binaries: PgBinaries | None = None,
        settings: Mapping[str, str] | None = None,
        base_dir: str | None = None,
        superuser: str = "postgres",
    ) -> None:
        self.binaries = binaries or find_binaries()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.superuser = superuser
        self.port = 0
        self._base_dir = base_dir
        self.root: Path | None = None
        self._run_as: pwd.struct_passwd | None = None
        self._started = False

    # -- paths and connection strings -------------------------------------------------

    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    @property
    def version(self) -> int:
        return self.binaries.version

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={user or self.superuser}"
            " connect_timeout=10"
        )

    # -- lifecycle ---------------------------------------------------------------------

    def _preexec(self) -> None:
        if self._run_as is not None:
            os.setgid(self._run_as.pw_gid)
            os.setuid(self._run_as.pw_uid)
        os.setsid()  # a Ctrl-C in the terminal reaches us, not the server: we stop it ourselves

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        env.pop("PGDATA", None)
        return subprocess.run(
            args, capture_output=True, text=True, check=check, preexec_fn=self._preexec, env=env
        )

    def start(self) -> EmbeddedCluster:
        if self._started:
            return self
        base = self._base_dir
        if os.geteuid() == 0:
            self._run_as = _ensure_unprivileged_user()
            base = _traversable(base or tempfile.gettempdir())
            self.binaries = _reachable_binaries(self.binaries)
        self.root = Path(tempfile.mkdtemp(prefix="pgherald-pg-", dir=base))
        self.root.chmod(0o755)
        self.socket_dir.mkdir()
        if self._run_as is not None:
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
            os.chown(self.socket_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        try:
            self._run(
                [
                    self.binaries.tool("initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    self.superuser,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            )
        except subprocess.CalledProcessError as e:
            self._cleanup()
            raise ConfigError(f"initdb failed: {e.stderr.strip()}") from e
        self._write_config()
        self._start_server()
        self._started = True
        return self

    def _write_config(self) -> None:
        self.port = free_port()
        lines = [f"{k} = '{v}'" for k, v in self.settings.items()]
        lines += [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.socket_dir}'",
        ]
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write("\n".join(lines) + "\n")
        hba = self.datadir / "pg_hba.conf"
        with open(hba, "a") as f:
            f.write("host replication all 127.0.0.1/32 trust\nlocal replication all trust\n")

    def _start_server(self) -> None:
        for attempt in range(5):
            result = self._run(
                [
                    self.binaries.tool("pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                check=False,
            )
            if result.returncode == 0:
                return
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            if "could not bind" in log and attempt < 4:
                # Someone took our free port between the probe and the bind: pick another.
                self.port = free_port()
                with open(self.datadir / "postgresql.auto.conf", "a") as f:
                    f.write(f"port = {self.port}\n")
                continue
            raise ConfigError(f"PostgreSQL did not start: {result.stderr.strip()} {log[-2000:]}")

    def set(self, **settings: str) -> None:
        """Changes server settings; takes effect at the next (re)start."""
        self.settings.update(settings)
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write("".join(f"{k} = '{v}'\n" for k, v in settings.items()))

    def stop(self, mode: str = "fast") -> None:
        """Stops the server and removes its directory."""
        if self.root is None:
            return
        if self._started:
            self._run(
                [self.binaries.tool("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
                check=False,
            )
            self._started = False
        self._cleanup()

    def _cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def restart(self, mode: str = "fast") -> None:
        """Stops (``fast`` or ``immediate``, the latter being a crash) and starts again."""
        self._run(
            [self.binaries.tool("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
        )
        self._start_server()

    def kill(self) -> None:
        """SIGKILLs the postmaster, as a power cut would; ``start_again()`` recovers."""
        pidfile = self.datadir / "postmaster.pid"
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def start_again(self) -> None:
        self._start_server()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_cluster(**kwargs: object) -> Iterator[EmbeddedCluster]:
    cluster = EmbeddedCluster(**kwargs)  # type: ignore[arg-type]
    with cluster:
        yield cluster
