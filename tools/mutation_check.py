"""Mutation check: realistic one-line bugs, each applied in a temporary copy of the repo, run against the
tests that should catch it. Prints caught / missed per mutation and the score (`make mutation-check`).

    python tools/mutation_check.py              # every mutation (tens of minutes on 2 cores)
    python tools/mutation_check.py --only export --only snr   # those whose name contains a word
    python tools/mutation_check.py --check      # only check that every snippet is still found
    python tools/mutation_check.py --check --root ../main   # ... in another checkout

A mutation names its file by glob patterns (a module may become a package), the exact snippet it replaces
(found exactly once across those files: else it is reported STALE, to be updated after a merge), the
replacement, the pytest arguments that should catch it, and why the bug is realistic. A mutation with no
tests is one that no cheap test catches: listed with the reason, reported, and left out of the score.
Exit code: 0 when every tested mutation is caught and none is stale, else 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ("src/difftune/data/*.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    files: tuple[str, ...]  # glob patterns, relative to the repo root
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments (node ids, -k expressions); () = not caught cheaply
    why: str


def files(*patterns: str) -> tuple[str, ...]:
    return patterns


MUTATIONS = [
    # grown from `make mutation-auto` survivors (docs/mutation.md): kohya's caption rules at their edges
    Mutation(
        "init adapter: a text encoder the file lacks takes the other's modules",
        files("src/difftune/adapters/init_adapter.py"),
        "        adapted[flag] = modules\n", "        adapted[flag] = modules\n        setattr(args, flag, modules)\n",
        ("tests/test_mutation_survivors_init_adapter.py", "-k", "fresh_on_the_flags or typed_flag_not"),
        "the bug found by mutation testing: the modules recorded in the flags mid-loop, so text_encoder_two "
        "trained on (or was checked against) text_encoder_one's modules",
    ),
    Mutation(
        "captions: a draw equal to the dropout rate drops",
        files("src/difftune/data/captions.py"),
        "rng.random() < self.dropout_rate", "rng.random() <= self.dropout_rate",
        ("tests/test_mutation_survivors_captions.py",),
        "kohya drops a caption when the draw is below the rate: `<=` drops slightly more than asked",
    ),
    Mutation(
        "captions: every n-th epoch counted from 0",
        files("src/difftune/data/captions.py"),
        "(epoch + 1) % self.dropout_every_n_epochs", "epoch % self.dropout_every_n_epochs",
        ("tests/test_mutation_survivors_captions.py",),
        "kohya's epochs count from 1: the first epoch (0 here) would train on empty captions",
    ),
    Mutation(
        "captions: token warm-up still cutting at its last step",
        files("src/difftune/data/captions.py"),
        "if warmup and step < warmup:", "if warmup and step <= warmup:",
        ("tests/test_mutation_survivors_captions.py",),
        "at the warm-up step kohya keeps every tag; kohya's float expression drops one there for some counts",
    ),
    # adapters: per-module ranks and every LyCORIS LoKr layout (issue 34)
    Mutation(
        "conv rank: --conv_alpha given to every layer",
        files("src/difftune/adapters/injection.py"),
        "        alpha=args.alpha,\n        rank_pattern",
        "        alpha=conv_alpha or args.alpha,\n        rank_pattern",
        ("tests/test_conv_rank.py::test_peft_applies_each_layers_own_scale",),
        "the conv alpha (and rank) used for linear layers too: the attention trains at the conv scale",
    ),
    Mutation(
        "conv rank: 1x1 convs take --conv_rank",
        files("src/difftune/adapters/injection.py"), "        and module.kernel_size != (1, 1)\n", "",
        ("tests/test_conv_rank.py::test_conv_layers_train_at_their_own_rank_and_alpha",),
        "LyCORIS treats a 1x1 conv as a linear layer; a shortcut at the conv rank trains unlike LyCORIS",
    ),
    Mutation(
        "init adapter: te1 names without text_model. not mapped",
        files("src/difftune/adapters/init_adapter.py"),
        'names.setdefault(prefix + flat.removeprefix("text_model_"), module_name)',
        "pass",
        ("tests/test_lycoris_oracle.py", "-k", "default"),
        "LyCORIS files written under transformers 5 (lora_te1_encoder_*) refused as another architecture",
    ),
    Mutation(
        "init adapter: a module's own rank ignored",
        files("src/difftune/adapters/init_adapter.py"), "        if own != rank:\n            patterns[name] = own",
        "        pass",
        ("tests/test_conv_rank.py::test_the_kohya_export_reimports_to_the_same_deltas",),
        "a mixed-rank file's run saves no rank_pattern: peft's loader (the users' snippet) cannot read it",
    ),
    Mutation(
        "init adapter: a resumed run's file targets compared with the flags' defaults",
        files("src/difftune/train/resume.py"),
        'if args_file.is_file() and getattr(args, "init_adapter", None) and saved.get("init_adapter"):',
        "if False:",
        ("tests/test_lycoris_oracle.py::test_a_layout_peft_does_not_build_trains_resumes_and_loads_for_inference",),
        "every run started from --init_adapter refused on --resume_from_checkpoint (its targets are the file's)",
    ),
    Mutation(
        "init adapter: factor shapes peft does not build not refitted",
        files("src/difftune/adapters/lokr.py"), "        if built == shapes:", "        if True:",
        ("tests/test_lycoris_oracle.py", "-k", "unbalanced"),
        "LyCORIS's unbalanced_factorization files refused",
    ),
    # export: per-module ranks, LyCORIS-readable conv factors, fp8 bases
    Mutation(
        "export: per-module alpha ignored in export (config alpha used)",
        files("src/difftune/formats/kohya.py"),
        'return rank, alphas.get(get_pattern_key(alphas.keys(), module), config["alpha"])',
        'return rank, config["alpha"]',
        ("tests/test_export_lycoris.py::test_rank_and_alpha_patterns_export_to_kohya",),
        "alpha_pattern read nowhere but in peft: every conv exported at the run's alpha / its own rank",
    ),
    Mutation(
        "export: conv w2 written split",
        files("src/difftune/formats/kohya.py"),
        "keep_w2 = w2a is not None and not conv and", "keep_w2 = w2a is not None and",
        ("tests/test_export_lycoris.py::test_lycoris_loader_reads_every_exported_module",),
        "peft's own layout copied as is: ComfyUI reads it, LyCORIS's loader builds the conv with a wrong in_dim",
    ),
    Mutation(
        "export: fp8 tensors converted",
        files("src/difftune/formats/merged_checkpoint.py"),
        "if entry.dtype in FLOAT_CODES or (entry.dtype in FP8_CODES and entry.key in deltas):",
        "if entry.dtype in FLOAT_CODES | FP8_CODES:",
        ("tests/test_merged_checkpoint.py::test_fp8_and_bf16_single_file_bases",),
        "fp8 treated as one more float dtype: the untouched fp8 weights are re-written (and grow) in --dtype",
    ),
    # fast twins of slow tests (issue 36): each caught in seconds by tests/test_fast_twins.py
    Mutation(
        "twins: class batches resumed from the epoch's first",
        files("src/difftune/data/sampling.py", "src/difftune/data.py"),
        "enumerate(self.instance, start=self.epoch * len(self.instance) + self.start)",
        "enumerate(self.instance, start=self.epoch * len(self.instance))",
        ("tests/test_fast_twins.py::test_paired_class_batches_resume_at_any_batch_as_the_uninterrupted_run_has_them",),
        "the sampler's resume offset ignored for the class batches: a resumed DreamBooth run pairs its instance "
        "batches with other class images than the uninterrupted run (the slow test_dreambooth resume catches it too)",
    ),
    Mutation(
        "twins: the run lock taken shared",
        files("src/difftune/storage/runlock.py"),
        "        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    except BlockingIOError:\n        holder",
        "        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)\n    except BlockingIOError:\n        holder",
        ("tests/test_fast_twins.py::test_a_second_lock_on_a_held_output_dir_is_refused_with_one_line",),
        "two runs share one --output_dir, each pruning the other's checkpoints; a probe with LOCK_EX still fails, "
        "so only a second holder going through hold_output_dir shows it",
    ),
    Mutation(
        "twins: optimizer state re-packed from one process to several only",
        files("src/difftune/train/updates.py"), "        if layout.flat != self.layout.flat:\n",
        "        if layout.flat and not self.layout.flat:\n",
        ("tests/test_fast_twins.py::test_optimizer_state_is_repacked_when_the_number_of_processes_changes",),
        "the 1 -> N case written and tested, N -> 1 forgotten: a per-parameter state loaded into the packed optimizer",
    ),
    Mutation(
        "twins: optimizer state re-packed from several processes to one only",
        files("src/difftune/train/updates.py"), "        if layout.flat != self.layout.flat:\n",
        "        if not layout.flat and self.layout.flat:\n",
        ("tests/test_fast_twins.py::test_optimizer_state_is_repacked_when_the_number_of_processes_changes",),
        "the N -> 1 case only: a packed state loaded into the per-parameter optimizer",
    ),
    Mutation(
        "twins: unpacked parameters share the packed step count",
        files("src/difftune/train/updates.py"), "part[key] = chunk.clone() if torch.is_tensor(chunk) else chunk",
        "part[key] = chunk.clone() if is_elementwise(value) else chunk",
        ("tests/test_fast_twins.py::test_optimizer_state_is_repacked_when_the_number_of_processes_changes[fewer-to-more]",),
        "the bug the fast twin found: one step tensor for every member, which a fused / foreach AdamW advances once "
        "per parameter, so Adam's bias correction runs ahead after a 1 -> N resume",
    ),
    Mutation(
        "twins: resumed mid-epoch at the step's index, not the batch's",
        files("src/difftune/train/loop.py"), "self.sampler.set_epoch(epoch, start=step_in_epoch * self.accum)",
        "self.sampler.set_epoch(epoch, start=step_in_epoch)",
        ("tests/test_fast_twins.py::test_a_run_killed_while_saving_mid_epoch_resumes_to_the_uninterrupted_weights",),
        "with gradient accumulation a run resumed mid-epoch (after a kill) repeats batches and skips others",
    ),
    # issue 34 item 4: single files read by content, OpenCLIP-G's projection in either orientation, EDM refused
    Mutation(
        "single file: the extension decides safetensors",
        files("src/difftune/models/single_file.py"), "kind = content_kind(path)",
        'kind = "safetensors" if path.suffix == ".safetensors" else "unknown"',
        ("tests/test_single_file.py::test_a_safetensors_file_trains_the_same_whatever_its_name",
         "tests/test_single_file.py::test_pickles_are_refused_by_their_content_not_their_name"),
        "the name's check diffusers makes: a .sft / .SAFETENSORS file refused, a pickle named .safetensors unnamed",
    ),
    Mutation(
        "single file: text_projection renamed, not transposed",
        files("src/difftune/models/single_file.py"),
        "state[PROJECTION] = state.pop(info.linear_projection).T.contiguous()",
        "state[PROJECTION] = state.pop(info.linear_projection)",
        ("tests/test_single_file.py::test_a_text_projection_stored_transposed_loads_the_same_model",),
        "ComfyUI's text_projection.weight spelling taken as a mere rename; on the square real SDXL projection, "
        "a silently transposed text encoder 2",
    ),
    Mutation(
        "single file: EDM marker ignored beside v_pred",
        files("src/difftune/models/single_file.py"), "        if marker in keys:",
        '        if marker in keys and "v_pred" not in keys:',
        ("tests/test_single_file.py::test_edm_markers_are_refused_before_any_weights_load",),
        "ComfyUI saves EDM v-prediction models with v_pred too: trained as DDPM v-prediction, the wrong objective",
    ),
    # issue 36: cases and boundaries no test took (tests/test_boundaries.py)
    Mutation(
        "boundaries: kohya resolution [w, h] read as [h, w]",
        files(*DATA), "return sides[1], sides[0]  # kohya writes", "return sides[0], sides[1]  # kohya writes",
        ("tests/test_boundaries.py::test_a_non_square_dataset_resolution_trains_width_by_height",),
        "every test resolution was square: a non-square data set trains transposed",
    ),
    Mutation(
        "boundaries: bucket rule's resolution unpacked (w, h)",
        files(*DATA), "res_h, res_w = self.resolution", "res_w, res_h = self.resolution",
        ("tests/test_boundaries.py::test_a_non_square_dataset_resolution_trains_width_by_height",),
        "without buckets a non-square data set trains at its transpose",
    ),
    Mutation(
        "boundaries: kohya caption extension default .txt",
        files(*DATA), 'KOHYA_CAPTION_EXTENSION = ".caption"', 'KOHYA_CAPTION_EXTENSION = ".txt"',
        ("tests/test_boundaries.py::test_kohya_folders_without_caption_extension_read_dot_caption",
         "tests/test_boundaries.py::test_a_dataset_config_without_caption_extension_reads_dot_caption"),
        "every test config named its extension: kohya's .caption files silently ignored",
    ),
    Mutation(
        "boundaries: plain folder caption extension default .caption",
        files("src/difftune/data/sources.py"), 'extension = getattr(args, "caption_extension", None) or ".txt"',
        'extension = getattr(args, "caption_extension", None) or ".caption"',
        ("tests/test_boundaries.py::test_a_plain_folder_without_caption_extension_reads_dot_txt",),
        "the two defaults confused: a plain folder's .txt captions ignored",
    ),
    Mutation(
        "boundaries: --instance_prompt wins over kohya class tokens",
        files(*DATA), "fallback = subset.class_tokens if subset.class_tokens is not None else fallback_prompt",
        "fallback = fallback_prompt or subset.class_tokens",
        ("tests/test_boundaries.py::test_instance_prompt_does_not_replace_kohya_class_tokens",),
        "no test passed --instance_prompt with kohya folders: their class tokens silently replaced",
    ),
    Mutation(
        "boundaries: palette transparency not an alpha channel",
        files(*DATA), 'return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info',
        'return image.mode in ("RGBA", "LA", "PA", "RGBa", "La")',
        ("tests/test_boundaries.py::test_a_palette_png_with_transparency_loads_as_rgb_and_masks_by_its_transparency",),
        "a mode P PNG with tRNS trains unmasked with --alpha_mask",
    ),
    Mutation(
        "boundaries: ss_network_alpha is peft's alpha",
        files("src/difftune/formats/kohya.py"), '"ss_network_alpha": str(config["r"]),',
        '"ss_network_alpha": str(config["alpha"]),',
        ("tests/test_boundaries.py::test_exported_kohya_metadata_matches_the_stored_tensors",),
        "the metadata disagrees with the stored .alpha tensors (tools reading the metadata scale wrongly)",
    ),
    Mutation(
        "boundaries: --init_adapter misses --flag=value",
        files("src/difftune/adapters/init_adapter.py"),
        'return {t[2:].split("=")[0] for t in tokens if t.startswith("--")}',
        'return {t[2:] for t in tokens if t.startswith("--")}',
        ("tests/test_boundaries.py::test_init_adapter_refuses_a_contradicting_flag_given_with_equals",),
        "--rank=3 silently replaced by the adapter's rank instead of refused",
    ),
    Mutation(
        "boundaries: --config misses --flag=value on the command line",
        files("src/difftune/cli/config_file.py"),
        'typed = {token.split("=", 1)[0] for token in argv if token.startswith("-")}',
        'typed = {token for token in argv if token.startswith("-")}',
        ("tests/test_boundaries.py::test_a_repeatable_flag_with_equals_replaces_the_settings_files",),
        "a repeatable flag typed as --flag=value adds to the file's values instead of replacing them",
    ),
    Mutation(
        "boundaries: kohya clash check misses --flag=value",
        files("src/difftune/train/kohya_flags/command_line.py"),
        'typed = [t for t in kept if t.partition("=")[0] in action.option_strings]',
        "typed = [t for t in kept if t in action.option_strings]",
        ("tests/test_boundaries.py::test_kohya_flags_with_equals_convert_and_clash_as_with_a_space",),
        "a flag given both ways, ours as --flag=value, is silently overridden by kohya's",
    ),
    Mutation(
        "boundaries: class image batches counted with //",
        files("src/difftune/generate/class_images.py"), "batches = sorted({index // batch_size for index in todo})",
        "batches = range(len(todo) // batch_size)",
        ("tests/test_boundaries.py::test_class_images_generated_in_batches_are_as_many_as_wanted",),
        "5 images in batches of 2: the last one never generated (batches that divide evenly hide it)",
    ),
    Mutation(
        "boundaries: exactly --num_class_images refused without --class_prompt",
        files(*DATA), "if found < args.num_class_images and not args.class_prompt:",
        "if found <= args.num_class_images and not args.class_prompt:",
        ("tests/test_boundaries.py::test_num_class_images_present_needs_no_class_prompt_and_one_less_does",),
        "a full class folder asks for a prompt to generate nothing",
    ),
    Mutation(
        "boundaries: --l 0 refused",
        files("src/difftune/generate/prompts.py"), "if not (math.isfinite(value) and value >= 0):",
        "if not (math.isfinite(value) and value > 0):",
        ("tests/test_boundaries.py::test_prompt_options_at_their_bounds",),
        "guidance 0 (unguided previews) refused",
    ),
    Mutation(
        "boundaries: prompt option range open at its low end",
        files("src/difftune/generate/prompts.py"), "if not low <= value <= high:", "if not low < value <= high:",
        ("tests/test_boundaries.py::test_prompt_options_at_their_bounds",),
        "--w 64, --s 1 and --d 0 refused",
    ),
    Mutation(
        "boundaries: merged checkpoint's missing-key check dropped",
        files("src/difftune/formats/merged_checkpoint.py"),
        "missing = sorted(set(deltas) - {e.key for e in entries})", "missing = []",
        ("tests/test_boundaries.py::test_merging_into_a_base_without_the_adapted_weight_is_refused",),
        "an adapter for another base exported as the base alone, without a word",
    ),
    Mutation(
        "boundaries: damaged manifest taken as missing",
        files("src/difftune/storage/integrity.py"),
        'return f"{path} is unreadable"\n    entries = ', "return None\n    entries = ",
        ("tests/test_boundaries.py::test_a_damaged_manifest_is_not_taken_as_missing",),
        "a checkpoint whose manifest is damaged resumes unverified",
    ),
    Mutation(
        "boundaries: manifest's shape not checked",
        files("src/difftune/storage/integrity.py"),
        'if not all(isinstance(want, dict) and {"size", CHECKSUM} <= set(want) for want in entries):', "if False:",
        ("tests/test_boundaries.py::test_a_damaged_manifest_is_not_taken_as_missing",),
        "a manifest damaged into other JSON (null, a list) crashes `latest` with a traceback",
    ),
    Mutation(
        "boundaries: masked_loss dropped from the refused-on-resume table",
        files("src/difftune/train/resume.py"), '"multires_noise_discount", "proportion_empty_prompts", "masked_loss",',
        '"multires_noise_discount", "proportion_empty_prompts",',
        ("tests/test_boundaries.py::test_every_refused_flag_is_refused_when_changed_on_resume",),
        "a resumed run silently changes its objective",
    ),
    Mutation(
        "boundaries: mtime dropped from the scan key",
        files(*DATA), 'return f"{os.path.abspath(path)}|{stat[0]}|{stat[1]}"',
        'return f"{os.path.abspath(path)}|{stat[0]}"',
        ("tests/test_boundaries.py::test_an_image_rewritten_to_the_same_size_is_scanned_again",),
        "an image rewritten to the same byte size keeps its former scan (size, readability)",
    ),
    # adapters: the flags that build the peft config and the optimizer groups
    Mutation(
        "adapters: LoKr alpha from --rank",
        files("src/difftune/adapters/injection.py"), "alpha=args.alpha,", "alpha=args.rank,",
        ("tests/test_adapters.py::test_lokr_config_has_every_flag_s_value",),
        "every LoKr trained at strength 1 instead of alpha / rank; a copy-paste slip",
    ),
    Mutation(
        "adapters: --text_encoder_lr ignored",
        files("src/difftune/adapters/injection.py"), '"lr": args.text_encoder_lr or args.learning_rate',
        '"lr": args.learning_rate',
        ("tests/test_adapters.py::test_text_encoder_lr_sets_the_text_encoders_group",),
        "the flag silently does nothing",
    ),
    Mutation(
        "adapters: --decompose_both dropped",
        files("src/difftune/adapters/injection.py"), "decompose_both=args.decompose_both,", "decompose_both=False,",
        ("tests/test_adapters.py::test_lokr_config_has_every_flag_s_value",),
        "a flag not passed on to peft",
    ),
    Mutation(
        "adapters: --lokr_init ignored",
        files("src/difftune/adapters/injection.py"),
        'init_weights="lycoris" if args.lokr_init == "lycoris" else True,', "init_weights=True,",
        ("tests/test_adapters.py::test_lokr_config_has_every_flag_s_value",),
        "LyCORIS init silently replaced by peft's",
    ),
    Mutation(
        "adapters: LoRA lora_alpha from --rank",
        files("src/difftune/adapters/injection.py"), "lora_alpha=args.lora_alpha,", "lora_alpha=args.rank,",
        ("tests/test_adapters.py::test_lora_config_has_every_flag_s_value",),
        "Wuerstchen LoRA at the wrong strength",
    ),
    Mutation(
        "adapters: adapter weights cast to the model's dtype",
        files("src/difftune/adapters/injection.py"), "parameter.data = parameter.data.float()",
        "parameter.data = parameter.data.to(model.dtype)",
        ("tests/test_adapters.py::test_adapters_on_a_bf16_model_are_fp32",),
        "bf16 adapter weights under DDP (the frozen model's dtype): small updates round away. peft keeps new "
        "adapters fp32 itself (dropping the cast changes nothing), and with one process the optimizer's flat fp32 "
        "buffer hides a bf16 adapter, so the in-process bf16 run cannot see this one",
    ),
    Mutation(
        "adapters: --gradient_checkpointing ignored",
        files("src/difftune/adapters/injection.py"), "    if args.gradient_checkpointing:\n", "    if False:\n",
        ("tests/test_options.py::test_gradient_checkpointing_gives_the_same_weights[train_sdxl_lokr-sdxl_args]",),
        "the flag silently does nothing: the memory saving is lost",
    ),
    Mutation(
        "adapters: text encoders not checkpointed",
        files("src/difftune/adapters/injection.py"),
        'model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})', "pass",
        ("tests/test_options.py::test_gradient_checkpointing_gives_the_same_weights[train_sdxl_lokr-sdxl_args]",),
        "only the denoiser checkpointed",
    ),
    # layers: the packages import only downward, and no module imports itself back (tests/test_layers.py)
    Mutation(
        "layers: the error handler imports the run lock again",
        files("src/difftune/cli/errors.py"), "        for release in _on_exit:\n            release()\n",
        "        from difftune.storage import runlock\n\n        runlock.release_all()\n",
        ("tests/test_layers.py::test_the_library_imports_only_downward_and_has_no_cycles",),
        "the bottom layer knowing a higher one (a cycle: runlock raises UserError); it runs, since the import is late",
    ),
    Mutation(
        "layers: DreamBooth's class rows import the data sources back",
        files("src/difftune/data/dreambooth.py"), "    source = f\"--class_data_dir {args.class_data_dir}\"\n",
        "    from difftune.data.sources import checked_selection  # noqa: F811\n\n"
        "    source = f\"--class_data_dir {args.class_data_dir}\"\n",
        ("tests/test_layers.py::test_the_library_imports_only_downward_and_has_no_cycles",),
        "the cycle this package had (sources <-> dreambooth), hidden in a function: it runs, and ties the two together",
    ),
    # export: SGM names and the scale ComfyUI / A1111 apply
    Mutation(
        "export: resnet conv1 / conv2 swapped",
        files("src/difftune/models/sgm_layout.py"),
        '"conv1": "in_layers.2",\n    "time_emb_proj": "emb_layers.1",\n    "norm2": "out_layers.0",\n'
        '    "conv2": "out_layers.3",',
        '"conv1": "out_layers.3",\n    "time_emb_proj": "emb_layers.1",\n    "norm2": "out_layers.0",\n'
        '    "conv2": "in_layers.2",',
        ("tests/test_export_infer.py::test_every_module_s_delta_lands_on_its_sgm_name",),
        "ComfyUI applies conv deltas to the wrong layer (both names exist, so sets of names agree)",
    ),
    Mutation(
        "export: downsampler one block early",
        files("src/difftune/models/sgm_layout.py"),
        'f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op{m[2]}"',
        'f"input_blocks.{per_block * int(m[1]) + 1}.0.op{m[2]}"',
        ("tests/test_export_infer.py::test_every_module_s_delta_lands_on_its_sgm_name",),
        "an off-by-one in the block index",
    ),
    Mutation(
        "export: upsampler slot ignores the attention",
        files("src/difftune/models/sgm_layout.py"),
        "position = 2 if block in up_blocks_with_attention else 1", "position = 1",
        ("tests/test_export_infer.py::test_every_module_s_delta_lands_on_its_sgm_name",),
        "upsamplers after attention blocks named as if there were none",
    ),
    Mutation(
        "export: mid-block resnet index",
        files("src/difftune/models/sgm_layout.py"), 'f"middle_block.{2 * int(m[1])}.', 'f"middle_block.{int(m[1])}.',
        ("tests/test_export_infer.py::test_every_module_s_delta_lands_on_its_sgm_name",),
        "forgetting the attention between the two mid resnets",
    ),
    Mutation(
        "export: down-block index without conv_in",
        files("src/difftune/models/sgm_layout.py"),
        "index = per_block * block + layer + 1", "index = per_block * block + layer",
        ("tests/test_export_infer.py::test_every_module_s_delta_lands_on_its_sgm_name",),
        "input_blocks.0 is conv_in: an off-by-one",
    ),
    Mutation(
        "export: alpha / r not folded into w1",
        files("src/difftune/formats/kohya.py"),
        "lycoris_layout(weights, shapes[module], alpha / rank, rank)",
        "lycoris_layout(weights, shapes[module], 1.0, rank)",
        ("tests/test_export_infer.py::test_every_module_s_delta_lands_on_its_sgm_name",),
        "every exported LoKr at the wrong strength when alpha != rank",
    ),
    Mutation(
        "export: stored alpha is peft's alpha",
        files("src/difftune/formats/kohya.py"),
        'out["alpha"] = torch.tensor(float(w2a.shape[1] if keep_w2 else rank))',
        'out["alpha"] = torch.tensor(float(scale * rank))',
        ("tests/test_export_infer.py::test_trained_checkpoint_exports_exact_deltas",),
        "ComfyUI then scales split factors by alpha / dim a second time",
    ),
    Mutation(
        "scripts/export.py: --ema ignored",
        files("scripts/export.py"),
        "weights = adapter_dir(args.checkpoint, args.ema)\n    models = [",
        "weights = adapter_dir(args.checkpoint, False)\n    models = [",
        ("tests/test_export_infer.py::test_ema_exports_the_ema_adapter",),
        "the live weights exported when the EMA was asked for",
    ),
    # objectives
    Mutation(
        "objectives: min-SNR for v-prediction divides by snr",
        files("src/difftune/train/objectives.py"),
        "weights = weights * clipped / ((snr + 1) if v_prediction else snr)", "weights = weights * clipped / snr",
        ("tests/test_objectives.py", "-k", "min_snr_weights"),
        "the epsilon formula used for every parameterisation",
    ),
    Mutation(
        "objectives: debiased estimation ignores v-prediction",
        files("src/difftune/train/objectives.py"),
        "weights = weights / ((snr_t + 1) if v_prediction else torch.sqrt(snr_t))",
        "weights = weights / torch.sqrt(snr_t)",
        ("tests/test_objectives.py", "-k", "debiased"),
        "kohya's epsilon weighting used for v-prediction",
    ),
    Mutation(
        "objectives: noise offset one value per sample",
        files("src/difftune/train/objectives.py"), "x0.shape[0], x0.shape[1], 1, 1, device=x0.device",
        "x0.shape[0], 1, 1, 1, device=x0.device",
        ("tests/test_objectives.py", "-k", "noise_offset"),
        "the offset shifts brightness, not each channel (colour)",
    ),
    Mutation(
        "objectives: Huber snr schedule not squared",
        files("src/difftune/train/objectives.py"), "return (1 - c) / (1 + sigma) ** 2 + c",
        "return (1 - c) / (1 + sigma) + c",
        ("tests/test_objectives.py", "-k", "huber"),
        "a dropped exponent",
    ),
    Mutation(
        "objectives: 'later' bias weights the early timesteps",
        files("src/difftune/train/objectives.py"), "weights[-count:] *= multiplier", "weights[count:] *= multiplier",
        ("tests/test_objectives.py", "-k", "timestep_bias"),
        "a slice sign slip",
    ),
    Mutation(
        "objectives: cubic sampling favours clean steps",
        files("src/difftune/train/objectives.py"),
        "self.at_fractions(1 - torch.rand(batch_size, device=device) ** 3, dtype)",
        "self.at_fractions(torch.rand(batch_size, device=device) ** 3, dtype)",
        ("tests/test_objectives.py", "-k", "cubic"),
        "u^3 instead of 1 - u^3",
    ),
    # lokr: the factored forward
    Mutation(
        "lokr: factored forward drops the scaling",
        files("src/difftune/adapters/lokr.py"), "w1 = w1 * self.scaling[adapter_name]", "w1 = w1",
        ("tests/test_lokr_factored.py", "-k", "test_factored_lokr_matches_peft"),
        "alpha / r lost in the fast path only",
    ),
    Mutation(
        "lokr: rank dropout not rescaled",
        files("src/difftune/adapters/lokr.py"), "if self.rank_dropout_scale[adapter_name]:", "if False:",
        ("tests/test_lokr_factored.py", "-k", "test_factored_lokr_matches_peft"),
        "--rank_dropout with rank_dropout_scale differs from peft",
    ),
    Mutation(
        "lokr: conv layers switched to the Linear forward",
        files("src/difftune/adapters/lokr.py"), "if type(module) is layer_type:", 'if hasattr(module, "lokr_w1"):',
        ("tests/test_lokr_factored.py::test_conv_layers_keep_peft_s_path",),
        "a duck-typed check that also catches LoKr Conv2d layers",
    ),
    # data
    Mutation(
        "data: centre crop offsets swapped",
        files(*DATA), "top, left = round((resized_h - target_h) / 2), round((resized_w - target_w) / 2)",
        "top, left = round((resized_w - target_w) / 2), round((resized_h - target_h) / 2)",
        ("tests/test_data.py", "-k", "landscape or portrait"),
        "height and width mixed up: wrong crop and wrong SDXL crop conditioning",
    ),
    Mutation(
        "data: flipped crop's left not mirrored",
        files(*DATA), "left = resized_w - left - target_w", "left = left",
        ("tests/test_data.py", "-k", "random_crop_and_flip"),
        "SDXL's crop conditioning wrong for flipped images",
    ),
    Mutation(
        "data: sampler ignores the resume position",
        files(*DATA), "for batch in self.global_batches()[self.start :]:", "for batch in self.global_batches():",
        ("tests/test_data.py", "-k", "sampler_shards"),
        "a resumed epoch repeats its first batches",
    ),
    Mutation(
        "data: same order every epoch",
        files(*DATA), "torch.Generator().manual_seed(self.seed + self.epoch)",
        "torch.Generator().manual_seed(self.seed)",
        ("tests/test_data.py", "-k", "sampler_shards"),
        "no reshuffling between epochs",
    ),
    Mutation(
        "data: same captions dropped every epoch",
        files(*DATA), 'sample_rng(self.seed, self.epoch, index, "empty-prompt")',
        'sample_rng(self.seed, 0, index, "empty-prompt")',
        ("tests/test_objectives.py", "-k", "caption_dropout"),
        "some images never trained unconditionally, others always",
    ),
    # cache and the cached encodings
    Mutation(
        "cache: key ignores the resolution",
        files("src/difftune/data/cache.py"), '"resolution": args.resolution,\n', "",
        ("tests/test_cache_buckets.py", "-k", "reused_and_rebuilt"),
        "a run at another resolution trains on stale latents",
    ),
    Mutation(
        "cache: a size group's rows all take its first row's size conditioning",
        files("src/difftune/data/cache.py"), 'group["time_ids"][position]', 'group["time_ids"][0]',
        ("tests/test_cache_buckets.py::test_image_cache_holds_what_live_loading_gives",),
        "the workers stack each size group's time_ids: an index slip gives every row the same crop and size",
    ),
    Mutation(
        "sdxl: cached latents use the posterior mean",
        files("src/difftune/models/sdxl.py"),
        "sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=vae_dtype)", "sample = mean",
        ("tests/test_cache_buckets.py::test_cached_training_gives_the_same_losses[train_sdxl_lokr-sdxl_args-caches0]",),
        "cached runs train on other latents than live ones",
    ),
    # checkpoints
    Mutation(
        "checkpoints: steps sorted as strings",
        files("src/difftune/storage/checkpoints.py"), "found.append((int(match.group(1)), path))",
        "found.append((match.group(1), path))",
        ("tests/test_reliability.py", "-k", "latest_is_the_highest"),
        "'latest' picks step9 over step10",
    ),
    Mutation(
        "checkpoints: incomplete checkpoint counts as complete",
        files("src/difftune/storage/checkpoints.py"), "return (path / STATE_FILE).is_file()", "return path.is_dir()",
        ("tests/test_reliability.py", "-k", "latest_is_the_highest"),
        "a run killed mid-save resumes from a half-written checkpoint",
    ),
    Mutation(
        "checkpoints: pruning deletes the best one",
        files("src/difftune/storage/checkpoints.py"), "if path == best:", "if False:",
        ("tests/test_evaluation.py", "-k", "pruning"),
        "--checkpoints_total_limit removes the checkpoint with the best held-out loss",
    ),
    Mutation(
        "checkpoints: --overwrite_output_dir refused",
        files("src/difftune/storage/checkpoints.py"), "if found and resume_from is None and not overwrite:",
        "if found and resume_from is None:",
        ("tests/test_reliability.py", "-k", "output_dir_with_another_run"),
        "the flag silently does nothing",
    ),
    Mutation(
        "checkpoints: --overwrite_output_dir deletes the old run before the first checkpoint completes",
        files("src/difftune/storage/checkpoints.py"), "        path.rename(aside / path.name)\n",
        "        shutil.rmtree(path)\n",
        ("tests/test_reliability.py", "-k", "overwrite_output_dir_killed_at_any_write"),
        "issue 35: a kill during the new run's first save leaves neither run",
    ),
    Mutation(
        "checkpoints: `latest` ignores lineage",
        files("src/difftune/storage/checkpoints.py"), "return integrity.newest_sound(on_timeline(found))",
        "return integrity.newest_sound(found)",
        ("tests/test_reliability.py", "-k", "follows_the_newest_checkpoint"),
        "issue 35: after a resume by path from an older step, `latest` continues the abandoned old timeline",
    ),
    Mutation(
        "shards: an interrupted build's shards trusted without verification",
        files("src/difftune/storage/shards.py"),
        "todo = [s for s in shards if verified(shard_file(path, s)) is None]",
        "todo = [s for s in shards if not shard_file(path, s).is_file()]",
        ("tests/test_integrity.py", "-k", "damaged_shard_of_an_interrupted_build"),
        "issue 35: a damaged shard left by a killed build is reused, and complete.json records its checksum",
    ),
    # training and updates
    Mutation(
        "training: optimizer state not restored on resume",
        files("src/difftune/train/loop.py"), "        self.update.load(resume_dir)\n", "",
        ("tests/test_reliability.py::test_resume_equals_uninterrupted_run[sdxl]",),
        "Adam restarts from zero moments after every resume",
    ),
    Mutation(
        "training: lr schedule not restored on resume",
        files("src/difftune/train/loop.py"),
        "self.lr_scheduler.load_state_dict(checkpoints.load_torch_state(resume_dir / checkpoints.SCHEDULER_FILE))",
        "pass",
        ("tests/test_reliability.py::test_resume_equals_uninterrupted_run[sdxl]",),
        "warm-up starts again after a resume",
    ),
    Mutation(
        "training: resumed mid-epoch from the epoch's start",
        files("src/difftune/train/loop.py"), "self.sampler.set_epoch(epoch, start=step_in_epoch * self.accum)",
        "self.sampler.set_epoch(epoch)",
        ("tests/test_reliability.py::test_resume_equals_uninterrupted_run[sdxl]",),
        "a resumed run repeats batches",
    ),
    Mutation(
        "training: the same noise every step",
        files("src/difftune/train/loop.py"), 'f"{seed}:{step}:{micro_batch}:{process_index}"',
        'f"{seed}:{micro_batch}:{process_index}"',
        ("tests/test_reliability.py", "-k", "own_noise"),
        "every step draws the same noise and timesteps",
    ),
    Mutation(
        "training: one non-finite step too few allowed",
        files("src/difftune/train/loop.py"), "if self.nonfinite_steps > limit:", "if self.nonfinite_steps >= limit:",
        ("tests/test_reliability.py::test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints[none]",),
        "--max_nonfinite_steps N stops at the N-th",
    ),
    Mutation(
        "updates: flattened groups lose their learning rate",
        files("src/difftune/train/updates.py"), 'flat_groups.append({**group, "params": [flat_param]})',
        'flat_groups.append({"params": [flat_param]})',
        ("tests/test_sdxl_training.py::test_text_encoder_training_in_bf16",),
        "--text_encoder_lr lost in the optimizer only",
    ),
    Mutation(
        "updates: accumulated gradients not averaged",
        files("src/difftune/train/updates.py"), "self.accelerator.backward(loss / micro_batches)",
        "self.accelerator.backward(loss)",
        (),
        "not caught cheaply: Adam's step hardly depends on the gradient's scale; the slow ZeRO-2 test "
        "(GRADIENT_SENSITIVE, DeepSpeed's own accumulation against DDP) catches it in minutes",
    ),
    Mutation(
        "resume: a seedless run draws a new seed on resume",
        files("src/difftune/train/resume.py"), "    if seed is not None:\n        args.seed = seed\n",
        "",
        ("tests/test_resume.py::test_a_seedless_run_resumes_with_its_own_seed",),
        "held-out images trained on, data order and noise changed after every resume",
    ),
    Mutation(
        "resume: a changed learning rate ignored",
        files("src/difftune/train/resume.py"), "    if base_lrs == list(lr_scheduler.base_lrs):\n        return\n",
        "    return\n",
        ("tests/test_resume.py::test_a_changed_learning_rate_and_weight_decay_apply_and_are_recorded",),
        "the log and args.json say one learning rate, the optimizer uses the old one",
    ),
    Mutation(
        "resume: the adapter's alpha may change",
        files("src/difftune/train/resume.py"), '"rank", "alpha", "conv_rank",', '"rank", "conv_rank",',
        ("tests/test_resume.py", "-k", "refused_on_resume"),
        "the adapter's scale jumps on resume",
    ),
    Mutation(
        "data: the epoch's last partial accumulation dropped",
        files("src/difftune/data/sampling.py", "src/difftune/data.py"),
        "math.ceil(batches_per_epoch / gradient_accumulation_steps)",
        "batches_per_epoch // gradient_accumulation_steps",
        ("tests/test_resume.py::test_every_image_trains_once_per_epoch_with_a_partial_last_accumulation",),
        "some images never trained on in any epoch while the log counts them",
    ),
    Mutation(
        "updates: packed optimizer state cut at the wrong offsets",
        files("src/difftune/train/updates.py"),
        "state[index + offset] = {k: v.view(shape)",
        "state[index] = {k: v.view(shape)",
        ("tests/test_resume.py::test_optimizer_state_moves_between_packed_and_per_parameter_layouts",),
        "resuming under another number of processes loads the wrong moments",
    ),
    Mutation(
        "integrity: sizes compared, checksums not",
        files("src/difftune/storage/integrity.py"), "if digest(path)[CHECKSUM] != want[CHECKSUM]:", "if False:",
        ("tests/test_integrity.py", "-k", "named_damaged_checkpoint or damaged_cache_shard"),
        "flipped bytes in a checkpoint or a cache shard pass as sound",
    ),
    Mutation(
        "run_setup: the output dir is not locked",
        files("src/difftune/train/run_setup.py"), "        runlock.hold_output_dir(output_dir)\n", "        pass\n",
        ("tests/test_integrity.py::test_a_second_run_on_the_same_output_dir_stops_and_a_killed_one_leaves_no_lock",),
        "two runs on one folder interleave their checkpoints",
    ),
    Mutation(
        "data: kohya repeats ignored",
        files("src/difftune/data/dataset.py"),
        "self.sample_rows = [row for row, count in enumerate(repeats) for _ in range(count)]",
        "self.sample_rows = list(range(len(repeats)))",
        ("tests/test_user_data.py::test_kohya_folder_trains_one_epoch_with_repeats",),
        "10_sks dog trains each image once per epoch",
    ),
    Mutation(
        "run_setup: --overwrite_output_dir deletes the old run before the new one has trained",
        files("src/difftune/train/run_setup.py"),
        "checkpoints.clean_output_dir(output_dir)  #",
        "checkpoints.clean_output_dir(output_dir), args.overwrite_output_dir and "
        "checkpoints.move_old_run_aside(output_dir)  #",
        ("tests/test_resume.py::test_overwrite_with_resume_is_refused_before_anything_is_touched",),
        "a typo in the data path destroys the run the user meant to replace only with a working one",
    ),
    # ema and evaluation
    Mutation(
        "ema: power warm-up always on",
        files("src/difftune/adapters/ema.py"), "use_ema_warmup=args.ema_power is not None,", "use_ema_warmup=True,",
        ("tests/test_options.py::test_ema_checkpoint_is_the_average_of_the_live_weights[default-warmup]",),
        "the documented (1+t)/(10+t) decay replaced",
    ),
    Mutation(
        "ema: validation sees the live weights",
        files("src/difftune/adapters/ema.py"), "param.data = shadow.to(param.dtype)", "param.data = param.data",
        ("tests/test_options.py", "-k", "validation_images_come_from_the_ema"),
        "validation images say nothing about the EMA",
    ),
    Mutation(
        "training: EMA not restored on resume",
        files("src/difftune/train/loop.py"), "            self.ema.load(resume_dir)\n", "            pass\n",
        ("tests/test_options.py", "-k", "optimizer_and_ema_resume_exactly and adafactor"),
        "the average restarts from the resumed weights",
    ),
    Mutation(
        "evaluation: the same noise for every held-out sample",
        files("src/difftune/train/evaluation.py"), "  torch.manual_seed(seed + j * EVAL_TIMESTEPS + k)",
        "  torch.manual_seed(seed + k)",
        ("tests/test_evaluation.py", "-k", "eval_data_dir_is_held_out"),
        "the documented held-out loss is another number",
    ),
    Mutation(
        "evaluation: held-out samples also trained on",
        files("src/difftune/train/evaluation.py"), "return sorted(order[held:]), sorted(order[:held])",
        "return sorted(order), sorted(order[:held])",
        ("tests/test_evaluation.py", "-k", "split_is_seeded"),
        "the held-out loss measures memorisation",
    ),
    # scripts and their model code
    Mutation(
        "sdxl: pooled output detached",
        files("src/difftune/models/sdxl.py"), "return prompt_embeds, out_two.text_embeds",
        "return prompt_embeds, out_two.text_embeds.detach()",
        ("tests/test_sdxl_training.py::test_text_encoder_training_in_bf16",),
        "the second text encoder's last layer never trains",
    ),
    Mutation(
        "train_sdxl_lokr.py: text encoders run without gradients",
        files("scripts/train_sdxl_lokr.py"), "with torch.set_grad_enabled(args.train_text_encoder):",
        "with torch.no_grad():",
        ("tests/test_sdxl_training.py::test_text_encoder_training_in_bf16",),
        "--train_text_encoder trains nothing",
    ),
    Mutation(
        "wuerstchen: image embeddings not shifted",
        files("src/difftune/models/wuerstchen.py"), "EMBEDDING_SHIFT, EMBEDDING_SCALE = 1.0, 42.0",
        "EMBEDDING_SHIFT, EMBEDDING_SCALE = 0.0, 42.0",
        ("tests/test_evaluation.py", "-k", "eval_data_dir_is_held_out"),
        "the prior trained on latents outside its range",
    ),
    # personalisation (issue 20), the lean LoRA forward and the JPEG decode
    Mutation(
        "personal: the loss mask not flipped with its image",
        files(*DATA), "None if mask is None else F.hflip(mask)", "mask",
        ("tests/test_masked_loss.py::test_mask_follows_the_crop_and_the_flip",),
        "a flipped image trains the wrong half: the subject's mask lands on the background",
    ),
    Mutation(
        "personal: --prior_loss_weight dropped",
        files("src/difftune/train/objectives.py"), '("prior", is_class, weight)', '("prior", is_class, 1.0)',
        ("tests/test_dreambooth.py::test_instance_and_class_batches_of_different_sizes_run_as_parts_with_the_same_loss",),
        "the class images weigh as much as the subject whatever the flag says",
    ),
    Mutation(
        "personal: a prompt line's --d seed ignored",
        files("src/difftune/generate/validation.py"), 'entry.get("seed", seed)', "seed",
        ("tests/test_validation_prompts.py::test_sdxl_validation_images_follow_each_prompt_s_settings",),
        "every prompt of a file sampled from the run's seed: the line's seed silently does nothing",
    ),
    Mutation(
        "dreambooth: the instance folder not checked before class images are generated",
        files("src/difftune/data/dreambooth.py"), "        check_instance_folder(args)\n", "        pass\n",
        ("tests/test_dreambooth.py", "-k", "instance_folder"),
        "minutes of class-image generation, then an error about an empty or uncaptioned instance folder",
    ),
    Mutation(
        "lora: the lean forward's update computed but not added in place",
        files("src/difftune/adapters/lora.py"), "result.addmm_(h, up.t()", "result.addmm(h, up.t()",
        ("tests/test_cascade.py::test_the_lean_lora_forward_equals_peft",),
        "addmm for addmm_: the update goes to a discarded tensor and the LoRA trains nothing",
    ),
    Mutation(
        "lora: the lean forward's factor left in fp32 under autocast",
        files("src/difftune/adapters/lora.py"), "up.t().to(result.dtype))", "up.t())",
        ("tests/test_cascade.py::test_the_lean_lora_forward_equals_peft",),
        "in-place ops escape autocast: every --mixed_precision run stops at its first LoRA layer",
    ),
    Mutation(
        "lora: the lean forward drops the scaling",
        files("src/difftune/adapters/lora.py"), "up = lora_B.weight if scaling == 1 else lora_B.weight * scaling",
        "up = lora_B.weight",
        ("tests/test_cascade.py::test_the_lean_lora_forward_equals_peft",),
        "every LoRA trained at strength 1 instead of alpha / rank, unlike the peft layer that loads it",
    ),
    Mutation(
        "images: a JPEG's decoded size in SDXL's conditioning",
        files(*DATA), "image, target, rng, flip, mask, original, resized=resized, face=face",
        "image, target, rng, flip, mask, resized=resized, face=face",
        ("tests/test_data.py::test_a_large_jpeg_decodes_small_but_keeps_its_size_in_the_conditioning",),
        "SDXL conditioned on the reduced decode's size instead of the photo's: low-resolution conditioning",
    ),
    # kohya's data rules (issue 30): each the slip that made a kohya data set train otherwise
    Mutation(
        "kohya: nearest bucket by log ratio",
        files("src/difftune/data/buckets.py"), "key=lambda b: abs(b[1] / b[0] - ratio))",
        "key=lambda b: abs(math.log(b[1] / b[0] / ratio)))",
        ("tests/test_kohya_data.py", "-k", "kohyas_bucket"),
        "the former rule (log-scale nearest): a 640x480 photo at 1024 trains at 1152x896, not kohya's 1024x768",
    ),
    Mutation(
        "kohya: tags re-joined with the separator",
        files("src/difftune/data/captions.py"), 'return ", ".join(fixed + free + fixed_suffix)',
        'return f"{self.separator} ".join(fixed + free + fixed_suffix)',
        ("tests/test_kohya_data.py", "-k", "folder_and_caption_rules"),
        "the former join: with caption_separator ';' kohya trains 'c, a, b, d', this trains 'c; a; b; d'",
    ),
    Mutation(
        "kohya: every line of a caption file an alternative",
        files("src/difftune/data/folders.py"), "    if not all_lines:\n        return [lines[0].strip()]\n", "",
        ("tests/test_kohya_data.py", "-k", "folder_and_caption_rules"),
        "the former reading: a random line of a multi-line caption file, where kohya trains the first",
    ),
    Mutation(
        "kohya: regularisation images counted once",
        files("src/difftune/data/subsets.py"), "            added = count if first_round else 1",
        "            added = count",
        ("tests/test_dreambooth.py", "-k", "regularisation"),
        "repeating whole subsets overshoots kohya's count: more regularisation samples per epoch than kohya trains",
    ),
    Mutation(
        "kohya: random crop when the config has no random_crop",
        files("src/difftune/data/sources.py"), "center_crop=not augment.random_crop", "center_crop=False",
        ("tests/test_kohya_data.py", "-k", "random_crop_default"),
        "the former default: without the key kohya crops the centre",
    ),
    Mutation(
        "kohya: last smaller batch of a bucket dropped",
        files("src/difftune/data/sources.py"), "    dataset.keep_partial_batches = True\n", "",
        ("tests/test_kohya_data.py", "-k", "own_batch_size"),
        "a bucket's images beyond its last full batch never train in an epoch (kohya trains them)",
    ),
    # diffusers' habitual flags (issue 31)
    Mutation(
        "diffusers flags: --lr_num_cycles not passed to the scheduler",
        files("src/difftune/train/loop.py"), "            num_cycles=args.lr_num_cycles,\n", "",
        ("tests/test_diffusers_flags.py", "-k", "cycles_and_the_power"),
        "a cosine_with_restarts run silently restarts once, whatever --lr_num_cycles says",
    ),
    Mutation(
        "diffusers flags: --scale_lr without the processes",
        files("src/difftune/train/args/*.py"), "args.train_batch_size * num_processes\n", "args.train_batch_size\n",
        ("tests/test_diffusers_flags.py", "-k", "scale_lr"),
        "a multi-GPU run trains at a rate diffusers' --scale_lr would have multiplied by the GPU count",
    ),
    Mutation(
        "diffusers flags: --validation_epochs counted from 0",
        files("src/difftune/train/loop.py"), "(step // self.steps_per_epoch) % epochs == 0",
        "(step // self.steps_per_epoch - 1) % epochs == 0",
        ("tests/test_diffusers_flags.py", "-k", "validation_epochs"),
        "validates after epochs 1, N+1, ... (diffusers' 0-based loop index) instead of every N-th epoch",
    ),
    Mutation(
        "diffusers flags: class images in the weights' dtype whatever --prior_generation_precision says",
        files("src/difftune/generate/class_images.py"), "accelerator.device, generation_dtype(args, dtype), sampling)",
        "accelerator.device, dtype, sampling)",
        ("tests/test_diffusers_flags.py", "-k", "prior_generation_precision"),
        "the flag is parsed and recorded but never reaches the generation",
    ),
    Mutation(
        "diffusers flags: the Hub token written to args.json",
        files("src/difftune/train/loop.py"), 'SECRETS = frozenset({"hub_token"})', "SECRETS = frozenset()",
        ("tests/test_diffusers_flags.py", "-k", "push_to_hub_uploads"),
        "every checkpoint's args.json, uploaded by --push_to_hub and sent to wandb, holds the token",
    ),
    Mutation(
        "diffusers flags: --push_to_hub offline found only after training",
        files("src/difftune/train/args/*.py"), "    if args.push_to_hub and is_offline():\n", "    if False:\n",
        ("tests/test_diffusers_flags.py", "-k", "offline"),
        "a whole run trains, then its upload fails",
    ),
    # --config (issue 31)
    Mutation(
        "config: a typed flag adds to the file's instead of replacing it",
        files("src/difftune/cli/config_file.py"), "if typed.isdisjoint(action.option_strings)", "if True",
        ("tests/test_config_file.py", "-k", "other_scripts"),
        "a prompt typed to replace a saved experiment's prompts is generated beside them",
    ),
    # kohya's training config and flag names (issue 31)
    Mutation(
        "kohya: network_alpha read as the rank",
        files("src/difftune/train/kohya_flags/translation.py"),
        'self.put(alpha_dest, float(self.current("rank", 8)) if alpha == 0 else alpha, "network_alpha")',
        'self.put("rank", float(self.current("rank", 8)) if alpha == 0 else alpha, "network_alpha")',
        ("tests/test_kohya_config.py", "-k", "trains_what_kohya_would"),
        "the two network_* numbers swapped: a kohya config trains another rank at alpha 8",
    ),
    Mutation(
        "kohya: LyCORIS's factor ignored",
        files("src/difftune/train/kohya_flags/lycoris.py"),
        'self.put("decompose_factor", -1 if factor < 0 else factor, key)',
        "pass",
        ("tests/test_kohya_config.py", "-k", "trains_what_kohya_would"),
        "network_args factor=8 trains peft's default factors near sqrt(dim): another adapter shape",
    ),
    Mutation(
        "kohya: the text encoders left out by default",
        files("src/difftune/train/kohya_flags/translation.py"), 'self.default("train_text_encoder", True, "")', "pass",
        ("tests/test_kohya_config.py", "-k", "trains_what_kohya_would or leaves_out"),
        "ours trains the U-Net only by default; kohya trains the encoders unless network_train_unet_only",
    ),
    Mutation(
        "kohya: max_train_epochs beside the file's max_train_steps",
        files("src/difftune/train/kohya_flags/translation.py"),
        '            self.out.pop("max_train_steps", None)\n', "",
        ("tests/test_kohya_config.py", "-k", "overrides_max_train_steps"),
        "ours lets --max_train_steps win; kohya's epochs do: the run stops at the wrong length",
    ),
    Mutation(
        "kohya: save_every_n_epochs never saves",
        files("src/difftune/train/loop.py"),
        "saves = every(step, args.checkpointing_steps) or self.ends_epochs(step, args.checkpointing_epochs)",
        "saves = every(step, args.checkpointing_steps)",
        ("tests/test_kohya_config.py", "-k", "tiny_sdxl"),
        "the flag is parsed and recorded but the loop only checks steps",
    ),
    Mutation(
        "kohya: a typo's suggestion without the flag's main name",
        files("src/difftune/cli/parsing.py"), "{f' (= {main})' if main != near[0] else ''}", "",
        ("tests/test_kohya_config.py", "-k", "mistyped"),
        "--network_dimm suggests --network_dim without saying it is --rank",
    ),
    # Stable Cascade stage C as Stability trains it (issue 33)
    Mutation(
        "cascade: P2 without its + k",
        files("src/difftune/train/objectives.py"), "return (a.p2_k + snr) ** -a.p2_gamma", "return snr**-a.p2_gamma",
        ("tests/test_stage_c.py", "-k", "p2_weights"),
        "1 / SNR instead of 1 / (1 + SNR): the noisiest steps weigh thousands of times more",
    ),
    Mutation(
        "cascade: t in the latents' dtype",
        files("src/difftune/train/objectives.py"), "dtype = torch.float32 if self.continuous else x0.dtype",
        "dtype = x0.dtype",
        ("tests/test_stage_c.py", "-k", "bf16"),
        "under bf16 the prior's timestep features lose their high frequencies (ComfyUI computes them in fp32)",
    ),
    Mutation(
        "cascade: validation at --resolution",
        files("scripts/train_wuerstchen_lora.py"),
        "side = family.sampling_side(pipe, validation.trained_size(args)[0])",
        "side = validation.trained_size(args)[0]",
        ("tests/test_stage_c.py", "-k", "bf16"),
        "the prior samples 18 x 18 latents after training on 24 x 24: previews unlike what the run learnt",
    ),
]  # fmt: skip


def tracked_files(root: Path) -> list[str]:
    """The repo's files as git sees them (tracked, and new ones not ignored): what a copy needs."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if line and (root / line).is_file()]


def locate(root: Path, mutation: Mutation) -> tuple[Path | None, str]:
    """The one file holding the snippet exactly once, or None and why not."""
    candidates = sorted({path for pattern in mutation.files for path in root.glob(pattern) if path.is_file()})
    hits = [(path, path.read_text().count(mutation.original)) for path in candidates]
    hits = [(path, count) for path, count in hits if count]
    if len(hits) == 1 and hits[0][1] == 1:
        return hits[0][0], ""
    if not hits:
        return None, f"snippet not found in {', '.join(mutation.files)}"
    return None, "snippet found " + ", ".join(f"{count}x in {path.relative_to(root)}" for path, count in hits)


def copy_repo(root: Path, destination: Path) -> None:
    for name in tracked_files(root):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def run_mutation(root: Path, mutation: Mutation, assets: Path, timeout: int) -> tuple[str, float, str]:
    """(status, seconds, detail): caught / MISSED / error / timeout."""
    with tempfile.TemporaryDirectory(prefix="difftune-mutant-") as temp:
        copy = Path(temp)
        copy_repo(root, copy)
        path, _ = locate(copy, mutation)
        path.write_text(path.read_text().replace(mutation.original, mutation.replacement))
        env = {**os.environ, "PYTHONPATH": str(copy / "src"), "HF_HUB_OFFLINE": "1"}
        env["DIFFTUNE_TEST_ASSETS"] = str(assets)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        start = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        seconds = time.monotonic() - start
        lines = proc.stdout.strip().splitlines() or [""]
        failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in lines if line.startswith("FAILED ")]
        summary = lines[-1] + (f"; failed: {failed[0]}" if failed else "")
        status = {0: "MISSED", 1: "caught"}.get(proc.returncode, "error")
        return status, seconds, summary


def build_assets(root: Path, destination: Path) -> None:
    subprocess.run(
        [sys.executable, str(root / "scripts" / "make_tiny_assets.py"), str(destination)],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="Run mutations whose name contains this.")
    parser.add_argument("--check", action="store_true", help="Only check that every snippet is found once.")
    parser.add_argument("--timeout", type=int, default=1200, help="Seconds per mutation's tests.")
    parser.add_argument("--root", type=Path, default=ROOT, help="The repo to mutate (default: this one).")
    args = parser.parse_args()
    root = args.root.resolve()

    chosen = [m for m in MUTATIONS if not args.only or any(word in m.name for word in args.only)]
    stale = [(m, why) for m in chosen for path, why in [locate(root, m)] if path is None]
    for mutation, why in stale:
        print(f"STALE    {mutation.name}: {why}")
    if args.check:
        print(f"{len(chosen) - len(stale)}/{len(chosen)} snippets found")
        return 1 if stale else 0

    results = []
    with tempfile.TemporaryDirectory(prefix="difftune-mutation-assets-") as assets:
        build_assets(root, Path(assets))
        for mutation in chosen:
            if any(mutation is m for m, _ in stale):
                continue
            if not mutation.tests:
                print(f"untested {mutation.name}: {mutation.why}", flush=True)
                continue
            status, seconds, summary = run_mutation(root, mutation, Path(assets), args.timeout)
            results.append(status)
            print(f"{status:8} {mutation.name} ({seconds:.0f} s; {summary})", flush=True)
    caught = results.count("caught")
    untested = len(chosen) - len(results) - len(stale)
    print(f"score: {caught}/{len(results)} caught ({untested} untested, {len(stale)} stale)")
    return 0 if caught == len(results) and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
