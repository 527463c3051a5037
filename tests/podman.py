"""Podman for tests that run the builder images (no test functions here).

The images are built by the library (:mod:`drivers.ops.images`, the ``drivers images
build`` verb): podman from scripts/podman-setup.sh, each Debian release's base from
scripts/debian-base-image.sh (debootstrap), each builder from
images/builder-debian/Dockerfile, rebuilt only when its inputs change. CI builds them
before the tests (.ci/run), so a test only pays the stale check (about a second). Here
``podman system service`` speaks the Docker API, so tests drive containers with the
``docker`` package, as Airflow's docker provider does.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from drivers.ops import images
from drivers.ops.images import DEBIAN_RELEASES, ImageError, podman, podman_env, tail

__all__ = ["DEBIAN_RELEASES", "podman", "podman_env", "podman_service", "ping"]

PodmanError = ImageError
SERVICE_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def podman_unavailable_reason() -> str | None:
    """None when podman can build and run images here, else why not (a skip reason)."""
    why = images.unavailable_reason()
    if why is not None:
        return why
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    except (ImageError, OSError, subprocess.TimeoutExpired) as e:
        return f"podman cannot be set up here: {e}"
    if info.returncode != 0:
        return f"`podman info` fails here:\n{info.stderr.strip()[-2000:]}"
    return None


def builder_image_ref(release: str = "bookworm") -> str:
    return images.builder_image_ref(release)


def ensure_builder_image(release: str = "bookworm", log=None) -> str:
    """The release's builder image reference, built first when missing or stale."""
    built = images.ensure_builder_image(release, log=log)
    if log is not None:
        log(f"{built.ref}: {built.action} in {built.seconds:.1f}s")
    return built.ref


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
                    + tail(log_path.read_text(errors="replace"))
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
