"""FID (docs/METHOD.md §8): torchmetrics' ``FrechetInceptionDistance`` over torch-fidelity's port of the TF
Inception, comparable with published FIDs.

The weights come from a local file, never downloaded (:func:`find_inception_weights`), and are read
once, with ``weights_only=True`` (:func:`load_inception_state`); torch-fidelity gets that checked state
from memory, never the path (it would unpickle the file again with ``weights_only=False``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "INCEPTION_FILE",
    "FidUnavailable",
    "fid",
    "find_inception_weights",
    "load_inception_state",
    "torch_device",
]

# torch-fidelity's Inception weights (the TF FID network, ported); the file its loader caches.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def torch_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FidUnavailable(RuntimeError):
    """FID cannot be computed here (no local Inception weights, too few images, torch-fidelity missing)."""


def find_inception_weights(path: str | None) -> Path:
    """torch-fidelity's Inception weights: ``path`` if given, else its file in the torch hub cache.

    Never downloads. Raises :class:`FidUnavailable` with instructions when the file is missing.
    """
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if candidate.is_file():
        return candidate
    raise FidUnavailable(
        f"FID skipped: no Inception v3 weights at {candidate}. On a machine with internet, download "
        f"{INCEPTION_URL} and pass its path with --inception-weights (or fid.inception_weights in the preset)."
    )


def _batches_by_size(paths: Iterable[Path], batch_size: int) -> Iterable[torch.Tensor]:
    """``(B, 3, H, W)`` uint8 batches of consecutive images of one size (the metric resizes them itself)."""
    batch: list[np.ndarray] = []
    for path in paths:
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"FID: cannot read image {path}: {err}") from None
        if batch and (array.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
        batch.append(array)
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception weights of a file, read once with ``weights_only=True``: a mapping of tensors, or
    :class:`FidUnavailable` naming the file (a pickle of objects, not a torch file, another shape)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FidUnavailable(f"{path} is not a plain Inception state dict: {reason}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FidUnavailable(f"{path} is not a plain Inception state dict: expected a mapping of tensors")
    return state


def _fid_metric(state: dict[str, torch.Tensor], feature: int, source: object) -> torch.nn.Module:
    """torchmetrics' FID module over the Inception weights ``state`` (already read and checked)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # torch-fidelity reads its weights with torch.load(path, weights_only=False). Handed the path it would
    # unpickle the file a second time, after our check: a file swapped in between would run code. It gets
    # the checked state instead, serialized here from plain tensors into memory (torch.load reads a file
    # object as well as a path), so nothing on disk is read twice.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=buffer)
    except RuntimeError as err:  # load_state_dict: missing / unexpected keys, wrong shapes: a wrong file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{source} is not torch-fidelity's Inception weights: {reason}") from None


@torch.inference_mode()
def fid(
    generated: Sequence[Path],
    reference: Sequence[Path],
    weights: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    feature: int = 2048,
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> float:
    """torchmetrics' ``FrechetInceptionDistance`` of two lists of image files (2048 features: the published FID).

    ``state``: Inception weights already read with :func:`load_inception_state`; else the file ``weights``
    (or the torch hub cache's) is read here, once, with ``weights_only=True``. An image that cannot be
    read is a ValueError naming it.
    """
    if state is None:
        path = find_inception_weights(str(weights) if weights else None)
    if len(generated) < 2 or len(reference) < 2:
        raise FidUnavailable(
            f"FID needs at least 2 images on each side, got {len(generated)} and {len(reference)}"
        )
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' FID needs it
        from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: F401
    except ImportError as err:  # torchmetrics or torch-fidelity not installed
        raise FidUnavailable(f"FID skipped: {err} (pip install torchmetrics torch-fidelity)") from err
    if state is None:
        try:
            state = load_inception_state(path)
        except FidUnavailable as err:
            raise FidUnavailable(f"FID skipped: {err}") from None
    metric = _fid_metric(state, feature, weights or "the Inception weights file").to(torch_device(device))
    for paths, real in ((reference, True), (generated, False)):
        for batch in _batches_by_size(paths, batch_size):
            metric.update(batch.to(metric.device), real=real)
    return float(metric.compute())
