"""Podman for tests that run the builder images (no test functions here).

No Docker engine and no registry are needed: scripts/podman-setup.sh installs podman and
writes the containers.conf this machine needs, scripts/debian-base-image.sh makes the
Debian base image with debootstrap, and ``podman build`` makes the builder image from
images/builder-debian/Dockerfile. ``podman system service`` then speaks the Docker API,
so tests drive containers with the ``docker`` package, as Airflow's docker provider does.

The builder image is rebuilt only when its inputs change: its ``INPUTS_LABEL`` label holds
a hash of the Dockerfile, .dockerignore, pyproject.toml, scripts/host-deps.sh, include/
and the base image's id.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache/podman"
SETUP_SCRIPT = REPO / "scripts/podman-setup.sh"
BASE_SCRIPT = REPO / "scripts/debian-base-image.sh"
DOCKERFILE = REPO / "images/builder-debian/Dockerfile"
BUILDER_IMAGE = "localhost/collector-drivers/builder-debian"
INPUTS_LABEL = "collector-drivers.inputs-sha256"
# What the builder image is made of (the Dockerfile's COPYs and what decides them).
IMAGE_INPUTS = ("images/builder-debian/Dockerfile", ".dockerignore", "pyproject.toml")
IMAGE_INPUT_TREES = ("scripts/host-deps.sh", "include")
_SKIPPED_PARTS = {"__pycache__", ".pytest_cache"}
_SKIPPED_SUFFIXES = (".pyc", ".egg-info")

BUILD_TIMEOUT_S = 30 * 60  # debootstrap + apt + pip the first time; minutes here
SERVICE_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# A CA bundle for pip inside `podman build` (a TLS-intercepting proxy's CA lives there).
_CA_BUNDLE_VARIABLES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
_DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class PodmanError(RuntimeError):
    pass


def project_version() -> str:
    """pyproject.toml's version: the builder image's tag."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def builder_image_ref() -> str:
    return f"{BUILDER_IMAGE}:{project_version()}"


# --- podman on this machine ------------------------------------------------------------------


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0):
    return subprocess.run(
        [str(c) for c in cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@functools.cache
def podman_env() -> dict[str, str]:
    """os.environ with CONTAINERS_CONF pointing at the conf scripts/podman-setup.sh writes
    (it installs nothing when podman, runc and debootstrap are there)."""
    done = _run(["sh", SETUP_SCRIPT])
    if done.returncode != 0:
        raise PodmanError(f"{SETUP_SCRIPT.name} failed:\n{_tail(done.stderr)}")
    env = dict(os.environ)
    for line in done.stdout.splitlines():
        if line.startswith("export CONTAINERS_CONF="):
            env["CONTAINERS_CONF"] = line.partition("=")[2]
    if "CONTAINERS_CONF" not in env:
        raise PodmanError(f"{SETUP_SCRIPT.name} printed no CONTAINERS_CONF: {done.stdout!r}")
    return env


@functools.cache
def podman_unavailable_reason() -> str | None:
    """None when podman can build and run images here, else why not (a skip reason)."""
    if not sys.platform.startswith("linux"):
        return f"podman builder images need Linux, not {sys.platform}"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return f"{' and '.join(missing)} {verb} not installed: run scripts/podman-setup.sh"
    if os.geteuid() != 0:
        return "podman runs rootful here (debootstrap, root storage): run the tests as root"
    try:
        env = podman_env()
        info = _run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=env)
    except (PodmanError, OSError, subprocess.TimeoutExpired) as e:
        return f"podman cannot be set up here: {e}"
    if info.returncode != 0:
        return f"`podman info` fails here:\n{_tail(info.stderr, 10)}"
    return None


def podman(*args: str, timeout: float = 120.0, check: bool = True):
    done = _run(["podman", *args], env=podman_env(), timeout=timeout)
    if check and done.returncode != 0:
        raise PodmanError(f"podman {' '.join(args)} failed:\n{_tail(done.stderr)}")
    return done


# --- the builder image -----------------------------------------------------------------------


def _input_files() -> list[Path]:
    files = [REPO / name for name in IMAGE_INPUTS]
    for name in IMAGE_INPUT_TREES:
        root = REPO / name
        found = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [
            p
            for p in found
            if not _SKIPPED_PARTS.intersection(p.relative_to(REPO).parts)
            and not any(part.endswith(_SKIPPED_SUFFIXES) for part in p.relative_to(REPO).parts)
        ]
    return files


def inputs_hash(base_image_id: str) -> str:
    """sha256 over the builder image's inputs: names, modes and bytes, and the base's id."""
    h = hashlib.sha256(f"base {base_image_id}\n".encode())
    for path in _input_files():
        mode = path.stat().st_mode & 0o111
        h.update(f"{path.relative_to(REPO)} {mode:o} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _image_labels(ref: str) -> tuple[str, dict[str, str]] | None:
    """(id, labels) of a local image, or None when there is no such image."""
    done = podman("image", "inspect", "--format", "json", ref, check=False)
    if done.returncode != 0:
        return None
    image = json.loads(done.stdout)[0]
    labels = image.get("Labels") or image.get("Config", {}).get("Labels") or {}
    return image["Id"], labels


def _ca_bundle() -> Path | None:
    for name in _CA_BUNDLE_VARIABLES:
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return _DEFAULT_CA_BUNDLE if _DEFAULT_CA_BUNDLE.is_file() else None


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_builder_image(log=None) -> str:
    """The builder image's reference, built first when it is missing or its inputs changed
    (base image and podman set up by the scripts, each a no-op when done). ``log``: a
    callable for progress lines (e.g. print)."""
    log = log or (lambda _line: None)
    ref = builder_image_ref()
    with _lock("builder-image.lock"):  # one build at a time, also across processes
        base = _run(["sh", BASE_SCRIPT], env=podman_env(), timeout=BUILD_TIMEOUT_S)
        if base.returncode != 0:
            raise PodmanError(f"{BASE_SCRIPT.name} failed:\n{_tail(base.stderr)}")
        base_ref = base.stdout.split()[-1]
        base_found = _image_labels(base_ref)
        if base_found is None:
            raise PodmanError(f"{BASE_SCRIPT.name} made no image {base_ref}")
        digest = inputs_hash(base_found[0])

        current = _image_labels(ref)
        if current is not None and current[1].get(INPUTS_LABEL) == digest:
            log(f"builder image {ref} is up to date ({INPUTS_LABEL}={digest[:12]})")
            return ref

        log(f"building {ref} ({'inputs changed' if current else 'missing'})")
        command = ["build", "-f", str(DOCKERFILE), "--label", f"{INPUTS_LABEL}={digest}"]
        command += ["--label", f"org.opencontainers.image.version={project_version()}"]
        ca = _ca_bundle()
        if ca is not None:
            command += ["--secret", f"id=cacerts,src={ca}"]
        command += ["-t", ref, str(REPO)]
        started = time.monotonic()
        build_log = CACHE / "builder-debian-build.log"
        with open(build_log, "w") as out:
            done = subprocess.run(
                ["podman", *command],
                env=podman_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        if done.returncode != 0:
            raise PodmanError(
                f"podman build of {ref} failed (exit {done.returncode}; whole log in "
                f"{build_log}):\n{_tail(build_log.read_text(errors='replace'))}"
            )
        log(f"built {ref} in {time.monotonic() - started:.0f}s (log: {build_log})")
        built = _image_labels(ref)
        if built is None or built[1].get(INPUTS_LABEL) != digest:
            raise PodmanError(f"podman build did not tag {ref} with {INPUTS_LABEL}={digest}")
        if current is not None and current[0] != built[0]:
            # The image this one replaces, now untagged; kept if a container still uses it.
            podman("rmi", current[0], check=False)
        return ref


# --- the Docker API ----------------------------------------------------------------------------


def ping(socket_path: Path, timeout: float = 2.0) -> bool:
    """True when the Docker API on that unix socket answers ``GET /_ping`` with OK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(socket_path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
            response = b""
            while chunk := s.recv(4096):
                response += chunk
    except OSError:
        return False
    head, _, body = response.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] and body == b"OK"


@contextlib.contextmanager
def podman_service(tmp_path: Path) -> Iterator[str]:
    """``podman system service`` on a socket in ``tmp_path`` (a shorter temp folder when
    that path is too long for a unix socket); yields its Docker API URL
    (``unix://.../podman.sock``) once it answers; stops it (SIGTERM, then SIGKILL)."""
    folder = Path(tmp_path)
    short = None
    if len(str(folder / "podman.sock")) > 100:  # sun_path holds 108 bytes
        short = folder = Path(tempfile.mkdtemp(prefix="podman-"))
    sock = folder / "podman.sock"
    log_path = Path(tmp_path) / "podman-service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            env=podman_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVICE_READY_TIMEOUT_S
        while not ping(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "timeout"
                raise PodmanError(
                    f"podman system service did not answer on {sock} ({why}):\n"
                    + _tail(log_path.read_text(errors="replace"))
                )
            time.sleep(0.1)
        yield f"unix://{sock}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        sock.unlink(missing_ok=True)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)
