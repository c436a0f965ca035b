"""The release's box rasterization as a named option (docs/METHOD.md §2.2, §9): its exact cells, and that
it reaches the region map from reorganization, the training data config, the pipeline and generate."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shards.reader import Sample
from shards.schema import ObjectRecord, SampleRecord
from training.data.config import ConfigError, StreamConfig
from training.data.examples import make_example
from training.inference import generate
from training.inference import pipeline as layout_pipeline_module
from training.inference.pipeline import LayoutPipeline
from training.layout.regions import rasterize_boxes, reorganize_regions
from training.model.tiny import tiny_sdxl_pipeline


def cells(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """The rows and the columns a box mask covers."""
    return np.nonzero(mask.any(1))[0].tolist(), np.nonzero(mask.any(0))[0].tolist()


def test_box_touching_the_right_and_bottom_edge_covers_the_last_cells_only_under_cover():
    # 64x64 image: 8x8 grid. [0, 0, 64, 64] / 8 = [0, 0, 8, 8].
    full = [[0, 0, 64, 64]]
    cover = rasterize_boxes(np.array(full), 8, 8, rasterize="cover")[0]
    assert cover.all()
    # release: start trunc(0) = 0; end trunc(8) = 8 > 0, clamped to w-1 = 7; slice [0:7] -> cells 0..6.
    release = rasterize_boxes(np.array(full), 8, 8, rasterize="release")[0]
    assert cells(release) == (list(range(7)), list(range(7)))
    assert not release[7].any() and not release[:, 7].any()

    cover_layout = reorganize_regions(full, ["sky"], 64, 64)
    release_layout = reorganize_regions(full, ["sky"], 64, 64, rasterize="release")
    assert (cover_layout.region_map == 0).all() and cover_layout.background_slot is None
    bg = release_layout.background_slot
    assert bg is not None and release_layout.texts[bg] == "" and release_layout.n_slots == 2
    expected = np.full((8, 8), 1 - bg, dtype=np.int32)
    expected[7, :] = bg
    expected[:, 7] = bg
    np.testing.assert_array_equal(release_layout.region_map, expected)


def test_interior_boxes_on_cell_edges_give_identical_layouts_under_both_rules():
    # Ends on cell edges and not beyond cell 7 (56 px): floor == trunc, ceil == trunc, no clamp bites.
    boxes = [[8, 8, 32, 40], [16, 0, 56, 24], [0, 24, 48, 56]]
    texts = ["a dog", "a kite", "a road"]
    a = reorganize_regions(boxes, texts, 64, 64, rng=np.random.default_rng(3))
    b = reorganize_regions(boxes, texts, 64, 64, rng=np.random.default_rng(3), rasterize="release")
    np.testing.assert_array_equal(a.region_map, b.region_map)
    assert a.texts == b.texts and a.background_slot == b.background_slot
    for x, y in zip(a.weights + a.boxes, b.weights + b.boxes, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.union_masks, b.union_masks)

    rng = np.random.default_rng(0)
    for _ in range(50):  # any such box, on a non-square grid too (48 x 80 px: 6 x 10 cells)
        lo = rng.integers(0, [9, 5], size=(4, 2))  # start cell (col, row)
        hi = lo + rng.integers(1, 4, size=(4, 2))
        xyxy = 8 * np.concatenate([lo, np.minimum(hi, [9, 5])], 1).astype(float)
        xyxy = xyxy[(xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])]
        np.testing.assert_array_equal(
            rasterize_boxes(xyxy, 6, 10, rasterize="cover"), rasterize_boxes(xyxy, 6, 10, rasterize="release")
        )


@pytest.mark.parametrize(
    ("box", "release_cells", "cover_cells"),
    [
        # /8 = [1.5, 0.5, 3.75, 2.5]. release: cols trunc 1 .. trunc 3 (excl) -> 1, 2; rows 0 .. 2 -> 0, 1.
        # cover: cols floor 1 .. ceil 4 -> 1, 2, 3; rows 0 .. ceil 3 -> 0, 1, 2.
        ([12, 4, 30, 20], ([0, 1], [1, 2]), ([0, 1, 2], [1, 2, 3])),
        # Inside one cell: /8 = [0.375, 0.375, 0.875, 0.875]; release start 0, end trunc 0 <= 0: nothing.
        ([3, 3, 7, 7], ([], []), ([0], [0])),
        # /8 = [-1.25, 6.25, 2.5, 8.75]. release: cols start trunc(-1.25) = -1 clamped to 0, end 2 -> 0, 1;
        # rows 6 .. trunc 8 clamped to 7 -> 6. cover: cols 0 .. ceil 3 -> 0, 1, 2; rows 6 .. min(9, 8) -> 6, 7.
        ([-10, 50, 20, 70], ([6], [0, 1]), ([6, 7], [0, 1, 2])),
        # The last cell: /8 = [7, 7, 8, 8]. release: start 7, end 8 > 7 clamped to 7 -> [7:7], nothing.
        ([56, 56, 64, 64], ([], []), ([7], [7])),
        # /8 = [2, 1, 5.99, 7.5]. release: cols 2 .. trunc 5 -> 2, 3, 4; rows 1 .. trunc 7 (7 = h-1) -> 1..6.
        ([16, 8, 47.9, 60], ([1, 2, 3, 4, 5, 6], [2, 3, 4]), ([1, 2, 3, 4, 5, 6, 7], [2, 3, 4, 5])),
        # Starts past the grid: /8 = [9, 0, 10, 1]. release: start 9 clamped to 7, end 10 clamped to 7.
        ([72, 0, 80, 8], ([], []), ([], [])),
    ],
)
def test_release_rule_on_hand_made_boxes(box, release_cells, cover_cells):
    assert cells(rasterize_boxes(np.array([box], float), 8, 8, rasterize="release")[0]) == release_cells
    assert cells(rasterize_boxes(np.array([box], float), 8, 8, rasterize="cover")[0]) == cover_cells


def test_release_weights_count_the_release_cells_and_unknown_rules_fail():
    # A [0,0,64,64] box has 7x7 = 49 release cells, a [0,0,32,32] box 4x4 = 16: the region inside both
    # weighs 16/16 for the small box and 16/49 for the large one.
    layout = reorganize_regions([[0, 0, 64, 64], [0, 0, 32, 32]], ["a", "b"], 64, 64, rasterize="release")
    both = layout.region_map[0, 0]
    np.testing.assert_allclose(layout.weights[both], np.array([16 / 49, 1.0], np.float32))
    with pytest.raises(ValueError, match=r"rasterize must be one of \['cover', 'release'\], got 'edge'"):
        reorganize_regions([[0, 0, 8, 8]], ["a"], 64, 64, rasterize="edge")


def _jpeg(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_training_data_config_reaches_the_examples_region_map():
    rec = SampleRecord(key="k", width=64, height=64, original_width=64, original_height=64,
                       objects=(ObjectRecord(box=(0.0, 0.0, 64.0, 64.0), phrase="sky"),))  # fmt: skip
    sample = Sample(record=rec, image_bytes=_jpeg(64), image_ext="jpg", url="u")
    base = {"datasets": [{"path": "p", "augment": {"size": [64, 64], "flip_prob": 0.0, "crop": "center"}}]}
    assert StreamConfig.from_dict(base).regions.rasterize == "cover"
    maps = {}
    for rule in ("cover", "release"):
        cfg = StreamConfig.from_dict({**base, "regions": {"rasterize": rule}})
        spec = cfg.datasets[0]
        maps[rule] = make_example(sample, spec, cfg, np.random.default_rng(0)).layout.region_map
    assert (maps["cover"] == 0).all()
    assert (maps["release"][:7, :7] == maps["release"][0, 0]).all()
    assert (maps["release"][7] != maps["release"][0, 0]).all()
    with pytest.raises(ConfigError, match="rasterize"):
        StreamConfig.from_dict({**base, "regions": {"rasterize": "edge"}})


@pytest.fixture(scope="module")
def pipe():
    sdxl = tiny_sdxl_pipeline(0)
    sdxl.set_progress_bar_config(disable=True)
    return LayoutPipeline.from_sdxl(sdxl)


def _region_maps(pipe, **kw) -> list[torch.Tensor]:
    seen = []
    hook = pipe.sdxl.unet.position_net.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["region_map"].clone()), with_kwargs=True
    )
    try:
        pipe("a sky", boxes=[[0, 0, 64, 64]], labels=["a blue sky"], height=64, width=64, num_inference_steps=1,
             guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    finally:
        hook.remove()
    return seen


def test_pipeline_keyword_and_constructor_reach_the_fusers_region_map(pipe):
    cover = _region_maps(pipe)[0][1]  # row 0: CFG's empty layout; row 1: the layout
    assert (cover == 0).all()
    release = _region_maps(pipe, rasterize="release")[0][1]
    assert (release[:, 7] != release[0, 0]).all() and (release[7, :] != release[0, 0]).all()
    assert (release[:7, :7] == release[0, 0]).all()
    as_default = LayoutPipeline(pipe.sdxl, rasterize="release")
    torch.testing.assert_close(_region_maps(as_default)[0][1], release)
    torch.testing.assert_close(_region_maps(as_default, rasterize="cover")[0][1], cover)
    with pytest.raises(ValueError, match="rasterize must be one of"):
        _region_maps(pipe, rasterize="edge")
    with pytest.raises(ValueError, match="rasterize must be one of"):
        LayoutPipeline(pipe.sdxl, rasterize="Release")


def test_generate_set_rasterize_release_writes_images_and_drops_the_last_column(tmp_path, monkeypatch, capsys):
    seen = []
    real = layout_pipeline_module.grounding_inputs

    def spy(layouts, *args, **kwargs):
        seen.extend(layout.region_map for layout in layouts if layout.n_slots)
        return real(layouts, *args, **kwargs)

    monkeypatch.setattr(layout_pipeline_module, "grounding_inputs", spy)
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text(json.dumps({"id": "sky", "boxes": [[0, 0, 64, 64]], "labels": ["a blue sky"]}) + "\n")
    out = tmp_path / "out"
    argv = ["--tiny", "--layouts", str(layouts), "--out", str(out), "--set", "rasterize=release"]
    assert generate.main(argv) == 0
    assert (out / "sky.png").is_file() and (out / "layouts.jsonl").is_file()
    assert json.loads((out / "generate.json").read_text())["config"]["rasterize"] == "release"
    assert len(seen) == 1
    region_map = seen[0]
    assert (region_map[:, 7] != region_map[0, 0]).all() and (region_map[:7, :7] == region_map[0, 0]).all()

    capsys.readouterr()
    bad = ["--tiny", "--layouts", str(layouts), "--out", str(tmp_path / "bad"), "--set", "rasterize=edge"]
    assert generate.main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rasterize" in err and "Traceback" not in err


def test_release_preset_sets_the_release_rule_and_others_keep_cover():
    assert generate.load_section(generate.GenerateConfig, "release", None, "generate", []).rasterize == "release"
    for preset in ("paper", "tiny"):
        assert generate.load_section(generate.GenerateConfig, preset, None, "generate", []).rasterize == "cover"
