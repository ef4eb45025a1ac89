"""Mutation run (issue #16): plant realistic one-line bugs, one at a time, in a scratch copy of the
project and run the tests that should notice. Not part of CI: a full run takes ~1-2 hours on 2 cores.

    python benchmarks/mutants.py                    # every mutant
    python benchmarks/mutants.py --only lr_warmup_le atomic_no_fsync
    python benchmarks/mutants.py --module paligemma/gemma.py --fast   # --fast: skip the train.py runs

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
    Mutant("accum_first_micro_count", "train.py", "for b in micro_batches)",
           "for b in micro_batches[:1]) * args.grad_accum",
           (LOOP, "-k", "grad_accumulation"), slow=True),
    Mutant("lr_of_next_step", "train.py", "lr_at(step, lr, args.warmup, args.steps)",
           "lr_at(step + 1, lr, args.warmup, args.steps)", (LOOP, "-k", "logged_lr"), slow=True),
    Mutant("loss_mean_not_sum", "paligemma/captioning/distributed.py", 'reduction="sum")', 'reduction="mean")',
           (LOOP, "-k", "mean_over_label_tokens"), slow=True),
    Mutant("labels_count_first_column", "train.py", '(b["labels"][:, 1:] != IGNORE)', '(b["labels"] != IGNORE)',
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
    Mutant("resume_torch_rng_not_restored", "paligemma/captioning/training.py",
           'torch.set_rng_state(state["torch_rng"])', 'torch.get_rng_state()',
           (LOOP, "-k", "resume_equals"), slow=True),
    Mutant("resume_caption_rng_not_restored", "paligemma/captioning/training.py",
           'rng.setstate(state["rng"])', 'rng.random()', (LOOP, "-k", "resume_equals"), slow=True),
    # --- crash-safe writes ---
    Mutant("atomic_file_no_fsync", "paligemma/atomic.py", "            os.fsync(f.fileno())\n",
           "            pass\n", ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_no_flush", "paligemma/atomic.py", "            f.flush()\n", "            pass\n",
           ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_temp_left", "paligemma/atomic.py", "            os.unlink(tmp)", "            pass",
           ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_in_place", "paligemma/atomic.py", "with os.fdopen(fd, mode) as f:",
           "with os.fdopen(fd, mode) as _, open(path, mode) as f:", ("tests/test_atomic_crash.py",)),
    Mutant("atomic_file_in_place_no_temp", "paligemma/atomic.py",  # written where it lands, the temp discarded
           "with os.fdopen(fd, mode) as f:", "with os.fdopen(fd, mode) as _, open(path, mode) as f:",
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
    Mutant("softmax_probs_kept_float32", "paligemma/attention.py", "torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v",
           "(torch.softmax(scores.float(), dim=-1) @ v.float()).to(q.dtype)", ("tests/test_numerics.py",)),
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
    Mutant("sliding_window_off_by_one", "paligemma/model.py", "(k > q - window)", "(k >= q - window)",
           ("tests/test_model.py", "tests/test_generation.py")),
    Mutant("prefix_causal", "paligemma/model.py", "(causal[None] | both_prefix)", "(causal[None])",
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
    Mutant("bleu_shortest_reference", "paligemma/captioning/metrics.py", "min((abs(len(r) - len(h)), len(r)) for r in rs)[1]",
           "min(len(r) for r in rs)", ("tests/test_metrics.py",)),
    Mutant("bleu_one_guess_minimum", "paligemma/captioning/metrics.py", "max(len(h) - k + 1, 0)", "max(len(h) - k + 1, 1)",
           ("tests/test_metrics.py",)),
    Mutant("cider_unclipped", "paligemma/captioning/metrics.py", "min(x, vr[k].get(g, 0.0))", "x",
           ("tests/test_metrics.py",)),
    Mutant("cider_sigma", "paligemma/captioning/metrics.py", "(2 * sigma ** 2)", "(sigma ** 2)", ("tests/test_metrics.py",)),
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


def run(m: Mutant, scratch: Path, timeout: int) -> tuple[str, float]:
    path = scratch / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"mutant {m.name}: {m.file} holds {original.count(m.old)} copies of {m.old!r} (expected 1): stale")
    mutated = original.replace(m.old, m.new)
    if m.extra:
        if mutated.count(m.extra[0]) != 1:
            raise SystemExit(f"mutant {m.name}: {m.extra[0]!r} not found once in {m.file}: stale")
        mutated = mutated.replace(*m.extra)
    path.write_text(mutated)
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
    ap.add_argument("--module", help="only mutants of this file, e.g. paligemma/gemma.py")
    ap.add_argument("--fast", action="store_true", help="skip mutants that need train.py runs")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if (not args.only or m.name in args.only) and (not args.module or m.file == args.module)
              and not (args.fast and m.slow)]
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
