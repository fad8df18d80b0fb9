import os

import numpy as np
import pytest

from onlinemix.data import (
    ImageFolderSplits,
    few_shot_indices,
    long_tail_counts,
    long_tail_indices,
    shot_groups,
    write_toy_dataset,
)


def test_few_shot_counts_and_seed():
    labels = np.repeat(np.arange(5), [10, 3, 8, 8, 20])
    picked = few_shot_indices(labels, 5, seed=1)
    assert np.bincount(labels[picked]).tolist() == [5, 3, 5, 5, 5]
    assert np.array_equal(picked, few_shot_indices(labels, 5, seed=1))
    assert not np.array_equal(picked, few_shot_indices(labels, 5, seed=2))
    with pytest.raises(ValueError, match="--shots"):
        few_shot_indices(labels, 0)


def test_long_tail_follows_the_formula():
    counts = long_tail_counts(30, 10, 10)
    expected = [max(int(30 * (1 / 10) ** (k / 9)), 1) for k in range(10)]
    assert counts.tolist() == expected and counts[0] == 30 and counts[-1] == 3
    assert long_tail_counts(30, 10, 100)[-1] == 1  # never below one image
    labels = np.repeat(np.arange(10), 30)
    picked = long_tail_indices(labels, 10, seed=0)
    assert np.bincount(labels[picked]).tolist() == expected
    with pytest.raises(ValueError, match="imbalance"):
        long_tail_counts(30, 10, 0.5)


def test_shot_groups_use_cub_thresholds():
    groups = shot_groups([30, 21, 20, 5, 4, 1])
    assert groups["many"].tolist() == [0, 1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [4, 5]


def test_image_folder_splits_and_carved_validation(tmp_path):
    write_toy_dataset(str(tmp_path), classes=3, train_per_class=10, val_per_class=2, test_per_class=3)
    splits = ImageFolderSplits(str(tmp_path))
    assert splits.class_names == ["class_0", "class_1", "class_2"]
    assert len(splits.train.paths) == 30 and len(splits.val.paths) == 6 and len(splits.tests["test"].paths) == 9
    for name in os.listdir(tmp_path / "val"):
        os.rename(tmp_path / "val" / name, tmp_path / f"moved_{name}")
    os.rmdir(tmp_path / "val")
    carved = ImageFolderSplits(str(tmp_path), val_fraction=0.2, seed=0)
    assert len(carved.val.paths) == 6 and len(carved.train.paths) == 24
    assert not set(carved.val.paths) & set(carved.train.paths)
    assert np.bincount(carved.val.labels).tolist() == [2, 2, 2]


def write_groups(folder, group_of):
    rows = ["file,group"]
    for class_dir in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, class_dir)):
            files = sorted(os.listdir(os.path.join(folder, class_dir)))
            rows += [f"{class_dir}/{f},{group_of(class_dir, f)}" for f in files]
    with open(os.path.join(folder, "groups.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def test_extra_test_splits_and_groups_survive_subsets(tmp_path):
    write_toy_dataset(str(tmp_path), classes=2, train_per_class=4, val_per_class=1, test_per_class=2)
    os.rename(tmp_path / "test", tmp_path / "test_shifted")
    write_toy_dataset(str(tmp_path / "again"), classes=2, train_per_class=1, val_per_class=1, test_per_class=3)
    os.rename(tmp_path / "again" / "test", tmp_path / "test")
    write_groups(tmp_path / "train", lambda c, f: f"{c}-{'odd' if int(f[:4]) % 2 else 'even'}")
    splits = ImageFolderSplits(str(tmp_path))
    assert list(splits.tests) == ["test", "test_shifted"]
    assert len(splits.tests["test"]) == 6 and len(splits.tests["test_shifted"]) == 4
    assert splits.tests["test"].groups is None
    assert splits.train.groups[:4] == ["class_0-even", "class_0-odd", "class_0-even", "class_0-odd"]
    subset = splits.train.subset([1, 4])
    assert subset.groups == ["class_0-odd", "class_1-even"] and subset.labels == [0, 1]


def test_groups_file_must_cover_every_image(tmp_path):
    write_toy_dataset(str(tmp_path), classes=2, train_per_class=3, val_per_class=1, test_per_class=1)
    write_groups(tmp_path / "val", lambda c, f: "g")
    (tmp_path / "val" / "groups.csv").write_text("file,group\nclass_0/0000.png,g\n")
    with pytest.raises(ValueError, match="no group for 1 image.*class_1/0000.png"):
        ImageFolderSplits(str(tmp_path))
    (tmp_path / "val" / "groups.csv").write_text("path,kind\nclass_0/0000.png,g\n")
    with pytest.raises(ValueError, match="file,group"):
        ImageFolderSplits(str(tmp_path))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        ImageFolderSplits(str(tmp_path))
    os.makedirs(tmp_path / "train" / "a")
    os.makedirs(tmp_path / "train" / "b")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSplits(str(tmp_path))
    os.rmdir(tmp_path / "train" / "b")
    with pytest.raises(ValueError, match=">= 2"):
        ImageFolderSplits(str(tmp_path))


def test_toy_dataset_is_deterministic(tmp_path):
    write_toy_dataset(str(tmp_path / "a"), classes=2, train_per_class=2, val_per_class=1, test_per_class=1)
    write_toy_dataset(str(tmp_path / "b"), classes=2, train_per_class=2, val_per_class=1, test_per_class=1)
    a = (tmp_path / "a" / "train" / "class_1" / "0001.png").read_bytes()
    assert a == (tmp_path / "b" / "train" / "class_1" / "0001.png").read_bytes()


def test_dataset_dict_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    from onlinemix.data import DatasetDictSplits

    with pytest.raises(FileNotFoundError, match="No saved Hugging Face"):
        DatasetDictSplits(str(tmp_path / "missing"))
    plain = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    datasets.DatasetDict({"train": plain}).save_to_disk(tmp_path / "no-image")
    with pytest.raises(ValueError, match="Image column and a ClassLabel column"):
        DatasetDictSplits(str(tmp_path / "no-image"))
    plain.save_to_disk(tmp_path / "not-a-dict")
    with pytest.raises(ValueError, match="DatasetDict with a 'train' split"):
        DatasetDictSplits(str(tmp_path / "not-a-dict"))


def test_class_names_file_replaces_folder_names(tmp_path):
    import argparse

    from onlinemix.data import add_data_arguments, load_splits

    write_toy_dataset(str(tmp_path / "toy"), classes=2, train_per_class=3, val_per_class=1, test_per_class=1)
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    names = tmp_path / "names.txt"
    names.write_text("Black footed Albatross\n\nLaysan Albatross\n")
    args = parser.parse_args(["--data-dir", str(tmp_path / "toy"), "--class-names", str(names)])
    args.seed = 0
    assert load_splits(args).class_names == ["Black footed Albatross", "Laysan Albatross"]
    names.write_text("only one\n")
    with pytest.raises(ValueError, match="lists 1 names but the data set has 2 classes"):
        load_splits(args)
    args.class_names = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="one class name per line"):
        load_splits(args)
