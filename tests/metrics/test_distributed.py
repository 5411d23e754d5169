"""The same predictions evaluated in 1 process and in 2 DDP processes (CPU, gloo) give the same
value for every metric, and the EditEvaluator's results equal the 1-process run's.

One spawn of 2 processes (shared by the tests of this module) evaluates every metric twice, on
an even (4 + 4) and an uneven (5 + 3) split of a fixed batch of 8 random images; ``compute()``
syncs the states across the ranks. Then each rank scores its share of a MagicBrush-like test set
with an :class:`~metrics.evaluation.EditEvaluator`: 7 turns of 3 sessions split so that rank 0
holds only first turns (no final turn) and rank 1 no first turn, with native targets of two
sizes, batches carrying ``skipped_ids`` and KID's list states empty on one rank per
aggregation. The reference is the same evaluation in this (undistributed) process.
Backbones are tiny and random: a CLIP and a DINO ViT saved here, LPIPS with a seeded random
AlexNet, FID/KID on a fixed random conv feature module.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
from fixtures.backbones import TinyFeatures

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # spawned children import this module before the test's setup
    sys.path.insert(0, str(REPO))

N_IMAGES = 8
SIZE = 64
SPLITS = {"even": (4, 4), "uneven": (5, 3)}
WORLD_SIZE = 2
TIMEOUT_S = 300
CAPTION_WORDS = ["a red square", "a blue circle", "two green stars", "a cat", "the night sky"]


# ----------------------------------------------------------------------------- the evaluation


def make_batch() -> dict:
    """The fixed batch: source, preds and target images in [-1, 1], masks (one empty) and
    captions. Built from a seeded generator, so every process holds the same batch."""
    gen = torch.Generator().manual_seed(1234)

    def images() -> torch.Tensor:
        return torch.rand(N_IMAGES, 3, SIZE, SIZE, generator=gen) * 2 - 1

    source, target = images(), images()
    preds = (0.6 * target + 0.4 * images()).clamp(-1, 1)
    mask = torch.zeros(N_IMAGES, 1, SIZE, SIZE)
    corners = torch.randint(0, SIZE // 2, (N_IMAGES, 2), generator=gen)
    for i, (top, left) in enumerate(corners.tolist()):
        if i != 6:  # image 6 (on rank 1 in both splits) has an empty mask
            mask[i, :, top : top + SIZE // 3, left : left + SIZE // 4] = 1
    words = len(CAPTION_WORDS)
    return {
        "source": source,
        "preds": preds,
        "target": target,
        "mask": mask,
        "source_caption": [CAPTION_WORDS[i % words] for i in range(N_IMAGES)],
        "goal_caption": [CAPTION_WORDS[(3 * i + 1) % words] for i in range(N_IMAGES)],
    }


def build_metrics(backbones: Path) -> dict:
    """name -> (metric, the batch keys its ``update`` takes, in order, from the registry)."""
    from metrics import (
        CTS,
        CVS,
        DINO,
        FID,
        KID,
        L1,
        LPIPS,
        SSIM,
        CLIPDirectionalSimilarity,
        CLIPImageSimilarity,
        MaskedL1,
    )
    from metrics.collection import metric_inputs

    clip, dino = backbones / "clip", backbones / "dino"
    torch.manual_seed(0)  # the random LPIPS backbone: the same in every process
    metrics = {
        "L1": L1(),
        "L1_edit": MaskedL1(),
        "SSIM": SSIM(),
        "LPIPS": LPIPS(net="alex", weights_path="random"),
        "DINO": DINO(dino),
        "CVS": CVS(clip),
        "CTS": CTS(clip),
        "CLIP_direction": CLIPDirectionalSimilarity(clip),
        "CLIP_image": CLIPImageSimilarity(clip),
        "FID": FID(feature=TinyFeatures()),
        # subset_size = all images: every KID subset is the whole set, whatever the RNG draws.
        "KID": KID(feature=TinyFeatures(), subsets=3, subset_size=N_IMAGES),
    }
    return {name: (metric, metric_inputs(name, metric)) for name, metric in metrics.items()}


def evaluate(backbones: Path, batch: dict, index: slice) -> dict[str, float]:
    """Update every metric with ``batch[index]`` and compute (synced when distributed)."""
    from metrics.evaluation import flatten_value

    results = {}
    with torch.no_grad():
        for name, (metric, keys) in build_metrics(backbones).items():
            metric.update(*(batch[k][index] for k in keys))
            results |= flatten_value(name, metric.compute())  # KID: name, name_std
    return results


def local_l1(batch: dict, index: slice) -> float:
    """L1 of this rank's images only (no sync): must differ from the synced value."""
    from metrics import L1

    metric = L1(sync_on_compute=False)
    metric.update(batch["preds"][index], batch["target"][index])
    return float(metric.compute())


# ----------------------------------------------------------------------------- the evaluator

#: MagicBrush-like sessions {session: number of turns}; 7 turns in all.
SESSIONS = {"A": 3, "B": 2, "D": 2}
#: Native target sizes (H, W), alternating over the turns; the model works at 32 x 32.
NATIVE_SIZES = ((40, 56), (48, 32))
EVALUATOR_METRICS = ["L1", "L1_edit", "SSIM", "CVS", "CTS", "KID"]


def magicbrush_samples() -> list[dict]:
    """One dict per turn: model-resolution images, native uint8 images, mask, turn fields."""
    gen = torch.Generator().manual_seed(99)
    samples = []
    for session, num_turns in SESSIONS.items():
        for turn in range(1, num_turns + 1):
            h, w = NATIVE_SIZES[len(samples) % 2]
            target = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
            source = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
            mask = torch.zeros(1, h, w, dtype=torch.uint8)
            mask[:, h // 4 : h // 2, w // 3 : w // 2 + 4] = 1
            samples.append(
                {
                    "id": f"magicbrush/{session}/{turn}",
                    "session": session,
                    "turn": turn,
                    "num_turns": num_turns,
                    "preds": torch.rand(3, 32, 32, generator=gen) * 2 - 1,
                    "source": torch.rand(3, 32, 32, generator=gen) * 2 - 1,
                    "target": torch.rand(3, 32, 32, generator=gen) * 2 - 1,
                    "instruction": f"edit {session} {turn}",
                    "goal_caption": CAPTION_WORDS[len(samples) % len(CAPTION_WORDS)],
                    "target_native": target,
                    "source_native": source,
                    "mask_native": mask,
                }
            )
    return samples


def rank_share(rank: int) -> list[list[dict]]:
    """Rank 0: the first turns (one batch); rank 1: the others (batches of 2)."""
    samples = magicbrush_samples()
    if rank == 0:
        return [[s for s in samples if s["turn"] == 1]]
    rest = [s for s in samples if s["turn"] > 1]
    return [rest[i : i + 2] for i in range(0, len(rest), 2)]


def collate_like(samples: list[dict], skipped: list[str]) -> tuple[dict, torch.Tensor]:
    """A batch as the DataModules' evaluation collate gives it (native images as lists)."""
    batch: dict = {"skipped_ids": list(skipped)}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("preds", "source", "target"):
            batch[key] = torch.stack(values)
        elif key in ("turn", "num_turns"):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch, batch.pop("preds")


def evaluate_magicbrush(backbones: Path, batches: list[list[dict]]) -> dict:
    """The EditEvaluator's results and counts on ``batches`` (synced when distributed)."""
    from metrics.evaluation import EditEvaluator
    from metrics.protocols import get_protocol

    evaluator = EditEvaluator(
        get_protocol("magicbrush"),
        EVALUATOR_METRICS,
        metric_kwargs={"KID": {"feature": TinyFeatures(), "subsets": 2}},
        backbones={"clip": str(backbones / "clip")},
    )
    with torch.no_grad():
        for n, samples in enumerate(batches):
            # skipped_ids as long as the batch: it must still not be indexed per sample
            skipped = [f"skipped/{n}/{i}" for i in range(len(samples))]
            evaluator.update(*collate_like(samples, skipped))
    results = evaluator.compute()
    return {"results": results, "counts": evaluator.num_samples()}


def run_rank(rank: int, port: int, backbones: str, out: str) -> None:
    """One DDP process: both splits, results to ``<out>/rank<r>.json`` (a traceback to
    ``rank<r>.err`` on failure)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
        )
        batch = make_batch()
        results = {}
        for split, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            index = slice(start, start + sizes[rank])
            results[split] = evaluate(Path(backbones), batch, index)
            results[split]["local_L1"] = local_l1(batch, index)
        results["evaluator"] = evaluate_magicbrush(Path(backbones), rank_share(rank))
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    except Exception:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(backbones: Path, out: Path) -> list[dict]:
    """Spawn the 2 ranks, wait (with a timeout, so a stuck collective fails the test)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    procs = [
        context.Process(target=run_rank, args=(rank, port, str(backbones), str(out)))
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = [p.read_text() for p in sorted(out.glob("rank*.err"))]
    codes = [p.exitcode for p in procs]
    assert not errors and codes == [0] * WORLD_SIZE, f"exit codes {codes}\n" + "\n".join(errors)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def backbones(small_backbones) -> Path:
    return small_backbones


@pytest.fixture(scope="module")
def ranks(backbones, tmp_path_factory) -> list[dict]:
    """The 2 ranks' results (one spawn for the module's tests)."""
    return run_ddp(backbones, tmp_path_factory.mktemp("ddp"))


def close(name: str, got: float, expected: float, scale: float) -> bool:
    """1e-5 for the per-image means; 1e-4 relative for FID and KID (float sums of features
    in another order); KID's std is ~0 on both sides (every subset is the whole set)."""
    if name.startswith("KID_std"):
        return abs(got - expected) <= 1e-4 * abs(scale) + 1e-9
    if name in ("FID", "KID"):
        return math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-9)
    return math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(backbones, ranks):
    batch = make_batch()
    single = evaluate(backbones, batch, slice(None))
    names = {
        "L1", "L1_edit", "SSIM", "LPIPS", "DINO", "CVS", "CTS", "CLIP_direction", "CLIP_image",
        "FID", "KID", "KID_std",
    }  # fmt: skip
    assert set(single) == names
    assert all(math.isfinite(v) for v in single.values()), single
    assert single["FID"] > 1e-3 and single["KID"] > 1e-6  # not a degenerate comparison

    mismatches = []
    for split in SPLITS:
        for rank, results in enumerate(ranks):
            for name in names:
                got, expected = results[split][name], single[name]
                if not close(name, got, expected, single.get("KID", 1.0)):
                    mismatches.append(
                        f"{split} rank {rank} {name}: {got!r} vs 1 process {expected!r}"
                    )
            # Each rank saw only its share: unsynced, its L1 differs; synced, it is the global one.
            assert not math.isclose(results[split]["local_L1"], single["L1"], rel_tol=1e-4)
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.slow
def test_evaluator_on_two_processes_with_disjoint_turns_equals_one_process(backbones, ranks):
    shares = [rank_share(0), rank_share(1)]
    turns = [[s["turn"] == 1 for batch in share for s in batch] for share in shares]
    finals = [[s["turn"] == s["num_turns"] for b in share for s in b] for share in shares]
    assert all(turns[0]) and not any(finals[0])  # rank 0: first turns only, no final turn
    assert not any(turns[1])  # rank 1: no first turn

    # the reference: every sample in one process, in other batches
    samples = magicbrush_samples()
    single = evaluate_magicbrush(backbones, [samples[:4], samples[4:]])
    expected, counts = single["results"], single["counts"]
    assert counts == {"all": 7, "final": 3, "turn1": 3}
    for aggregation in ("all", "final", "turn1"):
        for name in ("L1", "L1_edit", "SSIM", "CVS", "CTS", "KID"):
            assert math.isfinite(expected[f"test/{aggregation}/{name}"]), (aggregation, name)
    # the aggregations differ, so a result paired with the wrong aggregation would show
    assert abs(expected["test/final/L1"] - expected["test/turn1/L1"]) > 1e-4
    assert expected["test/L1"] == expected["test/all/L1"]  # independent data: single-turn

    mismatches = []
    for rank, result in enumerate(ranks):
        got = result["evaluator"]
        assert got["counts"] == counts, (rank, got["counts"])
        assert set(got["results"]) == set(expected)
        for key, value in expected.items():
            # KID: float32 kernel sums over the features in another order (its std, ~1e-5 on
            # both sides, is that noise: every subset is the whole set)
            rel, absolute = (1e-3, 2e-4) if "KID" in key else (1e-5, 1e-6)
            if not math.isclose(got["results"][key], value, rel_tol=rel, abs_tol=absolute):
                mismatches.append(f"rank {rank} {key}: {got['results'][key]!r} vs {value!r}")
    assert not mismatches, "\n".join(mismatches)
