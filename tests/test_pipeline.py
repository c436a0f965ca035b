"""The layout pipeline on tiny SDXL: with and without a layout, scheduled sampling, CFG rows, bad input, loading."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training.inference.pipeline import LayoutPipeline, active_layout_steps
from training.model.adapter import adapter_state_dict, save_adapter
from training.model.tiny import tiny_sdxl_pipeline

SIZE = dict(height=64, width=64)
BOXES = [[0, 0, 32, 40], [16, 8, 64, 64]]
LABELS = ["a red kite", "a dog lying on the sand"]


def _perturb(unet, seed=0, scale=0.5):
    """A fresh adapter is an exact no-op (zero-init output): give it random weights so the layout acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("position_net.") or ".fuser." in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def pipe():
    sdxl = tiny_sdxl_pipeline(0)
    sdxl.set_progress_bar_config(disable=True)
    pipe = LayoutPipeline.from_sdxl(sdxl)
    _perturb(sdxl.unet)
    return pipe


@pytest.fixture
def position_net_calls(pipe):
    """kwargs of every position-net call (one per UNet forward that carries the layout)."""
    calls = []
    hook = pipe.sdxl.unet.position_net.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    yield calls
    hook.remove()


def _run(pipe, steps=2, **kw):
    out = pipe("a beach", **SIZE, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    return out.images[0]


def test_layout_and_scheduled_sampling(pipe, position_net_calls):
    no_layout = _run(pipe)
    assert no_layout.shape == (64, 64, 3) and np.isfinite(no_layout).all()
    assert position_net_calls == []

    # No layout is exactly the stock SDXL pipeline (negative prompt "" as training encodes it).
    stock = pipe.sdxl("a beach", negative_prompt="", **SIZE, num_inference_steps=2, guidance_scale=5.0,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    np.testing.assert_array_equal(no_layout, stock)

    beta0 = _run(pipe, boxes=BOXES, labels=LABELS, scheduled_sampling_beta=0.0)
    np.testing.assert_array_equal(beta0, no_layout)
    assert position_net_calls == []

    beta1 = _run(pipe, boxes=BOXES, labels=LABELS, scheduled_sampling_beta=1.0)
    assert np.abs(beta1 - no_layout).max() > 1e-3
    assert len(position_net_calls) == 2  # the layout at both steps
    # CFG rows: negative first with the empty layout (no region at all), then the layout's regions.
    masks = position_net_calls[0]["object_masks"]
    assert masks.shape[0] == 2 and masks[0].sum() == 0 and masks[1].sum() > 2
    assert (position_net_calls[0]["region_map"][0] == -1).all()

    position_net_calls.clear()
    half = _run(pipe, steps=4, boxes=BOXES, labels=LABELS, scheduled_sampling_beta=0.5)
    assert len(position_net_calls) == 2  # first ceil(0.5 * 4) steps only
    assert np.abs(half - _run(pipe, steps=4, boxes=BOXES, labels=LABELS)).max() > 1e-4


def test_active_layout_steps():
    assert [active_layout_steps(b, 10) for b in (0.0, 0.01, 0.3, 0.7, 1.0)] == [0, 1, 3, 7, 10]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(boxes=BOXES, labels=LABELS[:1]), "2 boxes but 1 labels"),
        (dict(boxes=[[0, 0, 65, 10]], labels=["a"]), "outside the 64x64 image"),
        (dict(boxes=[[-1, 0, 10, 10]], labels=["a"]), "outside"),
        (dict(boxes=[[10, 0, 10, 10]], labels=["a"]), "x2 <= x1"),
        (dict(boxes=[[0, 10, 10, 5]], labels=["a"]), "y2 <= y1"),
        (dict(boxes=[[0, 0, 8, 8]] * 31, labels=["a"] * 31), "at most 30"),
        (dict(boxes=[[0, 0, float("nan"), 8]], labels=["a"]), "NaN or inf"),
        (dict(boxes=[[0, 0, float("inf"), 8]], labels=["a"]), "NaN or inf"),
        (dict(boxes=[[0, 0, 8]], labels=["a"]), r"shape \(N, 4\)"),
        (dict(boxes=[[0, 0, 8, 8]], labels=None), "boxes and labels together"),
        (dict(boxes=[[0, 0, 8, 8]], labels=["a"], height=60), "height must be a positive multiple of 8"),
        (dict(boxes=[[0, 0, 8, 8]], labels=["a"], width=100), "width must be a positive multiple of 8"),
        (dict(boxes=[[0, 0, 8, 8]], labels=["a"], scheduled_sampling_beta=1.5), r"in \[0, 1\]"),
        (dict(boxes=[[0, 0, 8, 8]], labels=[3]), "not strings"),
    ],
)
def test_bad_input_is_a_clear_value_error(pipe, kwargs, match):
    kwargs = {**SIZE, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe("a beach", num_inference_steps=1, **kwargs)


def test_loads_adapter_ema_and_release_keys(pipe, tmp_path):
    trained = {k: v.clone() for k, v in adapter_state_dict(pipe.sdxl.unet).items()}
    path = save_adapter(pipe.sdxl.unet, tmp_path / "adapter.safetensors")
    ema = {k: v + 1.0 for k, v in trained.items()}
    save_file(ema, str(tmp_path / "ema.safetensors"))
    # The release's checkpoints: "unet." prefix, whole-UNet keys beside the adapter's.
    release = {f"unet.{k}": v for k, v in trained.items()} | {"unet.conv_in.weight": torch.zeros(1)}
    save_file(release, str(tmp_path / "release.safetensors"))

    def loaded(**kw):
        sdxl = tiny_sdxl_pipeline(0)
        return adapter_state_dict(LayoutPipeline.from_sdxl(sdxl, **kw).sdxl.unet)

    for source, expected in ((dict(adapter=path), trained), (dict(adapter=path, ema=tmp_path / "ema.safetensors"), ema),
                             (dict(adapter=tmp_path / "release.safetensors"), trained)):  # fmt: skip
        got = loaded(**source)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), source

    save_file({k: v for k, v in list(trained.items())[1:]}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="partial.safetensors: keys do not match the model: 1 missing keys"):
        loaded(adapter=tmp_path / "partial.safetensors")


def test_loads_the_trainers_lora_and_it_changes_the_image(pipe, tmp_path):
    """A LoRA file written by the trainer (save_lora) loads into a fresh pipeline's UNet weight for weight,
    and with non-zero B it changes the generated image; a file of another UNet is refused by name."""
    pytest.importorskip("peft")
    from training.model.lora import add_lora, is_lora_key, save_lora

    source = tiny_sdxl_pipeline(0).unet
    add_lora(source, 4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if is_lora_key(name):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))  # B != 0: the LoRA acts
    lora = {k: v.detach().clone() for k, v in source.state_dict().items() if is_lora_key(k)}
    path = save_lora(lora, tmp_path / "lora.safetensors")
    adapter = save_adapter(pipe.sdxl.unet, tmp_path / "adapter.safetensors")

    def build(**kw):
        sdxl = tiny_sdxl_pipeline(0)
        sdxl.set_progress_bar_config(disable=True)
        return LayoutPipeline.from_sdxl(sdxl, adapter, **kw)

    with_lora = build(lora=path)
    got = {k: v for k, v in with_lora.sdxl.unet.state_dict().items() if is_lora_key(k)}
    assert got.keys() == lora.keys() and all(torch.equal(got[k], lora[k]) for k in got)
    layout = dict(boxes=BOXES, labels=LABELS)
    assert not np.allclose(_run(with_lora, **layout), _run(build(), **layout))

    other = {"unet.down_blocks.9.attentions.0.to_q.lora.down.weight": torch.zeros(4, 32)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: LoRA keys differ"):
        build(lora=tmp_path / "other.safetensors")
