"""Chapter 6: Fine-tuning for classification (and appendix E's LoRA).

Defines the book's `download_and_unzip_spam_data`, `create_balanced_dataset`,
`random_split`, `SpamDataset`, `calc_accuracy_loader`, `calc_loss_batch`,
`calc_loss_loader`, `evaluate_model`, `train_classifier_simple`, `plot_values`
and `classify_review`; appendix E's `LoRALayer`, `LinearWithLoRA` and
`replace_linear_with_lora`. Beyond the book: the finetuned classifier is saved
and used again with --classify (and --classify-file, in batches); data of your
own (a .csv, .tsv or .jsonl of texts and labels, any number of classes), the
token that feeds the head (--token), per-class accuracy and a confusion matrix,
a page and a JSON API for the classifier (--serve, on the HTTP server that
chapter 7's chat server builds on), and the command, its settings resolved
once from its flags (chapter 7 shares its finetuning flags,
`finetuning_settings` and `base_model`).

Run:  python ch06_classify.py                       (finetune GPT-2 124M, as the book)
      python ch06_classify.py --lora --rank 16 --alpha 16
      python ch06_classify.py --classify "You won a prize, reply now"
      python ch06_classify.py --data reviews.csv --out runs/reviews
      python ch06_classify.py --serve          (a page and an API at http://127.0.0.1:8000/)
      torchrun --nproc_per_node=4 ch06_classify.py --fsdp --model-size 1558M  (several GPUs)
Imports from ch02_data.py, ch03_attention.py (plots), ch04_gpt.py, ch05_generate.py
(model files), ch05_train.py (training) and ch05_load_gpt2.py (GPT-2's weights).
"""
import argparse
import concurrent.futures
import contextlib
import csv
import functools
import hmac
import http.server
import io
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import ch05_train
from ch02_data import (HelpFormatter, atomic_path, bpe_tokenizer, check_output_file,
                       download_file, is_blank, number, read_text, run_command, utf8_error,
                       write_text_atomic)
from ch03_attention import pyplot, save_figure
from ch04_gpt import GPTModel, add_device_argument, get_device, gpt_config
from ch05_load_gpt2 import ALLOWED_SIZES, load_gpt2_model
from ch05_generate import build_lean, load_checkpoint, load_text_model, model_file, save_checkpoint
from ch05_train import make_optimizer, refuse_overwrite, run_lock, speed_up_finetuning

SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SPAM_BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"
LABELS = {"ham": 0, "spam": 1}


# ---- 6.2 Preparing the dataset ----

def download_and_unzip_spam_data(url, zip_path, extracted_path, data_file_path,
                                 backup_urls=(SPAM_BACKUP_URL,), reuse_extracted=True,
                                 named=False):
    data_file_path = Path(data_file_path)
    if reuse_extracted and data_file_path.exists():  # beyond the book: a named zip is used
        print(f"{data_file_path} already exists. Skipping download and extraction.")
        return data_file_path
    download_file(url, zip_path, backup_urls=backup_urls)  # reuses an existing zip
    try:  # beyond the book: a damaged zip, or one without the data, is named
        with zipfile.ZipFile(zip_path, "r") as zip_ref:
            names = zip_ref.namelist()
            if "SMSSpamCollection" not in names:
                raise ValueError(f"{zip_path} holds no SMSSpamCollection file (it holds "
                                 f"{', '.join(names[:5]) or 'nothing'}); give the UCI SMS Spam "
                                 "Collection zip.")
            zip_ref.extractall(extracted_path)
    except zipfile.BadZipFile as err:  # a file the user named is theirs: never advise deleting it
        fix = ("give the UCI SMS Spam Collection zip with --data" if named else
               "delete it to download it again, or name another with --data")
        raise ValueError(f"{zip_path} is not a whole zip file ({err}): {fix}.") from None
    # Add a .tsv extension: the file is tab-separated
    (Path(extracted_path) / "SMSSpamCollection").replace(data_file_path)
    print(f"Extracted {zip_path} to {data_file_path}")
    return data_file_path


def read_spam_data(data_file_path):
    """[(label, text)] from the tab-separated file; an error names any bad line.

    Parsed quote-aware, as the book's pandas.read_csv does (one quoted message
    spans three lines), so the data and the splits are the book's.
    """
    rows = []
    with open(data_file_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{data_file_path}, line {reader.line_num}: expected "
                                     f"'label<TAB>text', found {len(row) - 1} tabs.")
                if row[0] not in LABELS:
                    raise ValueError(f"{data_file_path}, line {reader.line_num}: label "
                                     f"{row[0]!r} is neither 'ham' nor 'spam'.")
                rows.append((row[0], row[1]))
        except UnicodeDecodeError as err:  # beyond the book: the file and line are named
            raise utf8_error(data_file_path, err) from None
    return rows


def create_balanced_dataset(rows):
    """All spam messages and as many ham ones, sampled as pandas' sample(random_state=123).
    Beyond the book: any labels, each class cut to the rarest one's count, in
    class order (ham, then spam: the book's rows, in the book's order)."""
    by_class = {c: [r for r in rows if r[0] == c] for c in class_names(r[0] for r in rows)}
    fewest = min(len(members) for members in by_class.values())
    balanced = []
    for members in by_class.values():
        if len(members) > fewest:
            chosen = np.random.RandomState(123).choice(len(members), size=fewest, replace=False)
            members = [members[i] for i in chosen]
        balanced += members
    return balanced


def random_split(rows, train_frac, validation_frac):
    """Shuffle (seed 123), then cut into train, validation and test parts."""
    order = np.random.RandomState(123).choice(len(rows), size=len(rows), replace=False)
    shuffled = [rows[i] for i in order]
    train_end = int(len(rows) * train_frac)
    validation_end = train_end + int(len(rows) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def stratified_split(rows, train_frac, validation_frac):
    """Beyond the book: random_split's sizes, with each class's rows (shuffled, seed
    123) spread evenly over the order before it is cut, so that every split holds
    the classes in the proportions of the whole, give or take one row."""
    spread = []
    for name in class_names(r[0] for r in rows):
        members = random_split([r for r in rows if r[0] == name], 1.0, 0.0)[0]
        spread += [((k + 0.5) / len(members), row) for k, row in enumerate(members)]
    ordered = [row for _, row in sorted(spread, key=lambda item: item[0])]
    train_end = int(len(rows) * train_frac)
    validation_end = train_end + int(len(rows) * validation_frac)
    return ordered[:train_end], ordered[train_end:validation_end], ordered[validation_end:]


def write_csv(rows, path):
    """Label (0 ham, 1 spam) and Text columns."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Label", "Text"])
        writer.writerows((LABELS[label], text) for label, text in rows)


# ---- 6.3 Creating data loaders ----

class SpamDataset(Dataset):
    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=50256):
        if isinstance(csv_file, list):  # beyond the book: [(class id, text)] of your own data
            self.data = csv_file
        else:
            with open(csv_file, encoding="utf-8", newline="") as f:
                self.data = [(int(row["Label"]), row["Text"]) for row in csv.DictReader(f)]
        # disallowed_special=(): a literal "<|endoftext|>" in a message is just text
        self.encoded_texts = [tokenizer.encode(text, disallowed_special=())
                              for _, text in self.data]
        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            self.max_length = max_length
            self.encoded_texts = [t[:self.max_length] for t in self.encoded_texts]
        # Pad every text to the same length with the end-of-text token
        self.encoded_texts = [t + [pad_token_id] * (self.max_length - len(t))
                              for t in self.encoded_texts]

    def __getitem__(self, index):
        return (torch.tensor(self.encoded_texts[index], dtype=torch.long),
                torch.tensor(self.data[index][0], dtype=torch.long))

    def __len__(self):
        return len(self.data)

    def _longest_encoded_length(self):
        return max(len(t) for t in self.encoded_texts)


# ---- 6.5 Adding a classification head (and choosing what trains) ----

def prepare_classifier(model, cfg, trainable="last_block", lora_rank=None, lora_alpha=None,
                       num_classes=2, say=lambda *args: None, seed=123):
    """Put a new classification head on `model`, then choose what trains: the
    head plus `trainable` (6.5; beyond the book, last_two_blocks), or, with
    lora_rank, LoRA matrices only (appendix E)."""
    torch.manual_seed(seed)
    model.out_head = nn.Linear(cfg["emb_dim"], num_classes)
    if lora_rank:
        return freeze_and_add_lora(model, lora_rank, lora_alpha, say)
    for param in model.parameters():
        param.requires_grad = trainable == "all"
    unfreeze = [*model.out_head.parameters()]
    if trainable in ("last_block", "last_two_blocks"):
        blocks = model.trf_blocks[-1 if trainable == "last_block" else -2:]
        unfreeze += [*blocks.parameters(), *model.final_norm.parameters()]
    for param in unfreeze:
        param.requires_grad = True
    return model


# ---- 6.6 Calculating the classification loss and accuracy ----

def calc_accuracy_loader(data_loader, model, device, num_batches=None, token="last"):
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            # the last token has seen the whole text (beyond the book: --token)
            logits = select_logits(model(input_batch), input_batch, token)
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    return correct_predictions / num_examples


def calc_loss_batch(input_batch, target_batch, model, device, token="last"):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    # logits of the last output token (beyond the book: or of the one --token names)
    logits = select_logits(model(input_batch), input_batch, token)
    return torch.nn.functional.cross_entropy(logits, target_batch)


def calc_loss_loader(data_loader, model, device, num_batches=None, token="last"):
    # chapter 5's loop, with this chapter's calc_loss_batch
    return ch05_train.calc_loss_loader(data_loader, model, device, num_batches,
                                       functools.partial(calc_loss_batch, token=token))


# ---- 6.7 Fine-tuning the model on supervised data ----

def evaluate_model(model, train_loader, val_loader, device, eval_iter, token="last"):
    return ch05_train.evaluate_model(model, train_loader, val_loader, device, eval_iter,
                                     functools.partial(calc_loss_batch, token=token))


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                            eval_freq, eval_iter, token="last", shares=None):
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    # Beyond the book: under torchrun each process trains on its share of every
    # batch (`shares`, BatchShares) and evaluates the whole model on whole batches
    module, processes = ch05_train._unwrap(model), ch05_train.world_size()
    for epoch in range(num_epochs):
        model.train()
        # Beyond the book: a progress bar (the log lines go through tqdm.write)
        for input_batch, target_batch in tqdm(shares or train_loader, desc=f"Epoch {epoch + 1}",
                                              leave=False, dynamic_ncols=True):
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device, token)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0] * processes  # examples, not tokens
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    module, train_loader, val_loader, device, eval_iter, token)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                tqdm.write(f"Ep {epoch + 1} (Step {global_step:06d}): "
                           f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        train_accuracy = calc_accuracy_loader(train_loader, module, device, eval_iter, token)
        val_accuracy = calc_accuracy_loader(val_loader, module, device, eval_iter, token)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | "
              f"Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def plot_values(epochs_seen, examples_seen, train_values, val_values, label="loss",
                path=None):
    fig, ax1 = pyplot().subplots(figsize=(5, 3))
    # Beyond the book: a few points get markers (one alone draws no line), both
    # x-axes start at the run's start, and small changes show as values, not offsets
    marker = "o" if len(train_values) <= 20 else None
    ax1.plot(epochs_seen, train_values, marker=marker, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", marker=marker,
             label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.ticklabel_format(axis="y", useOffset=False)
    ax1.legend()
    ax2 = ax1.twiny()  # examples seen, on a second x-axis
    ax2.plot(examples_seen, train_values, alpha=0)
    ax2.set_xlabel("Examples seen")
    for ax, right in ((ax1, max(epochs_seen)), (ax2, max(examples_seen))):
        ax.set_xlim(0, float(right) * 1.05 or 1)
    fig.tight_layout()
    save_figure(fig, path or f"{label}-plot.png")


# ---- 6.8 Using the LLM as a spam classifier ----

def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=50256,
                    token="last"):
    """('spam' or 'not spam', the probability of that label)."""
    model.eval()
    input_ids = tokenizer.encode(text, disallowed_special=())
    supported_context_length = model.pos_emb.weight.shape[0]
    max_length = min(max_length or supported_context_length, supported_context_length)
    if len(input_ids) > max_length:
        warnings.warn(f"The text has {len(input_ids)} tokens; only its first {max_length} "
                      "are classified.")
    input_ids = input_ids[:max_length]
    input_ids += [pad_token_id] * (max_length - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # add batch dimension
    with torch.no_grad():
        logits = select_logits(model(input_tensor), input_tensor, token)
    probas = torch.softmax(logits, dim=-1)[0]
    predicted_label = torch.argmax(probas).item()
    return ("spam" if predicted_label == 1 else "not spam"), probas[predicted_label].item()


# ---- Appendix E: parameter-efficient fine-tuning with LoRA ----

class LoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises weights
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # zeros: no change at the start
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def freeze_and_add_lora(model, rank, alpha, say=lambda *args: None):
    """Freeze every weight, then give each nn.Linear trainable LoRA matrices; `say`
    gets the book's three trainable-parameter counts."""
    say(f"Total trainable parameters before: {count_trainable(model):,}")
    for param in model.parameters():
        param.requires_grad = False
    say(f"Total trainable parameters after: {count_trainable(model):,}")
    replace_linear_with_lora(model, rank=rank, alpha=alpha)
    say(f"Total trainable LoRA parameters: {count_trainable(model):,}")
    return model


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- Beyond the book: which token feeds the head, and data of your own ----

TOKENS = ("last", "first", "mean")


def select_logits(logits, input_batch, token="last", pad_token_id=50256):
    """(batch, classes) from the model's (batch, positions, classes): the last
    position's (the book's), the first one's, or the mean over the real tokens
    (padding left out). The head is linear, so the mean of its outputs is its
    output for the mean of the hidden states."""
    if token == "last":
        return logits[:, -1, :]
    if token == "first":
        return logits[:, 0, :]
    real = (input_batch != pad_token_id).unsqueeze(-1).to(logits.dtype)
    return (logits * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


OWN_FORMATS = (".csv", ".tsv", ".jsonl")


def class_names(labels):
    """The distinct labels in order: by value when all are whole numbers, else
    alphabetically (ham before spam)."""
    distinct = set(labels)
    whole = all(re.fullmatch(r"-?\d+", label) for label in distinct)
    return sorted(distinct, key=int if whole else None)


def read_labeled_file(path, text_column="text", label_column="label"):
    """[(label, text, where)] of a .csv, .tsv or .jsonl file ("where": file and
    line, for errors); a missing column, an empty text or label is named."""
    path = Path(path)
    if path.suffix.lower() not in OWN_FORMATS:
        raise ValueError(f"{path}: give a .csv, .tsv or .jsonl file of texts and labels (or the "
                         "SMS Spam Collection's .zip).")
    rows = []
    for line, text, label in records_of(path, text_column, label_column):
        if not isinstance(label, (str, int)) or isinstance(label, bool) or is_blank(str(label)):
            raise ValueError(f"{path}, line {line}: the label {label!r} is no class name; labels "
                             "are strings or whole numbers.")
        rows.append((str(label).strip(), text, f"{path}, line {line}"))
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    return rows


def records_of(path, text_column, label_column=None):
    """(line, text, label) of each row of a .csv, .tsv or .jsonl file (label None
    without label_column); an empty text is named."""
    read = jsonl_records if path.suffix.lower() == ".jsonl" else table_records
    for line, text, label in read(path, read_text(path), text_column, label_column):
        if not isinstance(text, str) or is_blank(text):
            raise ValueError(f"{path}, line {line}: the text is empty; remove the row or give "
                             "it a text.")
        yield line, text, label


def table_records(path, content, text_column, label_column):
    """The rows of a .csv, quoted as CSV is (a field with commas, quotes or line
    breaks in double quotes, its quotes doubled), or of a .tsv, which is never
    quoted: a tab ends a field, a line ends a row, a quote is part of the text."""
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    spanning, start = [], 1
    try:
        table_columns(path, reader, text_column, label_column)
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if reader.line_num > start and any("\n" in v for v in row.values()
                                                if isinstance(v, str)):
                spanning.append((start, reader.line_num))
            if any(isinstance(v, str) and v.strip() for v in row.values()):  # not blank
                yield start, row[text_column], row.get(label_column)
    except csv.Error as err:
        raise ValueError(f"{path}, line {start}: a quoted field does not end where it should "
                         f"({err}). A text that starts with a double quote must be quoted "
                         'whole, its inner quotes doubled ("""Hi"" she said"), or save the file '
                         "as .tsv.") from None
    if spanning:
        warnings.warn(f"{path}: texts that span several lines: {len(spanning)}, the first from "
                      f"line {spanning[0][0]} to {spanning[0][1]}; if that is not what the file "
                      "means, a text there starts with a double quote without being quoted "
                      "whole.")


def table_columns(path, reader, text_column, label_column):
    """The header's column names, the chosen ones checked: there, and there once."""
    columns = reader.fieldnames or []  # reads the header line
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is not None and column not in columns:
            raise ValueError(f"{path} has no column {column!r} (its columns: "
                             f"{', '.join(map(repr, columns)) or 'none'}); name yours with "
                             f"{flag}.")
        if column is not None and columns.count(column) > 1:
            raise ValueError(f"{path} has {columns.count(column)} columns named {column!r} "
                             f"(its columns: {', '.join(map(repr, columns))}): rename all but "
                             f"one, or name another with {flag}.")
    return columns


def jsonl_records(path, content, text_column, label_column):
    for line, record in enumerate(content.splitlines(), start=1):
        if is_blank(record):
            continue
        try:
            record = json.loads(record)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line}: not a JSON object ({err.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line}: not a JSON object.")
        for key, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if key is not None and key not in record:
                raise ValueError(f"{path}, line {line} has no key {key!r} (its keys: "
                                 f"{', '.join(map(repr, record)) or 'none'}); name yours with "
                                 f"{flag}.")
        yield line, record[text_column], record.get(label_column)


def own_data(settings):
    """(train, validation, test) rows and the class names, from --data (split
    70/10/20 as the book splits the spam data) or --train, --val and --test;
    every check is made before anything is written."""
    given = [settings["train"], settings["val"], settings["test"]]
    if any(given) and (not all(given) or settings["data"]):
        raise ValueError("--train, --val and --test go together, without --data: name all "
                         "three files (or one --data file, which is split 70/10/20).")
    columns = settings["text_column"], settings["label_column"]
    read = lambda path: read_labeled_file(path, *columns)  # noqa: E731
    balance = settings["balance"] and create_balanced_dataset
    if settings["data"]:
        rows = read(settings["data"])
        split = random_split if settings["stratify"] is False else stratified_split
        parts = split(balance(rows) if balance else rows, 0.7, 0.1)
    else:
        parts = [balance(read(p)) if balance else read(p) for p in given]
    classes = class_names(r[0] for r in parts[0])
    if len(classes) < 2:
        raise ValueError(f"The training split holds {len(classes)} class "
                         f"({', '.join(classes)}); a classifier needs at least 2.")
    for part, name in zip(parts[1:], ("validation", "test")):
        if not part:
            raise ValueError(f"The {name} split is empty: give more rows (a {name} split of "
                             f"one file is {'10' if name == 'validation' else '20'}% of it).")
        stray = next((r for r in part if r[0] not in classes), None)
        if stray:
            raise ValueError(f"{stray[2]}: the label {stray[0]!r} ({name} split) is not one of "
                             f"the training split's classes ({', '.join(classes)}); give the "
                             "training data examples of it, or remove it.")
    if len(parts[0]) < settings["batch_size"]:
        raise ValueError(f"The training split has {len(parts[0])} texts, fewer than one batch "
                         f"of {settings['batch_size']}: give more data, or a smaller --batch-size.")
    return parts, classes


def as_examples(rows, classes):
    """[(class id, text)], what SpamDataset takes in place of its CSV file."""
    return [(classes.index(r[0]), r[1]) for r in rows]


# ---- Beyond the book: per-class accuracy, and classifying many texts ----

def confusion_matrix(data_loader, model, device, num_classes, token="last"):
    """counts[true class][predicted class] over a loader."""
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long)
    model.eval()
    for input_batch, target_batch in data_loader:
        input_batch = input_batch.to(device)
        with torch.no_grad():
            predicted = select_logits(model(input_batch), input_batch, token).argmax(-1).cpu()
        counts += torch.bincount(target_batch * num_classes + predicted,
                                 minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def class_accuracies(counts, classes):
    """{class: the share of its texts predicted right} (None for a class with none)."""
    return {c: counts[i, i].item() / counts[i].sum().item() if counts[i].sum() else None
            for i, c in enumerate(classes)}


def confusion_table(counts, classes):
    """The matrix as text: a row per true class, a column per predicted one,
    and each class's accuracy (the share of its texts predicted right). Past
    CELL_NUMBERS_UP_TO classes, a row per class with its accuracy only."""
    many = len(classes) > CELL_NUMBERS_UP_TO
    corner = "class" if many else "true \\ predicted"
    first, width = max(len(corner), *(len(c) for c in classes)) + 2, max(6, *map(len, classes)) + 2
    columns = [] if many else classes
    lines = [f"{corner:<{first}}" + "".join(f"{c:>{width}}" for c in columns) +
             ("     texts" if many else "") + "  accuracy"]
    for i, (name, accuracy) in enumerate(class_accuracies(counts, classes).items()):
        accuracy = "-" if accuracy is None else f"{accuracy * 100:.2f}%"
        cells = [counts[i].sum()] if many else counts[i]
        lines.append(f"{name:<{first}}" + "".join(f"{int(n):>{width if not many else 10}}"
                                                  for n in cells) + f"{accuracy:>10}")
    return "\n".join(lines)


# Above these many classes a heatmap's cells get no numbers, its axes no class names
# (confusion.json holds them all), and past the last the heatmap is left out: its
# cells would be thinner than a pixel.
CELL_NUMBERS_UP_TO, CLASS_NAMES_UP_TO, HEATMAP_UP_TO = 30, 60, 2000


def plot_confusion_matrix(counts, classes, path):
    """The test split's confusion matrix as a heatmap; False (and one line saying
    so) where there are too many classes to draw it."""
    n = len(classes)
    if n > HEATMAP_UP_TO:
        print(f"No confusion-matrix plot: {n} classes are more than a heatmap can show "
              f"({HEATMAP_UP_TO} at most); confusion.json holds the matrix.")
        return False
    side = min(1.6 + 0.6 * n, 40)  # inches; at most 4,800 pixels a side
    fig, ax = pyplot().subplots(figsize=(side + 0.4, side))
    counts = counts.numpy()
    ax.imshow(counts, cmap="Blues")
    if n <= CLASS_NAMES_UP_TO:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    if n <= CELL_NUMBERS_UP_TO:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_title("Test split" + ("" if n <= CELL_NUMBERS_UP_TO else
                                 f" ({n} classes; the counts are in confusion.json)"))
    fig.tight_layout()
    save_figure(fig, path)
    return True


def classify_batch(ids, model, device, max_length, token="last", top=1, pad_token_id=50256):
    """[(class id, probability)] of the `top` likeliest classes for each text's
    token ids, cut or padded to max_length as classify_review does."""
    batch = torch.tensor([t[:max_length] + [pad_token_id] * (max_length - len(t[:max_length]))
                          for t in ids], device=device)
    with torch.no_grad():
        probas = torch.softmax(select_logits(model(batch), batch, token).float(), dim=-1)
    values, indices = probas.topk(min(top, probas.shape[-1]), dim=-1)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]


# ---- Beyond the book: building, saving and loading the classifier ----

def save_classifier(path, model, cfg, settings):
    save_checkpoint(path, model_file("classifier", model.state_dict(), cfg, settings,
                                     what="a classifier finetuned by ch06_classify.py"))


def load_classifier(path, device="cpu"):
    """(model, settings) saved by save_classifier; no GPT-2 download needed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No trained classifier at {path}. Train one first, e.g. "
            f"`python ch06_classify.py --out {path.parent}` (or --no-pretrained on a machine "
            "without the GPT-2 weights), then run --classify again with the same --out.")
    saved = load_checkpoint(path, map_location="cpu", mmap=True, kinds=("classifier",),
                            wanted="a classifier finetuned by ch06_classify.py",
                            hint=f"Train a classifier with `python ch06_classify.py --out "
                                 f"{path.parent}`, or name another --out.",
                            earlier=lambda s: "classifier" if "trainable" in s["settings"]
                            else None)  # earlier classifiers: a "trainable" setting
    settings, cfg = saved["settings"], saved["config"]
    settings = {"classes": list(LABELS), "token": "last", **settings}  # earlier files: spam
    model = build_lean(lambda: prepare_classifier(
        GPTModel(cfg), cfg, settings["trainable"], settings["lora_rank"],
        settings["lora_alpha"], num_classes=len(settings["classes"])), saved["model"],
        source=str(path))
    return model.to(device).eval(), settings


def texts_of_file(path, text_column="text"):
    """The texts of --classify-file: the non-empty lines of a text file, or the
    text column of a .csv, .tsv or .jsonl file; an error names the file."""
    path = Path(path)
    if path.suffix.lower() in OWN_FORMATS:
        texts = [text for _, text, _ in records_of(path, text_column)]
    else:
        texts = [line for line in read_text(path).splitlines() if not is_blank(line)]
    if not texts:
        raise ValueError(f"--classify-file {path} has no text to classify (every line is empty "
                         "or invisible characters only).")
    return texts


def classify_texts(texts, path, device, batch_size=8, out_csv=None):
    """[(label, probability)] for each text, by the classifier saved at `path`, in
    batches; printed, or with out_csv written there (text, label, probability,
    and the top 3 when there are more than 3 classes)."""
    model, settings = load_classifier(path, device)
    tokenizer = bpe_tokenizer(settings["models_dir"])
    classes, max_length = settings["classes"], settings["max_length"]
    ids = [tokenizer.encode(text, disallowed_special=()) for text in texts]
    cut = sum(len(t) > max_length for t in ids)
    if cut:
        warnings.warn(f"{cut} of the {len(texts)} texts have more than {max_length} tokens; "
                      f"only their first {max_length} are classified.")
    top = 3 if len(classes) > 3 else 1
    ranked = []
    for i in tqdm(range(0, len(ids), batch_size), desc="Classifying", leave=False,
                  disable=len(ids) <= batch_size, dynamic_ncols=True):
        ranked += classify_batch(ids[i:i + batch_size], model, device, max_length,
                                 settings["token"], top)
    named = [[(classes[c], p) for c, p in choices] for choices in ranked]
    width = max(len(c) for c in classes)
    def also(choices):
        return "  (top 3: " + ", ".join(f"{c} {p:.1%}" for c, p in choices) + ")" if top > 1 \
            else ""
    if out_csv:
        with atomic_path(out_csv) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "probability"] + (["top3"] if top > 1 else []))
            for text, choices in zip(texts, named):
                writer.writerow([text, choices[0][0], f"{choices[0][1]:.4f}"] +
                                (["; ".join(f"{c} {p:.4f}" for c, p in choices)] if top > 1
                                 else []))
        counts = {c: sum(choices[0][0] == c for choices in named) for c in classes}
        print(f"Classified {len(texts)} texts into {out_csv}: "
              + ", ".join(f"{c} {n}" for c, n in counts.items()))
    else:
        for text, choices in zip(texts, named):
            print(f"{choices[0][0]:>{width}}  {choices[0][1]:6.1%}  {text}{also(choices)}")
    return [choices[0] for choices in named]


# ---- Beyond the book: serving over HTTP (--serve): a page and a JSON API ----
# Standard library only (http.server); chapter 7's chat server is built on the
# same pieces. Errors are answered in OpenAI's shape, request bodies are at most
# 1 MB, an API key is needed to listen beyond this machine, and one thread runs
# the model, taking requests in order of arrival.

MAX_BODY = 1 << 20  # 1 MB: a request body beyond it gets 413
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error",
                 headers=()):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = dict(headers)

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


class ModelWorker:
    """The one thread that runs the model: jobs in order of arrival, at most
    max_queue waiting (more get 503 with Retry-After). A subclass says how a job
    runs (work), how a waiting one is turned away (refuse), and which request
    handler and page serve it (handler, page)."""
    handler = page = None

    def __init__(self, max_queue=16):
        self.jobs = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.thread.start()

    def submit(self, job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"The server is busy ({self.jobs.maxsize} requests wait "
                                "already); try again in a moment.", code="overloaded",
                           kind="server_error", headers={"Retry-After": "1"}) from None

    def close(self):
        """Stop taking jobs: the one that runs ends as usual, those waiting get 503."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.refuse(job, ApiError(503, "The server is stopping.", kind="server_error"))
        self.jobs.put(None)
        self.thread.join()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            self.work(job)


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """The routes of routes(): GET / is the page, the others need the API key when
    one is set; anything else is 404, naming them."""
    protocol_version = "HTTP/1.1"
    served = settings = None  # set on the subclass make_server builds

    def routes(self):
        return {("GET", "/"): self.page}

    def log_message(self, format, *args):  # one quiet line a request, on stderr
        if self.settings.get("verbose"):
            super().log_message(format, *args)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_OPTIONS(self):
        if not self.settings["cors_origin"]:
            return self.send_error_json(ApiError(404, "No such route.", code="not_found"))
        self.send_response(204)
        self.cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route(self, method):
        with self.settings["active"]:
            self.answer(method)

    def answer(self, method):
        path = self.path.split("?")[0]
        routes = self.routes()
        try:
            handler = routes.get((method, path))
            if handler is None:
                names = [f"{m} {p}" for m, p in routes]
                raise ApiError(404, f"No route {method} {path}: this server has "
                                    f"{', '.join(names[:-1])} and {names[-1]}.", code="not_found")
            if path != "/":  # the page holds no data; the API needs the key, if one is set
                self.check_key()
            handler()
        except ApiError as err:
            self.send_error_json(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # a bug of ours: one line in the log, a 500 for the client
            self.log_error("%s: %s", type(err).__name__, err)
            self.close_connection = True
            self.send_error_json(ApiError(500, f"Internal error ({type(err).__name__}).",
                                          kind="server_error"))

    def check_key(self):
        key = self.settings["api_key"]
        if not key:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "A valid API key is needed: send it as 'Authorization: Bearer "
                                "KEY'.", code="invalid_api_key")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # where its body ends is unknown
            raise ApiError(411, "The request needs a Content-Length.")
        if int(length) > MAX_BODY:
            self.close_connection = True  # its body is not read
            raise ApiError(413, f"The request body has {int(length):,} bytes; the most is "
                                f"{MAX_BODY:,}.", code="request_too_large")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
        return body

    def page(self):
        self.send_bytes(200, self.settings["page"], "text/html; charset=utf-8")

    def cors_headers(self):
        origin = self.settings["cors_origin"]
        if origin and self.headers.get("Origin") == origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def send_json(self, status, data, headers=()):
        self.send_bytes(status, json.dumps(data).encode(), "application/json", headers)

    def send_error_json(self, err):
        self.send_json(err.status, err.body(), err.headers)

    def send_bytes(self, status, data, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in dict(headers).items():
            self.send_header(name, value)
        self.cors_headers()
        self.end_headers()
        self.wfile.write(data)


class ActiveRequests:
    """A count of the requests being answered: a stopping server waits for it to reach 0."""

    def __init__(self):
        self.count, self.zero = 0, threading.Condition()

    def __enter__(self):
        with self.zero:
            self.count += 1

    def __exit__(self, *exc):
        with self.zero:
            self.count -= 1
            self.zero.notify_all()

    def wait(self, timeout):
        with self.zero:
            return self.zero.wait_for(lambda: self.count == 0, timeout)


def make_server(served, settings):
    """The HTTP server (not yet serving) of `served` (its handler and page), on
    --host and --port (0: any free port). A port in use is one line."""
    host = settings["host"]
    if host not in LOOPBACK and not settings["api_key"]:
        raise ValueError(f"--host {host} lets other machines in: give --api-key KEY (or set "
                         "$API_KEY), which every request must then carry.")
    try:
        page = served.page.read_bytes()
    except OSError:
        raise ValueError(f"The page {served.page.name} is missing beside the scripts in "
                         f"{served.page.parent}: copy it there with them.") from None
    handler = type("Handler", (served.handler,), {"served": served, "settings": {
        **settings, "page": page, "active": ActiveRequests()}})
    try:
        server = http.server.ThreadingHTTPServer((host, settings["port"]), handler)
    except OSError as err:
        raise OSError(f"Cannot serve on {host}:{settings['port']} ({err.strerror}): "
                      "give another --port (or --host).") from None
    return server


def start_serving(served, settings):
    """make_server, serving from a thread of its own: (server, its URL, the thread)."""
    server = make_server(served, settings)
    host, port = server.server_address[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, url, thread


def stop_serving(server, served, timeout=30):
    """No new connections; the job being run ends as usual, those waiting get
    503, and the answers under way are sent (for at most `timeout` seconds)."""
    server.shutdown()
    served.close()
    server.RequestHandlerClass.settings["active"].wait(timeout)
    server.server_close()


def serve_until_stopped(served, settings, banner):
    """Serve until Ctrl-C or SIGTERM, which stop taking requests and end the
    answers under way; banner(url) is the line that says where. Returns the URL."""
    server, url, thread = start_serving(served, settings)
    print(banner(url) + (" (with the API key)" if settings["api_key"] else "") +
          ". Ctrl-C stops.", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)  # signals arrive in this thread
    except KeyboardInterrupt as err:
        name = signal.Signals(getattr(err, "signum", signal.SIGINT)).name
        print(f"\nStopping ({name}): no new requests; the answers under way end first.",
              flush=True)
    stop_serving(server, served)
    print("Stopped.")
    return url


def add_server_arguments(group, api_key_help):
    """The flags of --serve in chapters 6 and 7 (each adds its own --serve)."""
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; other than this machine's needs --api-key")
    group.add_argument("--port", type=number(int, at_least=0, at_most=65535), default=8000,
                       help="port to listen on (0: any free port)")
    group.add_argument("--api-key", metavar="KEY", default=None, help=api_key_help)
    group.add_argument("--max-queue", type=number(int, at_least=1), default=16,
                       help="requests that may wait for the model; more get 503")
    group.add_argument("--cors-origin", metavar="ORIGIN", default=None,
                       help="a web page's origin allowed to call the API from a browser, e.g. "
                            "http://localhost:3000 (default: none)")
    group.add_argument("--verbose", action="store_true", help="log every request on stderr")


# The classifier's page, and POST /v1/classify: {"text": "..."} or {"text": [...]}

CLASSIFY_PAGE = Path(__file__).with_name("ch06_classify.html")
MAX_TEXTS = 256  # texts in one request


class ClassifyHandler(ApiHandler):
    """GET / (the page), GET /v1/models and POST /v1/classify."""

    def routes(self):
        return {("GET", "/"): self.page, ("GET", "/v1/models"): self.models,
                ("POST", "/v1/classify"): self.classify}

    def models(self):
        served = self.served
        self.send_json(200, {"object": "list", "data": [{
            "id": served.name, "object": "model", "created": 0, "owned_by": "ch06_classify.py",
            "classes": served.classes, "max_length": served.max_length}]})

    def classify(self):
        texts = request_texts(self.read_body())
        job = ([self.served.tokenizer.encode(t, disallowed_special=()) for t in texts],
               concurrent.futures.Future())
        self.served.submit(job)
        self.send_json(200, {"object": "list", "model": self.served.name,
                             "data": job[1].result()})


def request_texts(body):
    """The texts of a request: "text", a string or a list of 1 to MAX_TEXTS strings."""
    text = body.get("text")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or len(texts) > MAX_TEXTS or not all(
            isinstance(t, str) for t in texts):
        raise ApiError(400, f"'text' must be a string, or a list of 1 to {MAX_TEXTS} strings.",
                       param="text", code="invalid_value")
    blank = [i for i, t in enumerate(texts) if is_blank(t)]
    if blank:
        raise ApiError(400, f"Text {blank[0]} is empty (or invisible characters only).",
                       param="text", code="invalid_value")
    return texts


class ServedClassifier(ModelWorker):
    """A classifier of load_classifier, run by the model thread: each job is a
    request's token ids and the Future its answer goes into."""
    handler, page = ClassifyHandler, CLASSIFY_PAGE

    def __init__(self, model, settings, tokenizer, device, name, max_queue=16):
        self.model, self.tokenizer, self.device, self.name = model, tokenizer, device, name
        self.classes, self.max_length = settings["classes"], settings["max_length"]
        self.token = settings["token"]
        super().__init__(max_queue)

    def work(self, job):
        ids, answer = job
        try:
            ranked = [choices for i in range(0, len(ids), 8) for choices in classify_batch(
                ids[i:i + 8], self.model, self.device, self.max_length, self.token,
                top=len(self.classes))]
            answer.set_result([{
                "label": self.classes[choices[0][0]], "probability": choices[0][1],
                "probabilities": {self.classes[c]: p for c, p in choices},
                "tokens": len(text_ids), "truncated": len(text_ids) > self.max_length}
                for text_ids, choices in zip(ids, ranked)])
        except Exception as err:  # a failed job is its request's error, not the server's
            answer.set_exception(ApiError(500, f"Classifying failed: {err}",
                                          kind="server_error"))

    def refuse(self, job, err):
        job[1].set_exception(err)


def serve_classifier(settings):
    """--serve: the page and POST /v1/classify for the classifier in --out."""
    device = get_device(settings["device"])
    path = Path(settings["out"]) / "classifier.pth"
    model, saved = load_classifier(path, device)
    served = ServedClassifier(model, saved, bpe_tokenizer(saved["models_dir"]), device,
                              f"{path.parent.name}-classifier", settings["max_queue"])
    url = serve_until_stopped(served, settings, lambda url: (
        f"Serving the classifier {path} ({', '.join(served.classes[:8])}"
        f"{', ...' if len(served.classes) > 8 else ''}) at {url}/ : the page there, "
        f"POST {url}/v1/classify"))
    return {"url": url, "name": served.name}


# ---- The chapter's run ----

def main(args):
    settings = finetuning_settings(args)
    settings["api_key"] = settings["api_key"] or os.environ.get("API_KEY") or None  # --serve's
    return run(settings)


def finetuning_settings(args):
    """The command's settings, resolved once from its flags (chapters 6 and 7):
    below main, functions take these values, never the flags."""
    return dict(vars(args))


def run(settings):
    """The command: classify with the saved classifier, or finetune one (under
    torchrun, on several processes)."""
    classifier_path = Path(settings["out"]) / "classifier.pth"
    if ch05_train.launched_processes() > 1 and (settings["classify"] or settings["classify_file"]
                                                or settings["serve"]):
        raise ValueError("Under torchrun, ch06_classify.py finetunes; run --classify and --serve "
                         "as one process (python ch06_classify.py ...).")
    if settings["serve"]:
        if settings["classify"] or settings["classify_file"]:
            raise ValueError("--serve and --classify are different tasks: give one.")
        return serve_classifier(settings)
    if settings["classify"] or settings["classify_file"]:
        device = get_device(settings["device"])
        texts = list(settings["classify"] or [])
        if any(is_blank(text) for text in texts):
            raise ValueError("--classify got an empty text (or one of invisible characters "
                             "only): give each message in quotes.")
        if settings["classify_file"]:
            texts += texts_of_file(Path(settings["classify_file"]), settings["text_column"])
        if settings["classify_out"]:
            check_output_file(settings["classify_out"], settings["overwrite"], "--classify-out")
        return {"classified": classify_texts(texts, classifier_path, device,
                                             settings["batch_size"], settings["classify_out"])}
    if settings["classify_out"]:
        raise ValueError("--classify-out writes what --classify-file classifies: give both.")

    # Data of your own is read and checked whole before anything is written
    own = settings["train"] or (settings["data"] and not is_spam_zip(settings["data"]))
    data = own_data(settings) if own else None
    rank, _, device = processes(settings, "ch06_classify.py")
    out_dir = Path(settings["out"])
    with run_lock(out_dir, RESULTS) if rank == 0 else contextlib.nullcontext():
        earlier = ch05_train.agree(lambda: refuse_overwrite(
            [classifier_path, out_dir / "accuracy.json", out_dir / "confusion.json"],
            settings["overwrite"], "Use it with --classify, or keep it and train into another "
            "--out. ", also=[out_dir / name for name in PLOTS]), rank)
        try:
            result = finetune(settings, classifier_path, device, data, rank)
            ch05_train.wait_for_all()
        finally:
            ch05_train.end_processes()
        if rank == 0:
            earlier.retire()  # what this run did not write again: a plot it had no points for
        return result


def processes(settings, script):
    """(rank, processes, device): one process, or torchrun's several (finetuning
    only; chapters 6 and 7), the others quiet; --fsdp needs several, and no LoRA."""
    if os.environ.get("RANK", "0") != "0":
        ch05_train.quiet_process()
    rank, world_size, device = ch05_train.setup_distributed(settings["device"], log=print)
    if settings["fsdp"] and world_size == 1:
        raise ValueError("--fsdp shards the model over several processes: launch them with "
                         f"torchrun, e.g. torchrun --nproc_per_node=4 {script} --fsdp ...")
    if settings["fsdp"] and settings["lora"]:
        raise ValueError("--fsdp with --lora is not supported: LoRA's small matrices train "
                         "well with DDP (torchrun without --fsdp).")
    return rank, world_size, device


PLOTS = ("loss-plot.png", "accuracy-plot.png", "confusion-matrix.png")
# What a run writes in --out (a killed run's temporary files of these are removed)
RESULTS = ("classifier.pth", "accuracy.json", "confusion.json", "*.png")


def is_spam_zip(path):
    return Path(path).suffix.lower() == ".zip"


def finetune(settings, classifier_path, device, data=None, rank=0):
    """The chapter's run: the data (the book's spam data, or `data`: own_data's
    splits and classes), the model with its new head, training, the accuracies
    (overall and per class), and the classifier saved. Under torchrun, the first
    process (`rank` 0) prepares the data and writes every file."""
    start = time.perf_counter()
    splits, classes = ch05_train.agree(lambda: classification_splits(settings, data),  # 6.2
                                       rank)
    tokenizer = bpe_tokenizer(settings["models_dir"])
    # 6.4 Initializing a model with pretrained weights
    model, cfg = base_model(settings, "expect far lower accuracy than the book's finetuned GPT-2")
    loaders = classification_loaders(splits, tokenizer, cfg, settings)  # 6.3
    sizes = " / ".join(str(len(loader.dataset)) for loader in loaders.values())
    print(ch05_train.run_header(base_model_name(settings), model, cfg,
                                f"{sizes} {'messages' if data is None else 'texts'}",
                                settings["out"]))
    model, tracking = train_classifier(model, cfg, loaders, len(classes), device, settings)
    model = whole_classifier(model, cfg, len(classes), device)
    if rank != 0:  # the first process evaluates and writes
        return {"model": model, "train_losses": tracking["train_losses"]}
    result = save_classifier_results(model, cfg, loaders, classes, tracking, classifier_path,
                                     device, settings)
    result["seconds"] = time.perf_counter() - start
    report(result["accuracies"], result["seconds"], classifier_path, result["confusion"], classes)
    if data is None:  # the book's two messages
        max_length = loaders["train"].dataset.max_length
        print("\nThe book's two messages (its classify_review calls ham \"not spam\"):")
        for text in BOOK_EXAMPLES:
            label, probability = classify_review(text, model, tokenizer, device, max_length,
                                                 token=settings["token"])
            print(f"{'ham' if label == 'not spam' else label:>4}  {probability:6.1%}  {text}")
    return {**result, "model": model, "train_losses": tracking["train_losses"],
            "train_accs": tracking["train_accs"]}


def classification_splits(settings, data):
    """(the three splits, the class names): the book's spam CSV files, or own_data's rows."""
    if data is None:
        data_dir = prepare_spam_data(settings)
        return [data_dir / f"{name}.csv" for name in ("train", "validation", "test")], list(LABELS)
    parts, classes = data
    print("Train / validation / test:", " / ".join(str(len(p)) for p in parts))
    print(f"{len(classes)} classes: {', '.join(classes)}")
    return [as_examples(part, classes) for part in parts], classes


def classification_loaders(splits, tokenizer, cfg, settings):
    """{"train", "validation", "test"}: 6.3's data loaders, every text cut or padded
    to the longest training text (or --max-length), at most the model's context."""
    context_length, wanted = cfg["context_length"], settings["max_length"]
    if wanted and wanted > context_length:
        raise ValueError(f"--max-length {wanted} is longer than the model's context of "
                         f"{context_length} tokens; give at most {context_length}.")
    train_dataset = SpamDataset(splits[0], tokenizer, max_length=wanted)
    if train_dataset.max_length > context_length:
        warnings.warn(f"The longest training text has {train_dataset.max_length} tokens; "
                      f"texts are truncated to the model's context of {context_length}.")
        train_dataset = SpamDataset(splits[0], tokenizer, max_length=context_length)
    max_length = train_dataset.max_length
    val_dataset = SpamDataset(splits[1], tokenizer, max_length=max_length)
    test_dataset = SpamDataset(splits[2], tokenizer, max_length=max_length)
    print("Longest training text (tokens):" if wanted is None else
          "Texts cut or padded to (tokens):", max_length)
    torch.manual_seed(settings["seed"])
    batch_size = settings["batch_size"]
    loaders = {"train": DataLoader(train_dataset, batch_size=batch_size, shuffle=True,
                                   drop_last=True),
               "validation": DataLoader(val_dataset, batch_size=batch_size),
               "test": DataLoader(test_dataset, batch_size=batch_size)}
    print(f"{len(loaders['train'])} training batches, {len(loaders['validation'])} validation "
          f"batches, {len(loaders['test'])} test batches")
    return loaders


def train_classifier(model, cfg, loaders, num_classes, device, settings):
    """6.5 to 6.7: the new head (and what trains), the accuracies before, the
    training (under torchrun, each process a share of every batch, the model
    copied (DDP) or sharded (--fsdp)); returns the model and what
    train_classifier_simple tracked."""
    model = prepare_classifier(model, cfg, settings["trainable"],
                               settings["rank"] if settings["lora"] else None, settings["alpha"],
                               num_classes=num_classes, say=print, seed=settings["seed"])
    model.to(device)
    plan = speed_up_finetuning(model, settings["fast"], device)
    if settings["fsdp"]:
        ch05_train.shard_model(model, plan)
    print(f"Trainable parameters: {count_trainable(model):,}")
    torch.manual_seed(settings["seed"])  # the book seeds before the first accuracies
    for name, loader in zip(("Training", "Validation", "Test"), loaders.values()):
        print(f"{name} accuracy before finetuning: "
              f"{calc_accuracy_loader(loader, model, device, 10, settings['token']) * 100:.2f}%")
    if ch05_train.is_sharded(model):  # the optimizer must see the sharded parameters
        model.reshard()
    torch.manual_seed(settings["seed"])
    optimizer = make_optimizer(model, settings["lr"], settings["weight_decay"],
                               plan["fused_adamw"])
    model, shares = share_training(model, loaders["train"], settings, device)
    tracked = train_classifier_simple(
        model, loaders["train"], loaders["validation"], optimizer, device,
        num_epochs=settings["epochs"], eval_freq=settings["eval_freq"],
        eval_iter=settings["eval_iter"], token=settings["token"], shares=shares)
    keys = ("train_losses", "val_losses", "train_accs", "val_accs", "examples_seen")
    return ch05_train._unwrap(model), dict(zip(keys, tracked))


def share_training(model, train_loader, settings, device):
    """(model, shares): under torchrun, the model copied to each process (DDP) or
    as it is when sharded (--fsdp), and this process's shares of the training
    loader's batches (BatchShares); in one process, the model and None."""
    processes = ch05_train.world_size()
    if processes == 1:
        return model, None
    shares = DataLoader(train_loader.dataset, collate_fn=train_loader.collate_fn,
                        batch_sampler=ch05_train.BatchShares(
                            len(train_loader.dataset), settings["batch_size"],
                            ch05_train.process_rank(), processes))
    if not settings["fsdp"]:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, shares


def whole_classifier(model, cfg, num_classes, device):
    """The trained model whole on the first process: a sharded one gathered into a
    model of its own on `device` (every process takes part; the others get None)."""
    if not ch05_train.is_sharded(model):
        return model
    state = ch05_train.whole_model_state(model)
    if ch05_train.process_rank() != 0:
        return None
    whole = GPTModel(cfg)
    whole.out_head = nn.Linear(cfg["emb_dim"], num_classes)
    whole.load_state_dict(state)
    return whole.to(device)


def save_classifier_results(model, cfg, loaders, classes, tracking, classifier_path, device,
                            settings):
    """The accuracies (the test split's from its confusion matrix), then the
    classifier and the JSON files, then the plots: a plot that fails or is
    interrupted costs no model."""
    out_dir, token = Path(settings["out"]), settings["token"]
    accuracies = {name: calc_accuracy_loader(loader, model, device, token=token)
                  for name, loader in loaders.items() if name != "test"}
    counts = confusion_matrix(loaders["test"], model, device, len(classes), token)
    accuracies["test"] = counts.trace().item() / counts.sum().item()  # one pass over the test set
    saved = {"model_size": settings["model_size"],
             "max_length": loaders["train"].dataset.max_length,
             "trainable": settings["trainable"],
             "lora_rank": settings["rank"] if settings["lora"] else None,
             "lora_alpha": settings["alpha"], "pretrained": not settings["no_pretrained"],
             "models_dir": str(settings["models_dir"]), "init_from": settings["init_from"],
             "classes": classes, "token": token}
    save_classifier(classifier_path, model, cfg, saved)
    write_text_atomic(out_dir / "accuracy.json", json.dumps(accuracies, indent=2))
    per_class = class_accuracies(counts, classes)
    write_text_atomic(out_dir / "confusion.json", json.dumps(
        {"split": "test", "classes": classes, "counts": counts.tolist(),
         "accuracy": per_class}, indent=2))
    epochs, seen = settings["epochs"], tracking["examples_seen"]
    for label, key in (("loss", "losses"), ("accuracy", "accs")):
        train_values, val_values = tracking[f"train_{key}"], tracking[f"val_{key}"]
        if train_values:
            plot_values(torch.linspace(0, epochs, len(train_values)),
                        torch.linspace(0, seen, len(train_values)), train_values, val_values,
                        label, out_dir / f"{label}-plot.png")
    plot_confusion_matrix(counts, classes, out_dir / "confusion-matrix.png")
    return {"accuracies": accuracies, "confusion": counts, "classes": classes,
            "per_class": per_class}


def prepare_spam_data(settings):
    """The book's balanced train/validation/test CSV files in --data-dir, from
    the downloaded (or the --data) zip; returns that folder."""
    data_dir = Path(settings["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    if settings["data"] and not Path(settings["data"]).is_file():
        raise FileNotFoundError(f"--data {settings['data']}: no such file.")
    data_file = download_and_unzip_spam_data(
        SPAM_URL, settings["data"] or data_dir / "sms_spam_collection.zip",
        data_dir / "sms_spam_collection", data_dir / "SMSSpamCollection.tsv",
        reuse_extracted=not settings["data"], named=bool(settings["data"]))
    rows = read_spam_data(data_file)
    counts = {label: sum(r[0] == label for r in rows) for label in LABELS}
    if min(counts.values()) < 10:  # fewer leave a split empty
        raise ValueError(f"{data_file} has {counts['ham']} ham and {counts['spam']} spam "
                         "messages; the balanced splits need at least 10 of each (the book's "
                         "file has 4,825 and 747).")
    balanced = rows if settings["balance"] is False else create_balanced_dataset(rows)
    print(f"Messages: {len(rows)}; {'balanced' if balanced is not rows else 'kept'}: "
          f"{len(balanced)} ({sum(r[0] == 'spam' for r in balanced)} spam)")
    parts = random_split(balanced, 0.7, 0.1)
    for part, name in zip(parts, ("train", "validation", "test")):
        write_csv(part, data_dir / f"{name}.csv")
    print("Train / validation / test:", " / ".join(str(len(p)) for p in parts))
    return data_dir


def base_model(settings, without_weights):
    """(model, cfg): GPT-2 of --model-size with OpenAI's weights, the model of
    --init-from (a model you pretrained with ch05_train.py, say), or with
    --no-pretrained the same architecture from random weights (chapters 6, 7)."""
    if settings["init_from"]:
        model, cfg, what, _ = load_text_model(settings["init_from"], "cpu", flag="--init-from")
        print(f"Starting from {settings['init_from']} ({what}): "
              f"{cfg['n_layers']} layers, embedding size {cfg['emb_dim']}, context "
              f"{cfg['context_length']}; --model-size is not used.")
        return model, cfg
    if not settings["no_pretrained"]:
        return load_gpt2_model(settings["model_size"], settings["models_dir"])
    print(f"Note: --no-pretrained, so the model starts from random weights; {without_weights}.")
    cfg = gpt_config(settings["model_size"], context_length=1024, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(settings["seed"])
    return GPTModel(cfg), cfg


def base_model_name(settings):
    """What base_model() starts from, in the run's header."""
    if settings["init_from"]:
        return settings["init_from"]
    random = " (random weights)" if settings["no_pretrained"] else ""
    return f"GPT-2 {settings['model_size']}{random}"


BOOK_EXAMPLES = ("You are a winner you have been specially selected to receive $1000 cash "
                 "or a $2000 award.",
                 "Hey, just wanted to check if we're still on for dinner tonight? Let me know!")


def report(accuracies, seconds, classifier_path, counts, classes):
    """The final accuracies, overall and per class of the test split."""
    print(f"\n{'split':<12}{'accuracy':>10}")
    for name, acc in accuracies.items():
        print(f"{name:<12}{acc * 100:>9.2f}%")
    print("\nTest split, per class:\n" + confusion_table(counts, classes))
    print(f"Run time: {seconds / 60:.2f} min. Saved {classifier_path}, accuracy.json, "
          f"confusion.json, and the loss, accuracy and confusion-matrix plots in "
          f"{classifier_path.parent}.")


def add_finetuning_arguments(parser, model_size, epochs, batch_size, eval_freq,
                             batch_unit, overwrite_help):
    """The flags that chapter 6 and chapter 7 share, with each chapter's defaults."""
    parser.add_argument("--models-dir", default="gpt2", help="folder for GPT-2's weights")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="start from random weights instead of GPT-2's (no download)")
    parser.add_argument("--init-from", metavar="FILE", default=None,
                        help="start from this model instead of OpenAI's GPT-2: a checkpoint.pt "
                             "of ch05_train.py (your own pretrained model), a converted "
                             "gpt2/SIZE/model.pth, or a model of ch07_instruct.py; its config "
                             "comes from the file")
    parser.add_argument("--lora", action="store_true",
                        help="freeze the model and train LoRA matrices only (appendix E)")
    positive = number(int, at_least=1)
    parser.add_argument("--rank", type=positive, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=number(float, above=0), default=16,
                        help="LoRA scaling factor")
    parser.add_argument("--epochs", type=positive, default=epochs,
                        help="passes over the training data")
    parser.add_argument("--batch-size", type=positive, default=batch_size,
                        help=f"{batch_unit} per batch")
    parser.add_argument("--lr", type=number(float, above=0), default=5e-5,
                        help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=number(float, at_least=0), default=0.1,
                        help="AdamW weight decay")
    parser.add_argument("--eval-freq", type=positive, default=eval_freq,
                        help="evaluate every N steps")
    parser.add_argument("--eval-iter", type=positive, default=5, help="batches per evaluation")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=123,
                        help="random seed of the new weights, the batch order and dropout (the "
                             "data splits keep the book's)")
    parser.add_argument("--model-size", default=model_size,
                        choices=[*ALLOWED_SIZES, "tiny"],
                        help="GPT-2 size ('tiny' only with --no-pretrained)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the model over the processes (FSDP2) "
                             "instead of copying it to each (DDP); not with --lora")
    parser.add_argument("--fast", action="store_true",
                        help="as in ch05_train.py: fused kernels (SDPA attention, LayerNorm, "
                             "GELU, QKV, AdamW) and on CUDA TF32 and bf16 autocast; the same "
                             "model and saved weights, results that differ in the last digits")


def parse_finetuning_args(parser, argv=None):
    """The arguments of chapter 6's or 7's command (the parser of either)."""
    args = parser.parse_args(argv)
    uses_saved_model = any(getattr(args, flag, None) for flag in
                           ("classify", "classify_file", "chat", "evaluate", "dpo"))
    if args.model_size == "tiny" and not args.no_pretrained and not uses_saved_model:
        parser.error("--model-size tiny exists only with --no-pretrained (OpenAI has no "
                     "tiny GPT-2)")
    return args


def build_parser():
    parser = argparse.ArgumentParser(
        description="Finetune GPT-2 as a classifier: of SMS spam, as the book's chapter 6 "
                    "(with appendix E's LoRA), or of your own texts and labels; or classify "
                    "texts with the saved classifier.",
        formatter_class=HelpFormatter,
        epilog=('examples: python ch06_classify.py --lora --rank 16 --alpha 16;  python '
                'ch06_classify.py --classify "You won a prize, reply now";  python '
                'ch06_classify.py --data reviews.csv --text-column review --label-column '
                'sentiment --out runs/reviews'))
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="FILE",
                      help="the SMS Spam Collection's .zip (default: download it), or a .csv, "
                           ".tsv or .jsonl file of your own texts and labels, split 70/10/20 "
                           "(seed 123) as the book splits the spam data")
    data.add_argument("--train", metavar="FILE", default=None,
                      help="with --val and --test: your own data, already split in three "
                           "files (.csv, .tsv or .jsonl)")
    data.add_argument("--val", metavar="FILE", default=None, help="the validation file")
    data.add_argument("--test", metavar="FILE", default=None, help="the test file")
    data.add_argument("--text-column", default="text",
                      help="the column (for JSONL: the key) that holds the texts; also read "
                           "by --classify-file from a .csv, .tsv or .jsonl")
    data.add_argument("--label-column", default="label",
                      help="the column (key) of the labels: any strings or whole numbers; the "
                           "classes are the training split's distinct labels, in order")
    data.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                      help="undersample every class to the rarest one's count, as the book "
                           "does (default: on for the spam data, off for yours)")
    data.add_argument("--stratify", action=argparse.BooleanOptionalAction, default=None,
                      help="split your --data 70/10/20 within each class, so that every split "
                           "holds each class in the same proportion (default: on; the spam "
                           "data keeps the book's split)")
    data.add_argument("--data-dir", default="data/spam",
                      help="folder for the spam data file and its train/validation/test.csv")
    parser.add_argument("--trainable", choices=["head", "last_block", "last_two_blocks", "all"],
                        default="last_block",
                        help="what is trained besides the new head: last_block also trains "
                             "the last transformer block and the final LayerNorm, "
                             "last_two_blocks the last two blocks and the final LayerNorm")
    parser.add_argument("--token", choices=TOKENS, default="last",
                        help="whose output feeds the head: the last position's (the book's), "
                             "the first one's, or the mean over the text's real tokens "
                             "(padding left out)")
    parser.add_argument("--max-length", type=number(int, at_least=1), default=None,
                        help="texts are cut or padded to N tokens (default: the longest "
                             "training text, as the book; at most the model's context)")
    add_finetuning_arguments(parser, model_size="124M", epochs=5, batch_size=8, eval_freq=50,
                             batch_unit="messages",
                             overwrite_help="replace the classifier and accuracies an earlier "
                                            "run saved in --out")
    parser.add_argument("--out", default="runs/ch06",
                        help="folder for classifier.pth, plots and accuracy.json")
    parser.add_argument("--classify", nargs="+", metavar="TEXT", default=None,
                        help="classify these texts with the saved classifier, then stop")
    parser.add_argument("--classify-file", metavar="FILE", default=None,
                        help="classify each non-empty line of FILE (or the --text-column of a "
                             ".csv, .tsv or .jsonl) with the saved classifier, --batch-size "
                             "texts at a time")
    parser.add_argument("--classify-out", metavar="CSV", default=None,
                        help="write --classify-file's results to this CSV (text, label, "
                             "probability; the top 3 with more than 3 classes) instead of "
                             "printing them; replaced only with --overwrite")
    srv = parser.add_argument_group("serving (beyond the book: the chapter's bonus page)")
    srv.add_argument("--serve", action="store_true",
                     help="serve the classifier in --out at http://HOST:PORT/: a page to try "
                          "texts on, and POST /v1/classify with {\"text\": ...} (or a list), "
                          "until Ctrl-C")
    add_server_arguments(srv, "the key every API request must send as 'Authorization: Bearer "
                              "KEY' (default: $API_KEY; none on this machine's address); never "
                              "printed or saved")
    return parser


def kept_when_stopped(settings):
    """What an interrupted run of this command kept, in its words."""
    if settings["serve"]:
        return "Serving writes no files."
    if settings["classify"] or settings["classify_file"]:
        return ("Nothing was written: --classify-out is written whole or not at all."
                if settings["classify_out"] else "Nothing is written by --classify.")
    return ("The classifier is written when training ends, so nothing of this run was saved; "
            "an earlier run's results in --out are as they were, and downloads so far are "
            "kept.")


def parse_args(argv=None):
    return parse_finetuning_args(build_parser(), argv)


if __name__ == "__main__":
    run_command(main, parse_args(), kept_when_stopped)
