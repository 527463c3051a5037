"""Safe extraction (drivers.build.safetar): every refusal on its own, each with an archive
that would put something outside the destination (or where it must not be) if the check
were missing; plus the tar formats and streaming paths it must read like tarfile."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile

import pytest

from drivers.build import safetar
from drivers.build.safetar import UnsafeArchive, safe_extract
from tarballs import tgz

# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([("../x", "file", "x")], "'..'"),
        ([("a/../../x", "file", "x")], "'..'"),
        ([("/etc/x", "file", "x")], "absolute"),
        ([("link", "symlink", "/etc/passwd")], "outside the tree"),
        ([("a", "dir", ""), ("a/link", "symlink", "../../x")], "outside"),
        # In-tree-looking links chained: a -> . makes a/b -> ../x land above the tree.
        ([("a", "symlink", "."), ("a/b", "symlink", "../x")], "outside"),
        ([("f", "file", "x"), ("h", "hardlink", "../f")], "outside the tree"),
        ([("h", "hardlink", "/etc/passwd")], "outside the tree"),
        ([("dev", "chr", "")], "device"),
        ([("pipe", "fifo", "")], "fifo"),
    ],
)
def test_safe_extract_refuses_members_that_leave_the_tree(tmp_path, members, words):
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(*members))
    dest = tmp_path / "deep" / "dest"

    with pytest.raises(UnsafeArchive, match="bundle-x.tgz") as e:
        safe_extract(archive, dest)

    assert words in str(e.value)
    assert not (tmp_path / "deep" / "x").exists() and not (tmp_path / "x").exists()


def test_safe_extract_keeps_in_tree_links_and_executable_bits(tmp_path):
    archive = tmp_path / "ok.tgz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        script = tarfile.TarInfo("tree/scripts/run")
        script.size, script.mode = 3, 0o755
        tf.addfile(script, io.BytesIO(b"hi\n"))
        link = tarfile.TarInfo("tree/other/scripts")
        link.type, link.linkname = tarfile.SYMTYPE, "../scripts"
        tf.addfile(link)
    archive.write_bytes(buf.getvalue())

    assert safe_extract(archive, tmp_path / "out") == 2
    assert (tmp_path / "out/tree/other/scripts/run").read_text() == "hi\n"
    assert os.access(tmp_path / "out/tree/scripts/run", os.X_OK)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_safe_extract_reads_long_names_in_every_tar_format_like_tarfile(tmp_path, fmt):
    long_dir = "/".join(["folder-with-a-long-name"] * 5)  # 119 characters
    files = {f"{long_dir}/header-{i}.h": f"#define N{i} {i}\n".encode() * (i + 1) for i in range(3)}
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold a last part over 100 characters
        files[f"{long_dir}/{'x' * 120}.h"] = b"long\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 315_532_800
            tf.addfile(info, io.BytesIO(data))
        if fmt != tarfile.USTAR_FORMAT:
            link = tarfile.TarInfo("short-link")
            link.type, link.linkname = tarfile.SYMTYPE, f"{long_dir}/{'x' * 120}.h"
            tf.addfile(link)
    archive = tmp_path / "formats.tgz"
    archive.write_bytes(buf.getvalue())

    safe_extract(archive, tmp_path / "out")

    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
        assert (tmp_path / "out" / name).stat().st_mtime == 315_532_800
    if fmt != tarfile.USTAR_FORMAT:
        assert (tmp_path / "out/short-link").read_bytes() == b"long\n"


def test_safe_extract_streams_a_large_member_and_lets_a_later_duplicate_win(tmp_path):
    big = os.urandom(9 << 20)  # above the size written while inflating
    archive = tmp_path / "big.tgz"
    archive.write_bytes(
        tgz(
            ("vmlinux", "file", big),
            ("dup", "file", "first"),
            ("dup", "file", "second"),
            ("hard", "hardlink", "dup"),
        )
    )

    assert safe_extract(archive, tmp_path / "out") == 4
    assert (tmp_path / "out/vmlinux").read_bytes() == big
    assert (tmp_path / "out/dup").read_text() == "second"
    assert (tmp_path / "out/hard").read_text() == "second"


# a -> c/.. is d while c -> d/e; a later member replaces c by c -> ., and a points above.
AIMED_INSIDE = (("d/e", "dir", ""), ("c", "symlink", "d/e"), ("a", "symlink", "c/.."))
RE_AIMED = ("c", "symlink", ".")


def test_safe_extract_refuses_a_link_re_aimed_out_of_the_tree_by_a_later_member(tmp_path):
    archive = tmp_path / "reaim.tgz"
    archive.write_bytes(tgz(*AIMED_INSIDE, RE_AIMED))
    with pytest.raises(UnsafeArchive, match="'a' ends outside the tree"):
        safe_extract(archive, tmp_path / "out")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (gzip.compress(b""), "truncated"),
        (b"\x1f\x8b this is not a bundle", "decompressing"),  # gzip magic, then garbage
        (gzip.compress(os.urandom(4096)), "checksum"),
        (gzip.compress(tgz(("f", "file", os.urandom(2048)))), "checksum"),  # gzip in gzip
        (tgz(("f", "file", os.urandom(100_000)))[:50_000], "truncated"),
    ],
)
def test_safe_extract_reports_data_that_is_not_a_tar_archive(tmp_path, data, words):
    archive = tmp_path / "junk.tgz"
    archive.write_bytes(data)
    with pytest.raises(UnsafeArchive, match="not a readable .tgz") as e:
        safe_extract(archive, tmp_path / "out")
    assert words in str(e.value)


def test_a_link_out_of_the_tree_is_refused_when_it_is_made_not_only_at_the_end(tmp_path):
    # Refused at once: nothing later in the archive may be written through it.
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(("a", "dir", ""), ("a/up", "symlink", "../.."), ("z", "file", "x")))
    with pytest.raises(UnsafeArchive, match="member 'a/up' links to '../..', outside the tree"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "z").exists()


def test_an_absolute_link_is_refused_even_when_it_points_into_the_tree(tmp_path):
    dest = tmp_path / "dest"
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(("f", "file", "x"), ("link", "symlink", str(dest / "f"))))
    # The tree moves (it is extracted once per attempt): an absolute link would not follow.
    with pytest.raises(UnsafeArchive, match="'link' links to .*, outside the tree"):
        safe_extract(archive, dest)


@pytest.mark.parametrize(
    ("kind", "words"),
    [("blk", "a block device"), (b"S", "a sparse file"), (b"V", "of unsupported tar type b'V'")],
)
def test_members_that_are_not_files_folders_or_links_are_refused(tmp_path, kind, words):
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(("odd", kind, "")))
    with pytest.raises(UnsafeArchive, match=f"member 'odd' is {words}"):
        safe_extract(archive, tmp_path / "out")
    assert not os.path.lexists(tmp_path / "out" / "odd")


def test_a_hard_link_to_a_name_that_is_not_an_earlier_file_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "there").write_text("not the archive's")  # on disk, not in the archive
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(("h", "hardlink", "there")))
    with pytest.raises(UnsafeArchive, match="'h' links to 'there', not an earlier file"):
        safe_extract(archive, tmp_path / "out")
    assert not os.path.lexists(tmp_path / "out" / "h")


def test_a_hard_link_to_an_earlier_file_moved_out_by_a_re_aimed_link_is_refused(tmp_path):
    # a/f lands in d; once c is re-aimed, a/f is above the tree, and a hard link to it
    # would make a file outside the tree appear inside.
    (tmp_path / "f").write_text("secret")
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(
        tgz(*AIMED_INSIDE, ("a/f", "file", "in d"), RE_AIMED, ("h", "hardlink", "a/f"))
    )
    with pytest.raises(UnsafeArchive, match="'h' links to 'a/f', outside the tree"):
        safe_extract(archive, tmp_path / "out")
    assert not os.path.lexists(tmp_path / "out" / "h")


def test_a_member_whose_folder_a_re_aimed_link_moved_out_of_the_tree_is_refused(tmp_path):
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(
        tgz(
            ("d/e", "dir", ""),
            ("c", "symlink", "d/e"),
            ("a", "symlink", "c/.."),
            ("c", "symlink", "."),  # now a -> ./.. : above the tree
            ("a/x", "file", "x"),
        )
    )
    with pytest.raises(UnsafeArchive, match="'a/x' lies outside the tree"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "members",
    [
        [("a", "file", "x"), ("a/b", "file", "y")],  # a folder where a file is
        [("d", "dir", ""), ("d", "file", "y")],  # a file where a folder is (writer thread)
        [("d/f", "file", "x"), ("d", "symlink", "e")],  # a link where a folder is
    ],
)
def test_members_that_clash_with_earlier_ones_are_refused(tmp_path, members):
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(*members))
    with pytest.raises(UnsafeArchive, match="clashes with an earlier member"):
        safe_extract(archive, tmp_path / "out")


def test_more_members_than_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safetar, "MAX_MEMBERS", 3)
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(*[(f"f{i}", "file", "x") for i in range(4)]))
    with pytest.raises(UnsafeArchive, match="more than 3 members"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "f3").exists()


def test_more_bytes_than_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safetar, "MAX_EXTRACTED_BYTES", 10_000)
    archive = tmp_path / "bundle-x.tgz"
    archive.write_bytes(tgz(("small", "file", b"x" * 6000), ("big", "file", b"y" * 6000)))
    with pytest.raises(UnsafeArchive, match="10000 bytes"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "big").exists()


def test_setuid_and_group_or_other_write_bits_are_dropped(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, mode in (("suid", 0o4777), ("plain", 0o666)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = 1, mode
            tf.addfile(info, io.BytesIO(b"x"))
    archive = tmp_path / "modes.tgz"
    archive.write_bytes(buf.getvalue())

    safe_extract(archive, tmp_path / "out")

    assert stat.S_IMODE((tmp_path / "out/suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out/plain").stat().st_mode) == 0o644


def test_concatenated_gzip_members_are_read_as_one_stream(tmp_path):
    data = tgz(("a", "file", "first"), ("b", "file", "second"))
    plain = gzip.decompress(data)
    half = len(plain) // 1024 * 512  # on a tar block boundary
    archive = tmp_path / "two-members.tgz"
    archive.write_bytes(gzip.compress(plain[:half]) + gzip.compress(plain[half:]))

    assert safe_extract(archive, tmp_path / "out") == 2
    assert (tmp_path / "out/b").read_text() == "second"
