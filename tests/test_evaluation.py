"""The held-out evaluation loss: never trained on, equal to an independent computation; its best checkpoint kept."""

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import wuerstchen_args

from difftune import data
from difftune.storage import checkpoints
from difftune.train import evaluation, loop

REAL_GETITEM = data.CaptionedImageDataset.__getitem__


class ReadSpy:
    """Record which samples training and the held-out loss read (`indices["train" | "eval"]`), and how many
    images each decodes (`opened`): wraps the data set's __getitem__, open_image and the loss."""

    def __init__(self, monkeypatch) -> None:
        self.indices, self.opened, self.phase = {"train": [], "eval": []}, {"train": 0, "eval": 0}, "train"
        self.dataset = None
        real_loss, real_open = loop.evaluation_loss, data.dataset.open_image

        def getitem(dataset, index):
            self.dataset = dataset
            self.indices[self.phase].append(index)
            return REAL_GETITEM(dataset, index)

        def held_out_loss(*args, **kwargs):
            self.phase = "eval"
            try:
                return real_loss(*args, **kwargs)
            finally:
                self.phase = "train"

        def open_image(record, covering=None):
            self.opened[self.phase] += 1
            return real_open(record, covering)

        monkeypatch.setattr(data.CaptionedImageDataset, "__getitem__", getitem)
        monkeypatch.setattr(loop, "evaluation_loss", held_out_loss)
        monkeypatch.setattr(data.dataset, "open_image", open_image)  # where the data set reads it

    def path(self, index: int) -> Path:
        return Path(self.dataset.rows[index]["image"]["path"])


def independent_eval_loss(assets: Path, checkpoint: Path | None, samples: list[dict]) -> float:
    """The held-out loss of a Wuerstchen checkpoint: the prior with the peft adapter, the diffusers prior
    training convention (x0 = (EfficientNet(pixels) + 1) / 42, epsilon target), noise from
    manual_seed(seed 0 + j * 4 + k) at timestep fractions (k + 0.5) / 4 for the j-th held-out sample.
    Without a checkpoint: the base prior's loss."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from peft import PeftModel
    from transformers import CLIPTextModel

    from difftune.models import wuerstchen

    base = assets / "wuerstchen-prior"
    prior = WuerstchenPrior.from_pretrained(base, subfolder="prior")
    if checkpoint is not None:
        prior = PeftModel.from_pretrained(prior, checkpoint / "prior")
    prior.eval()
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    scheduler = DDPMWuerstchenScheduler.from_pretrained(base, subfolder="scheduler")
    encoder = wuerstchen.load_image_encoder(str(assets / "effnet" / "effnet.safetensors")).eval()
    losses = []
    with torch.no_grad():
        for j, sample in enumerate(samples):
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
    return sum(losses) / len(losses)


def test_held_out_loss_never_leaks_and_equals_a_peft_computation(assets, tmp_path, run_main, monkeypatch):
    reads = ReadSpy(monkeypatch)
    out = tmp_path / "out"
    argv = wuerstchen_args(
        assets, out, "--validation_split", "0.2", "--checkpoints_total_limit", "1", "--lr_scheduler", "constant",
        steps=6, lr="3e-2", checkpointing_steps=2,
    )  # fmt: skip
    assert run_main("train_wuerstchen_lora", argv) == 0

    # 20 images: 4 held out and evaluated, never trained on; 12 of the other 16 trained on in 6 steps of 2.
    held_out = sorted(set(reads.indices["eval"]))
    assert len(held_out) == 4 and not set(reads.indices["train"]) & set(held_out)
    assert len(set(reads.indices["train"])) == 12

    # Every checkpoint records its loss, and the model card lists it.
    states = {
        step: checkpoints.read_json(path / checkpoints.STATE_FILE) for step, path in checkpoints.list_checkpoints(out)
    }
    assert 6 in states and all("eval_loss" in state for state in states.values())
    card = (out / "README.md").read_text()
    assert f"| step6 | {states[6]['eval_loss']:.6f} |" in card

    # The loss of step6 computed independently, on the held-out samples as the data set reads them in epoch 0.
    dataset = reads.dataset
    dataset.set_epoch(0)
    samples = [REAL_GETITEM(dataset, index) for index in held_out]
    expected = independent_eval_loss(assets, out / "step6", samples)
    assert abs(states[6]["eval_loss"] - expected) <= 1e-5 * max(1.0, expected)
    # The trained adapter mattered: the base prior's loss is another number.
    assert abs(independent_eval_loss(assets, None, samples) - expected) > 1e-4 * expected


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


def split_image_folder(source: Path, root: Path, held: int) -> tuple[Path, Path]:
    """Copy an image folder into a training folder and a held-out folder of its last `held` images."""
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    folders = (root / "train", root / "held_out")
    for folder, part in zip(folders, (rows[:-held], rows[-held:]), strict=True):
        folder.mkdir()
        for row in part:
            shutil.copy(source / row["file_name"], folder / row["file_name"])
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    return folders


def test_eval_data_dir_is_held_out_cached_and_equals_a_peft_computation(assets, tmp_path, run_main, monkeypatch):
    train_dir, eval_dir = split_image_folder(assets / "data", tmp_path, held=3)
    reads = ReadSpy(monkeypatch)
    out = tmp_path / "out"
    argv = wuerstchen_args(
        assets, out, "--eval_data_dir", eval_dir, "--center_crop", "--cache_image_embeddings",
        "--cache_text_embeddings", "--cache_dir", tmp_path / "cache", steps=2, lr="3e-2",
    )  # fmt: skip
    argv[argv.index("--train_data_dir") + 1] = train_dir
    assert run_main("train_wuerstchen_lora", argv) == 0

    # Evaluated on exactly the folder's images, read from the caches; trained only on the training folder.
    paths = {phase: [reads.path(i) for i in indices] for phase, indices in reads.indices.items()}
    assert {p.parent for p in paths["train"]} == {train_dir} and len(paths["train"]) == 4
    assert sorted({p.name for p in paths["eval"]}) == sorted(p.name for p in eval_dir.glob("*.png"))
    assert {p.parent for p in paths["eval"]} == {eval_dir} and reads.opened["eval"] == 0

    state = checkpoints.read_json(out / "step2" / checkpoints.STATE_FILE)
    dataset = reads.dataset
    held_out = [i for i in range(len(dataset)) if reads.path(i).parent == eval_dir]
    samples = [{**dataset.load(index, flip=False), **dataset.tokenize(dataset.caption(index))} for index in held_out]
    expected = independent_eval_loss(assets, out / "step2", samples)
    assert abs(state["eval_loss"] - expected) <= 1e-5 * max(1.0, expected)


def test_held_out_flags_refuse_what_cannot_work(assets, tmp_path, run_main, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(assets / "data" / "000_black_circle.png", one)
    (one / "metadata.jsonl").write_text(json.dumps({"file_name": "000_black_circle.png", "text": "a circle"}) + "\n")
    cases = [
        (("--validation_split", "0.5"), one, "cannot hold out part of 1 sample"),
        (("--validation_split", "0.2", "--eval_data_dir", one), assets / "data", "pass one of them"),
        (("--eval_data_dir", tmp_path / "missing"), assets / "data", "--eval_data_dir"),
    ]
    for extra, train_dir, message in cases:
        argv = wuerstchen_args(assets, tmp_path / "out", *extra, steps=1)
        argv[argv.index("--train_data_dir") + 1] = train_dir
        assert run_main("train_wuerstchen_lora", argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), err
