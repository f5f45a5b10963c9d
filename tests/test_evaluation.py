"""The held-out evaluation loss: never trained on, equal to an independent computation; its best checkpoint kept."""

import json

import torch
import torch.nn.functional as F
from helpers import wuerstchen_args

from difftune import checkpoints, data, evaluation, training


def test_held_out_loss_never_leaks_and_equals_a_peft_computation(assets, tmp_path, run_main, monkeypatch):
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from difftune import wuerstchen

    fetched = {"train": [], "eval": []}
    phase, datasets = ["train"], []
    real_getitem, real_loss = data.CaptionedImageDataset.__getitem__, training.evaluation_loss

    def getitem(self, index):
        datasets.append(self)
        fetched[phase[0]].append(index)
        return real_getitem(self, index)

    def held_out_loss(*args, **kwargs):
        phase[0] = "eval"
        try:
            return real_loss(*args, **kwargs)
        finally:
            phase[0] = "train"

    monkeypatch.setattr(data.CaptionedImageDataset, "__getitem__", getitem)
    monkeypatch.setattr(training, "evaluation_loss", held_out_loss)
    out = tmp_path / "out"
    argv = wuerstchen_args(
        assets, out, "--validation_split", "0.2", "--checkpoints_total_limit", "1", "--lr_scheduler", "constant",
        steps=6, lr="3e-2", checkpointing_steps=2,
    )  # fmt: skip
    assert run_main("train_wuerstchen_lora", argv) == 0

    # 20 images: 4 held out and evaluated, never trained on; 12 of the other 16 trained on in 6 steps of 2.
    held_out = sorted(set(fetched["eval"]))
    assert len(held_out) == 4 and not set(fetched["train"]) & set(held_out)
    assert len(set(fetched["train"])) == 12

    # Every checkpoint records its loss, and the model card lists it.
    states = {
        step: checkpoints.read_json(path / checkpoints.STATE_FILE) for step, path in checkpoints.list_checkpoints(out)
    }
    assert 6 in states and all("eval_loss" in state for state in states.values())
    card = (out / "README.md").read_text()
    assert f"| step6 | {states[6]['eval_loss']:.6f} |" in card

    # The loss of step6 computed independently: the prior with the peft adapter, the diffusers prior
    # training convention (x0 = (EfficientNet(pixels) + 1) / 42, epsilon target), noise from
    # manual_seed(seed + j * 4 + k) at timestep fractions (k + 0.5) / 4 for the j-th held-out sample.
    base = assets / "wuerstchen-prior"
    prior = WuerstchenPrior.from_pretrained(base, subfolder="prior")
    prior = PeftModel.from_pretrained(prior, out / "step6" / "prior").eval()
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    scheduler = DDPMWuerstchenScheduler.from_pretrained(base, subfolder="scheduler")
    encoder = wuerstchen.load_image_encoder(str(assets / "effnet" / "effnet.safetensors")).eval()
    dataset = datasets[0]
    dataset.set_epoch(0)
    losses = []
    with torch.no_grad():
        for j, index in enumerate(held_out):
            sample = real_getitem(dataset, index)
            x0 = encoder(sample["pixel_values"][None]).add(1.0).div(42.0)
            text = text_encoder(
                sample["prior_input_ids"][None], attention_mask=sample["prior_attention_mask"][None]
            ).last_hidden_state
            for k in range(4):
                torch.manual_seed(0 + j * 4 + k)
                noise = torch.randn(x0.shape)
                t = torch.tensor([(k + 0.5) / 4])
                pred = prior(scheduler.add_noise(x0, noise, t), t, text)
                losses.append(F.mse_loss(pred, noise).item())
    expected = sum(losses) / len(losses)
    assert abs(states[6]["eval_loss"] - expected) <= 1e-5 * max(1.0, expected)
    assert load_file(out / "step6" / "prior" / "adapter_model.safetensors")  # the adapter was really loaded


def test_pruning_keeps_the_checkpoint_with_the_best_eval_loss(tmp_path):
    for step, loss in [(1, 0.5), (2, 0.2), (3, 0.4), (4, 0.3), (5, 0.6)]:
        path = checkpoints.checkpoint_dir(tmp_path, step)
        path.mkdir()
        (path / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": step, "eval_loss": loss}))
    checkpoints.prune(tmp_path, total_limit=2)
    assert [step for step, _ in checkpoints.list_checkpoints(tmp_path)] == [2, 4, 5]


def test_split_is_seeded_and_disjoint():
    train, held = evaluation.split_indices(21, 0.2, seed=0)
    assert sorted(train + held) == list(range(21)) and len(held) == 4
    assert evaluation.split_indices(21, 0.2, seed=0) == (train, held)
    assert evaluation.split_indices(21, 0.2, seed=1)[1] != held
    assert evaluation.split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
