"""The trainer's options: per-sample layout dropout, LoRA on the base attention (peft), 8-bit AdamW
(bitsandbytes). Tiny random SDXL parts on CPU, fp32. FSDP is in ``test_train_ddp.py`` (two processes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_fixtures import region_encoder
from test_train import SIZE, dataset, tiny_config  # noqa: F401  (dataset is a fixture)

from training.encoding import grounding_inputs, grounding_inputs_from_batch
from training.regions import empty_layout, reorganize_regions

# ---------------------------------------------------------------------------------------------------
# Layout dropout, per sample, in the encoding


def _batch_of(layouts, max_slots: int, max_objs: int = 3) -> dict:
    """The ``region_*`` fields of a collated batch holding these layouts (as ``training.collate`` lays them out)."""
    n = len(layouts)
    h, w = layouts[0].grid_size
    batch = {
        "region_map": torch.from_numpy(np.stack([layout.region_map for layout in layouts]).astype(np.int64)),
        "slot_mask": torch.zeros(n, max_slots, dtype=torch.bool),
        "region_texts": [[""] * max_slots for _ in layouts],
        "region_boxes": torch.full((n, max_slots, max_objs, 4), -1.0),
        "region_weights": torch.zeros(n, max_slots, max_objs),
        "segment_mask": torch.zeros(n, max_slots, max_objs, dtype=torch.bool),
        "region_union_masks": torch.zeros(n, max_slots, h, w, dtype=torch.bool),
    }
    for b, layout in enumerate(layouts):
        for s in range(layout.n_slots):
            k = len(layout.boxes[s])
            batch["slot_mask"][b, s] = True
            batch["region_texts"][b][s] = layout.texts[s]
            batch["region_boxes"][b, s, :k] = torch.from_numpy(layout.boxes[s])
            batch["region_weights"][b, s, :k] = torch.from_numpy(layout.weights[s])
            batch["segment_mask"][b, s, :k] = True
            batch["region_union_masks"][b, s] = torch.from_numpy(layout.union_masks[s])
    return batch


def _layouts():
    return [
        reorganize_regions([[0, 0, 24, 40], [8, 8, 40, 40]], ["a red dog", "a cat"], 40, 40),
        reorganize_regions([[0, 0, 16, 16], [16, 0, 40, 24], [4, 4, 36, 36]], ["x", "a b", "c"], 40, 40),
        reorganize_regions([[8, 0, 40, 16]], ["a small tree"], 40, 40),
    ]


def test_a_dropped_layout_is_exactly_the_empty_layout_and_the_others_are_unchanged():
    layouts, slots = _layouts(), 6
    batch = _batch_of(layouts, slots)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    encoder = region_encoder()
    kept = grounding_inputs_from_batch(batch, encoder)
    dropped = grounding_inputs_from_batch(batch, encoder, drop_layout=[False, True, False])
    empty = grounding_inputs([empty_layout(40, 40)], encoder, max_slots=slots)  # inference's negative
    assert kept.keys() == dropped.keys() == empty.keys()
    for key in kept:
        assert torch.equal(dropped[key][1], empty[key][0]), key
        assert torch.equal(dropped[key][[0, 2]], kept[key][[0, 2]]), key
        assert not torch.equal(kept[key][1], empty[key][0]) or key == "attention_bias", key
    assert dropped["object_masks"][1].tolist() == [1, 0, 0, 0, 0, 0]
    for key, value in before.items():  # the batch itself is left alone
        assert torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else batch[key] == value


def test_layout_dropout_of_layouts_matches_the_batch_form_and_masks_are_checked():
    layouts, slots = _layouts(), 6
    encoder = region_encoder()
    drop = torch.tensor([True, False, True])
    ours = grounding_inputs(layouts, encoder, max_slots=slots, drop_layout=drop)
    theirs = grounding_inputs_from_batch(_batch_of(layouts, slots), encoder, drop_layout=drop)
    expected = grounding_inputs(
        [empty_layout(40, 40), layouts[1], empty_layout(40, 40)], encoder, max_slots=slots
    )
    for key in expected:
        assert torch.equal(ours[key], expected[key]) and torch.equal(theirs[key], expected[key]), key
    with pytest.raises(ValueError, match="one bool per sample"):
        grounding_inputs(layouts, encoder, max_slots=slots, drop_layout=[True])
    with pytest.raises(ValueError, match="one bool per sample"):
        grounding_inputs_from_batch(_batch_of(layouts, slots), encoder, drop_layout=[0.5, 0, 0])


def test_a_dropped_layout_skips_encoding_its_region_texts():
    layouts, slots = _layouts(), 6
    encoder = region_encoder()
    grounding_inputs_from_batch(_batch_of(layouts, slots), encoder, drop_layout=[True, True, True])
    assert encoder.stats.misses == 1  # only the empty layout's background text ""
