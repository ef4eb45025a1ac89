"""Mutation run (issue #16): plant realistic one-line bugs, one at a time, in a scratch copy of the
project and run the tests that should notice. Not part of CI: a full run of the 183 takes ~2-3 hours on
2 cores (most mutants run one test file in 5-30 s; the slow ones run train.py).

    python benchmarks/mutants.py                    # every mutant
    python benchmarks/mutants.py --only lr_warmup_le atomic_file_no_fsync
    python benchmarks/mutants.py --module paligemma/gemma.py --fast   # --fast: skip the train.py runs
    python benchmarks/mutants.py --module lora/ paligemma/captioning/  # file or folder prefixes
    python benchmarks/mutants.py --match compare --list               # names containing 'compare', not run
    python benchmarks/mutants.py --check                              # every mutant still applies; run nothing

A new module's mutants go in MUTANTS under a comment naming it; `--module` selects them by path.

Each mutant names the file, the exact text it replaces (found exactly once, or the run stops: the
mutant is stale; all chosen mutants are checked before the first runs, and tests/test_mutants.py checks
them in CI) and the tests to run (pytest arguments). A mutant is killed when those tests fail or
time out. `equivalent` marks mutants that change no observable behaviour, with the reason: they are
expected to survive and are reported apart. The score per module counts killed / non-equivalent.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOP = "tests/captioning/test_training_loop.py"
PACK, HOOKS, LORA, EVAL, TRAIN = (f"tests/test_{n}.py" for n in ("packing", "hooks", "lora", "evaluate", "training"))
DATA, VALID = "tests/captioning/test_data.py", "tests/captioning/test_validation.py"
BOXES, AP, ANSWERS, SEG, VAE = (f"tests/tasks/test_{n}.py" for n in ("boxes", "average_precision", "answers",
                                                                     "segmentation", "vqvae"))
ANSWERS, SEG = (ANSWERS, "tests/tasks/test_answers_edges.py"), (SEG, "tests/tasks/test_segmentation_edges.py")
QUANT, PREC, PROBE = "tests/test_quantize.py", "tests/captioning/test_precision.py", "tests/test_probe.py"
CAPTRAIN = ("tests/captioning/test_training.py", "tests/captioning/test_run_folder.py")
RESAMPLING = "tests/tasks/test_resampling.py"
INFER = "tests/test_inference.py"  # with the caption / evaluate tests that go through it


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple  # pytest arguments
    slow: bool = False  # runs train.py end to end
    equivalent: str = ""  # why no test can notice
    extra: tuple = ()  # a second (old, new) replacement in the same file, for a bug spanning two lines


MUTANTS = [
    # --- training loop arithmetic (train.py) ---
    Mutant("accum_first_micro_count", "paligemma/captioning/training.py", "for b in micro_batches)",
           "for b in micro_batches[:1]) * len(micro_batches)",
           (LOOP, "-k", "grad_accumulation"), slow=True),
    Mutant("lr_of_next_step", "train.py", "lr_at(step, lr, args.warmup, args.steps)",
           "lr_at(step + 1, lr, args.warmup, args.steps)", (LOOP, "-k", "logged_lr"), slow=True),
    Mutant("loss_mean_not_sum", "paligemma/captioning/distributed.py", 'reduction="sum")', 'reduction="mean")',
           (LOOP, "-k", "mean_over_label_tokens"), slow=True),
    Mutant("labels_count_first_column", "paligemma/captioning/training.py", '(b["labels"][:, 1:] != IGNORE)', '(b["labels"] != IGNORE)',
           (LOOP, "-k", "mean_over_label_tokens"), slow=True,
           equivalent="labels[:, 0] is an <image> position, always IGNORE: the count is the same"),
    # --- learning-rate schedule ---
    Mutant("lr_warmup_le", "paligemma/captioning/training.py", "if step < warmup:", "if step <= warmup:",
           (LOOP, "-k", "lr_schedule or never_above")),
    Mutant("lr_warmup_from_zero", "paligemma/captioning/training.py", "lr * (step + 1) / warmup", "lr * step / warmup",
           (LOOP, "-k", "lr_schedule or never_above")),
    Mutant("lr_cosine_span", "paligemma/captioning/training.py", "max(1, total - warmup)", "max(1, total)",
           (LOOP, "-k", "lr_schedule or never_above")),
    Mutant("lr_no_clamp_past_end", "paligemma/captioning/training.py", "min(1.0, (step - warmup)", "((step - warmup)",
           (LOOP, "-k", "lr_schedule or never_above")),
    Mutant("lr_floor_dropped", "paligemma/captioning/training.py", "lr * (min_ratio + (1 - min_ratio) *",
           "lr * ((1 - min_ratio) *", (LOOP, "-k", "lr_schedule or never_above")),
    # --- resume ---
    Mutant("resume_torch_rng_not_restored", "paligemma/captioning/run_folder.py",
           'torch.set_rng_state(state["torch_rng"])', 'torch.get_rng_state()',
           (LOOP, "-k", "resume_equals"), slow=True),
    Mutant("resume_caption_rng_not_restored", "paligemma/captioning/run_folder.py",
           'rng.setstate(state["rng"])', 'rng.random()', (LOOP, "-k", "resume_equals"), slow=True),
    # --- crash-safe writes ---
    Mutant("atomic_file_no_fsync", "paligemma/atomic.py", "            os.fsync(f.fileno())\n",
           "            pass\n", ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_no_flush", "paligemma/atomic.py", "            f.flush()\n", "            pass\n",
           ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_temp_left", "paligemma/atomic.py", "            os.unlink(tmp)", "            pass",
           ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_in_place", "paligemma/atomic.py", "with named_full_disk(path), os.fdopen(fd, mode) as f:",
           "with named_full_disk(path), os.fdopen(fd, mode) as _, open(path, mode) as f:", ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_in_place_no_temp", "paligemma/atomic.py",  # written where it lands, the temp discarded
           "with named_full_disk(path), os.fdopen(fd, mode) as f:",
           "with named_full_disk(path), os.fdopen(fd, mode) as _, open(path, mode) as f:",
           ("tests/test_atomic_crash.py", "-k", "sigkill"), extra=("os.replace(tmp, path)", "os.unlink(tmp)")),
    Mutant("atomic_dir_temp_left", "paligemma/atomic.py", "        shutil.rmtree(tmp, ignore_errors=True)\n        raise",
           "        raise", ("tests/test_atomic_crash.py",)),
    Mutant("atomic_dir_no_fsync", "paligemma/atomic.py", "                os.fsync(fh.fileno())", "                pass",
           ("tests/test_atomic_crash.py",)),
    Mutant("atomic_dir_in_place", "paligemma/atomic.py", "        yield tmp\n",
           "        path.mkdir(exist_ok=True)\n        yield path\n", ("tests/test_atomic_crash.py",)),
    # --- bf16 numerics ---
    Mutant("rmsnorm_in_bf16", "paligemma/gemma.py", "xf = x.float()  #", "xf = x  #", ("tests/test_numerics.py",)),
    Mutant("rmsnorm_weight_bf16", "paligemma/gemma.py", "(1.0 + self.weight.float())", "(1.0 + self.weight)",
           ("tests/test_numerics.py",)),
    Mutant("rope_angles_in_dtype", "paligemma/gemma.py", "positions[..., None].float() * inv_freq",
           "(positions[..., None].to(dtype) * inv_freq.to(dtype)).float()", ("tests/test_numerics.py",)),
    Mutant("softmax_probs_kept_float32", "paligemma/attention.py", "return (p.to(dtype) @ v).view(",
           "return (p @ v.float()).to(dtype).view(", ("tests/test_numerics.py",)),
    Mutant("softmax_in_input_dtype", "paligemma/attention.py", "torch.softmax(scores.float(), dim=-1)",
           "torch.softmax(scores, dim=-1)", ("tests/test_numerics.py",),
           equivalent="torch's softmax on bf16 accumulates in float32 and rounds once: bit-identical"),
    Mutant("softmax_manual_bf16", "paligemma/attention.py", "torch.softmax(scores.float(), dim=-1)",
           "(scores - scores.amax(-1, keepdim=True)).exp() / (scores - scores.amax(-1, keepdim=True)).exp().sum(-1, keepdim=True)",
           ("tests/test_numerics.py",)),
    # --- caller positions and the cache ---
    Mutant("seen_only_with_own_positions", "paligemma/model.py",
           "            slots, positions = cache.append(attention_mask, prefix_flags(attention_mask, token_type_ids))\n",
           "            seen = cache.seen.clone()\n"
           "            slots, positions = cache.append(attention_mask, prefix_flags(attention_mask, token_type_ids))\n"
           "            if position_ids is not None:\n                cache.seen.copy_(seen)\n",  # counted for own positions only
           ("tests/test_numerics.py", "-k", "caller_positions")),
    Mutant("seen_counts_padding", "paligemma/cache.py", "self.seen += attention_mask.long().sum(-1)",
           "self.seen += attention_mask.shape[1]", ("tests/test_numerics.py", "tests/test_generation.py")),
    Mutant("positions_zero_based", "paligemma/cache.py", "attention_mask.long().cumsum(-1)).clamp(min=1)",
           "attention_mask.long().cumsum(-1) - 1).clamp(min=0)", ("tests/test_numerics.py", "tests/test_model.py")),
    Mutant("pad_positions_zero", "paligemma/cache.py", "attention_mask.long().cumsum(-1)).clamp(min=1)",
           "attention_mask.long().cumsum(-1))", ("tests/test_numerics.py", "tests/test_model.py"),
           equivalent="padding slots are masked out as keys and their own outputs are discarded"),
    # --- a sample across the model files ---
    Mutant("embed_unscaled", "paligemma/gemma.py", "return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)",
           "return x", ("tests/test_model.py",)),
    Mutant("rope_sign", "paligemma/gemma.py", "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)",
           ("tests/test_model.py", "tests/test_numerics.py")),
    Mutant("geglu_exact", "paligemma/gemma.py", 'F.gelu(self.gate_proj(x), approximate="tanh")',
           "F.gelu(self.gate_proj(x))", ("tests/test_model.py",)),
    Mutant("sliding_window_off_by_one", "paligemma/cache.py", "(k > q - window)", "(k >= q - window)",
           ("tests/test_model.py", "tests/test_generation.py")),
    Mutant("prefix_causal", "paligemma/cache.py", "(causal[None] | both_prefix)", "(causal[None])",
           ("tests/test_model.py",)),
    Mutant("siglip_no_position", "paligemma/siglip.py", "return x + self.position_embedding.weight", "return x",
           ("tests/test_model.py",)),
    Mutant("cache_valid_all", "paligemma/cache.py", "self.valid.index_copy(1, slots, attention_mask.bool())",
           "self.valid.index_copy(1, slots, torch.ones_like(attention_mask, dtype=torch.bool))", ("tests/test_generation.py", "tests/test_numerics.py")),
    Mutant("greedy_no_pad_after_eos", "paligemma/generation.py", "token = token.masked_fill(done, pad_id)",
           "token = token", ("tests/test_generation.py",)),
    Mutant("top_p_keeps_boundary", "paligemma/generation.py", "drop = cum <= 1 - top_p", "drop = cum < 1 - top_p",
           ("tests/test_generation.py",)),
    Mutant("lora_scaling_sqrt", "lora/layer.py", "else alpha / r", "else alpha / math.sqrt(r)", ("tests/test_lora.py",)),
    Mutant("lora_dropout_on_output", "lora/layer.py", "self.lora_B(self.lora_A(self.dropout(x if",
           "self.dropout(self.lora_B(self.lora_A(x if", ("tests/test_lora.py",)),
    Mutant("lora_regex_search", "lora/inject.py", "re.fullmatch(targets, name)", "re.search(targets, name)",
           ("tests/test_lora.py",)),
    # --- captioning metrics ---
    Mutant("bleu_shortest_reference", "paligemma/captioning/metrics.py", "min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]",
           "min(len(r) for r in refs)", ("tests/captioning/test_metrics.py",)),
    Mutant("bleu_one_guess_minimum", "paligemma/captioning/metrics.py", "max(len(hyp) - k + 1, 0)", "max(len(hyp) - k + 1, 1)",
           ("tests/captioning/test_metrics.py",)),
    Mutant("cider_unclipped", "paligemma/captioning/metrics.py", "min(x, vr[k].get(g, 0.0))", "x",
           ("tests/captioning/test_metrics.py",)),
    Mutant("cider_sigma", "paligemma/captioning/metrics.py", "(2 * sigma ** 2)", "(sigma ** 2)", ("tests/captioning/test_metrics.py",)),
    # ===== issue #28: code added in round 2 (packing, hook points, adapter files, data checks,
    # evaluate's flags, training's best / early stop). "kind": the planted-bug kinds the issue lists;
    # the others are ours. Tests: the fast ones that pin each promise (the train.py ones are slow). =====
    # --- packing (paligemma/packing.py) ---
    Mutant("pack_one_call_late", "paligemma/packing.py", "if layer.calls_left > 0 else None",
           "if layer.calls_left >= 0 else None", (PACK, "-k", "after_th")),  # kind
    Mutant("pack_one_call_early", "paligemma/packing.py", "if layer.calls_left > 0 else None",
           "if layer.calls_left > 1 else None", (PACK, "-k", "after_th")),
    Mutant("one_row_bias_dropped", "paligemma/packing.py",
           "y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)", "y = torch.mv(weight, v)",
           (PACK, "-k", "one_row")),  # kind
    Mutant("train_mode_allowed_without_grad", "paligemma/packing.py",
           "if training or (torch.is_grad_enabled() and x.requires_grad):",
           "if torch.is_grad_enabled() and (training or x.requires_grad):", (PACK, "-k", "refuse or without_gradients")),  # kind
    Mutant("grad_input_allowed_in_eval", "paligemma/packing.py",
           "if training or (torch.is_grad_enabled() and x.requires_grad):", "if training:",
           (PACK, "-k", "without_gradients")),
    Mutant("one_row_only_2d", "paligemma/packing.py", "if x.numel() == x.shape[-1]:",
           "if x.dim() == 2 and x.shape[0] == 1:", (PACK, "-k", "one_row or after_th")),
    Mutant("rented_head_not_capped", "paligemma/packing.py", "                return self.cap(logits)",
           "                return logits", (PACK, "-k", "soft_caps")),
    Mutant("head_not_packed_by_pack", "paligemma/packing.py",
           "        if after <= 0:\n            self.copy_of(embedding)",
           "        if after < 0:\n            self.copy_of(embedding)", (PACK, "-k", "frees_each")),
    Mutant("pack_leaves_counting_layers", "paligemma/packing.py", "    if after <= 0:\n        for m in model.modules():",
           "    if after < 0:\n        for m in model.modules():", (PACK, "-k", "after_th_call")),
    Mutant("mapped_views_packed_on_load", "paligemma/packing.py", "if name not in names or mapped(tensor):",
           "if name not in names:", (PACK, "-k", "after_th_call")),
    Mutant("plain_weight_kept_after_pack", "paligemma/packing.py", "        self.plain = None\n",
           "        self.plain = self.plain\n", (PACK, "-k", "after_th")),
    Mutant("int8_head_not_capped", "paligemma/quantize.py", "return self.cap(logits.view(*h.shape[:-1], -1))",
           "return logits.view(*h.shape[:-1], -1)", (QUANT, "-k", "soft_capped")),  # kind
    Mutant("int8_head_copy_never_remade", "paligemma/quantize.py",
           "            if changed(weight, self._source):\n                self.copy_of(weight)\n            logits",
           "            if False:\n                self.copy_of(weight)\n            logits", (QUANT, "-k", "follows")),
    Mutant("weight_only_modes_get_the_int8_head", "paligemma/quantize.py",
           "(Int8Head if mode == \"int8\" else Int4Head)", "(Int8Head)", (QUANT, "-k", "batch")),
    Mutant("int4_float32_on_the_slow_kernel", "paligemma/int4.py", "    if x.dtype == torch.float32:\n",
           "    if False:\n", (QUANT, "-k", "int4_equals_hand")),
    Mutant("right_padding_accepted", "paligemma/generation.py", "    elif not bool(attention_mask[:, -1].all()):",
           "    elif False:", ("tests/test_generation.py", "-k", "right_padding")),
    # --- hook points (paligemma/hookpoint.py, attention.py) ---
    Mutant("replaced_forward_ignored", "paligemma/hookpoint.py", 'or self._backward_pre_hooks or "forward" in self.__dict__',
           "or self._backward_pre_hooks", (HOOKS, "-k", "replaced_forward")),  # kind
    Mutant("global_forward_hooks_ignored", "paligemma/hookpoint.py",
           "or _module._global_forward_hooks or _module._global_forward_pre_hooks", "or _module._global_forward_pre_hooks",
           (HOOKS, "-k", "global_hooks")),  # kind
    Mutant("global_pre_hooks_ignored", "paligemma/hookpoint.py",
           "or _module._global_forward_hooks or _module._global_forward_pre_hooks", "or _module._global_forward_hooks",
           (HOOKS, "-k", "global_hooks or global_pre_hook")),
    Mutant("pre_hooks_ignored", "paligemma/hookpoint.py", "return bool(self._forward_hooks or self._forward_pre_hooks or",
           "return bool(self._forward_hooks or", (HOOKS, "-k", "replaced_forward")),
    Mutant("in_place_pattern_edit_ignored", "paligemma/attention.py",
           "if seen is pattern and pattern._version == version:", "if seen is pattern:",
           (HOOKS, "-k", "replaced_pattern")),
    # --- adapter files (lora/peft_format.py) ---
    Mutant("dropout_not_written", "lora/peft_format.py",
           "dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0", "dropout = 0.0",
           (LORA, "-k", "dropout_and_rslora")),  # kind
    Mutant("missing_lora_B_accepted", "lora/peft_format.py", 'for p in ("lora_A", "lora_B") if (n, p) not in weights]',
           'for p in ("lora_A",) if (n, p) not in weights]', (LORA, "-k", "missing_a_tensor")),  # kind
    Mutant("r_zero_accepted", "lora/peft_format.py", 'or config["r"] < 1:', 'or config["r"] < 0:',
           (LORA, "-k", "refuses")),  # kind
    Mutant("r_bool_accepted", "lora/peft_format.py", 'if isinstance(config["r"], bool) or not isinstance(config["r"], int)',
           'if not isinstance(config["r"], int)', (LORA, "-k", "refuses")),
    Mutant("dropout_not_loaded", "lora/peft_format.py", 'dropout=config.get("lora_dropout", 0.0)', "dropout=0.0",
           (LORA, "-k", "dropout_and_rslora")),
    Mutant("rslora_not_loaded", "lora/peft_format.py", 'rslora=config.get("use_rslora", False))', "rslora=False)",
           (LORA, "-k", "dropout_and_rslora")),
    Mutant("peft_type_case", "lora/peft_format.py", 'if config.get("peft_type", "LORA") != "LORA":',
           'if config.get("peft_type", "LORA") == "lora":', (LORA, "-k", "refuses")),
    Mutant("dora_key_misspelt", "lora/peft_format.py", 'if config.get("use_dora"):', 'if config.get("dora"):',
           (LORA, "-k", "refuses")),
    Mutant("target_modules_our_names", "lora/peft_format.py", '"target_modules": sorted(to_hf(model, n) for n in layers)',
           '"target_modules": sorted(layers)', (LORA, "-k", "loads_in_peft")),
    # --- data checks (paligemma/captioning/data.py) ---
    Mutant("dotdot_prefix_refused", "paligemma/captioning/data.py", 'norm.startswith(".." + os.sep)',
           'norm.startswith("..")', (DATA, "-k", "stay_inside")),  # kind
    Mutant("blank_caption_accepted", "paligemma/captioning/data.py", 'if not (c or "").strip()]', "if not c]",
           (DATA, "-k", "blank_captions")),  # kind
    Mutant("line_counts_rows", "paligemma/captioning/data.py",
           r'rows.append((reader.line_num - sum(len(re.findall(r"\r\n|\r|\n", x)) for x in fields), row))',
           "rows.append((len(rows) + 2, row))", (DATA, "-k", "lines_are_counted")),  # kind
    Mutant("line_of_the_rows_end", "paligemma/captioning/data.py",
           r'rows.append((reader.line_num - sum(len(re.findall(r"\r\n|\r|\n", x)) for x in fields), row))',
           "rows.append((reader.line_num, row))", (DATA, "-k", "lines_are_counted")),
    Mutant("crlf_counted_twice", "paligemma/captioning/data.py", r're.findall(r"\r\n|\r|\n", x)',
           r're.findall(r"\r|\n", x)', (DATA, "-k", "lines_are_counted")),
    Mutant("dotdot_alone_accepted", "paligemma/captioning/data.py", 'if os.path.isabs(name) or norm == ".." or norm',
           "if os.path.isabs(name) or norm", (DATA, "-k", "parent_folder")),
    Mutant("no_captions_accepted", "paligemma/captioning/data.py", "if empty or not caps:", "if empty:",
           (DATA, "-k", "blank_captions")),
    Mutant("captions_not_stripped", "paligemma/captioning/data.py", "caps = [c.strip() for c in caps]", "caps = caps",
           (DATA, "-k", "blank_captions")),
    Mutant("caption_columns_sorted_as_text", "paligemma/captioning/data.py",
           'sorted((k for k in row if k and k.startswith(kinds[0])), key=lambda k: (len(k), k))',
           'sorted(k for k in row if k and k.startswith(kinds[0]))', (DATA, "-k", "numeric_order")),
    Mutant("jsonl_blank_line_parsed", "paligemma/captioning/data.py", "        if line.strip():", "        if line:",
           (DATA, "-k", "jsonl_blank")),
    Mutant("number_caption_accepted", "paligemma/captioning/data.py",
           "all(isinstance(c, str) or c is None for c in caps)", "all(isinstance(c, (str, int)) or c is None for c in caps)",
           (DATA, "-k", "jsonl_blank")),
    Mutant("empty_answer_under_any_prefix", "paligemma/captioning/data.py",
           'names_task(prefix) and task_of(prefix) == "detect":', "names_task(prefix):", (DATA, "-k", "no_object")),
    Mutant("empty_reference_mixed_with_boxes", "paligemma/captioning/data.py",
           "if caps and len(empty) == len(caps) and names_task", "if caps and empty and names_task",
           (DATA, "-k", "no_object")),
    # --- evaluate.py's flags ---
    Mutant("references_first_is_the_last", "evaluate.py", 'e.captions[:1] if args.references == "first"',
           'e.captions[-1:] if args.references == "first"', (EVAL, "-k", "caption_1_as")),  # kind
    Mutant("compare_base_keeps_adapter", "evaluate.py", "second = (args.model, None, args.quantize)",
           "second = (args.model, args.adapter, args.quantize)", (EVAL, "-k", "by_hand")),  # kind
    Mutant("compare_int8_drops_adapter", "evaluate.py", "second = (args.model, args.adapter, args.compare)",
           "second = (args.model, None, args.compare)", (EVAL, "-k", "by_hand or int8_keeps")),  # kind
    Mutant("compare_model_keeps_adapter", "evaluate.py", "second = (args.compare, None, args.quantize)",
           "second = (args.compare, args.adapter, args.quantize)", (EVAL, "-k", "by_hand")),
    Mutant("compare_adapter_unquantized", "evaluate.py", "second = (args.model, args.compare, args.quantize)",
           "second = (args.model, args.compare, None)", (EVAL, "-k", "by_hand")),
    Mutant("empty_out_refused", "paligemma/captioning/results.py", 'return "other" if names else "empty"',
           'return "other" if out.is_dir() else "empty"', (EVAL, "-k", "empty_output")),
    Mutant("row_name_without_quantize", "evaluate.py", '+ (f" ({quantize})" if quantize else "")', "",
           (EVAL, "-k", "int8_keeps")),
    Mutant("prediction_lines_enumerated", "evaluate.py", 'else csv_rows(csv.DictReader(io.StringIO(text, newline="")))',
           'else list(enumerate(csv.DictReader(io.StringIO(text, newline="")), 2))', (EVAL, "-k", "quoted_newlines")),
    Mutant("file_keeps_scored_references_only", "evaluate.py", "prediction=p, references=e.captions)",
           "prediction=p, references=refs[str(e.image)])", (EVAL, "-k", "caption_1_as")),
    # --- training's best model and early stop (train.py, validation.py, training.py) ---
    Mutant("no_checkpoint_at_early_stop", "train.py", "or done == args.steps or stop:", "or done == args.steps:",
           (TRAIN, "-k", "best_survives"), slow=True),  # kind
    Mutant("resume_ignores_best_json", "train.py", 'best.load(extra.get("best", best.state()), out / "best" / "best.json")',
           'best.load(extra.get("best", best.state()))', (TRAIN, "-k", "best_survives"), slow=True),  # kind
    Mutant("last_step_not_evaluated", "train.py", "done % args.eval_every == 0 or done == args.steps\n",
           "done % args.eval_every == 0\n", (TRAIN, "-k", "best_survives"), slow=True),  # kind
    Mutant("best_record_loses_image_gap", "paligemma/captioning/validation.py",
           'if k.startswith("val_") or k == "image_gap"}', 'if k.startswith("val_")}',
           (TRAIN, "-k", "best_survives"), slow=True),  # kind
    Mutant("image_gap_sign", "paligemma/captioning/validation.py", "image_gap=shuffled - own", "image_gap=own - shuffled",
           (TRAIN, "-k", "best_survives"), slow=True),
    Mutant("early_stop_at_once", "train.py", "best.stop), args.device) > 0", "best.stop), args.device) >= 0",
           (TRAIN, "-k", "best_model_and_early_stop"), slow=True),
    Mutant("best_json_step_off_by_one", "train.py", 'save_best(out / "best", par.model, args.full, args.model, step,',
           'save_best(out / "best", par.model, args.full, args.model, step - 1,', (TRAIN, "-k", "best_model_and_early_stop"), slow=True),
    Mutant("trim_log_drops_checkpoint_step", "paligemma/captioning/run_folder.py", 'r.get("step", 0) <= step]',
           'r.get("step", 0) < step]', (TRAIN, "-k", "best_survives"), slow=True),
    Mutant("stop_one_evaluation_late", "paligemma/captioning/validation.py", "self.stale >= self.patience",
           "self.stale > self.patience", (VALID,)),
    Mutant("best_tie_replaces", "paligemma/captioning/validation.py", "        if score > self.score:",
           "        if score >= self.score:", (VALID,)),
    Mutant("best_json_adopts_score_only", "paligemma/captioning/validation.py",
           'self.step, self.score, self.stale = kept["step"], kept[key], 0', 'self.score, self.stale = kept[key], 0',
           (VALID,)),
    Mutant("stale_reset_on_resume", "paligemma/captioning/validation.py",
           'state["step"], state["score"], state["stale"]', 'state["step"], state["score"], 0', (VALID,)),
    # --- crash-safety (atomic.py, weights.py) ---
    Mutant("swap_leaves_old", "paligemma/atomic.py",
           "    os.replace(new, path)\n    fsync_dir(path.parent)\n    shutil.rmtree(old, ignore_errors=True)",
           "    os.replace(new, path)\n    fsync_dir(path.parent)", ("tests/test_atomic.py", "-k", "completed_swaps")),  # kind
    Mutant("header_range_unchecked", "paligemma/safetensors_io.py", "<= size - 8 - n or end - start != nbytes:",
           "<= size - 8 - n:", ("tests/test_weights.py", "-k", "byte_range")),  # kind
    # ===== issue #28, round 3: tasks (boxes, mAP, answers, segmentation, the mask VQ-VAE), int4, fp16,
    # knockout, the run folder, inference. Tests: each module's own test file (fast). =====
    # --- detection boxes (paligemma/tasks/boxes.py) ---
    Mutant("boxes_x_first", "paligemma/tasks/boxes.py",
           "for v, s in ((y0, height), (x0, width), (y1, height), (x1, width)))",
           "for v, s in ((x0, width), (y0, height), (x1, width), (y1, height)))", (BOXES,)),
    Mutant("boxes_bin_truncated", "paligemma/tasks/boxes.py", "min(max(round(v / size * (BINS - 1)), 0), BINS - 1)",
           "min(max(int(v / size * (BINS - 1)), 0), BINS - 1)", (BOXES,)),
    Mutant("boxes_bin_1024", "paligemma/tasks/boxes.py", "min(max(round(v / size * (BINS - 1)), 0), BINS - 1)",
           "min(max(round(v / size * BINS), 0), BINS - 1)", (BOXES,)),
    Mutant("boxes_flat_box_kept", "paligemma/tasks/boxes.py", "or y1 <= y0 or x1 <= x0:", "or y1 < y0 or x1 < x0:",
           (BOXES,)),
    Mutant("boxes_scores_of_the_first_box", "paligemma/tasks/boxes.py", "loc_probs[first:first + 4]", "loc_probs[0:4]",
           (BOXES,)),
    Mutant("boxes_bad_piece_not_counted_in_probs", "paligemma/tasks/boxes.py", "first, seen, read = seen, seen + len(LOC.findall(piece)), _read(piece)",
           "first, seen, read = seen, seen + 4, _read(piece)", (BOXES,)),
    Mutant("boxes_x_scaled_by_height", "paligemma/tasks/boxes.py", "box = (x0 / (BINS - 1) * width,",
           "box = (x0 / (BINS - 1) * height,", (BOXES,)),
    # --- COCO average precision (paligemma/tasks/average_precision.py) ---
    Mutant("ap_equal_iou_first_reference", "paligemma/tasks/average_precision.py", "if taken[g] or ious[d, g] < best:",
           "if taken[g] or ious[d, g] <= best:", (AP,)),
    Mutant("ap_unstable_rank_in_image", "paligemma/tasks/average_precision.py",
           'order = np.argsort(-s, kind="mergesort")[:MAX_DETECTIONS]', "order = np.argsort(-s)[:MAX_DETECTIONS]", (AP,)),
    Mutant("ap_unstable_rank_across_images", "paligemma/tasks/average_precision.py",
           'order = np.argsort(-m.scores, kind="mergesort")', "order = np.argsort(-m.scores)", (AP,)),
    Mutant("ap_precision_not_monotone", "paligemma/tasks/average_precision.py",
           "precision = np.maximum.accumulate(precision[::-1])[::-1]", "precision = precision", (AP,)),
    Mutant("ap_recall_points_right", "paligemma/tasks/average_precision.py", 'side="left"', 'side="right"', (AP,)),
    Mutant("ap_no_detection_cap", "paligemma/tasks/average_precision.py", "[:MAX_DETECTIONS]", "", (AP,)),
    Mutant("ap_predicted_only_class_scored", "paligemma/tasks/average_precision.py",
           "labels = sorted({r[0] for refs in references for r in refs})",
           "labels = sorted({r[0] for refs in [*references, *predictions] for r in refs})", (AP,)),
    Mutant("ap_taken_reference_rematched", "paligemma/tasks/average_precision.py", "taken[m], hit[t, d] = True, True",
           "hit[t, d] = True", (AP,)),
    # --- VQA / ANLS / CER (paligemma/tasks/answers.py) ---
    Mutant("vqa_always_normalised", "paligemma/tasks/answers.py", "if len(set(refs)) > 1:", "if True:", ANSWERS),
    Mutant("vqa_no_leave_one_out", "paligemma/tasks/answers.py", "min(1.0, (total - m) / 3)", "min(1.0, total / 3)",
           ANSWERS),
    Mutant("vqa_every_period_dropped", "paligemma/tasks/answers.py", 'PERIOD.sub("", out, count=re.UNICODE)',
           'PERIOD.sub("", out)', ANSWERS),
    Mutant("vqa_digit_comma_ignored", "paligemma/tasks/answers.py",
           'if p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text):',
           'if p + " " in text or " " + p in text:', ANSWERS),
    Mutant("anls_threshold_inclusive", "paligemma/tasks/answers.py", "return 1 - d if d < threshold else 0.0",
           "return 1 - d if d <= threshold else 0.0", ANSWERS),
    Mutant("anls_over_reference_length", "paligemma/tasks/answers.py", "/ max(len(ref), len(answer))", "/ len(ref)",
           ANSWERS),
    Mutant("cer_over_prediction_length", "paligemma/tasks/answers.py", "[len(refs[0]) for refs in references]",
           "[len(p) for p in predictions]", ANSWERS),
    Mutant("exact_match_no_strip", "paligemma/tasks/answers.py", "return float(answer.strip() in {r.strip() for r in references})",
           "return float(answer in set(references))", ANSWERS),
    # --- task intervals (paligemma/tasks/resampled_ap.py, resampling.py) ---
    Mutant("resampled_ap_ties_not_interleaved", "paligemma/tasks/resampled_ap.py",
           "tied = counts[inverse.reshape(-1)] > 1", "tied = counts[inverse.reshape(-1)] > 99", (RESAMPLING,)),
    Mutant("resampled_ap_need_zero_from_previous_row", "paligemma/tasks/resampled_ap.py",
           "at = np.clip(at, first[:, None], end)", "at = np.minimum(at, end)", (RESAMPLING,)),
    Mutant("resampled_ap_recall_points_right", "paligemma/tasks/resampled_ap.py", 'need + before[t][:, None], side="left"',
           'need + before[t][:, None], side="right"', (RESAMPLING,)),
    Mutant("resampling_cer_mean_of_ratios", "paligemma/tasks/resampling.py",
           "out[k] = counts @ np.asarray(num, dtype=np.float64) / (counts @ np.asarray(den, dtype=np.float64))",
           "out[k] = counts @ (np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)) / counts.sum(1)",
           (RESAMPLING,)),
    # --- segmentation (paligemma/tasks/segmentation.py) ---
    Mutant("seg_pixel_box_rounded", "paligemma/tasks/segmentation.py",
           "return int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)",
           "return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)", SEG),
    Mutant("seg_threshold_inclusive", "paligemma/tasks/segmentation.py", "np.asarray(resized) > 0.0",
           "np.asarray(resized) >= 0.0", SEG),
    Mutant("seg_resize_nearest", "paligemma/tasks/segmentation.py", "resample=Image.BILINEAR", "resample=Image.NEAREST",
           SEG),
    Mutant("seg_iou_over_reference", "paligemma/tasks/segmentation.py", "float(inter / (ref_mask.sum() + mask.sum() - inter))",
           "float(inter / ref_mask.sum())", SEG),
    Mutant("seg_boxacc_strict", "paligemma/tasks/segmentation.py", "hits[t].append(float(t <= iou))",
           "hits[t].append(float(t < iou))", SEG),
    Mutant("seg_empty_box_not_invalid", "paligemma/tasks/segmentation.py", "        invalid += _empty_box(box)\n", "",
           SEG),
    Mutant("seg_last_code_accepted", "paligemma/tasks/segmentation.py", "if max(seg) >= entries:", "if max(seg) > entries:",
           SEG),
    Mutant("seg_crop_truncated", "paligemma/tasks/segmentation.py", "x0, y0, x1, y1 = (round(v) for v in box)",
           "x0, y0, x1, y1 = (int(v) for v in box)", SEG),
    Mutant("seg_crop_not_antialiased", "paligemma/tasks/segmentation.py", "align_corners=False, antialias=True)",
           "align_corners=False, antialias=False)", SEG),
    Mutant("seg_first_object_not_scored", "paligemma/tasks/segmentation.py", "box, mask = pred[0].box, np.asarray(pred[0].mask, bool)",
           "box, mask = pred[-1].box, np.asarray(pred[-1].mask, bool)", SEG),
    # --- the mask VQ-VAE (paligemma/tasks/vqvae.py) ---
    Mutant("vae_grid_transposed", "paligemma/tasks/vqvae.py", "x.unflatten(1, (GRID, GRID)).permute(0, 3, 1, 2)",
           "x.unflatten(1, (GRID, GRID)).permute(0, 3, 2, 1)", (VAE,)),
    Mutant("vae_same_padding_before", "paligemma/tasks/vqvae.py", "pads += [total // 2, total - total // 2]",
           "pads += [total - total // 2, total // 2]", (VAE,)),
    Mutant("vae_encoder_input_unnormalised", "paligemma/tasks/vqvae.py", "self.encoder(2.0 * (masks.float()[:, None] - 0.5))",
           "self.encoder(masks.float()[:, None])", (VAE,)),
    Mutant("vae_encoder_codes_column_major", "paligemma/tasks/vqvae.py", "x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])",
           "x = x.permute(0, 3, 2, 1).reshape(-1, x.shape[1])", (VAE,)),
    Mutant("vae_code_k_accepted", "paligemma/tasks/vqvae.py", "bad = ((codes < 0) | (codes >= entries)).nonzero()",
           "bad = ((codes < 0) | (codes > entries)).nonzero()", (VAE,)),
    Mutant("vae_integer_arrays_accepted", "paligemma/tasks/vqvae.py", 'if a.dtype.kind != "f":', 'if a.dtype.kind not in "fiu":',
           (VAE,)),
    # --- int4 weights (paligemma/int4.py) ---
    Mutant("int4_zero_off_by_a_level", "paligemma/int4.py", "zero = (lo + 8 * scale.float()).to(w.dtype)",
           "zero = (lo + 7 * scale.float()).to(w.dtype)", ("tests/test_int4.py", QUANT, "-k", "int4")),
    Mutant("int4_sixteen_steps", "paligemma/int4.py", "scale = ((hi - lo).clamp(min=1e-6) / 15).to(w.dtype)",
           "scale = ((hi - lo).clamp(min=1e-6) / 16).to(w.dtype)", ("tests/test_int4.py", QUANT, "-k", "int4")),
    Mutant("int4_dequantize_offset", "paligemma/int4.py", "w = ((codes - 8) * scale[..., None]", "w = ((codes - 7) * scale[..., None]",
           ("tests/test_int4.py", QUANT, "-k", "int4")),
    Mutant("int4_fused_with_gradients", "paligemma/int4.py",
           "and x.dtype in (torch.bfloat16, torch.float32) \\\n            and not (torch.is_grad_enabled() and x.requires_grad)",
           "and x.dtype in (torch.bfloat16, torch.float32)", ("tests/test_int4.py", QUANT, "-k", "int4")),
    Mutant("int4_bias_dropped", "paligemma/int4.py", "return y if self.bias is None else y + self.bias", "return y",
           ("tests/test_int4.py", QUANT, "-k", "int4")),
    Mutant("int4_tail_rows_swapped", "paligemma/int4.py", "codes[full::2] = (tail & 15).t()\n        codes[full + 1::2] = (tail >> 4).t()",
           "codes[full::2] = (tail >> 4).t()\n        codes[full + 1::2] = (tail & 15).t()", ("tests/test_int4.py", QUANT, "-k", "int4")),
    Mutant("int4_chunk_scales_to_first_rows", "paligemma/int4.py",
           "sz[:, i:i + ROWS, 0], sz[:, i:i + ROWS, 1] = scale.t(), zero.t()",
           "sz[:, :len(rows), 0], sz[:, :len(rows), 1] = scale.t(), zero.t()", ("tests/test_int4.py", QUANT, "-k", "int4")),
    # --- fp16 loss scaling (paligemma/captioning/precision.py) ---
    Mutant("fp16_clipped_while_scaled", "paligemma/captioning/precision.py", "        self.scaler.unscale_(optimizer)\n", "",
           (PREC,)),
    Mutant("fp16_good_step_counted_skipped", "paligemma/captioning/precision.py",
           "stepped = self.scaler.get_scale() >= before", "stepped = self.scaler.get_scale() > before", (PREC,)),
    Mutant("bf16_non_finite_steps", "paligemma/captioning/precision.py", "stepped = bool(torch.isfinite(grad_norm))",
           "stepped = True", (PREC,)),
    Mutant("fp16_scaling_bf16_too", "paligemma/captioning/precision.py", 'enabled=mode == "fp16")', 'enabled=mode != "none")',
           (PREC,)),
    Mutant("fp16_skipped_not_restored", "paligemma/captioning/precision.py", '        self.skipped = state["skipped"]',
           "        self.skipped = 0", (PREC,)),
    Mutant("fp16_other_mode_state_loaded", "paligemma/captioning/precision.py",
           'if not state or state.get("mode") != self.mode:', "if not state:", (PREC,)),
    # --- attention knockout (paligemma/probe/knockout.py) ---
    Mutant("knockout_last_rule_only", "paligemma/probe/knockout.py", "        blocked |= (_members(q,", "        blocked = (_members(q,",
           (PROBE, "tests/test_knockout.py", "-k", "knockout")),
    Mutant("knockout_positions_include_padding", "paligemma/probe/knockout.py",
           "return torch.isin(slots, spec.to(slots.device))[None] & (labels != PAD)",
           "return torch.isin(slots, spec.to(slots.device))[None]", (PROBE, "tests/test_knockout.py", "-k", "knockout"),
           equivalent="blocked edges of a padding slot change only that padding row's output, which is discarded: real "
                      "rows never attend to padding keys, and both kernels keep a fully masked row finite (no NaN "
                      "reaches them; test_knockout.py checks the real rows by value)"),
    Mutant("knockout_default_skips_last_layer", "paligemma/probe/knockout.py", "range(n_layers) if layers is None",
           "range(n_layers - 1) if layers is None", (PROBE, "tests/test_knockout.py", "-k", "knockout")),
    Mutant("knockout_hooks_left_on", "paligemma/probe/knockout.py", "            h.remove()\n", "            pass\n",
           (PROBE, "tests/test_knockout.py", "-k", "knockout")),
    Mutant("knockout_padding_queries_checked", "paligemma/probe/knockout.py",
           "empty = (~(out[kind] & allowed).any(-1))[:, 0] & real", "empty = (~(out[kind] & allowed).any(-1))[:, 0]",
           (PROBE, "tests/test_knockout.py", "-k", "knockout"),
           equivalent="a padding query is in no group and never among explicit positions (_members drops PAD), so it "
                      "keeps its own key (cache.attention_masks: every query sees itself): its row is never empty"),
    Mutant("knockout_queries_from_slot_0", "paligemma/probe/knockout.py", "_members(q, labels.index_select(1, slots), slots)",
           "_members(q, labels[:, :slots.numel()], slots)", (PROBE, "tests/test_knockout.py", "-k", "knockout")),
    Mutant("knockout_layer_past_the_end_accepted", "paligemma/probe/knockout.py", "if not 0 <= l < n_layers]",
           "if not 0 <= l <= n_layers]", (PROBE, "tests/test_knockout.py", "-k", "knockout")),
    # --- the run folder (paligemma/captioning/run_folder.py) ---
    Mutant("run_folder_seed_may_change", "paligemma/captioning/run_folder.py", '"batch_size", "grad_accum", "seed", ',
           '"batch_size", "grad_accum", ', CAPTRAIN),
    Mutant("run_folder_paths_compared_as_text", "paligemma/captioning/run_folder.py",
           "return Path(a).resolve() == Path(b).resolve()", "return a == b", CAPTRAIN),
    Mutant("run_folder_edits_not_named", "paligemma/captioning/run_folder.py",
           "edited = sorted(n for n, h in b if n in was and (n, h) not in old)", "edited = []", CAPTRAIN),
    Mutant("run_folder_any_pickle", "paligemma/captioning/run_folder.py",
           'torch.load(path, weights_only=True, map_location="cpu")', 'torch.load(path, weights_only=False, map_location="cpu")',
           CAPTRAIN),
    Mutant("run_folder_new_run_over_checkpoint", "paligemma/captioning/run_folder.py", "    if not resume and state.exists():",
           "    if not resume and state.exists() and not (checkpoint / \"step.json\").exists():", CAPTRAIN),
    Mutant("run_folder_no_tokenizer_exported", "paligemma/captioning/run_folder.py",
           '            shutil.copyfile(resolve(base) / "tokenizer.model", tmp / "tokenizer.model")\n', "",
           (TRAIN, "-k", "loss_falls"), slow=True),
    Mutant("run_folder_wrong_shape_loaded", "paligemma/captioning/run_folder.py",
           "for k, v in state[\"model\"].items() if k in current and v.shape != current[k].shape]",
           "for k, v in state[\"model\"].items() if k in current and v.numel() != current[k].numel()]", CAPTRAIN),
    # --- inference (paligemma/inference.py) ---
    Mutant("inference_seed_per_batch_constant", "paligemma/inference.py", "None if seed is None else seed + i",
           "seed", (INFER,)),
    Mutant("inference_value_error_stops_the_rest", "paligemma/inference.py", "except (OSError, ValueError) as e:",
           "except OSError as e:", (INFER,)),
    Mutant("inference_last_short_batch_dropped", "paligemma/inference.py", "for i in range(0, len(items), size):",
           "for i in range(0, len(items) - size + 1, size):", (INFER,)),
    Mutant("inference_adapter_not_applied", "paligemma/inference.py", "quantize=quantize, adapter=adapter)",
           "quantize=quantize, adapter=None)", (INFER,)),
]


def copy_tree(dest: Path):
    """The working tree as git sees it (tracked and untracked-not-ignored files), without build outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def mutate(m: Mutant, original: str) -> str:
    """`original` with the mutant planted; raises ValueError naming the mutant when its text is not
    found exactly once (the code moved: the mutant is stale and would test nothing)."""
    mutated = original
    for old, new in ((m.old, m.new), *([m.extra] if m.extra else [])):
        if mutated.count(old) != 1:
            raise ValueError(f"mutant {m.name}: {m.file} holds {mutated.count(old)} copies of {old!r} (expected 1): stale")
        mutated = mutated.replace(old, new)
    if mutated == original:
        raise ValueError(f"mutant {m.name}: replacing {m.old!r} changes nothing in {m.file}")
    return mutated


def stale(mutants: list) -> list[str]:
    """Every chosen mutant's problem, checked against the working tree before anything runs."""
    errors = []
    for m in mutants:
        try:
            mutate(m, (ROOT / m.file).read_text())
        except (ValueError, OSError) as e:
            errors.append(str(e))
        errors += [f"mutant {m.name}: no test file {t}" for t in m.tests
                   if t.split("::")[0].endswith(".py") and not (ROOT / t.split("::")[0]).is_file()]
    return errors


def run(m: Mutant, scratch: Path, timeout: int) -> tuple[str, float]:
    path = scratch / m.file
    original = path.read_text()
    path.write_text(mutate(m, original))
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                           cwd=scratch, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        verdict = {0: "survived", 1: "killed"}.get(p.returncode, f"error rc={p.returncode}")
        failed = [l.split(" - ")[0][len("FAILED "):] for l in p.stdout.splitlines() if l.startswith("FAILED ")]
        verdict += f" by {failed[0].split('/')[-1]}" if failed else ""
        if verdict.startswith("error"):
            print(p.stdout[-2000:], p.stderr[-2000:])
    except subprocess.TimeoutExpired:
        verdict = "killed (timeout)"
    finally:
        path.write_text(original)
    return verdict, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutant names")
    ap.add_argument("--match", help="only mutants whose name contains this")
    ap.add_argument("--module", nargs="*", help="only mutants of these files or folders (path prefixes), e.g. "
                    "paligemma/gemma.py lora/")
    ap.add_argument("--fast", action="store_true", help="skip mutants that need train.py runs")
    ap.add_argument("--list", action="store_true", help="print the chosen mutants and their tests; run nothing")
    ap.add_argument("--check", action="store_true", help="check that every chosen mutant applies; run nothing")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = ap.parse_args()
    unknown = sorted(set(args.only or []) - {m.name for m in MUTANTS})
    if unknown:
        raise SystemExit(f"no mutant named {unknown}")
    chosen = [m for m in MUTANTS if (not args.only or m.name in args.only) and (not args.match or args.match in m.name)
              and (not args.module or any(m.file.startswith(p) for p in args.module)) and not (args.fast and m.slow)]
    names = [m.name for m in MUTANTS]
    twice = sorted({n for n in names if names.count(n) > 1})
    errors = [f"mutant name {n} used twice" for n in twice] + stale(chosen)
    if errors:  # all of them at once, before an hour of runs
        raise SystemExit("\n".join(errors))
    if args.check:
        print(f"{len(chosen)} mutants apply")
        return
    if args.list:
        for m in chosen:
            print(f"{m.file}: {m.name}{' (slow)' if m.slow else ''}: {' '.join(m.tests)}")
        return
    results = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        scratch = Path(tmp)
        copy_tree(scratch)
        for m in chosen:
            verdict, secs = run(m, scratch, args.timeout)
            results[m.file].append((m, verdict))
            note = f"  (equivalent: {m.equivalent})" if m.equivalent else ""
            print(f"{m.file}: {m.name}: {verdict} ({secs:.0f} s){note}", flush=True)
    print("\n| module | killed / mutants (equivalent excluded) | survivors |\n|---|---:|---|")
    for file, rs in results.items():
        real = [(m, v) for m, v in rs if not m.equivalent]
        killed = sum(v.startswith("killed") for _, v in real)
        survivors = ", ".join(m.name for m, v in real if not v.startswith("killed")) or "-"
        print(f"| {file} | {killed} / {len(real)} | {survivors} |")
    equivalent = [(m, v) for rs in results.values() for m, v in rs if m.equivalent]
    if equivalent:
        print("\nequivalent mutants (expected to survive):")
        for m, v in equivalent:
            print(f"- {m.name} ({m.file}, {v}): {m.equivalent}")


if __name__ == "__main__":
    main()
