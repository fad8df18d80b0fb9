import os

import numpy as np
import pytest

import random
from collections import defaultdict

from onlinemix.data import (
    FileSplit,
    ImageFolderSplits,
    few_shot_indices,
    long_tail_counts,
    long_tail_indices,
    select_training_images,
)
from onlinemix.data.toy import write_toy_dataset
from onlinemix.evaluation import shot_groups


def test_few_shot_counts_and_seed():
    labels = np.repeat(np.arange(5), [10, 3, 8, 8, 20])
    picked = few_shot_indices(labels, 5, seed=1)
    assert np.bincount(labels[picked]).tolist() == [5, 3, 5, 5, 5]
    assert np.array_equal(picked, few_shot_indices(labels, 5, seed=1))
    assert not np.array_equal(picked, few_shot_indices(labels, 5, seed=2))
    with pytest.raises(ValueError, match="--shots"):
        few_shot_indices(labels, 0)


def official_long_tail_sizes(labels, imbalance_factor):
    """The official Diff-Mix construction, restated: mean class size, classes by size (largest first,
    a stable sort over classes in order of first appearance), exponent k / (N - 2), random.sample."""
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    mean = len(labels) / len(by_class)
    kept = {}
    for k, (label, members) in enumerate(sorted(by_class.items(), key=lambda item: len(item[1]), reverse=True)):
        kept[label] = len(random.sample(members, max(int(mean * (1 / imbalance_factor) ** (k / (len(by_class) - 2.0))), 1)))
    return [kept[c] for c in sorted(kept)]


CUB_TRAIN_SIZES = [30] * 194 + [29] * 6  # CUB-200-2011's 5 994 training images


@pytest.mark.parametrize("rho, cub, flowers", [(100, 1242, 847), (50, 1427, 976), (10, 2238, 1532)])
def test_long_tail_sizes_follow_the_official_construction(rho, cub, flowers):
    assert long_tail_counts(CUB_TRAIN_SIZES, rho).sum() == cub  # Table 10: 1242 / 1798 / 2238
    assert long_tail_counts([40] * 92 + [39] * 10, rho).sum() == flowers  # 4 070 images; Table 10: 847 / 1238 / 1532
    rng = np.random.default_rng(rho)
    for _ in range(5):
        labels = np.repeat(np.arange(12), rng.integers(20, 60, 12))
        expected = official_long_tail_sizes(labels.tolist(), rho)
        assert long_tail_counts(np.bincount(labels), rho).tolist() == expected
        picked = long_tail_indices(labels, rho, seed=3)
        assert np.bincount(labels[picked], minlength=12).tolist() == expected


def test_long_tail_counts_order_by_size_and_never_exceed_a_class():
    # mean 31.25; by size: class 1, class 3 (a tie: by index), class 2, class 0; exponent k / (4 - 2)
    assert long_tail_counts([5, 50, 20, 50], 10).tolist() == [1, 31, 3, 9]
    assert long_tail_counts([3, 40, 40], 2).tolist() == [3, 27, 13], "never more images than a class has"
    assert long_tail_counts([30] * 10, 100)[-1] == 1, "never below one image"
    with pytest.raises(ValueError, match="imbalance"):
        long_tail_counts([30, 30], 0.5)


def test_validation_comes_from_the_images_a_subset_leaves_out():
    labels = np.repeat(np.arange(200), CUB_TRAIN_SIZES)
    train = FileSplit([f"/data/train/c{y}/{i:05d}.jpg" for i, y in enumerate(labels)], labels)
    subset, val = select_training_images(train, None, imbalance_factor=100, val_fraction=0.1, seed=0)
    assert len(subset) == 1242, "the long-tail subset keeps its sizes"
    assert np.bincount(subset.labels, minlength=200).tolist() == long_tail_counts(CUB_TRAIN_SIZES, 100).tolist()
    assert not set(subset.paths) & set(val.paths)
    per_class = np.bincount(val.labels, minlength=200)
    assert per_class.max() == 3 and per_class[-1] == 3, "tail classes lend validation images they do not train on"
    few, val5 = select_training_images(train, None, shots=5, val_fraction=0.1, seed=0)
    assert np.bincount(few.labels).tolist() == [5] * 200 and np.bincount(val5.labels).tolist() == [3] * 200
    plain, carved = select_training_images(train, None, val_fraction=0.1, seed=0)
    assert len(plain) + len(carved) == len(train) and np.bincount(carved.labels).tolist() == [3] * 200
    own_val = train.subset([0, 1])
    assert select_training_images(train, own_val, shots=5, seed=0)[1] is own_val
    with pytest.raises(ValueError, match="pass one of them"):
        select_training_images(train, None, shots=5, imbalance_factor=10)


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
    carved = ImageFolderSplits(str(tmp_path))
    assert carved.val is None
    carved.train, carved.val = select_training_images(carved.train, carved.val, val_fraction=0.2, seed=0)
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


def test_class_folders_without_training_images_or_outside_train_are_refused(tmp_path):
    write_toy_dataset(str(tmp_path), classes=3, train_per_class=2, val_per_class=1, test_per_class=1)
    os.makedirs(tmp_path / "train" / "class_3")
    with pytest.raises(ValueError, match=r"1 class folders .* hold no images.*'class_3'"):
        ImageFolderSplits(str(tmp_path))
    os.rename(tmp_path / "train" / "class_3", tmp_path / "val" / "class_3")
    with pytest.raises(ValueError, match=r"val' has class folders that train/ lacks: \['class_3'\]"):
        ImageFolderSplits(str(tmp_path))


def test_damaged_images_are_all_named_before_training(tmp_path):
    from PIL import Image

    from onlinemix.data import load_splits

    write_toy_dataset(str(tmp_path), classes=2, train_per_class=3, val_per_class=1, test_per_class=1)
    good = tmp_path / "train" / "class_0" / "0000.png"
    data = good.read_bytes()
    Image.open(good).convert("RGB").resize((64, 64)).save(tmp_path / "train" / "class_1" / "photo.jpg", quality=90)
    jpeg = (tmp_path / "train" / "class_1" / "photo.jpg").read_bytes()
    assert len(load_splits(str(tmp_path), val_fraction=0.0).train) == 7  # the JPEG whole: no complaint ...
    (tmp_path / "train" / "class_1" / "photo.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (tmp_path / "train" / "class_0" / "0001.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "test" / "class_1" / "0000.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot be read") as refused:
        load_splits(str(tmp_path), val_fraction=0.0)
    message = str(refused.value)
    assert "class_0/0001.png" in message and "photo.jpg" in message, "... cut short, it is named, as the PNG"
    assert "2 of the 7 images" in message and "(train)" in message
    os.remove(tmp_path / "train" / "class_0" / "0001.png")
    os.remove(tmp_path / "train" / "class_1" / "photo.jpg")
    with pytest.raises(ValueError, match=r"1 of the 2 images in .*\(test\)"):
        load_splits(str(tmp_path), val_fraction=0.0)


def test_a_few_shot_subset_that_keeps_every_image_is_refused(tmp_path):
    from onlinemix.data import load_splits

    write_toy_dataset(str(tmp_path), classes=2, train_per_class=4, val_per_class=1, test_per_class=1)
    assert len(load_splits(str(tmp_path), shots=3).train) == 6
    with pytest.raises(ValueError, match="--shots 4 keeps every training image"):
        load_splits(str(tmp_path), shots=4)


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

    from onlinemix.data import load_splits
    from onlinemix.options import add_data_arguments, data_options

    write_toy_dataset(str(tmp_path / "toy"), classes=2, train_per_class=3, val_per_class=1, test_per_class=1)
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    names = tmp_path / "names.txt"
    names.write_text("Black footed Albatross\n\nLaysan Albatross\n")
    args = parser.parse_args(["--data-dir", str(tmp_path / "toy"), "--class-names", str(names)])
    assert load_splits(args.data_dir, **data_options(args)).class_names == ["Black footed Albatross", "Laysan Albatross"]
    names.write_text("only one\n")
    with pytest.raises(ValueError, match="lists 1 names but the data set has 2 classes"):
        load_splits(args.data_dir, **data_options(args))
    args.class_names = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="one class name per line"):
        load_splits(args.data_dir, **data_options(args))


def test_subsets_and_carves_follow_the_data_seed_not_the_training_seed(tmp_path):
    import argparse

    from onlinemix.data import load_splits
    from onlinemix.options import add_data_arguments, data_options

    write_toy_dataset(str(tmp_path / "toy"), classes=3, train_per_class=12, val_per_class=1, test_per_class=1)
    os.rename(tmp_path / "toy" / "val", tmp_path / "val-moved")
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)

    def training_images(*flags, seed):
        args = parser.parse_args(["--data-dir", str(tmp_path / "toy"), "--shots", "4", *flags])
        args.seed = seed  # the training seed, e.g. train.py --seed
        splits = load_splits(args.data_dir, **data_options(args))
        return sorted(splits.train.paths), sorted(splits.val.paths), splits.train.fingerprint()

    first, second = training_images(seed=1), training_images(seed=2)
    assert first == second, "the generator (seed 1) and the classifier (seed 2) see the same images"
    other = training_images("--data-seed", "5", seed=1)
    assert other[0] != first[0] and other[2] != first[2]
    assert first[2]["count"] == 12 and len(first[1]) == 3 * 1
    with pytest.raises(ValueError, match="--data-seed must be >= 0"):
        training_images("--data-seed", "-1", seed=1)


def test_fingerprint_names_images_not_their_order_or_location(tmp_path):
    a = FileSplit(["/x/train/c0/1.png", "/x/train/c1/2.png"], [0, 1])
    moved = FileSplit(["/elsewhere/train/c1/2.png", "/elsewhere/train/c0/1.png"], [1, 0])
    assert a.fingerprint() == moved.fingerprint() and a.fingerprint()["count"] == 2
    assert FileSplit(["/x/train/c0/1.png"], [0]).fingerprint() != a.fingerprint()
    assert FileSplit(["/x/train/c0/1.png", "/x/train/c1/2.png"], [0, 0]).fingerprint() != a.fingerprint()
