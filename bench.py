"""Speed and memory of the fast paths, measured on the machine it runs on.

On the CPU (the default):
  1. training tokens/s, GPT-2 124M, context 256, batch 2: the book's path vs --fast
  2. greedy generation tokens/s, 124M, "Hello, I am", 200 new tokens: uncached vs KV cache
  3. peak resident memory of loading a saved 124M and 355M model: plain vs lean (meta + mmap)
  4. dataset build time and memory for stride=1 over 2 million tokens
  5. achieved FLOP/s of the training step against a large torch.mm (model FLOPs utilisation)
  6. evaluation: HellaSwag items/s as `ch05_load_gpt2.py --eval` scores them, tiny and 124M
  7. tokenizing a named corpus (Parquet, as `--data fineweb-edu`): tokens/s with 1 worker
     process and with one per CPU
  8. ch07_instruct.py --serve: time to first token and tokens/s with 1, 4 and 16 clients
     at once, streaming completions, tiny and 124M
  9. judging (ch07_instruct.py's client): entries/s with 1 and 8 workers against a fake
     OpenAI-style judge that answers in 50 ms
 10. near-duplicates (ch07_data.py): seconds and peak memory over 52,000 synthetic entries
 11. FLOPs per token of a training step, 124M to 1558M: FlopCounterMode's count against
     the formula every MFU here uses (ch04_gpt.py --flops)

With --attention (CPU or CUDA): ch03_attention.py's implementations of the same
attention (the book's, a wrapper of single heads, fused QKV, einsum, SDPA, SDPA's
math kernel, nn.MultiheadAttention, FlexAttention), forward and forward + backward
(compiled too on CUDA), as a table and a bar chart.

With --device cuda:
  1. training through ch05_train.py's own loop (data loading, logging and evaluations
     included), 124M, context 1024, batch 16, on a memory-mapped corpus: the book's
     path, --fast and --fast --compile; tokens/s, peak GPU memory, and MFU against a
     bf16 8192^3 matmul measured in the same run; and the peak GPU memory of a process
     training GPT-2 774M and 1558M with --fast (context 1024, batch 1), alone and,
     with several GPUs, sharded over them with --fsdp
  2. batch-1 greedy decoding, 200 new tokens: uncached, KV cache (a CUDA graph), the
     same with the fast kernels, and Hugging Face's GPT-2 `generate` where
     transformers is installed
  3. loading a saved 124M and 355M model onto the GPU, plain vs lean: peak host
     memory and peak GPU memory, each over the weights' size

Every measurement runs in a fresh subprocess, and the variants alternate
(A B A B ...); the table shows medians and ranges, and how much CPU other
processes used meanwhile (in cores), since on a shared machine that is what
moves the numbers.

Run:  python bench.py [--quick] [--repeats 3] [--json bench.json]
      python bench.py --device cuda [--data-dir data]
Imports from ch02_data.py, ch04_gpt.py, ch05_train.py and ch05_load_gpt2.py.
"""
import argparse
import importlib.util
import json
import math
import os
import resource  # CPU time of the children
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {"model": "124M", "context": 256, "batch": 2, "train_steps": 4, "warmup": 2,
        "new_tokens": 200, "mm_n": 4096, "dataset_tokens": 2_000_000, "eval_items": 40,
        "tokenize_copies": 40, "serve_tokens": 32, "judge_entries": 64, "dup_entries": 52_000,
        "attn_batch": 2, "attn_context": 256, "attn_steps": 5, "bpe_bytes": 1_000_000,
        "bpe_vocab": 5000, "repeats": 3}
# --quick: the same measurements on a small model, in under a minute
QUICK = {"model": "bench-small", "context": 128, "batch": 2, "train_steps": 3, "warmup": 1,
         "new_tokens": 30, "mm_n": 2048, "dataset_tokens": 2_000_000, "eval_items": 8,
         "tokenize_copies": 10, "serve_tokens": 16, "judge_entries": 32, "dup_entries": 5_000,
         "attn_batch": 2, "attn_context": 128, "attn_steps": 3, "bpe_bytes": 200_000,
         "bpe_vocab": 1000, "repeats": 1}
SMALL = {"emb_dim": 256, "n_layers": 4, "n_heads": 4}
# --device cuda: the GPU configuration. Rates are read between the
# evaluations at steps eval_every and 2 * eval_every (compiling comes before)
CUDA = {"model": "124M", "context": 1024, "batch": 16, "eval_every": 100, "new_tokens": 200,
        "mm_n": 8192, "attn_batch": 8, "attn_context": 1024, "attn_steps": 20, "repeats": 1}


# ---- Helpers the child processes use ----

def model_config(name, **overrides):
    from ch04_gpt import gpt_config
    if name == "bench-small":
        return gpt_config("124M", **SMALL, **overrides)
    return gpt_config(name, **overrides)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Make the peak (VmHWM) start again from the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def training_flops(cfg, batch, context):
    """A training step's FLOPs: ch04_gpt.py's count per token (6N + 12 L T d, what
    FlopCounterMode counts), for batch x context tokens."""
    from ch04_gpt import flops_per_token
    return flops_per_token(cfg, context) * batch * context


# ---- The measurements, one per child process ----

def child_train(variant, p):
    import torch
    import ch05_train as ch05
    from ch04_gpt import FAST_KERNELS, GPTModel
    fast = variant == "fast"
    cfg = model_config(p["model"], context_length=p["context"],
                       **(FAST_KERNELS if fast else {}))
    torch.manual_seed(123)
    model = GPTModel(cfg)
    model.train()
    # the same optimizer the command builds, with and without --fast
    optimizer = ch05.make_optimizer(model, lr=4e-4, weight_decay=0.1, fused=fast)
    x = torch.randint(0, cfg["vocab_size"], (p["batch"], p["context"]))
    y = torch.randint(0, cfg["vocab_size"], (p["batch"], p["context"]))
    times = []
    for i in range(p["warmup"] + p["train_steps"]):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = ch05.calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        optimizer.step()
        loss.item()
        if i >= p["warmup"]:
            times.append(time.perf_counter() - start)
    step = median(times)
    flops = training_flops(cfg, p["batch"], p["context"])
    return {"tokens_per_s": p["batch"] * p["context"] / step, "step_s": step,
            "gflops_per_s": flops / step / 1e9}


def child_mm(variant, p):
    """A large matmul's FLOP/s: fp32 on the CPU, bf16 on CUDA (what --fast uses there)."""
    import torch
    n, cuda = p["mm_n"], p.get("device") == "cuda"
    a, b = (torch.randn(n, n, device=p.get("device", "cpu"),
                        dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(2))
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(7):
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"gflops_per_s": 2 * n ** 3 / median(times) / 1e9}


def child_copy(variant, p):
    import torch
    a = torch.ones(2 ** 27)  # 512 MiB, far beyond any cache
    b = torch.empty_like(a)
    times = []
    for i in range(7):
        start = time.perf_counter()
        b.copy_(a)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"gb_per_s": 2 * a.numel() * 4 / median(times) / 1e9}  # bytes read + written


def child_generate(variant, p):
    """Batch-1 greedy decoding of "Hello, I am": the project's paths (uncached,
    cached, cached with the fast kernels; the same random model in each, so their
    tokens compare) or Hugging Face's GPT-2 ("hf")."""
    import torch
    from ch04_gpt import GPTModel, use_fast_kernels
    from ch05_generate import generate
    device = torch.device(p.get("device", "cpu"))
    idx = torch.tensor([[15496, 11, 314, 716]], device=device)  # "Hello, I am"
    torch.manual_seed(123)
    if variant == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config()).to(device).eval()
        run = lambda n: model.generate(  # noqa: E731
            idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            attention_mask=torch.ones_like(idx), pad_token_id=50256)
    else:
        cfg = model_config(p["model"])
        model = GPTModel(cfg).to(device).eval()
        if variant == "fast":
            use_fast_kernels(model)
        run = lambda n: generate(model, idx, n, cfg["context_length"],  # noqa: E731
                                 use_cache=variant != "uncached")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(2)  # warm up (on CUDA, with the cache, this records the step's graph)
    synchronize()
    start = time.perf_counter()
    out = run(p["new_tokens"])
    synchronize()
    seconds = time.perf_counter() - start
    # bytes of weights read per new token: every matrix but the embedding tables
    weight_bytes = sum(t.numel() * t.element_size() for n, t in model.named_parameters()
                       if not n.startswith(("tok_emb", "pos_emb")))
    return {"tokens_per_s": (out.shape[1] - idx.shape[1]) / seconds,
            "tokens": out[0, idx.shape[1]:].tolist(), "weight_bytes": weight_bytes}


def child_load(variant, p):
    """Peak resident memory (and on CUDA peak allocated GPU memory) of loading a
    saved model ("plain" or "lean", ":355M" for GPT-2 355M's size) over its weights."""
    import torch
    from ch04_gpt import GPTModel
    from ch05_load_gpt2 import load_gpt2_model
    route, _, size = variant.partition(":")
    size = size or "124M"
    models_dir = Path(p["models_dir"])
    cfg = model_config(p["model"] if size == "124M" else size, qkv_bias=True, drop_rate=0.0)
    baseline = rss_bytes()
    reset_peak_rss()
    if route == "plain":  # the usual route: random weights, then a second copy from disk
        model = GPTModel(cfg)
        model.load_state_dict(torch.load(models_dir / size / "model.pth", weights_only=True))
    else:  # what load_gpt2_model does once the weights are converted: meta + mmap + assign
        model, _ = load_gpt2_model(size, models_dir)
    cuda = p.get("device") == "cuda"
    model = model.to("cuda") if cuda else model
    with torch.no_grad():
        model.eval()(torch.tensor([[15496, 11, 314, 716]], device=model.tok_emb.weight.device))
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    return {"peak_above_baseline": peak_rss_bytes() - baseline, "param_bytes": param_bytes,
            "multiple": (peak_rss_bytes() - baseline) / param_bytes,
            "gpu_multiple": torch.cuda.max_memory_allocated() / param_bytes if cuda
            else float("nan")}


def child_dataset(variant, p):
    import numpy as np
    from torch.utils.data import default_collate
    from ch02_data import GPTDatasetV1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, p["dataset_tokens"], dtype=np.int64)
    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    dataset = GPTDatasetV1.from_token_ids(tokens, max_length=256, stride=1)
    for _ in range(50):  # and read 50 batches of 8 windows from random places
        default_collate([dataset[int(i)] for i in rng.integers(0, len(dataset), 8)])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "windows": len(dataset),
            "mb_beyond_tokens": (peak_rss_bytes() - baseline) / 1e6,
            "token_array_mb": tokens.nbytes / 1e6}


def child_eval(variant, p):
    """HellaSwag items/s (completion style, batched as --eval scores them) for the
    tiny model or GPT-2 124M: items of HellaSwag's typical shape, a context of 40
    tokens and 4 endings of 20, random ids (the cost does not depend on the text)."""
    import torch
    from ch04_gpt import GPTModel
    from ch05_load_gpt2 import score_hellaswag
    device = torch.device(p.get("device", "cpu"))
    torch.manual_seed(0)
    cfg = model_config("tiny" if variant == "tiny" else "124M", drop_rate=0.0)
    model = GPTModel(cfg).to(device).eval()
    ids = lambda n: torch.randint(0, 50257, (n,)).tolist()  # noqa: E731
    items = [(ids(40), [ids(20) for _ in range(4)], 0) for _ in range(p["eval_items"])]
    score_hellaswag(model, items[:4], device, cfg["context_length"])  # warm up
    start = time.perf_counter()
    score_hellaswag(model, items, device, cfg["context_length"])
    return {"items_per_s": len(items) / (time.perf_counter() - start)}


def child_tokenize(variant, p):
    """Tokenizing a named corpus as `--data fineweb-edu` does: GPT-2 tokens/s from a
    Parquet file of documents (this project's own files' text, in row groups), in
    one process or in one per CPU; timed after the workers have started."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ch02_data import token_workers
    path = Path(p["work_dir"]) / "corpus.parquet"
    if not path.exists():
        text = "\n".join(f.read_text(encoding="utf-8") for f in sorted(HERE.glob("*.py")))
        docs = [d for d in text.split("\n\n") if d.strip()] * p["tokenize_copies"]
        pq.write_table(pa.table({"text": docs}), path, row_group_size=200)
    groups = pq.ParquetFile(path).metadata.num_row_groups
    workers = 1 if variant == "1" else os.cpu_count()
    with token_workers(workers, p["models_dir"]) as tokenize:
        list(tokenize(path, range(min(workers, groups))))  # the workers up and warm
        start = time.perf_counter()
        tokens = sum(len(ids) for _, _, ids in tokenize(path, range(groups)))
        return {"tokens_per_s": tokens / (time.perf_counter() - start), "workers": workers}


def bpe_text(n_bytes):
    """n_bytes of varied English and code, offline: this project's own files, repeated."""
    files = sorted(HERE.glob("*.py")) + sorted(HERE.glob("*.md"))
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    return (text * (n_bytes // len(text.encode()) + 1)).encode()[:n_bytes].decode(errors="ignore")


def child_bpe(variant, p):
    """ch02_data.py's BPE from scratch ("ours", in Python) beside Hugging Face's
    tokenizers (in Rust, on every core): training a vocabulary of bpe_vocab on
    bpe_bytes of text; then encoding that text with GPT-2's vocabulary, by each
    of them and by tiktoken (Rust, one thread)."""
    from ch02_data import BPETokenizer, bpe_tokenizer, hf_vocabulary_files
    text, gpt2 = bpe_text(p["bpe_bytes"]), bpe_tokenizer(p["models_dir"])
    mb, result = len(text.encode()) / 1e6, {}
    expected = gpt2.encode(text, disallowed_special=())  # "<|endoftext|>" in it is text
    if variant == "ours":
        start = time.perf_counter()
        trained = BPETokenizer().train(text, p["bpe_vocab"])
        result["train_s"] = time.perf_counter() - start
        result["merges_per_s"] = len(trained.merges) / result["train_s"]
        encoder = BPETokenizer.from_tiktoken(gpt2)
        encode = lambda: encoder.encode(text, disallowed_special=())  # noqa: E731
    elif variant == "hf":
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trained = Tokenizer(models.BPE())
        trained.pre_tokenizer = byte_level
        trainer = trainers.BpeTrainer(vocab_size=p["bpe_vocab"], special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        start = time.perf_counter()
        trained.train_from_iterator(text.splitlines(keepends=True), trainer)
        result["train_s"] = time.perf_counter() - start
        result["merges_per_s"] = (trained.get_vocab_size() - 257) / result["train_s"]
        folder = Path(p["work_dir"])
        for name, content in hf_vocabulary_files(gpt2).items():
            (folder / name).write_text(content, encoding="utf-8")
        encoder = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"),
                                                 str(folder / "merges.txt")))
        encoder.pre_tokenizer = byte_level
        encode = lambda: encoder.encode(text).ids  # noqa: E731
    else:
        encode = lambda: gpt2.encode(text, disallowed_special=())  # noqa: E731
    start = time.perf_counter()
    ids = encode()
    result["encode_mb_per_s"] = mb / (time.perf_counter() - start)
    result["same_ids_as_tiktoken"] = float(ids == expected)
    return result


def child_serve(variant, p):
    """ch07_instruct.py --serve under load: `clients` clients at once, each streaming
    a completion of serve_tokens tokens (random weights: the cost does not depend
    on them); the median time to first token and all clients' tokens/s."""
    import concurrent.futures
    import requests
    import torch
    import ch06_classify as ch06
    import ch07_instruct as ch07
    from ch02_data import bpe_tokenizer
    from ch04_gpt import GPTModel
    name, clients = variant.rsplit(":", 1)
    torch.manual_seed(0)
    cfg = model_config(name, drop_rate=0.0)
    served = ch07.ServedModel(GPTModel(cfg).eval(), bpe_tokenizer(), torch.device("cpu"), cfg,
                              name, False, {"max_new_tokens": p["serve_tokens"],
                                            "temperature": 0.0, "top_k": None, "top_p": None},
                              max_queue=64)
    server, url, _ = ch06.start_serving(served, {"host": "127.0.0.1", "port": 0,
                                                 "api_key": None, "cors_origin": None,
                                                 "max_queue": 64})
    url += "/v1/completions"

    def client(i):
        start, first, tokens = time.perf_counter(), None, 0
        with requests.post(url, stream=True, json={
                "prompt": f"Every effort moves you {i}", "max_tokens": p["serve_tokens"],
                "stream": True, "stream_options": {"include_usage": True}}) as answer:
            for line in answer.iter_lines():
                if line.startswith(b"data: {") and b'"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                elif line.startswith(b"data: {") and first is None:
                    first = time.perf_counter() - start
        return first, tokens
    client(-1)  # warm up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(int(clients)) as pool:
        results = list(pool.map(client, range(int(clients))))
    seconds = time.perf_counter() - start
    ch06.stop_serving(server, served)
    tokens = sum(tokens for _, tokens in results)
    return {"ttft_ms": 1000 * median([first for first, _ in results]),
            "tokens_per_s": tokens / seconds, "tokens": tokens}


def child_judge(variant, p):
    """Judging through ch07_instruct.py's client with `variant` workers, against a
    fake OpenAI-style judge on 127.0.0.1 that answers each request after 50 ms:
    entries scored a second."""
    import http.server
    import threading
    import ch07_instruct as ch07

    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.05)
            body = json.dumps({"choices": [{"index": 0, "message": {
                "role": "assistant", "content": "50"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    entries = [{"instruction": f"Task {i}.", "input": "", "output": "An answer.",
                "model_response": "A response."} for i in range(p["judge_entries"])]
    client = ch07.ModelClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge")
    start = time.perf_counter()
    scores = ch07.generate_model_scores(entries, "model_response", client=client,
                                        workers=int(variant))
    seconds = time.perf_counter() - start
    server.shutdown()
    return {"entries_per_s": len(scores) / seconds}


def synthetic_entries(n, seed=0):
    """n instruction entries of random words, a near-duplicate instruction every 100th."""
    import random
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(5000)]
    phrase = lambda low, high: " ".join(rng.choices(words, k=rng.randint(low, high)))  # noqa: E731
    entries = [{"instruction": phrase(4, 14), "input": phrase(3, 8) if i % 3 == 0 else "",
                "output": phrase(3, 30)} for i in range(n)]
    for k in range(0, n - 1, 100):
        entries[k + 1]["instruction"] = entries[k]["instruction"] + " again"
    return entries


def child_duplicates(variant, p):
    """ch07_data.py's near-duplicate finder over dup_entries synthetic entries, all
    three fields: seconds and peak resident memory."""
    import ch07_data
    entries = synthetic_entries(p["dup_entries"])
    reset_peak_rss()
    before = rss_bytes()
    start = time.perf_counter()
    pairs = [pair for field in ch07_data.FIELDS
             for pair in ch07_data.find_near_duplicates(entries, field=field)]
    return {"seconds": time.perf_counter() - start, "pairs": len(pairs),
            "peak_mb": peak_rss_bytes() / 2 ** 20, "mb_beyond_start": (peak_rss_bytes() - before)
            / 2 ** 20}


def child_attention(variant, p):
    """ch03_attention.py's implementations of the same attention (GPT-2 124M's: 768
    wide, 12 heads), forward and forward + backward, in milliseconds; a variant
    ending in "+compile" is torch.compile'd (CUDA)."""
    import warnings
    import torch
    import ch03_attention as ch03
    warnings.simplefilter("ignore")  # FlexAttention's note that it runs uncompiled
    name, _, compiled = variant.partition("+")
    device = torch.device(p["device"])
    torch.manual_seed(0)
    mha = ch03.MultiHeadAttention(768, 768, p["attn_context"], 0.0, 12).to(device).eval()
    attention = ch03.attention_implementations()[name]
    if compiled:
        attention = torch.compile(attention)
    x = torch.randn(p["attn_batch"], p["attn_context"], 768, device=device, requires_grad=True)

    def timed(backward):
        times = []
        for i in range(p["attn_steps"] + 2):  # two to warm up
            start = time.perf_counter()
            with torch.set_grad_enabled(backward):
                out = attention(mha, x)
                if backward:
                    out.sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 1000 * median(times)
    no_backward = name == "FlexAttention" and device.type == "cpu"  # PyTorch has none there
    return {"forward_ms": timed(False), "backward_ms": float("nan") if no_backward
            else timed(True)}


FLOPS_SIZES = ("124M", "355M", "774M", "1558M")


def child_flops(variant, p):
    """A GPT-2 size's FLOPs per token of a training step (context 1024): counted by
    FlopCounterMode on the meta device, and by the formula the MFU figures use."""
    from ch04_gpt import counted_flops_per_token, flops_per_token, gpt_config
    cfg = gpt_config(variant)
    counted, formula = counted_flops_per_token(cfg), flops_per_token(cfg)
    return {"gflops_per_token": counted / 1e9, "count_over_formula": counted / formula}


def attention_variants(p):
    import ch03_attention as ch03
    names = list(ch03.attention_implementations())
    return tuple(names + ([f"{n}+compile" for n in names] if p["device"] == "cuda" else []))


def summarise_attention(runs, p, plot_path):
    """The table's rows, and a bar chart of both times per implementation."""
    values, stat = statistics(runs)
    variants = [v for v in attention_variants(p) if values("attention", v, "forward_ms")]
    rows = [(label, v, stat("attention", v, key), "ms") for v in variants
            for label, key in (("forward", "forward_ms"), ("fwd+bwd", "backward_ms"))]
    from ch03_attention import pyplot, save_figure
    fig, ax = pyplot().subplots(figsize=(8, 0.45 * len(variants) + 1.2))
    at = list(range(len(variants)))
    for shift, label, key in ((-0.2, "forward", "forward_ms"), (0.2, "forward + backward",
                                                                  "backward_ms")):
        ax.barh([a + shift for a in at], [stat("attention", v, key)["median"] for v in variants],
                height=0.4, label=label)
    ax.set_yticks(at, variants)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms (batch {p['attn_batch']}, {p['attn_context']} tokens, 768 wide, "
                  f"12 heads, {p['device']})")
    ax.legend()
    fig.tight_layout()  # the implementations' names in full
    save_figure(fig, plot_path)
    print(f"Saved {plot_path}")
    return rows, {}, {}, None


def child_save(variant, p):
    """A saved model the load benchmark reads, in load_gpt2_model's layout: the
    run's model as 124M (variant "-"), or GPT-2 355M's size (random weights)."""
    import torch
    from ch04_gpt import GPTModel
    size = "124M" if variant == "-" else variant
    cfg = model_config(p["model"] if size == "124M" else size, qkv_bias=True, drop_rate=0.0)
    folder = Path(p["models_dir"]) / size
    folder.mkdir(parents=True)
    (folder / "hparams.json").write_text(json.dumps(
        {"n_vocab": cfg["vocab_size"], "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"],
         "n_head": cfg["n_heads"], "n_layer": cfg["n_layers"]}))
    torch.manual_seed(0)
    torch.save(GPTModel(cfg).state_dict(), folder / "model.pth")
    return {}


def child_train_command(variant, p):
    """tokens/s of ch05_train.py's own loop between two evaluations: steps
    eval_every+1 .. 2*eval_every and the evaluation at eval_every (one per
    eval_every steps, as a run has them); the first steps (compiling) are left out."""
    import torch
    import ch05_train as ch05
    out = Path(p["work_dir"]) / f"run-{variant}-{os.getpid()}"
    out.mkdir()
    (out / "tokens").symlink_to(Path(p["work_dir"]) / "tokens")  # tokenized once, by the parent
    flags = {"book": [], "fast": ["--fast"], "fast+compile": ["--fast", "--compile"]}[variant]
    every = p["eval_every"]
    result = ch05.main(ch05.parse_args([
        "--data", p["corpus"], "--memmap", "--model-size", p["model"], "--context-length",
        str(p["context"]), "--batch-size", str(p["batch"]), "--max-steps", str(2 * every + 1),
        "--eval-freq", str(every), "--save-every", "0", "--device", p["device"],
        "--out", str(out), *flags]))
    rows = {r["step"]: r for r in result["history"]["log"]}
    first, last = rows[every], rows[2 * every]
    tokens_per_s = (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] -
                                                                    first["elapsed_s"])
    cfg = model_config(p["model"], context_length=p["context"])
    flops = training_flops(cfg, p["batch"], p["context"]) / (p["batch"] * p["context"])
    cuda = p["device"] == "cuda"
    return {"tokens_per_s": tokens_per_s, "gflops_per_s": tokens_per_s * flops / 1e9,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")}


def child_train_memory(variant, p):
    """Peak GPU memory of a process of ch05_train.py --fast training GPT-2 774M or
    1558M (context 1024, batch 1 a process, a few steps): one process (as each
    DDP process holds), or --fsdp over every GPU (variant "SIZE:fsdp")."""
    import re
    import torch
    size, _, fsdp = variant.partition(":")
    out = Path(p["work_dir"]) / f"memory-{size}-{fsdp or 'one'}-{os.getpid()}"
    out.mkdir()
    (out / "tokens").symlink_to(Path(p["work_dir"]) / "tokens")  # tokenized once, by the parent
    launcher = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={torch.cuda.device_count()}"] if fsdp else []
    done = subprocess.run(
        [sys.executable, *launcher, str(HERE / "ch05_train.py"), "--data", p["corpus"],
         "--memmap", "--model-size", size, "--context-length", "1024", "--batch-size", "1",
         "--max-steps", "3", "--eval-freq", "1000", "--eval-iter", "1", "--save-every", "0",
         "--max-new-tokens", "1", "--device", "cuda", "--fast", "--out", str(out),
         *(["--fsdp"] if fsdp else [])], capture_output=True, text=True)
    found = re.search(r"peak GPU memory ([\d.]+) GB", done.stdout + done.stderr)
    last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
    return {"peak_gb": float(found.group(1)) if found else float("nan"),  # out of memory, say
            "processes": torch.cuda.device_count() if fsdp else 1,
            "failed": None if found else (last[0][-200:] if last else f"exit {done.returncode}")}


CHILDREN = {"save": child_save, "train": child_train, "mm": child_mm, "copy": child_copy,
            "generate": child_generate, "load": child_load, "dataset": child_dataset,
            "train_command": child_train_command, "eval": child_eval,
            "tokenize": child_tokenize, "serve": child_serve, "train_memory": child_train_memory,
            "judge": child_judge, "duplicates": child_duplicates, "attention": child_attention,
            "flops": child_flops, "bpe": child_bpe}


# ---- The parent: run children interleaved, summarise ----

def cpu_busy_seconds():
    """CPU seconds spent by everything on this machine so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(name, variant, params, env):
    before_busy, before_children = cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "bench.py"), "--child", name, "--variant",
                           variant, "--params", json.dumps(params)],
                          capture_output=True, text=True, env=env, cwd=HERE)
    wall = time.perf_counter() - start
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after_children.ru_utime + after_children.ru_stime
           - before_children.ru_utime - before_children.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {name}/{variant} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(name=name, variant=variant, wall_s=round(wall, 2),
                  others_cpu_cores=round(max(0.0, cpu_busy_seconds() - before_busy - own) / wall, 2))
    print(f"  {name:<9}{variant:<10}{wall:6.1f} s   others' CPU {result['others_cpu_cores']:.2f} cores",
          flush=True)
    return result


def statistics(runs):
    """(values, stat): a measurement's values over the repeats, and their summary."""
    def values(name, variant, key):
        return [r[key] for r in runs if r["name"] == name and r["variant"] == variant]

    def stat(name, variant, key):  # None for a measurement this run did not take (--only)
        v = values(name, variant, key)
        if not v:
            return None
        return {"median": median(v), "min": min(v), "max": max(v),
                "others_cpu_cores": median(values(name, variant, "others_cpu_cores"))}
    return values, stat


def summarise(runs, p):
    values, stat = statistics(runs)

    rows = [
        ("training", "book path", stat("train", "book", "tokens_per_s"), "tokens/s"),
        ("training", "fast path", stat("train", "fast", "tokens_per_s"), "tokens/s"),
        ("training", "book path", stat("train", "book", "gflops_per_s"), "GFLOP/s"),
        ("training", "fast path", stat("train", "fast", "gflops_per_s"), "GFLOP/s"),
        ("torch.mm", f"{p['mm_n']}x{p['mm_n']}", stat("mm", "-", "gflops_per_s"), "GFLOP/s"),
        ("generation", "uncached", stat("generate", "uncached", "tokens_per_s"), "tokens/s"),
        ("generation", "KV cache", stat("generate", "cached", "tokens_per_s"), "tokens/s"),
        ("copy", "512 MiB", stat("copy", "-", "gb_per_s"), "GB/s"),
        ("load 124M", "plain", stat("load", "plain", "multiple"), "x params"),
        ("load 124M", "lean", stat("load", "lean", "multiple"), "x params"),
        ("load 355M", "plain", stat("load", "plain:355M", "multiple"), "x params"),
        ("load 355M", "lean", stat("load", "lean:355M", "multiple"), "x params"),
        ("dataset", "stride=1", stat("dataset", "-", "seconds"), "s"),
        ("dataset", "stride=1", stat("dataset", "-", "mb_beyond_tokens"), "MB extra"),
        ("HellaSwag", "tiny", stat("eval", "tiny", "items_per_s"), "items/s"),
        ("HellaSwag", "124M", stat("eval", "124M", "items_per_s"), "items/s"),
        ("tokenizing", "1 worker", stat("tokenize", "1", "tokens_per_s"), "tokens/s"),
        ("tokenizing", f"{os.cpu_count()} workers", stat("tokenize", "all", "tokens_per_s"),
         "tokens/s"),
    ]
    rows += [("judging", f"{w} worker{'s' if w != '1' else ''}",
              stat("judge", w, "entries_per_s"), "entries/s") for w in ("1", "8")]
    rows += [("duplicates", f"{p['dup_entries']:,} entries", stat("duplicates", "-", key), unit)
             for key, unit in (("seconds", "s"), ("peak_mb", "MB peak"))]
    mb, vocab = f"{p['bpe_bytes'] / 1e6:g} MB", f"{p['bpe_vocab']:,}"
    for variant, who in (("ours", "ours (Python)"), ("hf", "HF tokenizers")):
        rows += [("BPE training", f"{who}, {mb} -> {vocab}", stat("bpe", variant, "train_s"), "s"),
                 ("BPE training", who, stat("bpe", variant, "merges_per_s"), "merges/s")]
    rows += [("BPE encoding", who, stat("bpe", variant, "encode_mb_per_s"), "MB/s")
             for variant, who in (("ours", "ours (Python)"), ("tiktoken", "tiktoken"),
                                  ("hf", "HF tokenizers"))]
    rows += [("FLOPs/token", f"{size} step", stat("flops", size, "gflops_per_token"), "GFLOP")
             for size in FLOPS_SIZES]
    for variant in serve_variants(p):  # ch07_instruct.py --serve
        name, clients = variant.split(":")
        who = f"{name}, {clients} client{'s' if clients != '1' else ''}"
        rows += [("serve TTFT", who, stat("serve", variant, "ttft_ms"), "ms"),
                 ("serve", who, stat("serve", variant, "tokens_per_s"), "tokens/s")]
    median = lambda kind, variant, key: (stat(kind, variant, key) or  # noqa: E731
                                         {"median": math.nan})["median"]
    mm = median("mm", "-", "gflops_per_s")
    weight_bytes = (values("generate", "cached", "weight_bytes") or [math.nan])[0]
    bound = median("copy", "-", "gb_per_s") * 1e9 / weight_bytes  # tokens/s
    cached = median("generate", "cached", "tokens_per_s")
    derived = {
        "fast/book training speed-up": (median("train", "fast", "tokens_per_s") /
                                        median("train", "book", "tokens_per_s")),
        "book path MFU (vs torch.mm)": median("train", "book", "gflops_per_s") / mm,
        "fast path MFU (vs torch.mm)": median("train", "fast", "gflops_per_s") / mm,
        "KV cache speed-up": cached / median("generate", "uncached", "tokens_per_s"),
        "KV cache vs bandwidth bound": cached / bound,
        "load peak, lean (x params)": median("load", "lean", "multiple"),
        "load peak, plain (x params)": median("load", "plain", "multiple"),
        "load peak 355M, lean (x params)": median("load", "lean:355M", "multiple"),
        "load peak 355M, plain (x params)": median("load", "plain:355M", "multiple"),
        "dataset build (s)": median("dataset", "-", "seconds"),
        "dataset memory (MB extra)": median("dataset", "-", "mb_beyond_tokens"),
        "tokenizing speed-up, all workers": (median("tokenize", "all", "tokens_per_s") /
                                             median("tokenize", "1", "tokens_per_s")),
        "judging speed-up, 8 workers": (median("judge", "8", "entries_per_s") /
                                        median("judge", "1", "entries_per_s")),
        "BPE encoding, ours = tiktoken (1: yes)": median("bpe", "ours", "same_ids_as_tiktoken"),
        "BPE encoding, HF = tiktoken (1: yes)": median("bpe", "hf", "same_ids_as_tiktoken"),
        "FLOPs count vs formula, worst": max(
            (abs(v - 1) for size in FLOPS_SIZES
             for v in values("flops", size, "count_over_formula")), default=math.nan),
    }
    targets = {
        "fast/book training speed-up": (">=", 1.3),
        "fast path MFU (vs torch.mm)": (">=", 0.55),
        "KV cache speed-up": (">=", 5.0),
        "KV cache vs bandwidth bound": (">=", 0.85),
        "load peak, lean (x params)": ("<=", 1.2),
        "load peak 355M, lean (x params)": ("<=", 1.3),
        "dataset build (s)": ("<", 2.0),
        "dataset memory (MB extra)": ("<", 100.0),
        "FLOPs count vs formula, worst": ("<=", 0.02),
        "BPE encoding, ours = tiktoken (1: yes)": (">=", 1.0),
        "BPE encoding, HF = tiktoken (1: yes)": (">=", 1.0),
    }
    return ([row for row in rows if row[2]], {k: v for k, v in derived.items() if v == v},
            targets, bound if bound == bound else None)  # without what --only left out


TRAIN_VARIANTS = (("book path", "book"), ("fast path", "fast"), ("fast + compile", "fast+compile"))


def summarise_cuda(runs, p):
    values, stat = statistics(runs)
    decodes = [("uncached", "uncached"), ("KV cache", "cached"), ("cache + fast", "fast")]
    decodes += [("Hugging Face", "hf")] if values("generate", "hf", "tokens_per_s") else []
    rows = [("training", label, stat("train_command", v, "tokens_per_s"), "tokens/s")
            for label, v in TRAIN_VARIANTS]
    rows += [("peak memory", label, stat("train_command", v, "peak_gb"), "GB")
             for label, v in TRAIN_VARIANTS]
    for run in runs:  # 774M and 1558M training: a process's peak (NaN: it did not fit)
        if run["name"] == "train_memory" and run["variant"] not in [r[1] for r in rows]:
            sharded = f", --fsdp over {run['processes']} GPUs" if ":" in run["variant"] else ""
            rows.append(("peak memory", run["variant"], stat("train_memory", run["variant"],
                                                             "peak_gb"),
                         f"GB{sharded}" + (f" ({run['failed']})" if run["failed"] else "")))
    for route in ("plain", "lean"):  # loading onto the GPU: host memory, then GPU memory
        for size in ("124M", "355M"):
            variant = route if size == "124M" else f"{route}:{size}"
            if values("load", variant, "multiple"):
                rows += [(f"load {size}", route, stat("load", variant, "multiple"),
                          "x params, host"),
                         (f"load {size}", route, stat("load", variant, "gpu_multiple"),
                          "x params, GPU")]
    rows.append(("torch.mm", f"bf16 {p['mm_n']}^3", stat("mm", "-", "gflops_per_s"),
                 "GFLOP/s"))
    rows += [("decoding", label, stat("generate", v, "tokens_per_s"), "tokens/s")
             for label, v in decodes]
    mm = stat("mm", "-", "gflops_per_s")["median"]
    derived = {f"{label} MFU (vs bf16 mm)":
               stat("train_command", v, "gflops_per_s")["median"] / mm for label, v in TRAIN_VARIANTS}
    best = max(stat("generate", v, "tokens_per_s")["median"] for v in ("cached", "fast"))
    if values("generate", "hf", "tokens_per_s"):
        derived["best decoding / Hugging Face"] = best / stat("generate", "hf", "tokens_per_s")["median"]
    uncached = values("generate", "uncached", "tokens")[0]
    for label, v in (("KV cache", "cached"), ("cache + fast", "fast")):
        derived[f"{label} tokens = uncached (1: yes)"] = float(
            all(t == uncached for t in values("generate", v, "tokens")))
    targets = {"fast path MFU (vs bf16 mm)": (">=", 0.38),
               "fast + compile MFU (vs bf16 mm)": (">=", 0.50),
               "best decoding / Hugging Face": (">=", 3.0),
               "KV cache tokens = uncached (1: yes)": (">=", 1.0)}
    return rows, derived, targets, None


def print_table(rows, derived, targets, bound, quick, device):
    wide = max([16] + [len(variant) + 2 for _, variant, _, _ in rows])
    first = max([12] + [len(name) + 1 for name, _, _, _ in rows])
    print(f"\n{'measurement':<{first}}{'variant':<{wide}}{'median':>10}{'range':>22}  {'unit':<10}"
          f"{'others CPU':>10}")
    for name, variant, s, unit in rows:
        rng = f"{s['min']:.4g}-{s['max']:.4g}"
        print(f"{name:<{first}}{variant:<{wide}}{s['median']:>10.4g}{rng:>22}  {unit:<10}"
              f"{s['others_cpu_cores']:>9.2f}c")
    if bound is not None:
        print(f"\nbandwidth bound for batch-1 decoding: {bound:.1f} tokens/s "
              "(weights read per token / copy bandwidth)")
    print(f"\n{'derived':<40}{'value':>10}  {'target':<9}verdict")
    for key, value in derived.items():
        print(f"{key:<40}{value:>10.3f}  " + verdict(value, targets.get(key), quick, device))


def verdict(value, target, quick, device):
    """The target column and what it says of this run: met, missed, or not
    this run's (a --quick run measures a smaller model than the targets name)."""
    if not target:
        return "-        no target"
    op, limit = target
    met = {">=": value >= limit, "<=": value <= limit, "<": value < limit}[op]
    column = f"{op} {limit:g}"
    if quick:
        return f"{column:<9}does not apply: a target of the full run (a smaller model here)"
    return f"{column:<9}{'met' if met else 'MISSED'} (a target of the {device} run: it applies)"


def main(args):
    from ch02_data import check_writable
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also into a pipe
    if args.json:  # before minutes of measuring, not after
        check_writable(Path(args.json).resolve().parent, flag="--json's folder")
        if Path(args.json).is_dir():
            raise IsADirectoryError(f"--json {args.json} is a folder; name a file.")
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    p = dict(CUDA if cuda else QUICK if args.quick else FULL, device=args.device)
    if args.repeats:
        p["repeats"] = args.repeats
    env = dict(os.environ)
    if args.passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        p["models_dir"] = p["work_dir"] = tmp
        if args.attention:  # the attention implementations alone
            pairs = [("attention", attention_variants(p))]
        elif cuda:
            import torch
            if not torch.cuda.is_available():
                raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU.")
            p["corpus"] = prepare_corpus(p, args.data_dir)
            for size in ("-", "355M"):  # the models the loading measurement reads
                run_child("save", size, p, env)
            # GPT-2 774M and 1558M: one process, and sharded over the GPUs when there are several
            sizes = [f"{size}{fsdp}" for size in ("774M", "1558M")
                     for fsdp in ("", ":fsdp")[:1 + (torch.cuda.device_count() > 1)]]
            pairs = [("mm", ("-",)), ("train_command", tuple(v for _, v in TRAIN_VARIANTS)),
                     ("train_memory", tuple(sizes)),
                     ("load", ("plain", "lean", "plain:355M", "lean:355M")),
                     ("generate", ("uncached", "cached", "fast") +
                      (("hf",) if importlib.util.find_spec("transformers") else ()))]
        else:
            pairs = [("train", ("book", "fast")), ("mm", ("-",)),
                     ("generate", ("uncached", "cached")), ("copy", ("-",)),
                     ("load", ("plain", "lean") + (() if args.quick else
                                                   ("plain:355M", "lean:355M"))),
                     ("dataset", ("-",)),
                     ("eval", ("tiny", "124M")), ("tokenize", ("1", "all")),
                     ("serve", serve_variants(p)), ("judge", ("1", "8")),
                     ("duplicates", ("-",)), ("flops", FLOPS_SIZES),
                     ("bpe", ("ours", "tiktoken") + (("hf",) if importlib.util.find_spec(
                         "tokenizers") else ()))]
            if args.only:
                unknown = set(args.only) - {name for name, _ in pairs}
                if unknown:
                    raise ValueError(f"--only: no measurement {', '.join(sorted(unknown))}; "
                                     f"they are {', '.join(name for name, _ in pairs)}.")
                pairs = [(name, v) for name, v in pairs if name in args.only]
            if {"generate", "load"} & {name for name, _ in pairs}:
                run_child("save", "-", p, env)  # in a child too: the parent stays small
            if "load" in {name for name, _ in pairs} and not args.quick:
                run_child("save", "355M", p, env)
        runs = []
        print(f"{'cuda' if cuda else 'quick' if args.quick else 'full'} run, {p['repeats']} "
              f"repeat(s), variants alternating; {os.cpu_count()} CPUs")
        for name, variants in pairs:
            for _ in range(p["repeats"]):
                for variant in variants:  # A B A B ...
                    runs.append(run_child(name, variant, p, env))
    if args.attention:
        rows, derived, targets, bound = summarise_attention(runs, p, args.attention_plot)
    else:
        rows, derived, targets, bound = (summarise_cuda if cuda else summarise)(runs, p)
    print_table(rows, derived, targets, bound, args.quick, args.device)
    print(f"\nbench.py took {time.perf_counter() - started:.0f} s")
    if args.json:
        import torch
        report = {"params": {k: v for k, v in p.items() if k not in ("models_dir", "work_dir")},
                  "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(),
                              "gpu": torch.cuda.get_device_name() if cuda else None,
                              "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "")},
                  "rows": [{"measurement": n, "variant": v, "unit": u, **s} for n, v, s, u in rows],
                  "derived": derived, "bandwidth_bound_tokens_per_s": bound, "runs": runs}
        from ch02_data import write_text_atomic
        write_text_atomic(args.json, json.dumps(report, indent=2))
        print(f"Wrote {args.json}")
    return rows, derived


def serve_variants(p):
    """The served models and how many clients at once: tiny and the run's model."""
    return tuple(f"{name}:{n}" for name in ("tiny", p["model"]) for n in (1, 4, 16))


def prepare_corpus(p, data_dir):
    """the-verdict repeated into a corpus for 2 * eval_every + 1 steps (and a
    validation tenth), tokenized once into work_dir/tokens for every run."""
    from ch02_data import bpe_tokenizer, build_token_file, load_the_verdict
    text = load_the_verdict(None, data_dir)
    tokenizer = bpe_tokenizer()
    needed = (2 * p["eval_every"] + 2) * p["batch"] * p["context"] / 0.85
    copies = int(needed / len(tokenizer.encode(text))) + 1
    corpus = Path(p["work_dir"]) / "corpus.txt"
    corpus.write_text("\n".join([text] * copies), encoding="utf-8")
    build_token_file([corpus], Path(p["work_dir"]) / "tokens", tokenizer)
    return str(corpus)


def build_parser():
    from ch02_data import HelpFormatter, number
    parser = argparse.ArgumentParser(
        description="Measure training speed, generation speed, loading memory and dataset "
                    "cost of the book's paths against the fast ones, on this machine.",
        formatter_class=HelpFormatter,
        epilog='example: python bench.py --quick --json bench.json')
    parser.add_argument("--quick", action="store_true",
                        help="a small model and one repeat: under a minute")
    parser.add_argument("--repeats", type=number(int, at_least=1), default=None,
                        help="runs of each variant (default: 3; 1 with --quick or --device cuda)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        metavar="NAMES", help="only these CPU measurements, comma-separated: "
                        "train, mm, generate, copy, load, dataset, eval, tokenize, serve, "
                        "judge, duplicates, flops")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cpu: the measurements above; cuda: the GPU configuration "
                             "(124M, context 1024, batch 16, through ch05_train.py's loop); "
                             "auto: cuda where PyTorch sees a GPU, else cpu")
    parser.add_argument("--data-dir", default="data",
                        help="where the-verdict.txt is (or is downloaded to) for --device cuda")
    parser.add_argument("--attention", action="store_true",
                        help="instead: ch03_attention.py's attention implementations side by "
                             "side (forward, forward + backward; compiled too on CUDA), with a "
                             "bar chart")
    parser.add_argument("--attention-plot", default="attention-bench.png", metavar="PNG",
                        help="where --attention saves its bar chart")
    parser.add_argument("--passive", action="store_true",
                        help="set OMP_WAIT_POLICY=PASSIVE in the measured processes (steadier "
                             "on a busy machine, slower on a quiet one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--params", default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if args.child:
        sys.path.insert(0, str(HERE))
        print(json.dumps(CHILDREN[args.child](args.variant, json.loads(args.params))))
    else:
        from ch02_data import run_command
        run_command(main, args, "No results were written.")
