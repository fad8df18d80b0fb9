#!/usr/bin/env bash
# Every GPU figure of the project in one command, on a machine with one GPU, within 8 minutes.
#
#   benchmarks/gpu_suite.sh [OUT]             results under OUT (default benchmarks/results/gpu)
#   benchmarks/gpu_suite.sh --dry-run OUT     the same steps on the CPU with tiny models (the tests run it)
#
# Stable Diffusion 1.5's architecture with random weights (the same FLOPs, nothing to download):
#   1. generator_fp16:  onlinemix's sampler against diffusers' img2img (batched and batch 1), 512 and
#                       256 px, s = 0.7 and mixed strengths, fp16;
#   2. options_fp16:    the generator's speed options, one DiffusionProducer each, 512 px fp16:
#                       before continuous batching, continuous, DeepCache 2 and 3, channels-last,
#                       fused QKV, torch.compile, torch.compile with CUDA graphs;
#   3. generator_bf16:  step 1 in bf16 at 512 px, with the U-Net compiled;
#   4. overhead:        a ResNet-50 at 224 px training beside a live generator on the same GPU;
#   5. finetune:        personalisation steps/s at 512 px, fp16 and bf16 autocast;
#   6. distill:         `onlinemix distill` steps/s and peak memory at 512 px, batch 8, rank 64, bf16 and fp16;
#   7. caption:         SGID's caption store per image: BLIP base (10 nucleus + 10 beam captions) and
#                       CLIP ViT-B/32, fp32;
#   8. family_sdxl, family_sd3, family_flux: s / image of translation and text-to-image on SDXL base's,
#                       SD 3 medium's and FLUX.1-dev's architectures (random weights), one step each,
#                       512 px, 25 steps, bf16.
# Each step has its own time limit and the suite a budget (GPU_SUITE_SECONDS, 480 by default): a step
# that would start with less than 20 s left is skipped and says so. OUT/suite.log lists every step with
# its exit status and seconds; OUT/<step>.log holds its output, OUT/<step>.json its figures.
set -u
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out=${1:-benchmarks/results/gpu}
budget=${GPU_SUITE_SECONDS:-480}
python=${PYTHON:-python}
mkdir -p "$out"
: > "$out/suite.log"

if [ "$dry_run" = 1 ]; then
    device=cpu gen_model=tiny big=32 small=16 steps=4 classifier=resnet18 img=32 compiled_sets=""
    overhead_extra="--gen-model demo --gen-steps 4 --rounds 2 --block 3 --warmup-steps 1 --warm-samples 4 --sim-ratios 1 --sim-seconds 1"
    finetune_extra="--classes 4 --steps 2 --warmup 1"
    distill_extra="--rank 4 --batch 2 --steps 2 --warmup 1"
    caption_extra="--size tiny --images 2 --batch-size 1 --nucleus 2 --beam 2 --tokens 4"
    families_extra="--resolution 32 --steps 4 --repeats 1 --rounds 1"
else
    device=cuda gen_model=sd15 big=512 small=256 steps=25 classifier=resnet50 img=224
    compiled_sets="compiled compiled+cuda_graphs"
    overhead_extra="--gen-model sd15 --gen-resolution 512 --gen-dtype float16 --rounds 4 --block 20 --sim-ratios 0.5 1 --sim-seconds 5"
    finetune_extra="--steps 10"
    distill_extra="--steps 10"
    caption_extra="--images 32 --batch-size 8"
    families_extra="--native --dtype bfloat16 --resolution 512 --steps 25 --repeats 1 --rounds 1"
fi

start=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run COMMAND with at most SECONDS, within what the budget leaves
    local name=$1 limit=$2 left began rc
    shift 2
    left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, the suite's budget of ${budget} s is spent" | tee -a "$out/suite.log"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    began=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - began )) s (limit $limit s)" | tee -a "$out/suite.log"
}

step generator_fp16 110 "$python" benchmarks/bench_generator.py --device $device --model $gen_model \
    --sizes $big $small --dtype float16 --strengths 0.7 --steps $steps --repeats 2 \
    --out "$out/generator_fp16.json"
step options_fp16 170 "$python" benchmarks/bench_generator.py --options --device $device --model $gen_model \
    --resolution $big --dtype float16 --steps $steps --batch 8 --images 24 --repeats 2 \
    --sets today continuous deep_cache_2 deep_cache_3 deep_cache_2+steps_20 steps_8+ddim_trailing channels_last \
    fused_qkv \
    $compiled_sets \
    --out "$out/options_fp16.json"
step generator_bf16 90 "$python" benchmarks/bench_generator.py --device $device --model $gen_model \
    --sizes $big --dtype bfloat16 --strengths 0.7 --steps $steps --repeats 2 \
    $([ "$dry_run" = 1 ] || echo --compile) --out "$out/generator_bf16.json"
step overhead 90 "$python" benchmarks/bench_overhead.py --device $device --gen-device $device \
    --model $classifier --img-size $img --batch-size 64 $overhead_extra --out "$out/overhead.json"
step finetune 60 "$python" benchmarks/bench_finetune.py --device $device --model $gen_model --resolution $big \
    --precision fp16 bf16 $finetune_extra --out "$out/finetune.json"
step distill 60 "$python" benchmarks/bench_distill.py --device $device --model $gen_model --resolution $big \
    --precision bf16 fp16 $distill_extra --out "$out/distill.json"

step caption 60 "$python" benchmarks/bench_caption.py --device $device --parts cost $caption_extra \
    --out "$out/caption.json"
family_step() {  # family_step NAME FAMILY SECONDS: one family's step 8
    step "family_$1" "$3" "$python" benchmarks/bench_families.py --device $device --families "$2" \
        --parts translate generate $families_extra --out "$out/family_$1.json"
}
family_step sdxl sdxl 50
family_step sd3 sd3 50
family_step flux flux-dev 90  # FLUX.1's transformer holds 12 B parameters

echo "gpu_suite: $(( $(date +%s) - start )) s in all; figures in $out" | tee -a "$out/suite.log"
! grep -qv ": exit 0 \|gpu_suite:" "$out/suite.log"
