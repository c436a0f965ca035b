"""The stream's index built once per job: ``StreamIndex.to_bytes`` / ``from_bytes`` round trips exactly and
refuses damaged bytes, and under a two-process gloo group only rank 0 reads JSON ranges, the other rank
receives the same index (rank 0's build errors included) and both stream the batches of loaders that built
their own."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hostile_fixture import served
from test_stream import config, fingerprint, write_dataset
from test_stream_epochs import corrupt_in_place

import training.data.index as index_module
from training.data.index import StreamIndex, build_index
from training.data.stream import build_loader

FIELDS = ("urls", "shard_sizes", "dataset_shards", "start", "end", "shard_first", "counts", "identity")


def assert_same_index(a: StreamIndex, b: StreamIndex) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype == np.int64 and x.tolist() == y.tolist(), name
        else:
            assert type(x) is type(y) and x == y, name


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two datasets, uneven shards (one empty), one bad JSON record and filtered samples: counts to carry."""
    root = tmp_path_factory.mktemp("shared")
    write_dataset(root / "a", [5, 0, 3], prefix="a")
    write_dataset(root / "b", [4, 6], prefix="b", seed=1)
    corrupt_in_place(root / "a", 2, "a2x1", "json")
    return root / "a", root / "b"


def test_an_index_round_trips_through_bytes_exactly(two_datasets):
    cfg = config(list(two_datasets), filters={"min_objects": 2})
    built = build_index(cfg, lambda: "unused")
    assert built.counts["error/bad_json"] == 1 and built.counts["filtered/too_few_objects"] > 0
    assert 0 in built.shard_sizes and built.dataset_shards == (3, 2)
    assert_same_index(StreamIndex.from_bytes(built.to_bytes()), built)
    assert [type(v) for t in built.identity for v in t] == [str, int, int] * 5  # as build_index makes them


def test_damaged_index_bytes_are_refused_not_trusted(two_datasets):
    data = build_index(config(list(two_datasets)), lambda: "unused").to_bytes()
    with pytest.raises(ValueError, match="not a stream index"):
        StreamIndex.from_bytes(data[: len(data) // 2])  # cut short
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    for name, value in [
        ("start", arrays["start"][:-1]),  # a sample short: the counts disagree
        ("shard_first", arrays["shard_first"] + 1),
        ("end", arrays["end"].astype(np.float64)),
        ("found", np.array([None] * len(arrays["found"]), dtype=object)),  # would need unpickling
    ]:
        buf = io.BytesIO()
        np.savez(buf, **{**arrays, name: value})
        with pytest.raises(ValueError, match="not a stream index"):
            StreamIndex.from_bytes(buf.getvalue())


# --- two ranks: a gloo group of two forked processes ------------------------------------------------------


def _rank_main(rank: int, init: str, out: str, cases: dict) -> None:
    """One rank: each case builds a loader (or fails to) in the group; what it saw goes to ``out``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    real_read, real_build, real_broadcast = index_module.read_ranges, index_module.build_index, dist.broadcast
    index_module.HEARTBEAT_S = 0.05  # rank 0 below takes 0.3 s longer: heartbeats come
    result: dict = {}
    for name, case in cases.items():
        seen = {"reads": 0, "builds": 0, "broadcasts": 0}

        def counting_read(url, starts, ends, seen=seen):
            seen["reads"] += 1
            return real_read(url, starts, ends)

        def build(cfg, scratch, seen=seen, fail=case.get("fail")):
            seen["builds"] += 1
            time.sleep(0.3)
            if fail == "KeyError":
                raise KeyError("boom")
            return real_build(cfg, scratch)

        def broadcast(tensor, src, seen=seen, **kw):
            seen["broadcasts"] += 1
            return real_broadcast(tensor, src, **kw)

        index_module.read_ranges, index_module.build_index, dist.broadcast = counting_read, build, broadcast
        cfg = config(case["paths"], batch_size=2)
        try:
            loader = build_loader(cfg, rank=rank, world_size=2)
        except Exception as e:  # noqa: BLE001 - what each rank raised is the test's subject
            result[name] = {**seen, "error": [type(e).__name__, str(e)]}
            continue
        Path(f"{out}/{name}{rank}.npz").write_bytes(loader.index.to_bytes())
        result[name] = {**seen, "batches": [list(map(str, fingerprint(b))) for b in loader],
                        "urls": list(loader.index.urls)}
    Path(f"{out}/result{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, cases: dict) -> list[dict]:
    # Forked as the DataLoader's workers are: a spawned rank would spend seconds importing torch again.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "init"), str(tmp_path), cases)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]


def test_under_two_ranks_only_rank_0_reads_the_json_and_both_get_its_index_or_its_error(tmp_path, two_datasets):
    (tmp_path / "web").mkdir()
    write_dataset(tmp_path / "web" / "ds", [3, 4], prefix="w")
    t0 = time.monotonic()
    with served(tmp_path / "web") as url:  # python -m http.server: no byte ranges, tars copied per rank
        cases = {
            "local": {"paths": [str(p) for p in two_datasets]},
            "http": {"paths": [f"{url}/ds"]},
            "missing": {"paths": [str(tmp_path / "nowhere")]},
            "bug": {"paths": [str(two_datasets[0])], "fail": "KeyError"},
        }
        ranks = run_two_ranks(tmp_path, cases)
        elapsed = time.monotonic() - t0
        # What each rank would have streamed building its own index (no process group here).
        alone = {name: [[list(map(str, fingerprint(b))) for b in build_loader(config(c["paths"], batch_size=2),
                                                                               rank=r, world_size=2)]
                        for r in range(2)]
                 for name, c in cases.items() if name in ("local", "http")}
    assert elapsed < 100
    for name in ("local", "http"):
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["builds"] == 1 and r0["reads"] == {"local": 4, "http": 2}[name]  # one per non-empty shard
        assert r1["builds"] == 0 and r1["reads"] == 0
        # Heartbeats while rank 0 built (0.3 s at 0.05 s), then the status and the index: the same count.
        assert r0["broadcasts"] == r1["broadcasts"] >= 2 + 3
        a = StreamIndex.from_bytes((tmp_path / f"{name}0.npz").read_bytes())
        b = StreamIndex.from_bytes((tmp_path / f"{name}1.npz").read_bytes())
        assert [r0["batches"], r1["batches"]] == alone[name]  # bit for bit the batches of a rank's own index
        if name == "local":
            assert_same_index(a, b)
        else:  # each rank reads its own copies of the tars, named as rank 0's
            assert [os.path.basename(u) for u in a.urls] == [os.path.basename(u) for u in b.urls] == ["0-000000.tar",
                                                                                                    "0-000001.tar"]
            assert set(a.urls).isdisjoint(b.urls)
            assert_same_index(a, replace(b, urls=a.urls))
    # Rank 0's failure is every rank's: the same type and message, the other rank never building.
    missing0, missing1 = ranks[0]["missing"], ranks[1]["missing"]
    assert missing0["error"] == missing1["error"] == [
        "ConfigError", f"datasets[0].path: dataset {str(tmp_path / 'nowhere')!r} does not exist"]
    assert missing1["builds"] == 0
    assert ranks[0]["bug"]["error"] == ["KeyError", "'boom'"]
    assert ranks[1]["bug"]["error"] == ["RuntimeError", "rank 0 could not build the stream index: KeyError: 'boom'"]


# --- the cache file: a restart reads no JSON range --------------------------------------------------------


def test_a_cached_index_is_reused_until_its_shards_or_filters_change_and_rebuilt_when_damaged(
    tmp_path, monkeypatch, caplog
):
    write_dataset(tmp_path / "ds", [4, 3])
    reads = []
    real_read = index_module.read_ranges
    monkeypatch.setattr(index_module, "read_ranges", lambda u, s, e: reads.append(u) or real_read(u, s, e))
    cache = str(tmp_path / "out" / "stream_index")
    cfg = config([tmp_path / "ds"], batch_size=2)
    first = build_loader(cfg, index_cache=cache)
    assert len(reads) == 2 and len(list((tmp_path / "out" / "stream_index").glob("stream-index-*.npz"))) == 1
    again = build_loader(cfg, index_cache=cache)  # a restart
    assert len(reads) == 2
    assert_same_index(again.index, first.index)
    assert [fingerprint(b) for b in again] == [fingerprint(b) for b in first]
    # Other filters, or another shard, give another key: built again, never the stale index.
    build_loader(config([tmp_path / "ds"], batch_size=2, filters={"min_objects": 2}), index_cache=cache)
    assert len(reads) == 4
    write_dataset(tmp_path / "ds", [4, 3, 2])
    assert sum(build_loader(cfg, index_cache=cache).index.shard_sizes) == 9 and len(reads) == 7
    # A damaged file (one byte changed, same size): a warning naming it, built again, and rewritten.
    npz = max((tmp_path / "out" / "stream_index").glob("stream-index-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 1
    npz.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="training.data.index_cache"):
        rebuilt = build_loader(cfg, index_cache=cache)
    assert f"stream index cache {npz} is damaged" in caplog.text and len(reads) == 10
    assert sum(rebuilt.index.shard_sizes) == 9
    build_loader(cfg, index_cache=cache)
    assert len(reads) == 10  # the rewritten file is trusted again


def test_a_cached_index_that_fails_its_checks_is_rebuilt_and_local_copies_are_made_again(tmp_path, caplog):
    from training.data.index_cache import write_cached

    (tmp_path / "web").mkdir()
    write_dataset(tmp_path / "web" / "ds", [3, 2])
    cache = str(tmp_path / "cache")
    with served(tmp_path / "web") as url:  # no byte ranges: the index's URLs are the loader's own copies
        cfg = config([f"{url}/ds"], batch_size=2)
        first = build_loader(cfg, index_cache=cache)
        batches, urls = [fingerprint(b) for b in first], first.index.urls
        del first  # its copies go with its scratch folder
        assert not any(os.path.exists(u) for u in urls)
        again = build_loader(cfg, index_cache=cache)
        assert [fingerprint(b) for b in again] == batches and again.index.urls != urls
        # Bytes that match their sidecar but are no index: a warning, built again.
        [npz] = Path(cache).glob("stream-index-*.npz")
        write_cached(cache, npz.stem.removeprefix("stream-index-"), b"not an npz")
        with caplog.at_level("WARNING", logger="training.data.index"):
            rebuilt = build_loader(cfg, index_cache=cache)
    assert "not a stream index" in caplog.text
    assert sum(rebuilt.index.shard_sizes) == 5 and len(npz.read_bytes()) > 100
