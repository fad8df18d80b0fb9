import csv
import json
import os
import sys

import pytest
import torch
from accelerate import PartialState

import train
from onlinemix import checkpoint as checkpoint_module
from onlinemix import train_options
from onlinemix.augmentation import AUGMENTATIONS
from onlinemix.checkpoint import load_checkpoint
from onlinemix.data import loaders as data_loaders
from onlinemix.data import SplitImages, load_splits
from onlinemix.data.toy import write_toy_dataset
from onlinemix.options import data_options, generator_factory
from tests.test_sources import write_offline_output

CLASSES = [f"class_{c}" for c in range(3)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(str(root), classes=3, train_per_class=12, val_per_class=4, test_per_class=4)
    return str(root)


def run(data_dir, out, *extra):
    argv = ["--data-dir", data_dir, "--output", str(out), "--name", "run", "--model", "resnet18", "--img-size", "32",
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--lr", "0.05",
            "--log-interval", "1", *extra]
    return train.main(argv)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("aug", ["none", "cutmix", "mixup"])
def test_one_epoch_without_a_generator(data_dir, tmp_path, aug):
    result = run(data_dir, tmp_path, "--aug", aug)
    run_dir = tmp_path / "run"
    for name in ("args.yaml", "last.pth", "best.pth", "metrics.jsonl", "metrics.csv", "steps.csv"):
        assert (run_dir / name).exists(), name
    metrics = lines(run_dir / "metrics.jsonl")[-1]
    assert 0 <= metrics["val"]["top1"] <= 1 and 0 <= metrics["test"]["top5"] <= 1
    assert len(metrics["val"]["per_class"]) == 3
    assert result["augmentation"]["replaced"] == 0
    state = torch.load(run_dir / "last.pth", weights_only=False)
    assert state["epoch"] == 0 and set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "args"}


def test_replay_run_swaps_in_offline_samples(data_dir, tmp_path):
    rows = [(CLASSES[i % 3], CLASSES[(i + 1) % 3], i + 1, 0.7) for i in range(6)]
    write_offline_output(tmp_path / "offline", rows, size=(40, 40))
    result = run(data_dir, tmp_path, "--aug", "replay", "--replay-dir", str(tmp_path / "offline"), "--p", "0.5")
    assert result["augmentation"]["replaced"] > 0
    assert (tmp_path / "run" / "synthetic-epoch001.png").exists()
    calls = result["fidelity"]["all"]
    assert calls["count"] == result["augmentation"]["replaced"], "every synthetic sample trained on is counted"
    assert calls["target"] + calls["source"] + calls["other"] == pytest.approx(1.0)
    assert set(result["fidelity"]) == {"s=0.7", "all"}, "the offline samples' one strength"
    assert 0 < calls["first_read"]["count"] <= min(6, calls["count"]), "the 6 samples' first reads, apart"
    with open(tmp_path / "run" / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["synthetic_called_target"]) == pytest.approx(calls["target"])
    assert float(row["synthetic_first_read_called_target"]) == pytest.approx(calls["first_read"]["target"])


@pytest.mark.slow
def test_live_generator_run_on_cpu(data_dir, tmp_path):
    result = run(data_dir, tmp_path, "--aug", "realmix", "--p", "0.5", "--gen-device", "cpu", "--gen-model", "tiny",
                 "--gen-steps", "4", "--gen-resolution", "32", "--gen-batch-size", "4", "--gen-dtype", "float32",
                 "--ring-slots", "16", "--epochs", "2")
    assert result["augmentation"]["replaced"] > 0
    assert result["ring"]["written"] > 0 and result["generator"]["written"] > 0
    assert result["generator"]["restarts"] == 0


def test_a_budget_caps_the_generator_and_each_epoch_says_its_supply(data_dir, tmp_path):
    result = run(data_dir, tmp_path, "--aug", "realmix", "--p", "0.5", "--gen-device", "cpu", "--gen-model", "tiny",
                 "--gen-steps", "4", "--gen-resolution", "32", "--gen-batch-size", "4", "--gen-dtype", "float32",
                 "--ring-slots", "16", "--epochs", "2", "--gen-budget", "6", "--max-reuse", "2")
    # The budget in whole batches of 4: 4 by the end of epoch 1, 6 by the end of epoch 2.
    assert result["ring"]["written"] == 6 and result["ring"]["fresh_limit"] == 6
    supply = result["supply"]
    assert supply["written"] <= 6 and supply["got"] <= supply["asked"] and supply["reused_reads"] >= 0
    assert supply["fresh_reads"] + supply["reused_reads"] == supply["got"] <= 12, "6 samples, 2 reads each"
    history = lines(tmp_path / "run" / "metrics.jsonl")
    assert sum(epoch["supply"]["got"] for epoch in history) == result["augmentation"]["replaced"]
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["supply_got"]) for row in rows] == [epoch["supply"]["got"] for epoch in history]


def test_long_tail_run_reports_shot_groups(data_dir, tmp_path):
    result = run(data_dir, tmp_path, "--aug", "none", "--imbalance-factor", "4")
    assert {"many", "medium", "few"} & set(result["val"])


def test_groups_and_extra_test_splits_are_reported(data_dir, tmp_path):
    import shutil

    from tests.test_data import write_groups

    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    shutil.copytree(root / "test", root / "test_shifted")
    write_groups(root / "test_shifted", lambda c, f: f"{c}/{'a' if int(f[:4]) < 2 else 'b'}")
    result = run(str(root), tmp_path, "--aug", "none")
    shifted = result["test_shifted"]
    assert sorted(shifted["groups"]) == [f"{c}/{g}" for c in CLASSES for g in "ab"]
    assert shifted["worst_group"] == min(shifted["groups"].values())
    # Two images per group: each group's accuracy is a multiple of 1/2, and they average to top-1.
    assert all(v in (0.0, 0.5, 1.0) for v in shifted["groups"].values())
    assert sum(shifted["groups"].values()) / 6 == pytest.approx(shifted["top1"])
    assert "groups" not in result["test"]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "test_shifted_top1" in header and "test_shifted_worst_group" in header


def test_metrics_csv_keeps_its_columns_on_epochs_not_evaluated(data_dir, tmp_path):
    run(data_dir, tmp_path, "--aug", "none", "--epochs", "3", "--eval-every", "2")
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 4 and {len(row) for row in rows} == {len(rows[0])}, "one header, three rows, all as wide"
    table = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert [row["epoch"] for row in table] == ["0", "1", "2"]
    assert table[0]["val_top1"] == "" and table[0]["train_loss"] != "", "epoch 1 was not evaluated"
    assert 0 <= float(table[1]["val_top1"]) <= 1 and 0 <= float(table[2]["test_top5"]) <= 1, "2 and the last were"


def test_a_second_run_of_the_same_name_gets_its_own_folder(data_dir, tmp_path):
    run(data_dir, tmp_path, "--aug", "none")
    run(data_dir, tmp_path, "--aug", "none")
    assert len(lines(tmp_path / "run" / "metrics.jsonl")) == 1, "the first run's metrics are its own"
    assert len(lines(tmp_path / "run-1" / "metrics.jsonl")) == 1
    run(data_dir, tmp_path, "--aug", "none", "--epochs", "2", "--resume", str(tmp_path / "run" / "last.pth"))
    assert [m["epoch"] for m in lines(tmp_path / "run" / "metrics.jsonl")] == [0, 1], "--resume goes on in place"
    assert not (tmp_path / "run-2").exists()


@pytest.mark.parametrize("failing_epochs, stops", [({1}, False), ({1, 2}, True)])
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(data_dir, tmp_path, monkeypatch, failing_epochs, stops):
    import errno

    real_save = torch.save

    def full_disk(state, path):
        if state["epoch"] in failing_epochs:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(torch, "save", full_disk)
    if stops:
        with pytest.raises(train.CheckpointWriteError, match="write before failed too.*--resume"):
            run(data_dir, tmp_path, "--aug", "none", "--epochs", "3")
    else:
        run(data_dir, tmp_path, "--aug", "none", "--epochs", "3")
    run_dir = tmp_path / "run"
    assert not list(run_dir.glob("*.tmp-*")), "the failed writes removed their temporary files"
    assert [m["epoch"] for m in lines(run_dir / "metrics.jsonl")] == [0, 1, 2], "every epoch's metrics, first"
    assert load_checkpoint(str(run_dir / "last.pth"))["epoch"] == (0 if stops else 2)


def test_run_folders_outside_output_are_refused(data_dir, tmp_path):
    for name in ("/tmp/elsewhere", "../up", ".."):
        with pytest.raises(ValueError, match="not a plain folder name"):
            run(data_dir, tmp_path, "--aug", "none", "--name", name)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        train.main(["--data-dir", data_dir, "--output", str(tmp_path / "file"), "--aug", "none", "--device", "cpu"])


def read_loss(path, epoch, step):
    with open(path) as f:
        for row in csv.DictReader(f):
            if int(row["epoch"]) == epoch and int(row["step"]) == step:
                return float(row["loss"])
    raise AssertionError(f"no loss for epoch {epoch} step {step} in {path}")


def test_resume_continues_exactly(data_dir, tmp_path, monkeypatch):
    common = ("--aug", "cutmix", "--epochs", "2", "--seed", "3")
    run(data_dir, tmp_path / "straight", *common)

    class Interrupted(Exception):
        pass

    real_save = checkpoint_module.save_checkpoint

    def save_then_stop(checkpoint, path):
        real_save(checkpoint, path)
        raise Interrupted

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        run(data_dir, tmp_path / "interrupted", *common)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    checkpoint = tmp_path / "interrupted" / "run" / "last.pth"
    run(data_dir, tmp_path / "interrupted", *common, "--resume", str(checkpoint))
    straight = read_loss(tmp_path / "straight" / "run" / "steps.csv", 1, 0)
    resumed = read_loss(tmp_path / "interrupted" / "run" / "steps.csv", 1, 0)
    assert resumed == pytest.approx(straight, abs=1e-6)


# Run in a child: its second write of last.pth stops half-way, killed (SIGKILL) mid-write.
DIE_WRITING_A_CHECKPOINT = """
import os, signal, sys
import torch
import train

real_save, saves = torch.save, []

def save_then_die(state, f):
    saves.append(f)
    if sum("last.pth" in str(s) for s in saves) == 2:
        real_save(state, f)
        with open(f, "r+b") as half:
            half.truncate(os.path.getsize(f) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(state, f)

torch.save = save_then_die
torch.set_num_threads(int(sys.argv[1]))  # as this test's process: the same sums, the same bits
train.main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_trainer_killed_while_writing_a_checkpoint_leaves_the_previous_one(data_dir, tmp_path):
    import subprocess

    common = ("--aug", "cutmix", "--epochs", "3", "--seed", "3")
    run(data_dir, tmp_path / "straight", *common)
    argv = ["--data-dir", data_dir, "--output", str(tmp_path / "killed"), "--name", "run", "--model", "resnet18",
            "--img-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--lr", "0.05",
            "--log-interval", "1", *common]
    child = subprocess.run([sys.executable, "-c", DIE_WRITING_A_CHECKPOINT, str(torch.get_num_threads()), *argv],
                           capture_output=True,
                           cwd=os.path.dirname(os.path.abspath(train.__file__)), timeout=600)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    run_dir = tmp_path / "killed" / "run"
    assert [p.name for p in run_dir.glob("last.pth.tmp-*")], "the half-written file is there, beside last.pth"
    checkpoint = load_checkpoint(str(run_dir / "last.pth"))
    assert checkpoint["epoch"] == 0, "last.pth still holds the first epoch's state"
    run(data_dir, tmp_path / "killed", *common, "--resume", str(run_dir / "last.pth"))
    assert not list(run_dir.glob("last.pth.tmp-*")), "the next save removed the dead writer's leftover"
    straight = read_loss(tmp_path / "straight" / "run" / "steps.csv", 2, 0)
    assert read_loss(run_dir / "steps.csv", 2, 0) == pytest.approx(straight, abs=1e-6)


def test_bad_input_stops_before_any_work(data_dir, tmp_path):
    with pytest.raises(SystemExit):
        run(data_dir, tmp_path, "--aug", "magic")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="not available"):
            run(data_dir, tmp_path, "--aug", "diffmix", "--gen-device", "cuda:1")
    with pytest.raises(ValueError, match=r"--p must lie in \[0, 1\]"):
        run(data_dir, tmp_path, "--aug", "cutmix", "--p", "1.5")
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        run(str(tmp_path / "nothing"), tmp_path, "--aug", "none")
    finetuned = tmp_path / "tuned"
    os.makedirs(finetuned)
    (finetuned / "onlinemix.json").write_text(json.dumps({"method": "ti_db", "class_names": ["a", "b"], "tokens": []}))
    with pytest.raises(ValueError, match="knows 2 classes but the data set has 3"):
        run(data_dir, tmp_path, "--aug", "diffmix", "--gen-device", "cpu", "--gen-model", "tiny",
            "--gen-finetuned", str(finetuned), "--gen-resolution", "32")
    with pytest.raises(ValueError, match="shared memory"):
        run(data_dir, tmp_path, "--aug", "realmix", "--gen-device", "cpu", "--gen-model", "tiny",
            "--gen-resolution", "32", "--ring-slots", str(10**9), "--ring-size", "256")
    assert not (tmp_path / "run" / "last.pth").exists(), "no failed run trained"


@pytest.mark.parametrize("config", sorted(f for f in os.listdir("configs") if f.endswith(".yaml")))
def test_every_config_parses(config, monkeypatch):
    monkeypatch.setattr(train_options, "check_device", lambda device, flag: None)  # recipes name GPUs
    monkeypatch.setattr(train_options, "check_data_options", lambda *args, **kw: None)  # and data sets not here
    monkeypatch.setattr("onlinemix.generator.adapters.personalisation_info", lambda folder: {})  # nor their tunings
    args = train.parse_args(["--config", os.path.join("configs", config)])
    assert args.aug in AUGMENTATIONS and 0 <= args.p <= 1
    if args.gen_model.startswith("stable-diffusion"):  # the paper's recipes
        import timm

        assert args.pretrained and args.model in timm.list_pretrained(), "from ImageNet weights, as the paper"
        assert args.clip_filter == "openai/clip-vit-base-patch32", "the paper's CLIP filter"
    if args.imbalance_factor:
        assert args.shot_thresholds == ([30, 10] if "flowers" in config else [20, 5])


def test_timm_style_loop_with_a_live_ring():
    """The change to timm's own train.py: DiffMix(**mixup_args, source=ring) where it builds Mixup."""
    import timm
    from timm.loss import SoftTargetCrossEntropy

    from onlinemix import DiffMix, GeneratorPool, SampleRing
    from tests.helpers import Counting
    from tests.test_pool import wait_for

    mixup_args = dict(mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                      mode="batch", label_smoothing=0.1, num_classes=7)
    model = timm.create_model("resnet18", num_classes=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = SoftTargetCrossEntropy()
    with SampleRing.create(32, 8, producers=1, consumers=1) as ring, GeneratorPool(ring, Counting(size=8), "cpu"):
        mixup_fn = DiffMix(**mixup_args, source=ring, p=0.5, gamma=0.5)
        assert wait_for(lambda: ring.stats()["filled"] >= 16)
        for _ in range(4):
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 7, (8,))
            x, y = mixup_fn(x, y)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
    assert mixup_fn.stats()["replaced"] > 0


@pytest.mark.slow
def test_torchrun_two_ranks_share_one_ring(data_dir, tmp_path):
    """torchrun on the CPU (gloo): one ring and generator per node, each rank a consumer."""
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "train.py", "--data-dir", data_dir,
               "--output", str(tmp_path), "--name", "run", "--model", "resnet18", "--img-size", "32",
               "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu", "--aug", "realmix",
               "--replace-prob", "0.5", "--gen-device", "cpu", "--gen-model", "tiny", "--gen-steps", "4",
               "--gen-resolution", "32", "--gen-batch-size", "4", "--gen-dtype", "float32", "--ring-slots", "32"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = lines(tmp_path / "run" / "metrics.jsonl")[-1]
    assert result["augmentation"]["replaced"] > 0
    assert result["ring"]["read"] == result["augmentation"]["replaced"], "every read sample went into a batch"
    assert result["augmentation"]["samples"] == 2 * 4 * (36 // 2 // 4), "both ranks trained, each on half the data"
    assert result["fidelity"]["all"]["count"] == result["augmentation"]["replaced"], "both ranks' calls are counted"


@pytest.mark.slow
def test_hugging_face_dataset_folder_with_a_live_generator(data_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    from onlinemix.data import ImageFolderSplits

    folder = ImageFolderSplits(data_dir)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})

    def table(split):
        return datasets.Dataset.from_dict({"image": split.paths, "label": split.labels}, features=features)

    test = table(folder.tests["test"])
    test = test.add_column("group", [f"g{label}" for label in folder.tests["test"].labels])
    datasets.DatasetDict({"train": table(folder.train), "test": test}).save_to_disk(tmp_path / "hf")
    result = run(str(tmp_path / "hf"), tmp_path, "--dataset", "hf", "--aug", "realmix", "--p", "0.5",
                 "--gen-device", "cpu", "--gen-model", "tiny", "--gen-steps", "4", "--gen-resolution", "32",
                 "--gen-batch-size", "4", "--gen-dtype", "float32", "--ring-slots", "16")
    assert result["augmentation"]["replaced"] > 0, "spawned generator workers read the arrow-backed references"
    assert len(result["val"]["per_class"]) == 3 and "test" in result
    groups = {f"g{c}": v for c, v in enumerate(result["test"]["per_class"])}
    assert result["test"]["groups"] == pytest.approx(groups, abs=1e-4), "a group column gives per-group accuracy"
    args = (tmp_path / "run" / "args.yaml").read_text()
    assert "dataset: hf" in args


def test_tensorboard_events_are_written(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(data_dir, tmp_path, "--aug", "cutmix")
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "val/top1", "test/top5", "augmentation/replaced_fraction"} <= set(tags)


def test_initial_checkpoint_loads_without_its_classifier(data_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "in1k.safetensors"))
    args = train.parse_args(["--data-dir", data_dir, "--model", "resnet18", "--initial-checkpoint",
                             str(tmp_path / "in1k.safetensors"), "--device", "cpu", "--aug", "none"])
    model = train.build_model(args, 3)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3
    with pytest.raises(FileNotFoundError, match="--initial-checkpoint"):
        train.parse_args(["--data-dir", data_dir, "--initial-checkpoint", str(tmp_path / "nope.pth"),
                          "--device", "cpu", "--aug", "none"])
    with pytest.raises(ValueError, match="pass one"):
        train.parse_args(["--data-dir", data_dir, "--pretrained", "--initial-checkpoint",
                          str(tmp_path / "in1k.safetensors"), "--device", "cpu", "--aug", "none"])


def test_pretrained_asks_timm_for_its_weights(data_dir, monkeypatch):
    import timm

    args = train.parse_args(["--data-dir", data_dir, "--model", "resnet50.tv_in1k", "--pretrained",
                             "--device", "cpu", "--aug", "none"])
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append((name, kw)) or torch.nn.Linear(1, 1))
    train.build_model(args, 7)
    assert calls == [("resnet50.tv_in1k", dict(num_classes=7, pretrained=True))]
    monkeypatch.undo()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network, nothing cached: a way out
    with pytest.raises(FileNotFoundError, match="Without network access.*--initial-checkpoint"):
        train.build_model(args, 7)


def test_the_synthetic_crop_is_the_real_one_and_normalisation_follows_the_model(data_dir, tmp_path):
    import timm

    args = train.parse_args(["--data-dir", data_dir, "--aug", "none", "--device", "cpu"])
    splits = load_splits(args.data_dir, **data_options(args))
    vit = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", num_classes=3)
    mean, std = data_loaders.normalisation(vit)
    assert mean == std == (0.5, 0.5, 0.5), "augreg ViTs expect [-1, 1] inputs"
    mix, *_ = train.build_augmentation(args, splits, str(tmp_path), PartialState(cpu=True), mean, std)
    assert mix.mean == mean and mix.std == std
    crop = data_loaders.transforms(32, mean, std)[0].transforms[0]
    assert tuple(mix.synthetic_transform.scale) == tuple(crop.scale) and mix.synthetic_transform.flip == 0.5
    assert mix.synthetic_transform.size == (args.img_size, args.img_size), "each crop resized once"
    assert tuple(mix.synthetic_transform.ratio) == pytest.approx(tuple(crop.ratio))


@pytest.mark.parametrize("aug, flags, expected", [
    ("cutmix", [], dict(cutmix_alpha=1.0, mixup_alpha=0.0, mix_prob=0.1, mode="elem")),
    ("diffmix+cutmix", [], dict(cutmix_alpha=1.0, mixup_alpha=0.0, mix_prob=0.1, mode="elem")),
    ("mixup", [], dict(cutmix_alpha=0.0, mixup_alpha=1.0, mix_prob=0.3, mode="batch")),
    ("cutmix", ["--mixup-prob", "1", "--mixup-mode", "batch"], dict(mix_prob=1.0, mode="batch")),
])
def test_mixup_and_cutmix_follow_the_paper_unless_told(data_dir, tmp_path, aug, flags, expected):
    tuned = tmp_path / "tuned"  # diffmix is refused without a personalisation while the options are parsed
    tuned.mkdir()
    (tuned / "onlinemix.json").write_text(json.dumps({"method": "ti_db", "class_names": CLASSES, "tokens": []}))
    args = train.parse_args(["--data-dir", data_dir, "--aug", aug, "--device", "cpu", "--gen-device", "cpu",
                             "--gen-model", "tiny", "--gen-resolution", "32", "--gen-steps", "2",
                             "--gen-finetuned", str(tuned), *flags])
    args.aug = "cutmix" if aug == "diffmix+cutmix" else aug  # the same mixing; no generator needed here
    splits = load_splits(args.data_dir, **data_options(args))
    mix, *_ = train.build_augmentation(args, splits, str(tmp_path), PartialState(cpu=True), (0, 0, 0), (1, 1, 1))
    assert {k: getattr(mix, k) for k in expected} == expected
    with pytest.raises(ValueError, match="--mixup-prob"):
        train.parse_args(["--data-dir", data_dir, "--aug", "cutmix", "--device", "cpu", "--mixup-prob", "2"])


def test_aug_takes_one_spelling_and_the_papers_as_an_alias(data_dir):
    for spelled, name in (("diff-mix", "diffmix"), ("diff-mix+cutmix", "diffmix+cutmix"), ("real-filtering",
                                                                                            "realfilter")):
        args = train.parse_args(["--data-dir", data_dir, "--aug", spelled, "--device", "cpu", "--gen-device", "cpu"])
        assert args.aug == name
    with pytest.raises(SystemExit):
        train.parse_args(["--data-dir", data_dir, "--aug", "diff-mixx", "--device", "cpu"])


def test_cutmix_mixes_about_a_tenth_of_the_samples(data_dir, tmp_path):
    args = train.parse_args(["--data-dir", data_dir, "--aug", "cutmix", "--device", "cpu", "--smoothing", "0"])
    splits = load_splits(args.data_dir, **data_options(args))
    mix, *_ = train.build_augmentation(args, splits, str(tmp_path), PartialState(cpu=True), (0, 0, 0), (1, 1, 1))
    mixed = 0
    for _ in range(100):
        x, y = torch.rand(16, 3, 16, 16), torch.arange(16) % 3
        _, target = mix(x, y)
        mixed += int((target.max(1).values < 1).sum())
    assert 0.06 < mixed / 1600 < 0.14, "the paper's CutMix: probability 0.1 per sample"


@pytest.mark.slow
def test_demo_world_run_reports_counterfactual_groups(tmp_path):
    result = run(str(tmp_path / "world"), tmp_path, "--dataset", "demo", "--aug", "cutmix", "--metaclass", "bird")
    assert (tmp_path / "world" / "world.json").exists(), "--dataset demo wrote the world"
    shifted = result["test_counterfactual"]
    assert len(shifted["per_class"]) == 12 and len(shifted["groups"]) == 6
    assert shifted["worst_group"] == min(shifted["groups"].values())


def test_no_arguments_run_the_demo_config(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["train.py"])
    args = train.parse_args()
    assert "running the demo" in capsys.readouterr().out
    assert (args.dataset, args.aug, args.gen_model, args.gen_device) == ("demo", "diffmix", "demo", ["cpu"])
    assert args.gen_finetuned and os.path.isfile(args.gen_finetune_config)


@pytest.mark.slow
def test_generator_is_personalised_first_then_reused(data_dir, tmp_path):
    config = tmp_path / "finetune.yaml"
    config.write_text(f"model: demo\ndata_dir: {data_dir}\nmetaclass: shape\nsteps: 2\nbatch_size: 2\n"
                      "resolution: 32\nworkers: 0\npreview_steps: 0\ninitializer: bird\n")
    tuned = tmp_path / "tuned"
    generator = ("--aug", "diffmix", "--p", "0.5", "--gen-device", "cpu", "--gen-model", "demo", "--gen-steps", "2",
                 "--gen-resolution", "32", "--gen-batch-size", "4", "--gen-dtype", "float32", "--ring-slots", "16",
                 "--gen-finetuned", str(tuned), "--gen-finetune-config", str(config))
    result = run(data_dir, tmp_path, *generator)
    with open(tuned / "onlinemix.json") as f:
        assert json.load(f)["steps"] == 2 and result["augmentation"]["replaced"] > 0
    stamp = os.path.getmtime(tuned / "onlinemix.json")
    run(data_dir, tmp_path / "again", *generator)
    assert os.path.getmtime(tuned / "onlinemix.json") == stamp, "the personalised generator is reused"
    with pytest.raises(ValueError, match="fine-tuned on other training images"):
        run(data_dir, tmp_path / "fewer", *generator, "--shots", "4")
    base_model = [f if f != str(tuned) else str(tmp_path / "never") for f in generator[2:]]
    with pytest.warns(UserWarning, match="un-tuned base model"):
        run(data_dir, tmp_path / "base", "--aug", "realmix", *base_model)
    assert not (tmp_path / "never").exists(), "real-mix runs the base model: nothing to personalise first"
    with pytest.raises(ValueError, match="--gen-finetune-config needs --gen-finetuned"):
        run(data_dir, tmp_path, "--aug", "diffmix", "--gen-device", "cpu", "--gen-finetune-config", str(config))


class _Predicts(torch.nn.Module):
    """A classifier that always answers ``label``."""

    def __init__(self, label, num_classes):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), self.num_classes).float()


def test_top1_counts_images_and_balanced_top1_counts_classes():
    from onlinemix.data import FileSplit

    labels = [0] * 8 + [1] * 2 + [2] * 2
    split = FileSplit([""] * len(labels), labels)
    split.image = lambda index: None
    dataset = SplitImages(split, lambda image: torch.zeros(3, 4, 4))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5)
    result = train.evaluate(_Predicts(0, 3), loader, torch.device("cpu"), 3, None)
    assert result["top1"] == pytest.approx(8 / 12), "top-1 over images, as papers and timm report it"
    assert result["balanced_top1"] == pytest.approx(1 / 3), "the mean of per-class accuracies"
    assert result["per_class"] == [1.0, 0.0, 0.0] and result["top5"] == pytest.approx(1.0)
    counts = [40, 15, 3]
    groups = train.evaluate(_Predicts(0, 3), loader, torch.device("cpu"), 3, None, counts, (30, 10))
    assert (groups["many"], groups["medium"], groups["few"]) == (1.0, 0.0, 0.0)
    assert train.evaluate(_Predicts(0, 3), loader, torch.device("cpu"), 3, None, counts)["many"] == 1.0
    with pytest.raises(ValueError, match="--shot-thresholds"):
        train.parse_args(["--data-dir", ".", "--aug", "none", "--device", "cpu", "--shot-thresholds", "5", "20"])


@pytest.mark.slow
def test_referable_classes_and_real_filtering_reach_the_generator(data_dir, tmp_path):
    from tests.helpers import tiny_clip

    generator = ["--gen-device", "cpu", "--gen-model", "tiny", "--gen-steps", "4", "--gen-resolution", "32",
                 "--gen-batch-size", "4", "--gen-dtype", "float32", "--ring-slots", "16"]
    args = train.parse_args(["--data-dir", data_dir, "--aug", "realmix", "--referable-classes", "2",
                             "--device", "cpu", *generator])
    factory = generator_factory(args, load_splits(args.data_dir, **data_options(args)), str(tmp_path), image_size=32)
    assert (factory.spec.strategy, factory.spec.referable_classes) == ("realmix", 2)
    args.aug = "realfilter"
    with pytest.raises(ValueError, match="--clip-filter"):
        generator_factory(args, load_splits(args.data_dir, **data_options(args)), str(tmp_path), image_size=32)
    model, tokenizer = tiny_clip(seed=0)
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    result = run(data_dir, tmp_path, "--aug", "realfilter", "--clip-filter", str(tmp_path / "clip"), "--p", "0.5",
                 *generator)
    assert result["augmentation"]["replaced"] > 0
    assert result["generator"]["written"] > 0 and result["generator"]["restarts"] == 0


def test_closed_loop_flags_stop_before_any_work(data_dir):
    base = ["--data-dir", data_dir, "--device", "cpu", "--gen-device", "cpu"]
    with pytest.raises(SystemExit):  # argparse: invalid choice
        train.parse_args([*base, "--aug", "diffmix", "--gen-policy", "uniformish"])
    with pytest.raises(ValueError, match=r"--gen-policy-floor\) must lie in \[0, 1\]"):
        train.parse_args([*base, "--aug", "realmix", "--gen-policy", "confusion", "--gen-policy-floor", "-0.1"])
    with pytest.raises(ValueError, match=r"both in \(0, 1\]"):
        train.parse_args([*base, "--aug", "realmix", "--strength-schedule", "0.9", "1.5"])
    with pytest.raises(ValueError, match="--aug cutmix runs none"):
        train.parse_args([*base, "--aug", "cutmix", "--gen-policy", "hard-class"])
    with pytest.raises(ValueError, match="use hard-class or uniform"):
        train.parse_args([*base, "--aug", "diffaug", "--gen-policy", "confusion"])


@pytest.mark.slow
def test_confusion_policy_run_publishes_and_draws_its_heatmaps(data_dir, tmp_path):
    result = run(data_dir, tmp_path, "--aug", "realmix", "--p", "0.5", "--epochs", "2", "--gen-device", "cpu",
                 "--gen-model", "tiny", "--gen-steps", "4", "--gen-resolution", "32", "--gen-batch-size", "4",
                 "--gen-dtype", "float32", "--ring-slots", "16", "--gen-policy", "confusion", "--feedback-every", "2")
    assert result["policy"]["name"] == "confusion" and result["policy"]["publication"] >= 4
    assert 0 <= result["policy"]["error"] <= 1 and result["augmentation"]["replaced"] > 0
    assert (tmp_path / "run" / "policy-epoch002.png").exists(), "drawn at the evaluation"
    assert not [n for n in os.listdir("/dev/shm") if "feedback" in n and str(os.getpid()) in n], "block unlinked"


def test_the_cluster_without_ray_gives_an_install_hint(data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    with pytest.raises(ImportError, match=r"pip install 'onlinemix\[ray\]'"):
        train.parse_args(["--data-dir", data_dir, "--device", "cpu", "--aug", "diffmix", "--gen-cluster", "auto"])
