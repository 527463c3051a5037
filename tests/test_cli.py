"""The `drivers plan` contract, run as the installed console command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.domain.layout import bundle_object
from scenarios import BLOCKLISTS, KERNEL_LIST

DRIVERS = str(Path(sys.executable).parent / "drivers")
BLOCK = [a for b in BLOCKLISTS for a in ("--blocklist", str(b))]


def drivers(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DRIVERS, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_plan_on_the_real_list_honours_the_json_contract():
    result = drivers(
        "plan", "--kernels", str(KERNEL_LIST), "--driver-version", "2.3.0", "--slots", "90"
    )
    plan = json.loads(result.stdout)
    assert plan["summary"] == {
        "candidates": 5676 * 2,
        "done": 0,
        "forced": 0,
        "blocked": 0,
        "unroutable": 246,
        "excluded": 0,
        "quarantined": 0,
        "claimed": 0,
        "to_build": 5676 * 2 - 246,
    }
    builders = plan["builders"]
    assert {b: (v["mod"], v["bpf"]) for b, v in builders.items()} == {
        "rhel7": (333, 4294),
        "rhel8": (3961, 0),
        "fc36": (1259, 1259),
    }
    assert plan["slots"] == 90 and plan["shard_startup_s"] == 60
    assert plan["lower_bound_s"] <= plan["makespan_s"] <= 1.10 * plan["lower_bound_s"]
    shard = plan["shards"][0]
    assert set(shard) >= {"builder", "index", "cost", "tasks"}
    assert all(len(t) == 3 and t[1] == "2.3.0" for s in plan["shards"] for t in s["tasks"])
    assert sum(len(s["tasks"]) for s in plan["shards"]) == plan["summary"]["to_build"]
    assert sum(b["shards"] for b in builders.values()) == len(plan["shards"])
    assert "to_build=11106" in result.stderr


def test_cache_file_accepts_gs_uris_and_bare_names(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.write_text("5.10.0-20-amd64\n4.19.0-22-amd64\n")
    cache = tmp_path / "cache"
    cache.write_text(
        "gs://collector-drivers/2.3.0/collector-5.10.0-20-amd64.ko.gz\n"
        "2.3.0/collector-ebpf-5.10.0-20-amd64.o.gz\n"
        "2.3.0/support-pkg.zip\n"
    )
    plan = json.loads(
        drivers(
            "plan", "--kernels", str(kernels), "--driver-version", "2.3.0", "--cache", str(cache)
        ).stdout
    )
    assert plan["summary"]["done"] == 2 and plan["summary"]["to_build"] == 2
    assert plan["inputs"]["cache_unknown_names"] == 1


def test_select_kinds_force_and_output(tmp_path):
    out = tmp_path / "plan.json"
    result = drivers(
        "plan",
        "--kernels",
        str(KERNEL_LIST),
        "--driver-version",
        "2.3.0",
        *BLOCK,
        "--select",
        "el8:4.18.0-305..4.18.0-372",
        "--kinds",
        "bpf",
        "--force",
        "--output",
        str(out),
    )
    assert result.stdout == ""
    plan = json.loads(out.read_text())
    tasks = [t for s in plan["shards"] for t in s["tasks"]]
    expected = [
        k
        for k in KERNEL_LIST.read_text().split()
        if ".el8" in k
        and (
            k.startswith("4.18.0-305")
            or k.startswith("4.18.0-372")
            or (k.startswith("4.18.0-3") and 305 < int(k.split("-")[1].split(".")[0]) < 372)
        )
    ]
    assert plan["inputs"]["kernels"] == len(expected) > 0
    assert {t[0] for t in tasks} <= set(expected) and {t[2] for t in tasks} == {"bpf"}


def test_unparsable_kernel_line_exits_2_naming_the_line(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.write_text("5.4.0-62-generic\nnot a kernel\n")
    result = drivers("plan", "--kernels", str(kernels), "--driver-version", "2.3.0", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{kernels}:2" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--driver-version", "2.3"], "driver version '2.3'"),
        (["--driver-version", "2.3.0", "--kinds", "mod,ko"], "unknown kind"),
        (["--driver-version", "2.3.0", "--select", "6.0..5.0"], "6.0..5.0"),
        (["--driver-version", "2.3.0", "--slots", "0"], "--slots"),
        (
            ["--driver-version", "2.3.0", "--cache", "/nope/cache"],
            "cannot read cache listing /nope/cache",
        ),
    ],
)
def test_bad_arguments_exit_2_naming_the_culprit(args, message):
    result = drivers("plan", "--kernels", str(KERNEL_LIST), *args, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_bad_blocklist_rule_names_file_and_line(tmp_path):
    blocklist = tmp_path / "BLOCKLIST"
    blocklist.write_text("# ok\n5.4.* * kmod\n")
    result = drivers(
        "plan",
        "--kernels",
        str(KERNEL_LIST),
        "--driver-version",
        "2.3.0",
        "--blocklist",
        str(blocklist),
        check=False,
    )
    assert result.returncode == 2 and "BLOCKLIST:2" in result.stderr


def test_plan_from_buckets_lists_bundles_and_cache(gcs, store):
    bundles, cache = store(), store()
    for kernel in ("5.10.0-20-amd64", "4.19.0-22-amd64", "6.1.0-13-cloud-amd64"):
        bundles.upload_new(bundle_object(kernel), b"x")
    bundles.upload_new("bundle-not!a!kernel.tgz", b"x")
    bundles.upload_new("README", b"x")
    cache.upload_new("drivers/2.3.0/collector-5.10.0-20-amd64.ko.gz", b"x")
    cache.upload_new("drivers/2.3.0/.collector-ebpf-5.10.0-20-amd64.unavail", b"")
    result = drivers(
        "plan",
        "--kernels",
        f"gs://{bundles.bucket_name}",
        "--driver-version",
        "2.3.0",
        "--cache",
        f"gs://{cache.bucket_name}/drivers",
    )
    plan = json.loads(result.stdout)
    assert plan["inputs"]["kernels"] == 3
    assert plan["summary"]["done"] == 2 and plan["summary"]["to_build"] == 4
    assert "not!a!kernel" in plan["inputs"]["kernel_problems"][0]


def test_missing_bucket_exits_2_naming_it(gcs):
    result = drivers(
        "plan", "--kernels", "gs://no-such-bucket-here", "--driver-version", "2.3.0", check=False
    )
    assert result.returncode == 2 and "no-such-bucket-here" in result.stderr
