"""kohya sd-scripts' training settings and flag names, read with kohya's meaning.

A kohya training config (the TOML of kohya's `--output_config` / `--config_file`, or the one the kohya_ss GUI
writes, in sections such as [model_arguments] and [optimizer_arguments]) comes in through `--config`
(`translate`, the parser's `translate_settings`), kohya's flag names through the command line
(`add_kohya_aliases`, `rewrite_argv`). Each kohya key is one of:

- another name for one of our flags, same meaning (`network_dim` = `--rank`): an extra option string, in --help;
- converted to our flags (`network_alpha`, `network_args`, `optimizer_type`, `max_train_epochs`, ...): a hidden
  option, its value converted exactly as the config key's;
- without effect on what trains here (attention kernels, loader processes, memory modes): accepted, named in one
  note;
- refused with its reason; all refusals in one error.

Settings holding any kohya-only key are a kohya config: kohya's `--output_config` leaves out every value equal to
kohya's default, so the keys it leaves out take kohya's defaults where ours differ (one note lists them).

Imported while the training scripts build their parser: no torch here (--help must not wait for it).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import logging
import math
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from difftune.cli.config_file import tokens_for
from difftune.cli.errors import UserError

logger = logging.getLogger("difftune")

SDXL, WUERSTCHEN = "sdxl_lokr", "wuerstchen_lora"

# kohya names of our flags, same meaning (kohya key -> our dest); a script gets those whose flag it has.
ALIASES = {
    "network_dim": "rank",
    "network_weights": "init_adapter",
    "vae": "pretrained_vae_model_name_or_path",
    "min_snr_gamma": "snr_gamma",
    "ip_noise_gamma": "input_perturbation",  # (kohya perturbs the input's noise only, as diffusers)
    "debiased_estimation_loss": "debiased_estimation",
    "lr_scheduler_num_cycles": "lr_num_cycles",
    "lr_scheduler_power": "lr_power",
    "sample_prompts": "validation_prompts_file",
    "sample_every_n_steps": "validation_steps",
    "save_every_n_steps": "checkpointing_steps",
    "save_every_n_epochs": "checkpointing_epochs",
    "cache_text_encoder_outputs": "cache_text_embeddings",
    "cache_text_encoder_outputs_to_disk": "cache_text_embeddings",  # (our caches are on disk)
    "caption_extention": "caption_extension",  # (kohya keeps its old misspelling)
}
# The image-encoding cache: kohya's latent cache is Wuerstchen's EfficientNet-embedding cache.
IMAGE_CACHE = {SDXL: "cache_latents", WUERSTCHEN: "cache_image_embeddings"}

METADATA = [f"metadata_{name}" for name in ("title", "author", "description", "license", "tags", "usage_hint",
            "thumbnail", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding")]  # fmt: skip
DEEPSPEED_KEYS = ["deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                  "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                  "fp16_master_weights_and_gradients"]  # fmt: skip
# Keys that change nothing that trains here: accepted when set, named in one note (key -> why).
NOTED = {
    **dict.fromkeys(("xformers", "sdpa", "mem_eff_attn"), "attention kernel: PyTorch's SDPA is used"),
    **dict.fromkeys(
        ("max_data_loader_n_workers", "persistent_data_loader_workers"), "loader processes: --dataloader_num_workers"
    ),
    **dict.fromkeys(("lowram", "highvram", "cpu_offload_checkpointing", "fused_backward_pass"), "memory placement"),
    "vae_batch_size": "batch size while caching latents",
    **dict.fromkeys(("full_fp16", "full_bf16"), "half-precision adapter weights: they stay fp32 here"),
    **dict.fromkeys(("fp8_base", "fp8_base_unet"), "fp8 frozen weights: they stay in --mixed_precision's dtype"),
    "no_half_vae": "the SDXL VAE runs in fp32 here unless it is made for fp16",
    **dict.fromkeys(("cache_info", "skip_cache_check"), "kohya's cache bookkeeping"),
    "disable_mmap_load_safetensors": "how weight files are read",
    **dict.fromkeys(("torch_compile", "dynamo_backend"), "compilation"),
    **dict.fromkeys(("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph"), "DDP tuning"),
    "tokenizer_cache_dir": "a tokenizer download cache",
    **dict.fromkeys(("console_log_simple", "console_log_level", "console_log_file"), "console logging"),
    **dict.fromkeys(("log_prefix", "log_tracker_name", "wandb_run_name", "log_config"), "tracker naming"),
    "wandb_api_key": "log in with `wandb login`",
    **dict.fromkeys(("training_comment", "no_metadata", *METADATA), "kohya's file metadata"),
    **dict.fromkeys(
        ("save_state", "save_state_on_train_end", "save_last_n_epochs_state", "save_last_n_steps_state"),
        "every checkpoint here holds the state to resume",
    ),
    **dict.fromkeys(("use_safetensors", "save_model_as"), "exported files are .safetensors (scripts/export.py)"),
    "save_precision": "the exported precision is scripts/export.py --dtype",
    "async_upload": "uploads",
    **dict.fromkeys(
        ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"),
        "the held-out loss is measured on every held-out image at each validation and checkpoint",
    ),
    **dict.fromkeys(("lr_scheduler_timescale", "lr_scheduler_min_lr_ratio"), "used by schedules not offered here"),
    "sample_at_first": "validation images start at the first validation",
    "dim_from_weights": "--init_adapter takes the rank from its file",
}
DEEPSPEED = "DeepSpeed is set in accelerate's config here (configs/accelerate/deepspeed_zero2.yaml)"
HUB = "uploads: --push_to_hub --hub_model_id (once, at the end)"
# Keys refused when set to anything but their neutral values (key -> (neutral values, why)); None, false, 0, ""
# and [] are always neutral.
REFUSED = {
    "v2": ((), "Stable Diffusion 2 is not trained here"),
    "zero_terminal_snr": ((), "not supported yet (a single-file v-pred base with its zsnr marker gets it)"),
    "noise_offset_random_strength": ((), "a random noise-offset strength is not supported"),
    "ip_noise_gamma_random_strength": ((), "a random input-perturbation strength is not supported"),
    "adaptive_noise_scale": ((), "not supported"),
    "min_timestep": ((), "a timestep range is not supported (--timestep_bias_strategy range weights one)"),
    "max_timestep": ((1000,), "a timestep range is not supported (--timestep_bias_strategy range weights one)"),
    "huber_scale": ((1, 1.0), "not supported (1.0 only)"),
    "scale_v_pred_loss_like_noise_pred": ((), "not supported"),
    "v_pred_like_loss": ((), "not supported"),
    "weighted_captions": ((), "prompt weighting is not supported"),
    "max_token_length": ((75,), "captions are encoded as one 77-token window, as diffusers does"),
    "in_json": ((), "kohya's fine-tuning metadata: use a --dataset_config or metadata.jsonl"),
    "dataset_repeats": ((1,), "repeats of in_json data: use '<repeats>_<name>' folders or a --dataset_config"),
    "dataset_class": ((), "custom data-set classes are not supported"),
    "conditioning_data_dir": ((), "ControlNet training's conditioning images"),
    "debug_dataset": ((), "it shows the data instead of training"),
    "network_train_text_encoder_only": ((), "the U-Net always trains here"),
    "scale_weight_norms": ((), "max-norm regularisation is not supported"),
    "base_weights": ((), "merging networks before training is not supported"),
    "base_weights_multiplier": ((), "merging networks before training is not supported"),
    "initial_epoch": ((1,), "start from a checkpoint with --resume_from_checkpoint"),
    "initial_step": ((), "start from a checkpoint with --resume_from_checkpoint"),
    "skip_until_initial_step": ((), "start from a checkpoint with --resume_from_checkpoint"),
    "use_lion_optimizer": ((), "Lion is not offered (--optimizer: adamw, adamw8bit, prodigy, adafactor)"),
    "lr_decay_steps": ((), "used by warmup_stable_decay only, which is not offered"),
    "lr_scheduler_type": ((), "custom schedulers are not supported"),
    "lr_scheduler_args": ((), "custom scheduler arguments are not supported"),
    "save_n_epoch_ratio": ((), "use save_every_n_epochs"),
    "resume": ((), "kohya's saved state cannot resume here: --resume_from_checkpoint takes our step<N>"),
    "huggingface_repo_id": ((), HUB),
    "huggingface_repo_type": ((), HUB),
    "huggingface_path_in_repo": ((), HUB),
    "huggingface_repo_visibility": ((), HUB),
    "huggingface_token": ((), HUB),
    "save_state_to_huggingface": ((), HUB),
    "resume_from_huggingface": ((), HUB),
    **dict.fromkeys(DEEPSPEED_KEYS, ((), DEEPSPEED)),
    "config_file": ((), "difftune reads kohya's training config with --config FILE"),
    "output_config": ((), "a run's args.json is its config (--config OUTPUT_DIR/step<N>/args.json)"),
}
# Keys converted here (beyond the aliases); on the command line they are hidden options.
CONVERTED = (
    "v_parameterization", "clip_skip", "network_module", "network_args", "network_alpha", "network_dropout",
    "network_train_unet_only", "unet_lr", "optimizer_type", "optimizer_args", "max_train_epochs",
    "sample_every_n_epochs", "sample_sampler", "log_with", "save_last_n_steps", "save_last_n_epochs",
    "cache_latents_to_disk",
)  # fmt: skip
# Settings with any of these are a kohya config (kohya's names of our flags alone are not).
TRIGGERS = (set(NOTED) | set(REFUSED) | set(CONVERTED)) - {"cache_latents_to_disk"}  # (an alias, but per script)
KOHYA_ONLY = TRIGGERS | set(ALIASES)
# kohya's store_true flags and its lists (nargs="*"): how many values each takes on the command line.
SWITCHES = {
    "v2", "v_parameterization", "network_train_unet_only", "network_train_text_encoder_only", "dim_from_weights",
    "no_half_vae", "skip_until_initial_step", "cpu_offload_checkpointing", "no_metadata", "fp8_base_unet",
    "use_lion_optimizer", "fused_backward_pass", "save_state_to_huggingface", "resume_from_huggingface",
    "async_upload", "save_state", "save_state_on_train_end", "mem_eff_attn", "torch_compile", "xformers", "sdpa",
    "persistent_data_loader_workers", "full_fp16", "full_bf16", "fp8_base", "ddp_gradient_as_bucket_view",
    "ddp_static_graph", "log_config", "noise_offset_random_strength", "ip_noise_gamma_random_strength",
    "zero_terminal_snr", "lowram", "highvram", "sample_at_first", "output_config", "disable_mmap_load_safetensors",
    "cache_info", "debug_dataset", "cache_latents_to_disk", "skip_cache_check", "weighted_captions",
    "scale_v_pred_loss_like_noise_pred", "use_safetensors", "console_log_simple", "deepspeed", "zero3_init_flag",
    "zero3_save_16bit_model", "fp16_master_weights_and_gradients", "metadata_is_negative_embedding",
}  # fmt: skip
LISTS = {"network_args", "optimizer_args", "lr_scheduler_args", "base_weights", "base_weights_multiplier"}

# kohya's defaults where ours differ (kohya's argparse defaults; network_dim: kohya's and LyCORIS's modules' 4).
KOHYA_LEARNING_RATE = 2e-6
KOHYA_MAX_TRAIN_STEPS = 1600

# LyCORIS presets (lycoris.config.PRESET) on kohya's SDXL U-Net, by the diffusers names of the same layers: U-Net
# targets, text-encoder targets. Its `conv_in` / `time_embedding` names match nothing in kohya's SDXL U-Net.
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER = [*ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
RESNET_LINEAR = ["time_emb_proj", "conv_shortcut"]  # (a Linear and a 1x1 conv: adapted even without conv layers)
CONVS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]  # 3x3: only presets that enable convs
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TE_ALL = [*TE_ATTN, "fc1", "fc2"]
PRESETS = {
    "full": ([*TRANSFORMER, *RESNET_LINEAR, *CONVS], TE_ALL),
    "full-lin": ([*TRANSFORMER, *RESNET_LINEAR], TE_ALL),
    "attn-mlp": (TRANSFORMER, TE_ALL),
    "attn-only": (ATTN, TE_ATTN),
    "unet-only": ([*TRANSFORMER, *RESNET_LINEAR, *CONVS], []),
    "unet-transformer-only": (TRANSFORMER, []),
    "unet-convblock-only": ([*RESNET_LINEAR, *CONVS], []),
}
# SDXL's layer shapes (out, in) by target name: the U-Net's (transformers at 640 and 1280 channels, resnets at
# 320 / 640 / 1280 with the up blocks' concatenated inputs) and both text encoders'.
_RESNETS = [(320, 320), (640, 320), (640, 640), (1280, 640), (1280, 1280), (1280, 2560), (1280, 1920),
            (640, 1920), (640, 1280), (640, 960), (320, 960), (320, 640)]  # fmt: skip
SDXL_SHAPES = {
    "to_q": [(640, 640), (1280, 1280)],
    "to_k": [(640, 640), (1280, 1280), (640, 2048), (1280, 2048)],
    "to_out.0": [(640, 640), (1280, 1280)],
    "ff.net.0.proj": [(5120, 640), (10240, 1280)],
    "ff.net.2": [(640, 2560), (1280, 5120)],
    "proj_in": [(640, 640), (1280, 1280)],
    "conv1": _RESNETS,
    "conv2": [(320, 320), (640, 640), (1280, 1280)],
    "time_emb_proj": [(320, 1280), (640, 1280), (1280, 1280)],
    "conv_shortcut": [shape for shape in _RESNETS if shape[0] != shape[1]],
    "downsamplers.0.conv": [(320, 320), (640, 640)],
    "q_proj": [(768, 768), (1280, 1280)],
    "fc1": [(3072, 768), (5120, 1280)],
    "fc2": [(768, 3072), (1280, 5120)],
}
SDXL_SHAPES |= {"to_v": SDXL_SHAPES["to_k"], "proj_out": SDXL_SHAPES["proj_in"], "upsamplers.0.conv": [(640, 640),
                (1280, 1280)]} | dict.fromkeys(("k_proj", "v_proj", "out_proj"), SDXL_SHAPES["q_proj"])  # fmt: skip

SPATIAL_CONVS = {"conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"}  # (3x3 in SDXL)

LORA_REFUSAL = (
    'this script trains LoKr (network_module = "lycoris.kohya" with network_args = ["algo=lokr"]); a LoRA '
    "trains on the Wuerstchen prior with scripts/train_wuerstchen_lora.py, not on SDXL here"
)


def is_neutral(value: object, neutral: Collection = ()) -> bool:
    """Whether a key's value leaves kohya's behaviour as without it (0 compares equal to false)."""
    return value is None or value in (False, "", [], ()) or value in neutral


class Translation:
    """One set of kohya settings as our flags: `out` holds our dests; refusals and notes are collected."""

    def __init__(self, settings: dict, script: str, *, config: bool, context: dict | None = None) -> None:
        self.settings, self.script, self.config = settings, script, config
        self.context = context or {}  # our flags' values given beside the kohya ones (the command line)
        self.out: dict = {}
        self.origin: dict[str, str] = {}  # dest -> the key that set it
        self.refused: list[str] = []
        self.noted: dict[str, str] = {}
        self.approximate: dict[str, str] = {}  # followed, but not exactly as kohya does (key -> how it differs)
        self.defaults: list[str] = []
        self.encoders_adapted = True  # (False: a LyCORIS preset without text-encoder layers)

    # -- reading values ------------------------------------------------------------------------------------------
    def given(self, key: str) -> bool:
        return not is_neutral(self.settings.get(key))

    def number(self, key: str, kind: type = float, value: object = None):
        value = self.settings.get(key) if value is None else value
        try:
            number = kind(value) if kind is float else int(str(value))
        except (TypeError, ValueError):
            self.refuse(key, f"{value!r} is not a {'whole ' if kind is int else ''}number")
            return None
        return number

    def switch(self, key: str, value: object = None) -> bool:
        value = self.settings.get(key) if value is None else value
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off", "none", ""):
            return False
        self.refuse(key, f"{value!r} is not true or false")
        return False

    def current(self, dest: str, fallback: object = None) -> object:
        """Our dest's value so far: set here, given beside (the file's own keys, the command line), or fallback."""
        for source in (self.out, self.context):
            if source.get(dest) is not None:
                return source[dest]
        return fallback

    # -- writing -------------------------------------------------------------------------------------------------
    def put(self, dest: str, value: object, key: str) -> None:
        if dest in self.out and self.out[dest] != value:
            other = self.origin.get(dest, dest)
            self.refused.append(f"{key} and {other} disagree on --{dest} ({value!r} vs {self.out[dest]!r})")
            return
        self.out[dest] = value
        self.origin.setdefault(dest, key)

    def default(self, dest: str, value: object, shown: str | None = None) -> None:
        """kohya's default for a key the file leaves out (config files only)."""
        if self.config and self.current(dest) is None:
            self.out[dest] = value
            self.origin[dest] = "kohya's default"
            self.defaults.append(f"--{dest} {value if shown is None else shown}".rstrip())

    def refuse(self, key: str, why: str) -> None:
        value = self.settings.get(key)
        self.refused.append(f"{key}{'' if value is None or value is True else f' = {value!r}'}: {why}")

    # -- the keys ------------------------------------------------------------------------------------------------
    def run(self, known: Collection[str] | None) -> dict:
        s, sdxl = self.settings, self.script == SDXL
        kohya_mode = any(key in TRIGGERS for key in s)
        if self.config and not kohya_mode:
            return dict(s)
        ours = {k: v for k, v in s.items() if k not in KOHYA_ONLY}
        self.out.update(ours)
        self.origin.update({k: k for k in ours})
        for key, why in NOTED.items():
            if self.given(key) and not (key == "save_model_as" and str(s[key]).lower() != "safetensors"):
                self.noted[key] = why
        for key, (neutral, why) in REFUSED.items():
            if key in s and not is_neutral(s[key], neutral):
                self.refuse(key, why)
        if self.given("save_model_as") and str(s["save_model_as"]).lower() != "safetensors":
            self.refuse("save_model_as", "exported files are .safetensors (scripts/export.py)")
        self.aliases()
        self.model(sdxl)
        self.network(sdxl)
        self.learning_rates()
        self.optimizer()
        self.saving_and_sampling(sdxl, kohya_mode)
        self.schedule(kohya_mode)  # (after the run's length: a warm-up share is of its steps)
        if kohya_mode:
            self.data(sdxl)
            self.logging()
            self.default("mixed_precision", "no")
        if self.refused:
            self.refused = list(dict.fromkeys(self.refused))  # (a value read twice is refused once)
            if known is not None:
                unknown = [k for k in ours if k not in known]
                self.refused += [f"{k} is not a flag or a kohya key" + suggestion(k, known) for k in unknown]
            count = f"{len(self.refused)} settings: " if len(self.refused) > 1 else ""
            raise UserError(f"kohya settings difftune cannot follow: {count}{'; '.join(self.refused)}")
        if self.noted:
            logger.warning(
                "kohya settings with no effect on what trains here: %s",
                "; ".join(f"{k} ({why})" for k, why in self.noted.items()),
            )
        if self.approximate:
            logger.warning(
                "kohya settings followed only in part here: %s",
                "; ".join(f"{k} ({how})" for k, how in self.approximate.items()),
            )
        if self.defaults:
            logger.warning("kohya's defaults for what the settings leave out: %s", ", ".join(self.defaults))
        return self.out

    def aliases(self) -> None:
        for key, dest in ALIASES.items():
            value = self.settings.get(key)
            if value is None or value is False or key == "network_dim":  # (off: as if not given; the dim: below)
                continue
            if key == "vae" and self.script != SDXL:
                self.refuse(key, "the Wuerstchen prior has no VAE (its images are EfficientNet-encoded)")
                continue
            self.put(dest, value, key)
        image_cache = IMAGE_CACHE[self.script]
        for key in {"cache_latents_to_disk", "cache_latents"} - {image_cache}:  # (Wuerstchen: both kohya's)
            if key in self.settings:
                self.out.pop(key, None)
                if self.given(key) and self.switch(key):
                    self.put(image_cache, True, key)

    def model(self, sdxl: bool) -> None:
        if self.given("v_parameterization") and self.switch("v_parameterization"):
            if sdxl:
                self.put("prediction_type", "v_prediction", "v_parameterization")
            else:
                self.refuse("v_parameterization", "the Wuerstchen prior's objective has no v-prediction")
        if self.given("clip_skip") and self.settings["clip_skip"] != 1:
            if sdxl:
                self.noted["clip_skip"] = "kohya's SDXL scripts ignore it too"
            else:
                self.refuse("clip_skip", "the prior's text encoder is read at its own layer")

    def network(self, sdxl: bool) -> None:
        s = self.settings
        module = str(s.get("network_module") or "").strip()
        if sdxl and module and module != "lycoris.kohya":
            self.refuse("network_module", LORA_REFUSAL if module == "networks.lora" else LORA_REFUSAL.split(";")[0])
        elif not sdxl and module and module != "networks.lora":
            why = "a LoRA (networks.lora) trains here; LyCORIS names no layers of the Wuerstchen prior"
            self.refuse("network_module", why)
        network_args = self.network_args()
        if "network_dim" in s and s["network_dim"] is not None:
            self.put("rank", self.number("network_dim", int), "network_dim")
        self.default("rank", 4)
        alpha_dest = "alpha" if sdxl else "lora_alpha"
        if "network_alpha" in s and s["network_alpha"] is not None:
            alpha = self.number("network_alpha")
            # kohya's LoRA and LyCORIS read an alpha of 0 as alpha = dim (scale 1).
            self.put(alpha_dest, float(self.current("rank", 8)) if alpha == 0 else alpha, "network_alpha")
        self.default(alpha_dest, 1.0)
        if self.given("network_dropout"):
            if sdxl:
                self.noted["network_dropout"] = "LyCORIS's LoKr has no neuron dropout"
            else:
                self.refuse("network_dropout", "kohya drops the rank's activations; --lora_dropout drops the input")
        if sdxl and (module == "lycoris.kohya" or network_args):
            self.lycoris(network_args)
        elif network_args:
            for name in network_args:
                self.refused.append(f"network_args {name}: not supported for networks.lora here")
        unet_only = self.given("network_train_unet_only") and self.switch("network_train_unet_only")
        # kohya trains the text encoders' networks unless network_train_unet_only (or a text-encoder lr of 0)
        if not unet_only and self.encoders_adapted and self.text_encoder_rate() != 0:
            self.default("train_text_encoder", True, "")

    def network_args(self) -> dict[str, str]:
        raw = self.settings.get("network_args") or []
        items = raw.split() if isinstance(raw, str) else list(raw)
        parsed = {}
        for item in items:
            name, eq, value = str(item).partition("=")
            if not eq:
                self.refused.append(f"network_args {item!r}: write key=value")
                continue
            parsed[name.strip()] = value.strip()
        return parsed

    def lycoris(self, args: dict[str, str]) -> None:
        """LyCORIS's kohya network (lycoris.kohya create_network) as our LoKr flags."""
        key = "network_args"
        algo = args.pop("algo", None)
        if algo is None:
            self.refused.append("network_args without algo: lycoris.kohya then trains LoCon; this script trains LoKr: "
                                "add algo=lokr")  # fmt: skip
        elif algo.lower() != "lokr":
            self.refused.append(f"network_args algo={algo}: this script trains LoKr (algo=lokr)")
        self.put("lokr_init", "lycoris", key)  # LyCORIS starts w2 (its bigger factor) at zero
        factor = self.number(key, int, args.pop("factor", "-1"))
        if factor is not None:
            if factor == 0:
                self.refused.append("network_args factor=0: give a positive factor or -1 (near sqrt(dim))")
            self.put("decompose_factor", -1 if factor < 0 else factor, key)  # (LyCORIS: any negative is -1)
        if "decompose_both" in args:
            self.put("decompose_both", self.switch(key, args.pop("decompose_both")), key)
        for name in ("rank_dropout", "module_dropout"):
            if name in args:
                self.put(name, self.number(key, float, args.pop(name)), key)
        preset = args.pop("preset", "full")
        if preset not in PRESETS:
            self.refused.append(f"network_args preset={preset}: difftune knows LyCORIS's {', '.join(PRESETS)}")
            preset = "full"
        unet, text_encoders = PRESETS[preset]
        self.put("target_modules", unet, key)
        if text_encoders:
            self.put("text_encoder_target_modules", text_encoders, key)
        self.encoders_adapted = bool(text_encoders)
        convs = "conv1" in unet
        for name, dest, kind in (("conv_dim", "conv_rank", int), ("conv_alpha", "conv_alpha", float)):
            value = self.number(key, kind, args.pop(name)) if name in args else None
            if value and convs:  # (LyCORIS reads 0 as "the linear layers' value")
                self.put(dest, value, key)
            elif value:
                self.noted[f"network_args {name}"] = f"preset {preset} adapts no 3x3 conv layer"
        for name in ("use_tucker", "use_cp", "use_conv_cp"):
            if self.switch(key, args.pop(name, False)):
                self.refused.append(f"network_args {name}: Tucker conv factors are not supported")
        if "disable_conv_cp" in args and not self.switch(key, args.pop("disable_conv_cp")):
            self.refused.append("network_args disable_conv_cp=False: Tucker conv factors are not supported")
        for name in ("full_matrix", "use_scalar", "train_norm", "dora_wd", "rs_lora", "unbalanced_factorization"):
            if self.switch(key, args.pop(name, False)):
                hint = " (a large network_dim, e.g. 100000, keeps every factor full)" if name == "full_matrix" else ""
                self.refused.append(f"network_args {name}: not supported{hint}")
        ignored = {"dropout": "LyCORIS's LoKr has no neuron dropout", "bypass_mode": "the same weights, computed so",
                   "rank_dropout_scale": "lycoris.kohya does not pass it on"}  # fmt: skip
        for name in [n for n in args if n in ignored or n.startswith("loraplus_")]:
            self.noted[f"network_args {name}"] = ignored.get(name, "LoRA+ scales lora_up weights, which LoKr has not")
            args.pop(name)
        self.refused += [f"network_args {name}: not a LoKr setting difftune knows" for name in args]
        self.check_scales()

    def check_scales(self) -> None:
        """LyCORIS scales a LoKr layer by alpha / dim only where a factor is split, by 1 where both are full; peft by
        alpha / rank everywhere. The same training where SDXL's targeted layers agree, refused where they mix."""
        rank, alpha = self.current("rank", 8), self.current("alpha", 8.0)  # (ours, on a command line)
        factor, both = self.current("decompose_factor", -1), self.current("decompose_both", False)
        if not all(isinstance(v, int | float) for v in (rank, alpha, factor)) or rank <= 0:
            return
        targets = list(self.current("target_modules", []))
        trains_encoders = self.current("train_text_encoder") or (
            self.config and self.encoders_adapted and not self.given("network_train_unet_only")
        )
        if trains_encoders:
            targets += list(self.current("text_encoder_target_modules", []))
        # Spatial convs train at conv_dim / conv_alpha (LyCORIS's rule: a 1x1 conv is a linear layer to it).
        groups = {"": (rank, alpha), "conv_": (self.current("conv_rank") or rank, self.current("conv_alpha") or alpha)}
        counts = {group: [0, 0] for group in groups}  # layers with both factors full, with one split
        swapped = set()
        for target in targets:
            group = "conv_" if target in SPATIAL_CONVS else ""
            group_rank = groups[group][0]
            for out_dim, in_dim in SDXL_SHAPES.get(target, []):
                ours = [factorize(d, factor, lycoris=False) for d in (out_dim, in_dim)]
                theirs = [factorize(d, factor, lycoris=True) for d in (out_dim, in_dim)]
                if ours != theirs:
                    swapped.add(min(out_dim, in_dim))
                (a, b), (c, d) = theirs
                full = not (both and group_rank < max(a, c) / 2) and group_rank >= max(b, d) / 2
                counts[group][0 if full else 1] += 1
        if swapped:
            self.refused.append(
                f"network_args factor={factor} is above sqrt({min(swapped)}): LyCORIS then swaps the two factors, "
                "peft does not; use a factor up to its square root"
            )
            return
        for group, (group_rank, group_alpha) in groups.items():
            full, split = counts[group]
            if not full or float(group_alpha) == float(group_rank):
                continue
            if split:
                names = ("conv_alpha", "conv_dim") if group else ("network_alpha", "network_dim")
                self.refused.append(
                    f"{names[0]} {group_alpha:g} with {names[1]} {group_rank} and factor {factor}: LyCORIS scales the "
                    f"{full} SDXL layers whose two factors are both full by 1 and the other {split} by alpha/dim, peft "
                    f"every layer by alpha/rank: set {names[0]} = {names[1]} (scale 1 everywhere, in LyCORIS too), or "
                    "a rank and factor that split every layer"
                )
            else:  # every factor full: LyCORIS's scale is 1 whatever the alpha
                self.out[group + "alpha"] = float(group_rank)

    def text_encoder_rate(self) -> float | None:
        """kohya's text-encoder rate: text_encoder_lr (a list: its first, as LyCORIS reads it), else learning_rate."""
        s = self.settings
        value = s.get("text_encoder_lr")
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return self.number("text_encoder_lr", float, value)
        if s.get("learning_rate") is not None:
            return self.number("learning_rate")
        return KOHYA_LEARNING_RATE if self.config else None

    def learning_rates(self) -> None:
        """kohya: the U-Net at unet_lr, else learning_rate; the text encoders at text_encoder_lr, else
        learning_rate (0: not trained). Ours: --learning_rate is the U-Net's, --text_encoder_lr the encoders'."""
        s = self.settings
        if not self.config and "unet_lr" not in s:
            return
        base = self.number("learning_rate") if s.get("learning_rate") is not None else None
        base = KOHYA_LEARNING_RATE if base is None and self.config else base
        unet = self.number("unet_lr") if s.get("unet_lr") is not None else base
        if unet == 0:
            self.refuse("unet_lr", "the U-Net always trains here")
        self.out.pop("learning_rate", None)
        self.origin.pop("learning_rate", None)
        if unet is not None:
            self.put("learning_rate", unet, "unet_lr" if s.get("unet_lr") is not None else "learning_rate")
            if s.get("learning_rate") is None and s.get("unet_lr") is None:
                self.defaults.append(f"--learning_rate {unet:g}")
        encoders = self.text_encoder_rate()
        self.out.pop("text_encoder_lr", None)
        if encoders and encoders != unet and self.current("train_text_encoder"):
            self.put("text_encoder_lr", encoders, "text_encoder_lr")

    def optimizer(self) -> None:
        s = self.settings
        kind = str(s.get("optimizer_type") or "").strip().lower()
        names = {"": None, "adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}
        if kind not in names:
            self.refuse("optimizer_type", "difftune offers AdamW, AdamW8bit, Prodigy and Adafactor")
            return
        if names[kind]:
            self.put("optimizer", names[kind], "optimizer_type")
        optimizer = names[kind] or ("adamw8bit" if self.switch("use_8bit_adam", s.get("use_8bit_adam", False))
                                    else "adamw")  # fmt: skip
        options = {}
        raw = s.get("optimizer_args") or []
        for item in raw.split() if isinstance(raw, str) else raw:
            name, eq, value = str(item).partition("=")
            if not eq:
                self.refused.append(f"optimizer_args {item!r}: write key=value")
                continue
            try:
                options[name.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                options[name.strip()] = value.strip()
        key = "optimizer_args"
        if "weight_decay" in options:
            self.put("adam_weight_decay", self.number(key, float, options.pop("weight_decay")), key)
        elif optimizer in ("prodigy", "adafactor") and kind:
            self.put("adam_weight_decay", 0.0, "optimizer_type")  # (prodigyopt's and transformers' default)
        if "betas" in options and optimizer != "adafactor":
            betas = options.pop("betas")
            if not isinstance(betas, list | tuple) or len(betas) != 2:
                self.refused.append(f"optimizer_args betas={betas!r}: give two numbers, betas=0.9,0.999")
            else:
                self.put("adam_beta1", float(betas[0]), key)
                self.put("adam_beta2", float(betas[1]), key)
        if "eps" in options and optimizer != "adafactor":
            self.put("adam_epsilon", self.number(key, float, options.pop("eps")), key)
        defaults: dict[str, object] = {"amsgrad": False, "foreach": None, "fused": None}
        if optimizer == "prodigy":
            for name, dest in (("d_coef", "prodigy_d_coef"),):
                if name in options:
                    self.put(dest, self.number(key, float, options.pop(name)), key)
            for name in ("use_bias_correction", "safeguard_warmup"):
                if name in options:
                    self.put(f"prodigy_{name}", self.switch(key, options.pop(name)), key)
            defaults = {"decouple": True, "d0": 1e-6, "growth_rate": math.inf, "slice_p": 1, "beta3": None}
        if optimizer == "adafactor":
            # transformers' Adafactor (kohya's) with a fixed learning rate is torch's (ours): no relative steps, no
            # scaling by the weights' RMS. kohya's default form (relative_step, scale_parameter) has no match here.
            for name in ("relative_step", "scale_parameter"):
                if self.switch(key, options.pop(name, True)):
                    self.refused.append(f"optimizer_args {name}: Adafactor runs with a fixed learning rate here "
                                        "(relative_step=False scale_parameter=False warmup_init=False)")  # fmt: skip
            defaults = {"warmup_init": False, "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None}
            if kind:
                self.approximate["optimizer_type"] = "torch's Adafactor adds its eps to the denominator, not to g^2"
        for name, value in options.items():
            if name in defaults and value == defaults[name]:
                continue
            self.refused.append(f"optimizer_args {name}={value!r}: not a {optimizer} setting difftune can follow")

    def schedule(self, kohya_mode: bool) -> None:
        s = self.settings
        name = s.get("lr_scheduler")
        if kohya_mode and name is not None:
            offered = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
            if name not in offered:
                self.refuse("lr_scheduler", f"difftune offers {', '.join(offered)}")
        warmup = s.get("lr_warmup_steps")
        if kohya_mode and warmup is not None:
            percent = str(warmup).endswith("%")
            share = self.number("lr_warmup_steps", float, str(warmup).rstrip("%")) if percent else None
            share = share / 100 if share is not None else self.number("lr_warmup_steps")
            if share is not None and 0 < share < 1 and not isinstance(warmup, int):
                # kohya: a value below 1 is a share of the training steps
                steps = self.current("max_train_steps")
                if steps is None or s.get("max_train_epochs") is not None:
                    self.refuse("lr_warmup_steps", "a share of the steps needs max_train_steps: give a step count")
                else:
                    self.out["lr_warmup_steps"] = int(share * int(steps))
            elif share is not None:
                self.out["lr_warmup_steps"] = int(share)
            if name == "constant" and self.out.get("lr_warmup_steps"):
                self.refuse("lr_scheduler", "kohya refuses warm-up steps with it too: use constant_with_warmup")

    def saving_and_sampling(self, sdxl: bool, kohya_mode: bool) -> None:
        s = self.settings
        if s.get("max_train_epochs") is not None:
            # kohya: max_train_epochs overrides max_train_steps; ours the other way round
            self.put("num_train_epochs", self.number("max_train_epochs", int), "max_train_epochs")
            self.out.pop("max_train_steps", None)
        elif kohya_mode and self.current("num_train_epochs") is None:
            self.default("max_train_steps", KOHYA_MAX_TRAIN_STEPS)
        if kohya_mode:
            self.default("checkpointing_steps", 0, "0 (none by steps: kohya saves at save_every_n_* only)")
        if s.get("sample_every_n_epochs") is not None:
            # kohya: sample_every_n_epochs overrides sample_every_n_steps
            self.put("validation_epochs", self.number("sample_every_n_epochs", int), "sample_every_n_epochs")
            self.out["validation_steps"] = 0
        elif kohya_mode:
            self.default("validation_steps", 0, "0 (none by steps: kohya samples at sample_every_n_* only)")
        limits = []
        for key, every_key in (("save_last_n_steps", "checkpointing_steps"),
                               ("save_last_n_epochs", "checkpointing_epochs")):  # fmt: skip
            every = self.current(every_key)
            if s.get(key) is None or not every:
                continue
            count = self.number(key, int)
            if count is not None:
                # kohya keeps the checkpoints of the last N steps (or N epoch checkpoints), and the final model beside
                limits.append(count // int(every) + 1 if key == "save_last_n_steps" else count)
        periodic = [k for k in ("checkpointing_steps", "checkpointing_epochs") if self.current(k)]
        if limits and len(limits) == len(periodic):
            self.put("checkpoints_total_limit", sum(limits) + 1, "save_last_n_*")
        elif limits:
            self.approximate["save_last_n_*"] = "not applied: --checkpoints_total_limit counts all checkpoints"
        sampler = str(s.get("sample_sampler") or "").lower()
        if sampler and not (sdxl and sampler in ("euler", "k_euler")):
            why = "validation samples with the base model's own scheduler (Euler for SDXL base): drop it or use euler"
            self.refuse("sample_sampler", why if sdxl else "the Wuerstchen pipeline samples with its own scheduler")
        log_with = s.get("log_with")
        if log_with is not None:
            if log_with in ("tensorboard", "wandb"):
                self.put("report_to", log_with, "log_with")
            else:
                self.refuse("log_with", "one tracker: tensorboard or wandb (--report_to)")

    def data(self, sdxl: bool) -> None:
        s = self.settings
        resolution = s.get("resolution")
        if resolution is not None:
            sides = resolution if isinstance(resolution, list | tuple) else str(resolution).split(",")
            sides = [self.number("resolution", int, side) for side in sides]
            if None not in sides and len(set(sides)) == 1:
                self.out["resolution"] = sides[0]
            elif None not in sides:
                self.refuse("resolution", "a square side only (--resolution; buckets come with enable_bucket)")
        face = s.get("face_crop_aug_range")
        if isinstance(face, str):
            self.out["face_crop_aug_range"] = [self.number("face_crop_aug_range", float, v) for v in face.split(",")]
        if not sdxl and "enable_bucket" in s:  # (the SDXL script's --enable_bucket is kohya's)
            self.out.pop("enable_bucket")
            if self.given("enable_bucket") and self.switch("enable_bucket"):
                self.refuse("enable_bucket", "aspect-ratio buckets are the SDXL script's")
        if s.get("loss_type") == "l1":
            self.refuse("loss_type", "difftune offers l2, huber and smooth_l1")
        if self.given("validation_seed"):  # kohya's seeds its held-out split; ours the validation images
            self.out.pop("validation_seed")
            self.noted["validation_seed"] = "kohya seeds its held-out split with it; here the split follows --seed"
        if sdxl:
            self.default("pretrained_vae_model_name_or_path", "none", "none (the base model's own VAE)")

    def logging(self) -> None:
        """kohya logs only with logging_dir (tensorboard) or log_with; its logging_dir is relative to the working
        directory, ours to --output_dir."""
        s = self.settings
        if s.get("logging_dir"):
            self.out["logging_dir"] = str(Path(s["logging_dir"]).expanduser().absolute())
            if s.get("log_with") is None:
                self.put("report_to", "tensorboard", "logging_dir")
        self.default("report_to", "none")


def factorize(dim: int, factor: int, *, lycoris: bool) -> tuple[int, int]:
    """(w1's side, w2's side) of one dimension, as peft's and LyCORIS's `factorization` split it: a factor that
    divides the dimension is taken as is (LyCORIS: the smaller side first), else the divisor pair nearest the
    factor (-1: nearest sqrt)."""
    if factor > 0 and dim % factor == 0:
        pair = (factor, dim // factor)
        return (min(pair), max(pair)) if lycoris else pair
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        step = m + 1
        while dim % step:
            step += 1
        if step > limit:
            break
        m, n = step, dim // step
    return (min(m, n), max(m, n))


def suggestion(key: str, known: Collection[str]) -> str:
    near = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def translate(settings: dict, script: str, known: Collection[str] | None = None) -> dict:
    """A kohya training config's keys (sections flattened, dashes as underscores) as our flags' dests; our own keys
    pass through. Unsupported keys: one UserError naming every one (and, with `known`, the unknown ones)."""
    return Translation(settings, script, config=True).run(known)


def convert(settings: dict, script: str, context: dict) -> dict:
    """kohya flags of a command line as our dests, next to our flags' `context` values (no kohya defaults)."""
    return Translation(settings, script, config=False, context=context).run(None)


# -- the command line ----------------------------------------------------------------------------------------------
def add_option_strings(parser: argparse.ArgumentParser, flag: str, *names: str) -> None:
    """Give our flag `flag` more names, shown in --help beside it ("--rank RANK, --network_dim RANK"). argparse
    has no public way to add a name to an action: its option strings and the parser's index of them are extended."""
    action = parser._option_string_actions[flag]
    for name in names:
        if name not in parser._option_string_actions:
            action.option_strings.append(name)
            parser._option_string_actions[name] = action


def script_of(parser: argparse.ArgumentParser) -> str:
    return SDXL if "--decompose_factor" in parser._option_string_actions else WUERSTCHEN


def add_kohya_aliases(parser: argparse.ArgumentParser) -> None:
    """kohya's names: the same-meaning ones beside our flags in --help, the converted ones as hidden options (their
    values are converted by `rewrite_argv` before parsing); and the --config hook for kohya's training configs."""
    script = script_of(parser)
    aliases = dict(ALIASES)
    aliases["cache_latents_to_disk"] = IMAGE_CACHE[script]
    if script == WUERSTCHEN:
        aliases["cache_latents"] = IMAGE_CACHE[script]
    for kohya, dest in aliases.items():
        if f"--{dest}" in parser._option_string_actions:
            add_option_strings(parser, f"--{dest}", f"--{kohya}")
    for key in sorted(KOHYA_ONLY - set(aliases)):
        if f"--{key}" not in parser._option_string_actions:
            nargs = 0 if key in SWITCHES else "*" if key in LISTS else None
            kind = {"action": "store_true"} if nargs == 0 else {"nargs": nargs} if nargs else {}
            parser.add_argument(f"--{key}", **kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    known = {option[2:] for option in parser._option_string_actions if option.startswith("--")}
    parser.translate_settings = lambda settings: translate(settings, script, known)


# Our flags a kohya flag overrides on the same command line (kohya: max_train_epochs over max_train_steps, ...).
COMPANIONS = {
    "max_train_epochs": ("max_train_steps",),
    "unet_lr": ("learning_rate",),
    "sample_every_n_epochs": ("validation_steps", "sample_every_n_steps"),
}


def rewrite_argv(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The command line with kohya's converted flags replaced by ours (after the rest: kohya's meaning wins over
    the --config file's); a flag given both ways is refused."""
    tokens = list(sys.argv[1:] if argv is None else map(str, argv))
    script = script_of(parser)
    aliases = {f"--{k}" for k, d in ALIASES.items() if f"--{d}" in parser._option_string_actions}
    converted = {f"--{key}" for key in KOHYA_ONLY} - aliases - {"--cache_latents_to_disk"}
    settings, kept, index = {}, [], 0
    while index < len(tokens):
        name, eq, inline = tokens[index].partition("=")
        if name not in converted:
            kept.append(tokens[index])
            index += 1
            continue
        key, index = name[2:], index + 1
        if key in SWITCHES:
            settings[key] = True
        elif eq:
            settings[key] = [inline] if key in LISTS else inline
        elif key in LISTS:
            start = index
            while index < len(tokens) and not tokens[index].startswith("--"):
                index += 1
            settings[key] = tokens[start:index]
        else:
            settings[key], index = (tokens[index] if index < len(tokens) else None), index + 1
    if not settings:
        return tokens
    kept = take_companions(settings, kept)
    context = peek(kept)
    out = convert(settings, script, context)
    added = []
    for dest, value in out.items():
        action = parser._option_string_actions.get(f"--{dest}")
        if action is None:
            raise UserError(f"--{dest} (from kohya's {', '.join(sorted(settings))}) is not a flag of this script")
        typed = [t for t in kept if t.partition("=")[0] in action.option_strings]
        if typed:
            raise UserError(f"{typed[0].partition('=')[0]} and kohya's {', '.join(f'--{k}' for k in sorted(settings))}"
                            f" both set --{dest}: pass one of them")  # fmt: skip
        added += tokens_for(action, f"--{dest}", value)
    return kept + added


def take_companions(settings: dict, kept: list[str]) -> list[str]:
    """Move our flags that a kohya flag overrides from the command line into its settings."""
    remaining, index = [], 0
    names = {f"--{c}": c for key in settings for c in COMPANIONS.get(key, ())}
    while index < len(kept):
        name, eq, inline = kept[index].partition("=")
        if name in names:
            value = inline if eq else (kept[index + 1] if index + 1 < len(kept) else None)
            settings.setdefault(names[name], value)
            index += 1 if eq else 2
            continue
        remaining.append(kept[index])
        index += 1
    return remaining


def peek(tokens: list[str]) -> dict:
    """Our flags' values on a command line that kohya's conversions depend on (rank, alpha, factor, schedules);
    a value that is no number is left for argparse to name when it parses for real."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    kinds = {"rank": int, "alpha": float, "decompose_factor": int, "checkpointing_steps": int,
             "checkpointing_epochs": int}  # fmt: skip
    names = {"rank": ["--network_dim"], "checkpointing_steps": ["--save_every_n_steps"],
             "checkpointing_epochs": ["--save_every_n_epochs"]}  # fmt: skip
    for dest in kinds:
        probe.add_argument(f"--{dest}", *names.get(dest, []), dest=dest, default=None)
    for dest in ("decompose_both", "train_text_encoder"):
        probe.add_argument(f"--{dest}", action="store_true", default=None)
    try:
        known, _ = probe.parse_known_args(tokens)
    except argparse.ArgumentError:
        return {}
    values = {}
    for dest, value in vars(known).items():
        try:
            values[dest] = kinds[dest](value) if dest in kinds and value is not None else value
        except ValueError:
            continue
    return {k: v for k, v in values.items() if v is not None}
