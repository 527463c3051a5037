"""``drivers images build [RELEASE...]``: the Debian builder images, built here with podman.

No Docker engine and no registry: scripts/podman-setup.sh installs podman and writes the
containers.conf this machine needs, scripts/debian-base-image.sh makes each release's base
image with debootstrap (``localhost/collector-drivers/debian-base:<release>``), and
``podman build`` makes ``localhost/collector-drivers/builder-<release>:<version>`` from
images/builder-debian/Dockerfile (``--build-arg RELEASE``), the version pyproject.toml's.

An image is rebuilt only when its inputs change: its ``INPUTS_LABEL`` label holds a hash
of the Dockerfile and its scripts, .dockerignore, pyproject.toml, include/, the release
and the base image's id. Works from a checkout (the Dockerfile and scripts are not part
of the installed package).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

from drivers.domain.errors import DriversError

REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / ".cache/podman"
SETUP_SCRIPT = REPO / "scripts/podman-setup.sh"
BASE_SCRIPT = REPO / "scripts/debian-base-image.sh"
DOCKERFILE = REPO / "images/builder-debian/Dockerfile"
IMAGE_PREFIX = "localhost/collector-drivers"
# The Debian releases the builder image is made for (images/builder-debian/packages.sh
# has each one's packages): the embedded default's builders, named after them.
DEBIAN_RELEASES = ("bullseye", "bookworm", "trixie")
INPUTS_LABEL = "collector-drivers.inputs-sha256"
RELEASE_LABEL = "collector-drivers.debian-release"
# What a builder image is made of (the Dockerfile's COPYs and what decides them).
IMAGE_INPUTS = (".dockerignore", "pyproject.toml")
IMAGE_INPUT_TREES = ("images/builder-debian", "include")
_SKIPPED_PARTS = {"__pycache__", ".pytest_cache"}
_SKIPPED_SUFFIXES = (".pyc", ".egg-info")

BUILD_TIMEOUT_S = 30 * 60  # debootstrap + apt + pip the first time (bullseye: + Python)
# The image store is the machine's (root's podman storage), shared by every checkout:
# one build of a release at a time across them.
LOCK_DIR = Path(tempfile.gettempdir()) / "collector-drivers-images"
# A CA bundle for pip inside `podman build` (a TLS-intercepting proxy's CA lives there).
_CA_BUNDLE_VARIABLES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
_DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class ImageError(DriversError):
    """An image cannot be built here; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    release: str
    ref: str
    image_id: str
    action: str  # "built" (missing), "rebuilt" (inputs changed) or "up to date"
    seconds: float
    log: Path | None = None  # the podman build log, when it built


def project_version() -> str:
    """pyproject.toml's version: the builder images' tag."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def base_image_ref(release: str) -> str:
    return f"{IMAGE_PREFIX}/debian-base:{release}"


def builder_image_ref(release: str) -> str:
    """``localhost/collector-drivers/builder-<release>:<pyproject version>``."""
    return f"{IMAGE_PREFIX}/builder-{release}:{project_version()}"


def check_release(release: str) -> str:
    if release not in DEBIAN_RELEASES:
        raise ImageError(
            f"no Debian builder image for release {release!r}: one of {', '.join(DEBIAN_RELEASES)}"
        )
    return release


# --- podman on this machine --------------------------------------------------------------


def _run(cmd: list, *, env: dict[str, str] | None = None, timeout: float = 120.0):
    return subprocess.run(
        [str(c) for c in cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def unavailable_reason() -> str | None:
    """None when podman can build and run the builder images here, else why not and
    what to do (a test's skip reason)."""
    if not sys.platform.startswith("linux"):
        return f"the podman builder images need Linux, not {sys.platform}"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if missing[:-1] else missing)
        verb = "is" if len(missing) == 1 else "are"
        return f"{names} {verb} not installed: run scripts/podman-setup.sh"
    if os.geteuid() != 0:
        return "podman runs rootful here (debootstrap, root storage): run as root"
    if not DOCKERFILE.is_file():
        return f"{DOCKERFILE} is missing: build the images from a checkout of the project"
    return None


@functools.cache
def podman_env() -> dict[str, str]:
    """os.environ with CONTAINERS_CONF pointing at the conf scripts/podman-setup.sh writes
    (it installs nothing when podman, runc and debootstrap are there)."""
    why = unavailable_reason()
    if why is not None:
        raise ImageError(why)
    done = _run(["sh", SETUP_SCRIPT])
    if done.returncode != 0:
        raise ImageError(f"{SETUP_SCRIPT.name} failed:\n{tail(done.stderr)}")
    env = dict(os.environ)
    for line in done.stdout.splitlines():
        if line.startswith("export CONTAINERS_CONF="):
            env["CONTAINERS_CONF"] = line.partition("=")[2]
    if "CONTAINERS_CONF" not in env:
        raise ImageError(f"{SETUP_SCRIPT.name} printed no CONTAINERS_CONF: {done.stdout!r}")
    return env


def podman(*args: str, timeout: float = 120.0, check: bool = True):
    done = _run(["podman", *args], env=podman_env(), timeout=timeout)
    if check and done.returncode != 0:
        raise ImageError(f"podman {' '.join(args)} failed:\n{tail(done.stderr)}")
    return done


def image_labels(ref: str) -> tuple[str, dict[str, str]] | None:
    """(id, labels) of a local image, or None when there is no such image."""
    done = podman("image", "inspect", "--format", "json", ref, check=False)
    if done.returncode != 0:
        return None
    image = json.loads(done.stdout)[0]
    labels = image.get("Labels") or image.get("Config", {}).get("Labels") or {}
    return image["Id"], labels


# --- the images ----------------------------------------------------------------------------


def _input_files() -> list[Path]:
    files = [REPO / name for name in IMAGE_INPUTS]
    for name in IMAGE_INPUT_TREES:
        for path in sorted(p for p in (REPO / name).rglob("*") if p.is_file()):
            parts = path.relative_to(REPO).parts
            if _SKIPPED_PARTS.intersection(parts) or any(
                part.endswith(_SKIPPED_SUFFIXES) for part in parts
            ):
                continue
            files.append(path)
    return files


def inputs_hash(release: str, base_image_id: str) -> str:
    """sha256 over a builder image's inputs: names, modes and bytes, its release and the
    base image's id."""
    h = hashlib.sha256(f"release {release}\nbase {base_image_id}\n".encode())
    for path in _input_files():
        mode = path.stat().st_mode & 0o111
        h.update(f"{path.relative_to(REPO)} {mode:o} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _ca_bundle() -> Path | None:
    for name in _CA_BUNDLE_VARIABLES:
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return _DEFAULT_CA_BUNDLE if _DEFAULT_CA_BUNDLE.is_file() else None


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_DIR / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_base_image(release: str) -> tuple[str, str]:
    """(reference, id) of the release's debootstrap'd base image, made when missing."""
    done = _run(["sh", BASE_SCRIPT, release], env=podman_env(), timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise ImageError(f"{BASE_SCRIPT.name} {release} failed:\n{tail(done.stderr)}")
    ref = done.stdout.split()[-1]
    found = image_labels(ref)
    if found is None:
        raise ImageError(f"{BASE_SCRIPT.name} {release} made no image {ref}")
    return ref, found[0]


def ensure_builder_image(
    release: str, log: Callable[[str], None] | None = None, *, force: bool = False
) -> BuiltImage:
    """The release's builder image, built first when it is missing or its inputs changed
    (or ``force``); base image and podman set up by the scripts, each a no-op when done.
    ``log``: a callable for progress lines (e.g. print)."""
    log = log or (lambda _line: None)
    check_release(release)
    podman_env()  # podman set up, or why not (e.g. not a checkout: no Dockerfile)
    ref = builder_image_ref(release)
    started = time.monotonic()
    with _lock(f"builder-{release}.lock"):
        _base_ref, base_id = ensure_base_image(release)
        digest = inputs_hash(release, base_id)
        current = image_labels(ref)
        if current is not None and current[1].get(INPUTS_LABEL) == digest and not force:
            return BuiltImage(release, ref, current[0], "up to date", time.monotonic() - started)

        action = "rebuilt" if current else "built"
        why = "forced" if force and current else "inputs changed" if current else "missing"
        log(f"building {ref} ({why})")
        command = ["build", "-f", str(DOCKERFILE), "--build-arg", f"RELEASE={release}"]
        command += ["--label", f"{INPUTS_LABEL}={digest}", "--label", f"{RELEASE_LABEL}={release}"]
        command += ["--label", f"org.opencontainers.image.version={project_version()}"]
        ca = _ca_bundle()
        if ca is not None:
            command += ["--secret", f"id=cacerts,src={ca}"]
        command += ["-t", ref, str(REPO)]
        CACHE.mkdir(parents=True, exist_ok=True)
        build_log = CACHE / f"builder-{release}-build.log"
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
            raise ImageError(
                f"podman build of {ref} failed (exit {done.returncode}; whole log in "
                f"{build_log}):\n{tail(build_log.read_text(errors='replace'))}"
            )
        built = image_labels(ref)
        if built is None or built[1].get(INPUTS_LABEL) != digest:
            raise ImageError(f"podman build did not tag {ref} with {INPUTS_LABEL}={digest}")
        if current is not None and current[0] != built[0]:
            # The image this one replaces, now untagged; kept while a container uses it.
            podman("rmi", current[0], check=False)
        return BuiltImage(release, ref, built[0], action, time.monotonic() - started, build_log)


def image_size(ref: str) -> int:
    """The image's size in bytes, as podman counts it (all its layers)."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


# --- the verb ------------------------------------------------------------------------------


def cmd_images_build(args: argparse.Namespace) -> int:
    releases = [check_release(r) for r in args.releases] or list(DEBIAN_RELEASES)
    # The base images first, all at once: debootstrap waits on the archive, not the CPU
    # (about 45 s each, about as long for three); then the builds, one at a time.
    with concurrent.futures.ThreadPoolExecutor(len(releases)) as pool:
        list(pool.map(ensure_base_image, releases))
    for release in releases:
        image = ensure_builder_image(
            release, log=lambda line: print(line, file=sys.stderr), force=args.force
        )
        size = image_size(image.ref) / 1e6
        where = f"; log: {image.log}" if image.log else ""
        print(f"{image.ref}: {image.action} in {image.seconds:.0f} s ({size:.0f} MB{where})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="the Debian builder images (podman): build")
    images_sub = p.add_subparsers(dest="action", required=True)
    b = images_sub.add_parser(
        "build", help="build the builder images that are missing or stale (podman)"
    )
    b.add_argument(
        "releases",
        nargs="*",
        metavar="RELEASE",
        help=f"Debian releases (default: all: {' '.join(DEBIAN_RELEASES)})",
    )
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.set_defaults(func=cmd_images_build)
