"""Chapter 5: Pretraining on unlabeled data (and appendix D's training loop).

Defines the book's `text_to_token_ids`, `token_ids_to_text`, `calc_loss_batch`,
`calc_loss_loader`, `evaluate_model`, `generate_and_print_sample`,
`train_model_simple`, `plot_losses` and `generate`; appendix D's `train_model`
(warm-up, cosine decay, gradient clipping). Beyond the book: the `ch05_train.py`
command, with checkpoints and exact resume, corpora larger than memory, and
several processes (DistributedDataParallel).

Run:  python ch05_train.py                      (the book's run on the-verdict)
      python ch05_train.py --data my_texts/ --epochs 1 --schedule cosine
      torchrun --nproc_per_node=2 ch05_train.py ...
Imports from ch02_data.py, ch03_attention.py (saving plots) and ch04_gpt.py.
"""
import argparse
import contextlib
import csv
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ch02_data import (DownloadError, GPTDatasetV1, atomic_path, bpe_tokenizer, load_the_verdict,
                       read_text, utf8_error)
from ch03_attention import pyplot, save_figure
from ch04_gpt import (FAST_KERNELS, MODEL_CONFIGS, GPTModel, generate_text_simple, get_device,
                     gpt_config, new_kv_cache)


# ---- 5.1.1 Using GPT to generate text ----

def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ---- 5.1.2 Calculating the text generation loss ----

def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (batch, num_tokens, vocab_size)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None, loss_fn=None):
    loss_fn = loss_fn or calc_loss_batch  # beyond the book: chapter 6 passes its own
    total_loss = 0.
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += loss_fn(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


# ---- 5.2 Training an LLM ----

def evaluate_model(model, train_loader, val_loader, device, eval_iter, loss_fn=None):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, loss_fn)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model, encoded, 50, context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))  # compact print
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        # Beyond the book: a progress bar (the log lines go through tqdm.write)
        for input_batch, target_batch in tqdm(train_loader, desc=f"Epoch {epoch + 1}",
                                              leave=False, dynamic_ncols=True):
            optimizer.zero_grad()  # reset the previous batch's gradients
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                tqdm.write(f"Ep {epoch + 1} (Step {global_step:06d}): "
                           f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path="loss-plot.png"):
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = pyplot().subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # a second x-axis for tokens seen, aligned with the first
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    save_figure(fig, path)


# ---- 5.3 Decoding strategies to control randomness ----

def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None):
    """The next token id for each row of logits (batch, vocab_size): greedy at
    temperature 0, else sampled from the temperature-scaled top-k (and top-p) tokens."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)
        min_val = top_logits[:, -1:]  # (batch, 1): each row keeps its own k largest
        logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device),
                             logits)
    if temperature > 0.0:
        logits = logits / temperature
        if top_p is not None:  # beyond the book: nucleus sampling
            logits = top_p_filter(logits, top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


def top_p_filter(logits, top_p):
    """Keep the smallest set of most likely tokens whose probabilities reach top_p."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens before it already reach top_p (the first always stays)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
             eos_id=None, top_p=None, use_cache=False):
    if use_cache:  # beyond the book: the same tokens, computed incrementally
        new = list(generate_stream(model, idx, max_new_tokens, context_size, temperature,
                                   top_k, eos_id, top_p, use_cache=True))
        return torch.cat([idx, *new], dim=1)
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        idx_next = sample_next_token(logits, temperature, top_k, top_p)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break  # stop early once every sequence produced the end-of-sequence token
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
                    eos_id=None, top_p=None, use_cache=True):
    """Beyond the book: `generate` as a generator that yields each new token
    (batch, 1) as soon as it is chosen, for printing text as it is produced.

    With use_cache, each block keeps its keys and values (a KV cache), so a new
    token costs one position's work instead of the whole window's. Once the
    window is full, positions would shift: then every step recomputes the last
    context_size tokens, exactly as the uncached loop does.
    """
    kv_cache = new_kv_cache(model) if use_cache else None
    with torch.no_grad():
        logits = model(idx[:, -context_size:], kv_cache=kv_cache)[:, -1, :]
    for step in range(max_new_tokens):
        idx_next = sample_next_token(logits, temperature, top_k, top_p)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            return
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next
        if step + 1 == max_new_tokens:
            return
        if kv_cache is not None and kv_cache[0].length >= context_size:
            kv_cache = None  # the window is full: recompute from here on
        with torch.no_grad():
            if kv_cache is not None:
                logits = model(idx_next, kv_cache=kv_cache)[:, -1, :]
            else:
                logits = model(idx[:, -context_size:])[:, -1, :]


def stream_text(model, idx, tokenizer, max_new_tokens, context_size, out=None, **sampling):
    """Beyond the book: generate for one prompt (idx: (1, n)), writing the text to
    `out` as it is produced. Returns the new token ids."""
    out = out or sys.stdout
    new_ids, shown = [], ""
    for token in generate_stream(model, idx, max_new_tokens, context_size, **sampling):
        new_ids.append(token.item())
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is whole
            out.write(text[len(shown):])
            out.flush()
            shown = text
    return new_ids


# ---- Appendix D: learning-rate warm-up, cosine decay, gradient clipping ----

def lr_at_step(step, total_steps, peak_lr, warmup_steps, initial_lr, min_lr):
    """Appendix D's schedule: linear warm-up from initial_lr, then cosine down to min_lr."""
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(model, train_loader, val_loader, optimizer, device, n_epochs, eval_freq,
                eval_iter, start_context, tokenizer, warmup_steps, initial_lr=3e-05,
                min_lr=1e-6):
    train_losses, val_losses, track_tokens_seen, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1
    peak_lr = optimizer.param_groups[0]["lr"]  # the optimizer's lr is the peak
    total_training_steps = len(train_loader) * n_epochs
    for epoch in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1
            lr = lr_at_step(global_step, total_training_steps, peak_lr, warmup_steps,
                            initial_lr, min_lr)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            track_lrs.append(lr)
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            if global_step >= warmup_steps:  # clip only once warm-up is over
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            tokens_seen += input_batch.numel()
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Iter {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen, track_lrs


def plot_lrs(track_lrs, path="lr-schedule.png"):
    fig, ax = pyplot().subplots(figsize=(5, 3))
    ax.plot(range(len(track_lrs)), track_lrs)
    ax.set_xlabel("Step")
    ax.set_ylabel("Learning rate")
    fig.tight_layout()
    save_figure(fig, path)


# =====================================================================
# Beyond the book: the ch05_train.py command
# =====================================================================

# ---- Corpora of any size: tokenize once into a memory-mapped uint16 file ----

EOT = "<|endoftext|>"


def collect_text_files(paths):
    """Text files from --data: files as given, folders searched for *.txt."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob("*.txt"))
            if not found:
                raise ValueError(f"No .txt files in the folder {path}.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--data path not found: {path}")
    return files


def iter_text_blocks(path, block_chars=1 << 23):
    """A file's text in blocks of about block_chars, split at line ends, so a file
    larger than memory is read piece by piece."""
    block, size = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                block.append(line)
                size += len(line)
                if size >= block_chars:
                    yield "".join(block)
                    block, size = [], 0
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None
    if block:
        yield "".join(block)


def corpus_fingerprint(files):
    """Changes whenever a file is added, removed, resized or rewritten."""
    h = hashlib.sha1(b"gpt2-uint16-v1")
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_token_file(files, cache_dir, tokenizer, num_threads=None, log=print):
    """Tokenize `files` once into cache_dir/<fingerprint>.bin (uint16, an
    <|endoftext|> after each document) and return it memory-mapped."""
    path = Path(cache_dir) / f"{corpus_fingerprint(files)}.bin"
    if path.exists():
        log(f"Reusing the token file {path}")
        return np.memmap(path, dtype=np.uint16, mode="r")
    if tokenizer.n_vocab > 2 ** 16:
        raise ValueError(f"A vocabulary of {tokenizer.n_vocab} tokens does not fit uint16.")
    num_threads = num_threads or os.cpu_count()
    eot = tokenizer.encode(EOT, allowed_special={EOT})
    start, n_tokens, n_chars = time.perf_counter(), 0, 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for f in tqdm(files, desc="Tokenizing", unit="file", disable=len(files) < 2):
            pending = []
            for block in iter_text_blocks(f):
                pending.append(block)
                n_chars += len(block)
                if len(pending) == num_threads * 4:
                    n_tokens += _write_tokens(out, tokenizer, pending, num_threads)
                    pending = []
            n_tokens += _write_tokens(out, tokenizer, pending, num_threads, suffix=eot)
    seconds = time.perf_counter() - start
    log(f"Tokenized {len(files)} file(s), {n_chars / 1e6:.1f}M characters, into "
        f"{n_tokens:,} tokens in {seconds:.1f} s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _write_tokens(out, tokenizer, blocks, num_threads, suffix=()):
    ids = [t for encoded in tokenizer.encode_batch(blocks, num_threads=num_threads,
                                                   allowed_special={EOT}) for t in encoded]
    ids.extend(suffix)
    np.asarray(ids, dtype=np.uint16).tofile(out)
    return len(ids)


# ---- Data order that can be resumed and split across processes ----

def _distributed():
    return dist.is_available() and dist.is_initialized()


class ResumableSampler(Sampler):
    """DataLoader(shuffle=...)'s order, resumable and split across processes.

    Each epoch's permutation is seeded from the global torch RNG exactly as
    DataLoader(shuffle=True) seeds it, so one process sees the book's batches.
    Under DistributedDataParallel rank 0's seed is broadcast, and each global
    batch (batch_size * world_size consecutive positions of the order) is split
    between the ranks: N processes see the same global batches as one process
    with an N-times larger batch. `resume_from(seed, samples_done)` makes the
    next epoch continue an interrupted one.
    """

    def __init__(self, num_samples, batch_size, shuffle, drop_last, rank=0, world_size=1):
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.global_batch = batch_size * world_size
        self.seed, self._resume = None, None

    def resume_from(self, seed, samples_done):
        self._resume = (seed, samples_done)

    def _end(self):
        n = self.num_samples
        return n - n % self.global_batch if self.drop_last else n

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            (self.seed, skip), self._resume = self._resume, None
        elif self.shuffle:
            seed = torch.empty((), dtype=torch.int64).random_()  # as RandomSampler draws it
            if _distributed():
                dist.broadcast(seed, src=0)
            self.seed = int(seed.item())
        if self.shuffle:  # a tensor, not a list: 8 bytes a window, for corpora of any size
            order = torch.randperm(self.num_samples,
                                   generator=torch.Generator().manual_seed(self.seed))
        else:
            order = torch.arange(self.num_samples)
        end, mine = self._end(), self.rank * self.batch_size
        for start in range(skip, end, self.global_batch):
            yield from order[start + mine:min(start + mine + self.batch_size, end)].tolist()

    def __len__(self):
        # whole global batches give every rank batch_size; a last partial one, what is left
        full, rest = divmod(self._end(), self.global_batch)
        return full * self.batch_size + min(self.batch_size,
                                            max(0, rest - self.rank * self.batch_size))


# ---- Checkpoints ----

def save_checkpoint(path, checkpoint):
    """torch.save via a temporary file: a crash keeps the previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path, map_location="cpu", mmap=False):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(f"Could not read the checkpoint {path}: it is corrupt or not a "
                         f"PyTorch checkpoint ({type(err).__name__}: {err}).") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by ch05_train.py "
                         "(it has no 'model' entry).")
    return checkpoint


def check_state_dict(model, state_dict, source="the checkpoint"):
    """Raise an error naming every missing, unexpected or differently shaped tensor."""
    expected = model.state_dict()
    problems = [f"missing: {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected: {k}" for k in state_dict if k not in expected]
    problems += [f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(v.shape)} in the model"
                 for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if problems:
        shown = "\n  ".join(problems[:12] + ([f"... {len(problems) - 12} more"]
                                             if len(problems) > 12 else []))
        raise ValueError(f"{source} does not fit this model's configuration:\n  {shown}\n"
                         "Build the model as the file was saved (same size, context length, "
                         "LoRA rank; in ch05_train.py the same --model and --context-length).")


def build_lean(build, state_dict, source="the checkpoint"):
    """build() the model on the meta device (no memory, no random init), then
    adopt state_dict's tensors as its parameters: with a memory-mapped state
    dict, peak memory stays near one copy of the weights."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    return model


# ---- The command's training loop ----

def reduce_mean(value, weight=1.0):
    """The weighted mean of `value` over all processes (value itself in one process)."""
    if not _distributed():
        return value
    t = torch.tensor([0.0 if weight == 0 else value * weight, float(weight)], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


def evaluate_all_ranks(model, train_loader, val_loader, device, eval_iter):
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
    return (reduce_mean(train_loss, min(eval_iter, len(train_loader))),
            reduce_mean(val_loss, min(eval_iter, len(val_loader))))


def perplexity(loss):
    return math.exp(min(loss, 700.0))  # cap: exp overflows past ~709


class NonFiniteLoss(RuntimeError):
    pass


def train(model, train_loader, val_loader, optimizer, device, tokenizer, args, state,
          out_dir, is_main=True):
    """Chapter 5's train_model_simple, in the same order of work and random draws
    (so seeded runs print the book's numbers), plus appendix D's schedule, a
    progress bar, an evaluation log, checkpoints, exact resume and DDP.

    `state` holds where training stands (a fresh one or a checkpoint's); it is
    updated in place and returned.
    """
    raw_model = getattr(model, "module", model)  # under DistributedDataParallel
    raw_model = getattr(raw_model, "_orig_mod", raw_model)  # under torch.compile
    sampler = train_loader.sampler
    world, accum = sampler.world_size, args.grad_accum
    steps_per_epoch = len(train_loader) // accum
    epoch_samples = steps_per_epoch * accum * sampler.global_batch
    total_steps = steps_per_epoch * args.epochs
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    warmup = (args.warmup_steps if args.warmup_steps is not None else int(0.2 * total_steps))
    grad_clip = args.grad_clip if args.grad_clip is not None else (
        1.0 if args.schedule == "cosine" else None)
    peak_lr = args.lr
    log_path = Path(out_dir) / "log.csv"

    def checkpoint():
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": dict(raw_model.cfg), **state,
                "rng_state": torch.get_rng_state(),
                "cuda_rng_state": (torch.cuda.get_rng_state_all()
                                   if torch.cuda.is_available() else [])}

    def save(rng_state=None):
        if not is_main:
            return
        ckpt = checkpoint()
        if rng_state is not None:
            ckpt["rng_state"] = rng_state
        save_checkpoint(Path(out_dir) / "checkpoint.pt", ckpt)

    def write_log(row):
        new = not log_path.exists()
        with open(log_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    history = state["history"]
    bar = tqdm(total=last_step, initial=state["step"] + 1, unit="step", disable=not is_main,
               dynamic_ncols=True)
    running_loss, running_steps = torch.zeros((), device=device), 0
    tick_time, tick_tokens = time.perf_counter(), state["tokens_seen"]
    resuming = state["samples_done"] > 0
    if "resume_rng_state" in state and not resuming:  # saved at an epoch boundary
        torch.set_rng_state(state.pop("resume_rng_state"))
    rng_after_last_step = torch.get_rng_state()  # what a Ctrl-C checkpoint restores
    at_last_step = {k: state[k] for k in ("samples_done", "tokens_seen")}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(args, device)
                else contextlib.nullcontext())
    micro = 0  # micro-batches accumulated towards the next optimizer step
    try:
        for epoch in range(state["epoch"], args.epochs):
            if state["step"] + 1 >= last_step:
                break
            model.train()
            if resuming:  # continue the interrupted epoch where it stopped
                sampler.resume_from(state["epoch_seed"], state["samples_done"])
                batches = iter(train_loader)
                torch.set_rng_state(state.pop("resume_rng_state"))
                resuming = False
            else:
                state["samples_done"], state["epoch_seed"] = 0, None
                batches = iter(train_loader)
            state["epoch"] = epoch
            for input_batch, target_batch in batches:
                if state["epoch_seed"] is None:  # evaluations re-seed the sampler: keep the epoch's
                    state["epoch_seed"] = sampler.seed
                step = state["step"] + 1
                if micro == 0:
                    if args.schedule == "cosine":
                        lr = lr_at_step(step, total_steps, peak_lr, warmup, args.initial_lr,
                                        args.min_lr)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                # Under DDP, gradients are averaged across processes at the last micro-batch only
                sync = (model.no_sync() if micro < accum and hasattr(model, "no_sync")
                        else contextlib.nullcontext())
                with sync:
                    with autocast:
                        loss = calc_loss_batch(input_batch, target_batch, model, device)
                    if accum > 1:
                        loss = loss / accum  # the mean over all micro-batches of the step
                    loss.backward()
                running_loss += loss.detach()
                state["samples_done"] += sampler.global_batch
                state["tokens_seen"] += input_batch.numel() * world
                if micro < accum:
                    continue
                micro = 0
                if grad_clip and step >= warmup:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
                optimizer.step()
                state["step"] = step
                at_last_step = {k: state[k] for k in ("samples_done", "tokens_seen")}
                history["lrs"].append(optimizer.param_groups[0]["lr"])
                running_steps += 1
                bar.update(1)

                saving = bool(args.save_every) and step % args.save_every == 0
                if saving or step % args.eval_freq == 0 or step % 10 == 0 or step + 1 == last_step:
                    # the only host sync: every 10 steps, and before evaluating or saving
                    mean_loss = reduce_mean(running_loss.item() / running_steps)
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLoss(f"the training loss became {mean_loss} by step {step}")
                    now = time.perf_counter()
                    tok_s = (state["tokens_seen"] - tick_tokens) / max(now - tick_time, 1e-9)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    running_loss.zero_()
                    running_steps, tick_time, tick_tokens = 0, now, state["tokens_seen"]

                if step % args.eval_freq == 0:
                    train_loss, val_loss = evaluate_all_ranks(
                        model, train_loader, val_loader, device, args.eval_iter)
                    if not math.isfinite(train_loss):
                        raise NonFiniteLoss(f"the evaluation loss became {train_loss} at step {step}")
                    for key, value in (("steps", step), ("train_losses", train_loss),
                                       ("val_losses", val_loss),
                                       ("tokens_seen", state["tokens_seen"]),
                                       ("epochs", epoch + state["samples_done"] / epoch_samples)):
                        history[key].append(value)
                    if is_main:
                        tqdm.write(f"Ep {epoch + 1} (Step {step:06d}): "
                                   f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
                                   f"  | perplexity {perplexity(train_loss):.1f}, "
                                   f"{perplexity(val_loss):.1f}")
                        write_log({"step": step, "epoch": epoch + 1,
                                   "tokens_seen": state["tokens_seen"],
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "train_loss": train_loss, "val_loss": val_loss,
                                   "train_perplexity": perplexity(train_loss),
                                   "val_perplexity": perplexity(val_loss),
                                   "elapsed_s": round(time.perf_counter() - state["t0"], 3)})

                if saving:
                    save()
                rng_after_last_step = torch.get_rng_state()
                if step + 1 >= last_step or state["samples_done"] >= epoch_samples:
                    break  # done, or only micro-batches too few for a whole step are left
            micro = 0
            if state["samples_done"] >= epoch_samples:  # the epoch is done
                state["epoch"], state["samples_done"] = epoch + 1, 0
                if is_main:
                    generate_and_print_sample(raw_model, tokenizer, device, args.prompt)
    except KeyboardInterrupt:
        bar.close()
        state.update(at_last_step)  # forget the micro-batches of an unfinished step
        if is_main:
            save(rng_state=rng_after_last_step)
            tqdm.write(f"Interrupted at step {state['step']}; checkpoint saved to "
                       f"{Path(out_dir) / 'checkpoint.pt'}. Continue with --resume.")
        raise
    except NonFiniteLoss as err:
        bar.close()
        raise NonFiniteLoss(
            f"Training stopped: {err}. The last good checkpoint (if any) is kept at "
            f"{Path(out_dir) / 'checkpoint.pt'}; try a lower --lr, --grad-clip 1.0 or "
            "--schedule cosine with warm-up.") from None
    bar.close()
    save()
    return state


# ---- Putting the command together ----

def make_optimizer(model, args, device, log=print):
    """The book's AdamW; with --fast, PyTorch's fused implementation (one kernel
    for all parameters) where this PyTorch supports it on this device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.fast:
        try:
            return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                     fused=True)
        except (RuntimeError, TypeError) as err:
            log(f"Note: fused AdamW is not available on {device.type} ({err}); using the "
                "plain one.")
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def use_bf16(args, device):
    """bf16 autocast: with --fast, on CUDA GPUs that have bf16."""
    return args.fast and device.type == "cuda" and torch.cuda.is_bf16_supported()


def speed_up(model, args, device, log=print):
    """--fast on CUDA: TF32 matmuls (and bf16 autocast in the loop, see use_bf16);
    --compile: torch.compile. Says what it turned off, e.g. on Apple MPS."""
    if args.fast and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # no-ops on GPUs without TF32
        torch.backends.cudnn.allow_tf32 = True
        log("Fast path on CUDA: TF32 matmuls, " + ("bf16 autocast" if use_bf16(args, device)
                                                   else "no bf16 autocast (this GPU lacks bf16)"))
    elif args.fast and device.type == "mps":
        log("Fast path on MPS: SDPA attention and fused kernels on; bf16 autocast and TF32 "
            "(CUDA only) off.")
    if args.compile:
        if device.type == "mps":
            log("Note: --compile is off on MPS (torch.compile does not support it well).")
        else:
            log("Compiling the model with torch.compile (the first steps are slow)...")
            return torch.compile(model)
    return model


def setup_distributed():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), world_size, local_rank


def rank0_first(fn, rank):
    """fn() on rank 0, then on the others: rank 0 downloads or writes a cache
    that the others then find in place."""
    if rank == 0:
        result = fn()
    if _distributed():
        dist.barrier()
    return result if rank == 0 else fn()


def load_corpus(args, tokenizer, rank, log):
    """(train dataset, val dataset): the book's character split of an in-memory
    text, or a token split of a memory-mapped token file for large corpora."""
    ctx = args.context_length
    if not args.data:
        files = None
        text = rank0_first(lambda: load_the_verdict(None, args.data_dir), rank)
    else:
        files = collect_text_files(args.data)
        big = sum(f.stat().st_size for f in files) > args.memmap_above_mb * 1e6
    if files is None or not (args.memmap or big):
        if files is not None:
            text = EOT.join(read_text(f) for f in files)
        split_idx = int(args.train_ratio * len(text))  # the book splits characters
        parts = text[:split_idx], text[split_idx:]
        return [_windows(lambda: GPTDatasetV1(part, tokenizer, ctx, ctx), name, ctx)
                for part, name in zip(parts, ("training", "validation"))]
    tokens = rank0_first(lambda: build_token_file(files, Path(args.out) / "tokens", tokenizer,
                                                  log=log), rank)
    split_idx = int(args.train_ratio * len(tokens))
    parts = tokens[:split_idx], tokens[split_idx:]
    return [_windows(lambda: GPTDatasetV1.from_token_ids(part, ctx, ctx), name, ctx)
            for part, name in zip(parts, ("training", "validation"))]


def _windows(make_dataset, split_name, ctx):
    try:
        return make_dataset()
    except ValueError as err:
        raise ValueError(f"The {split_name} split is too short for --context-length {ctx}: "
                         f"{err}") from None


def make_loaders(train_set, val_set, args, rank, world_size):
    need = args.batch_size * world_size * args.grad_accum
    if len(train_set) < need:
        raise ValueError(
            f"The training split has {len(train_set)} windows of {args.context_length} tokens "
            f"(about {len(train_set) * args.context_length:,} tokens), but one batch needs "
            f"{need} windows ({need * args.context_length + 1:,} tokens). Give more text, "
            "or lower --context-length, --batch-size or --grad-accum.")
    train_loader = DataLoader(train_set, batch_size=args.batch_size, drop_last=True,
                              sampler=ResumableSampler(len(train_set), args.batch_size, True,
                                                       True, rank, world_size))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, drop_last=False,
                            sampler=ResumableSampler(len(val_set), args.batch_size, False,
                                                     False, rank, world_size))
    return train_loader, val_loader


def main(args):
    rank, world_size, local_rank = setup_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    try:
        if world_size > 1 and torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
        else:
            device = get_device(args.device) if is_main else torch.device(
                "cpu" if args.device == "auto" else args.device)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = bpe_tokenizer()
        train_set, val_set = load_corpus(args, tokenizer, rank, log)
        train_loader, val_loader = make_loaders(train_set, val_set, args, rank, world_size)
        log(f"Training windows: {len(train_set)}, validation windows: {len(val_set)}; "
            f"{len(train_loader) // args.grad_accum} steps per epoch with {world_size} "
            "process(es)")

        cfg = gpt_config(args.model, context_length=args.context_length,
                         drop_rate=args.drop_rate, **(FAST_KERNELS if args.fast else {}))
        torch.manual_seed(args.seed)
        model = GPTModel(cfg)
        model.cfg = cfg  # saved with every checkpoint
        model.to(device)
        optimizer = make_optimizer(model, args, device, log)
        state = {"step": -1, "epoch": 0, "samples_done": 0, "epoch_seed": None,
                 "tokens_seen": 0, "t0": time.perf_counter(),
                 "history": {k: [] for k in ("steps", "train_losses", "val_losses",
                                             "tokens_seen", "epochs", "lrs")}}
        if args.resume:
            ckpt = load_checkpoint(args.resume, map_location=device)
            check_state_dict(model, ckpt["model"], source=f"the checkpoint {args.resume}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            for key in ("step", "epoch", "samples_done", "epoch_seed", "tokens_seen", "history"):
                state[key] = ckpt[key]
            state["resume_rng_state"] = ckpt["rng_state"]
            if ckpt["cuda_rng_state"] and device.type == "cuda":
                torch.cuda.set_rng_state_all(ckpt["cuda_rng_state"])
            log(f"Resumed from {args.resume} at step {state['step']}, epoch {state['epoch'] + 1}")
        raw_model = model
        model = speed_up(model, args, device, log)
        if world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[local_rank] if device.type == "cuda" else None,
                broadcast_buffers=False)  # the only buffers are the constant causal masks

        start = time.perf_counter()
        state = train(model, train_loader, val_loader, optimizer, device, tokenizer, args,
                      state, out_dir, is_main)
        seconds = time.perf_counter() - start
        history = state["history"]
        if is_main:
            log(f"Training took {seconds / 60:.2f} min; {state['tokens_seen']:,} tokens seen")
            if history["steps"]:
                plot_losses(history["epochs"], history["tokens_seen"], history["train_losses"],
                            history["val_losses"], out_dir / "loss-plot.png")
                log(f"Saved {out_dir / 'loss-plot.png'}")
            if args.schedule == "cosine" and history["lrs"]:
                plot_lrs(history["lrs"], out_dir / "lr-schedule.png")
                log(f"Saved {out_dir / 'lr-schedule.png'}")
            log(f"Saved {out_dir / 'checkpoint.pt'}")
            # 5.3: the trained model with temperature scaling and top-k sampling
            raw_model.eval()
            torch.manual_seed(args.seed)
            token_ids = generate(raw_model, text_to_token_ids(args.prompt, tokenizer).to(device),
                                 max_new_tokens=15, context_size=cfg["context_length"],
                                 top_k=25, temperature=1.4)
            log("Sample (top-k 25, temperature 1.4):", token_ids_to_text(token_ids, tokenizer))
        return {"model": model, "history": history, "state": state, "seconds": seconds}
    finally:
        if _distributed():
            dist.destroy_process_group()


def build_parser():
    parser = argparse.ArgumentParser(
        description="Pretrain a GPT model (the book's chapter 5 run by default: GPT-2 124M "
                    "with context 256 on the-verdict, 10 epochs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", default=None, metavar="PATH",
                      help="text file(s) and/or folder(s) of .txt files; default: the book's "
                           "the-verdict.txt, downloaded into --data-dir")
    data.add_argument("--data-dir", default="data", help="folder for downloaded data")
    data.add_argument("--train-ratio", type=float, default=0.90,
                      help="share of the text used for training; the rest validates")
    data.add_argument("--memmap", action="store_true",
                      help="tokenize into a memory-mapped token file (automatic above "
                           "--memmap-above-mb); the file is reused until the text changes")
    data.add_argument("--memmap-above-mb", type=float, default=100.0,
                      help="corpus size above which the token file is used")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="124M", choices=list(MODEL_CONFIGS),
                       help="GPT-2 size, or 'tiny' for quick tests")
    model.add_argument("--context-length", type=int, default=256,
                       help="tokens per training window (GPT-2 itself uses 1024)")
    model.add_argument("--drop-rate", type=float, default=0.1, help="dropout rate")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    opt.add_argument("--max-steps", type=int, default=None,
                     help="stop after this many optimizer steps in all (the schedule still "
                          "spans --epochs)")
    opt.add_argument("--batch-size", type=int, default=2,
                     help="windows per micro-batch in each process (a step's global batch = "
                          "this x --grad-accum x processes)")
    opt.add_argument("--grad-accum", type=int, default=1,
                     help="micro-batches whose gradients add up to one optimizer step")
    opt.add_argument("--lr", type=float, default=4e-4,
                     help="AdamW learning rate (the peak with --schedule cosine)")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    opt.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                     help="constant (chapter 5) or warm-up + cosine decay (appendix D)")
    opt.add_argument("--warmup-steps", type=int, default=None,
                     help="linear warm-up steps for --schedule cosine (default: 20%% of all)")
    opt.add_argument("--initial-lr", type=float, default=3e-5,
                     help="learning rate at the start of warm-up")
    opt.add_argument("--min-lr", type=float, default=1e-6,
                     help="learning rate at the end of the cosine decay")
    opt.add_argument("--grad-clip", type=float, default=None,
                     help="max gradient norm, applied after warm-up (default: 1.0 with "
                          "--schedule cosine, none with constant); 0 turns it off")
    run = parser.add_argument_group("evaluation, output and running")
    run.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps")
    run.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    run.add_argument("--prompt", default="Every effort moves you",
                     help="start of the sample text printed after each epoch")
    run.add_argument("--out", default="runs/ch05",
                     help="folder for the checkpoint, log.csv, plots and token files")
    run.add_argument("--save-every", type=int, default=1000,
                     help="save a checkpoint every N steps (also at the end and on Ctrl-C); "
                          "0: only then")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue training from a checkpoint.pt")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="auto picks cuda, then mps, then cpu")
    run.add_argument("--seed", type=int, default=123, help="random seed")
    speed = parser.add_argument_group("speed (beyond the book; same model, same parameters)")
    speed.add_argument("--fast", action="store_true",
                       help="PyTorch's fused attention (SDPA), LayerNorm, GELU and AdamW; on "
                            "CUDA also TF32 and bf16 autocast. Seeded runs then differ from "
                            "the book's numbers in the last digits")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the model (slow first steps, faster after; not on MPS)")
    return parser


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, NonFiniteLoss, DownloadError) as err:
        sys.exit(f"error: {err}")
