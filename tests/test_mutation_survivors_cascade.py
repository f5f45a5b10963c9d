"""Small fast tests written for the mutants `make mutation-auto` found alive in models/cascade.py (docs/mutation.md):
each asserts what a user sees (the Hub subfolders loaded, the conditioning the prior gets, a refusal)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from difftune.cli.errors import UserError
from difftune.models import cascade

PRIOR_FLAG, DECODER_FLAG = "--pretrained_prior_model_name_or_path", "--pretrained_decoder_model_name_or_path"

# --- loading: the Hub layout of stabilityai/stable-cascade-prior and stabilityai/stable-cascade ---


@pytest.fixture
def loads(monkeypatch):
    """Every from_pretrained call and model_index check, recorded instead of run: (class, path, kwargs)."""
    import diffusers
    import transformers
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    calls = []
    classes = {
        "AutoTokenizer": transformers.AutoTokenizer,
        "CLIPTextModelWithProjection": transformers.CLIPTextModelWithProjection,
        "StableCascadeUNet": diffusers.StableCascadeUNet,
        "DDPMWuerstchenScheduler": diffusers.DDPMWuerstchenScheduler,
        "PaellaVQModel": PaellaVQModel,
    }
    for name, cls in classes.items():

        def fake(*args, name=name, **kwargs):
            calls.append((name, args, kwargs))
            return (name, args, kwargs)

        monkeypatch.setattr(cls, "from_pretrained", fake)

    def index(*args):
        calls.append(("read_model_index", args, {}))
        return {}

    monkeypatch.setattr(cascade, "read_model_index", index)
    return calls


def test_the_prior_is_loaded_from_the_prior_repo_subfolders(loads):
    got = cascade.CASCADE.load_prior("org/prior", "prior_lite", "rev1", "bf16")
    with_variant = {"revision": "rev1", "variant": "bf16"}
    expected = [
        ("read_model_index", ("org/prior", "rev1", PRIOR_FLAG, "StableCascadePriorPipeline"), {}),
        ("AutoTokenizer", ("org/prior",), {"subfolder": "tokenizer", "revision": "rev1"}),
        ("CLIPTextModelWithProjection", ("org/prior",), {"subfolder": "text_encoder", **with_variant}),
        ("StableCascadeUNet", ("org/prior",), {"subfolder": "prior_lite", **with_variant}),
        ("DDPMWuerstchenScheduler", ("org/prior",), {"subfolder": "scheduler", "revision": "rev1"}),
    ]  # fmt: skip
    assert loads == expected
    assert (got.tokenizer, got.text_encoder, got.prior, got.scheduler) == tuple(expected[1:])


def test_the_decoder_is_loaded_from_the_decoder_repo_subfolders(loads):
    got = cascade.CASCADE.load_decoder("org/decoder", "decoder_lite", "rev2", "fp16")
    with_variant = {"revision": "rev2", "variant": "fp16"}
    expected = [
        ("read_model_index", ("org/decoder", "rev2", DECODER_FLAG, "StableCascadeDecoderPipeline"), {}),
        ("AutoTokenizer", ("org/decoder",), {"subfolder": "tokenizer", "revision": "rev2"}),
        ("CLIPTextModelWithProjection", ("org/decoder",), {"subfolder": "text_encoder", **with_variant}),
        ("StableCascadeUNet", ("org/decoder",), {"subfolder": "decoder_lite", **with_variant}),
        ("PaellaVQModel", ("org/decoder",), {"subfolder": "vqgan", **with_variant}),
        ("DDPMWuerstchenScheduler", ("org/decoder",), {"subfolder": "scheduler", "revision": "rev2"}),
    ]  # fmt: skip
    assert loads == expected
    names = ["tokenizer", "text_encoder", "decoder", "vqgan", "scheduler"]
    assert got == dict(zip(names, expected[1:], strict=True))


def test_the_combined_pipeline_gets_every_component_by_its_name(monkeypatch):
    import diffusers

    real = diffusers.StableCascadeCombinedPipeline
    made = {}
    monkeypatch.setattr(diffusers, "StableCascadeCombinedPipeline", lambda **kwargs: made.update(kwargs) or "pipe")
    decoder = {name: f"decoder {name}" for name in ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan")}
    prior = cascade.PriorComponents("prior tok", "prior te", "prior unet", "prior sched")
    assert cascade.CASCADE.build_pipeline(prior, decoder) == "pipe"
    assert made == {
        **decoder,
        "prior_tokenizer": "prior tok",
        "prior_text_encoder": "prior te",
        "prior_prior": "prior unet",
        "prior_scheduler": "prior sched",
    }
    required = {
        name
        for name, p in inspect.signature(real.__init__).parameters.items()
        if name != "self" and p.default is inspect.Parameter.empty
    }
    assert set(made) == required  # the pipeline's own required components, no more


def test_a_wrong_image_encoder_file_is_refused_with_stable_cascades_hint(tmp_path):
    path = tmp_path / "effnet.safetensors"
    save_file({"not.an.effnet": torch.zeros(2)}, str(path))
    with pytest.raises(UserError) as refused:
        cascade.CASCADE.load_image_encoder(str(path))
    message = str(refused.value)
    assert message.startswith(f"--image_encoder_path {path} is not an EfficientNetV2-S Stable Cascade image encoder (")
    assert message.endswith(
        "unexpected, e.g. ['not.an.effnet']): pass stabilityai/stable-cascade's effnet_encoder.safetensors"
    )


# --- conditioning: what StableCascadePriorPipeline feeds stage C ---


def test_the_image_embedding_is_the_encoder_output_as_is():
    pixels = torch.randn(2, 3, 8, 8)
    assert torch.equal(cascade.CASCADE.image_embeddings(lambda x: x * 3, pixels), pixels * 3)  # no (x + 1) / 42


def test_sampling_uses_stabilitys_20_prior_steps():
    assert cascade.CASCADE.sampling_kwargs(7) == {"prior_num_inference_steps": 20, "num_inference_steps": 7}


@pytest.fixture(scope="module")
def clip_g():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, projection_dim=12,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def test_text_conditioning_is_the_last_hidden_layer_and_text_embeds_as_one_token(clip_g):
    ids = torch.tensor([[49, 3, 4, 5, 48, 0], [49, 7, 48, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    batch = {"prior_input_ids": ids, "prior_attention_mask": mask}
    with torch.no_grad():
        got = cascade.CASCADE.encode_text(batch, clip_g)
        # StableCascadePriorPipeline.encode_prompt: hidden_states[-1] (before the final layer norm), and
        # text_embeds.unsqueeze(1) as clip_text_pooled (B, 1, C)
        out = clip_g(ids, attention_mask=mask, output_hidden_states=True)
        unmasked = clip_g(ids, output_hidden_states=True).hidden_states[-1]
    assert set(got) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert got["prompt_embeds"].shape == (2, 6, 16)
    assert torch.equal(got["prompt_embeds"], out.hidden_states[2])
    assert not torch.allclose(got["prompt_embeds"], out.last_hidden_state)
    assert not torch.allclose(got["prompt_embeds"], unmasked)  # the padding mask is applied
    assert got["pooled_prompt_embeds"].shape == (2, 1, 12)
    assert torch.equal(got["pooled_prompt_embeds"], out.text_embeds.unsqueeze(1))


def test_cached_text_conditioning_is_taken_from_the_batch():
    batch = {"prompt_embeds": torch.ones(1, 4, 3), "pooled_prompt_embeds": torch.zeros(1, 1, 3), "other": 1}
    got = cascade.CASCADE.encode_text(batch, text_encoder=None)
    assert got == {"prompt_embeds": batch["prompt_embeds"], "pooled_prompt_embeds": batch["pooled_prompt_embeds"]}


class Prior(nn.Module):
    """Records the call; a diffusers config with stage C's CLIP image width."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(clip_image_in_channels=5)
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return (args[0] * 2, "second")


class PeftLike(nn.Module):
    """peft's wrapper: a config of its own (not the UNet's), get_base_model()."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.config = SimpleNamespace(peft_type="LORA")
        self.base = inner

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


class DdpLike(nn.Module):
    """DistributedDataParallel: no config, the model as .module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", [lambda p: p, PeftLike, DdpLike, lambda p: DdpLike(PeftLike(p))])
def test_the_prior_gets_zero_clip_img_for_text_to_image(wrap):
    prior = Prior()
    noisy, ratio = torch.randn(3, 4, 2, 2), torch.rand(3)
    text = {"prompt_embeds": torch.randn(3, 7, 6, dtype=torch.float64), "pooled_prompt_embeds": torch.randn(3, 1, 6)}
    got = cascade.CASCADE.predict(wrap(prior), noisy, ratio, text)
    assert torch.equal(got, noisy * 2)
    ((args, kwargs),) = prior.calls
    assert len(args) == 2 and args[0] is noisy and args[1] is ratio
    assert set(kwargs) == {"clip_text_pooled", "clip_text", "clip_img", "return_dict"}
    assert kwargs["clip_text_pooled"] is text["pooled_prompt_embeds"]
    assert kwargs["clip_text"] is text["prompt_embeds"]
    assert kwargs["return_dict"] is False
    assert torch.equal(kwargs["clip_img"], torch.zeros(3, 1, 5, dtype=torch.float64))
    assert kwargs["clip_img"].dtype == torch.float64
