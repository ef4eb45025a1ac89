"""Mutation run (issue #16): plant realistic one-line bugs, one at a time, in a scratch copy of the
project and run the tests that should notice. Not part of CI: a full run takes ~1-2 hours on 2 cores.

    python benchmarks/mutants.py                    # every mutant
    python benchmarks/mutants.py --only lr_warmup_le atomic_file_no_fsync
    python benchmarks/mutants.py --module paligemma/gemma.py --fast   # --fast: skip the train.py runs
    python benchmarks/mutants.py --module lora/ paligemma/captioning/  # file or folder prefixes
    python benchmarks/mutants.py --match compare --list               # names containing 'compare', not run

A new module's mutants go in MUTANTS under a comment naming it; `--module` selects them by path.

Each mutant names the file, the exact text it replaces (found exactly once, or the run stops: the
mutant is stale) and the tests to run (pytest arguments). A mutant is killed when those tests fail or
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
           "        if after <= 0:\n            self.packed = _reorder(embedding)",
           "        if after < 0:\n            self.packed = _reorder(embedding)", (PACK, "-k", "frees_each")),
    Mutant("pack_leaves_counting_layers", "paligemma/packing.py", "    if after <= 0:\n        for m in model.modules():",
           "    if after < 0:\n        for m in model.modules():", (PACK, "-k", "after_th_call")),
    Mutant("mapped_views_packed_on_load", "paligemma/packing.py", "if name not in names or mapped(tensor):",
           "if name not in names:", (PACK, "-k", "after_th_call")),
    Mutant("plain_weight_kept_after_pack", "paligemma/packing.py", "        self.plain = None\n",
           "        self.plain = self.plain\n", (PACK, "-k", "after_th")),
    # --- hook points (paligemma/hookpoint.py, attention.py) ---
    Mutant("replaced_forward_ignored", "paligemma/hookpoint.py", 'or self._backward_pre_hooks or "forward" in self.__dict__',
           "or self._backward_pre_hooks", (HOOKS, "-k", "replaced_forward")),  # kind
    Mutant("global_forward_hooks_ignored", "paligemma/hookpoint.py",
           "or _module._global_forward_hooks or _module._global_forward_pre_hooks", "or _module._global_forward_pre_hooks",
           (HOOKS, "-k", "global_hooks")),  # kind
    Mutant("global_pre_hooks_ignored", "paligemma/hookpoint.py",
           "or _module._global_forward_hooks or _module._global_forward_pre_hooks", "or _module._global_forward_hooks",
           (HOOKS, "-k", "global_hooks")),
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
    Mutant("captions_not_stripped", "paligemma/captioning/data.py", "captions=[c.strip() for c in caps]", "captions=caps",
           (DATA, "-k", "blank_captions")),
    Mutant("caption_columns_sorted_as_text", "paligemma/captioning/data.py",
           'sorted((k for k in row if k and k.startswith("caption")), key=lambda k: (len(k), k))',
           'sorted(k for k in row if k and k.startswith("caption"))', (DATA, "-k", "numeric_order")),
    Mutant("jsonl_blank_line_parsed", "paligemma/captioning/data.py", "        if line.strip():", "        if line:",
           (DATA, "-k", "jsonl_blank")),
    Mutant("number_caption_accepted", "paligemma/captioning/data.py",
           "all(isinstance(c, str) or c is None for c in caps)", "all(isinstance(c, (str, int)) or c is None for c in caps)",
           (DATA, "-k", "jsonl_blank")),
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
    Mutant("prediction_lines_enumerated", "evaluate.py", 'rows = csv_rows(csv.DictReader(io.StringIO(text, newline="")))',
           'rows = list(enumerate(csv.DictReader(io.StringIO(text, newline="")), 2))', (EVAL, "-k", "quoted_newlines")),
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
    Mutant("trim_log_drops_checkpoint_step", "paligemma/captioning/run_folder.py", 'json.loads(l).get("step", 0) <= step]',
           'json.loads(l).get("step", 0) < step]', (TRAIN, "-k", "best_survives"), slow=True),
    Mutant("stop_one_evaluation_late", "paligemma/captioning/validation.py", "self.stale >= self.patience",
           "self.stale > self.patience", (VALID,)),
    Mutant("best_tie_replaces", "paligemma/captioning/validation.py", "        if score > self.score:",
           "        if score >= self.score:", (VALID,)),
    Mutant("best_json_adopts_score_only", "paligemma/captioning/validation.py",
           'self.step, self.score = kept["step"], kept["val_CIDEr-D"]', 'self.score = kept["val_CIDEr-D"]', (VALID,)),
    Mutant("stale_reset_on_resume", "paligemma/captioning/validation.py",
           'state["step"], state["score"], state["stale"]', 'state["step"], state["score"], 0', (VALID,)),
    # --- crash-safety (atomic.py, weights.py) ---
    Mutant("swap_leaves_old", "paligemma/atomic.py",
           "    os.replace(new, path)\n    fsync_dir(path.parent)\n    shutil.rmtree(old, ignore_errors=True)",
           "    os.replace(new, path)\n    fsync_dir(path.parent)", ("tests/test_atomic.py", "-k", "completed_swaps")),  # kind
    Mutant("header_range_unchecked", "paligemma/safetensors_io.py", "<= size - 8 - n or end - start != nbytes:",
           "<= size - 8 - n:", ("tests/test_weights.py", "-k", "byte_range")),  # kind
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
