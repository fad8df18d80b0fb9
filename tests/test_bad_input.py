"""Bad input, as a new user or an attacker gives it: refused before any folder is written, in one sentence
that names the input, without a traceback, leaving nothing in /dev/shm or on disk.

Each command-line case runs ``train.cli`` / ``onlinemix.cli.main`` in this process, as ``python train.py``
would: the user sees the ``SystemExit`` message (argparse's, or ``error: ...`` for the errors listed in
``USER_ERRORS``); anything else would reach them as a traceback and fails the case.
"""
import json
import os
import shutil

import pytest
import torch

import train
from onlinemix.cli import main as onlinemix
from onlinemix.data.toy import write_toy_dataset
from onlinemix.segments import PREFIX, SHM_DIR
from tests.test_sources import ROWS, write_offline_output

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the cases point at, made once: a toy data set, broken data sets, broken checkpoints."""
    root = tmp_path_factory.mktemp("inputs")
    toy = root / "toy"
    write_toy_dataset(str(toy), classes=3, train_per_class=6, val_per_class=2, test_per_class=2)
    empty_class = root / "empty_class"
    shutil.copytree(toy, empty_class)
    os.makedirs(empty_class / "train" / "class_9")
    stray_class = root / "stray_class"
    shutil.copytree(toy, stray_class)
    os.makedirs(stray_class / "val" / "class_9")
    shutil.copy(toy / "val" / "class_0" / "0000.png", stray_class / "val" / "class_9")
    damaged = root / "damaged"
    shutil.copytree(toy, damaged)
    (damaged / "train" / "class_1" / "0002.png").write_text("not a png")
    (root / "names.txt").write_text("a\nb\n")
    (root / "truncated.pth").write_bytes(b"PK\x03\x04 cut short")
    (root / "notes.txt").write_text("some notes")
    torch.save({"weights": torch.zeros(2)}, root / "foreign.pth")
    plain = {"optimizer": {}, "scheduler": {}, "scaler": {}, "best": 0.0, "rng": [], "args": {"model": "vit"}}
    torch.save({**plain, "model": {"x": torch.zeros(1)}, "epoch": 5}, root / "finished.pth")
    torch.save({**plain, "model": {"x": torch.zeros(1)}, "epoch": 0}, root / "other_model.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, root / "unfitting.pth")
    incomplete = root / "incomplete_model"
    os.makedirs(incomplete / "unet")
    from onlinemix.generator.tiny import tiny_flux_components

    tiny_flux_components(0).save(str(root / "flux_model"))
    replay = root / "replay"
    write_offline_output(replay, [(c.replace(" ", "_"), c.replace(" ", "_"), i + 1, 0.5)
                                  for i, c in enumerate(["class 0", "class 1", "class 2"])])
    meta = (replay / "meta.csv").read_text().splitlines()
    meta[1] = ",".join(meta[1].split(",")[:-1] + ["../../toy/test/class_0/0000.png"])
    (replay / "meta.csv").write_text("\n".join(meta) + "\n")
    write_offline_output(root / "replay_of_birds", [("ember_finch", "class_1", 1, 0.5)])
    os.makedirs(root / "tuned_on_two")
    (root / "tuned_on_two" / "onlinemix.json").write_text(json.dumps({"method": "ti_db",
                                                                      "class_names": ["class_0", "class_1"]}))
    for name, text in {"malformed.yaml": "lr: [0.1\n", "scalar.yaml": "a great config\n",
                       "unknown.yaml": "learning_rate: 0.1\n", "rmsprop.yaml": "opt: rmsprop\n",
                       "fp8.yaml": "amp: fp8\n", "nan.yaml": "lr: .nan\n", "switch.yaml": "compile: 'yes'\n",
                       "list.yaml": "epochs: [1, 2]\n", "gen_device.yaml": "gen_device: cuda:7\n",
                       "descriptions.json": "{not json"}.items():
        (root / name).write_text(text)
    return root


def base(inputs, tmp_path, data="toy"):
    return ["--data-dir", str(inputs / data), "--output", str(tmp_path / "out"), "--name", "run", "--device", "cpu",
            "--workers", "0", "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--aug", "none"]


# (id, extra train.py arguments with {inputs} for the input folder, what the message must name)
TRAIN_CASES = [
    ("unknown aug", ["--aug", "magic"], "invalid choice: 'magic'"),
    ("p above 1", ["--p", "1.5"], "--p must lie in [0, 1]"),
    ("p nan", ["--p", "nan"], "--p must lie in [0, 1]"),
    ("lr nan", ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("lr negative", ["--lr=-1"], "--lr must be a finite number > 0"),
    ("lr zero", ["--lr", "0"], "--lr must be a finite number > 0"),
    ("lr not a number", ["--lr", "fast"], "--lr: invalid float value: 'fast'"),
    ("weight decay negative", ["--weight-decay=-1"], "--weight-decay must be a finite number >= 0"),
    ("warm-up negative", ["--warmup-epochs=-1"], "--warmup-epochs must be a finite number >= 0"),
    ("warm-up past the run", ["--warmup-epochs", "5"], "--warmup-epochs 5 is longer than the run"),
    ("momentum 1.5", ["--momentum", "1.5"], "--momentum must lie in [0, 1)"),
    ("smoothing 1", ["--smoothing", "1"], "--smoothing must lie in [0, 1)"),
    ("gamma inf", ["--gamma", "inf"], "--gamma must be a finite number >= 0"),
    ("gamma negative", ["--gamma=-1"], "--gamma must be a finite number >= 0"),
    ("mixup alpha negative", ["--mixup-alpha=-1"], "--mixup-alpha must be a finite number >= 0"),
    ("cutmix alpha inf", ["--cutmix-alpha", "inf"], "--cutmix-alpha must be a finite number >= 0"),
    ("mixup prob 2", ["--mixup-prob", "2"], "--mixup-prob must lie in [0, 1]"),
    ("no epochs", ["--epochs", "0"], "--epochs, --batch-size and --eval-every must be >= 1"),
    ("no batch", ["--batch-size", "0"], "--epochs, --batch-size and --eval-every must be >= 1"),
    ("eval every 0", ["--eval-every", "0"], "--epochs, --batch-size and --eval-every must be >= 1"),
    ("unknown model", ["--model", "resnet_imaginary"], "--model 'resnet_imaginary' is not a timm model"),
    ("two starting weights", ["--pretrained", "--initial-checkpoint", "{inputs}/foreign.pth"],
     "--pretrained (timm's weights) and --initial-checkpoint"),
    ("initial checkpoint missing", ["--initial-checkpoint", "{inputs}/none.pth"], "none.pth' is not a file"),
    ("initial checkpoint cut", ["--initial-checkpoint", "{inputs}/truncated.pth"], "cannot be read as weights"),
    ("initial checkpoint text", ["--initial-checkpoint", "{inputs}/notes.txt"], "cannot be read as weights"),
    ("initial checkpoint of another model", ["--initial-checkpoint", "{inputs}/unfitting.pth"],
     "none of its 1 tensors fits --model resnet18"),
    ("resume missing", ["--resume", "{inputs}/none.pth"], "--resume '"),
    ("resume cut", ["--resume", "{inputs}/truncated.pth"], "is not a readable torch checkpoint"),
    ("resume text", ["--resume", "{inputs}/notes.txt"], "is not a readable torch checkpoint"),
    ("resume foreign", ["--resume", "{inputs}/foreign.pth"], "is no train.py checkpoint: it lacks ['model'"),
    ("resume finished", ["--resume", "{inputs}/finished.pth"], "has trained 6 epochs already, and --epochs is 1"),
    ("resume another model", ["--epochs", "3", "--resume", "{inputs}/other_model.pth"],
     "holds the weights of another model (it was trained with --model vit"),
    ("name absolute", ["--name", "/tmp/elsewhere"], "--name '/tmp/elsewhere' is not a plain folder name"),
    ("name climbing", ["--name", "../up"], "--name '../up' is not a plain folder name"),
    ("output a file", ["--output", "{inputs}/notes.txt"], "notes.txt' is a file; pass a folder"),
    ("data folder missing", ["--data-dir", "{inputs}/nothing"], "--data-dir '"),
    ("unknown dataset kind", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ("no shots", ["--shots", "0"], "--shots must be >= 1"),
    ("shots beyond the data", ["--shots", "1000"], "--shots 1000 keeps every training image"),
    ("imbalance below 1", ["--imbalance-factor", "0.5"], "--imbalance-factor must be >= 1"),
    ("two subsets", ["--shots", "2", "--imbalance-factor", "10"], "--shots and --imbalance-factor"),
    ("all of it validation", ["--val-fraction", "1"], "--val-fraction must lie in [0, 1)"),
    ("negative data seed", ["--data-seed=-1"], "--data-seed must be >= 0"),
    ("class names missing", ["--class-names", "{inputs}/none.txt"], "--class-names '"),
    ("class names miscounted", ["--class-names", "{inputs}/names.txt"], "lists 2 names but the data set has 3"),
    ("empty class folder", ["--data-dir", "{inputs}/empty_class"], "hold no images"),
    ("validation class not trained", ["--data-dir", "{inputs}/stray_class"], "class folders that train/ lacks"),
    ("damaged image", ["--data-dir", "{inputs}/damaged"], "1 of the 18 images in"),
    ("replay without folder", ["--aug", "replay"], "--aug replay needs --replay-dir"),
    ("replay folder missing", ["--aug", "replay", "--replay-dir", "{inputs}/nothing"], "No meta.csv in"),
    ("replay climbing out", ["--aug", "replay", "--replay-dir", "{inputs}/replay"], "points outside"),
    ("replay of other classes", ["--aug", "replay", "--replay-dir", "{inputs}/replay_of_birds"],
     "names 1 classes that are not in class_names, e.g. ['ember finch']"),
    ("generator on a GPU not here", ["--aug", "realmix", "--gen-device", "cuda:7"], "--gen-device cuda:7"),
    ("generator on no device", ["--aug", "realmix", "--gen-device", "potato"], "--gen-device 'potato'"),
    ("training on no device", ["--device", "potato"], "--device 'potato' is not a device"),
    ("generator model missing", ["--aug", "diffmix", "--gen-device", "cpu", "--gen-model", "/models/none"],
     "No model folder at '/models/none'"),
    ("generator model incomplete", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model",
                                    "{inputs}/incomplete_model"], "not a complete diffusers Stable Diffusion folder"),
    ("a U-Net scheduler on a flow generator", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model",
                                               "{inputs}/flux_model", "--gen-scheduler", "tcd"],
     "FLUX.1 generator samples with its own flow-matching Euler scheduler"),
    ("fused projections with xformers", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo",
                                         "--gen-fuse-qkv", "--gen-attention", "xformers"],
     "keep fuse_lora=True and attention='sdpa', or drop fuse_qkv"),
    ("a flow generator off its patch grid", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model",
                                             "{inputs}/flux_model", "--gen-resolution", "40"],
     "--gen-resolution must be a multiple of 16 for a FLUX.1 generator"),
    ("personalisation of other classes", ["--aug", "diffmix", "--gen-device", "cpu", "--gen-model", "demo",
                                          "--gen-finetuned", "{inputs}/tuned_on_two"], "knows 2 classes but the data set has 3"),
    ("personalisation missing", ["--aug", "diffmix", "--gen-device", "cpu", "--gen-model", "demo",
                                 "--gen-finetuned", "{inputs}/none"], "No personalised generator folder"),
    ("no sampling steps", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--gen-steps", "0"],
     "--gen-steps must be >= 1"),
    ("resolution off the VAE grid", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo",
                                     "--gen-resolution", "30"], "--gen-resolution must be a multiple of 8"),
    ("no generator batch", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo",
                            "--gen-batch-size", "0"], "--gen-batch-size must be >= 1"),
    ("strength above 1", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--strengths", "1.5"],
     "--strengths are SDEdit strengths in (0, 1]"),
    ("empty ring", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--ring-slots", "0"],
     "--ring-slots must be >= 1"),
    ("no reuse", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--max-reuse", "0"],
     "--max-reuse must be >= 1"),
    ("no budget", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--gen-budget", "0"],
     "--gen-budget must be >= 1"),
    ("a budget without a generator", ["--aug", "none", "--gen-budget", "100"], "--gen-budget caps an online"),
    ("hang timeout 0", ["--gen-hang-timeout", "0"], "--gen-hang-timeout must be > 0"),
    ("feedback every 0", ["--feedback-every", "0"], "--feedback-every must be >= 1"),
    ("policy without generator", ["--gen-policy", "confusion"], "--aug none runs none"),
    ("feedback never due", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--gen-policy",
                            "confusion", "--feedback-every", "10000"], "--feedback-every 10000 is more steps"),
    ("shot thresholds reversed", ["--shot-thresholds", "5", "20"], "--shot-thresholds MANY FEW"),
    ("cluster address malformed", ["--aug", "realmix", "--gen-cluster", "a cluster"], "is not HOST:PORT"),
    ("finetune config without folder", ["--aug", "diffmix", "--gen-device", "cpu", "--gen-finetune-config",
                                        "{inputs}/notes.txt"], "--gen-finetune-config needs --gen-finetuned"),
    ("finetune config missing", ["--aug", "diffmix", "--gen-device", "cpu", "--gen-finetuned", "{inputs}/tuned",
                                 "--gen-finetune-config", "{inputs}/none.yaml"], "none.yaml' is not a file"),
    ("inversion store missing", ["--aug", "diffinversion", "--gen-device", "cpu", "--gen-model", "demo",
                                 "--inversion", "{inputs}/none"], "{inputs}/none"),
    ("caption store missing", ["--aug", "sgid", "--gen-device", "cpu", "--gen-model", "demo", "--captions",
                               "{inputs}/none.json"], "{inputs}/none.json"),
    ("accelerator missing", ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", "demo", "--gen-accelerator",
                             "{inputs}/none.safetensors"], "No acceleration LoRA at"),
    ("config missing", ["--config", "{inputs}/none.yaml"], "--config '"),
    ("config malformed", ["--config", "{inputs}/malformed.yaml"], "malformed.yaml is not valid YAML"),
    ("config a sentence", ["--config", "{inputs}/scalar.yaml"], "scalar.yaml must map option names to values"),
    ("config unknown option", ["--config", "{inputs}/unknown.yaml"], "sets unknown options ['learning_rate']"),
    ("config optimiser unknown", ["--config", "{inputs}/rmsprop.yaml"], "rmsprop.yaml: argument --opt: invalid choice"),
    ("config precision unknown", ["--config", "{inputs}/fp8.yaml"], "fp8.yaml: argument --amp: invalid choice: 'fp8'"),
    ("config lr nan", ["--config", "{inputs}/nan.yaml"], "--lr must be a finite number > 0"),
    ("config switch not a boolean", ["--config", "{inputs}/switch.yaml"], "compile is a switch"),
    ("config list for one value", ["--config", "{inputs}/list.yaml"], "epochs takes one value"),
    ("config device as a string", ["--config", "{inputs}/gen_device.yaml", "--aug", "realmix"], "--gen-device cuda:7"),
]


def shm_names() -> set:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)}


def refusal(call, capsys) -> str:
    """What the user reads when ``call`` refuses: the exit message, or argparse's usage error."""
    with pytest.raises(SystemExit) as stopped:
        call()
    code = stopped.value.code
    if isinstance(code, str):
        return code
    assert code == 2, f"exit status {code}"
    return capsys.readouterr().err.strip().splitlines()[-1]


def assert_left_nothing(tmp_path, before_shm):
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out"), "a run folder was written"
    assert shm_names() <= before_shm, "shared memory left behind"


@pytest.mark.parametrize("extra, named", [case[1:] for case in TRAIN_CASES], ids=[case[0] for case in TRAIN_CASES])
def test_train_refuses_bad_input_before_any_work(inputs, tmp_path, capsys, monkeypatch, extra, named):
    if "cuda:7" in " ".join(extra) + named and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    before = shm_names()
    argv = base(inputs, tmp_path) + [arg.replace("{inputs}", str(inputs)) for arg in extra]
    made, makedirs = [], os.makedirs
    monkeypatch.setattr(os, "makedirs", lambda path, *a, **k: (made.append(str(path)), makedirs(path, *a, **k)))
    message = refusal(lambda: train.cli(argv), capsys)
    assert not [path for path in made if path.startswith(str(tmp_path / "out"))], "a run folder was made, then removed"
    assert named.replace("{inputs}", str(inputs)) in message, message
    assert "Traceback" not in message and len(message.strip().splitlines()) <= 1 + message.count("\n  ")
    assert_left_nothing(tmp_path, before)


def test_there_are_sixty_cases_or_more():
    assert len(TRAIN_CASES) + len(COMMAND_CASES) + len(API_CASES) >= 60


COMMAND_CASES = [
    ("misspelt command", ["finetunee"], "unknown command 'finetunee'; did you mean 'finetune'?"),
    ("finetune config missing", ["finetune", "--config", "{inputs}/none.yaml"], "--config '"),
    ("finetune the smoke-test model", ["finetune", "--model", "tiny", "--out", "{tmp}/o", "--data-dir",
                                       "{inputs}/toy"], "'tiny' is train.py's untrained smoke-test generator"),
    ("finetune a missing model", ["finetune", "--model", "/models/none", "--out", "{tmp}/o", "--data-dir",
                                  "{inputs}/toy"], "No model folder at '/models/none'"),
    ("finetune a flow model off its patch grid", ["finetune", "--model", "{inputs}/flux_model", "--out", "{tmp}/o",
                                                  "--data-dir", "{inputs}/toy", "--resolution", "40"],
     "--resolution must be a multiple of 16 for a FLUX.1 model"),
    ("invert a flow model", ["invert", "--model", "{inputs}/flux_model", "--out", "{tmp}/o", "--data-dir",
                             "{inputs}/toy"], "is a FLUX.1 model; this command takes Stable Diffusion models only"),
    ("finetune descriptions malformed", ["finetune", "--model", "demo", "--out", "{tmp}/o", "--data-dir",
                                         "{inputs}/toy", "--class-descriptions", "{inputs}/descriptions.json",
                                         "--steps", "1"], "descriptions.json' is not valid JSON"),
    ("invert no vectors", ["invert", "--model", "demo", "--out", "{tmp}/o", "--data-dir", "{inputs}/toy",
                           "--vectors", "0"], "--vectors must lie in [1, 77]"),
    ("invert a missing model", ["invert", "--model", "/models/none", "--out", "{tmp}/o", "--data-dir",
                                "{inputs}/toy"], "No model folder at '/models/none'"),
    ("caption top-p 2", ["caption", "--out", "{tmp}/o.json", "--data-dir", "{inputs}/toy", "--top-p", "2"],
     "--top-p must lie in (0, 1]"),
]


@pytest.mark.parametrize("argv, named", [case[1:] for case in COMMAND_CASES], ids=[case[0] for case in COMMAND_CASES])
def test_commands_refuse_bad_input_before_any_work(inputs, tmp_path, capsys, argv, named):
    before = shm_names()
    argv = [arg.replace("{inputs}", str(inputs)).replace("{tmp}", str(tmp_path / "out")) for arg in argv]
    message = refusal(lambda: onlinemix(argv), capsys)
    assert named in message, message
    assert_left_nothing(tmp_path, before)


def ring_consumer_nine():
    from onlinemix.ring import SampleRing

    with SampleRing.create(2, 4, producers=1, consumers=1) as ring:
        SampleRing.attach(ring.name, "consumer", 9)


def ring_take_negative():
    from onlinemix.ring import SampleRing

    with SampleRing.create(2, 4, producers=1, consumers=1) as ring:
        ring.take(-1)


def label(strength, gamma):
    from onlinemix.labels import translation_label

    translation_label(torch.tensor([0]), torch.tensor([1]), torch.tensor([strength]), gamma, 2)


def diffmix(**options):
    from onlinemix import DiffMix

    DiffMix(num_classes=3, **options)


API_CASES = [
    ("gamma inf", lambda: diffmix(gamma=float("inf")), "gamma must be a finite number >= 0"),
    ("p 2", lambda: diffmix(p=2.0), "p is a probability"),
    ("strength 2", lambda: label(2.0, 0.5), "strength must lie in [0, 1]"),
    ("strength nan", lambda: label(float("nan"), 0.5), "strength must lie in [0, 1]"),
    ("label gamma negative", lambda: label(0.5, -1.0), "gamma must be a finite number >= 0"),
    ("take a negative count", ring_take_negative, "take() needs a count n >= 0"),
    ("attach consumer 9 of 1", ring_consumer_nine, "consumer index must be in [0, 1)"),
]


@pytest.mark.parametrize("call, named", [case[1:] for case in API_CASES], ids=[case[0] for case in API_CASES])
def test_the_python_api_refuses_bad_input_at_once(call, named):
    before = shm_names()
    with pytest.raises(ValueError) as refused:
        call()
    assert named in str(refused.value)
    assert shm_names() <= before


def test_a_yaml_string_for_a_list_option_is_one_item(inputs, tmp_path, monkeypatch):
    (tmp_path / "cpu.yaml").write_text(f"gen_device: cpu\ndata_dir: {inputs / 'toy'}\nopt: adamw\nlr: 1e-3\n")
    args = train.parse_args(["--config", str(tmp_path / "cpu.yaml"), "--device", "cpu", "--aug", "none"])
    assert args.gen_device == ["cpu"] and args.opt == "adamw" and args.lr == pytest.approx(1e-3)
    flags = train.parse_args(["--config", str(tmp_path / "cpu.yaml"), "--device", "cpu", "--aug", "none",
                              "--lr", "0.5", "--gen-device", "cuda:0", "cpu"])
    assert flags.lr == 0.5 and flags.gen_device == ["cuda:0", "cpu"], "flags override the file"


def test_a_generator_that_fails_its_warm_up_stops_the_run_and_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    """A generator whose workers all fail (here: a model folder that breaks when loaded) stops the run with
    the workers' error instead of training without synthetic samples."""
    from onlinemix import pool
    from onlinemix.generator.tiny import tiny_components

    broken = tmp_path / "broken_model"
    tiny_components().save(str(broken))
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not weights")

    class QuickToGiveUp(pool.GeneratorPool):  # 2 tries, not 6 with back-off: the same rule, sooner
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "max_restarts": 1, "backoff": 0.1})

    monkeypatch.setattr(pool, "GeneratorPool", QuickToGiveUp)
    before = shm_names()
    argv = base(inputs, tmp_path) + ["--aug", "realmix", "--gen-device", "cpu", "--gen-model", str(broken),
                                     "--gen-resolution", "32", "--gen-steps", "2", "--gen-dtype", "float32",
                                     "--gen-warmup", "240"]
    message = refusal(lambda: train.cli(argv), capsys)
    assert "the generator delivered no sample during its warm-up and its workers failed" in message, message
    assert_left_nothing(tmp_path, before)
