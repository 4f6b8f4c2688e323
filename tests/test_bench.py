"""The time-to-accuracy bench's split of the val photos: two disjoint, class-balanced halves that take turns."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("time_to_accuracy", REPO / "bench" / "time_to_accuracy.py")
time_to_accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(time_to_accuracy)


def names(folder):
    return {p.name for p in folder.rglob("*.jpg")}


def test_val_halves_are_disjoint_balanced_and_swap_between_folds(tmp_path):
    data = tmp_path / "photos"
    for split, count in (("train", 3), ("validation", 6)):
        for cls in ("cats", "dogs"):
            (data / split / cls).mkdir(parents=True)
            for i in range(count):
                (data / split / cls / f"{cls}.{i}.jpg").write_bytes(b"")
    (data / "validation" / "cats" / "notes.txt").write_text("not a photo")

    folds = time_to_accuracy.split_folder(data, tmp_path / "work")
    pick_a, pick_b = folds["A"], folds["B"]

    val_a, test_a = names(pick_a / "val"), names(pick_a / "test")
    assert val_a.isdisjoint(test_a)
    assert val_a | test_a == names(data / "validation")
    for cls in ("cats", "dogs"):
        assert len(list((pick_a / "val" / cls).iterdir())) == len(list((pick_a / "test" / cls).iterdir())) == 3
    # The second fold picks on the first fold's held-out half and is scored on its picking half.
    assert names(pick_b / "val") == test_a and names(pick_b / "test") == val_a
    assert names(pick_a / "train") == names(pick_b / "train") == names(data / "train")
    # A second call (a later invocation in the same --work) reuses the folders rather than failing on them.
    assert time_to_accuracy.split_folder(data, tmp_path / "work") == folds
    assert [time_to_accuracy.picking_half(seed) for seed in range(4)] == ["A", "B", "A", "B"]
