"""shards.reader: members as stored, grouping, per-URL errors after the readable samples, typed samples."""

from __future__ import annotations

import io
import tarfile

import pytest

from shards.reader import (
    RawSample,
    ShardReadError,
    iter_samples,
    raw_samples,
    split_name,
    tar_samples,
    to_sample,
)
from shards.schema import SampleRecord, SchemaError
from shards.writer import ShardWriter, build_tar


def raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with the members in the given order (build_tar sorts them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_all(data: bytes, url: str = "u.tar") -> tuple[list[RawSample], str | None]:
    got, error = [], None
    try:
        for s in tar_samples(io.BytesIO(data), url):
            got.append(s)
    except ShardReadError as e:
        error = str(e)
    return got, error


def test_members_are_grouped_by_key_with_names_exactly_as_stored():
    data = raw_tar(
        [
            ("a.jpg", b"1"),
            ("a.json", b"2"),
            ("evil/x.jpg", b"3"),
            ("../x.jpg", b"4"),
            ("b.JPG", b"5"),
            ("b.seg.png", b"6"),
            ("README", b"7"),
        ]
    )
    got, error = read_all(data)
    assert error is None
    assert [(s.key, s.members, s.names) for s in got] == [
        ("a", {"jpg": b"1", "json": b"2"}, ("a.jpg", "a.json")),
        ("evil/x", {"jpg": b"3"}, ("evil/x.jpg",)),
        ("../x", {"jpg": b"4"}, ("../x.jpg",)),
        ("b", {"JPG": b"5", "seg.png": b"6"}, ("b.JPG", "b.seg.png")),
        ("README", {"": b"7"}, ("README",)),
    ]
    assert {s.url for s in got} == {"u.tar"}


def test_names_split_as_webdataset_splits_them():
    from webdataset.tariterators import base_plus_ext

    for name in ["a.jpg", "a.seg.png", "evil/x.jpg", "../x.jpg", "d.v/x.y.json", ".hidden", "a.", "README", "d/"]:
        key, ext = base_plus_ext(name)
        assert split_name(name) == ((name, "") if key is None else (key, ext)), name
    assert split_name("d.v/x.y.json") == ("d.v/x", "y.json")


def test_a_key_stored_twice_is_used_once_and_named():
    data = raw_tar([("a.jpg", b"1"), ("a.jpg", b"2"), ("b.json", b"3"), ("a.json", b"4")])
    got, error = read_all(data)
    assert [(s.key, s.members) for s in got] == [("a", {"jpg": b"1"}), ("b", {"json": b"3"})]
    assert error == ("u.tar: member 'a.jpg': key 'a' is stored twice: this later copy is not used; "
                     "member 'a.json': key 'a' is stored twice: this later copy is not used")
    problems = []
    assert [s.key for s in tar_samples(io.BytesIO(data), "u.tar", problems)] == ["a", "b"]
    assert [(p.key, p.member) for p in problems] == [("a", "a.jpg"), ("a", "a.json")]


def test_directories_are_not_members():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        info = tarfile.TarInfo("dir/k.json")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    got, error = read_all(buf.getvalue())
    assert error is None and [s.names for s in got] == [("dir/k.json",)]


def test_truncation_raises_after_the_readable_samples():
    members = [("a.jpg", b"1" * 600), ("a.json", b"2"), ("b.jpg", b"3" * 600), ("b.json", b"4")]
    data = raw_tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        infos = t.getmembers()
    # Cut inside b.jpg's data: a is whole, b's partial member is not handed out.
    got, error = read_all(data[: infos[2].offset_data + 10])
    assert [s.key for s in got] == ["a"] and error.startswith("u.tar: ReadError")
    # Cut exactly at a header boundary: tarfile stops quietly, the reader does not.
    got, error = read_all(data[: infos[2].offset])
    assert [s.key for s in got] == ["a"] and error == f"u.tar: truncated: no end-of-archive marker after byte {infos[2].offset}"
    # Cut inside the end-of-archive marker.
    end = infos[3].offset_data + 512
    got, error = read_all(data[: end + 512])
    assert [s.key for s in got] == ["a", "b"] and error == "u.tar: truncated: the end-of-archive marker is cut short"
    got, error = read_all(data[: end + 1024])
    assert [s.key for s in got] == ["a", "b"] and error is None
    # Garbage after the last member instead of the marker.
    got, error = read_all(data[:end] + b"garbage" * 200)
    assert [s.key for s in got] == ["a", "b"] and "corrupt after byte" in error


def test_raw_samples_goes_on_after_a_bad_url_with_on_error(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(build_tar([("k.jpg", b"1"), ("k.json", b"2")]))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    missing = str(tmp_path / "missing.tar")
    errors: list[ShardReadError] = []
    got = list(raw_samples([str(bad), missing, str(good)], on_error=errors.append))
    assert [(s.key, s.url) for s in got] == [("k", str(good))]
    assert [e.url for e in errors] == [str(bad), missing]
    assert str(errors[1]).startswith(f"{missing}: FileNotFoundError")
    with pytest.raises(ShardReadError, match="bad.tar: ReadError"):
        list(raw_samples([str(good), str(bad)]))


def test_fsspec_urls_read_like_local_paths():
    import fsspec

    with fsspec.open("memory://reader-test/0.tar", "wb") as f:
        f.write(build_tar([("k.jpg", b"1"), ("k.json", b"2")]))
    got = list(raw_samples(["memory://reader-test/0.tar"]))
    assert [(s.key, s.members) for s in got] == [("k", {"jpg": b"1", "json": b"2"})]


def test_iter_samples_round_trips_the_writer(tmp_path):
    rec = SampleRecord(key="k0", width=4, height=3, original_width=4, original_height=3, caption="c")
    with ShardWriter(str(tmp_path), 0) as w:
        w.add(rec, b"\xff\xd8fake", "jpg")
    (s,) = list(iter_samples(str(tmp_path)))
    assert (s.record, s.image_bytes, s.image_ext) == (rec, b"\xff\xd8fake", "jpg")
    with pytest.raises(KeyError, match="'k0' has no image member"):
        to_sample(RawSample("k0", "u", {"json": rec.to_json_bytes()}, ("k0.json",)))
    with pytest.raises(KeyError, match="'k' has no json member"):
        to_sample(RawSample("k", "u", {"jpg": b""}, ("k.jpg",)))
    # The record's key must be its member name's, and a sample holds one image: else which is meant?
    with pytest.raises(SchemaError, match="u key 'k': field 'key' is 'k0', not its member name's 'k'"):
        to_sample(RawSample("k", "u", {"json": rec.to_json_bytes(), "jpg": b""}, ("k.json", "k.jpg")))
    with pytest.raises(SchemaError, match=r"u key 'k0': holds 2 images \(jpg, png\); a sample has one"):
        to_sample(RawSample("k0", "u", {"json": rec.to_json_bytes(), "jpg": b"", "png": b""}, ("k0.json", "k0.jpg", "k0.png")))
