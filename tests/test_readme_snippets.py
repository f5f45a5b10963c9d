"""Every ```python block of README.md and docs/*.md runs as written on a checkpoint of the run it describes.

Only what a CPU test must change is changed, by plain string replacement: the Hub ids become the tiny assets'
folders, the documented checkpoint path the tiny run's, CUDA and fp16 / bf16 the CPU and fp32, and the step
counts and sizes small. A block the test cannot map fails it: map it below, or list it in CANNOT_RUN with why.
"""

import re

import pytest
from conftest import ROOT, run_script
from helpers import cascade_args, sdxl_args, wuerstchen_args

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Blocks that cannot run on the tiny models, "file:line" -> why. Keep it empty.
CANNOT_RUN: dict[str, str] = {}


def python_blocks() -> list:
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            marks = [pytest.mark.skip(reason=CANNOT_RUN[where])] if where in CANNOT_RUN else []
            blocks.append(pytest.param(match.group(1), id=where, marks=marks))
    return blocks


def train(script: str, argv: list) -> None:
    assert run_script(script, argv) == 0


# One short run per family (module-scoped: each is trained only if a block needs it).
@pytest.fixture(scope="module")
def sdxl_run(assets, tmp_path_factory):
    """As the README's pokemon run: UNet only."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    train("train_sdxl_lokr", sdxl_args(assets, out, steps=1, checkpointing_steps=1))
    return out / "step1"


@pytest.fixture(scope="module")
def sdxl_text_encoder_run(assets, tmp_path_factory):
    """With --train_text_encoder: the block's guarded text-encoder lines load both adapters."""
    out = tmp_path_factory.mktemp("sdxl_te") / "run"
    train("train_sdxl_lokr", sdxl_args(assets, out, "--train_text_encoder", steps=1, checkpointing_steps=1))
    return out / "step1"


@pytest.fixture(scope="module")
def wuerstchen_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("wuerstchen") / "run"
    train("train_wuerstchen_lora", wuerstchen_args(assets, out, steps=1, checkpointing_steps=1))
    return out / "step1"


@pytest.fixture(scope="module")
def cascade_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade") / "run"
    train("train_wuerstchen_lora", cascade_args(assets, out, steps=1, checkpointing_steps=1))
    return out / "step1"


def sdxl_swaps(assets, checkpoint) -> dict[str, str]:
    return {
        '"stabilityai/stable-diffusion-xl-base-1.0"': repr(str(assets / "sdxl")),
        '"madebyollin/sdxl-vae-fp16-fix"': repr(str(assets / "sdxl-vae-fp16-fix")),
        '"work_dirs/stable_diffusion_xl_lokr_pokemon_blip/step10000"': repr(str(checkpoint)),
        '.to("cuda")': '.to("cpu")',
        "torch.float16": "torch.float32",
        "num_inference_steps=50": "num_inference_steps=1",
    }


def wuerstchen_swaps(assets, checkpoint) -> dict[str, str]:
    return {
        '"warp-ai/wuerstchen-prior"': repr(str(assets / "wuerstchen-prior")),
        '"warp-ai/wuerstchen"': repr(str(assets / "wuerstchen")),
        '"work_dirs/wuerstchen_prior_lora_pokemon_blip/step15000"': repr(str(checkpoint)),
        '.to("cuda", torch.float16)': '.to("cpu", torch.float32)',
        "height=1024, width=1024": "height=128, width=128, num_inference_steps=2",
    }


def cascade_swaps(assets, checkpoint) -> dict[str, str]:
    return {
        '"stabilityai/stable-cascade-prior"': repr(str(assets / "stable-cascade-prior")),
        '"stabilityai/stable-cascade"': repr(str(assets / "stable-cascade")),
        '"work_dirs/stable_cascade_lora_naruto/step15000"': repr(str(checkpoint)),
        '.to("cuda", torch.bfloat16)': '.to("cpu", torch.float32)',
        "height=1024, width=1024, prior_num_inference_steps=20, num_inference_steps=10": (
            "height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2"
        ),
    }


def has_adapter(module) -> bool:
    return any(".lora_" in name or ".lokr_" in name for name, _ in module.named_parameters())


def sdxl_loaded(pipe, checkpoint) -> None:
    assert has_adapter(pipe.unet)
    trained = (checkpoint / "text_encoder_one").is_dir()
    assert has_adapter(pipe.text_encoder) == trained and has_adapter(pipe.text_encoder_2) == trained


def prior_loaded(pipe, checkpoint) -> None:
    assert has_adapter(pipe.prior_pipe.prior)


# Which run a block describes: the base model's Hub id it names -> the runs to load, its swaps, its check.
FAMILIES = {
    '"stabilityai/stable-diffusion-xl-base-1.0"': (("sdxl_run", "sdxl_text_encoder_run"), sdxl_swaps, sdxl_loaded),
    '"warp-ai/wuerstchen-prior"': (("wuerstchen_run",), wuerstchen_swaps, prior_loaded),
    '"stabilityai/stable-cascade-prior"': (("cascade_run",), cascade_swaps, prior_loaded),
}


@pytest.mark.parametrize("block", python_blocks())
def test_block_runs_as_written(block, assets, request):
    families = [family for marker, family in FAMILIES.items() if marker in block]
    assert len(families) == 1, "the block names no base model this test knows: map it in FAMILIES or CANNOT_RUN"
    runs, swaps, loaded = families[0]
    for run in runs:
        checkpoint = request.getfixturevalue(run)
        code = block
        for old, new in swaps(assets, checkpoint).items():
            assert old in code, f"{old} is no longer in the block: update the test's replacements"
            code = code.replace(old, new)
        namespace: dict = {}
        exec(compile(code, request.node.callspec.id, "exec"), namespace)
        assert namespace["image"].size[0] > 0
        loaded(namespace["pipe"], checkpoint)
