"""kohya's training keys in tables: the same-meaning aliases of our flags, the keys noted as without effect here,
the refused ones with their reasons, the converted ones, kohya's switches and lists, and kohya's defaults where
ours differ."""

from __future__ import annotations

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
