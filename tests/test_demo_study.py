"""A tiny run of the demo study: two augmentations, two seeds, one epoch each, the real script."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import tiny_study_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_study_runs_every_pair_and_summarises_over_seeds(tmp_path):
    config = tiny_study_config(str(tmp_path))
    out = tmp_path / "results" / "study.json"
    out.parent.mkdir()
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "demo_study.py"), "--augs", "none", "realmix",
                    "--seeds", "0", "1", "--config", config, "--runs", str(tmp_path / "runs"),
                    "--out", str(out), "--", "--lr", "0.01"], check=True, cwd=ROOT, timeout=600)

    report = json.loads(out.read_text())
    assert sorted((r["aug"], r["seed"]) for r in report["runs"]) == [("none", 0), ("none", 1), ("realmix", 0),
                                                                         ("realmix", 1)]
    assert report["settings"]["train_overrides"] == ["--lr", "0.01"]
    for aug in ("none", "realmix"):
        rows = [r for r in report["runs"] if r["aug"] == aug]
        summary = report["summary"][aug]
        assert summary["seeds"] == 2
        for key in ("test", "counterfactual", "counterfactual_worst_group", "synthetic_fraction"):
            values = [r[key] for r in rows]
            assert all(0 <= v <= 1 for v in values)
            assert abs(summary[key]["mean"] - sum(values) / 2) < 1e-9
            assert abs(summary[key]["se"] - abs(values[0] - values[1]) / 2) < 1e-9, "s.e. of two values"
        for key in ("test", "counterfactual"):
            a, n = summary[key]["mean"], rows[0][f"{key}_images"]
            assert n == 12 * 100 and abs(summary[key]["sampling_se"] - (a * (1 - a) / n) ** 0.5) < 1e-9
    assert report["summary"]["none"]["synthetic_fraction"]["mean"] == 0
    assert report["summary"]["realmix"]["synthetic_fraction"]["mean"] > 0, "the generator ran"
    assert 0 <= report["summary"]["realmix"]["synthetic_called_target"]["mean"] <= 1, "the fidelity monitor counted"
    assert "synthetic_called_target" not in report["summary"]["none"]
    for row in (r for r in report["runs"] if r["aug"] == "realmix"):
        by_strength = row["first_read_called_target_by_strength"]
        assert by_strength and all(k.startswith("s=") and 0 <= v <= 1 for k, v in by_strength.items())
    assert (tmp_path / "results" / "study.png").stat().st_size > 0
    assert (tmp_path / "runs" / "realmix-seed1" / "metrics.jsonl").exists()


def test_paired_differences_are_taken_seed_by_seed():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from demo_study import paired_differences
    finally:
        sys.path.pop(0)
    rows = [dict(aug=aug, seed=seed, test=value, counterfactual=2 * value)
            for aug, seed, value in (("diffmix", 0, 0.5), ("diffmix", 1, 0.7), ("diffmix", 2, 0.9), ("none", 0, 0.4),
                                     ("none", 1, 0.5), ("diffaug", 0, 0.1))]
    diff = paired_differences(rows)
    assert set(diff) == {"diffmix - none"}, "pairs need two shared seeds"
    assert diff["diffmix - none"]["test"]["seeds"] == 2
    assert abs(diff["diffmix - none"]["test"]["mean"] - 0.15) < 1e-9
    assert abs(diff["diffmix - none"]["test"]["se"] - 0.05) < 1e-9
    assert abs(diff["diffmix - none"]["counterfactual"]["mean"] - 0.3) < 1e-9
