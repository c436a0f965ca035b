"""Exact epochs and resume anywhere (issue 19): every usable sample once per epoch over all ranks and workers,
repeats counted, a resume re-split onto another world size, worker count or batch size; the byte ranges
the stream reads samples by (shards.offsets)."""

from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hostile_fixture import QuietHandler, served
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from s3_fixture import s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_stream import config, fingerprint, jpeg, record, write_dataset

import shards.offsets
from shards.dataset import list_shards, read_stats
from shards.offsets import read_ranges, scan_spans, shard_spans, span_sample
from shards.reader import ShardReadError, tar_samples
from shards.writer import OFFSET_COLUMNS, ShardWriter, member_offsets
from training.data.plan import Plan, pass_order, rank_positions
from training.data.stream import build_loader, merge_states

# --- the plan alone: many shapes, no decoding ----------------------------------------------------------


def deliver(plan: Plan, epoch: int, position: int, world: int, batch: int, workers: int, stop: int | None = None):
    """What a segment hands out, as the loader runs it: per global batch, per rank, the (positions, ids,
    repeats) of its batch, made by worker ``k % workers`` and handed out in the DataLoader's round robin."""
    total = plan.batches(position, world * batch)
    stop = total if stop is None else stop
    out = []
    for rank in range(world):
        # Each worker's batches in its own order, then interleaved as the DataLoader does.
        made = {w: [k for k in range(w, total, max(1, workers))] for w in range(max(1, workers))}
        order = [made[k % max(1, workers)][k // max(1, workers)] for k in range(total)]
        assert order == list(range(total))
        for k in order[:stop]:
            p = rank_positions(position, k, rank, world, batch)
            ids, repeats = plan.sample_ids(epoch, p)
            out.append((k, rank, p, ids, repeats))
    return sorted(out, key=lambda t: (t[0], t[1]))


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    topology=st.tuples(st.integers(1, 4), st.integers(0, 2), st.integers(1, 4)),
    after=st.tuples(st.integers(1, 4), st.integers(0, 2), st.integers(1, 4)),
    stop=st.floats(0, 1),
    block=st.sampled_from([0, 1, 4, 1000]),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 3),
)
def test_an_exact_epoch_resumed_anywhere_delivers_every_sample_once_plus_counted_repeats(
    sizes, topology, after, stop, block, seed, epoch
):
    plan = Plan(sizes, [len(sizes)], seed=seed, block=block)
    (world, workers, batch), (world2, workers2, batch2) = topology, after
    first_total = plan.batches(0, world * batch)
    stop_at = int(stop * first_total)
    first = deliver(plan, epoch, 0, world, batch, workers, stop=stop_at)
    position = min(stop_at * world * batch, plan.samples)  # what state_dict() records
    second = deliver(plan, epoch, position, world2, batch2, workers2) if position < plan.samples else []
    slots = first + second
    ids = np.concatenate([s[3] for s in slots]) if slots else np.zeros(0, np.int64)
    repeats = np.concatenate([s[4] for s in slots]) if slots else np.zeros(0, bool)
    # Every sample exactly once, in the pass's order, then the repeats, fewer than one global batch.
    assert ids[~repeats].tolist() == pass_order(sizes, seed, epoch, block).tolist()
    last_global = (world2 * batch2) if second else (world * batch)
    assert repeats.sum() == len(ids) - plan.samples < last_global
    assert not repeats[:-last_global].any() if len(ids) > last_global else True
    # Every rank hands out as many batches in each segment.
    for seg in (first, second):
        per_rank = Counter(r for _, r, *_ in seg)
        assert len(set(per_rank.values())) <= 1


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
    world=st.integers(1, 4),
    batch=st.integers(1, 4),
    epoch_samples=st.integers(1, 40),
)
def test_epoch_samples_cut_one_endless_sequence_of_passes(sizes, world, batch, epoch_samples):
    plan = Plan(sizes, [len(sizes)], seed=3, block=4, epoch_samples=epoch_samples)
    g = world * batch
    got = []
    for epoch in range(3):
        for _, _, p, ids, repeats in deliver(plan, epoch, 0, world, batch, 1):
            assert not repeats.any()
            got.append((epoch * epoch_samples + p, ids))
    # Positions past an epoch's last whole global batch are not delivered; the others are each pass in order.
    passes = np.concatenate([pass_order(sizes, 3, q, 4) for q in range(3 * epoch_samples // plan.samples + 2)])
    for absolute, ids in got:
        assert ids.tolist() == passes[absolute].tolist()
    assert len(got) == 3 * world * (epoch_samples // g)


# --- the loader: real shards, real DataLoader workers -------------------------------------------------


def corrupt_in_place(root: Path, shard: int, key: str, member: str) -> None:
    """Spoil one member's bytes without changing its length: the stats file's size still holds."""
    tar = root / f"{shard:06d}.tar"
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as t:
        info = t.getmember(f"{key}.{member}")
    data[info.offset_data : info.offset_data + info.size] = (b"[" if member == "json" else b"\0") * info.size
    tar.write_bytes(bytes(data))


def run_ranks(cfg, world: int, state: dict | None = None, stop: int | None = None):
    """Each rank's keys and per-sample fingerprints, in position order, until ``stop`` batches; the state."""
    loaders = [build_loader(cfg, rank=r, world_size=world, state=state) for r in range(world)]
    per_rank = []
    for lo in loaders:
        got = []
        for batch in lo:
            got.append(batch)
            if len(got) == stop:
                break
        per_rank.append(got)
    merged = merge_states([lo.state_dict() for lo in loaders])
    counts = sum((Counter(lo.counters()) for lo in loaders), Counter())
    # Each sample carries its (epoch, position): together the ranks hand out consecutive positions.
    samples = sorted(
        (*b["stream_position"][i].tolist(), b["key"][i], float(b["pixel_values"][i].double().sum()))
        for got in per_rank
        for b in got
        for i in range(len(b["key"]))
    )
    start = state["position"] if state else 0
    assert [s[:2] for s in samples] == [(samples[0][0], start + i) for i in range(len(samples))]
    return [s[2:] for s in samples], merged, counts, loaders


@pytest.mark.parametrize("batch_size", [2, 3])
def test_the_13_15_6_shards_on_two_ranks_and_two_workers_deliver_each_sample_once(tmp_path, batch_size):
    keys = write_dataset(tmp_path, [13, 15, 6])
    cfg = config([tmp_path], batch_size=batch_size, num_workers=2)
    got, _, counts, loaders = run_ranks(cfg, 2)
    delivered = Counter(k for k, _ in got)
    assert set(delivered) == set(keys) and len(got) == 36 and len(loaders[0]) == 36 // (2 * batch_size)
    assert sum(delivered.values()) - len(keys) == counts["repeat/even_out"] == 2  # 34 -> 36 slots
    assert counts == {"repeat/even_out": 2}


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(sizes=[13, 15, 6], topology=(2, 2, 2), after=(3, 1, 3), stop=0.5, seed=0)  # the shards
@example(sizes=[0, 1, 7, 1], topology=(1, 0, 1), after=(3, 2, 2), stop=0.3, seed=1)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=2, max_size=4).filter(lambda s: sum(s) >= 4),
    topology=st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(1, 3)),
    after=st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(1, 3)),
    stop=st.floats(0, 1, exclude_max=True),
    seed=st.integers(0, 1000),
)
def test_real_workers_filters_a_bad_sample_and_a_resume_on_another_topology(sizes, topology, after, stop, seed):
    (world, workers, batch), (world2, workers2, batch2) = topology, after
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = write_dataset(root, sizes, seed=seed)
        bad = keys[0]  # bad JSON: the index counts it and leaves it out
        corrupt_in_place(root, int(bad[1 : bad.index("x")]), bad, "json")
        objects = {}  # the others' object counts: a sample with one object is filtered out
        for shard in list_shards(str(root)):
            with tarfile.open(shard.tar) as t:
                for m in t.getmembers():
                    if m.name.endswith(".json") and m.name[:-5] != bad:
                        objects[m.name[:-5]] = len(json.loads(t.extractfile(m).read())["objects"])
        kept = {k for k, n in objects.items() if n >= 2}
        if not kept:
            return
        cfg = config([root], batch_size=batch, num_workers=workers, filters={"min_objects": 2}, seed=seed)
        total = len(build_loader(cfg, world_size=world))
        stop_at = int(stop * total)
        first, state, c1, _ = run_ranks(cfg, world, stop=stop_at) if stop_at else ([], None, Counter(), None)
        cfg2 = config([root], batch_size=batch2, num_workers=workers2, filters={"min_objects": 2}, seed=seed)
        second, _, c2, loaders = run_ranks(cfg2, world2, state=state)
        delivered = Counter(k for k, _ in first + second)
        counts = c2 if state else c1 + c2  # a resumed rank 0 carries the counts of the run before
        assert set(delivered) == kept
        assert sum(delivered.values()) - len(kept) == counts.get("repeat/even_out", 0) < world2 * batch2
        assert counts["error/bad_json"] == 1
        assert counts["filtered/too_few_objects"] == len(objects) - len(kept)
        assert loaders[0].epoch == 1 and all(lo.epoch == 1 for lo in loaders)


def test_a_resume_on_other_world_size_workers_and_batch_size_continues_the_global_order(tmp_path):
    write_dataset(tmp_path, [7, 0, 11, 1, 5])  # 24 samples
    reference, _, _, _ = run_ranks(config([tmp_path], batch_size=1, num_workers=0), 1)
    assert len(reference) == 24
    # 2 ranks x 2 workers x batch 2 for 3 batches (12 positions), then 3 ranks x 1 worker x batch 3.
    first, state, _, _ = run_ranks(config([tmp_path], batch_size=2, num_workers=2), 2, stop=3)
    assert (state["epoch"], state["position"], state["batches"]) == (0, 12, 3)
    after = config([tmp_path], batch_size=3, num_workers=1)
    assert len(build_loader(after, rank=2, world_size=3, state=state)) == 3 + 2  # 12 left: 2 global batches of 9
    second, _, counts, loaders = run_ranks(after, 3, state=state)
    assert len(second) == 18 and loaders[0].epoch == 1  # 12 positions and 6 repeats
    # The same samples at the same positions, augmented the same: position seeds every draw.
    assert first + second[:12] == reference
    assert [k for k, _ in second[12:]] == [k for k, _ in reference[:6]]
    assert counts == {"repeat/even_out": 6}


def test_a_finished_epoch_is_saved_as_the_start_of_the_next(tmp_path):
    write_dataset(tmp_path, [5, 4])
    cfg = config([tmp_path], batch_size=2)
    loader = build_loader(cfg)
    batches = list(loader)
    assert len(batches) == 5 and loader.epoch == 1
    loader = build_loader(cfg)
    for i, _ in enumerate(loader):
        if i == 4:  # the epoch's last batch handed out, the loader not yet past it
            assert loader.epoch == 0
            state = loader.state_dict()
            break
    assert (state["epoch"], state["position"], state["batches"]) == (1, 0, 0)
    resumed = build_loader(cfg, state=state)
    assert [fingerprint(b) for b in resumed] == [fingerprint(b) for b in build_loader(cfg, epoch=1)]


def test_counters_of_the_old_ranks_go_to_the_new_rank_0(tmp_path):
    write_dataset(tmp_path, [6, 6])
    cfg = config([tmp_path], batch_size=1, filters={"min_objects": 2})
    _, state, counts, _ = run_ranks(cfg, 2, stop=2)
    assert counts["filtered/too_few_objects"] > 0
    resumed = [build_loader(cfg, rank=r, world_size=3, state=state) for r in range(3)]
    assert resumed[0].counters() == dict(counts) and resumed[1].counters() == resumed[2].counters() == {}


# --- byte ranges: what the writer records, reading them, older shards ---------------------------------


def test_the_writer_records_each_samples_byte_ranges_and_a_span_reads_back_as_that_sample(tmp_path):
    rng = np.random.default_rng(0)
    long_key = "k" * 100  # a GNU long name: its header runs over three blocks
    with ShardWriter(str(tmp_path), 0) as w:
        for key, ext in ((long_key, "jpg"), ("b", "png"), ("b-c", "webp"), ("z", "jpg")):
            w.add(record(key, rng), bytes(rng.integers(0, 255, 700 + len(key), dtype=np.uint8)), ext)
        w.add_failure("f", "src", "decode", "broken")
    df = pd.read_parquet(tmp_path / "000000.parquet")
    assert list(df.columns[-4:]) == list(OFFSET_COLUMNS) and df.loc[df.key == "f", "tar_offset"].isna().all()
    tar = (tmp_path / "000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for row in df[df.status == "ok"].itertuples():
            image = t.getmember(f"{row.key}.{row.image_ext}")
            meta = t.getmember(f"{row.key}.json")
            assert (row.image_offset, row.json_offset, row.json_bytes) == (image.offset_data, meta.offset_data, meta.size)
            assert row.tar_offset == min(image.offset, meta.offset)
    shard = list_shards(str(tmp_path))[0]
    spans = shard_spans(shard, read_stats(str(tmp_path), shard))
    assert spans.source == "parquet" and sorted(spans.keys) == sorted([long_key, "b", "b-c", "z"])
    assert list(spans.keys) == ["b-c", "b", long_key, "z"]  # tar order: '-' sorts before '.'
    for key, data, start in zip(spans.keys, read_ranges(shard.tar, spans.start, spans.end), spans.start, strict=True):
        raw = span_sample(data, shard.tar, int(start))
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            assert raw.key == key and raw.members == {
                n.split(".", 1)[1]: t.extractfile(n).read() for n in t.getnames() if n.split(".", 1)[0] == key
            }
    # An older shard (no offset columns) and one whose offsets do not fit are scanned: the same spans.
    for change in (lambda d: d.drop(columns=list(OFFSET_COLUMNS)), lambda d: d.assign(tar_offset=d.tar_offset[::-1].values)):
        change(df).to_parquet(tmp_path / "000000.parquet", index=False)
        scanned = shard_spans(shard, read_stats(str(tmp_path), shard))
        assert scanned.source == "scan" and scanned.keys == spans.keys and scanned.problems == ()
        for a in ("start", "end", "json_start", "json_end"):
            assert getattr(scanned, a).tolist() == getattr(spans, a).tolist()


def test_a_damaged_tar_is_not_used_and_a_changed_span_is_an_error_not_another_sample(tmp_path):
    write_dataset(tmp_path, [3])
    shard = list_shards(str(tmp_path))[0]
    stats = read_stats(str(tmp_path), shard)
    spans = shard_spans(shard, stats)
    assert len(spans) == 3
    tar = tmp_path / "000000.tar"
    tar.write_bytes(tar.read_bytes() + b"\0" * 512)
    damaged = shard_spans(shard, stats)
    assert len(damaged) == 0 and damaged.problems[0][0] == "corrupt_shard" and "recorded" in damaged.problems[0][1]
    data = tar.read_bytes()
    shifted = data[int(spans.start[1]) + 512 : int(spans.end[1]) + 512]
    with pytest.raises(ShardReadError, match="at 512"):
        span_sample(shifted, str(tar), 512)
    assert "the file is shorter" in str(read_ranges(str(tar), [len(data) - 10], [len(data) + 10])[0])


def test_an_older_tar_with_a_link_a_repeated_key_and_a_cut_is_scanned_as_the_reader_reads_it(tmp_path):
    rng = np.random.default_rng(1)
    members = [(f"{k}.{e}", jpeg(rng) if e == "jpg" else record(k, rng).to_json_bytes())
               for k, e in (("a", "jpg"), ("a", "json"), ("b", "jpg"), ("b", "jpg"), ("b", "json"),
                            ("c", "jpg"), ("c", "json"))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
            if i == 1:
                link = tarfile.TarInfo("l.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(link)
    data = buf.getvalue()
    last = list(member_offsets(io.BytesIO(data)))[-1]
    tar = tmp_path / "000000.tar"
    tar.write_bytes(data[: last.offset_data + 5])  # cut inside c.json
    spans = scan_spans(str(tar))
    # What shards.reader makes of the same tar: "a"; "b" (its first image only), then its later copy and
    # its JSON left out; "c" without its JSON; the link not read.
    read = []
    with pytest.raises(ShardReadError):  # the cut, after the samples before it
        for raw in tar_samples(io.BytesIO(tar.read_bytes()), str(tar), []):
            read.append(raw)
    assert [(r.key, sorted(r.members)) for r in read] == [("a", ["jpg", "json"]), ("b", ["jpg"]), ("c", ["jpg"])]
    assert spans.keys == ("a",) and [r for r, _ in spans.problems] == [
        "corrupt_shard", "corrupt_shard", "corrupt_shard", "corrupt_shard", "missing_member", "missing_member"]
    assert [m for _, m in spans.problems][:3] == [
        f"{tar}: member 'l.jpg' is not a file: not read",
        f"{tar}: member 'b.jpg': key 'b' is stored twice: this later copy is not used",
        f"{tar}: member 'b.json': key 'b' is stored twice: this later copy is not used",
    ]
    raw = span_sample(read_ranges(str(tar), spans.start, spans.end)[0], str(tar), int(spans.start[0]))
    assert raw.members == read[0].members


class RangeHandler(QuietHandler):
    """Answers ``Range: bytes=a-b`` with 206 and those bytes, as object stores and most servers do."""

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if match is None:
            return super().send_head()
        data = Path(self.translate_path(self.path)).read_bytes()
        start, end = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


@pytest.mark.parametrize("ranges", [True, False])
def test_an_http_dataset_streams_each_sample_once_with_or_without_byte_ranges(tmp_path, ranges, monkeypatch):
    keys = write_dataset(tmp_path / "ds", [5, 2, 4])
    copies = []
    real_copy = shards.offsets.local_copy

    def copy(url, folder, name):
        copies.append(url)
        return real_copy(url, folder, name)

    monkeypatch.setattr("training.data.index.local_copy", copy)
    with served(tmp_path, RangeHandler if ranges else QuietHandler) as url:
        got = [k for r in range(2) for b in build_loader(config([f"{url}/ds"], batch_size=2), rank=r, world_size=2)
               for k in b["key"]]
    assert set(got) == set(keys) and len(got) == 12
    assert len(copies) == (0 if ranges else 3 * 2)  # without ranges each rank copies each tar once


def test_an_s3_dataset_of_uneven_shards_streams_each_sample_once_over_ranks_and_workers(s3_bucket):  # noqa: F811
    keys = write_dataset(f"{s3_bucket}/uneven", [7, 0, 5, 1])  # ShardWriter straight to S3
    cfg = config([f"{s3_bucket}/uneven"], batch_size=2, num_workers=2)
    got = [k for r in range(2) for b in build_loader(cfg, rank=r, world_size=2) for k in b["key"]]
    assert set(got) == set(keys) and len(got) == 16  # 13 samples, 3 repeats


def test_a_rank_reads_only_the_byte_ranges_of_its_samples(tmp_path, monkeypatch):
    write_dataset(tmp_path, [8, 8, 8])
    tar_bytes = sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    cfg = config([tmp_path], batch_size=2)
    loader = build_loader(cfg, rank=1, world_size=3)  # the index is built: from here on, the workers' reads
    read = []
    real = shards.offsets.read_ranges

    def counting(url, starts, ends):
        read.extend(zip([url] * len(starts), [int(s) for s in starts], [int(e) for e in ends], strict=True))
        return real(url, starts, ends)

    monkeypatch.setattr("training.data.stages.read_ranges", counting)
    keys = [k for b in loader for k in b["key"]]
    assert len(read) == len(keys) == 8
    assert len(set(read)) == 8 and sum(e - s for _, s, e in read) < tar_bytes / 2.5  # a third of the samples
