"""Resume must not lie: the checkpoint's seed, changed flags, the optimizer across process counts, the epoch's tail."""

import json

import pytest
import torch
from conftest import load_script, reset_accelerate
from helpers import adapter_weights, max_difference, one_line_error, resumed_copy, sdxl_args

from difftune.cli.errors import UserError
from difftune.storage import checkpoints, runlock
from difftune.train import loop
from difftune.train.updates import OptimizerLayout, flatten_param_groups

# 20 images, batch 2, accumulation 3: 10 batches, so every epoch ends with a step of one micro-batch.
TAIL = ("--gradient_accumulation_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--random_flip")


def seedless(argv: list[str]) -> list[str]:
    i = argv.index("--seed")
    return argv[:i] + argv[i + 2 :]


@pytest.fixture(scope="module")
def seedless_run(assets, tmp_path_factory):
    """A run without --seed, 6 steps (an epoch is 4: 3 full steps and one of a single micro-batch), checkpoints
    at 3 and 6, recording which samples each epoch's batches held."""
    from conftest import run_script

    out = tmp_path_factory.mktemp("seedless") / "run"
    seen: dict[int, list[int]] = {}
    real_iter = loop.EpochBatchSampler.__iter__

    def recording_iter(sampler):
        for batch in real_iter(sampler):
            seen.setdefault(sampler.epoch, []).extend(batch)
            yield batch

    loop.EpochBatchSampler.__iter__ = recording_iter
    try:
        assert (
            run_script(
                "train_sdxl_lokr", seedless(sdxl_args(assets, out, *TAIL, "--checkpointing_steps", "3", steps=6))
            )
            == 0
        )
    finally:
        loop.EpochBatchSampler.__iter__ = real_iter
    return out, seen


def test_every_image_trains_once_per_epoch_with_a_partial_last_accumulation(seedless_run, assets):
    out, seen = seedless_run
    images = len([p for p in (assets / "data").iterdir() if p.suffix == ".png"])
    assert sorted(seen[0]) == list(range(images))  # 10 batches of 2, all used by the epoch's 4 steps
    assert len(seen[1]) == 2 * 2 * 3  # steps 5 and 6 of epoch 1: two full accumulations
    assert json.loads((out / "step6" / checkpoints.STATE_FILE).read_text())["steps_per_epoch"] == 4


def test_a_seedless_run_resumes_with_its_own_seed(seedless_run, assets, tmp_path, run_main):
    out, _ = seedless_run
    seed = json.loads((out / "step3" / checkpoints.ARGS_FILE).read_text())["seed"]
    assert isinstance(seed, int)
    resumed = tmp_path / "resumed"
    resumed_copy(out / "step3", resumed)
    argv = seedless(
        sdxl_args(assets, resumed, *TAIL, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest", steps=6)
    )
    assert run_main("train_sdxl_lokr", argv) == 0
    assert json.loads((resumed / "step6" / checkpoints.ARGS_FILE).read_text())["seed"] == seed
    # Across the epoch's single-micro-batch step 4 and the next epoch: exactly the uninterrupted run.
    assert max_difference(adapter_weights(resumed / "step6"), adapter_weights(out / "step6")) <= 1e-6
    assert max_difference(adapter_weights(out / "step3"), adapter_weights(out / "step6")) > 1e-4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--seed", "7"), "differs from the seed"),
        (("--alpha", "64"), "--alpha 8 -> 64.0"),
        (("--rank", "4", "--prediction_type", "v_prediction"), "--prediction_type None -> v_prediction, --rank 8 -> 4"),
        (("--snr_gamma", "5"), "--snr_gamma None -> 5.0"),
    ],
)
def test_flags_that_change_the_run_are_refused_on_resume(
    seedless_run, assets, tmp_path, run_main, capsys, flags, message
):
    out, _ = seedless_run
    resumed = tmp_path / "resumed"
    resumed_copy(out / "step3", resumed)
    argv = seedless(sdxl_args(assets, resumed, *TAIL, *flags, "--resume_from_checkpoint", "latest", steps=6))
    assert run_main("train_sdxl_lokr", argv) == 2
    assert message in one_line_error(capsys)
    left = sorted(p.name for p in resumed.iterdir() if p.name != runlock.RUN_LOCK)  # the lock: held, then let go
    assert left == ["step3"]  # nothing written, nothing removed


def test_a_changed_learning_rate_and_weight_decay_apply_and_are_recorded(
    seedless_run, assets, tmp_path, run_main, monkeypatch
):
    from diffusers.optimization import get_scheduler

    out, _ = seedless_run
    resumed = tmp_path / "resumed"
    resumed_copy(out / "step3", resumed)
    groups = []
    real_resume = loop.TrainingRun.resume

    def recording_resume(run):
        real_resume(run)
        groups.extend(dict(g) for g in run.update.optimizer.param_groups)

    monkeypatch.setattr(loop.TrainingRun, "resume", recording_resume)
    argv = seedless(sdxl_args(assets, resumed, *TAIL, "--resume_from_checkpoint", "latest", steps=6, lr="5e-3"))
    assert run_main("train_sdxl_lokr", [*argv, "--adam_weight_decay", "0.25"]) == 0
    # Independently: the same cosine schedule built at the new rate, 3 steps in.
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-3)
    schedule = get_scheduler("cosine", reference, num_warmup_steps=2, num_training_steps=6)
    for _ in range(3):
        reference.step()
        schedule.step()
    assert groups and groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12)
    assert groups[0]["initial_lr"] == 5e-3 and groups[0]["weight_decay"] == 0.25
    recorded = json.loads((resumed / "step6" / checkpoints.ARGS_FILE).read_text())
    assert recorded["learning_rate"] == 5e-3 and recorded["adam_weight_decay"] == 0.25


def test_overwrite_with_resume_is_refused_before_anything_is_touched(seedless_run, assets, tmp_path, run_main, capsys):
    out, _ = seedless_run
    target = tmp_path / "run"
    resumed_copy(out / "step3", target)
    for resume in ("latest", "step3"):
        argv = sdxl_args(assets, target, "--overwrite_output_dir", "--resume_from_checkpoint", resume)
        assert run_main("train_sdxl_lokr", argv) == 2
        assert "pass only one of them" in one_line_error(capsys)
    assert checkpoints.list_checkpoints(target) == [(3, target / "step3")]
    # Overwriting, then a mistake found while starting (here the data): the old run is still there.
    argv = sdxl_args(assets, target, "--overwrite_output_dir")
    argv[argv.index("--train_data_dir") + 1] = str(tmp_path / "no-such-data")
    assert run_main("train_sdxl_lokr", argv) == 2
    assert checkpoints.list_checkpoints(target) == [(3, target / "step3")]


def test_optimizer_state_moves_between_packed_and_per_parameter_layouts():
    """The packed optimizer's state, unpacked by name, equals a per-parameter optimizer's that took the same
    steps (and back): a run can change its number of processes."""
    torch.manual_seed(0)
    adapters = {"unet": torch.nn.Linear(3, 4), "text_encoder_one": torch.nn.Linear(2, 2, bias=False)}
    groups = [
        {"params": list(adapters["unet"].parameters())},
        {"params": list(adapters["text_encoder_one"].parameters()), "lr": 0.5},
    ]
    copies = {
        name: torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None) for name, m in adapters.items()
    }
    for name, model in copies.items():
        model.load_state_dict(adapters[name].state_dict())
    layout, flat_layout = OptimizerLayout.of(adapters, groups), OptimizerLayout.of(adapters, groups)
    copy_groups = [
        {"params": list(copies["unet"].parameters())},
        {"params": list(copies["text_encoder_one"].parameters()), "lr": 0.5},
    ]
    flat_layout.flat = True
    packed = torch.optim.AdamW(flatten_param_groups(groups), lr=0.1, weight_decay=0.1)
    per_parameter = torch.optim.AdamW(copy_groups, lr=0.1, weight_decay=0.1)
    for step in range(3):
        for params, optimizer in ((adapters, packed), (copies, per_parameter)):
            optimizer.zero_grad(set_to_none=False) if optimizer is packed else optimizer.zero_grad()
            x = torch.linspace(-1, 1, 6).view(2, 3) * (step + 1)
            (params["unet"](x).pow(2).sum() + params["text_encoder_one"](x[:, :2]).sum()).backward()
            optimizer.step()
    expected = per_parameter.state_dict()
    converted = layout.pack(flat_layout.unpack(packed.state_dict()))
    assert converted["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.allclose(converted["state"][index][key], value, rtol=1e-6, atol=1e-9), (index, key)
    assert set(converted["state"]) == set(expected["state"])
    # and back: the per-parameter state packed equals the packed optimizer's own
    repacked = flat_layout.pack(layout.unpack(expected))
    for index, state in packed.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.allclose(repacked["state"][index][key], value, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("train_sdxl_lokr", ["--checkpoints", "3"]),
        ("train_sdxl_lokr", ["--noise", "0.1"]),
        ("train_wuerstchen_lora", ["--dataset_conf", "x"]),
        ("infer", ["--prompts", "x", "--checkpoint", "c"]),
        ("export", ["--form", "kohya", "--checkpoint", "c", "--out", "o"]),
    ],
)
def test_abbreviated_flags_are_refused(script, argv):
    reset_accelerate()
    with pytest.raises(UserError, match=f"unrecognized arguments: {argv[0]}"):
        load_script(script).parse_args(argv)


def test_text_encoder_lr_without_text_encoder_training_warns(assets, tmp_path, run_main, caplog):
    with caplog.at_level("WARNING"):
        assert (
            run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "out", "--text_encoder_lr", "1e-5", steps=1)) == 0
        )
    assert any("--text_encoder_lr is unused without --train_text_encoder" in r.message for r in caplog.records)


def test_a_data_folder_that_fails_to_load_is_not_blamed_on_the_hub(assets, tmp_path, run_main, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text("{not json\n")
    (data / "a.png").write_bytes((assets / "data" / "000_black_circle.png").read_bytes())
    argv = sdxl_args(assets, tmp_path / "out")
    argv[argv.index("--train_data_dir") + 1] = str(data)
    assert run_main("train_sdxl_lokr", argv) == 2
    line = one_line_error(capsys)
    assert "--train_data_dir" in line and "Hub" not in line and "offline" not in line


def test_a_pipeline_folder_as_vae_uses_its_vae(assets, tmp_path, run_main):
    argv = sdxl_args(assets, tmp_path / "out", steps=1)
    argv[argv.index("--pretrained_vae_model_name_or_path") + 1] = str(assets / "sdxl")
    assert run_main("train_sdxl_lokr", argv) == 0
    recorded = json.loads((tmp_path / "out" / "step1" / checkpoints.ARGS_FILE).read_text())
    assert recorded["pretrained_vae_model_name_or_path"] == str(assets / "sdxl" / "vae")  # infer.py loads that


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_two_processes_and_back(assets, tmp_path, run_main, caplog):
    from conftest import launch

    one = tmp_path / "one"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, one, "--train_text_encoder", steps=2)) == 0
    two = tmp_path / "two"
    resumed_copy(one / "step2", two)
    proc = launch(
        "train_sdxl_lokr",
        sdxl_args(assets, two, "--train_text_encoder", "--resume_from_checkpoint", "latest", steps=4),
        processes=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 process(es), this run has 2" in proc.stderr
    assert "start afresh" not in proc.stderr  # the optimizer state was re-packed, not dropped
    assert max_difference(adapter_weights(two / "step2"), adapter_weights(two / "step4")) > 1e-4
    back = tmp_path / "back"
    resumed_copy(two / "step4", back)
    with caplog.at_level("WARNING"):
        argv = sdxl_args(assets, back, "--train_text_encoder", "--resume_from_checkpoint", "latest", steps=6)
        assert run_main("train_sdxl_lokr", argv) == 0
    assert any("written by 2 process(es), this run has 1" in r.message for r in caplog.records)
    assert not any("start afresh" in r.message for r in caplog.records)
    assert max_difference(adapter_weights(back / "step4"), adapter_weights(back / "step6")) > 1e-4
