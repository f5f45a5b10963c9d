"""One set of kohya settings as our flags' dests (`Translation`, section by section), with its refusals and notes;
`translate` for a --config file, `convert` for kohya's flags on a command line."""

from __future__ import annotations

import ast
import difflib
import logging
import math
from collections.abc import Collection
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.train.kohya_flags.keys import (
    ALIASES,
    IMAGE_CACHE,
    KOHYA_LEARNING_RATE,
    KOHYA_MAX_TRAIN_STEPS,
    KOHYA_ONLY,
    NOTED,
    REFUSED,
    SDXL,
    TRIGGERS,
)
from difftune.train.kohya_flags.lycoris import LycorisNetworkArgs

logger = logging.getLogger("difftune")

LORA_REFUSAL = (
    'this script trains LoKr (network_module = "lycoris.kohya" with network_args = ["algo=lokr"]); a LoRA '
    "trains on the Wuerstchen prior with scripts/train_wuerstchen_lora.py, not on SDXL here"
)


def is_neutral(value: object, neutral: Collection = ()) -> bool:
    """Whether a key's value leaves kohya's behaviour as without it (0 compares equal to false)."""
    return value is None or value in (False, "", [], ()) or value in neutral


class Translation(LycorisNetworkArgs):
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
