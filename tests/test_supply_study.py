"""The supply study and its arithmetic: nested offline sets, pairs, N*, and the GPUs-per-trainer sums."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import tiny_study_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
try:
    import supply_arithmetic
    import supply_study
finally:
    sys.path.pop(0)


def write_set(root, numbers):
    """A set in the generate layout: one image per number, meta.csv listing them."""
    rows = []
    for n in numbers:
        path = os.path.join("a", f"b-{n:06d}-0.7.png")
        os.makedirs(os.path.join(root, "data", "a"), exist_ok=True)
        with open(os.path.join(root, "data", path), "wb") as f:
            f.write(bytes([n % 256]) * 16)
        rows.append({"First Directory": "a", "Second Directory": "b", "Number": n, "Strength": 0.7, "Path": path})
    with open(os.path.join(root, "meta.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_prefix_set_holds_exactly_the_first_samples(tmp_path):
    full, prefix = str(tmp_path / "full"), str(tmp_path / "prefix")
    write_set(full, [3, 0, 5, 1, 4, 2])  # rows land in the order actors finish, not by number
    supply_study.prefix_set(full, prefix, 4)
    with open(os.path.join(prefix, "meta.csv"), newline="") as f:
        assert sorted(int(r["Number"]) for r in csv.DictReader(f)) == [0, 1, 2, 3]
    write_set(str(tmp_path / "own"), [0, 1, 2, 3])
    assert supply_study.same_images(prefix, str(tmp_path / "own"))
    write_set(str(tmp_path / "other"), [0, 1, 2, 7])
    assert not supply_study.same_images(prefix, str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match="holds 6 samples numbered below 8"):
        supply_study.prefix_set(full, str(tmp_path / "too-many"), 8)


def test_online_and_offline_are_paired_at_equal_budgets_seed_by_seed():
    rows = [dict(arm=arm, seed=seed, test=value, counterfactual=value / 2)
            for arm, seed, value in (("none", 0, 0.4), ("none", 1, 0.5), ("online-24", 0, 0.6), ("online-24", 1, 0.5),
                                     ("offline-24", 0, 0.5), ("offline-24", 1, 0.6), ("offline-96", 0, 0.7),
                                     ("online-all", 0, 0.6), ("online-all", 1, 0.6), ("offline-96", 2, 0.6))]
    diff = supply_study.paired_differences(rows, [24], [24, 96])
    assert set(diff) == {"online-all - none", "online-24 - none", "offline-24 - none", "online-24 - offline-24"}, \
        "pairs need two seeds: offline-96 shares only seed 0 with online-all"
    rows.append(dict(arm="offline-96", seed=1, test=0.8, counterfactual=0.4))
    assert supply_study.paired_differences(rows, [24], [24, 96])["online-all - offline-96"]["test"]["mean"] == \
        pytest.approx(-0.15), "the unbudgeted run against the largest set"
    assert diff["online-24 - offline-24"]["test"]["mean"] == pytest.approx(0.0)
    assert diff["online-24 - offline-24"]["test"]["se"] == pytest.approx(0.1)
    assert diff["online-24 - none"]["counterfactual"]["mean"] == pytest.approx(0.05)


def test_supply_totals_sum_the_epochs_and_weigh_sample_age_by_reads():
    epochs = [{"epoch": 0},  # no supply figures: a run without a generator's counts that epoch
              {"supply": dict(written=12, generator_busy_s=2.0, fresh_reads=10, reused_reads=0, sample_age_s=1.0)},
              {"supply": dict(written=0, generator_busy_s=0.5, fresh_reads=0, reused_reads=30, sample_age_s=5.0)}]
    totals = supply_study.supply_totals(epochs)
    assert totals == {"unique": 12, "generator_seconds": 2.5, "sample_age_s": pytest.approx((10 + 150) / 40)}


def test_a_translation_costs_its_steps_at_the_strength_with_guidance_doubling_them():
    # 25 steps at s = 0.7: diffusers' img2img runs int(25 * 0.7) = 17 steps, two U-Net calls each with CFG.
    vae = supply_arithmetic.ENCODE_TFLOPS + supply_arithmetic.DECODE_TFLOPS
    assert supply_arithmetic.translation_tflops(25, guided=True) == pytest.approx(34 * supply_arithmetic.UNET_TFLOPS + vae)
    assert supply_arithmetic.translation_tflops(4, guided=False) == pytest.approx(2 * supply_arithmetic.UNET_TFLOPS + vae)
    speed = supply_arithmetic.generator_images_per_s(dict(steps=25, guided=True), "H200")
    assert 11 <= speed <= 14, "the model must reproduce the anchors' 11-14 images/s per H200 at 25 steps"


def test_the_table_turns_fresh_supply_into_generator_gpus(tmp_path):
    report = supply_arithmetic.main(["--fresh-per-training-image", "2", "--gen-images-per-s", "25=10", "fast=20",
                                     "--trainer-images-per-s", "500", "--out", str(tmp_path / "a.json")])
    rows = {r["config"]: r for r in report["recipes"]}
    cub = rows["cub_resnet50_448.yaml"]  # p = 0.1, 128 epochs
    assert cub["synthetic_demand_per_s"] == pytest.approx(50.0)
    assert cub["fresh_at_n_star_per_s"] == pytest.approx(2 * 500 / 128, abs=0.01), "f x R / epochs"
    assert cub["reads_per_fresh_image_at_n_star"] == pytest.approx(0.1 * 128 / 2, abs=0.1), "p x epochs / f"
    gpus = cub["generator_gpus"]
    assert gpus["25 steps, CFG 7.5"] == {"images_per_s": 10.0, "all_fresh": 5.0, "at_n_star": pytest.approx(0.781, abs=1e-3)}
    assert gpus["fast set (DeepCache 2, 20 steps)"]["all_fresh"] == pytest.approx(2.5)
    with open(os.path.join(ROOT, "configs", "cub_5shot_224.yaml")) as f:
        assert rows["cub_5shot_224.yaml"]["p"] == yaml.safe_load(f)["p"], "recipes are read from configs/"
    assert json.loads((tmp_path / "a.json").read_text())["measured_overrides"] == {"25": 10.0, "fast": 20.0}


def test_n_star_is_the_smallest_set_within_a_standard_error_of_the_largest_on_both_sets(tmp_path):
    def arm(test, counterfactual):
        return {"test": {"mean": test, "se": 0.01}, "counterfactual": {"mean": counterfactual, "se": 0.01}}

    summary = {"none": arm(0.4, 0.1), "offline-24": arm(0.45, 0.15), "offline-120": arm(0.495, 0.16),
               "offline-600": arm(0.50, 0.20)}
    (tmp_path / "s.json").write_text(json.dumps({"summary": summary, "samples_per_epoch": 96}))
    found = supply_arithmetic.saturation(str(tmp_path / "s.json"))
    assert found["n_star_per_set"] == {"test": 120, "counterfactual": 600}
    assert found["n_star"] == 600 and found["fresh_per_training_image"] == pytest.approx(600 / 96)
    summary["offline-120"] = arm(0.495, 0.195)
    (tmp_path / "s.json").write_text(json.dumps({"summary": summary, "samples_per_epoch": 96}))
    assert supply_arithmetic.saturation(str(tmp_path / "s.json"))["n_star"] == 120
    (tmp_path / "empty.json").write_text(json.dumps({"summary": {"none": summary["none"]}, "samples_per_epoch": 96}))
    with pytest.raises(SystemExit, match="no offline arm yet"):
        supply_arithmetic.saturation(str(tmp_path / "empty.json"))


def test_a_bad_measured_rate_is_refused_with_the_accepted_forms(tmp_path, capsys):
    with pytest.raises(SystemExit):
        supply_arithmetic.main(["--fresh-per-training-image", "1", "--gen-images-per-s", "12=3",
                                "--out", str(tmp_path / "a.json")])
    assert "STEPS 25, 8, 4 or fast" in capsys.readouterr().err


def test_offline_budgets_off_the_task_size_are_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        supply_study.main(["--offline-budgets", "24", "30", "--runs", str(tmp_path), "--out", str(tmp_path / "s.json")])
    assert "multiples of the config's gen_batch_size (12); got [30]" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_the_study_runs_every_arm_and_resumes_without_rerunning(tmp_path):
    config = tiny_study_config(str(tmp_path))
    out = tmp_path / "results" / "study.json"
    out.parent.mkdir()
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "supply_study.py"), "--seeds", "0", "--aug", "realmix",
               "--online-budgets", "4", "--offline-budgets", "4", "8", "--config", config,
               "--runs", str(tmp_path / "runs"), "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=900)

    report = json.loads(out.read_text())
    by = {r["arm"]: r for r in report["runs"]}
    assert sorted(by) == sorted(["none", "online-all", "online-4", "offline-4", "offline-8"])
    assert report["prefix_equals_own_run"] == {"count": 4, "seed": 0, "equal": True}, "nested sets are the sets"
    assert by["online-4"]["unique"] == 4, "the budget held the generator to 4 unique samples"
    assert by["online-all"]["unique"] > 0 and by["none"]["unique"] == 0
    assert by["offline-8"]["unique"] == 8 and by["offline-4"]["generator_seconds"] == pytest.approx(
        report["generation"]["0"]["seconds"] / 2, abs=0.06)
    assert by["offline-8"]["wall_seconds"] > by["offline-8"]["train_seconds"], "the generation stage is counted"
    asked = report["asked_per_run"]
    assert asked == pytest.approx(0.5 * report["samples_per_epoch"])
    assert by["offline-4"]["synthetic_fraction"] > 0 and math.isfinite(by["online-4"]["test"])
    assert (tmp_path / "results" / "study.png").stat().st_size > 0

    subprocess.run(command, check=True, cwd=ROOT, timeout=600)  # everything done: only the setup epoch runs again
    again = json.loads(out.read_text())
    assert again["runs"] == report["runs"]
