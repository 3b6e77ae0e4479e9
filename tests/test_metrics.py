"""model/metrics.py against brute-force per-pixel references and hand-computed values."""
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model.metrics as metrics_module
from model.metrics import SegmentationMetrics, boundary_band, confusion_matrix

IGNORE = 255
NUM_CLASSES = 7
NAMES = ["bg", "aero", "bike", "bird", "boat", "bottle", "bus"]
TARGET_CLASSES = [0, 1, 2, 4]       # 3 appears only in predictions; 5 and 6 nowhere
PREDICTED_CLASSES = [0, 1, 2, 3, 4]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- brute-force references

def reference_band(labels: np.ndarray, width: int, distance: str = "chebyshev", void: str = "label") -> np.ndarray:
    """Per pixel: is it labelled and is another label (void: "ignored": another class) within the Chebyshev window
    (the Euclidean disc)?"""
    height, wide = labels.shape
    band = np.zeros(labels.shape, dtype=bool)
    for i in range(height):
        for j in range(wide):
            if labels[i, j] == IGNORE:
                continue
            for di in range(-width, width + 1):
                for dj in range(-width, width + 1):
                    y, x = i + di, j + dj
                    if distance == "euclidean" and di * di + dj * dj > width * width:
                        continue
                    if not (0 <= y < height and 0 <= x < wide) or (void == "ignored" and labels[y, x] == IGNORE):
                        continue
                    if labels[y, x] != labels[i, j]:
                        band[i, j] = True
    return band


def reference_confusion(pairs, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, target in pairs:
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
            if t != IGNORE:
                matrix[t, p] += 1
    return matrix


def reference_metrics(pairs, width: int) -> dict:
    """pairs: (pred, target) 2-D numpy maps, each one image at its own size."""
    matrix = reference_confusion(pairs, NUM_CLASSES).astype(np.float64)
    hits, rows, cols = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    unions = rows + cols - hits
    ious = [hits[c] / unions[c] if unions[c] > 0 else None for c in range(NUM_CLASSES)]
    accuracies = [hits[c] / rows[c] if rows[c] > 0 else None for c in range(NUM_CLASSES)]
    band_hits = band_total = inner_hits = inner_total = 0
    for pred, target in pairs:
        band = reference_band(target, width)
        for i in range(target.shape[0]):
            for j in range(target.shape[1]):
                if target[i, j] == IGNORE:
                    continue
                hit = int(pred[i, j] == target[i, j])
                if band[i, j]:
                    band_hits, band_total = band_hits + hit, band_total + 1
                else:
                    inner_hits, inner_total = inner_hits + hit, inner_total + 1
    present = unions > 0
    return {
        "miou": float(np.mean((hits / np.where(present, unions, 1))[present])),
        "pixel_accuracy": float(hits.sum() / matrix.sum()),
        "mean_accuracy": float(np.mean([a for a in accuracies if a is not None])),
        "fw_iou": float(sum(rows[c] / matrix.sum() * ious[c]
                            for c in range(NUM_CLASSES) if rows[c] > 0)),
        "per_class_iou": dict(zip(NAMES, ious)),
        "per_class_accuracy": dict(zip(NAMES, accuracies)),
        "per_class_pixel_share": {name: rows[c] / matrix.sum() for c, name in enumerate(NAMES)},
        "confusion_matrix": {"classes": NAMES, "counts": matrix.astype(np.int64).tolist()},
        "boundary_accuracy": band_hits / band_total,
        "interior_accuracy": inner_hits / inner_total,
        "boundary_band": {"width": width, "distance": "chebyshev", "void": "label"},
    }


def random_pair(rng: np.random.Generator, height: int, width: int, block: int = 5,
                specks: float = 0.05):
    """Blocky label map (so bands and interiors both exist) with void outlines and specks."""
    coarse = rng.choice(TARGET_CLASSES, size=(height // block + 1, width // block + 1))
    target = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]
    edges = np.zeros_like(target, dtype=bool)
    edges[:, 1:] |= target[:, 1:] != target[:, :-1]
    target = target.copy()
    target[edges & (rng.random(target.shape) < 0.5)] = IGNORE
    target[rng.random(target.shape) < specks] = IGNORE
    pred = np.where(rng.random(target.shape) < 0.7, target,
                    rng.choice(PREDICTED_CLASSES, size=target.shape))
    pred = np.where(pred == IGNORE, rng.choice(PREDICTED_CLASSES, size=target.shape), pred)
    return pred.astype(np.int64), target.astype(np.int64)


def random_batches(seed: int):
    """Batches of different sizes: list of (pred N×H×W, target N×H×W) numpy arrays."""
    rng = np.random.default_rng(seed)
    batches = []
    # The large image has big blocks and few void specks, so a width-7 interior exists.
    for count, height, width, block, specks in [(2, 13, 17, 5, 0.05), (1, 40, 37, 18, 0.002),
                                                 (3, 8, 20, 4, 0.05)]:
        pairs = [random_pair(rng, height, width, block, specks) for _ in range(count)]
        batches.append((np.stack([p for p, _ in pairs]), np.stack([t for _, t in pairs])))
    return batches


def images_of(batches):
    return [(pred[n], target[n]) for pred, target in batches for n in range(len(pred))]


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if key in ("confusion_matrix", "boundary_band"):
            assert actual[key] == value
        elif isinstance(value, dict):
            assert list(actual[key]) == list(value), key
            for name, item in value.items():
                got = actual[key][name]
                assert (got is None) == (item is None), (key, name, got, item)
                if item is not None:
                    assert type(got) is float and got == pytest.approx(item, rel=1e-12, abs=0)
        else:
            assert type(actual[key]) is float, key
            assert actual[key] == pytest.approx(value, rel=1e-12, abs=0), key
            assert 0.0 <= actual[key] <= 1.0


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [2, 7])
def test_metrics_match_brute_force_over_batches_of_different_sizes(device, width):
    batches = random_batches(seed=width)
    metrics = SegmentationMetrics(NUM_CLASSES, NAMES, boundary_width=width, device=device)
    for pred, target in batches:
        metrics.update(torch.from_numpy(pred).to(device), torch.from_numpy(target).to(device))
    assert metrics._counts.device.type == device
    result = metrics.compute()
    expected = reference_metrics(images_of(batches), width)
    assert_metrics_equal(result, expected)
    assert result["per_class_iou"]["bird"] == 0.0          # predicted but never true
    assert result["per_class_accuracy"]["bird"] is None
    assert result["per_class_iou"]["bus"] is None          # absent from both
    assert json.loads(json.dumps(result)) == result


def test_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, IGNORE, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 1, 0]])
    # Confusion (rows true): bg [1, 1, 1], cat [1, 3, 0], dog [0, 0, 0].
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 1], [1, 3, 0], [0, 0, 0]]
    metrics = SegmentationMetrics(3, ["bg", "cat", "dog"], boundary_width=1)
    metrics.update(pred, target)
    result = metrics.compute()
    assert result["per_class_iou"] == {"bg": 1 / 4, "cat": 3 / 5, "dog": 0.0}
    assert result["miou"] == pytest.approx((1 / 4 + 3 / 5 + 0) / 3, abs=1e-15)
    assert result["pixel_accuracy"] == pytest.approx(4 / 7, abs=1e-15)
    assert result["per_class_accuracy"] == {"bg": 1 / 3, "cat": 3 / 4, "dog": None}
    assert result["mean_accuracy"] == pytest.approx(13 / 24, abs=1e-15)
    assert result["fw_iou"] == pytest.approx(9 / 20, abs=1e-15)
    # Band (width 1, void counts as a label): all labelled pixels but the right column.
    assert boundary_band(target, width=1).tolist() == [[True, True, True, False],
                                                       [True, False, True, False]]
    assert result["boundary_accuracy"] == pytest.approx(3 / 5, abs=1e-15)
    assert result["interior_accuracy"] == pytest.approx(1 / 2, abs=1e-15)


def test_boundary_band_hand_examples():
    edge = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert boundary_band(edge, width=1).tolist() == [[False] * 3 + [True] * 2 + [False] * 3]
    assert boundary_band(edge, width=2).tolist() == [[False] * 2 + [True] * 4 + [False] * 2]
    void_outline = torch.tensor([[3, 3, IGNORE, 5, 5]])
    assert boundary_band(void_outline, width=1).tolist() == [[False, True, False, True, False]]
    # Chebyshev distance: a diagonal neighbour at distance 2 is inside a width-2 band.
    corner = torch.zeros(5, 5, dtype=torch.long)
    corner[4, 4] = 1
    assert boundary_band(corner, width=2)[2, 2] and not boundary_band(corner, width=1)[2, 2]
    assert not boundary_band(torch.full((4, 6), 2), width=7).any()    # image border is no edge


@pytest.mark.parametrize("width", [1, 2, 3, 7])
def test_boundary_band_matches_brute_force(width):
    rng = np.random.default_rng(100 + width)
    for height, wide in [(6, 9), (11, 5), (1, 7), (15, 16)]:
        batch = np.stack([random_pair(rng, height, wide)[1] for _ in range(2)])
        band = boundary_band(torch.from_numpy(batch), width=width)
        assert band.dtype == torch.bool and band.shape == batch.shape
        expected = np.stack([reference_band(labels, width) for labels in batch])
        np.testing.assert_array_equal(band.numpy(), expected)
        np.testing.assert_array_equal(boundary_band(torch.from_numpy(batch[0]), width).numpy(),
                                      expected[0])


@pytest.mark.parametrize("distance,void", [("chebyshev", "label"), ("euclidean", "label"), ("chebyshev", "ignored"),
                                           ("euclidean", "ignored")])
@pytest.mark.parametrize("width", [1, 3, 7])
def test_every_boundary_band_definition_matches_brute_force(width, distance, void):
    rng = np.random.default_rng(200 + width)
    for height, wide in [(6, 9), (17, 19), (1, 7)]:
        batch = np.stack([random_pair(rng, height, wide)[1] for _ in range(2)])
        band = boundary_band(torch.from_numpy(batch), width, IGNORE, distance, void)
        expected = np.stack([reference_band(labels, width, distance, void) for labels in batch])
        np.testing.assert_array_equal(band.numpy(), expected)


def test_the_band_definitions_differ_where_they_must():
    """A lone class pixel at (0, 0) of a 4×4 map: the square reaches the corner (2, 2), the disc of radius 2 does
    not; void next to a pixel makes a boundary only when void counts as a label."""
    corner = torch.zeros(4, 4, dtype=torch.long)
    corner[0, 0] = 1
    square, disc = boundary_band(corner, 2, distance="chebyshev"), boundary_band(corner, 2, distance="euclidean")
    assert square[2, 2] and not disc[2, 2]
    assert disc[2, 0] and disc[1, 1]
    outlined = torch.tensor([[0, 255, 0, 0, 0]])
    assert boundary_band(outlined, 1).tolist() == [[True, False, True, False, False]]
    assert not boundary_band(outlined, 1, void="ignored").any()


def test_the_metrics_record_their_band_definition():
    metrics = SegmentationMetrics(3, boundary_width=5, boundary_distance="euclidean", boundary_void="ignored")
    metrics.update(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long))
    assert metrics.compute()["boundary_band"] == {"width": 5, "distance": "euclidean", "void": "ignored"}
    with pytest.raises(ValueError, match="manhattan"):
        SegmentationMetrics(3, boundary_distance="manhattan")


def test_confusion_matrix_matches_brute_force_any_shape_and_dtype():
    rng = np.random.default_rng(7)
    target = rng.choice([0, 1, 2, 4, IGNORE], size=(2, 3, 5, 4))
    pred = rng.choice(PREDICTED_CLASSES, size=target.shape)
    expected = reference_confusion([(pred, target)], NUM_CLASSES)
    for dtype in (torch.int64, torch.uint8):
        matrix = confusion_matrix(torch.from_numpy(pred).to(dtype),
                                  torch.from_numpy(target).to(dtype), NUM_CLASSES)
        assert matrix.dtype == torch.int64
        np.testing.assert_array_equal(matrix.numpy(), expected)


def test_errors_are_clear_and_leave_counts_untouched():
    metrics = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="no labelled pixels"):
        metrics.compute()
    metrics.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), IGNORE))
    with pytest.raises(ValueError, match="no labelled pixels"):
        metrics.compute()
    good = torch.tensor([[0, 1], [2, 1]])
    metrics.update(good, good)
    before = metrics._counts.clone()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or equal ignore_index 255, found \[3\]"):
        metrics.update(good, torch.tensor([[0, 3], [2, 1]]))
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\), found \[-1\]"):
        metrics.update(torch.tensor([[0, -1], [2, 1]]), good)
    with pytest.raises(ValueError, match="shape"):
        metrics.update(good, good[:1])
    with pytest.raises(ValueError, match="H×W"):
        metrics.update(good[None, None], good[None, None])
    with pytest.raises(ValueError, match="dtype"):
        metrics.update(good.float(), good)
    assert torch.equal(metrics._counts, before)
    assert metrics.compute()["pixel_accuracy"] == 1.0
    metrics.reset()
    with pytest.raises(ValueError, match="no labelled pixels"):
        metrics.compute()
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        SegmentationMetrics(3, ["a", "b"])
    with pytest.raises(ValueError, match="ignore_index 1 is a valid class index"):
        SegmentationMetrics(3, ignore_index=1)
    with pytest.raises(ValueError, match="ignore_index 0 is a valid class index"):
        confusion_matrix(good, good, 3, ignore_index=0)
    with pytest.raises(ValueError, match="boundary_width"):
        SegmentationMetrics(3, boundary_width=0)


def test_all_reduce_without_process_group_is_a_no_op():
    metrics = SegmentationMetrics(3)
    good = torch.tensor([[0, 1], [2, 1]])
    metrics.update(good, good)
    before = metrics._counts.clone()
    metrics.all_reduce()
    assert torch.equal(metrics._counts, before)
    metrics.update(good, good)   # still allowed: nothing was reduced


def _distributed_worker(rank: int, init_file: str, shards, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for name, per_rank in shards.items():
            metrics = SegmentationMetrics(NUM_CLASSES, NAMES, boundary_width=3)
            for pred, target in per_rank[rank]:
                metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
            metrics.all_reduce()
            with pytest.raises(RuntimeError, match="called twice"):
                metrics.all_reduce()
            with pytest.raises(RuntimeError, match="reset"):
                metrics.update(*(torch.from_numpy(a) for a in per_rank[0][0]))
            results[name] = metrics.compute()
        with open(f"{result_dir}/rank{rank}.json", "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_equals_single_process(tmp_path):
    batches = random_batches(seed=11)
    shards = {"uneven": [batches[:2], batches[2:]],     # rank 0 two batches, rank 1 one
              "empty_rank": [batches, []]}              # rank 1 sees no data at all
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), shards, str(tmp_path)),
             nprocs=2, join=True)
    single = SegmentationMetrics(NUM_CLASSES, NAMES, boundary_width=3)
    for pred, target in batches:
        single.update(torch.from_numpy(pred), torch.from_numpy(target))
    expected = single.compute()
    assert_metrics_equal(expected, reference_metrics(images_of(batches), width=3))
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in shards:
            assert results[name] == expected, (rank, name)


def test_values_not_looked_at_in_update_are_counted_and_refused_by_compute(monkeypatch):
    """On a GPU, update() does not look at the values (the host would wait for every image): a prediction or label
    that is not a class (or ignore_index) is counted on the device, and compute() refuses the counts."""
    monkeypatch.setattr(metrics_module, "_check_values", lambda *_args: None)  # as on a GPU
    metrics = SegmentationMetrics(3)
    metrics.update(torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0, 1], [2, IGNORE]]))
    assert metrics.compute()["pixel_accuracy"] == 1.0
    metrics.update(torch.tensor([[0, 7], [2, 1]]), torch.tensor([[0, 1], [5, IGNORE]]))
    with pytest.raises(ValueError, match=r"^2 pixel\(s\) given to update\(\) had a prediction outside \[0, 3\)"):
        metrics.compute()
