"""Options that must not change the result (gradient checkpointing) or must survive a resume (8-bit Adam)."""

import pytest
from helpers import adapter_weights, max_difference, sdxl_args, wuerstchen_args


@pytest.mark.parametrize(
    ("script", "make"), [("train_sdxl_lokr", sdxl_args), ("train_wuerstchen_lora", wuerstchen_args)]
)
def test_gradient_checkpointing_gives_the_same_weights(assets, tmp_path, run_main, script, make):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert run_main(script, make(assets, plain, "--train_text_encoder", steps=2)) == 0
    argv = make(assets, checkpointed, "--train_text_encoder", "--gradient_checkpointing", "--allow_tf32", steps=2)
    assert run_main(script, argv) == 0
    assert max_difference(adapter_weights(plain / "step2"), adapter_weights(checkpointed / "step2")) <= 1e-5


def test_8bit_adam_trains_and_resumes_exactly(assets, tmp_path, run_main):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, full, "--use_8bit_adam", steps=4)) == 0
    argv = sdxl_args(assets, resumed, "--use_8bit_adam", "--resume_from_checkpoint", full / "step2", steps=4)
    assert run_main("train_sdxl_lokr", argv) == 0
    assert max_difference(adapter_weights(full / "step4"), adapter_weights(resumed / "step4")) <= 1e-6
    assert max_difference(adapter_weights(full / "step2"), adapter_weights(full / "step4")) > 0
