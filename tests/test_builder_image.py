"""The builder images: one shared tail, the pod's command in each Debian image, a real
shard in one.

- Every images/builder-*/Dockerfile ends with the same tail (no podman needed).
- The pod ≡ container contract: the KubernetesPodOperator builder pod is rendered
  (drivers.airflow.glue, a config whose builders are the Debian releases' images) and its
  exact ``command`` and ``args`` run in that release's image as Kubernetes runs them
  (``command`` replaces the ENTRYPOINT), with its environment and security context, on
  a one-task shard in the embedded GCS (a probe for a kernel that cannot run eBPF: no
  bundle, no compile, seconds). Each image's toolchain is its release's (gcc-N's major).
- A real shard (kernel module and eBPF probe of a real Debian kernel from its bundle) in
  the bookworm image, started through the Docker API (``podman system service``) with
  the ``docker`` package, as the docker runtime does.

Cost: the images are built by ``drivers images build`` (CI does it before the tests:
debootstrap + apt + pip, bullseye also a Python, minutes the first time); here only
their stale check (about a second each), the real shard about half a minute. Skipped
where podman cannot run: run scripts/podman-setup.sh (as root) to install it.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import json
import re
import subprocess
import time
from pathlib import Path

import docker
import pytest

from drivers.domain import layout
from drivers.domain.config import Config, load_config
from drivers.domain.exit_codes import EX_OK
from drivers.domain.names import DriverKey
from drivers.domain.verify import elf_sections, verify_driver
from drivers.ops import images
from pipeline_env import debian_bundle
from podman import (
    DEBIAN_RELEASES,
    ensure_builder_image,
    podman_env,
    podman_service,
    podman_unavailable_reason,
)
from test_builder import Env, by_task

needs_podman = pytest.mark.skipif(
    podman_unavailable_reason() is not None, reason=str(podman_unavailable_reason())
)

REPO = Path(__file__).resolve().parents[1]
TAIL_MARKER = "# ---- The builder tail"
# Debian's own facts, restated as what the images must show: each release's compiler.
GCC_MAJOR = {"bullseye": 10, "bookworm": 12, "trixie": 14}
KERNEL = "6.1.0-56-cloud-amd64"
VERSION = "2.3.0"
TASKS = [(KERNEL, VERSION, "mod"), (KERNEL, VERSION, "bpf")]
# No eBPF before 4.14: its probe is the `.unavail` marker, written without any bundle.
NO_EBPF_KERNEL = "4.9.0-19-amd64"
RUN_ID = "image-run"
CONTAINER_TIMEOUT_S = 600
DUMMY_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: dummy}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


# --- one tail ------------------------------------------------------------------------------


def _tail(dockerfile: Path) -> str:
    text = dockerfile.read_text()
    start = text.find(TAIL_MARKER)
    assert start >= 0, f"{dockerfile} has no builder tail ({TAIL_MARKER!r} ... to its end)"
    return text[start:]


def test_every_builder_dockerfile_ends_with_the_same_tail():
    dockerfiles = sorted(REPO.glob("images/builder-*/Dockerfile"))
    names = {p.parent.name for p in dockerfiles}
    assert {"builder-debian", "builder-rhel7", "builder-rhel8", "builder-fc36"} <= names
    reference = _tail(REPO / "images/builder-debian/Dockerfile")
    for dockerfile in dockerfiles:
        tail = _tail(dockerfile)
        diff = "".join(
            difflib.unified_diff(
                reference.splitlines(True), tail.splitlines(True), "builder-debian", str(dockerfile)
            )
        )
        assert tail == reference, f"{dockerfile}'s tail differs:\n{diff}"
        # What comes before the tail names the interpreter the tail's venv is made with.
        head = dockerfile.read_text()[: -len(tail)]
        assert re.search(r"^ENV DRIVERS_PYTHON=\S+", head, re.M), dockerfile
    # What the tail promises every pod: `drivers` on PATH (a pod's command replaces the
    # ENTRYPOINT), the same entrypoint, a non-root user.
    instructions = [line for line in reference.splitlines() if line and line[0] not in "# "]
    assert "ENV PATH=/opt/drivers/bin:$PATH \\" in instructions
    assert 'ENTRYPOINT ["/opt/drivers/bin/drivers"]' in instructions
    assert "USER 1000:1000" in instructions
    assert instructions[-1] == 'CMD ["--help"]'


# --- stale or up to date -----------------------------------------------------------------


def test_a_builder_images_inputs_hash_follows_its_inputs_and_nothing_else(tmp_path, monkeypatch):
    import shutil

    for name in (*images.IMAGE_INPUTS, *images.IMAGE_INPUT_TREES):
        source, copy = REPO / name, tmp_path / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy)
    monkeypatch.setattr(images, "REPO", tmp_path)
    first = images.inputs_hash("bookworm", "sha256:base")
    assert images.inputs_hash("bookworm", "sha256:base") == first
    assert images.inputs_hash("trixie", "sha256:base") != first  # the release
    assert images.inputs_hash("bookworm", "sha256:other") != first  # the base image
    (tmp_path / "include/drivers/__pycache__").mkdir(exist_ok=True)
    (tmp_path / "include/drivers/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    assert images.inputs_hash("bookworm", "sha256:base") == first  # not an input
    script = tmp_path / "images/builder-debian/packages.sh"
    script.write_text(script.read_text() + "# a change\n")
    changed = images.inputs_hash("bookworm", "sha256:base")
    assert changed != first
    script.chmod(0o644)
    assert images.inputs_hash("bookworm", "sha256:base") != changed  # its mode too
    code = tmp_path / "include/drivers/domain/kernels.py"
    code.write_text(code.read_text() + "\n")
    assert images.inputs_hash("bookworm", "sha256:base") not in (first, changed)


def test_drivers_images_build_refuses_a_release_it_has_no_image_for(capsys):
    from drivers.ops.cli import main

    assert main(["images", "build", "buster"]) == 2
    err = capsys.readouterr().err
    assert "no Debian builder image for release 'buster'" in err
    assert "bullseye, bookworm, trixie" in err


def test_without_podman_building_an_image_says_to_run_podman_setup(tmp_path, monkeypatch, capsys):
    from drivers.ops.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no podman, runc nor debootstrap on it
    images.podman_env.cache_clear()
    try:
        assert main(["images", "build", "bookworm"]) == 2
    finally:
        images.podman_env.cache_clear()  # the next caller sets podman up with the real PATH
    err = capsys.readouterr().err
    assert "podman, runc and debootstrap are not installed" in err
    assert "run scripts/podman-setup.sh" in err


@needs_podman
def test_drivers_images_build_reuses_images_that_are_up_to_date(builder_images, capsys):
    from drivers.ops.cli import main

    started = time.monotonic()
    assert main(["images", "build"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == list(builder_images.values())
    assert all(": up to date in " in line for line in lines), lines
    assert time.monotonic() - started < 20  # a stale check, no build


# --- the pod's command in each Debian image --------------------------------------------------


@pytest.fixture(scope="module")
def builder_images() -> dict[str, str]:
    """Each Debian release's builder image, built when missing or stale."""
    return {release: ensure_builder_image(release, log=print) for release in DEBIAN_RELEASES}


@pytest.fixture
def debian_config(tmp_path, monkeypatch) -> Config:
    """A config whose builders are the Debian releases' images; pods render offline."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(DUMMY_KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    text = 'driver_versions = ["2.3.0"]\nblocklists = []\n'
    for release in DEBIAN_RELEASES:
        text += (
            f'[[builders]]\nname = "{release}"\ntoolchain = "Debian {release} gcc-'
            f'{GCC_MAJOR[release]}"\nimage = "{images.builder_image_ref(release)}"\n'
        )
    # Plain version routes (the series selectors, debian/trixie:..., are the kernels' own).
    for release, kernels in (("trixie", ">=6.12"), ("bookworm", ">=5.11"), ("bullseye", ">=3")):
        text += (
            f'[[routes]]\nbuilder = "{release}"\nkernels = "{kernels}"\nkinds = ["mod", "bpf"]\n'
        )
    (tmp_path / "debian.toml").write_text(text)
    return load_config(tmp_path / "debian.toml")


def rendered_builder_pod(config: Config, builder: str, shard_uri: str) -> dict:
    """The builder pod as KubernetesPodOperator renders it, as the API server gets it."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    from drivers.airflow import glue

    kwargs = glue.builder_pod_kwargs(config, builder)
    for airflow_only in ("pool", "retries", "retry_delay"):
        kwargs.pop(airflow_only, None)
    operator = KubernetesPodOperator(arguments=glue.builder_arguments(shard_uri), **kwargs)
    return ApiClient().sanitize_for_serialization(operator.build_pod_request_obj())


def podman_run_as_kubernetes(pod: dict) -> list[str]:
    """``podman run`` of the pod's container as the kubelet would start it: ``command``
    replaces the image's ENTRYPOINT and ``args`` its CMD; its environment; the security
    context's user and read-only root; emptyDir volumes as tmpfs."""
    (container,) = pod["spec"]["containers"]
    run = ["run", "--rm", "--network", "host"]  # the embedded GCS is on 127.0.0.1
    run += ["--entrypoint", json.dumps(container["command"])]
    for var in container.get("env") or []:
        run += ["--env", f"{var['name']}={var.get('value', '')}"]
    security = (pod["spec"].get("securityContext") or {}) | (container.get("securityContext") or {})
    if "runAsUser" in security:  # without runAsGroup, the user's group in the image
        group = f":{security['runAsGroup']}" if "runAsGroup" in security else ""
        run += ["--user", f"{security['runAsUser']}{group}"]
    if security.get("readOnlyRootFilesystem"):
        run.append("--read-only")
    empty_dirs = {v["name"] for v in pod["spec"].get("volumes") or [] if "emptyDir" in v}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] in empty_dirs:
            run += ["--tmpfs", mount["mountPath"]]
    return [*run, container["image"], *container.get("args", [])]


@needs_podman
@pytest.mark.parametrize("release", DEBIAN_RELEASES)
def test_the_rendered_builder_pod_runs_in_its_release_image(
    release, builder_images, debian_config, gcs, store
):
    work, sources = store(), store()
    shard = {
        "run_id": RUN_ID,
        "builder": release,
        "index": 0,
        "cost": 1.0,
        "buckets": {"bundles": store().bucket_name, "sources": sources.bucket_name,
                    "work": work.bucket_name},
        "tasks": [[NO_EBPF_KERNEL, VERSION, "bpf"]],
    }  # fmt: skip
    name = layout.shard_object(RUN_ID, release, 0)
    work.put(name, json.dumps(shard).encode())
    pod = rendered_builder_pod(debian_config, release, f"gs://{work.bucket_name}/{name}")
    (container,) = pod["spec"]["containers"]
    assert container["image"] == builder_images[release]
    assert container["command"] == ["drivers"]  # the image's ENTRYPOINT does not count

    command = podman_run_as_kubernetes(pod)
    command[command.index(container["image"]) : command.index(container["image"])] = [
        "--env",
        f"STORAGE_EMULATOR_HOST={gcs.url}",  # where the pod's workload identity would be
    ]
    done = subprocess.run(
        ["podman", *command], env=podman_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EX_OK, f"podman {' '.join(command)}\n{done.stdout}{done.stderr}"
    results = layout.shard_results_object(RUN_ID, release, 0)
    assert done.stdout.strip().splitlines()[-1] == f"gs://{work.bucket_name}/{results}"
    task, shard_record = (json.loads(line) for line in work.download(results).splitlines())
    assert (task["status"], task["kind"], task["builder"]) == ("unavailable", "bpf", release)
    assert (shard_record["status"], shard_record["counts"]) == ("ok", {"unavailable": 1})
    # The shard ran on the release's own compiler, and knew its image from the pod.
    assert re.search(rf"\) {GCC_MAJOR[release]}\.\d+", task["toolchain"]["gcc"]), task
    assert builder_images[release] in json.dumps(task["env"]), task["env"]


TOOLCHAIN_SCRIPT = """set -eu
. /etc/os-release; echo "release: $VERSION_CODENAME"
echo "gcc-$1: $(gcc-$1 --version | head -n 1)"
echo "x86_64-linux-gnu-gcc-$1: $(x86_64-linux-gnu-gcc-$1 --version | head -n 1)"
echo "gcc: $(gcc --version | head -n 1)"
echo "clang: $(clang --version | head -n 1)"
echo "llc: $(llc --version | grep -i 'llvm version')"
echo "llvm-strip: $(llvm-strip --version | head -n 1)"
echo "pahole: $(pahole --version)"
echo "make: $(make --version | head -n 1)"
echo "modinfo: $(modinfo --version | head -n 1)"
echo "bpf_helpers.h: $(ls /usr/include/bpf/bpf_helpers.h)"
echo "python: $(python3 --version)"
"""


@needs_podman
@pytest.mark.parametrize("release", DEBIAN_RELEASES)
def test_each_release_image_carries_its_releases_toolchain(release, builder_images):
    major = GCC_MAJOR[release]
    done = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "--entrypoint", "sh"]
        + [builder_images[release], "-c", TOOLCHAIN_SCRIPT, "sh", str(major)],
        env=podman_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    found = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    print(f"{builder_images[release]}:", json.dumps(found, indent=1))
    assert found["release"] == release
    for tool in (f"gcc-{major}", f"x86_64-linux-gnu-gcc-{major}", "gcc"):
        assert re.search(rf"\) {major}\.\d+\.\d+", found[tool]), (tool, found[tool])
    version = re.search(r"(\d+)\.(\d+)", found["python"].split()[-1])
    assert version and (int(version[1]), int(version[2])) >= (3, 11), found["python"]


# --- a real shard --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> Path:
    """bundle-6.1.0-56-cloud-amd64.tgz from Debian's header packages (cached)."""
    return debian_bundle(KERNEL)


@needs_podman
def test_the_bookworm_image_builds_a_real_shard_through_the_docker_api(
    gcs, store, tmp_path, builder_images, bundle
):
    builder_image = builder_images["bookworm"]
    env = Env(store, tmp_path)  # buckets for bundles, sources (2.3.0 among them) and work
    env.add_bundle(KERNEL, bundle)
    uri, _doc = env.shard(TASKS, run_id=RUN_ID)
    buckets = dataclasses.replace(
        layout.Buckets.from_env({}),
        bundles=env.bundles.bucket_name,
        sources=env.sources.bucket_name,
        work=env.work.bucket_name,
    )
    environment = {"STORAGE_EMULATOR_HOST": gcs.url} | {
        f"DRIVERS_BUCKET_{role.upper()}": getattr(buckets, role) for role in layout.ROLES
    }

    with podman_service(tmp_path) as docker_url:
        client = docker.DockerClient(base_url=docker_url, timeout=60)
        started = time.monotonic()
        container = client.containers.run(
            builder_image,
            ["build-shard", "--shard", uri],
            network_mode="host",
            environment=environment,
            detach=True,
        )
        try:
            status = container.wait(timeout=CONTAINER_TIMEOUT_S)["StatusCode"]
            stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
            stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
            user = container.attrs["Config"]["User"]
        finally:
            container.remove(force=True)
            client.close()
        print(f"build-shard in {builder_image}: exit {status} in {time.monotonic() - started:.1f}s")

    assert status == EX_OK, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert user == "1000:1000"  # the image builds as a non-root user
    results = f"gs://{env.work.bucket_name}/{layout.shard_results_object(RUN_ID, 'fc36', 0)}"
    assert stdout.strip().splitlines()[-1] == results

    records = env.results(RUN_ID)
    tasks = by_task(records)
    assert set(tasks) == set(TASKS)
    staged = layout.staged_drivers_prefix(RUN_ID)
    for (kernel, version, kind), r in tasks.items():
        key = DriverKey(kernel, version, kind)
        assert (r["status"], r["failure"]) == ("built", None), r
        assert r["object"] == staged + key.object_name()
        data = env.work.download(r["object"])
        assert r["size"] == len(data)
        assert verify_driver(key, data, unavailable=False) == []  # vermagic, ELF, BTF...
        assert kind == "mod" or ".BTF" in elf_sections(gzip.decompress(data))
        # The image's own toolchain built it (Debian bookworm's gcc-12).
        assert re.search(r"\) 12\.\d+", r["toolchain"]["gcc"]), r["toolchain"]
        assert r["toolchain"]["clang"] and r["toolchain"]["make"]
    assert {i.name for i in env.work.list(staged)} == {
        staged + DriverKey(*task).object_name() for task in TASKS
    }
    shard = records[-1]
    assert (shard["type"], shard["status"], shard["exit_status"]) == ("shard", "ok", EX_OK)
    assert shard["counts"] == {"built": 2}
