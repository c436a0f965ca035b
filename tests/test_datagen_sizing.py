"""datagen.sizing: hand-computed plans, GPU packing, the run records datagen.run writes read back, errors.

CC3M in a day: 3,300,000 images / 86,400 s = 38.19444 images/s; every count below is computed by hand.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datagen import measurement
from datagen.cli import main
from datagen.config import STAGE_ORDER, load_config
from datagen.measurement import (
    PIPELINE_ORDER,
    RUNS_DIR,
    Measurement,
    Pool,
    SizingError,
    run_record,
    save_run_record,
)
from datagen.run import Summary
from datagen.sizing import pack, size

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "datagen" / "tiny.yaml")
REAL = str(ROOT / "configs" / "datagen" / "real.yaml")
CC3M = 3_300_000

# A real.yaml-shaped cluster: two stages per VLM/detector/CLIP pool, fractional GPUs for the small models.
REAL_RATES = {"tag": 8.0, "caption": 5.0, "ground": 20.0, "segment": 10.0, "describe": 1.5, "score": 60.0,
              "filter": float("inf")}
REAL_POOLS = (Pool("vlm", ("tag", "caption"), 1.0, 4.0), Pool("detect", ("ground", "segment"), 0.5, 4.0),
              Pool("describe", ("describe",), 1.0, 4.0), Pool("score", ("score", "filter"), 0.25, 2.0))


def test_three_one_gpu_stages_cc3m_in_a_day():
    plan = size(measurement.measurement_from_rates({"tag": 2, "ground": 5, "describe": 10}), CC3M, 24)
    assert plan.required_rate == plan.target_rate == pytest.approx(38.194444, abs=1e-6)
    # 38.19 / 2 = 19.10 -> 20 actors, / 5 = 7.64 -> 8, / 10 = 3.82 -> 4; one GPU each
    assert [(p.name, p.workers, p.gpus) for p in plan.pools] == [("tag", 20, 20), ("ground", 8, 8), ("describe", 4, 4)]
    assert (plan.gpus, plan.nodes) == (32, 4)
    assert [s.gpus for s in plan.stages] == pytest.approx([19.097222, 7.638889, 3.819444], abs=1e-6)
    assert [s.share for s in plan.stages] == pytest.approx([0.625, 0.25, 0.125])  # (1/2, 1/5, 1/10) / 0.8
    assert plan.bottleneck == "tag" and plan.resource == "GPU"
    assert plan.config_values() == {"pools": {name: {"actors": n, "max_actors": n, "num_gpus": 1.0}
                                              for name, n in (("tag", 20), ("ground", 8), ("describe", 4))}}
    assert plan.set_flags()[:3] == ["--set pools.tag.actors=20", "--set pools.tag.max_actors=20",
                                    "--set pools.tag.num_gpus=1"]


def test_headroom_and_hours():
    m = measurement.measurement_from_rates({"tag": 2, "ground": 5, "describe": 10})
    plan = size(m, CC3M, 24, headroom=0.15)  # 43.92 img/s: 21.96 -> 22, 8.78 -> 9, 4.39 -> 5
    assert plan.target_rate == pytest.approx(43.923611, abs=1e-6)
    assert [p.workers for p in plan.pools] == [22, 9, 5] and (plan.gpus, plan.nodes) == (36, 5)
    plan = size(m, CC3M, 48)  # 19.10 img/s: 9.55 -> 10, 3.82 -> 4, 1.91 -> 2
    assert [p.workers for p in plan.pools] == [10, 4, 2] and (plan.gpus, plan.nodes) == (16, 2)


def test_pools_run_their_stages_in_sequence_and_pack_fractional_gpus():
    plan = size(Measurement(rates=REAL_RATES, pools=REAL_POOLS), CC3M, 24)
    by_pool = {p.name: p for p in plan.pools}
    # vlm: 1 / (1/8 + 1/5) = 3.0769 img/s per actor -> 38.19 / 3.0769 = 12.41 -> 13 actors, 13 GPUs
    assert by_pool["vlm"].rate == pytest.approx(40 / 13) and (by_pool["vlm"].workers, by_pool["vlm"].gpus) == (13, 13)
    # detect: 1 / (1/20 + 1/10) = 6.667 -> 5.73 -> 6 actors of half a GPU = 3 GPUs
    assert (by_pool["detect"].workers, by_pool["detect"].gpus) == (6, 3)
    assert (by_pool["describe"].workers, by_pool["score"].workers) == (26, 1)  # 25.46 -> 26; 0.64 -> 1
    # 13 + 26 whole GPUs, 6 x 0.5 + 1 x 0.25 on 4 shared GPUs: 43 GPUs, 6 nodes of 8
    assert (plan.gpus, plan.nodes) == (43, 6)
    assert plan.cpus == 13 * 4 + 6 * 4 + 26 * 4 + 2
    # GPU-s per image: describe 1/1.5 of 0.125 + 0.2 + 0.025 + 0.05 + 0.6667 + 0.25/60 = 1.070833
    assert plan.bottleneck == "describe"
    assert next(s for s in plan.stages if s.stage == "describe").share == pytest.approx(0.666667 / 1.070833, abs=1e-5)
    assert next(s for s in plan.stages if s.stage == "filter").gpus == 0


@pytest.mark.parametrize(
    "actors, gpus_per_node, expected",
    [
        ([(0.5, 7), (0.25, 2)], 8, (4, 1)),  # 3.5 GPUs of halves, the two quarters fill the fourth
        ([(0.3, 4)], 8, (2, 1)),  # three 0.3s per GPU
        ([(0.25, 3), (0.5, 1)], 8, (2, 1)),  # first-fit decreasing: 0.5 + 0.25 + 0.25 | 0.25
        ([(1, 9)], 8, (9, 2)),
        ([(2, 5)], 8, (10, 2)),  # four 2-GPU actors per node
        ([(3, 3)], 8, (9, 2)),  # two 3-GPU actors per node of 8
        ([(1, 6), (0.5, 3)], 8, (8, 1)),
        ([(0, 5)], 8, (0, 0)),
    ],
)
def test_pack(actors, gpus_per_node, expected):
    assert pack(actors, gpus_per_node) == expected


def test_pack_refuses_an_actor_larger_than_a_node():
    with pytest.raises(SizingError, match="4 GPUs does not fit on a node of 2 GPUs"):
        pack([(4, 1)], 2)


def test_per_object_stages_scale_with_objects_per_image():
    m = Measurement(rates={"ground": 10.0, "describe": 10.0, "score": 40.0},
                    pools=(Pool("g", ("ground",), 1.0), Pool("d", ("describe",), 1.0), Pool("s", ("score",), 1.0)),
                    objects_per_image=5.0)
    plan = size(m, 864_000, 24, objects_per_image=10.0)  # 10 img/s; twice the objects halve describe/score
    assert [s.rate for s in plan.stages] == [10.0, 5.0, 20.0]
    assert [p.workers for p in plan.pools] == [1, 2, 1]
    assert (plan.objects_per_image, plan.measured_objects_per_image) == (10.0, 5.0)
    assert [p.workers for p in size(m, 864_000, 24).pools] == [1, 1, 1]  # default: as measured
    with pytest.raises(SizingError, match="--measured-objects-per-image"):
        size(Measurement(rates=m.rates, pools=m.pools), 864_000, 24, objects_per_image=10.0)


def test_cpu_only_pools_are_sized_in_cpus():
    m = Measurement(rates={"decode": 100.0, "tag": 4.0, "ground": 4.0},
                    pools=(Pool("decode", ("decode",), 0.0, 0.25, tasks=True), Pool("models", ("tag", "ground"), 0.0, 0.5)))
    plan = size(m, 864_000, 24, cpus_per_node=4)  # 10 img/s; models 2 img/s per actor -> 5 actors
    assert plan.resource == "CPU" and plan.gpus == 0
    assert [(p.name, p.workers, p.cpus) for p in plan.pools] == [("decode", 1, 1.0), ("models", 5, 5.0)]
    assert plan.nodes == 2  # 6 CPUs (a CPU worker computes on at least one core) on nodes of 4
    assert plan.config_values() == {"pools": {"models": {"actors": 5, "max_actors": 5, "num_gpus": 0.0}},
                                    "execution": {"decode_tasks": 1}}
    assert plan.bottleneck == "tag"  # tie with ground: the first in pipeline order


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=0, hours=24), "--images must be >= 1"),
        (dict(images=10, hours=0), "--hours must be > 0"),
        (dict(images=10, hours=1, headroom=-0.1), "--headroom must be >= 0"),
        (dict(images=10, hours=1, gpus_per_node=0), "--gpus-per-node must be >= 1"),
        (dict(images=10, hours=1, objects_per_image=0), "--objects-per-image must be > 0"),
    ],
)
def test_bad_requests(kwargs, message):
    m = Measurement(rates={"tag": 1.0}, pools=(Pool("tag", ("tag",), 1.0),), objects_per_image=2.0)
    with pytest.raises(SizingError, match=message):
        size(m, **kwargs)


def test_a_stage_without_a_rate_is_named():
    m = Measurement(rates={"tag": 1.0}, pools=(Pool("vlm", ("tag", "caption"), 1.0),), source="x.json")
    with pytest.raises(SizingError, match=r"x.json: no rate for stage\(s\) \['caption'\].*--rates caption="):
        size(m, 10, 1)


def test_parse_rates():
    assert measurement.parse_rates(["tag=8,caption=5", " describe = 1.5 ", "filter=inf"]) == {
        "tag": 8.0, "caption": 5.0, "describe": 1.5, "filter": float("inf")}
    for bad, message in (("tag", "expected stage=images_per_second"), ("tag=fast", "'fast' is not a number"),
                         ("tag=0", "must be > 0"), ("=3", "expected stage=")):
        with pytest.raises(SizingError, match=message):
            measurement.parse_rates([bad])


# ---------------------------------------------------------------------------------------------------
# Run records: written by datagen.run, read by datagen.sizing.

BUSY = {"decode": (40, 0.4), "tag": (40, 2.0), "caption": (40, 4.0), "ground": (40, 8.0), "segment": (40, 2.0),
        "describe": (40, 4.0), "score": (40, 1.0), "filter": (40, 0.5), "pack": (40, 0.1)}


def _summary(output: str) -> Summary:
    return Summary(output=output, inputs=40, shards_total=3, shards_written=3, processed=40, busy=dict(BUSY),
                   wall_seconds=20.0, nodes=1, statuses=Counter(ok=32, filtered=6, failed=2), objects=96,
                   startup_seconds=8.0, startup_rows=16, failures=Counter({("decode", "empty file"): 2}))


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(TINY)


@pytest.fixture
def record_dir(tmp_path, tiny_cfg):
    out = tmp_path / "out"
    save_run_record(str(out), run_record(_summary(str(out)), tiny_cfg))
    return out


def test_run_record_has_the_measured_figures(tmp_path, tiny_cfg):
    record = run_record(_summary(str(tmp_path)), tiny_cfg)
    assert record["kind"] == "datagen-run" and record["version"] == 1
    assert record["stages"]["ground"] == {"rows": 40, "busy_seconds": 8.0, "images_per_busy_second": 5.0,
                                          "pool": "models", "batch_size": 16}
    assert record["stages"]["decode"]["pool"] is None
    assert record["pools"] == {"models": {"stages": list(STAGE_ORDER), "num_gpus": 0.0, "num_cpus": 0.5,
                                          "actors": 2, "max_actors": None, "engine": "actors"}}
    assert record["cpu_tasks"] == {"decode": {"tasks": 2, "num_cpus": 0.25}, "pack": {"tasks": 1, "num_cpus": 0.25}}
    assert record["objects_per_image"] == 3.0  # 96 objects kept in 32 ok samples
    assert (record["wall_seconds"], record["nodes"], record["processed"]) == (20.0, 1, 40)
    assert record["models"]["describe"]["name"] == "tiny-qwen2.5-vl"
    assert record["failures"] == [{"stage": "decode", "reason": "empty file", "count": 2}]
    json.dumps(record, allow_nan=False)


def test_a_run_record_is_read_back(record_dir):
    (path,) = (record_dir / RUNS_DIR).glob("*.json")
    m = measurement.load_measurement(str(record_dir))
    assert m.source == str(path)
    assert m.rates == pytest.approx({"decode": 100, "tag": 20, "caption": 10, "ground": 5, "segment": 20,
                                     "describe": 10, "score": 40, "filter": 80, "pack": 400})
    assert m.pools == (Pool("decode", ("decode",), 0.0, 0.25, tasks=True, workers=2),
                       Pool("models", STAGE_ORDER, 0.0, 0.5, workers=2),
                       Pool("pack", ("pack",), 0.0, 0.25, tasks=True, workers=1))
    assert (m.objects_per_image, m.processed, m.wall_seconds, m.nodes) == (3.0, 40, 20.0, 1)
    assert (m.startup_seconds, m.startup_rows) == (8.0, 16)
    assert set(m.models.values()) == {"tiny-qwen2.5-vl (tiny)", "tiny-grounding-dino (tiny)", "tiny-sam (tiny)",
                                      "tiny-clip (tiny)"}
    assert measurement.load_measurement(str(path)) == m  # the file itself, or its folder
    # One actor: 1 / (0.05 + 0.1 + 0.2 + 0.05 + 0.1 + 0.025 + 0.0125) = 1.8605 img/s; 10 img/s -> 5.4 -> 6 actors
    plan = size(m, 864_000, 24)
    assert [(p.name, p.workers) for p in plan.pools] == [("decode", 1), ("models", 6), ("pack", 1)]
    assert plan.bottleneck == "ground"


def test_the_newest_record_is_used(record_dir, tiny_cfg):
    later = _summary(str(record_dir))
    later.busy = {**BUSY, "ground": (40, 4.0)}
    path = save_run_record(str(record_dir), run_record(later, tiny_cfg))
    assert len(list((record_dir / RUNS_DIR).glob("*.json"))) == 2
    m = measurement.load_measurement(str(record_dir))
    assert m.source == path and m.rates["ground"] == 10.0


def _valid_record(record_dir) -> dict:
    (path,) = (record_dir / RUNS_DIR).glob("*.json")
    return json.loads(path.read_text())


def _drop(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


def _put(value, *keys):
    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: _drop(r, "stages"), "field 'stages' is missing"),
        (_put("abc", "stages", "ground", "busy_seconds"), "field 'stages.ground.busy_seconds': expected a number"),
        (_put(-3, "stages", "tag", "rows"), "field 'stages.tag.rows': expected a number >= 0, got -3"),
        (_put(2.5, "stages", "tag", "rows"), "field 'stages.tag.rows': expected a whole number"),
        (_put([], "stages", "tag"), "field 'stages.tag': expected a mapping"),
        (lambda r: _drop(r, "pools", "models", "num_gpus"), "field 'pools.models.num_gpus' is missing"),
        (_put(-1, "pools", "models", "num_gpus"), "field 'pools.models.num_gpus': expected a number >= 0"),
        (_put("tag", "pools", "models", "stages"), "field 'pools.models.stages': expected a list of stage names"),
        (_put(0, "pools", "models", "actors"), "field 'pools.models.actors': expected a number >= 1"),
        (_put("many", "objects_per_image"), "field 'objects_per_image': expected a number"),
        (_put(None, "wall_seconds"), "field 'wall_seconds': expected a number"),
        (_put("summary", "kind"), "field 'kind': expected 'datagen-run'"),
        (_put(2, "version"), "field 'version': version 2 is newer"),
        (_put(True, "processed"), "field 'processed': expected a number"),
    ],
)
def test_a_malformed_record_names_the_file_and_field(record_dir, edit, message):
    record = copy.deepcopy(_valid_record(record_dir))
    edit(record)
    path = record_dir / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(SizingError) as info:
        measurement.load_measurement(str(path))
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_unreadable_sources(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SizingError, match=f"{bad}: not valid JSON"):
        measurement.load_measurement(str(bad))
    (tmp_path / "ds" / RUNS_DIR).mkdir(parents=True)
    with pytest.raises(SizingError, match=f"{tmp_path / 'ds'}: no run records in .*{RUNS_DIR}"):
        measurement.load_measurement(str(tmp_path / "ds"))
    with pytest.raises(SizingError, match="missing: not found"):
        measurement.load_measurement(str(tmp_path / "missing"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SizingError, match="expected a JSON object"):
        measurement.load_measurement(str(tmp_path / "list.json"))


def test_a_stage_that_processed_nothing_needs_a_rate(record_dir):
    record = _valid_record(record_dir)
    record["stages"]["describe"] = {"rows": 0, "busy_seconds": 0.0}
    path = record_dir / "zero.json"
    path.write_text(json.dumps(record))
    m = measurement.load_measurement(str(path))
    with pytest.raises(SizingError, match=rf"{path}: no rate for stage\(s\) \['describe'\]"):
        size(m, 10, 1)
    assert size(measurement.with_rates(m, {"describe": 10.0}), 10, 1).pools[1].workers == 1
    with pytest.raises(SizingError, match=r"stage\(s\) \['nosuch'\] are not run by"):
        measurement.with_rates(m, {"nosuch": 1.0})


# ---------------------------------------------------------------------------------------------------
# A run whose VLM pools ran on vLLM: no busy time, so no measured rate for their stages.


def _vllm_record() -> dict:
    """A hand-written record of a real_vllm.yaml-shaped pilot: the vlm and describe pools on vLLM
    (absent from ``stages``), the detect and score actor pools and decode/pack measured."""
    return {
        "kind": "datagen-run", "version": 1, "processed": 1000, "wall_seconds": 150.0,
        "startup_seconds": 50.0, "startup_rows": 200, "nodes": 1, "objects_per_image": 7.0,
        "stages": {"decode": {"rows": 1000, "busy_seconds": 25.0}, "ground": {"rows": 1000, "busy_seconds": 100.0},
                   "segment": {"rows": 1000, "busy_seconds": 100.0}, "score": {"rows": 1000, "busy_seconds": 25.0},
                   "filter": {"rows": 1000, "busy_seconds": 1.0}, "pack": {"rows": 1000, "busy_seconds": 40.0}},
        "pools": {
            "vlm": {"stages": ["tag", "caption"], "num_gpus": 1, "num_cpus": 1, "actors": 1, "max_actors": 2,
                    "engine": "vllm"},
            "detect": {"stages": ["ground", "segment"], "num_gpus": 0.5, "num_cpus": 4, "actors": 1,
                       "max_actors": 2, "engine": "actors"},
            "describe": {"stages": ["describe"], "num_gpus": 2, "num_cpus": 8, "actors": 4, "max_actors": None,
                         "engine": "vllm"},
            "score": {"stages": ["score", "filter"], "num_gpus": 0.25, "num_cpus": 2, "actors": 1, "engine": "actors"},
        },
        "cpu_tasks": {"decode": {"tasks": 4, "num_cpus": 1}, "pack": {"tasks": 2, "num_cpus": 1}},
    }


def test_a_vllm_pool_without_a_rate_is_refused_naming_pool_and_stages(tmp_path):
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(_vllm_record()))
    m = measurement.load_measurement(str(path))
    assert [(p.name, p.engine, p.kind) for p in m.pools] == [
        ("decode", "actors", "CPU tasks"), ("vlm", "vllm", "vLLM engines"), ("detect", "actors", "GPU actors"),
        ("describe", "vllm", "vLLM engines"), ("score", "actors", "GPU actors"), ("pack", "actors", "CPU tasks")]
    assert not {"tag", "caption", "describe"} & set(m.rates)
    with pytest.raises(SizingError) as info:
        size(m, CC3M, 24)
    msg = str(info.value)
    assert msg.startswith(f"{path}: pool 'vlm' (stages tag, caption); pool 'describe' (stages describe) ran on vLLM, "
                          "which reports no busy time")
    assert "--rates tag=IMAGES_PER_S,caption=IMAGES_PER_S,describe=IMAGES_PER_S" in msg
    # After start-up: (1000 - 200) / (150 - 50) = 8 img/s end to end; over 2 replicas 4, over 4 replicas 2.
    assert "pool 'vlm': 8 images/s end to end over its 2 replica(s) = 4 images/s per replica (--rates tag=4,caption=inf)" in msg
    assert "pool 'describe': 8 images/s end to end over its 4 replica(s) = 2 images/s per replica (--rates describe=2)" in msg
    # One vLLM stage given, the other not: still refused, naming only what is missing.
    with pytest.raises(SizingError, match=r"pool 'vlm' \(stages tag, caption\) ran on vLLM.* for caption\. "):
        size(measurement.with_rates(m, {"tag": 4.0, "describe": 2.0}), CC3M, 24)


def test_a_vllm_pool_is_sized_from_given_rates_as_engine_replicas(tmp_path, capsys):
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(_vllm_record()))
    m = measurement.with_rates(measurement.load_measurement(str(path)), {"tag": 8.0, "caption": 8.0, "describe": 2.0})
    plan = size(m, 864_000, 24)  # 10 images/s
    by_pool = {p.name: p for p in plan.pools}
    # vlm: 1 / (1/8 + 1/8) = 4 img/s per replica -> 2.5 -> 3 replicas of 1 GPU, one CPU each
    assert (by_pool["vlm"].kind, by_pool["vlm"].workers, by_pool["vlm"].gpus, by_pool["vlm"].cpus) == (
        "vLLM engines", 3, 3, 3)
    # describe: 2 img/s per 2-GPU replica -> 5 replicas, 10 GPUs, 10 CPUs (one per GPU, not num_cpus 8)
    assert (by_pool["describe"].workers, by_pool["describe"].gpus, by_pool["describe"].cpus) == (5, 10, 10)
    assert plan.config_values()["pools"]["describe"] == {"actors": 5, "max_actors": 5, "num_gpus": 2}
    text = plan.format()
    assert "(--rates for caption, describe, tag)" in text
    assert "vLLM pools (vlm, describe): workers are engine replicas; rates from --rates (tag, caption, describe)" in text
    # The pilot's busy-time capacity leaves the unmeasured vLLM pools out (detect: 2 x 1/(1/10 + 1/10) = 10).
    assert "its actor pools' busy time (vLLM pools vlm, describe unmeasured) allows 10.00 images/s" in text
    assert main(["size", "--from", str(path), "--images", "864000", "--json"]) == 2
    err = capsys.readouterr().err
    assert "pool 'vlm' (stages tag, caption); pool 'describe' (stages describe) ran on vLLM" in err
    assert main(["size", "--from", str(path), "--images", "864000", "--json",
                 "--rates", "tag=8,caption=8,describe=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["kind"] for p in out["pools"]][1:4] == ["vLLM engines", "GPU actors", "vLLM engines"]
    assert out["source"]["rates_given"] == ["caption", "describe", "tag"]


def test_record_pools_are_read_in_pipeline_order(tmp_path):
    assert PIPELINE_ORDER == ("decode", *STAGE_ORDER, "pack")
    record = _vllm_record()  # saved records list pools by name (sorted keys): describe, detect, score, vlm
    record["pools"] = dict(sorted(record["pools"].items()))
    path = tmp_path / "sorted.json"
    path.write_text(json.dumps(record))
    pools = measurement.load_measurement(str(path)).pools
    assert [p.name for p in pools] == ["decode", "vlm", "detect", "describe", "score", "pack"]


def test_a_record_with_an_unknown_engine_is_refused(tmp_path):
    record = _vllm_record()
    record["pools"]["vlm"]["engine"] = "sglang"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(SizingError, match=r"field 'pools.vlm.engine': expected one of \['actors', 'vllm'\], got 'sglang'"):
        measurement.load_measurement(str(path))
    del record["pools"]["vlm"]["engine"]  # an older record: an actor pool, whose missing rates are named as such
    path.write_text(json.dumps(record))
    with pytest.raises(SizingError, match=r"no rate for stage\(s\) \['tag', 'caption'\]"):
        size(measurement.with_rates(measurement.load_measurement(str(path)), {"describe": 2.0}), 10, 1)


# ---------------------------------------------------------------------------------------------------
# The CLI.


def test_cli_rates_table_and_json(capsys):
    args = ["size", "--rates", "tag=2,ground=5", "--rates", "describe=10", "--images", "3300000", "--hours", "24"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3,300,000 images in 24 h = 38.19 images/s" in out
    assert "total: 32 GPUs on 4 node(s) of 8 GPUs" in out
    assert "bottleneck: tag (62% of the GPU-seconds per image" in out
    assert "--set pools.describe.actors=4" in out
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["gpus"], plan["nodes"], plan["bottleneck"]) == (32, 4, "tag")
    assert [p["workers"] for p in plan["pools"]] == [20, 8, 4]


def test_cli_config_with_rates(capsys):
    rates = ",".join(f"{k}={v}" for k, v in REAL_RATES.items())
    assert main(["size", "--config", REAL, "--rates", rates, "--images", "3300000", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["gpus"], plan["nodes"]) == (43, 6)
    assert plan["config"]["pools"]["detect"] == {"actors": 6, "max_actors": 6, "num_gpus": 0.5}
    assert "execution" not in plan["config"]  # decode/pack not sized without their rates
    assert plan["stages"][-1]["rate"] is None  # filter=inf is written as null
    assert main(["size", "--config", REAL, "--set", "pools.detect.num_gpus=1", "--rates", rates,
                 "--images", "3300000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 46  # the 6 detect actors now hold a GPU each


def test_cli_from_an_output_folder(record_dir, capsys):
    assert main(["size", "--from", str(record_dir), "--images", "864000", "--hours", "24"]) == 0
    out = capsys.readouterr().out
    assert "pilot: 40 images in 20.0 s wall on 1 node(s) = 2.00 images/s end to end" in out
    assert "after its start-up (8.0 s until the first chunk): 2.00 images/s" in out  # (40 - 16) / (20 - 8)
    assert "tiny random-weight models" in out and "objects per image: 3.00 where the rates were measured" in out
    assert "pools.models: {actors: 6, max_actors: 6, num_gpus: 0}" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "10"], "nothing to size from"),
        (["--images", "10", "--rates", "tag"], "expected stage=images_per_second"),
        (["--images", "10", "--from", "x", "--config", REAL], "not both"),
        (["--images", "10", "--rates", "tag=1", "--set", "a=1"], "--set changes --config"),
        (["--images", "10", "--config", REAL, "--rates", "tag=1"], "no rate for stage"),
        (["--images", "10", "--config", "nosuch.yaml", "--rates", "tag=1"], "nosuch.yaml not found"),
    ],
)
def test_cli_errors_exit_2(args, message, capsys):
    assert main(["size", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_run_saves_a_record_that_size_reads(tmp_path):
    """End to end: a tiny pipeline run on an embedded Ray writes runs/<time>.json; size reads it."""
    from datagen.synthetic import make_image_folder

    make_image_folder(tmp_path / "in", 12, seed=2, min_size=64, max_size=128)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = [sys.executable, "-m", "datagen", "run", "--config", TINY, "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "out"), "--no-progress", "--set", "execution.num_cpus=2"]
    proc = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"measurements saved to {tmp_path / 'out' / RUNS_DIR}" in proc.stdout
    size_cmd = [sys.executable, "-m", "datagen", "size", "--from", str(tmp_path / "out"), "--images", "3300000", "--json"]
    proc = subprocess.run(size_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["source"]["processed"] == 12 and plan["source"]["nodes"] == 1
    assert [s["stage"] for s in plan["stages"]] == ["decode", *STAGE_ORDER, "pack"]
    assert all(s["rate"] > 0 for s in plan["stages"])
    assert plan["resource"] == "CPU" and plan["gpus"] == 0
    assert plan["config"]["pools"]["models"]["actors"] >= 1
