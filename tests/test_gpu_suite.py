"""The GPU suite's plumbing, run dry on the CPU with tiny models: every step runs and writes its figures."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("generator_fp16", "options_fp16", "generator_bf16", "overhead", "finetune", "distill", "caption",
         "family_sdxl", "family_sd3", "family_flux")


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_figure(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=900)
    log = (tmp_path / "suite.log").read_text()
    assert done.returncode == 0, log + "".join((tmp_path / f"{s}.log").read_text()[-3000:] for s in STEPS
                                               if (tmp_path / f"{s}.log").exists())
    for name in STEPS:
        assert f"{name}: exit 0 " in log
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["runs"] and report["machine"]["torch"]
    options = json.loads((tmp_path / "options_fp16.json").read_text())
    assert [r["options"] for r in options["runs"]] == ["today", "continuous", "deep_cache_2", "deep_cache_3",
                                                       "deep_cache_2+steps_20", "steps_8+ddim_trailing",
                                                       "channels_last", "fused_qkv"]
    assert all(r["images_per_s"] > 0 for r in options["runs"])


def test_gpu_suite_skips_steps_once_its_budget_is_spent(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, "GPU_SUITE_SECONDS": "5"},
                          capture_output=True, text=True, timeout=60)
    log = (tmp_path / "suite.log").read_text()
    assert done.returncode != 0, "a skipped step fails the suite"
    assert all(f"{name}: skipped, the suite's budget of 5 s is spent" in log for name in STEPS)


def test_the_native_family_architectures_have_their_real_sizes():
    """Built on the meta device (no memory, no time): each denoiser has its real model's parameter count, so the
    GPU step measures the real FLOPs: SDXL base's U-Net 2.57 B, SD 3 medium's MM-DiT 2.03 B, FLUX.1's 11.9 B."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from native_families import build_native

    import torch

    sizes = {name: sum(p.numel() for p in build_native(name, device="meta", dtype=torch.bfloat16).denoiser.parameters())
             for name in ("sdxl", "sd3", "flux-dev")}
    assert sizes["sdxl"] == pytest.approx(2.567e9, rel=0.01), sizes
    assert sizes["sd3"] == pytest.approx(2.028e9, rel=0.01), sizes
    assert sizes["flux-dev"] == pytest.approx(11.90e9, rel=0.01), sizes
