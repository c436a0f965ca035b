"""shards.config: the one typed builder, ConfigError and override parser behind every preset in configs/."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest

from datagen import config as datagen_config
from datagen.cli import main as datagen_main
from datagen.config import DatagenConfig, load_config
from datagen.stages import vlm_vllm
from shards.config import (
    ConfigError,
    PositiveInt,
    UnitFloat,
    apply_overrides,
    build,
    load,
    read_yaml,
)
from training.data import config as data_config
from training.evaluation.evaluate import EvalConfig
from training.inference.generate import GenerateConfig
from training.trainer import config as train_config
from training.trainer.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY_TRAIN = CONFIGS / "train" / "tiny.yaml"
TINY_DATAGEN = CONFIGS / "datagen" / "tiny.yaml"


@dataclass(frozen=True)
class Inner:
    size: tuple[PositiveInt, PositiveInt] = (8, 8)
    p: UnitFloat = 0.5
    n: PositiveInt | None = 3
    mode: Literal["a", "b"] = "a"
    either: int | str = 0


@dataclass(frozen=True)
class Outer:
    items: tuple[Inner, ...] = ()
    inner: Inner = field(default_factory=Inner)
    named: dict[str, Inner] = field(default_factory=dict)
    flag: bool = False


def _error(cls, data, where="") -> str:
    with pytest.raises(ConfigError) as e:
        build(cls, data, where)
    return str(e.value)


def test_one_config_error_class_everywhere():
    assert datagen_config.ConfigError is data_config.ConfigError is train_config.ConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)


def test_nested_dataclasses_lists_and_1e_minus_5_strings_build():
    got = build(Outer, {"items": [{"size": [16, 24], "p": "1e-5"}], "named": {"k": {"n": None, "mode": "b"}},
                        "inner": {"either": "x"}})
    assert got == Outer(items=(Inner(size=(16, 24), p=1e-5),), inner=Inner(either="x"),
                        named={"k": Inner(n=None, mode="b")})
    assert isinstance(got.items, tuple) and isinstance(got.items[0].size, tuple)
    assert build(Outer, {"inner": {"p": 1}}).inner.p == 1.0  # an int fills a float field


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"mode": "c"}}, "x.inner.mode: must be 'a' or 'b' (got 'c')"),
        ({"inner": {"either": 3.5}}, "x.inner.either: expected an integer (got 3.5) or expected a string (got 3.5)"),
        ({"inner": {"n": "2"}}, "x.inner.n: expected an integer (got '2')"),  # no silent coercion
        ({"inner": {"n": True}}, "x.inner.n: expected an integer (got True)"),
        ({"inner": {"p": True}}, "x.inner.p: expected a number (got True)"),
        ({"inner": {"p": "lots"}}, "x.inner.p: expected a number (got 'lots')"),
        ({"flag": 1}, "x.flag: expected true or false (got 1)"),
        ({"inner": 3}, "x.inner: expected a mapping (got 3)"),
        ({"items": [{}, {"size": [8]}]}, "x.items[1].size: must have 2 items (got [8])"),
        ({"items": [{"size": [8, 8, 8]}]}, "x.items[0].size: must have at most 2 items (got [8, 8, 8])"),
        ({"named": {"k": {"p": 1.5}}}, "x.named.k.p: must be in [0, 1] (got 1.5)"),
        ({"items": [{"size": [8, 0]}]}, "x.items[0].size[1]: must be >= 1 (got 0)"),
        ({"inner": {"siz": 1, "q": 2}}, "x.inner: unknown keys 'siz', 'q' (valid keys: either, mode, n, p, size)"),
        ({"extra": 1}, "x: unknown key 'extra' (valid keys: flag, inner, items, named)"),
    ],
)
def test_errors_are_one_line_naming_the_dotted_field(data, message):
    assert _error(Outer, data, "x") == message


def test_unknown_key_at_the_top_names_the_valid_keys():
    assert _error(Outer, {"extra": 1}) == "unknown key 'extra' (valid keys: flag, inner, items, named)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr: must be > 0 (got -1)"),  # rates
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0, 1) (got 1.0)"),
        ("ema.decay=1", "ema.decay: must be in [0, 1) (got 1)"),
        ("train.layout_dropout=1.5", "train.layout_dropout: must be in [0, 1] (got 1.5)"),  # probabilities
        ("train.max_steps=0", "train.max_steps: must be >= 1 (got 0)"),  # counts
        ("seed=-1", "seed: must be >= 0 (got -1)"),
        ("data.datasets.0.weight=0", "data.datasets[0].weight: must be > 0 (got 0)"),
        ("data.datasets.0.filters.min_clip_score=101", "data.datasets[0].filters.min_clip_score: must be in [-100, 100] (got 101)"),
        ("data.regions.max_slots=0", "data.regions.max_slots: must be >= 1 (got 0)"),
        ("validation.guidance_scale=-2", "validation.guidance_scale: must be >= 0 (got -2)"),
        ("model.lora_rank=-1", "model.lora_rank: must be >= 0 (got -1)"),
        ("optim.lr=nan", "optim.lr: expected a finite number (got nan)"),
        ("data.datasets.0.augment.scale=[0.5, 1]", "data.datasets[0].augment.scale[0]: must be >= 1 (got 0.5)"),
        ("validation.layouts=[{caption: c, boxes: [[-1, 0, 8, 8]], labels: [x]}]",
         "validation.layouts[0].boxes[0][0]: must be >= 0 (got -1)"),
    ],
)
def test_train_ranges_are_checked_and_the_override_is_named(override, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(TINY_TRAIN, [override])
    assert str(e.value) == f"override {override}: {message}"


def test_train_override_values_parse_as_yaml():
    c = TrainConfig.from_yaml(TINY_TRAIN, ["optim.lr=1e-5", "optim.betas=[0.8, 0.9]", "checkpoint.every_steps=null",
                                           "data.datasets.0.augment.size=[32, 48]"])
    assert (c.optim.lr, c.optim.betas, c.checkpoint.every_steps) == (1e-5, (0.8, 0.9), None)
    assert c.data.datasets[0].augment.size == (32, 48)
    assert TrainConfig.from_yaml(TINY_TRAIN, {"optim.lr": 2e-5}).optim.lr == 2e-5
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_TRAIN.read_text().replace("lr: 1.0e-4", "lr: -1"))
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(path)
    assert str(e.value) == f"{path}: optim.lr: must be > 0 (got -1)"
    path.write_text(TINY_TRAIN.read_text().replace("lr: 1.0e-4", "lr: 1e-5"))  # YAML 1.1 reads a string
    assert TrainConfig.from_yaml(path).optim.lr == 1e-5


def test_a_cross_field_error_blames_the_override_below_it():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(TINY_TRAIN, ["data.epoch_samples=null"])
    assert str(e.value) == "override data.epoch_samples=null: data: resampled mode has no natural epoch: set epoch_samples"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.tag.batch_size=-4"], "override stages.tag.batch_size=-4: stages.tag.batch_size: must be >= 1 (got -4)"),
        (["stages.caption.max_new_tokens=-3"],
         "override stages.caption.max_new_tokens=-3: stages.caption.max_new_tokens: must be >= 1 (got -3)"),
        (["stages.ground.box_threshold=1.5"],
         "override stages.ground.box_threshold=1.5: stages.ground.box_threshold: must be in [0, 1] (got 1.5)"),
        (["stages.filter.min_mask_agreement=-0.1"],
         "override stages.filter.min_mask_agreement=-0.1: stages.filter.min_mask_agreement: must be in [0, 1] (got -0.1)"),
        (["stages.describe.max_crop_aspect=0"],
         "override stages.describe.max_crop_aspect=0: stages.describe.max_crop_aspect: must be > 0 (got 0)"),
        (["write.jpeg_quality=101"], "override write.jpeg_quality=101: write.jpeg_quality: must be in [1, 100] (got 101)"),
        (["pools.models.num_cpus=-1"], "override pools.models.num_cpus=-1: pools.models.num_cpus: must be >= 0 (got -1)"),
        (["execution.chunk_size=0"], "override execution.chunk_size=0: execution.chunk_size: must be >= 1 (got 0)"),
        (["vlm.vllm.gpu_memory_utilization=0"],
         "override vlm.vllm.gpu_memory_utilization=0: vlm.vllm.gpu_memory_utilization: must be in (0, 1] (got 0)"),
        (["decode.min_side=512"], "override decode.min_side=512: decode: max_side (256) must be >= min_side (512)"),
        (["models=huge"], "override models=huge: models: must be one of ['real', 'sam3', 'tiny', 'tiny_sam3'] (got 'huge')"),
        (["stages.tag=3"], "override stages.tag=3: stages.tag: expected a mapping of settings (got 3)"),
        (["stages.tag.batchsize=2"], "override stages.tag.batchsize=2: stages.tag: unknown key 'batchsize' (valid keys: "
         "batch_size, caption_fallback, generate_batch_size, max_new_tokens, max_pixels, max_tags, max_words, "
         "method, model, prompt)"),
        ({"pools": {"models": {"actors": 0}}}, "override pools.models.actors=0: pools.models.actors: must be >= 1 (got 0)"),
    ],
)
def test_datagen_stage_ranges_fail_at_load_naming_the_override(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_DATAGEN, overrides)
    assert str(e.value) == message


def test_datagen_cli_answers_a_bad_override_with_one_error_line(capsys):
    assert datagen_main(["plan", "--config", str(TINY_DATAGEN), "--set", "stages.tag.batch_size=-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: override stages.tag.batch_size=-4: stages.tag.batch_size: must be >= 1 (got -4)"]


def test_overrides_create_sections_index_lists_and_refuse_the_rest():
    base = {"a": {"b": 1}, "l": [{"x": 1}], "e": None}
    assert apply_overrides(base, ["a.c=1e-5", "l.0.x=[1, 2]", "n.m=null", "e.f=true"]) == {
        "a": {"b": 1, "c": "1e-5"}, "l": [{"x": [1, 2]}], "n": {"m": None}, "e": {"f": True}}
    assert base == {"a": {"b": 1}, "l": [{"x": 1}], "e": None}  # a copy
    assert apply_overrides(base, {"a": {"c": 2}}) == {**base, "a": {"b": 1, "c": 2}}  # a mapping merges
    for overrides, message in [
        (["a.b.c=1"], "override a.b.c=1: a.b is a value, not a section"),
        (["l.3.x=1"], "override l.3.x=1: l has no item 3"),
        (["noequals"], "override 'noequals' must look like key.subkey=value"),
        (["a..b=1"], "override 'a..b=1' must look like key.subkey=value"),
        (["a.b=[1"], "override a.b=[1: the value is not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ]:
        with pytest.raises(ConfigError) as e:
            apply_overrides(base, overrides)
        assert str(e.value) == message


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file .*nosuch.yaml not found$"):
        read_yaml(tmp_path / "nosuch.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line 2\)"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of settings, got list$"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load(Outer, tmp_path / "empty.yaml") == Outer()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_every_preset_loads(path, monkeypatch):
    monkeypatch.setattr(vlm_vllm, "vllm_available", lambda: True)  # the vLLM preset's check only looks for it
    full = CONFIGS / path
    kind = Path(path).parts[0]
    if kind == "datagen":
        assert load_config(full).stage_names
    elif kind == "train":
        assert TrainConfig.from_yaml(full).data.datasets
    else:
        assert set(read_yaml(full)) <= {"generate", "evaluate"}
        load(GenerateConfig, full, section="generate")
        load(EvalConfig, full, section="evaluate")


def _numeric_fields(cls, seen=None):
    """(class, field, annotated type) of every int/float field in the dataclass tree below ``cls``."""
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    out = []
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        for leaf in _leaves(tp):
            base = typing.get_args(leaf)[0] if typing.get_origin(leaf) is Annotated else leaf
            if dataclasses.is_dataclass(base):
                out += _numeric_fields(base, seen)
            elif base in (int, float):
                out.append((cls.__name__, name, leaf))
    return out


def _leaves(tp):
    if typing.get_origin(tp) is Annotated:
        return [tp]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal or not args:
        return [tp]
    return [leaf for a in args if a is not type(None) and a is not Ellipsis for leaf in _leaves(a)]


def _bounded(tp) -> bool:
    if typing.get_origin(tp) is not Annotated:
        return False
    metadata = [m for meta in typing.get_args(tp)[1:] for m in getattr(meta, "metadata", [meta])]
    return any(any(getattr(m, k, None) is not None for k in ("gt", "ge", "lt", "le")) for m in metadata)


@pytest.mark.parametrize("root", [DatagenConfig, TrainConfig, GenerateConfig, EvalConfig])
def test_every_numeric_field_has_a_range(root):
    from datagen.config import STAGE_ORDER, stage_classes

    classes = [root] + ([stage_classes(s)[1] for s in STAGE_ORDER] if root is DatagenConfig else [])
    fields = [f for cls in classes for f in _numeric_fields(cls)]
    assert fields  # the walk found them
    assert [(c, n) for c, n, tp in fields if not _bounded(tp)] == []
