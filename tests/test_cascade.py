"""Stable Cascade (Wuerstchen v3) stage C LoRA: train, resume, load with the card's snippet, export for ComfyUI."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import launch, load_script, run_script
from helpers import (
    REAL_TRAIN,
    adapter_weights,
    cascade_args,
    cascade_prior_inputs,
    max_difference,
    one_line_error,
    resumed_copy,
    wuerstchen_args,
)
from PIL import Image
from safetensors.torch import load_file
from test_export_infer import AWKWARD_PROMPT, run_card_snippets

from difftune.generate import validation
from difftune.models import cascade
from difftune.train import loop

# EMA, held-out loss, an objective option and random flips ride along: the shared machinery must work for v3.
EXTRA = ("--train_text_encoder", "--random_flip", "--use_ema", "--validation_split", "0.2", "--snr_gamma", "5")
VALIDATION = ("--validation_prompt", AWKWARD_PROMPT, "--num_validation_images", "1", "--validation_steps", "4")
VALIDATION_STEPS = 2


@pytest.fixture(scope="module")
def cascade_run(assets, tmp_path_factory):
    """One in-process run (4 steps, checkpoints at 2 and 4, validation at 4), keeping the live adapters."""
    out = tmp_path_factory.mktemp("cascade") / "run"
    captured = {}

    def spy(accelerator, args, **kwargs):
        captured.update(kwargs["adapters"])
        return REAL_TRAIN(accelerator, args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(loop, "train", spy)
    argv = cascade_args(
        assets, out, *EXTRA, *VALIDATION, "--validation_inference_steps", VALIDATION_STEPS, "--lora_alpha", "4"
    )
    try:
        assert run_script("train_wuerstchen_lora", argv) == 0
    finally:
        patch.undo()
    return out, {name: model.eval() for name, model in captured.items()}


def test_checkpoint_layout(cascade_run):
    out, _ = cascade_run
    step = out / "step4"
    for part in ("prior", "text_encoder", "ema/prior", "ema/text_encoder"):
        assert json.loads((step / part / "adapter_config.json").read_text())["peft_type"] == "LORA", part
    assert not (step / "pytorch_lora_weights.safetensors").exists()  # diffusers has no Stable Cascade LoRA format
    assert json.loads((step / "args.json").read_text())["prior_class"] == "StableCascadeUNet"
    assert Image.open(out / "validation" / "step000004_prompt0_0.png").size == (128, 128)


CPU_SWAPS = {
    '.to("cuda", torch.bfloat16)': '.to("cpu", torch.float32)',
    "height=1024, width=1024, prior_num_inference_steps=20, num_inference_steps=10": (
        f"height=128, width=128, prior_num_inference_steps=20, num_inference_steps={VALIDATION_STEPS}, "
        "generator=torch.Generator().manual_seed(0)"
    ),
}


def test_card_snippet_loads_the_trained_adapters(cascade_run, assets):
    """The card's code, run as written: its prior and text encoder equal the trained ones, which differ from
    the base; and its pipeline redraws the validation image (which the base pipeline does not)."""
    out, captured = cascade_run
    script = load_script("train_wuerstchen_lora")
    args = script.parse_args([str(a) for a in cascade_args(assets, out, *EXTRA, *VALIDATION)])
    card = script.write_card(args, out / "step4").read_text()
    (namespace,) = run_card_snippets(card, AWKWARD_PROMPT, CPU_SWAPS)
    pipe = namespace["pipe"]

    base = cascade.CASCADE.load_prior(str(assets / "stable-cascade-prior"), "prior", None, None)
    inputs = cascade_prior_inputs(base.prior)
    ids = base.tokenizer(AWKWARD_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = captured["prior"](**inputs).sample
        assert torch.allclose(pipe.prior_pipe.prior(**inputs).sample, expected, atol=1e-6, rtol=0)
        assert (base.prior(**inputs).sample - expected).abs().max() > 1e-4  # training changed the prior
        text = captured["text_encoder"](ids).text_embeds
        assert torch.allclose(pipe.prior_pipe.text_encoder(ids).text_embeds, text, atol=1e-6, rtol=0)
        assert (base.text_encoder(ids).text_embeds - text).abs().max() > 1e-5

    def image(pipeline) -> np.ndarray:
        kwargs = cascade.CASCADE.sampling_kwargs(VALIDATION_STEPS)
        got = validation.generate(
            pipeline, [AWKWARD_PROMPT], 1, 0, torch.device("cpu"), height=128, width=128, **kwargs
        )
        return np.asarray(got[AWKWARD_PROMPT][0], dtype=np.int16)

    saved = np.asarray(Image.open(out / "validation" / "step000004_prompt0_0.png"), dtype=np.int16)
    assert np.abs(image(pipe) - saved).max() <= 1  # same seed, same adapters: the validation picture
    decoder = cascade.CASCADE.load_decoder(str(assets / "stable-cascade"), "decoder", None, None)
    base_pipe = cascade.CASCADE.build_pipeline(base, decoder)
    assert np.abs(image(base_pipe) - saved).max() > 0, "the validation image is the base model's"


def test_resume_equals_uninterrupted_run(cascade_run, assets, tmp_path, run_main):
    out, _ = cascade_run
    resumed = tmp_path / "resumed"
    resumed_copy(out / "step2", resumed)
    argv = cascade_args(assets, resumed, *EXTRA, "--lora_alpha", "4", "--resume_from_checkpoint", "latest")
    assert run_main("train_wuerstchen_lora", argv) == 0
    for sub in ("", "ema"):
        reference = adapter_weights(out / "step4" / sub)
        assert max_difference(adapter_weights(resumed / "step4" / sub), reference) <= 1e-6, sub
    assert max_difference(adapter_weights(out / "step2"), adapter_weights(out / "step4")) > 1e-5  # they moved


def test_lite_prior_trains_and_loads(assets, tmp_path, run_main):
    from diffusers import StableCascadeUNet
    from peft import PeftModel

    out = tmp_path / "lite"
    argv = cascade_args(
        assets, out, "--prior_subfolder", "prior_lite", "--decoder_subfolder", "decoder_lite",
        "--validation_prompt", "a red circle", "--num_validation_images", "1", "--validation_steps", "2",
        "--validation_inference_steps", "1", steps=2,
    )  # fmt: skip
    assert run_main("train_wuerstchen_lora", argv) == 0
    assert (out / "validation" / "step000002_prompt0_0.png").is_file()
    lite = StableCascadeUNet.from_pretrained(assets / "stable-cascade-prior", subfolder="prior_lite")
    inputs = cascade_prior_inputs(lite)
    with torch.no_grad():
        before = lite(**inputs).sample
        after = PeftModel.from_pretrained(lite, out / "step2" / "prior")(**inputs).sample
    assert (after - before).abs().max() > 0
    assert "subfolder='prior_lite'" in (out / "README.md").read_text()


# ComfyUI's stage C LoRA names (comfy/lora.py: "lora_prior_unet_" + the stage C module path with "_" for ".";
# comfy/ldm/cascade: attention is <block>.attention.attn.{to_q,to_k,to_v,out_proj}), for the tiny prior's six
# attention blocks, and CLIP-G's ("lora_prior_te_text_model_encoder_layers_<i>_<part>") for its two layers.
COMFYUI_PRIOR = {
    "lora_prior_unet_" + f"{block}.attention.attn.{part}".replace(".", "_"): f"{block}.attention.{module}"
    for block in (
        "down_blocks.0.2", "down_blocks.1.2", "down_blocks.1.5", "up_blocks.0.2", "up_blocks.0.5", "up_blocks.1.2"
    )
    for part, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("out_proj", "to_out.0"))
}  # fmt: skip
COMFYUI_TE = {
    f"lora_prior_te_text_model_encoder_layers_{layer}_self_attn_{part}":
        f"text_model.encoder.layers.{layer}.self_attn.{part}"
    for layer in (0, 1)
    for part in ("q_proj", "k_proj", "v_proj", "out_proj")
}  # fmt: skip


def comfyui_merge(weight: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """ComfyUI's LoRA patch at strength 1: W + alpha / rank * up @ down (rank = down's rows)."""
    down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
    return weight + state[f"{name}.alpha"].item() / down.shape[0] * (up @ down)


def test_comfyui_export_names_and_numbers(cascade_run, assets, tmp_path, run_main):
    from peft import PeftModel

    out, _ = cascade_run
    path = tmp_path / "lora.safetensors"
    argv = ["--checkpoint", out / "step4", "--format", "comfyui", "--out", path]
    assert run_main("export", argv) == 0
    state = load_file(path)
    expected = {
        f"{name}.{t}" for name in [*COMFYUI_PRIOR, *COMFYUI_TE] for t in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(state) == expected
    assert all(state[k].item() == 4.0 for k in state if k.endswith(".alpha"))

    base = cascade.CASCADE.load_prior(str(assets / "stable-cascade-prior"), "prior", None, None)
    fresh = cascade.CASCADE.load_prior(str(assets / "stable-cascade-prior"), "prior", None, None)
    merged_prior = PeftModel.from_pretrained(fresh.prior, out / "step4" / "prior").merge_and_unload()
    merged_te = PeftModel.from_pretrained(fresh.text_encoder, out / "step4" / "text_encoder").merge_and_unload()
    largest = 0.0
    for models, names in (((base.prior, merged_prior), COMFYUI_PRIOR), ((base.text_encoder, merged_te), COMFYUI_TE)):
        for name, module in names.items():
            original, merged = (model.get_submodule(module).weight.detach() for model in models)
            assert (comfyui_merge(original, state, name) - merged).abs().max() <= 1e-6, name
            largest = max(largest, (merged - original).abs().max().item())
    assert largest > 1e-5  # the adapters do something


def test_comfyui_refuses_wuerstchen_v2(cascade_run, assets, tmp_path, run_main, capsys):
    out, _ = cascade_run
    v2 = tmp_path / "v2"
    assert run_main("train_wuerstchen_lora", wuerstchen_args(assets, v2, steps=1, checkpointing_steps=1)) == 0
    argv = ["--checkpoint", v2 / "step1", "--format", "comfyui", "--out", tmp_path / "x.safetensors"]
    assert run_main("export", argv) == 2
    assert "ComfyUI has no Wuerstchen v2" in one_line_error(capsys)
    argv = ["--checkpoint", out / "step4", "--format", "diffusers", "--out", tmp_path / "y.safetensors"]
    assert run_main("export", argv) == 2
    assert "exports as --format comfyui" in one_line_error(capsys)


def neither_prior(assets, tmp_path):
    """A prior repo whose prior/ holds an SDXL UNet."""
    repo = tmp_path / "neither"
    (repo / "prior").mkdir(parents=True)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePriorPipeline"}))
    shutil.copy(assets / "sdxl" / "unet" / "config.json", repo / "prior" / "config.json")
    return repo


def mixed_decoder(assets, tmp_path, index_from: str, decoder_from: str):
    """A decoder repo whose model_index.json is `index_from`'s but whose decoder/ config is `decoder_from`'s
    (config files only: the check must not need weights)."""
    repo = tmp_path / "mixed"
    (repo / "decoder").mkdir(parents=True)
    shutil.copy(assets / index_from / "model_index.json", repo / "model_index.json")
    shutil.copy(assets / decoder_from / "decoder" / "config.json", repo / "decoder" / "config.json")
    return repo


@pytest.mark.parametrize(
    ("generation", "flag", "value", "message"),
    [
        ("v3", "--pretrained_prior_model_name_or_path", "NEITHER",
         "neither a Wuerstchen v2 prior (WuerstchenPrior) nor"),
        ("v3", "--pretrained_decoder_model_name_or_path", "wuerstchen",
         "is a WuerstchenDecoderPipeline pipeline, but the prior is a Stable Cascade prior"),
        ("v2", "--pretrained_decoder_model_name_or_path", "stable-cascade",
         "is a StableCascadeDecoderPipeline pipeline, but the prior is a Wuerstchen v2 prior"),
        ("v3", "--pretrained_decoder_model_name_or_path", "MIXED",
         "decoder/ holds a WuerstchenDiffNeXt, not a Stable Cascade decoder (StableCascadeUNet)"),
        ("v2", "--pretrained_decoder_model_name_or_path", "MIXED",
         "decoder/ holds a StableCascadeUNet, not a Wuerstchen v2 decoder (WuerstchenDiffNeXt)"),
        ("v3", "--decoder_subfolder", "decoder_big", "has no decoder_big/config.json"),
        ("v3", "--image_encoder_path", "stable-cascade/missing.safetensors", "does not exist"),
        ("v3", "--image_encoder_path", "effnet/effnet.safetensors", "not an EfficientNetV2-S Stable Cascade image"),
        ("v3", "--prior_subfolder", "prior_big", "has no prior_big/config.json"),
    ],
)  # fmt: skip
def test_bad_input(assets, tmp_path, run_main, capsys, generation, flag, value, message):
    argv = (cascade_args if generation == "v3" else wuerstchen_args)(assets, tmp_path / "out")
    value = neither_prior(assets, tmp_path) if value == "NEITHER" else value
    if value == "MIXED":  # the model index of the prior's generation, the decoder config of the other
        own, other = ("stable-cascade", "wuerstchen") if generation == "v3" else ("wuerstchen", "stable-cascade")
        value = mixed_decoder(assets, tmp_path, own, other)
    value = value if flag.endswith("subfolder") else assets / value
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
    else:
        argv += [flag, str(value)]
    assert run_main("train_wuerstchen_lora", argv) == 2
    assert message in one_line_error(capsys)


def test_the_decoder_is_needed_only_for_validation(assets, tmp_path, run_main, capsys):
    """Without the decoder flag the default is a Hub repo, unreachable offline: training without validation
    prompts must not touch it, and with them must refuse at start, before any model loads."""
    argv = cascade_args(assets, tmp_path / "out", steps=1, checkpointing_steps=1)
    at = argv.index("--pretrained_decoder_model_name_or_path")
    del argv[at : at + 2]
    assert run_main("train_wuerstchen_lora", [*argv, "--validation_prompt", "a cat"]) == 2
    expected = "--pretrained_decoder_model_name_or_path stabilityai/stable-cascade is not a local directory"
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    assert run_main("train_wuerstchen_lora", argv) == 0
    assert (tmp_path / "out" / "step1" / "prior" / "adapter_model.safetensors").is_file()


def test_infer_generates_with_the_adapters(cascade_run, tmp_path, run_main, capsys):
    out, _ = cascade_run
    argv = ["--checkpoint", out / "step4", "--prompt", "x", "--num_inference_steps", "1", "--output_dir", tmp_path]
    assert run_main("infer", [*argv, "--compare_base"]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    adapted, base = (
        np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("00_x_00.png", "00_x_00_base.png")
    )
    assert adapted.shape == (128, 128, 3) and np.abs(adapted - base).max() > 0


def test_training_conditions_the_prior_as_the_pipeline_does(assets):
    """The text conditioning a step trains with is what StableCascadePriorPipeline feeds the prior."""
    from diffusers import StableCascadePriorPipeline

    from difftune import data

    parts = cascade.CASCADE.load_prior(str(assets / "stable-cascade-prior"), "prior", None, None)
    pipe = StableCascadePriorPipeline(
        tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, prior=parts.prior, scheduler=parts.scheduler
    )
    prompt = "a red circle on a blue background"
    tokens = data.Tokenize({"prior": parts.tokenizer}, attention_mask=True)(prompt)
    with torch.no_grad():
        text, pooled, *_ = pipe.encode_prompt(torch.device("cpu"), 1, 1, False, prompt=prompt)
        trained = cascade.CASCADE.encode_text({k: v[None] for k, v in tokens.items()}, parts.text_encoder)
    assert torch.equal(trained["prompt_embeds"], text) and torch.equal(trained["pooled_prompt_embeds"], pooled)


@pytest.mark.slow
def test_two_process_ddp_trains(assets, tmp_path):
    """`accelerate launch` with two DDP processes (gloo on the CPU), bf16 autocast: the prior's LoRA trains."""
    out = tmp_path / "ddp"
    proc = launch(
        "train_wuerstchen_lora", cascade_args(assets, out, *EXTRA, steps=2), processes=2, mixed_precision="bf16"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = adapter_weights(out / "step2")
    ups = [v for k, v in weights.items() if k.startswith("prior/") and "lora_B" in k]
    assert ups and all(torch.isfinite(v).all() for v in weights.values())
    assert max(v.abs().max().item() for v in ups) > 0  # lora_B starts at zero: it moved


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_the_lean_lora_forward_equals_peft(assets, autocast):
    """The training path's LoRA Linear (difftune.adapters.lora) against peft's own layer on the tiny stage C: same
    output, input and adapter gradients (1e-5 relative; under bf16 autocast, as --mixed_precision runs it,
    within 3x peft's own distance from the fp32 result), same state dict; scaling 3 / 8 and dropout in play."""
    import contextlib
    import copy

    from diffusers import StableCascadeUNet
    from peft import LoraConfig, get_peft_model

    from difftune import adapters

    prior = StableCascadeUNet.from_pretrained(assets / "stable-cascade-prior", subfolder="prior")
    config = LoraConfig(
        r=8, lora_alpha=3, lora_dropout=0.3, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(prior).requires_grad_(False), config)
    lean = adapters.attach(copy.deepcopy(prior), config)
    lean.load_state_dict(peft_model.state_dict())
    assert type(lean.get_base_model().down_blocks[0][2].attention.to_q).__module__ == "difftune.adapters.lora"
    assert lean.state_dict().keys() == peft_model.state_dict().keys()

    def run(model, precision) -> list[torch.Tensor]:
        """The output, the input's gradient and the adapter's gradients of one fwd+bwd."""
        model.train()
        inputs = cascade_prior_inputs(prior)
        inputs["sample"].requires_grad_(True)
        torch.manual_seed(0)  # the same dropout draws
        with torch.autocast("cpu", dtype=precision) if precision else contextlib.nullcontext():
            out = model(**inputs, return_dict=False)[0].float()
        out.square().mean().backward()
        grads = [p.grad.clone() for _, p in sorted(model.named_parameters()) if p.requires_grad]
        model.zero_grad()
        return [out.detach(), inputs["sample"].grad, *grads]

    reference = run(peft_model, None)
    assert (reference[0] - prior(**cascade_prior_inputs(prior), return_dict=False)[0]).abs().max() > 1e-3  # LoRA acts
    if autocast is None:
        for expected, got in zip(reference, run(lean, None), strict=True):
            assert (expected - got).abs().max() <= 1e-5 * expected.abs().max()
    else:  # as close to the fp32 result as peft's own layer under autocast is
        peft_errors = [(e - g).abs().max() for e, g in zip(reference, run(peft_model, autocast), strict=True)]
        lean_errors = [(e - g).abs().max() for e, g in zip(reference, run(lean, autocast), strict=True)]
        for expected, peft_error, lean_error in zip(reference, peft_errors, lean_errors, strict=True):
            assert lean_error <= 3 * peft_error + 1e-3 * expected.abs().max()  # seen: up to 1.8x


def test_comfyui_names_of_every_text_encoder_module_kind():
    """ComfyUI's CLIP-G keys for a stage C LoRA (comfy/lora.py): `lora_prior_te_text_model_encoder_layers_<b>_`
    + the layer's part for the attention and MLP layers, and `lora_prior_te_text_projection` for the projection
    beside the text model (whichever transformers layout named the module)."""
    from difftune.formats.comfyui import comfyui_name

    expected = {
        "text_model.encoder.layers.0.self_attn.q_proj": "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj",
        "encoder.layers.1.self_attn.out_proj": "lora_prior_te_text_model_encoder_layers_1_self_attn_out_proj",
        "text_model.encoder.layers.31.mlp.fc1": "lora_prior_te_text_model_encoder_layers_31_mlp_fc1",
        "encoder.layers.2.mlp.fc2": "lora_prior_te_text_model_encoder_layers_2_mlp_fc2",
        "text_projection": "lora_prior_te_text_projection",
    }
    assert {module: comfyui_name("text_encoder", module) for module in expected} == expected
