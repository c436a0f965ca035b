"""Sequenced grounding encoding (docs/METHOD.md §3): spans, per-token boxes and biases, cache."""

import numpy as np
import pytest
import torch
from _model_fixtures import region_encoder, text_encoders, tokenizers

from training.layout.regions import empty_layout, pad_layouts, reorganize_regions
from training.model.encoding import (
    NEG_BIAS,
    grounding_inputs,
    grounding_inputs_from_batch,
    separator_ids,
    slot_token_targets,
    token_spans,
)

BOS, EOS, SEP = 100, 101, 7


def test_token_spans_several_segments():
    ids = [BOS, 1, 2, SEP, 3, SEP, 4, 5, 6, EOS, EOS, EOS]
    assert token_spans(ids, BOS, EOS, frozenset({SEP})) == [(1, 3), (4, 5), (6, 9)]


def test_token_spans_truncated_last_segment_ends_at_the_truncation_point():
    ids = [BOS, 1, SEP, 2, 3, 4]  # no EOS: cut by truncation
    assert token_spans(ids, BOS, EOS, frozenset({SEP})) == [(1, 2), (3, 6)]


def test_token_spans_empty_text_and_empty_segments():
    assert token_spans([BOS, EOS, EOS], BOS, EOS, frozenset({SEP})) == [(1, 1)]
    assert token_spans([BOS, SEP, 1, SEP, EOS], BOS, EOS, frozenset({SEP})) == [(1, 1), (2, 3), (4, 4)]


def test_separator_ids_are_every_token_holding_the_separator():
    tok = tokenizers()[0]
    seps = separator_ids(tok)
    ids = tok("a dog.; a cat", add_special_tokens=False)["input_ids"]
    assert any(i in seps for i in ids)
    assert tok.convert_tokens_to_ids(";</w>") in seps and tok.convert_tokens_to_ids("a</w>") not in seps


def test_slot_token_targets_exact_boxes_and_biases():
    spans = [(1, 3), (4, 6)]
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], dtype=np.float32)
    token_boxes, bias = slot_token_targets(
        spans, boxes, np.array([1.0, 0.25]), attention_weight_scale=2.0, n_tokens=8
    )
    np.testing.assert_array_equal(bias, [NEG_BIAS, 0, 0, NEG_BIAS, -1.5, -1.5, NEG_BIAS, NEG_BIAS])
    expected = np.full((8, 4), -1.0, dtype=np.float32)
    expected[1:3], expected[4:6] = boxes[0], boxes[1]
    np.testing.assert_array_equal(token_boxes, expected)


def test_slot_token_targets_drop_truncated_objects_and_renormalize():
    # three objects, the third truncated away; the second's weight becomes the max among those kept
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4) / 12
    weights = np.array([0.25, 0.5, 1.0])
    token_boxes, bias = slot_token_targets([(1, 2), (3, 5)], boxes, weights, n_tokens=6)
    np.testing.assert_array_equal(bias, [NEG_BIAS, -0.5, NEG_BIAS, 0, 0, NEG_BIAS])
    assert not (token_boxes == boxes[2]).all(axis=1).any()


def test_slot_without_segment_tokens_attends_like_the_background():
    token_boxes, bias = slot_token_targets([(1, 1)], np.array([[-1, -1, -1, -1.0]]), np.ones(1), n_tokens=5)
    np.testing.assert_array_equal(bias, np.zeros(5))
    np.testing.assert_array_equal(token_boxes, -np.ones((5, 4)))
    with pytest.raises(ValueError, match="2 segments but the slot has 1 objects"):
        slot_token_targets([(1, 2), (3, 4)], np.zeros((1, 4)), np.ones(1))


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return calls, handle


def test_encoder_batches_and_never_encodes_a_text_twice():
    encoder = region_encoder(cache_size=8, batch_size=2)
    calls, handle = _count_calls(text_encoders()[0])
    try:
        first = encoder.encode_texts(["a dog", "a cat", "a dog", "red car", "blue sky"])
        assert calls == [2, 2]  # 4 distinct texts in batches of 2
        assert encoder.stats.misses == 4 and encoder.stats.hits == 1
        again = encoder.encode_texts(["a cat", "a dog"])
        assert calls == [2, 2] and encoder.stats.hits == 3
        assert again[1] is first[0]
    finally:
        handle.remove()
    assert first[0].hidden.shape == (77, encoder.hidden_size) and encoder.hidden_size == 64


def test_batched_encoding_equals_one_by_one():
    texts = ["a dog sitting on a red sofa", "", "small bird; tall tree"]
    batched = region_encoder().encode_texts(texts)
    for text, enc in zip(texts, batched, strict=True):
        single = region_encoder().encode_texts([text])[0]
        torch.testing.assert_close(enc.hidden, single.hidden, rtol=1e-5, atol=1e-5)
        assert enc.spans == single.spans


def test_cache_is_a_bounded_lru():
    encoder = region_encoder(cache_size=2)
    encoder.encode_texts(["a", "b"])
    encoder.encode_texts(["a"])  # "a" most recent
    encoder.encode_texts(["c"])  # evicts "b"
    assert encoder.stats.size == 2
    encoder.encode_texts(["a", "b"])
    assert encoder.stats.misses == 4 and encoder.stats.hits == 2


def test_grounding_inputs_layout_to_tensors():
    encoder = region_encoder()
    layout = reorganize_regions([[0, 0, 32, 32], [16, 16, 64, 64]], ["red dog", "black horse"], 64, 64)
    gligen = grounding_inputs([layout, empty_layout(64, 64)], encoder, max_slots=5)
    assert gligen["text_embeddings"].shape == (2, 5, 77, 64)
    # the empty layout has no live slot at all (docs/METHOD.md §4.1): every cell -1
    assert gligen["object_masks"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert (gligen["region_map"][1] == -1).all() and not gligen["union_masks"][1].any()
    assert gligen["region_map"].shape == (2, 8, 8) and gligen["union_masks"].shape == (2, 5, 8, 8)
    torch.testing.assert_close(gligen["region_map"][0], torch.from_numpy(layout.region_map).long())
    # slot 2 = "red dog; black horse": BOS, red, dog, ;, black, cat, EOS
    s = layout.texts.index("red dog; black horse")
    w = 16 / 36  # cells(dog box) / cells(cat box)
    expected = [NEG_BIAS, 0, 0, NEG_BIAS, w - 1, w - 1, NEG_BIAS, NEG_BIAS]
    torch.testing.assert_close(gligen["attention_bias"][0, s, :8], torch.tensor(expected))
    torch.testing.assert_close(gligen["bbox_embeddings"][0, s, 4], torch.tensor([0.25, 0.25, 1, 1]))
    # the background slot: bias 0 on all 77 tokens (see the encoding module's docstring)
    assert (gligen["attention_bias"][0, layout.background_slot] == 0).all()
    assert (gligen["attention_bias"][1] == 0).all() and (gligen["text_embeddings"][1] == 0).all()
    torch.testing.assert_close(
        gligen["text_embeddings"][0, s], encoder.encode_texts([layout.texts[s]])[0].hidden
    )


def test_truncated_object_is_dropped_consistently():
    long_text = " ".join(["dog"] * 80)
    layout = reorganize_regions([[0, 0, 16, 16], [0, 0, 8, 8]], [long_text, "cat"], 16, 16)
    gligen = grounding_inputs([layout], region_encoder(), max_slots=2)
    s = layout.texts.index(f"{long_text}; cat")
    bias, boxes = gligen["attention_bias"][0, s], gligen["bbox_embeddings"][0, s]
    assert (bias[1:76] == 0).all() and bias[0] == NEG_BIAS and bias[76] == NEG_BIAS
    assert (boxes[1:76] == torch.tensor([0, 0, 1, 1.0])).all()  # only the first object's box remains


def test_grounding_inputs_from_a_collated_batch_match():
    layouts = [
        reorganize_regions([[0, 0, 24, 40], [8, 8, 40, 40]], ["a dog", "a cat"], 40, 40),
        empty_layout(40, 40),
    ]
    max_slots, max_objs = 6, 3
    batch = {
        "region_map": np.stack([layout.region_map for layout in layouts]).astype(np.int64),
        "slot_mask": np.zeros((2, max_slots), dtype=bool),
        "region_texts": [[""] * max_slots for _ in layouts],
        "region_boxes": np.full((2, max_slots, max_objs, 4), -1.0, dtype=np.float32),
        "region_weights": np.zeros((2, max_slots, max_objs), dtype=np.float32),
        "segment_mask": np.zeros((2, max_slots, max_objs), dtype=bool),
        "region_union_masks": np.zeros((2, max_slots, 5, 5), dtype=bool),
    }
    for b, layout in enumerate(layouts):
        for s in range(layout.n_slots):
            k = len(layout.boxes[s])
            batch["slot_mask"][b, s] = True
            batch["region_texts"][b][s] = layout.texts[s]
            batch["region_boxes"][b, s, :k] = layout.boxes[s]
            batch["region_weights"][b, s, :k] = layout.weights[s]
            batch["segment_mask"][b, s, :k] = True
            batch["region_union_masks"][b, s] = layout.union_masks[s]
    encoder = region_encoder()
    ours = grounding_inputs(layouts, encoder, max_slots=max_slots)
    theirs = grounding_inputs_from_batch(
        {k: torch.as_tensor(v) if k != "region_texts" else v for k, v in batch.items()}, encoder
    )
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    # collate's padding is what grounding_inputs_from_batch reads as it is
    padded = pad_layouts(layouts, max_slots, max_objs)
    assert padded["region_texts"] == batch["region_texts"]
    for key, value in batch.items():
        if key != "region_texts":
            np.testing.assert_array_equal(padded[key], value)


def test_grounding_inputs_rejects_mixed_grids_and_too_many_slots():
    encoder = region_encoder()
    with pytest.raises(ValueError, match="share a latent grid"):
        grounding_inputs([empty_layout(16, 16), empty_layout(16, 24)], encoder)
    layout = reorganize_regions([[0, 0, 8, 8], [8, 8, 16, 16]], ["a", "b"], 16, 16)
    with pytest.raises(ValueError, match="max_slots=2"):
        grounding_inputs([layout], encoder, max_slots=2)
