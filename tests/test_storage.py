"""ObjectStore against the real fake-gcs-server (fixtures in conftest.py)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import google_crc32c
import pytest

from drivers.store.storage import (
    BucketNotFound,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    UploadResult,
    client_from_environment,
    parse_gs_uri,
)


def b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def b64_crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_client_from_environment_talks_to_the_emulator(gcs):
    client = client_from_environment()
    assert client.project == "embedded"
    assert client._connection.API_BASE_URL == gcs.url


def test_listing_pages_through_everything_with_all_fields(store):
    s = store(page_size=7)
    contents = {f"2.3.0/collector-5.4.0-{i}-generic.ko.gz": b"x" * i for i in range(25)}
    s.upload_many(contents.items())
    before = datetime.now(UTC)

    listed = list(s.list())

    assert s.requests_made == 4  # 7 + 7 + 7 + 4
    assert [o.name for o in listed] == sorted(contents)
    for o in listed:
        data = contents[o.name]
        assert o.size == len(data)
        assert o.md5 == b64_md5(data)
        assert o.crc32c == b64_crc32c(data)
        assert isinstance(o.generation, int) and o.generation > 0
        assert before - timedelta(minutes=5) < o.created <= before + timedelta(seconds=1)


def test_list_filters_by_prefix_then_glob_on_the_full_name(store):
    s = store()
    names = [
        "2.3.0/collector-5.4.0-1-generic.ko.gz",
        "2.3.0/collector-ebpf-5.4.0-1-generic.o.gz",
        "2.3.0/.collector-ebpf-3.10.0-957.el7.x86_64.unavail",
        "2.3.0-rc1/collector-5.4.0-1-generic.ko.gz",
        "2.2.0/collector-5.4.0-1-generic.ko.gz",
    ]
    s.upload_many((n, b"") for n in names)

    def listed(**kwargs) -> set[str]:
        return {o.name for o in s.list(**kwargs)}

    assert listed(prefix="2.3.0/") == set(names[:3])
    assert listed(prefix="2.3.0") == set(names[:4])  # a prefix is a string prefix, not a dir
    assert listed(prefix="2.3.0/", glob="*.ko.gz") == {names[0]}
    assert listed(glob="*/collector-*.ko.gz") == {names[0], names[3], names[4]}
    assert listed(glob="*.unavail") == {names[2]}
    assert listed(prefix="9.9.9/") == set()


def test_upload_new_never_overwrites_and_tells_identical_from_different(store):
    s = store()
    name = "2.3.0/collector-5.4.0-1-generic.ko.gz"

    assert s.upload_new(name, b"first build") is UploadResult.CREATED
    generation = s.info(name).generation
    # Same bytes again, e.g. a retry whose first attempt landed: success, nothing rewritten.
    assert s.upload_new(name, b"first build") is UploadResult.IDENTICAL
    assert s.upload_new(name, b"other build") is UploadResult.DIFFERENT
    # Same size, other bytes: the checksum, not the size, decides.
    assert s.upload_new(name, b"first bui1d") is UploadResult.DIFFERENT

    assert s.download(name) == b"first build"
    assert s.info(name).generation == generation


def test_upload_new_file_has_the_same_no_clobber_outcomes(store, tmp_path: Path):
    s = store()
    first, other = tmp_path / "first.ko.gz", tmp_path / "other.ko.gz"
    first.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 100)
    other.write_bytes(b"\x1f\x8b" + bytes(range(255, -1, -1)) * 100)

    assert s.upload_new_file("v/m.ko.gz", first) is UploadResult.CREATED
    assert s.upload_new_file("v/m.ko.gz", first) is UploadResult.IDENTICAL
    assert s.upload_new_file("v/m.ko.gz", other) is UploadResult.DIFFERENT
    assert s.download("v/m.ko.gz") == first.read_bytes()


def test_gzip_objects_are_stored_without_content_encoding(store):
    # With Content-Encoding: gzip, GCS would gunzip drivers on download.
    s = store()
    s.upload_new("v/collector-k.ko.gz", b"\x1f\x8bdata")
    blob = s.client.bucket(s.bucket_name).get_blob("v/collector-k.ko.gz")
    assert blob.content_encoding is None
    assert blob.content_type == "application/gzip"
    assert s.download("v/collector-k.ko.gz") == b"\x1f\x8bdata"


def test_parallel_upload_and_download_round_trip(store, tmp_path: Path):
    s = store()
    items: list[tuple[str, bytes | Path]] = []
    expected: dict[str, bytes] = {}
    for i in range(120):
        name, data = f"{i % 3}.0.0/collector-k{i}.ko.gz", f"driver {i}".encode() * (i + 1)
        expected[name] = data
        if i % 2:
            path = tmp_path / "src" / f"{i}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            items.append((name, path))
        else:
            items.append((name, data))

    assert s.upload_many(items, workers=16) == dict.fromkeys(expected, UploadResult.CREATED)
    assert s.upload_many(items, workers=16) == dict.fromkeys(expected, UploadResult.IDENTICAL)

    dest = tmp_path / "dest"
    paths = s.download_many(expected, dest, workers=16)

    assert set(paths) == set(expected)
    for name, data in expected.items():
        assert paths[name] == (dest / name).resolve()
        assert paths[name].read_bytes() == data
    # No temporary files left next to the downloads.
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == sorted(
        Path(n).name for n in expected
    )


def test_download_many_refuses_names_that_escape_the_destination(store, tmp_path: Path):
    with pytest.raises(ValueError, match="outside"):
        store().download_many(["../escaped.ko.gz"], tmp_path / "dest")


def test_missing_bucket_errors_name_the_bucket_and_the_setting(gcs, monkeypatch):
    monkeypatch.setenv("DRIVERS_BUCKET_DRIVERS", "no-such-drivers-bucket")
    s = ObjectStore(client_from_environment(), "no-such-drivers-bucket")

    for attempt in (
        lambda: list(s.list()),
        lambda: s.download("2.3.0/x.ko.gz"),
        lambda: s.info("2.3.0/x.ko.gz"),
        lambda: s.exists("2.3.0/x.ko.gz"),
        lambda: s.upload_new("2.3.0/x.ko.gz", b"x"),
    ):
        with pytest.raises(BucketNotFound) as caught:
            attempt()
        message = str(caught.value)
        assert "'no-such-drivers-bucket' does not exist" in message
        assert "DRIVERS_BUCKET_DRIVERS" in message
        assert gcs.url in message
        assert isinstance(caught.value, StorageError)


def test_missing_bucket_of_no_known_role_points_at_the_settings(gcs):
    s = ObjectStore(client_from_environment(), "some-unconfigured-bucket")
    with pytest.raises(BucketNotFound, match=r"some-unconfigured-bucket.*DRIVERS_BUCKET_<ROLE>"):
        s.download("x")


def test_missing_object_errors_name_the_object(store, tmp_path: Path):
    s = store()
    s.upload_new("present", b"x")
    uri = f"gs://{s.bucket_name}/2.3.0/missing.ko.gz"

    with pytest.raises(ObjectNotFound, match=uri):
        s.download("2.3.0/missing.ko.gz")
    with pytest.raises(ObjectNotFound, match=uri):
        s.info("2.3.0/missing.ko.gz")
    with pytest.raises(ObjectNotFound, match=uri):
        s.download_to("2.3.0/missing.ko.gz", tmp_path / "m.ko.gz")
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind
    assert s.exists("2.3.0/missing.ko.gz") is False
    assert s.exists("present") is True


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("gs://bucket/some/prefix", ("bucket", "some/prefix")),
        ("gs://bucket/some/prefix/", ("bucket", "some/prefix/")),
        ("gs://bucket/", ("bucket", "")),
        ("gs://bucket", ("bucket", "")),
    ],
)
def test_parse_gs_uri_splits_bucket_and_prefix(uri, expected):
    assert parse_gs_uri(uri) == expected


@pytest.mark.parametrize("uri", ["bucket/prefix", "s3://bucket/p", "gs://", "gs:///prefix", ""])
def test_parse_gs_uri_rejects_other_strings_naming_them(uri):
    with pytest.raises(ValueError, match=f"not a gs:// URI: {uri!r}"):
        parse_gs_uri(uri)
