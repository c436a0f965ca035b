"""The soak (issue 19; ``make test-soak``, minutes, in no other run): two CPU processes train the tiny preset
for 200 steps with every dropout on, from uneven shards read as exact epochs by two DataLoader workers per
rank, validating and checkpointing every 20 steps; SIGKILLed twice between checkpoints and resumed with
``resume: latest`` each time. It asserts completion, finite losses and weights, and the per-epoch sample
accounting: every sample once per epoch over both ranks, the repeats that even the ranks out within
``world_size x num_workers x batch_size - 1`` and exactly what the stream's ``repeat/even_out`` counters
(and the trainer's TensorBoard ``stream/*`` scalars) say. The harness is tests/test_train_multinode.py's.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import write_dataset
from test_train_fsdp import run_overrides
from test_train_multinode import (
    deliveries,
    finish,
    finite,
    kill_held,
    newest_intact,
    resumed_step,
    start_nodes,
)

WORLD, WORKERS, BATCH, ACCUM = 2, 2, 1, 2  # batch and accumulation: run_overrides'
STEPS, EVERY = 200, 20
KILLS = (67, 143)  # killed during these steps: the checkpoints at 60 and 140 are the newest
SIZES = [13, 7, 5, 2]  # 27 samples: an epoch is 14 global batches of 2, one repeat


def overrides(dataset: str, out: Path) -> list[str]:
    """The FSDP test's run (every dropout on, LoRA, accumulation 2, exact epochs), longer, with workers."""
    return run_overrides(
        dataset,
        out,
        f"data.num_workers={WORKERS}",
        f"train.max_steps={STEPS}",
        f"validation.every_steps={EVERY}",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep_last=3",
        "checkpoint.resume=latest",
        "log.tensorboard=true",
    )


@pytest.mark.soak
def test_two_hundred_steps_killed_twice_deliver_every_sample_once_per_epoch(tmp_path):
    dataset = write_dataset(tmp_path / "shards", sizes=SIZES)
    folder, run = tmp_path / "soak", tmp_path / "soak" / "run"
    start = time.monotonic()
    segments, resumed_at, first_micro = ["a", "b", "c"], [], 0
    for segment, kill in zip(segments, [*KILLS, None], strict=True):
        # Rank 0 stops after the first micro-batch of step `kill`, and the whole node is SIGKILLed there.
        hold = -1 if kill is None else ACCUM * (kill - 1) + 1 - first_micro
        nodes = start_nodes(folder, segment, overrides(dataset, run), 1, WORLD, hold)
        if kill is None:
            finish(nodes, 1800)
        else:
            kill_held(nodes, 0, folder, segment, 1800)
            assert newest_intact(run) == (kill - 1) // EVERY * EVERY
        if segment != "a":
            resumed_at.append(resumed_step(nodes[0]))
        first_micro = ACCUM * newest_intact(run)
    wall = time.monotonic() - start

    # Completion: resumed at the checkpoint before each kill, the last segment ran the rest, all finite.
    assert resumed_at == [(k - 1) // EVERY * EVERY for k in KILLS]
    losses, _ = finite(folder, WORLD, "c")
    assert [len(r) for r in losses] == [STEPS - resumed_at[-1]] * WORLD
    assert (run / "adapter" / "adapter_ema.safetensors").exists()
    assert len(list((run / "validation").glob("*.png"))) == STEPS // EVERY
    events = EventAccumulator(str(run / "logs" / "richlayout"))
    events.Reload()
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == list(
        range(1, STEPS + 1)
    )  # each step once, the replayed ones superseded
    assert all(math.isfinite(e.value) for e in logged)

    # Per epoch, over both ranks: every sample once, the repeats counted by the stream.
    got = deliveries(folder, WORLD, segments)
    samples, padded = sum(SIZES), math.ceil(sum(SIZES) / (WORLD * BATCH)) * WORLD * BATCH
    epochs = max(e for e, _ in got) + 1
    complete = [e for e in range(epochs) if sum(1 for q, _ in got if q == e) == padded]
    assert len(complete) == STEPS * ACCUM * WORLD * BATCH // padded  # all but the last, cut by max_steps
    assert (
        sorted(got) == [(e, p) for e in range(epochs) for p in range(padded)][: len(got)]
    )  # nothing skipped
    previous = [Counter() for _ in range(WORLD)]
    figures = []
    for e in complete:
        keys = Counter(got[(e, p)]["key"] for p in range(padded))
        repeated = sum(keys.values()) - len(keys)
        assert len(keys) == samples and repeated <= WORLD * WORKERS * BATCH - 1, e
        counted = 0
        for rank in range(WORLD):
            last = max(p for (q, p), v in got.items() if q == e and v["rank"] == rank)
            after = Counter(got[(e, last)]["counts"])
            counted += after["repeat/even_out"] - previous[rank]["repeat/even_out"]
            assert not any(k.startswith("error/") or k == "repeat/substitute" for k in after), after
            previous[rank] = after
        assert counted == repeated, (e, counted, repeated)
        figures.append((len(keys), repeated))
    # The trainer logged the same counters, summed over the ranks, at its last step.
    total = sum(Counter(v["counts"])["repeat/even_out"] for v in _last_per_rank(got))
    assert events.Scalars("stream/repeat/even_out")[-1].value == total
    assert np.isfinite([e.value for e in events.Scalars("grad_norm")]).all()
    print(
        f"\nsoak: {STEPS} steps, {len(KILLS)} SIGKILLs, resumed at {resumed_at}, {wall:.0f} s wall; "
        f"{len(complete)} complete epochs, delivered / repeated per epoch: {sorted(Counter(figures).items())}; "
        f"repeat/even_out over the run {total}"
    )


def _last_per_rank(got: dict) -> list[dict]:
    """Each rank's last delivery (its counters are the rank's totals)."""
    return list({v["rank"]: v for _, v in sorted(got.items())}.values())
