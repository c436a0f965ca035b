"""training.data.stream: split, mixture, epochs, error policy, determinism, exact resumption.

Exact epochs over uneven shards, resumes onto other world sizes and the index's byte ranges are in
test_stream_epochs.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from shards.masks import encode_mask
from shards.schema import ObjectRecord, SampleRecord
from shards.writer import ShardWriter, build_tar
from training.data.collate import normalize_pixels
from training.data.config import ConfigError, DatasetSpec, FilterConfig, StreamConfig
from training.data.errors import ErrorPolicy
from training.data.examples import pick_caption
from training.data.index import filter_reason, keep_objects
from training.data.plan import Plan, mixture_probabilities
from training.data.stream import build_loader, merge_states
from training.data.stream import main as stream_main

W, H = 40, 32  # stored images; the stream crops 16x16


def jpeg(rng: np.random.Generator, w: int = W, h: int = H) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def record(key: str, rng: np.random.Generator, w: int = W, h: int = H) -> SampleRecord:
    objects = []
    for i in range(int(rng.integers(1, 4))):
        x1, y1 = float(rng.integers(0, w - 8)), float(rng.integers(0, h - 8))
        box = (x1, y1, min(w, x1 + float(rng.integers(6, 24))), min(h, y1 + float(rng.integers(6, 24))))
        mask = np.zeros((h, w), dtype=bool)
        mask[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
        objects.append(
            ObjectRecord(
                box=box,
                phrase="cat",
                description=f"cat {i} on the left",
                clip_score=20.0 + i,
                mask=encode_mask(mask),
            )
        )
    return SampleRecord(
        key=key,
        width=w,
        height=h,
        original_width=2 * w,
        original_height=2 * h,
        caption=f"caption {key}",
        objects=tuple(objects),
    )


def write_dataset(root: Path | str, sizes: list[int], prefix: str = "k", seed: int = 0) -> list[str]:
    """Shards with ``sizes[i]`` samples each; returns all keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for shard, n in enumerate(sizes):
        with ShardWriter(str(root), shard) as w:
            for i in range(n):
                key = f"{prefix}{shard}x{i}"
                w.add(record(key, rng), jpeg(rng))
                keys.append(key)
    return keys


def config(paths, **kw) -> StreamConfig:
    weights = kw.pop("weights", [1.0] * len(paths))
    augment = {"size": [16, 16], "min_visibility": 0.0, "max_objects": 4, **kw.pop("augment", {})}
    filters = kw.pop("filters", {})
    d = {
        "datasets": [
            {"path": str(p), "weight": wt, "augment": augment, "filters": filters}
            for p, wt in zip(paths, weights, strict=True)
        ],
        "batch_size": 3,
        "num_workers": 0,
        "shuffle_buffer": 8,
        "regions": {"max_objs": 4, "max_regions": 8, "max_slots": 6},
        **kw,
    }
    return StreamConfig.from_dict(d)


def epoch_keys(loader) -> list[list[str]]:
    return [b["key"] for b in loader]


def fingerprint(batch: dict) -> tuple:
    """What identifies a batch: keys and a digest of every tensor."""
    return (
        tuple(batch["key"]),
        tuple(batch["region_texts"][0]),
        *(round(float(v.double().sum()), 4) for v in batch.values() if isinstance(v, torch.Tensor)),
    )


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("even")
    return root, write_dataset(root, [6] * 8)


def test_split_by_node_and_worker_yields_every_sample_exactly_once(even):
    root, keys = even
    cfg = config([root], num_workers=2)  # 2 ranks x 2 workers, 2 shards (12 samples) each
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            loader = build_loader(cfg, rank=rank, world_size=2, epoch=epoch)
            assert len(loader) == 8  # 48 samples / (2 ranks x 3 per batch)
            seen += [k for batch in epoch_keys(loader) for k in batch]
        assert sorted(seen) == sorted(keys), epoch
    assert len(set(seen)) == 48


def test_every_rank_yields_the_same_number_of_batches(tmp_path):
    # Uneven shards: 30 samples, 3 ranks, so 5 batches of 2 each; short shares wrap into another pass.
    write_dataset(tmp_path / "a", [3, 10, 7, 1, 9])
    cfg = config([tmp_path / "a"], batch_size=2)
    counts = [len(epoch_keys(build_loader(cfg, rank=r, world_size=3))) for r in range(3)]
    assert counts == [5, 5, 5]
    cfg = config([tmp_path / "a"], batch_size=2, resampled=True, epoch_samples=40)
    loaders = [build_loader(cfg, rank=r, world_size=3) for r in range(3)]
    assert [len(epoch_keys(lo)) for lo in loaders] == [len(lo) for lo in loaders] == [6, 6, 6]


def test_mixture_ratio_within_tolerance(tmp_path):
    # Three datasets of 2, 1 and 3 shards (5 samples each); a draw's dataset is its id's range.
    plan = Plan([5] * 6, [2, 1, 3], seed=0, block=0, resampled=True, epoch_samples=20000, weights=[1, 2, 1])
    ids, repeats = plan.sample_ids(3, np.arange(20000))
    draws = Counter(np.searchsorted([10, 15], ids, side="right").tolist())
    for i, p in enumerate([0.25, 0.5, 0.25]):
        assert abs(draws[i] / 20000 - p) < 0.012  # sd 0.0035
    assert not repeats.any() and len(set(ids.tolist())) == 30  # every sample drawn, uniformly within its dataset
    # End to end through filters, decode and batching: the paper's 1:2 COCO / synthetic mixture.
    write_dataset(tmp_path / "coco", [10, 10], prefix="c")
    write_dataset(tmp_path / "syn", [10, 10, 10], prefix="s", seed=1)
    cfg = config(
        [tmp_path / "coco", tmp_path / "syn"],
        weights=[1, 2],
        resampled=True,
        epoch_samples=600,
        batch_size=10,
    )
    keys = [k for batch in epoch_keys(build_loader(cfg)) for k in batch]
    assert len(keys) == 600
    share = sum(k.startswith("c") for k in keys) / len(keys)
    assert abs(share - 1 / 3) < 0.06, share  # sd 0.019 at n=600


def corrupt_dataset(root: Path) -> list[str]:
    """Shard 0 good; 1 garbage; 2 truncated inside its 3rd sample (both differ from their stats files); 3
    a tar of another writer (stats resealed, no parquet: its headers are scanned) with one bad sample of
    each kind. Returns the keys of the usable samples."""
    rng = np.random.default_rng(5)
    good = write_dataset(root, [6, 4, 5, 5], prefix="g")
    (root / "000001.tar").write_bytes(b"this is not a tar file" * 50)
    tar2 = (root / "000002.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(tar2)) as t:
        third_image = t.getmembers()[4]  # members sorted: k.jpg, k.json per sample
    (root / "000002.tar").write_bytes(tar2[: third_image.offset_data + 10])
    members = []
    for i in range(3):
        key = f"ok{i}"
        members += [(f"{key}.jpg", jpeg(rng)), (f"{key}.json", record(key, rng).to_json_bytes())]
    members.append(("lonely.jpg", jpeg(rng)))  # its json is missing
    members += [
        ("garbled.jpg", b"\xff\xd8 not a jpeg"),
        ("garbled.json", record("garbled", rng).to_json_bytes()),
    ]
    members += [("small.jpg", jpeg(rng, 20, 20)), ("small.json", record("small", rng).to_json_bytes())]
    members += [("badjson.jpg", jpeg(rng)), ("badjson.json", b'{"key": "badjson"')]
    (root / "000003.tar").write_bytes(build_tar(members))
    (root / "000003.parquet").unlink()
    reseal(root / "000003.tar")
    return [k for k in good if k.startswith("g0x")] + ["ok0", "ok1", "ok2"]


def reseal(tar: Path) -> None:
    """Record a rewritten tar's size and sha256 in its stats file, as if it had been written that way."""
    stats = tar.with_name(tar.name.replace(".tar", ".stats.json"))
    data = tar.read_bytes()
    d = json.loads(stats.read_text())
    stats.write_text(json.dumps({**d, "tar_bytes": len(data), "tar_sha256": hashlib.sha256(data).hexdigest()}))


def test_corrupt_shard_and_bad_samples_are_counted_by_reason_and_skipped(tmp_path):
    usable = corrupt_dataset(tmp_path)
    loader = build_loader(config([tmp_path], batch_size=1))  # one pass: 11 samples pass the index
    keys = [k for batch in epoch_keys(loader) for k in batch]
    # The two whose image fails (garbled, small) left their slots to substitutes drawn among the rest.
    assert len(keys) == len(loader) == len(usable) + 2 and sorted(set(keys)) == sorted(usable)
    counts = loader.counters()
    assert counts == {
        "error/corrupt_shard": 2,  # the index: shards 1 and 2, whose size differs from their stats
        "error/missing_member": 1,  # the index: lonely.jpg
        "error/bad_json": 1,  # the index: badjson.json
        "error/undecodable_image": counts["error/undecodable_image"],  # garbled, and substitutes that drew it
        "error/size_mismatch": counts["error/size_mismatch"],
        "repeat/substitute": counts["error/undecodable_image"] + counts["error/size_mismatch"],
    }
    assert min(counts["error/undecodable_image"], counts["error/size_mismatch"]) >= 1


def test_a_run_of_failures_raises_instead_of_spinning(tmp_path):
    rng = np.random.default_rng(0)
    members = [m for i in range(4) for m in ((f"b{i}.jpg", b"not an image"), (f"b{i}.json", record(f"b{i}", rng).to_json_bytes()))]
    write_dataset(tmp_path / "bad", [4])
    (tmp_path / "bad" / "000000.tar").write_bytes(build_tar(members))
    (tmp_path / "bad" / "000000.parquet").unlink()
    reseal(tmp_path / "bad" / "000000.tar")
    cfg = config([tmp_path / "bad"], batch_size=1, max_consecutive_errors=5)
    with pytest.raises(RuntimeError, match="5 samples failed in a row"):
        list(build_loader(cfg))
    write_dataset(tmp_path / "good", [4])
    cfg = config([tmp_path / "good"], batch_size=1, filters={"min_objects": 5})
    with pytest.raises(ConfigError, match=r"has no usable sample \(left out: \{'filtered/too_few_objects': 4\}\)"):
        build_loader(cfg)


def test_same_seed_same_batches_other_seed_other_batches(even):
    root, _ = even
    runs = [[fingerprint(b) for b in build_loader(config([root], num_workers=2, seed=s))] for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert [r[0] for r in runs[0]] != [r[0] for r in runs[2]]


@pytest.mark.parametrize("num_workers, resampled", [(2, False), (0, True)])
def test_resume_after_n_batches_continues_with_batch_n_plus_1(tmp_path, num_workers, resampled):
    readable = corrupt_dataset(tmp_path)  # failures before the resume point shift positions
    cfg = config(
        [tmp_path],
        batch_size=2,
        num_workers=num_workers,
        resampled=resampled,
        epoch_samples=4 * len(readable),
        augment={"flip_prob": 0.5, "scale": [1.0, 1.3]},
    )
    reference = build_loader(cfg)
    expect = [fingerprint(b) for b in reference] + [fingerprint(b) for b in reference]  # two epochs
    n_epoch = len(reference)
    for n in (3, n_epoch + 1):
        first = build_loader(cfg)
        got = []
        while len(got) < n:
            for batch in first:
                got.append(fingerprint(batch))
                if len(got) == n:
                    break
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = build_loader(cfg, state=state)
        while resumed.epoch < 2:
            got += [fingerprint(b) for b in resumed]
        assert got == expect, n
        assert resumed.counters() == reference.counters()


def test_interrupted_iteration_resumes_in_the_same_process(even):
    root, _ = even
    cfg = config([root], num_workers=2)
    expect = [fingerprint(b) for b in build_loader(cfg)]
    loader = build_loader(cfg)
    got = []
    for batch in loader:
        got.append(fingerprint(batch))
        if len(got) == 5:
            break
    got += [fingerprint(b) for b in loader]
    assert got == expect and loader.epoch == 1


def test_state_of_every_rank_merges_and_a_mismatch_is_refused(even):
    root, _ = even
    cfg = config([root])
    loaders = [build_loader(cfg, rank=r, world_size=2) for r in range(2)]
    for lo in loaders:
        for i, _ in enumerate(lo):
            if i == 2:
                break
    merged = merge_states([lo.state_dict() for lo in loaders])
    assert sorted(merged["ranks"]) == ["0", "1"] and merged["batches"] == 3
    for r in range(2):
        resumed = build_loader(cfg, rank=r, world_size=2, state=merged)
        assert resumed.batches == 3 and len(epoch_keys(resumed)) == len(resumed) - 3
    other = build_loader(config([root], seed=1), rank=0, world_size=1)
    with pytest.raises(ValueError, match="another config"):
        other.load_state_dict(merged)
    other.load_state_dict(merged, strict=False)
    assert (other.epoch, other.batches) == (1, 0)
    with pytest.raises(ValueError, match=r"no entry for rank\(s\) 1 \(save merge_states of every rank\)"):
        build_loader(cfg, rank=0, world_size=3).load_state_dict(loaders[0].state_dict())


def test_config_from_yaml_shape_and_errors(even):
    root, _ = even
    cfg = config([root])
    assert StreamConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"^unknown key 'shuffle' \(valid keys: batch_size, datasets, "):
        StreamConfig.from_dict({**cfg.to_dict(), "shuffle": 3})
    with pytest.raises(ConfigError, match="resampled mode"):
        StreamConfig.from_dict({**cfg.to_dict(), "resampled": True, "epoch_samples": None})
    with pytest.raises(ConfigError, match=r"^datasets\[1\]\.weight is 2\.0: mixture weights apply to resampled "):
        config([root, root], weights=[1, 2])
    assert config([root, root], weights=[1, 2], resampled=True, epoch_samples=8).datasets[1].weight == 2.0


def test_batch_tensors_have_fixed_shapes_and_consistent_regions(even):
    root, _ = even
    batch = next(iter(build_loader(config([root], augment={"masks": True}))))
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["original_size"].tolist() == [[2 * H, 2 * W]] * 3
    assert batch["target_size"].tolist() == [[16, 16]] * 3
    assert batch["region_map"].shape == (3, 2, 2) and batch["region_union_masks"].shape == (3, 6, 2, 2)
    assert batch["region_boxes"].shape == (3, 6, 4, 4) and batch["instance_masks"].shape == (3, 4, 16, 16)
    for i in range(3):
        n_slots = int(batch["slot_mask"][i].sum())
        texts = batch["region_texts"][i]
        assert len(texts) == 6 and all(t == "" for t in texts[n_slots:])
        assert batch["region_map"][i].max() < n_slots
        segs = batch["segment_mask"][i].sum(1)
        for s in range(n_slots):
            n_seg = len(texts[s].split("; ")) if texts[s] else 1
            assert segs[s] == n_seg
        n = int(batch["object_count"][i])
        assert len(batch["object_texts"][i]) == n and not batch["object_boxes"][i, n:].any()
        # An object's mask lies inside its box.
        for j in range(n):
            ys, xs = np.nonzero(batch["instance_masks"][i, j].numpy())
            if len(xs):
                x1, y1, x2, y2 = batch["object_boxes"][i, j].tolist()
                assert x1 - 1 <= xs.min() and xs.max() + 1 <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2
    assert Counter(len(c) > 0 for c in batch["caption"]) == {True: 3}


def test_uint8_pixels_normalize_to_the_float_pixel_values(even):
    root, _ = even
    floats = next(iter(build_loader(config([root]))))
    ints = next(iter(build_loader(config([root], pixel_format="uint8"))))
    assert "pixel_values" not in ints and ints["pixels"].dtype == torch.uint8
    assert torch.equal(normalize_pixels(ints["pixels"]), floats["pixel_values"])


def test_json_filters_drop_objects_below_the_floors_then_samples_by_count():
    def obj(clip, det, text, size=10.0):
        return ObjectRecord(
            box=(0.0, 0.0, size, size), phrase="thing", description=text, clip_score=clip, detector_score=det
        )

    rec = SampleRecord(
        key="k",
        width=40,
        height=40,
        original_width=40,
        original_height=40,
        objects=(
            obj(30.0, 0.9, "a tall red lamp"),  # passes every floor
            obj(10.0, 0.9, "a tall red lamp"),  # CLIP score too low
            obj(30.0, 0.2, "a tall red lamp"),  # detector score too low
            obj(30.0, 0.9, "lamp"),  # too few words
            obj(None, 0.9, "a tall red lamp"),  # no CLIP score never passes a floor that is set
            obj(30.0, 0.9, "a tall red lamp", size=2.0),  # 4 of 1600 px: under the area floor
        ),
    )
    f = FilterConfig(
        min_clip_score=25.0, min_detector_score=0.3, min_description_words=3, min_box_area_frac=0.01
    )
    assert keep_objects(rec, f).objects == rec.objects[:1]
    assert keep_objects(rec, FilterConfig()) is rec

    assert filter_reason(keep_objects(rec, f), f) is None
    f = FilterConfig(min_objects=5, min_clip_score=25.0)
    assert filter_reason(keep_objects(rec, f), f) == "filtered/too_few_objects"
    assert filter_reason(rec, FilterConfig(max_objects=5)) == "filtered/too_many_objects"


def test_caption_is_one_of_the_coco_captions_drawn_with_the_generator():
    base = dict(key="k", width=8, height=8, original_width=8, original_height=8)
    coco = SampleRecord(**base, source_caption="first", meta={"captions": ["first", "second", "third"]})
    spec = DatasetSpec(path="p")
    drawn = {pick_caption(coco, spec, np.random.default_rng(s)) for s in range(30)}
    assert drawn == {"first", "second", "third"}
    assert pick_caption(coco, spec, np.random.default_rng(4)) == pick_caption(
        coco, spec, np.random.default_rng(4)
    )
    vlm = SampleRecord(**base, caption="vlm", source_caption="alt")
    assert pick_caption(vlm, spec, np.random.default_rng(0)) == "vlm"
    assert (
        pick_caption(vlm, DatasetSpec(path="p", caption="source_caption"), np.random.default_rng(0)) == "alt"
    )
    assert pick_caption(SampleRecord(**base, source_caption="alt"), spec, np.random.default_rng(0)) == "alt"


def test_fsspec_uri_dataset_streams_like_a_folder():
    keys = write_dataset("memory://stream-test/ds", [4, 4])
    got = [
        k
        for batch in epoch_keys(build_loader(config(["memory://stream-test/ds"], batch_size=2)))
        for k in batch
    ]
    assert sorted(got) == sorted(keys)


def test_errors_are_logged_at_a_limited_rate(caplog):
    policy = ErrorPolicy(log_interval_s=3600.0, max_consecutive=100, where="w0: ")
    with caplog.at_level("WARNING", logger="training.data.errors"):
        for i in range(5):
            policy.error("bad_json", ValueError(f"sample {i}"))
        policy.error("corrupt_shard", OSError("truncated"))
    assert policy.counts == {"error/bad_json": 5, "error/corrupt_shard": 1}
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == [
        "skipped (bad_json, 1 so far, 0 not logged)",
        "skipped (corrupt_shard, 1 so far, 0 not logged)",
    ]


def test_cli_prints_batches_and_state(even, tmp_path, capsys):
    root, _ = even
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config([root]).to_dict()))
    assert stream_main([str(path), "--batches", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "16 batches per epoch on rank 0 of 1" and lines[1].startswith("batch 0: keys [")
    assert json.loads(lines[-1])["state"]["batches"] == 2


def test_mixture_weights_must_be_finite_and_positive_and_errors_name_the_dataset():
    assert mixture_probabilities([1, 2, 1]).tolist() == [0.25, 0.5, 0.25]
    with pytest.raises(ConfigError, match=r"^datasets\[1\]\.weight \(dataset 'syn'\) must be a finite number > 0, got inf$"):
        mixture_probabilities([1.0, float("inf")], ["coco", "syn"])
    with pytest.raises(ConfigError, match=r"^datasets\[0\]\.weight must be a finite number > 0, got 0$"):
        Plan([1], [1], seed=0, block=0, resampled=True, epoch_samples=1, weights=[0])
    with pytest.raises(ConfigError, match=r"sum to inf"):
        mixture_probabilities([1e308, 1e308])


def test_a_missing_or_empty_dataset_is_named_with_its_field(even, tmp_path):
    root, _ = even
    with pytest.raises(ConfigError, match=rf"^datasets\[1\]\.path: dataset '{tmp_path}/nope' does not exist$"):
        build_loader(config([root, tmp_path / "nope"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.path: dataset '.*empty' has no complete shard"):
        build_loader(config([tmp_path / "empty"]))


def test_a_malformed_state_is_refused_by_name(even):
    loader = build_loader(config([even[0]]))
    with pytest.raises(ValueError, match=r"stream state lacks \['ranks'\]"):
        loader.load_state_dict({k: v for k, v in loader.state_dict().items() if k != "ranks"})
    with pytest.raises(ValueError, match="stream state version 'list', expected 2"):
        loader.load_state_dict([])


def test_cli_answers_a_mistake_with_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert stream_main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: ") and len(err.splitlines()) == 1
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config([tmp_path / "nope"]).to_dict()))
    assert stream_main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: datasets[0].path: dataset '{tmp_path}/nope' does not exist\n"
    )
    write_dataset(tmp_path / "few", [4])
    path.write_text(yaml.safe_dump(config([tmp_path / "few"], num_workers=1, filters={"min_objects": 5}).to_dict()))
    assert stream_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "has no usable sample" in err and len(err.splitlines()) == 1
