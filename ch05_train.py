"""Chapter 5: Pretraining on unlabeled data (and appendix D's training loop).

Defines the book's `calc_loss_batch`, `calc_loss_loader`, `evaluate_model`,
`generate_and_print_sample`, `train_model_simple` and `plot_losses`; appendix
D's `train_model` (warm-up, cosine decay, gradient clipping). `text_to_token_ids`,
`token_ids_to_text` and `generate` live in ch05_generate.py and import from here
too. Beyond the book: the `ch05_train.py` command, with checkpoints and exact
resume, corpora larger than memory, several processes (DistributedDataParallel),
the speed-ups chapters 6 and 7 share (`speed_up`, `make_optimizer`), a
tokenizer of your own (--tokenizer) and a hyperparameter search (--sweep).

Run:  python ch05_train.py                      (the book's run on the-verdict)
      python ch05_train.py --data my_texts/ --epochs 1 --schedule cosine
      python ch05_train.py --sweep grid.json --data my_texts/ --max-steps 500
      torchrun --nproc_per_node=2 ch05_train.py ...
Imports from ch02_data.py, ch03_attention.py (saving plots), ch04_gpt.py and
ch05_generate.py.
"""
import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import random
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler
from tqdm import tqdm

from ch02_data import (CORPORA, EOT, GPTDatasetV1, HelpFormatter, Stopped, TextTooShort,
                       atomic_path, bpe_tokenizer, build_token_file, check_output_file,
                       check_writable, collect_text_files, load_the_verdict, move_aside, number,
                       prepare_corpus, read_text, run_command, saved_tokenizer, token_amount,
                       tokenizer_from_folder, unwritable, write_text_atomic)
from ch03_attention import pyplot, save_figure
from ch04_gpt import (MODEL_CONFIGS, GPTModel, add_device_argument, generate_text_simple,
                      get_device, gpt_config, use_fast_kernels)
from ch05_generate import (add_sampling_arguments, check_state_dict, describe_sampling, generate,
                           generate_from, load_checkpoint, model_file, sampling_of,
                           save_checkpoint, text_to_token_ids, token_ids_to_text, what_is)

# Chapter 5's names, importable from here as the book imports them (5.1.1 and 5.3
# live in ch05_generate.py, as in the book's own gpt_generate.py)
BOOK_NAMES = (text_to_token_ids, token_ids_to_text, generate)


# ---- 5.1.3 Calculating the training and validation set losses ----

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


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path="loss-plot.png",
                score=None):
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = pyplot().subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    if score:  # beyond the book: (label, epochs, values) of --eval-every, on its own axis
        label, epochs, values = score
        ax3 = ax1.twinx()
        ax3.plot(epochs, values, "o:", color="C2", markersize=3, label=label)
        ax3.set_ylabel(label)
        lines = ax1.get_lines() + ax3.get_lines()  # one legend, drawn above all three lines
        ax1.get_legend().remove()
        ax3.legend(lines, [line.get_label() for line in lines], loc="upper right",
                   fontsize="small")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # a second x-axis for tokens seen, aligned with the first
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    save_figure(fig, path)


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

# ---- Data order that can be resumed and split across processes ----

def _distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    """The processes that train together (1 without torchrun)."""
    return dist.get_world_size() if _distributed() else 1


def process_rank():
    """This process's number among them (0, the first, without torchrun)."""
    return dist.get_rank() if _distributed() else 0


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


# ---- The command's run: signals, locking, the log ----

def refuse_overwrite(paths, overwrite, resume_hint="", also=()):
    """Stop before a run writes over an earlier run's results, unless --overwrite
    was given; returns those earlier files, with the files of `also` there (plots,
    say, which alone block nothing), as EarlierResults."""
    found = [Path(p) for p in paths if Path(p).exists()]
    if found and not overwrite:
        raise ValueError(f"{found[0].parent} already holds an earlier run's results "
                         f"({', '.join(p.name for p in found)}). {resume_hint}Start over with "
                         "--overwrite, or choose another --out.")
    return EarlierResults(found + [Path(p) for p in also if Path(p).is_file()])


class EarlierResults:
    """An earlier run's files that --overwrite lets a new run replace. None is
    deleted up front: a typo, a cut download or Ctrl-C in the new run leaves them
    as they were. Each new file takes its old one's place once it is written whole
    (atomic_path); retire() removes old ones that the new run did not write again."""

    def __init__(self, paths=()):
        self.files = {Path(p): file_identity(p) for p in paths}

    def retire(self, *paths):
        """Remove `paths` (all, when none are named) of the earlier files that are
        still the earlier run's: at the new run's successful end, or as soon as a
        new file makes them wrong (an old model's responses beside a new model)."""
        for path in [Path(p) for p in paths] if paths else list(self.files):
            if path not in self.files:
                continue
            earlier = self.files.pop(path)
            if earlier is not None and file_identity(path) == earlier:
                path.unlink()


def file_identity(path):
    """What tells a file from one put in its place since (a rename brings another
    inode), or None when there is none."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def run_lock(out_dir, results=(), flag="--out"):
    """Hold out_dir/run.lock while a run lasts, so a second run on the same --out
    is refused. The operating system releases the lock when the process ends,
    however it ends: a crashed run leaves nothing stuck. Once the lock is held,
    temporary files of `results` (glob patterns) can only be a killed run's
    leftovers, and are removed."""
    out_dir = Path(out_dir)
    check_writable(out_dir, flag)
    try:
        f = open(out_dir / "run.lock", "a+", encoding="utf-8")
    except OSError as err:
        raise unwritable(out_dir, err, flag) from None
    with f:
        try:
            if os.name == "nt":
                import msvcrt
                f.seek(1 << 20)  # lock a byte past the text, which stays readable
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"{out_dir} is in use by another run ({holder}). Wait for it to "
                             f"end, or choose another {flag}.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
        f.flush()
        for pattern in results:
            for stale in out_dir.glob(pattern + ".tmp"):
                stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()



class StopRequests:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP ask the run to stop: it finishes the
    step it is in, with that step's evaluation and sample, saves a checkpoint and
    exits. The checkpoint is then a state the uninterrupted run passes through
    too, so --resume is exact wherever the signal came. A second signal stops at
    once and keeps the last checkpoint saved; while a file is being written,
    signals wait until it is complete."""

    def __init__(self):
        self.signal, self.writing, self.previous = None, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # Windows has no SIGHUP
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.writing:
            self.signal = self.signal or name
            say_now(f"{name}: a file is being written; the run stops once it is complete.")
        elif self.signal is None:
            self.signal = name
            say_now(f"\n{name}: stopping after this step to save a checkpoint "
                    "(Ctrl-C again stops at once, keeping the last checkpoint saved).")
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Signals that arrive in this block wait until it ends."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False


def say_now(message):
    """Write to stderr from a signal handler (print() there may fail mid-print)."""
    with contextlib.suppress(OSError, ValueError):
        os.write(sys.stderr.fileno(), (message + "\n").encode())


def exit_code(signal_name):
    return 128 + getattr(signal, signal_name, signal.SIGINT)


LOG_FIELDS = ("step", "epoch", "epochs_seen", "tokens_seen", "lr", "train_loss", "val_loss",
              "train_perplexity", "val_perplexity", "elapsed_s")
# --eval-every's columns: HellaSwag's accuracies, or --eval-text's perplexity
BENCHMARK_FIELDS = {"hellaswag": ("hellaswag_acc", "hellaswag_acc_norm"),
                    "text": ("text_ppl", "text_bpb")}


def log_fields(settings):
    """log.csv's columns: the book's losses, and --eval-every's benchmark."""
    return LOG_FIELDS + (BENCHMARK_FIELDS[benchmark_name(settings)]
                         if settings.get("eval_every") else ())


def write_log(path, rows, fields=LOG_FIELDS):
    """log.csv from all evaluations so far: written anew when a run starts or
    resumes, so rows that a stopped run logged after its checkpoint go."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def append_log(path, row, fields=LOG_FIELDS):
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)


def perplexity(loss):
    return math.inf if loss > 700 else math.exp(loss)  # exp overflows past ~709


# ---- The command's training loop ----

def _unwrap(model):
    model = getattr(model, "module", model)  # under DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # under torch.compile


def reduce_mean(value, weight, device):
    """The weighted mean of `value` over all processes (value itself in one process)."""
    if not _distributed():
        return value
    t = torch.tensor([0.0 if weight == 0 else value * weight, float(weight)],
                     dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


def in_any_process(flag, device, sync=True):
    """True when `flag` is true in any process. Under DDP only when `sync`: asking
    the others costs a wait for the device, so it happens at the loop's syncs."""
    if not _distributed():
        return flag
    if not sync:
        return False
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def evaluate_all_ranks(model, train_loader, val_loader, device, eval_iter):
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
    return (reduce_mean(train_loss, min(eval_iter, len(train_loader)), device),
            reduce_mean(val_loss, min(eval_iter, len(val_loader)), device))


class Diverged(RuntimeError):
    """Training diverged; the last checkpoint with sound weights is kept."""


def loss_limit(state, vocab_size):
    """The loss above which training has diverged: one more than the run's first
    loss, its untrained model's (weights that score worse are no use to keep).
    Until that is known, three times ln(vocab_size), about an untrained model's."""
    first = state["first_loss"]
    return 3 * math.log(vocab_size) if first is None else first + 1.0


def check_loss(loss, state, vocab_size, what):
    if not math.isfinite(loss) or loss > loss_limit(state, vocab_size):
        first = state["first_loss"]
        start = f" (the run started at {first:.3f})" if first is not None else ""
        raise Diverged(f"{what} became {loss:.4g}{start}")


def epoch_batches(train_loader, samples_done, epoch_seed):
    """The epoch's batches; midway through an epoch (on resume), the rest of it."""
    if not samples_done:
        return iter(train_loader)
    train_loader.sampler.resume_from(epoch_seed, samples_done)
    rng_state = torch.get_rng_state()
    batches = iter(train_loader)
    # iter() draws a seed from the global RNG, which the interrupted run drew at the
    # epoch's start, not here: undo the draw so the restored random state stays exact
    torch.set_rng_state(rng_state)
    return batches


def train_step(model, micro_batches, optimizer, device, grad_clip):
    """One optimizer step over the micro-batches (--grad-accum of them); returns
    the step's mean loss as a tensor, without waiting for the device."""
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=device)
    # Batches come pinned (make_loaders) on CUDA: these copies run without stalling the host
    micro_batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                     for x, y in micro_batches]
    for i, (input_batch, target_batch) in enumerate(micro_batches):
        # Several processes average gradients at the last micro-batch only
        with gradient_sync(model, i == len(micro_batches) - 1):
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss = loss / len(micro_batches)  # the mean over the step's micro-batches
            loss.backward()
        step_loss += loss.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
    optimizer.step()
    return step_loss


@contextlib.contextmanager
def gradient_sync(model, sync):
    """Gradients averaged across processes in this block only when `sync`: DDP's
    no_sync(), FSDP's set_requires_gradient_sync(); one process has nothing to skip."""
    if sync or not _distributed():
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def warmup_steps(settings, total_steps):
    """--warmup-steps, by default 20% of all steps (appendix D's choice)."""
    given = settings["warmup_steps"]
    return int(0.2 * total_steps) if given is None else given


def learning_rate(step, total_steps, settings):
    if settings["schedule"] == "constant":
        return settings["lr"]
    return lr_at_step(step, total_steps, settings["lr"], warmup_steps(settings, total_steps),
                      settings["initial_lr"], settings["min_lr"])


def gradient_clip(step, total_steps, settings):
    """Appendix D clips after warm-up; --grad-clip 0 never clips."""
    clip = settings["grad_clip"]
    if clip is None:
        clip = 1.0 if settings["schedule"] == "cosine" else 0.0
    if settings["schedule"] == "constant" or step >= warmup_steps(settings, total_steps):
        return clip
    return 0.0


def sound_loss(model, val_loader, device):
    """The loss of one validation batch: proof, before a save, that the weights
    still work. The random state is put back, as the uninterrupted run draws
    nothing here."""
    with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws a seed
        model.eval()
        with torch.no_grad():
            loss = calc_loss_loader(val_loader, model, device, num_batches=1)
        model.train()
    return reduce_mean(loss, min(1, len(val_loader)), device)


def new_state():
    return {"step": -1, "epoch": 0, "samples_done": 0, "epoch_seed": None, "tokens_seen": 0,
            "seconds": 0.0, "first_loss": None, "history": {"log": [], "lrs": []}}


def training_checkpoint(model, cfg, optimizer, settings, state, device, tokenizer=None):
    """Everything a resume needs; the random states are CPU tensors on every device.
    Under --fsdp every process calls this (the states are gathered), and only
    the first gets the checkpoint; the others get None. A tokenizer of --train-bpe
    goes into the file too (its two files' text): the model is no use without it."""
    saved = {k: settings[k] for k in SAVED_SETTINGS}
    model_state, optimizer_state = whole_states(model, optimizer)
    if model_state is None:
        return None
    own = {"tokenizer": tokenizer.files} if hasattr(tokenizer, "files") else {}
    return model_file("pretraining", model_state, cfg, saved,
                      what="a ch05_train.py training checkpoint",
                      optimizer=optimizer_state, **state, **own,
                      rng_state=torch.get_rng_state(),
                      cuda_rng_state=(torch.cuda.get_rng_state(device) if device.type == "cuda"
                                      else None))


def save_training(path, model, cfg, optimizer, settings, state, device, val_loader, stopper,
                  is_main, tokenizer=None):
    """Every process checks that the weights still work; the first one writes
    (under --fsdp, after every process has sent it its part of the states)."""
    check_loss(sound_loss(model, val_loader, device), state, cfg["vocab_size"],
               f"the validation loss of the weights to be saved at step {state['step']}")
    if is_main or is_sharded(model):
        with stopper.deferred():
            checkpoint = training_checkpoint(model, cfg, optimizer, settings, state, device,
                                             tokenizer)
            if is_main:
                save_checkpoint(path, checkpoint)
    return state["step"]


def check_training_loss(losses, state, vocab_size, device, bar):
    """Read the losses of the steps since the last check (this waits for the device).
    The first check, at step 0, keeps the untrained model's loss as the run's start."""
    mean_loss = reduce_mean(torch.stack(losses).mean().item(), 1, device)
    check_loss(mean_loss, state, vocab_size, f"the training loss by step {state['step']}")
    if state["first_loss"] is None:
        state["first_loss"] = mean_loss
    bar.set_postfix_str(f"loss {mean_loss:.3f} (steps to {state['step']})")  # read at syncs


def stopped_early(err, step, saved_step, path):
    """The error for a run that stopped at once (a second Ctrl-C) or diverged."""
    kept = (f"the checkpoint of step {saved_step} ({path}) is kept" if saved_step is not None
            else "no checkpoint was saved yet")
    if isinstance(err, KeyboardInterrupt):
        return Stopped(f"Stopped at once during step {step}; {kept}.", 130)
    return Diverged(f"Training diverged: {err}; {kept}, the last with sound weights. Go on "
                    "with a lower --lr (and --resume), --grad-clip 1.0 or --schedule cosine.")


def train(model, cfg, loaders, optimizer, device, tokenizer, settings, state, out_dir, stopper,
          is_main=True, benchmark=None):
    """Chapter 5's train_model_simple with appendix D's schedule, made for long runs:
    an evaluation log, checkpoints, exact resume and DDP; random numbers drawn as
    train_model_simple draws them, so a seeded run prints the book's numbers.
    `state` changes only after optimizer.step(), and a checkpoint is written only
    after all of a step's work: a state the uninterrupted run passes through too.
    `benchmark` (rank 0's, for --eval-every) scores the model into the log too."""
    train_loader, train_eval_loader, val_loader = loaders
    sampler, accum = train_loader.sampler, settings["grad_accum"]
    epoch_samples = len(train_loader) // accum * accum * sampler.global_batch
    total_steps, last_step = step_counts(train_loader, settings)
    path = Path(out_dir) / "checkpoint.pt"
    refuse_finished(state["step"], last_step)
    saved_step = state["step"] if path.exists() and state["step"] >= 0 else None
    started = time.perf_counter() - state["seconds"]
    if is_main:
        write_log(Path(out_dir) / "log.csv", state["history"]["log"], log_fields(settings))
    bar = tqdm(total=last_step + 1, initial=state["step"] + 1, unit="step",
               disable=not is_main, dynamic_ncols=True)
    losses, batches = [], None  # losses: device tensors, read every 10 steps
    pace = {"start": time.perf_counter(), "from_step": state["step"], "eval": 0.0, "said": False}
    try:
        while state["step"] < last_step:
            step = state["step"] + 1
            if batches is None:
                batches = epoch_batches(train_loader, state["samples_done"], state["epoch_seed"])
            loss, lr = take_step(model, batches, optimizer, device, settings, state, sampler,
                                 total_steps, started)
            losses.append(loss)
            bar.update(1)

            evaluating = step % settings["eval_freq"] == 0
            benchmarking = step % (settings["eval_every"] or math.inf) == 0
            epoch_over = state["samples_done"] >= epoch_samples
            saving = step == last_step or (step + 1) % (settings["save_every"] or math.inf) == 0
            sync = evaluating or benchmarking or epoch_over or saving or step % 10 == 0  # syncs
            if sync:
                check_training_loss(losses, state, cfg["vocab_size"], device, bar)
                losses = []
            if evaluating or benchmarking:
                with timed(pace, "eval"):
                    record_evaluation(model, (train_eval_loader, val_loader) if evaluating
                                      else None, device, settings, state, lr, out_dir, stopper,
                                      epoch_samples, is_main, cfg["vocab_size"],
                                      benchmark if benchmarking else None)
            if sync and is_main:
                say_pace(pace, step, last_step, settings)
            if epoch_over:
                end_epoch(model, tokenizer, device, settings, state, is_main)
                batches = None
            stop = in_any_process(stopper.signal is not None, device, sync)
            if saving or stop:
                saved_step = save_training(path, model, cfg, optimizer, settings, state, device,
                                           val_loader, stopper, is_main, tokenizer)
                stop = stop or in_any_process(stopper.signal is not None, device)
            if stop:
                raise stopped_by(stopper.signal, step, last_step, path)
    except (KeyboardInterrupt, Diverged) as err:
        raise stopped_early(err, state["step"] + 1, saved_step, path) from None
    finally:
        bar.close()
    return state


def take_step(model, batches, optimizer, device, settings, state, sampler, total_steps,
              started):
    """One optimizer step at the schedule's learning rate, and `state` moved on
    after it; returns (the step's loss, a device tensor; the learning rate)."""
    step, accum = state["step"] + 1, settings["grad_accum"]
    micro_batches = [next(batches) for _ in range(accum)]
    lr = learning_rate(step, total_steps, settings)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = train_step(model, micro_batches, optimizer, device,
                      gradient_clip(step, total_steps, settings))
    state.update(step=step, samples_done=state["samples_done"] + accum * sampler.global_batch,
                 tokens_seen=state["tokens_seen"] + micro_batches[0][0].numel() * accum *
                 sampler.world_size, epoch_seed=sampler.seed,
                 seconds=time.perf_counter() - started)
    state["history"]["lrs"].append(lr)
    return loss, lr


def stopped_by(signal_name, step, last_step, path):
    """The Stopped of a run that saved its checkpoint after step `step` on a signal."""
    return Stopped(f"Stopped by {signal_name or 'a signal to another process'} after step "
                   f"{step}; checkpoint saved to {path}. Step {step + 1} (of steps 0 to "
                   f"{last_step}) comes next: continue with --resume {path}.",
                   exit_code(signal_name or "SIGINT"))


def end_epoch(model, tokenizer, device, settings, state, is_main):
    """The next epoch's position, and the book's sample after each epoch."""
    state.update(epoch=state["epoch"] + 1, samples_done=0, epoch_seed=None)
    if is_main:  # printed above the progress bar, which is drawn again below
        with tqdm.external_write_mode():
            generate_and_print_sample(_unwrap(model), tokenizer, device, settings["prompt"])
    elif is_sharded(model):  # every process holds a part of the weights: all generate
        with contextlib.redirect_stdout(io.StringIO()):
            generate_and_print_sample(_unwrap(model), tokenizer, device, settings["prompt"])


@contextlib.contextmanager
def timed(pace, key):
    """Add the block's seconds to pace[key]."""
    began = time.perf_counter()
    try:
        yield
    finally:
        pace[key] += time.perf_counter() - began


def say_pace(pace, step, last_step, settings):
    """Once, after the first steps: how long the whole run will take, and where
    evaluation costs more than a fifth of it, the flag that makes it cheaper."""
    if pace["said"] or step - pace["from_step"] < 10:
        return
    pace["said"] = True
    seconds = time.perf_counter() - pace["start"]
    per_step = seconds / (step - pace["from_step"])
    tqdm.write(f"Estimated time for the run: {clock(per_step * (last_step - step))} more "
               f"({last_step - step:,} steps at {per_step:.2f} s each, evaluations included)")
    share = pace["eval"] / seconds
    if share > 0.2 and settings["data"]:  # the book's text keeps the book's cadence
        tqdm.write(f"Evaluation takes {share:.0%} of the time (every {settings['eval_freq']} "
                   f"steps, {settings['eval_iter']} batches each): a larger --eval-freq (or a "
                   "smaller --eval-iter) trains faster.")


def clock(seconds):
    """3 h 05 min, 4 min 10 s, 12 s."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h {minutes:02d} min" if hours else
            f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def step_counts(train_loader, settings):
    """(the steps the run takes, which its schedule spans: --max-steps when given,
    else --epochs; the last of them)."""
    epoch_steps = len(train_loader) // settings["grad_accum"] * settings["epochs"]
    total_steps = min(epoch_steps, settings["max_steps"] or epoch_steps)
    return total_steps, total_steps - 1


def describe_schedule(settings, total_steps):
    """The learning rate over the run, for its header."""
    if settings["schedule"] == "constant":
        return f"Learning rate: {settings['lr']:g} for all {total_steps:,} steps"
    warmup = warmup_steps(settings, total_steps)
    return (f"Learning rate: warm-up from {settings['initial_lr']:g} to the peak "
            f"{settings['lr']:g} over {warmup:,} steps, then cosine decay to "
            f"{learning_rate(total_steps - 1, total_steps, settings):.3g} at the last of "
            f"{total_steps:,} steps")


class RunFinished(ValueError):
    """A resumed checkpoint that has taken every step asked for."""


def refuse_finished(step, last_step):
    if step >= last_step:
        raise RunFinished(f"The checkpoint is at step {step}, the last of the {last_step + 1} "
                         "steps asked for: give a larger --max-steps or --epochs to go on.")


def record_evaluation(model, loaders, device, settings, state, lr, out_dir, stopper,
                      epoch_samples, is_main, vocab_size, benchmark=None):
    """Evaluate (the book's train/val losses, when given their loaders; with
    `benchmark`, its score too), then keep the result once: in the history, in
    log.csv and on the screen."""
    row = {"step": state["step"], "epoch": state["epoch"] + 1,
           "epochs_seen": round(state["epoch"] + state["samples_done"] / epoch_samples, 4),
           "tokens_seen": state["tokens_seen"], "lr": lr, "elapsed_s": round(state["seconds"], 3)}
    if loaders:
        train_loss, val_loss = evaluate_all_ranks(model, *loaders, device, settings["eval_iter"])
        check_loss(train_loss, state, vocab_size, f"the evaluation loss at step {state['step']}")
        row.update(train_loss=train_loss, val_loss=val_loss,
                   train_perplexity=perplexity(train_loss), val_perplexity=perplexity(val_loss))
    if benchmark:  # rank 0 only: the other processes wait at the next step's gradients
        row.update(benchmark(_unwrap(model), device))
    state["history"]["log"].append(row)
    if is_main:
        if loaders:
            tqdm.write(f"Ep {row['epoch']} (Step {row['step']:06d}): Train loss {train_loss:.3f}, "
                       f"Val loss {val_loss:.3f}  | perplexity {row['train_perplexity']:.1f}, "
                       f"{row['val_perplexity']:.1f}")
        if benchmark:
            tqdm.write(f"Ep {row['epoch']} (Step {row['step']:06d}): {describe_benchmark(row)}")
        with stopper.deferred():
            append_log(Path(out_dir) / "log.csv", row, log_fields(settings))


# ---- Beyond the book: a benchmark while training (--eval-every) ----

def benchmark_name(settings):
    return "text" if settings.get("eval_text") else "hellaswag"


def training_benchmark(settings, tokenizer, context_length):
    """--eval-every's scorer, its data read once: (model, device) -> its log.csv
    columns (HellaSwag's accuracies, or --eval-text's perplexity and bits per byte),
    as ch05_load_gpt2.py --eval scores them."""
    try:  # the scoring lives with --eval; needed only when asked for
        from ch05_load_gpt2 import benchmark_data, benchmark_metrics, text_ids
    except ImportError as err:
        raise ValueError(f"--eval-every needs ch05_load_gpt2.py beside ch05_train.py (it "
                         f"scores the benchmarks): {err}") from None
    name, limit = benchmark_name(settings), settings["eval_limit"]
    if name == "text":
        data = text_ids(settings["eval_text"], tokenizer)[:limit and limit * context_length]
    else:
        data = benchmark_data(name, {"limit": limit, "eval_data_dir": settings["eval_data_dir"],
                                     "data_dir": Path(settings["data_dir"]) / "eval"}, tokenizer)

    def score(model, device):
        metrics = benchmark_metrics(name, model, data, device, context_length,
                                    context_length // 2, tokenizer)
        return dict(zip(BENCHMARK_FIELDS[name], (metrics[k] for k in (
            ("acc", "acc_norm") if name == "hellaswag" else ("ppl", "bpb")))))
    return score


def describe_benchmark(row):
    if "hellaswag_acc_norm" in row:
        return (f"HellaSwag acc_norm {row['hellaswag_acc_norm']:.4f}, "
                f"acc {row['hellaswag_acc']:.4f}")
    return f"--eval-text perplexity {row['text_ppl']:.2f}, {row['text_bpb']:.3f} bits per byte"


# ---- Beyond the book: the model sharded over several processes (--fsdp) ----
# PyTorch's FSDP2: each transformer block's parameters, gradients and optimizer
# state split across the processes, gathered whole only while a block computes.
# Checkpoints stay in one process's layout, so any run resumes any other's.

def shard_model(model, plan):
    """fully_shard each TransformerBlock, then the rest; with bf16 on CUDA, the
    blocks compute in bf16 and gradients are averaged in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = ({"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                 reduce_dtype=torch.float32)}
              if plan["bf16"] else {})
    for block in model.trf_blocks:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    return model


def is_sharded(model):
    if not _distributed():
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(_unwrap(model), FSDPModule)


def trainable_names(model):
    """The names of the parameters make_optimizer hands the optimizer, in its order."""
    return [name for name, p in _unwrap(model).named_parameters() if p.requires_grad]


def whole_states(model, optimizer):
    """(model state, optimizer state) in one process's layout (the optimizer's
    keyed by parameter number). Sharded, every process must call this: the first
    gets the states, gathered on the CPU, the others (None, None)."""
    if not is_sharded(model):
        return _unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    module = _unwrap(model)
    model_state = whole_model_state(module)
    by_name = get_optimizer_state_dict(
        module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None, None
    number = {name: i for i, name in enumerate(trainable_names(module))}
    return model_state, {
        "state": {number[name]: s for name, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [number[n] for n in g["params"]]}
                         for g in by_name["param_groups"]]}


def whole_model_state(model):
    """The model's state dict, whole; sharded, gathered to the first process on the
    CPU (every process must call this; the others get an empty dict)."""
    if not is_sharded(model):
        return _unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(_unwrap(model), options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))


def load_optimizer_state(model, optimizer, saved):
    """A checkpoint's optimizer state (one process's layout) into the optimizer;
    sharded, each process keeps its part."""
    if not is_sharded(model):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    names = trainable_names(model)
    by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in saved["param_groups"]]}
    set_optimizer_state_dict(_unwrap(model), optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


# ---- Beyond the book: finetuning on several processes (chapters 6 and 7 under torchrun) ----
# Each process takes its share of every batch of the book's loader; the loss is
# the whole batch's mean, as one process computes it, so the steps are one
# process's. Evaluations and samples use the whole batches, in every process.

class BatchShares(Sampler):
    """The batches DataLoader(shuffle=True, batch_size, drop_last=True) makes in one
    process, from the same draws of the global random state, each process taking
    its part (batch_size / processes windows) of every batch."""

    def __init__(self, size, batch_size, rank, world_size):
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} does not divide among {world_size} "
                             f"processes: give a multiple of {world_size}.")
        self.size, self.batch_size, self.rank, self.world_size = (size, batch_size, rank,
                                                                  world_size)

    def __iter__(self):
        order = RandomSampler(range(self.size))  # draws its seed as DataLoader's sampler does
        for batch in BatchSampler(order, self.batch_size, drop_last=True):
            yield batch[self.rank::self.world_size]

    def __len__(self):
        return self.size // self.batch_size


def share_of_batch_loss(input_batch, target_batch, model, device):
    """This process's part of the whole batch's mean token loss, scaled so that the
    gradients the processes average are one process's gradients of the batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten(),
                                              reduction="sum")
    scored = (target_batch != -100).sum().to(torch.float64)  # cross_entropy's ignore_index
    dist.all_reduce(scored)
    return total * dist.get_world_size() / scored.to(total.dtype)


def whole_batch_tokens(share):
    """The tokens (padding included) of the whole batch that `share`, a BatchShares
    part of it padded to its own longest row, came from; in one process, its own."""
    if not _distributed():
        return share.numel()
    width = torch.tensor([share.shape[1]], device=share.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # the whole batch's padded width
    return int(width.item()) * share.shape[0] * dist.get_world_size()


def train_model_shared(model, train_loader, eval_loaders, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    """train_model_simple for several processes: the training loader's batches are
    shares (BatchShares); eval_loaders are the book's training and validation
    loaders of whole batches. Returns what train_model_simple returns."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    module = _unwrap(model)  # evaluations and samples without gradients to average
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in tqdm(train_loader, desc=f"Epoch {epoch + 1}",
                                              leave=False, dynamic_ncols=True):
            optimizer.zero_grad()
            loss = share_of_batch_loss(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += whole_batch_tokens(input_batch)
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(module, *eval_loaders, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                tqdm.write(f"Ep {epoch + 1} (Step {global_step:06d}): "
                           f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(module, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def quiet_process():
    """Only the first process speaks: the others' prints and progress bars go nowhere
    (their errors still reach stderr)."""
    sys.stdout = open(os.devnull, "w")
    tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)


def agree(decide, rank):
    """decide() on rank 0 (its checks of the output folder, say), then the same
    outcome in every process: its error raised everywhere, or its result."""
    outcome = [None, None]
    if rank == 0:
        try:
            outcome[0] = decide()
        except (OSError, ValueError) as err:
            outcome[1] = err
    if _distributed():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


# ---- Putting the command together ----

def speed_plan(fast, compile, device):
    """What --fast and --compile mean on this device, decided here only."""
    cuda = device.type == "cuda"
    return {"fast_kernels": fast,  # ch04's FAST_KERNELS: SDPA, fused LayerNorm/GELU/QKV
            "fused_adamw": fast,
            "tf32": fast and cuda,
            "bf16": fast and cuda and torch.cuda.is_bf16_supported(),
            "compile": compile and device.type != "mps"}  # torch.compile does not support MPS well


def describe_speed(plan, fast, compile):
    parts = (["SDPA attention", "fused LayerNorm/GELU/QKV/AdamW", "padded output head"]
             if fast else []) + \
        (["TF32 matmuls"] if plan["tf32"] else []) + (["bf16 autocast"] if plan["bf16"] else []) + \
        (["torch.compile"] if plan["compile"] else [])
    off = (["torch.compile (not on MPS)"] if compile and not plan["compile"] else [])
    return ("Speed: " + (", ".join(parts) or "the book's kernels") +
            (f"; off here: {', '.join(off)}" if off else ""))


def make_optimizer(model, lr, weight_decay, fused=False, log=print):
    """The book's AdamW; fused=True: PyTorch's fused implementation (one kernel for
    all parameters) where this PyTorch supports it on this device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError) as err:
            log(f"Note: fused AdamW is not available here ({err}); using the plain one.")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def speed_up(model, plan, device):
    """The plan applied to the model: fast kernels, TF32, bf16 autocast inside its
    forward (so training, evaluation and samples all run in it), torch.compile."""
    if plan["fast_kernels"]:
        use_fast_kernels(model)
    if plan["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True  # no-ops on GPUs without TF32
        torch.backends.cudnn.allow_tf32 = True
    if plan["bf16"]:
        autocast_forward(model, device)
    return torch.compile(model) if plan["compile"] else model


def autocast_forward(model, device):
    """Run model.forward under bf16 autocast and return its output in fp32: code
    written for fp32 models (the book's losses and training loops) then runs at
    bf16 speed unchanged, and backward runs outside autocast, as PyTorch
    advises. The parameters stay fp32."""
    forward = model.forward

    def bf16_forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs).float()
    model.forward = bf16_forward
    return model


def speed_up_finetuning(model, fast, device, log=print):
    """--fast in chapters 6 and 7, as in chapter 5: the fast kernels, and on
    CUDA TF32 and bf16 autocast. Returns the plan (its fused_adamw for make_optimizer)."""
    plan = speed_plan(fast, False, device)
    log(describe_speed(plan, fast, False))
    speed_up(model, plan, device)
    return plan


def launched_processes():
    """How many processes torchrun started for this command (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for_all():
    """Under torchrun, each process waits here until the first has written its
    files: one that ended early could take the others down with it."""
    if world_size() > 1:
        dist.barrier()


def end_processes():
    """The processes' group ended (under torchrun), so that each exits cleanly."""
    if _distributed():
        dist.destroy_process_group()


def setup_distributed(device_name, log):
    """(rank, world_size, device) from torchrun's environment; one process
    otherwise. Every process chooses its device the same way."""
    world_size = launched_processes()
    device = get_device(device_name, log=log)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"Several processes need CUDA or the CPU, not {device.type}; "
                         "add --device cpu.")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def rank0_first(fn, rank):
    """fn() on rank 0, then on the others: rank 0 downloads or writes a cache
    that the others then find in place."""
    if rank == 0:
        result = fn()
    if _distributed():
        dist.barrier()
    return result if rank == 0 else fn()


def load_corpus(settings, tokenizer, rank, log):
    """(train dataset, val dataset): the book's character split of an in-memory
    text, or a token split of a memory-mapped token file for large corpora."""
    ctx = settings["context_length"]
    name = named_corpus(settings["data"])
    if name:  # downloaded and tokenized once (rank 0), its validation part fixed
        parts = rank0_first(lambda: prepare_corpus(
            name, settings["data_tokens"], settings["data_dir"], settings["workers"],
            log=log, check=rank == 0), rank)
        return [_windows(lambda: GPTDatasetV1.from_token_ids(part, ctx, ctx), split, ctx)
                for part, split in zip(parts, ("training", "validation"))]
    files = collect_text_files(settings["data"]) if settings["data"] else None
    if files is None:
        text = rank0_first(lambda: load_the_verdict(None, settings["data_dir"]), rank)
    elif not settings["memmap"]:
        text = EOT.join(read_text(f) for f in files)
    if not settings["memmap"]:
        split_idx = int(settings["train_ratio"] * len(text))  # the book splits characters
        parts = text[:split_idx], text[split_idx:]
        return [_windows(lambda: GPTDatasetV1(part, tokenizer, ctx, ctx), name, ctx)
                for part, name in zip(parts, ("training", "validation"))]
    # rank 0 checks (or writes) the token file; the others then find it whole
    tokens = rank0_first(lambda: build_token_file(files, Path(settings["out"]) / "tokens",
                                                  tokenizer, log=log, check=rank == 0), rank)
    split_idx = int(settings["train_ratio"] * len(tokens))
    parts = tokens[:split_idx], tokens[split_idx:]
    return [_windows(lambda: GPTDatasetV1.from_token_ids(part, ctx, ctx), name, ctx)
            for part, name in zip(parts, ("training", "validation"))]


def run_tokenizer(settings, ckpt):
    """GPT-2's tokenizer, or the one of --tokenizer (on --resume, the one saved in
    the checkpoint: its folder may have gone since)."""
    if ckpt and ckpt.get("tokenizer"):
        return saved_tokenizer(ckpt["tokenizer"])
    if not settings["tokenizer"]:
        return bpe_tokenizer()
    if named_corpus(settings["data"]):
        raise ValueError(f"The named corpus {settings['data'][0]} is tokenized with GPT-2's "
                         "tokenizer; --tokenizer takes text files (--data FILE_OR_FOLDER).")
    return tokenizer_from_folder(settings["tokenizer"])


def named_corpus(data):
    """The corpus --data names (fineweb-edu, tinystories), or None for text files."""
    if data and len(data) == 1 and data[0] in CORPORA and not Path(data[0]).exists():
        return data[0]
    return None


def _windows(make_dataset, split_name, ctx):
    try:
        return make_dataset()
    except TextTooShort as err:
        raise ValueError(f"The {split_name} split is too short for --context-length {ctx}: it "
                         f"has {err.n_tokens} tokens, and one window needs {ctx + 1} (inputs "
                         "plus the shifted target). Give more text, or a smaller "
                         "--context-length.") from None


def make_loaders(train_set, val_set, settings, device, rank, world_size):
    """The training loader (its order resumable), a second one over the training
    set for evaluations (the book evaluates on its shuffled training loader), and
    the validation loader."""
    batch_size, ctx = settings["batch_size"], settings["context_length"]
    need = batch_size * world_size * settings["grad_accum"]
    if len(train_set) < need:
        raise ValueError(
            f"The training split has {len(train_set)} windows of {ctx} tokens "
            f"(about {len(train_set) * ctx:,} tokens), but one step needs "
            f"{need} windows ({need * ctx + 1:,} tokens). Give more text, "
            "or lower --context-length, --batch-size or --grad-accum.")
    pin = device.type == "cuda"  # page-locked batches copy to a GPU faster
    loader = lambda dataset, shuffle: DataLoader(  # noqa: E731
        dataset, batch_size=batch_size, pin_memory=pin,
        sampler=ResumableSampler(len(dataset), batch_size, shuffle, shuffle, rank,
                                 world_size))
    return loader(train_set, True), loader(train_set, True), loader(val_set, False)


# Every flag of the command, in one of three kinds. On --resume, a flag not
# given again takes the checkpoint's value; given again, a training setting takes
# effect and a model setting is refused. Run settings are each run's own (the
# checkpoint keeps --fast and --compile only to say when a resume drops them).
MODEL_SETTINGS = ("model_size", "context_length", "n_layers", "emb_dim", "n_heads", "tokenizer")
SHAPE_SETTINGS = ("n_layers", "emb_dim", "n_heads")  # each None: --model-size's
TRAINING_SETTINGS = ("data", "data_tokens", "train_ratio", "memmap", "memmap_above_mb",
                     "batch_size", "grad_accum", "lr", "weight_decay", "schedule", "warmup_steps",
                     "initial_lr", "min_lr", "grad_clip", "epochs", "max_steps", "drop_rate",
                     "eval_freq", "eval_iter", "save_every", "prompt", "seed", "eval_every",
                     "eval_text", "eval_limit")
RUN_SETTINGS = ("data_dir", "workers", "eval_data_dir", "out", "overwrite", "resume", "device",
                "fast", "compile", "fsdp", "generate", "from_file", "export_weights", "max_new_tokens",
                "temperature", "top_k", "top_p", "sweep", "trials", "sweep_out")
SAVED_SETTINGS = MODEL_SETTINGS + TRAINING_SETTINGS + ("fast", "compile")


def corpus_bytes(data):
    """The size of --data's text files (0 for the book's story; a named corpus
    counts as large: it is read from its token files)."""
    if named_corpus(data):
        return math.inf
    return sum(f.stat().st_size for f in collect_text_files(data)) if data else 0


def resolve_settings(args, ckpt=None, data_size=corpus_bytes):
    """The run's settings, decided here only: the parsed flags (args; args.given
    names those typed) and, on --resume, the checkpoint's settings for every flag
    not typed again. Returns (settings, messages: what the run should say about
    them). Raises ValueError for a flag that would change a resumed model.
    Nothing else is read (data_size gives the corpus size) and nothing changed."""
    settings = {k: getattr(args, k) for k in MODEL_SETTINGS + TRAINING_SETTINGS + RUN_SETTINGS}
    messages, flag = [], lambda key: "--" + key.replace("_", "-")  # noqa: E731
    if ckpt is not None:
        saved = dict(ckpt.get("settings") or {})
        if "model" in saved:  # the name of --model-size in earlier checkpoints
            saved.setdefault("model_size", saved.pop("model"))
        if not saved:
            raise ValueError(f"{args.resume} was written by an older ch05_train.py, which did "
                             "not save its settings; it cannot be resumed by this version.")
        clashes = [f"{flag(k)} {settings[k]}" for k in MODEL_SETTINGS
                   if k in args.given and settings[k] != saved.get(k)]
        if clashes:
            raise ValueError(f"The checkpoint {args.resume} holds a {saved['model_size']!r} "
                             f"model with context length {saved['context_length']}, not "
                             f"{', '.join(clashes)}. Leave out --model-size and "
                             "--context-length (and the model's shape) to resume it.")
        changed = [f"{flag(k)} {saved[k]} -> {settings[k]}" for k in TRAINING_SETTINGS
                   if k in args.given and settings[k] != saved[k]]
        if changed:
            messages.append("Changed on resume: " + ", ".join(changed))
        settings.update({k: saved.get(k, settings[k])  # older checkpoints lack newer flags
                         for k in MODEL_SETTINGS + TRAINING_SETTINGS if k not in args.given})
        if "out" not in args.given:
            settings["out"] = str(Path(args.resume).parent)  # go on in the checkpoint's folder
        dropped = [flag(k) for k in ("fast", "compile") if saved.get(k) and not settings[k]]
        if dropped:
            messages.append(f"Note: the checkpoint was trained with {' '.join(dropped)}; this "
                            "run goes without (give it again to keep it).")
    # A large corpus is memory-mapped, and there an evaluation every 200 steps costs
    # under 2% of training (one costs about 3 steps: 2 x --eval-iter forwards)
    settings["memmap"] = bool(settings["data"]) and (
        settings["memmap"] or data_size(settings["data"]) > settings["memmap_above_mb"] * 1e6)
    if settings["eval_freq"] is None:
        settings["eval_freq"] = 200 if settings["memmap"] else 5
    name = named_corpus(settings["data"])
    if settings["data_tokens"] is None and name:
        settings["data_tokens"] = CORPORA[name]["default_tokens"]
    elif settings["data_tokens"] is not None and not name:
        raise ValueError(f"--data-tokens is for a named corpus ({', '.join(CORPORA)}), not "
                         "for text files: leave it out, or give --data fineweb-edu.")
    asked = [flag(k) for k in ("eval_text", "eval_limit", "eval_data_dir") if settings[k]]
    if asked and not settings["eval_every"]:
        raise ValueError(f"{' and '.join(asked)} choose what --eval-every N scores: give "
                         "--eval-every too (e.g. --eval-every 250).")
    if settings["context_length"] > 1024:
        messages.append(f"Note: --context-length {settings['context_length']} is beyond "
                        "GPT-2's 1,024 positions: fine when training from scratch, but "
                        "OpenAI's weights cannot be loaded into this model, and attention's "
                        "memory grows with the square of the context.")
    return settings, messages


def model_config(settings):
    """The config of --model-size, with --n-layers, --emb-dim and --n-heads where given."""
    shape = {k: settings[k] for k in SHAPE_SETTINGS if settings[k] is not None}
    return gpt_config(settings["model_size"], context_length=settings["context_length"],
                      drop_rate=settings["drop_rate"], **shape)


def model_name(settings, cfg):
    """--model-size, and the shape it was given instead of its own."""
    if all(settings.get(k) is None for k in SHAPE_SETTINGS):
        return settings["model_size"]
    return (f"{settings['model_size']} reshaped: {cfg['n_layers']} layers, embedding size "
            f"{cfg['emb_dim']}, {cfg['n_heads']} heads")


def load_weights(model, ckpt):
    """The checkpoint's weights, into a model not yet sharded (every process)."""
    check_state_dict(model, ckpt["model"], source="the checkpoint")
    model.load_state_dict(ckpt["model"])


def resume_into(model, optimizer, ckpt, settings, device):
    """Load the checkpoint's optimizer state and random state (its weights are
    in the model already: load_weights); the settings of this run (learning
    rate, weight decay, fused or not) win over the optimizer state's."""
    saved = ckpt["optimizer"]
    for group in saved["param_groups"]:
        group.update(lr=settings["lr"], weight_decay=settings["weight_decay"],
                     fused=optimizer.defaults["fused"], foreach=optimizer.defaults["foreach"])
    load_optimizer_state(model, optimizer, saved)
    state = new_state()
    state.update({k: ckpt[k] for k in state if k in ckpt})
    if state["first_loss"] is None and state["history"]["log"]:  # saved by an earlier version
        state["first_loss"] = state["history"]["log"][0]["train_loss"]
    # The random state last: nothing between here and the loop may draw from it
    torch.set_rng_state(ckpt["rng_state"])
    if device.type == "cuda" and ckpt["cuda_rng_state"] is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng_state"], device)
    return state


def earlier_checkpoint(saved):
    """This command's checkpoints of earlier versions: the ones with a step."""
    return "pretraining" if "optimizer" in saved or "step" in saved else None


def export_weights(source, destination, overwrite=False):
    """--export-weights: a model file's weights, config and settings without the
    optimizer's state (two thirds of a training checkpoint), for --from,
    --init-from and --export-hf; it cannot be resumed."""
    check_output_file(destination, overwrite, "--export-weights")
    saved = load_checkpoint(source, mmap=True, earlier=earlier_checkpoint)
    save_checkpoint(destination, {**{k: saved[k] for k in ("kind", "model", "config", "settings",
                                                           "tokenizer") if k in saved},
                                  "what": f"the weights of {what_is(saved)} (--export-weights)"})
    mb = lambda path: Path(path).stat().st_size / 1e6  # noqa: E731
    print(f"Saved the weights of {source} ({mb(source):,.0f} MB) as {destination} "
          f"({mb(destination):,.0f} MB).")
    return Path(destination)


def main(args):
    """The command, from parse_args()'s (or build_parser()'s) arguments."""
    if args.generate is not None:  # the earlier home of ch05_generate.py's command
        return generate_from({**vars(args), "prompt": args.generate,
                              "from_file": args.from_file or Path(args.out) / "checkpoint.pt",
                              "max_new_tokens": args.max_new_tokens or 100})
    if args.export_weights:
        return export_weights(args.from_file or Path(args.out) / "checkpoint.pt",
                              args.export_weights, args.overwrite)
    if not args.sweep and {"trials", "sweep_out"} & args.given:
        raise ValueError("--trials and --sweep-out go with --sweep GRID.json.")
    if args.sweep:
        if launched_processes() > 1:
            raise ValueError("--sweep runs its trials one after another in one process: start "
                             "it with python, not torchrun.")
        return run_sweep({k: getattr(args, k) for k in ("sweep", "trials", "sweep_out",
                                                        "overwrite", "seed")},
                         args.argv, build_parser())
    rank, world_size, device = setup_distributed(
        args.device, log=print if os.environ.get("RANK", "0") == "0" else lambda *a: None)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    try:
        ckpt = None
        if args.resume:  # on the CPU: the random states must stay CPU tensors
            ckpt = load_checkpoint(args.resume, map_location="cpu", kinds=("pretraining",),
                                   wanted="a ch05_train.py training checkpoint",
                                   hint="--resume continues a checkpoint.pt that "
                                        "ch05_train.py saved.", earlier=earlier_checkpoint)
            if "step" not in ckpt and ckpt.get("settings"):  # what --export-weights keeps
                raise ValueError(f"{args.resume} holds a model's weights only (saved by "
                                 "--export-weights), not the optimizer and data position a "
                                 "resume needs: resume the checkpoint.pt it came from, or start "
                                 "from it with --init-from in chapters 6 and 7.")
        settings, messages = resolve_settings(args, ckpt)
        if settings["fsdp"] and world_size == 1:
            raise ValueError("--fsdp shards the model over several processes: launch them with "
                             "torchrun, e.g. torchrun --nproc_per_node=4 ch05_train.py --fsdp "
                             "... (one process trains without it).")
        for message in messages:
            log(message)
        out_dir = Path(settings["out"])
        with (run_lock(out_dir, RESULTS) if is_main else contextlib.nullcontext()), \
                StopRequests() as stopper:
            resuming_here = ckpt is not None and (
                Path(settings["resume"]).resolve() == (out_dir / "checkpoint.pt").resolve())
            if is_main and not resuming_here:
                claim_out_dir(out_dir, settings["overwrite"], log)
            return run(settings, ckpt, out_dir, device, rank, world_size, stopper, log)
    finally:
        end_processes()


# What a run writes in --out (temporary files of these left by a killed run are
# removed once the run lock is held)
RESULTS = ("checkpoint.pt", "log.csv", "*.png", "tokens/*.bin", "tokens/*.json")


def claim_out_dir(out_dir, overwrite, log):
    """Refuse an --out holding an earlier run's checkpoint, unless --overwrite,
    which keeps it until this run saves its own (a bad --data or Ctrl-C before
    then loses nothing). A log.csv without a checkpoint (a run that diverged or
    was killed before its first save) cannot be resumed: it is kept under another
    name, out of the way."""
    checkpoint, log_csv = out_dir / "checkpoint.pt", out_dir / "log.csv"
    if log_csv.exists() and not checkpoint.exists() and not overwrite:
        log(f"Note: {log_csv} is from a run that stopped before saving a checkpoint; kept "
            f"as {move_aside(log_csv, '.unfinished').name}, and this run starts anew.")
    refuse_overwrite([checkpoint, log_csv], overwrite,
                     f"Continue it with --resume {checkpoint}. ")


def run(settings, ckpt, out_dir, device, rank, world_size, stopper, log):
    """Build the data, model and optimizer (from the checkpoint on --resume),
    train, then plot and sample."""
    is_main = rank == 0
    tokenizer = run_tokenizer(settings, ckpt)
    train_set, val_set = load_corpus(settings, tokenizer, rank, log)
    loaders = make_loaders(train_set, val_set, settings, device, rank, world_size)
    if ckpt:  # before building anything: a finished run has nothing to resume
        refuse_finished(ckpt["step"], step_counts(loaders[0], settings)[1])
    global_batch = settings["batch_size"] * settings["grad_accum"] * world_size
    log(f"Training windows: {len(train_set)}, validation windows: {len(val_set)}; "
        f"{len(loaders[0]) // settings['grad_accum']} steps per epoch with {world_size} "
        f"process(es){' (FSDP)' if settings['fsdp'] else ''}; global batch {global_batch} "
        f"windows, {global_batch * settings['context_length']:,} tokens a step")
    log(describe_schedule(settings, step_counts(loaders[0], settings)[0]))

    plan = speed_plan(settings["fast"], settings["compile"], device)
    log(describe_speed(plan, settings["fast"], settings["compile"]))
    cfg = ({**ckpt["config"], "drop_rate": settings["drop_rate"]} if ckpt else
           {**model_config(settings), "vocab_size": tokenizer.n_vocab})
    torch.manual_seed(settings["seed"])
    model = GPTModel(cfg)
    model.to(device)
    if ckpt:
        load_weights(model, ckpt)
    if settings["fsdp"]:  # before the optimizer, which then holds each process's part
        shard_model(model, plan)
    optimizer = make_optimizer(model, settings["lr"], settings["weight_decay"],
                               plan["fused_adamw"], log)
    state = new_state()
    if ckpt:
        state = resume_into(model, optimizer, ckpt, settings, device)
        log(f"Resumed from {settings['resume']}: step {state['step']} is done, step "
            f"{state['step'] + 1} comes next (epoch {state['epoch'] + 1})")
    raw_model = model
    benchmark = None  # its data before training; under --fsdp every process scores
    if settings["eval_every"] and settings["fsdp"]:
        benchmark = rank0_first(lambda: training_benchmark(settings, tokenizer,
                                                           cfg["context_length"]), rank)
    elif settings["eval_every"] and is_main:
        benchmark = training_benchmark(settings, tokenizer, cfg["context_length"])
    model = speed_up(model, plan, device)
    if world_size > 1 and not settings["fsdp"]:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the only buffers are the constant causal masks

    log(run_header(model_name(settings, cfg), model, cfg,
                   f"{', '.join(map(str, settings['data'] or ['the-verdict.txt']))}, "
                   f"{len(train_set.token_ids) + len(val_set.token_ids):,} tokens", out_dir))
    start = time.perf_counter()
    try:
        state = train(model, cfg, loaders, optimizer, device, tokenizer, settings, state,
                      out_dir, stopper, is_main=is_main, benchmark=benchmark)
    except (Stopped, Diverged):
        if is_main:  # the curves so far, drawn from the history train() keeps in place
            plot_history(state["history"], settings, out_dir, log)
        raise
    seconds = time.perf_counter() - start
    history = state["history"]
    if is_main:
        log(f"Training took {seconds / 60:.2f} min; {state['tokens_seen']:,} tokens seen" +
            (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (a "
             "process's tensors)" if device.type == "cuda" else ""))
        plot_history(history, settings, out_dir, log)
        log(f"Saved {out_dir / 'checkpoint.pt'}")
    if is_main or settings["fsdp"]:  # under --fsdp every process takes part (rank 0 prints)
        # 5.3: the trained model with temperature scaling and top-k sampling
        raw_model.eval()
        torch.manual_seed(settings["seed"])
        token_ids = generate(raw_model, text_to_token_ids(settings["prompt"], tokenizer).to(device),
                             max_new_tokens=settings["max_new_tokens"] or 15,
                             context_size=cfg["context_length"], **sampling_of(settings))
        log(f"Sample ({describe_sampling(settings)}):", token_ids_to_text(token_ids, tokenizer))
    return {"model": raw_model, "history": history, "state": state, "seconds": seconds,
            "data": (train_set, val_set)}


# ---- Beyond the book: a hyperparameter search (--sweep, the chapter's bonus material) ----
# A grid file maps settings of this command to the values to try, e.g.
#   {"peak_lr": [0.0001, 0.0005], "batch_size": [4, 8], "drop_rate": [0.0, 0.1]}
# Every point of the grid (or --trials of them, drawn at random) is a normal
# run with those flags in its own folder, its seed fixed; a trial that finishes
# writes result.json, so a sweep run again after a kill skips finished trials and
# resumes the one it stopped in.

BONUS_NAMES = {"peak_lr": "lr", "warmup_iters": "warmup_steps", "n_epochs": "epochs"}
NOT_SWEPT = {"out", "resume", "overwrite", "sweep", "trials", "sweep_out", "generate", "from_file",
             "export_weights", "device", "data_dir", "eval_data_dir", "fsdp", "help"}


def sweep_actions(parser):
    """{setting: its argparse action} for every setting a grid may vary."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and a.dest not in NOT_SWEPT}


def read_grid(path, actions):
    """{setting: [values]} from a grid file, in the command's names (the bonus's
    names, and flags with dashes, are translated); each value is checked as its
    flag checks it, so a bad grid is refused before the first trial."""
    source = f"--sweep {path}"
    try:
        grid = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err.msg}, line {err.lineno}).") from None
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{source} must hold a JSON object of settings and the values to try, "
                         'e.g. {"peak_lr": [0.0001, 0.0005], "batch_size": [4, 8]}.')
    checked = {}
    for name, values in grid.items():
        key = BONUS_NAMES.get(name, name.lstrip("-").replace("-", "_"))
        if key not in actions:
            raise ValueError(f"{source}: {name!r} is not a setting a sweep can vary; these can: "
                             f"{', '.join(sorted([*BONUS_NAMES, *actions]))}.")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: {name!r} must map to a list of values to try, e.g. "
                             f'"{name}": [{json.dumps(actions[key].default)}].')
        checked[key] = [flag_value(actions[key], value, f"{source}: {name!r}") for value in values]
    return checked


def flag_value(action, value, where):
    """value, checked as the flag's own type and choices check it on the command line."""
    if action.nargs == 0:  # a switch (--fast): true or false
        if not isinstance(value, bool):
            raise ValueError(f"{where} is a switch: its values are true and false, not {value!r}.")
        return value
    try:
        for text in (value if isinstance(value, list) else [value]):
            converted = action.type(str(text)) if action.type else str(text)
            if action.choices and converted not in action.choices:
                raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise ValueError(f"{where}: {json.dumps(value)} is refused: {err}.") from None
    return value


def sweep_points(grid, trials, seed):
    """The grid's points in itertools.product's order, or `trials` of them drawn
    at random (seeded: the same draw each time the sweep is run)."""
    keys, sizes = list(grid), [len(v) for v in grid.values()]
    total = math.prod(sizes)
    chosen = (range(total) if not trials or trials >= total else
              random.Random(seed).sample(range(total), trials))
    points = []
    for index in chosen:
        point = {}
        for key, size in zip(reversed(keys), reversed(sizes)):  # the last key varies fastest
            index, i = divmod(index, size)
            point[key] = grid[key][i]
        points.append({k: point[k] for k in keys})
    return points, total


def trial_flags(point, actions):
    flags = []
    for key, value in point.items():
        option = max(actions[key].option_strings, key=len)
        if actions[key].nargs == 0:
            flags += [option] if value else []
        else:
            flags += [option, *map(str, value if isinstance(value, list) else [value])]
    return flags


def base_argv(argv):
    """The sweep command's own flags without the sweep's, for every trial."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--sweep", "--trials", "--sweep-out", "--out", "--resume"):
        own.add_argument(flag)
    own.add_argument("--overwrite", action="store_true")
    return own.parse_known_args(argv)[1]


def run_sweep(settings, argv, parser):
    """--sweep: every trial in turn, the results table rewritten as each ends."""
    actions = sweep_actions(parser)
    grid = read_grid(settings["sweep"], actions)
    points, total = sweep_points(grid, settings["trials"], settings["seed"])
    out, base = Path(settings["sweep_out"]), base_argv(argv)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, ("sweep.json", "results.csv", "sweep.png"), flag="--sweep-out"):
        plan = {"grid": grid, "points": points, "flags": base}
        claim_sweep_dir(out, plan, settings["overwrite"])
        print(f"Sweep: {len(points)} trial(s) of the grid's {total:,} points, each a run of "
              f"`ch05_train.py {shlex.join(base)}` with its flags, into {out}/trial-NNN")
        results = []
        for trial, point in enumerate(points, 1):
            folder = out / f"trial-{trial:03d}"
            result = None if settings["overwrite"] else read_result(folder)
            if result is None:
                print(f"\n== Trial {trial} of {len(points)}: {shlex.join(trial_flags(point, actions))}")
                result = run_trial(base + trial_flags(point, actions), folder,
                                   settings["overwrite"], trial, len(points))
                write_text_atomic(folder / "result.json", json.dumps({**result, "point": point}))
            else:
                print(f"Trial {trial}: finished before, validation loss {result['val_loss']:.3f}")
            results.append({**result, "trial": trial, "point": point})
            write_sweep_results(out, results, grid)
    print_sweep_table(results, grid)
    best = min(results, key=sort_key)
    if math.isnan(best["val_loss"]):
        raise ValueError(f"No trial of the sweep finished ({out / 'results.csv'} says why); "
                         f"trial 1: {results[0]['error']}")
    print(f"\nBest: trial {best['trial']}, validation loss {best['val_loss']:.3f}. Its run:\n  "
          f"python ch05_train.py {shlex.join(base + trial_flags(best['point'], actions))} "
          "--out runs/best")
    return {"results": sorted(results, key=sort_key), "best": best}


def claim_sweep_dir(out, plan, overwrite):
    """A --sweep-out holding another sweep (another grid, other flags) is refused
    unless --overwrite; the same sweep goes on."""
    saved = out / "sweep.json"
    if saved.exists() and not overwrite:
        try:
            same = json.loads(saved.read_text(encoding="utf-8")) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            raise ValueError(f"{out} holds another sweep (its grid or flags differ: {saved}). "
                             "Give another --sweep-out, or start over with --overwrite.")
    write_text_atomic(saved, json.dumps(plan, indent=1))


def read_result(folder):
    try:
        return json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not finished (or cut short while written): the trial runs (again)


def run_trial(flags, folder, overwrite, trial, count):
    """One trial, a normal run (resumed from its checkpoint when one was left):
    its last evaluation's losses, or the error that ended it."""
    checkpoint = folder / "checkpoint.pt"
    flags = flags + ["--out", str(folder)] + (["--overwrite"] if overwrite else [])
    if checkpoint.exists() and not overwrite:
        flags += ["--resume", str(checkpoint)]
        print(f"(resuming trial {trial} from {checkpoint})")
    start = time.perf_counter()
    try:
        args = parse_args(flags)
    except SystemExit:  # argparse has printed why (--n-heads that do not divide --emb-dim)
        return failed_trial(trial, "its flags were refused (the line above says why)", start)
    try:
        run = main(args)
    except RunFinished:  # killed between its last save and its result.json: its last evaluation
        last = [r for r in read_log(folder / "log.csv") if "val_loss" in r][-1]
        return {"val_loss": last["val_loss"], "train_loss": last["train_loss"],
                "seconds": time.perf_counter() - start}
    except Stopped as stop:
        raise Stopped(f"{stop}\nThe sweep stopped in trial {trial} of {count}: run the same "
                      "command again to go on from there.", stop.code) from None
    except (ValueError, Diverged) as err:  # these settings' own trouble: the others may run
        return failed_trial(trial, str(err), start)
    model = run["model"].eval()
    train_loss, val_loss = (final_loss(model, windows) for windows in run["data"])
    print(f"Trial {trial}: validation loss {val_loss:.3f}, training loss {train_loss:.3f} (the "
          f"trained model, on the first {SWEEP_WINDOWS} windows of each split)")
    return {"val_loss": val_loss, "train_loss": train_loss,
            "tokens_seen": run["state"]["tokens_seen"], "seconds": time.perf_counter() - start}


SWEEP_WINDOWS = 512  # each trial's losses are on the same windows, whatever its batch size


def final_loss(model, dataset):
    """The loss on a split's first SWEEP_WINDOWS windows, after training."""
    windows = torch.utils.data.Subset(dataset, range(min(len(dataset), SWEEP_WINDOWS)))
    with torch.no_grad():
        return calc_loss_loader(DataLoader(windows, batch_size=8), model,
                                next(model.parameters()).device)


def failed_trial(trial, error, start):
    print(f"Trial {trial} failed: {error}")
    return {"val_loss": math.nan, "train_loss": math.nan, "error": error,
            "seconds": time.perf_counter() - start}


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def sort_key(result):
    loss = result["val_loss"]
    return (math.isnan(loss), loss, result["trial"])  # failed trials last


def write_sweep_results(out, results, grid):
    """results.csv sorted by validation loss, and sweep.png: the loss against each setting."""
    columns = ["rank", "trial", "val_loss", "train_loss", *grid, "seconds", "error"]
    lines = io.StringIO()
    writer = csv.DictWriter(lines, columns, lineterminator="\n")
    writer.writeheader()
    for rank, result in enumerate(sorted(results, key=sort_key), 1):
        writer.writerow({"rank": rank, "trial": result["trial"], "val_loss": result["val_loss"],
                         "train_loss": result["train_loss"], **result["point"],
                         "seconds": round(result["seconds"], 1), "error": result.get("error", "")})
    write_text_atomic(out / "results.csv", lines.getvalue())
    plt = pyplot()
    fig, axes = plt.subplots(1, len(grid), figsize=(3.2 * len(grid), 3), squeeze=False,
                             sharey=True)
    done = [r for r in results if not math.isnan(r["val_loss"])]
    for ax, key in zip(axes[0], grid):
        labels = [json.dumps(v) for v in grid[key]]  # categories: numbers, names, lists alike
        ax.scatter([labels.index(json.dumps(r["point"][key])) for r in done],
                   [r["val_loss"] for r in done])
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(key)
    axes[0][0].set_ylabel("validation loss")
    fig.tight_layout()
    save_figure(fig, out / "sweep.png")


def print_sweep_table(results, grid):
    width = {k: max([len(k)] + [len(json.dumps(v)) for v in grid[k]]) for k in grid}
    print(f"\n{'rank':>4} {'trial':>5} {'val loss':>9} {'train loss':>10}  " +
          "  ".join(f"{k:<{width[k]}}" for k in grid))
    for rank, r in enumerate(sorted(results, key=sort_key), 1):
        print(f"{rank:>4} {r['trial']:>5} {r['val_loss']:>9.3f} {r['train_loss']:>10.3f}  " +
              "  ".join(f"{json.dumps(r['point'][k]):<{width[k]}}" for k in grid) +
              (f"  failed: {r['error'][:60]}" if r.get("error") else ""))


class FlagsTypedParser(argparse.ArgumentParser):
    """An ArgumentParser whose result also holds `given`: the flags the command
    line names, which win over a checkpoint's settings on --resume."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if namespace is None:  # parse once more with every default a marker: typed = not it
            unset = object()
            probe, _ = super().parse_known_args(
                args, argparse.Namespace(**{k: unset for k in vars(parsed)}))
            parsed.given = {k for k, v in vars(probe).items() if v is not unset}
        return parsed, extras


def run_header(model_name, model, cfg, data, out_dir):
    """One line at a run's start: the model, its size, the data and where results go
    (chapters 5 to 7; the device and the speed plan have their own lines)."""
    return (f"Model: {model_name}, {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"context {cfg['context_length']}; data: {data}; output: {out_dir}")


def plot_history(history, settings, out_dir, log):
    """loss-plot.png from the evaluations so far, and lr-schedule.png for cosine."""
    rows = [r for r in history["log"] if "train_loss" in r]  # --eval-every's rows may have none
    if rows:
        column = {"hellaswag": "hellaswag_acc_norm", "text": "text_ppl"}[benchmark_name(settings)]
        scored = [r for r in history["log"] if column in r]
        label = "HellaSwag acc_norm" if column.startswith("hellaswag") else "Text perplexity"
        plot_losses([r["epochs_seen"] for r in rows], [r["tokens_seen"] for r in rows],
                    [r["train_loss"] for r in rows], [r["val_loss"] for r in rows],
                    out_dir / "loss-plot.png",
                    score=scored and (label, [r["epochs_seen"] for r in scored],
                                      [r[column] for r in scored]))
        log(f"Saved {out_dir / 'loss-plot.png'}")
    if settings["schedule"] == "cosine" and history["lrs"]:
        plot_lrs(history["lrs"], out_dir / "lr-schedule.png")
        log(f"Saved {out_dir / 'lr-schedule.png'}")


def build_parser():
    parser = FlagsTypedParser(
        description="Pretrain a GPT model (the book's chapter 5 run by default: GPT-2 124M "
                    "with context 256 on the-verdict, 10 epochs). On --resume, every flag "
                    "not given again keeps the checkpoint's value.",
        formatter_class=HelpFormatter,
        epilog=('examples: python ch05_train.py --data my_texts/ --epochs 1 --out '
                'runs/mine;  python ch05_generate.py --from runs/mine/checkpoint.pt --prompt '
                '"Every effort moves you"'))
    positive = number(int, at_least=1)
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", default=None, metavar="PATH",
                      help="text file(s) and/or folder(s) of .txt files, or a corpus by name, "
                           "downloaded and tokenized into --data-dir once: " +
                           "; ".join(f"{k} ({v['about']})" for k, v in CORPORA.items()) +
                           "; default: the book's the-verdict.txt")
    data.add_argument("--data-dir", default="data", help="folder for downloaded data")
    data.add_argument("--data-tokens", type=number(token_amount, above=0), default=None,
                      metavar="N", help="with a named --data: the training tokens to prepare and "
                      "train on, e.g. 100M, 1B, 10B (default: " + ", ".join(
                          f"{k} {v['default_tokens']:,}" for k, v in CORPORA.items()) +
                      "); a larger N later extends what is there. Its validation part stays "
                      "the same whatever N")
    data.add_argument("--workers", type=positive, default=None,
                      help="processes that tokenize a named --data (default: the CPU count)")
    data.add_argument("--train-ratio", type=number(float, above=0, below=1), default=0.90,
                      help="share of the text used for training; the rest validates")
    data.add_argument("--memmap", action="store_true",
                      help="tokenize into a memory-mapped token file (automatic above "
                           "--memmap-above-mb); the file is reused until the text changes")
    data.add_argument("--memmap-above-mb", type=number(float, at_least=0), default=100.0,
                      help="corpus size above which the token file is used")
    model = parser.add_argument_group("model (on --resume, the checkpoint's)")
    model.add_argument("--model-size", default="124M", choices=list(MODEL_CONFIGS),
                       help="GPT-2 size; 'mini' (6 layers x 384: a model that learns on a "
                            "CPU) or 'tiny' (for tests)")
    model.add_argument("--n-layers", type=positive, default=None,
                       help="transformer blocks, instead of --model-size's")
    model.add_argument("--emb-dim", type=positive, default=None,
                       help="embedding size, instead of --model-size's (divisible by the "
                            "number of heads)")
    model.add_argument("--n-heads", type=positive, default=None,
                       help="attention heads, instead of --model-size's")
    model.add_argument("--model", dest="model_size", choices=list(MODEL_CONFIGS),
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the earlier name
    model.add_argument("--context-length", type=positive, default=256,
                       help="tokens per training window (GPT-2 itself uses 1024)")
    model.add_argument("--tokenizer", metavar="DIR", default=None,
                       help="a tokenizer of `ch02_data.py --train-bpe` (its encoder.json and "
                            "vocab.bpe), instead of GPT-2's; the model's vocabulary is its size, "
                            "and the checkpoint keeps it")
    model.add_argument("--drop-rate", type=number(float, at_least=0, below=1), default=0.1,
                       help="dropout rate")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=positive, default=10, help="passes over the training data")
    opt.add_argument("--max-steps", type=positive, default=None,
                     help="stop after this many optimizer steps in all; the schedule's "
                          "warm-up and decay span them (default: all steps of --epochs)")
    opt.add_argument("--batch-size", type=positive, default=2,
                     help="windows per micro-batch in each process (a step's global batch = "
                          "this x --grad-accum x processes)")
    opt.add_argument("--grad-accum", type=positive, default=1,
                     help="micro-batches whose gradients add up to one optimizer step")
    opt.add_argument("--lr", type=number(float, above=0), default=4e-4,
                     help="AdamW learning rate (the peak with --schedule cosine)")
    opt.add_argument("--weight-decay", type=number(float, at_least=0), default=0.1,
                     help="AdamW weight decay")
    opt.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                     help="constant (chapter 5) or warm-up + cosine decay (appendix D)")
    opt.add_argument("--warmup-steps", type=number(int, at_least=0), default=None,
                     help="linear warm-up steps for --schedule cosine (default: 20%% of the "
                          "run's steps)")
    opt.add_argument("--initial-lr", type=number(float, at_least=0), default=3e-5,
                     help="learning rate at the start of warm-up")
    opt.add_argument("--min-lr", type=number(float, at_least=0), default=1e-6,
                     help="learning rate at the end of the cosine decay")
    opt.add_argument("--grad-clip", type=number(float, at_least=0), default=None,
                     help="max gradient norm, applied after warm-up (default: 1.0 with "
                          "--schedule cosine, none with constant); 0 turns it off")
    run = parser.add_argument_group("evaluation, output and running")
    run.add_argument("--eval-freq", type=positive, default=None,
                     help="evaluate every N steps (default: 5, the book's; 200 on a "
                          "memory-mapped corpus, where evaluating costs under 2%% of training)")
    run.add_argument("--eval-iter", type=positive, default=5, help="batches per evaluation")
    run.add_argument("--eval-every", type=positive, default=None, metavar="N",
                     help="also score HellaSwag (as ch05_load_gpt2.py --eval does) every N "
                          "steps, from step 0, into log.csv and the loss plot; on rank 0")
    run.add_argument("--eval-text", default=None, metavar="FILE_OR_FOLDER",
                     help="with --eval-every: score this text's perplexity and bits per "
                          "byte instead of HellaSwag (a held-out part of your corpus)")
    run.add_argument("--eval-limit", type=positive, default=None, metavar="N",
                     help="with --eval-every: the first N HellaSwag items (--eval-text: "
                          "N context windows) for a cheaper score (default: all)")
    run.add_argument("--eval-data-dir", default=None, metavar="DIR",
                     help="with --eval-every: hellaswag_val.jsonl from this folder "
                          "(default: downloaded once into --data-dir/eval)")
    run.add_argument("--prompt", default="Every effort moves you",
                     help="start of the sample text printed after each epoch")
    run.add_argument("--out", default="runs/ch05",
                     help="folder for the checkpoint, log.csv, plots and token files "
                          "(on --resume: the checkpoint's folder)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in an --out that holds an earlier run (its checkpoint "
                          "stays until this run saves its own); replace --export-weights' file")
    run.add_argument("--save-every", type=number(int, at_least=0), default=1000,
                     help="save a checkpoint every N steps (also at the end and when "
                          "stopped by Ctrl-C, SIGTERM or SIGHUP); 0: only then")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue training from a checkpoint.pt, exactly where it stopped")
    add_device_argument(run)
    run.add_argument("--seed", type=int, default=123, help="random seed")
    gen = parser.add_argument_group("the sample after training, and the weights (generating "
                                    "from any model file: ch05_generate.py)")
    # ch05_generate.py's command, where it lived before: kept for one release
    gen.add_argument("--generate", metavar="PROMPT", default=None, help=argparse.SUPPRESS)
    gen.add_argument("--from", dest="from_file", metavar="FILE", default=None,
                     help="the model for --export-weights (default: --out's checkpoint.pt)")
    gen.add_argument("--export-weights", metavar="FILE", default=None,
                     help="save the weights of --from without the optimizer's state, a third "
                          "of the size, for --from, --init-from and --export-hf; then stop")
    add_sampling_arguments(gen, max_new_tokens=None, temperature=1.4, top_k=25,
                           max_new_help="tokens of the sample after training (default: 15, "
                                        "the book's)")
    speed = parser.add_argument_group("speed (beyond the book; same model, same parameters)")
    speed.add_argument("--fast", action="store_true",
                       help="PyTorch's fused attention (SDPA), LayerNorm, GELU and AdamW; on "
                            "CUDA also TF32 and bf16 autocast. Seeded runs then differ from "
                            "the book's numbers in the last digits")
    speed.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the weights, gradients and optimizer state "
                            "over the processes (PyTorch's FSDP2) instead of copying them to "
                            "each (DDP), for models too large for one GPU; checkpoints resume "
                            "with or without it")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the model (slow first steps, faster after; not on MPS)")
    sweep = parser.add_argument_group("a hyperparameter search (the chapter's bonus)")
    sweep.add_argument("--sweep", metavar="GRID.json", default=None,
                       help='try every point of a grid of settings, e.g. {"peak_lr": [1e-4, '
                            '5e-4], "batch_size": [4, 8]} (the bonus\'s names or this '
                            "command's), each a run with the other flags given here; results.csv "
                            "and sweep.png rank them by validation loss. Run again after a stop "
                            "to go on")
    sweep.add_argument("--trials", type=positive, default=None, metavar="N",
                       help="with --sweep: N points of the grid drawn at random (seeded by "
                            "--seed) instead of all")
    sweep.add_argument("--sweep-out", default="runs/sweep", metavar="DIR",
                       help="with --sweep: the folder of the trials (trial-NNN) and results")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a sweep's trials start from them
    base = MODEL_CONFIGS[args.model_size]
    emb_dim, n_heads = args.emb_dim or base["emb_dim"], args.n_heads or base["n_heads"]
    if (args.emb_dim or args.n_heads) and emb_dim % n_heads:
        parser.error(f"--n-heads {n_heads} does not divide the embedding size {emb_dim}: each "
                     f"head takes an equal share (try --n-heads "
                     f"{max(h for h in range(1, n_heads + 1) if emb_dim % h == 0)})")
    return args


def kept_when_stopped(settings):
    """What a run interrupted outside training (where it saves a checkpoint) kept."""
    if settings["generate"] is not None:
        return "--generate writes no files."
    if settings["export_weights"]:
        return f"{settings['export_weights']} is written whole or not at all."
    if settings["sweep"]:
        return ("The sweep keeps its finished trials and the last checkpoint of the one it "
                "stopped in: run the same command again to go on.")
    return ("Training had not begun, so nothing of this run was saved; an earlier run's files "
            "in --out are as they were.")


if __name__ == "__main__":
    run_command(main, parse_args(), kept_when_stopped, errors=(ValueError, OSError, Diverged))
