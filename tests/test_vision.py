"""Vision transformers on the shared encoder: the paper's parameter counts, the model and its export, the
image data checks, the augmentation against timm's formulas, and the image job end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import CLASSES, make_image, write_dataset, write_split

from widenet_ds import WideNetForImageClassification, WideNetVisionConfig
from widenet_ds.config import ConfigError
from widenet_ds.data.augment import (
    AugmentSettings,
    EvalTransform,
    Mixup,
    TrainTransform,
    cutmix_box,
    mix_images,
    mixup_target,
)
from widenet_ds.data.images import ImageDataError, epoch_batches, load_image_folders
from widenet_ds.modeling import MoEFeedForward, image_processor_for
from widenet_ds.modeling.layers import Encoder, FeedForward

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _params(preset: str, **overrides) -> int:
    config = WideNetVisionConfig.from_preset(preset, num_labels=1000, **overrides)
    with torch.device("meta"):
        return sum(p.numel() for p in WideNetForImageClassification(config).parameters())


# --- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, paper_millions", [("vit-b16", 87), ("vit-l16", 305), ("widenet-vit-b", 29),
                                                    ("widenet-vit-l", 40), ("widenet-vit-h", 63)])
def test_presets_have_the_papers_parameter_counts(preset, paper_millions):
    assert abs(_params(preset) / 1e6 - paper_millions) / paper_millions < 0.03


def test_widenet_shares_attention_and_moe_and_vit_moe_alternates():
    widenet = WideNetForImageClassification(WideNetVisionConfig.from_preset("debug", num_labels=3))
    encoder = widenet.widenet.encoder
    assert isinstance(encoder, Encoder)  # the text models' encoder, not a copy
    assert len(encoder.attention) == 1 and len(encoder.ffn) == 1 and len(encoder.blocks) == 3
    assert isinstance(encoder.ffn[0], MoEFeedForward)
    vit_moe = WideNetVisionConfig.from_preset("debug", share_attention=False, share_ffn=False, moe_every=2)
    kinds = [type(f) for f in WideNetForImageClassification(vit_moe).widenet.encoder.ffn]
    assert kinds == [FeedForward, MoEFeedForward, FeedForward]
    with pytest.raises(ConfigError, match="moe_every 2 needs share_ffn false"):
        WideNetVisionConfig.from_preset("debug", moe_every=2)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        WideNetVisionConfig.from_preset("debug", patch_size=5)


def test_forward_routing_and_soft_target_loss():
    model = WideNetForImageClassification(WideNetVisionConfig.from_preset("debug", num_labels=3)).eval()
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 2, 1, 2])
    hard = model(images, labels=labels)
    soft = model(images, labels=torch.nn.functional.one_hot(labels, 3).float())
    assert hard.logits.shape == (4, 3)
    assert hard.expert_counts.shape == (3, 4)  # one routing call per block: 4 x 17 tokens, top-2
    assert torch.equal(hard.expert_counts.sum(-1), torch.full((3,), 4 * 17 * 2))
    torch.testing.assert_close(soft.task_loss, hard.task_loss)
    torch.testing.assert_close(hard.loss, hard.task_loss + hard.aux_loss)
    with pytest.raises(ValueError, match="image processor"):
        model(torch.randn(1, 3, 48, 48))
    mean = WideNetForImageClassification(WideNetVisionConfig.from_preset("debug", num_labels=3, pooling="mean"))
    mean.load_state_dict(model.state_dict())
    hidden = mean.eval().widenet(images)
    torch.testing.assert_close(hidden.pooler_output, hidden.last_hidden_state[:, 1:].mean(1))
    assert not torch.allclose(mean(images).logits, hard.logits)


def test_export_loads_through_auto_classes_and_the_processor_matches_evaluation(tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

    config = WideNetVisionConfig.from_preset("debug", num_labels=3)
    model = WideNetForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    image_processor_for(config).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = make_image(1, 45, np.random.default_rng(0))
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], EvalTransform(32)(image), atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "WideNetVisionModel"


# --- augmentation: timm's Mixup formulas on crafted inputs ---------------------------------------


def test_mixup_target_matches_timms_formula():
    # timm: off = s / L, on = 1 - s + off; target = lam * onehot(y) + (1 - lam) * onehot(y.flip(0))
    target = mixup_target(torch.tensor([0, 2]), num_labels=3, lam=0.7, smoothing=0.3)
    off, on = 0.1, 0.8
    expected = torch.tensor([[0.7 * on + 0.3 * off, off, 0.7 * off + 0.3 * on],
                             [0.7 * off + 0.3 * on, off, 0.7 * on + 0.3 * off]])
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(-1), torch.ones(2))


def test_mixup_and_cutmix_mix_with_the_reversed_batch():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    torch.testing.assert_close(mix_images(images, 0.25, None), 0.25 * images + 0.75 * images.flip(0))
    cut = mix_images(images, 0.0, (1, 3, 0, 2))
    assert torch.equal(cut[0, :, 1:3, 0:2], images[1, :, 1:3, 0:2])
    assert torch.equal(cut[0, :, 0, :], images[0, :, 0, :])
    box, lam = cutmix_box(10, 10, 0.75, np.random.default_rng(3))  # sides sqrt(0.25) = half, clipped at the edge
    top, bottom, left, right = box
    assert 0 <= top <= bottom <= 10 and 0 <= left <= right <= 10
    assert bottom - top <= 5 and right - left <= 5
    assert lam == pytest.approx(1 - (bottom - top) * (right - left) / 100)  # timm's correct_lam


def test_mixup_batch_parameters_follow_timm():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    off = Mixup(3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1)
    same, target = off(images, labels, np.random.default_rng(0))
    assert torch.equal(same, images)
    torch.testing.assert_close(target, mixup_target(labels, 3, 1.0, 0.1))  # smoothing without a mix
    only_mixup = Mixup(3, mixup_alpha=0.5, cutmix_alpha=0.0, label_smoothing=0.0)
    rng, replay = np.random.default_rng(7), np.random.default_rng(7)
    mixed, target = only_mixup(images, labels, rng)
    replay.random()  # the draw against prob
    lam = replay.beta(0.5, 0.5)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(target, mixup_target(labels, 3, lam, 0.0))
    with pytest.raises(ValueError, match="even"):
        only_mixup(images[:3], labels[:3], rng)


def test_mixup_matches_timm_where_it_imports():
    timm_mixup = pytest.importorskip("timm.data.mixup")
    labels = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(timm_mixup.mixup_target(labels, 3, lam=0.6, smoothing=0.2),
                               mixup_target(labels, 3, 0.6, 0.2))


def test_train_transform_is_seeded_and_normalised():
    image = make_image(0, 50, np.random.default_rng(0))
    transform = TrainTransform(32, rand_augment_ops=2, rand_augment_magnitude=15)
    first = transform(image, np.random.default_rng((1, 2, 3)))
    assert first.shape == (3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, transform(image, np.random.default_rng((1, 2, 3))))
    assert not torch.equal(first, transform(image, np.random.default_rng((1, 2, 4))))


def test_rand_augment_operations_keep_size_and_mode():
    from widenet_ds.data.augment import RAND_AUGMENT_OPS

    image = make_image(2, 24, np.random.default_rng(0))
    for name, op in RAND_AUGMENT_OPS.items():
        out = op(image, 15.0, np.random.default_rng(0))
        assert (out.size, out.mode) == (image.size, "RGB"), name
    still = RAND_AUGMENT_OPS["Rotate"](image, 0.0, np.random.default_rng(0))
    assert np.array_equal(np.asarray(still), np.asarray(image))  # magnitude 0: no change


def test_batches_do_not_depend_on_loader_workers(tmp_path):
    from widenet_ds.data.images import train_batches

    data = load_image_folders(*(write_dataset(tmp_path, 4, 1) / split for split in ("train", "val")))
    transform = TrainTransform(32)

    def first(workers, start=0):
        batches = train_batches(data, transform, 4, 0, 1, seed=3, start_batch=start, workers=workers)
        return [next(batches)["pixel_values"] for _ in range(3)]

    in_process, in_workers = first(0), first(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers))
    assert torch.equal(first(0, start=1)[0], in_process[1])  # resuming at a batch gives that batch


def test_augmentation_block_refuses_bad_values():
    with pytest.raises(ConfigError) as err:
        AugmentSettings.from_dict({"mixup_alpa": 0.2, "label_smoothing": 1.5, "crop_scale_min": -1})
    text = str(err.value)
    assert "unknown key 'mixup_alpa'" in text and "crop_scale_min must be a number >= 0" in text


# --- data checks --------------------------------------------------------------------------------


def test_epoch_batches_split_the_data_between_ranks():
    shares = [epoch_batches(50, 4, rank, 2, seed=1, epoch=0) for rank in range(2)]
    flat = [i for share in shares for batch in share for i in batch]
    assert len(shares[0]) == len(shares[1]) == 6 and len(set(flat)) == len(flat) == 48
    assert epoch_batches(50, 4, 0, 2, 1, 1) != shares[0]


def test_bad_files_are_refused_or_counted(tmp_path):
    root = write_dataset(tmp_path, train_per_class=3, val_per_class=2)
    (root / "train" / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "train" / CLASSES[1] / "notes.txt").write_text("not an image")
    truncated = root / "train" / CLASSES[2] / "cut.jpg"
    make_image(2, 64, np.random.default_rng(0)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-400])  # the header intact, the pixel data cut
    with pytest.raises(ImageDataError) as err:
        load_image_folders(root / "train", root / "val")
    assert "2 file(s) of the train split do not decode" in str(err.value) and "broken.png" in str(err.value)
    data = load_image_folders(root / "train", root / "val", skip_bad=True)
    assert data.train.skipped == {"not an image file (by extension)": 1, "does not decode": 2}
    assert len(data.train) == 9 and data.class_names == sorted(CLASSES)
    header_only = load_image_folders(root / "train", root / "val", skip_bad=True, decode=False)
    assert header_only.train.skipped["does not decode"] == 1  # the truncated JPEG passes a header check


def test_empty_class_and_mismatched_classes_are_refused_together(tmp_path):
    write_split(tmp_path / "train", 2, classes=("a", "b", "c"))
    write_split(tmp_path / "val", 2, classes=("a", "b", "d"))
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ImageDataError) as err:
        load_image_folders(tmp_path / "train", tmp_path / "val")
    text = str(err.value)
    assert "no usable image in the train split" in text and "empty" in text
    assert "only in train: ['c', 'empty']; only in validation: ['d']" in text


def test_hub_loading_reads_class_labels_and_names_a_missing_split(tmp_path):
    from widenet_ds.data.images import load_hub_images

    root = write_dataset(tmp_path / "data", train_per_class=2, val_per_class=1)
    data = load_hub_images(str(root))  # datasets' loader on a local path: the imagefolder builder
    folders = load_image_folders(root / "train", root / "val")
    assert data.class_names == folders.class_names and (len(data.train), len(data.validation)) == (6, 3)
    assert sorted(data.train.labels) == sorted(folders.train.labels)
    assert data.load_image(data.validation, 0).size == (40, 40)
    write_split(tmp_path / "only_train" / "train", 1)
    with pytest.raises(ImageDataError, match="no validation or test split"):
        load_hub_images(str(tmp_path / "only_train"))


@pytest.mark.slow
def test_the_job_refuses_bad_data_before_compute(tmp_path):
    write_split(tmp_path / "data" / "train", 2, classes=("a", "b"))
    write_split(tmp_path / "data" / "val", 2, classes=("a", "c"))
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "train_vit.py"), "--data_dir",
                             str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--max_steps", "5"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: image data" in result.stderr and "only in validation: ['c']" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# --- the job ------------------------------------------------------------------------------------


def _records(output_dir: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r and (("eval_top1" in r) == (kind == "eval"))]


@pytest.mark.slow
def test_job_learns_resumes_exactly_and_exports(tmp_path):
    from transformers import AutoModelForImageClassification

    from widenet_ds.jobs.train_vit import run

    data = write_dataset(tmp_path / "data", train_per_class=16, val_per_class=8)
    common = ["--data_dir", str(data), "--log_every", "1", "--save_every", "8", "--eval_every", "16"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(common + ["--output_dir", str(full), "--max_steps", "24"])
    evals = _records(full, "eval")
    assert [e["step"] for e in evals] == [16, 24]
    assert evals[-1]["eval_images"] == 24 and evals[-1]["eval_top1"] > 0.6  # chance is 1/3
    train = _records(full)
    assert [r["step"] for r in train] == list(range(1, 25)) and all("tokens_per_s" not in r for r in train)
    assert all(r["images_per_s"] > 0 for r in train) and train[-1]["tokens"] == 24 * 8  # images: 24 steps of 8

    # a run cut at step 8 continues as the uninterrupted one: same losses, step for step
    run(common + ["--output_dir", str(resumed), "--max_steps", "24", "--resume",
                  str(full / "checkpoints" / "step_00000008")])
    assert [r["loss"] for r in _records(resumed)] == [r["loss"] for r in _records(full)][8:]

    from widenet_ds.engine.checkpointing import export_to_folder  # what launch/export.py runs

    export_to_folder(full / "checkpoints" / "step_00000016", tmp_path / "export16")
    assert (tmp_path / "export16" / "preprocessor_config.json").is_file()
    earlier = AutoModelForImageClassification.from_pretrained(tmp_path / "export16")
    model = AutoModelForImageClassification.from_pretrained(full / "final").eval()
    assert not torch.equal(earlier.classifier.weight, model.classifier.weight)
    image = make_image(1, 40, np.random.default_rng(5))
    pixels = EvalTransform(model.config.image_size)(image)[None]
    assert model.config.id2label[int(model(pixels).logits.argmax())] == sorted(CLASSES)[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_expert_parallelism(tmp_path):
    data = write_dataset(tmp_path / "data", train_per_class=8, val_per_class=3)
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
               str(29700 + os.getpid() % 1000), str(ROOT / "launch" / "train_vit.py"), "--data_dir", str(data),
               "--output_dir", str(out), "--deepspeed_config", str(ROOT / "ds_configs" / "vit_cpu_ep2.json"),
               "--max_steps", "6", "--log_every", "1", "--save_every", "6", "--eval_every", "6"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in checkpoint.glob("layer_*_expert_*")) == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]  # every expert saved once
    assert _records(out, "eval")[-1]["eval_images"] == 9  # the ranks' shares, padding not counted
    exported = WideNetForImageClassification.from_pretrained(out / "final")
    assert exported.config.moe["ep_size"] == 1 and len(exported.widenet.encoder.ffn[0].experts.deepspeed_experts) == 4


# --- benchmark ----------------------------------------------------------------------------------


def test_bench_flops_match_published_vit_counts():
    from benchmarks.bench_vit import forward_flops

    # DeiT's table (fvcore, multiply-adds): ViT-B/16 17.6 G, ViT-L/16 61.6 G at 224 px
    for preset, published in (("vit-b16", 17.6e9), ("vit-l16", 61.6e9)):
        macs = forward_flops(WideNetVisionConfig.from_preset(preset, num_labels=1000), 1, 0) / 2
        assert abs(macs - published) / published < 0.01


@pytest.mark.slow
def test_bench_vit_runs_on_cpu(tmp_path):
    out = tmp_path / "vit.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_vit", "--smoke", "--out", str(out)], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["preset"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"widenet-vit-b", "vit-b16"}
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["widenet-vit-b"]["kept_routes_per_image"] > 0 and rows["vit-b16"]["kept_routes_per_image"] == 0


@pytest.mark.slow
def test_job_trains_from_a_datasets_source(tmp_path):
    from widenet_ds.jobs.train_vit import run

    root = write_dataset(tmp_path / "data", train_per_class=4, val_per_class=2)
    out = tmp_path / "out"
    records = run(["--dataset", str(root), "--output_dir", str(out), "--max_steps", "3", "--loader_workers", "1",
                   "--override", "pooling=\"mean\""])
    assert [r["step"] for r in records] == [3] and np.isfinite(records[0]["loss"])
    assert _records(out, "eval")[-1]["eval_images"] == 6
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["id2label"] == {str(i): name for i, name in enumerate(sorted(CLASSES))} and saved["pooling"] == "mean"


@pytest.mark.slow
def test_sigterm_saves_and_resume_auto_finishes(tmp_path):
    import signal
    import time

    data = write_dataset(tmp_path / "data", train_per_class=8, val_per_class=2)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "launch" / "train_vit.py"), "--data_dir", str(data), "--output_dir",
               str(out), "--max_steps", "100000", "--log_every", "1", "--save_every", "0", "--eval_every", "0"]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").is_file() and _records(out)):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or never logged a step"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, process.stderr.read()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    stopped = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"stopped"' in line]
    step = stopped[0]["step"]
    assert (out / "checkpoints" / f"step_{step:08d}" / "complete.json").is_file()
    assert not (out / "final").exists()  # a stopped run exports nothing

    from widenet_ds.jobs.train_vit import run

    run(["--data_dir", str(data), "--output_dir", str(out), "--max_steps", str(step + 2), "--resume", "auto",
         "--log_every", "1", "--eval_every", "0"])
    assert [r["step"] for r in _records(out)][-2:] == [step + 1, step + 2] and (out / "final").is_dir()
