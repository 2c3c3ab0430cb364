"""Chapter 6: Fine-tuning for classification (and appendix E's LoRA).

Defines the book's `download_and_unzip_spam_data`, `create_balanced_dataset`,
`random_split`, `SpamDataset`, `calc_accuracy_loader`, `calc_loss_batch`,
`calc_loss_loader`, `evaluate_model`, `train_classifier_simple`, `plot_values`
and `classify_review`; appendix E's `LoRALayer`, `LinearWithLoRA` and
`replace_linear_with_lora`. Beyond the book: the finetuned classifier is saved
and used again with --classify.

Run:  python ch06_classify.py                       (finetune GPT-2 124M, as the book)
      python ch06_classify.py --lora --rank 16 --alpha 16
      python ch06_classify.py --classify "You won a prize, reply now"
Imports from ch02_data.py, ch03_attention.py (plots), ch04_gpt.py, ch05_train.py and
ch05_load_gpt2.py.
"""
import argparse
import csv
import json
import math
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import ch05_train
from ch02_data import (DownloadError, HelpFormatter, atomic_path, download_file, interrupted,
                       is_blank, number, plain_warnings, read_text, refuse_overwrite, run_lock,
                       utf8_error, write_text_atomic)
from ch03_attention import pyplot, save_figure
from ch04_gpt import GPTModel, add_device_argument, get_device, gpt_config
from ch05_load_gpt2 import ALLOWED_SIZES, get_gpt2_tokenizer, load_gpt2_model
from ch05_train import (build_lean, load_checkpoint, load_text_model, make_optimizer, model_file,
                        save_checkpoint, speed_up_finetuning)

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
    """All spam messages and as many ham ones, sampled as pandas' sample(random_state=123)."""
    spam = [r for r in rows if r[0] == "spam"]
    ham = [r for r in rows if r[0] == "ham"]
    chosen = np.random.RandomState(123).choice(len(ham), size=len(spam), replace=False)
    return [ham[i] for i in chosen] + spam


def random_split(rows, train_frac, validation_frac):
    """Shuffle (seed 123), then cut into train, validation and test parts."""
    order = np.random.RandomState(123).choice(len(rows), size=len(rows), replace=False)
    shuffled = [rows[i] for i in order]
    train_end = int(len(rows) * train_frac)
    validation_end = train_end + int(len(rows) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def write_csv(rows, path):
    """Label (0 ham, 1 spam) and Text columns."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Label", "Text"])
        writer.writerows((LABELS[label], text) for label, text in rows)


# ---- 6.3 Creating data loaders ----

class SpamDataset(Dataset):
    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=50256):
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
    head plus `trainable` (6.5), or, with lora_rank, LoRA matrices only (appendix E)."""
    torch.manual_seed(seed)
    model.out_head = nn.Linear(cfg["emb_dim"], num_classes)
    if lora_rank:
        return freeze_and_add_lora(model, lora_rank, lora_alpha, say)
    for param in model.parameters():
        param.requires_grad = trainable == "all"
    unfreeze = [*model.out_head.parameters()]
    if trainable == "last_block":
        unfreeze += [*model.trf_blocks[-1].parameters(), *model.final_norm.parameters()]
    for param in unfreeze:
        param.requires_grad = True
    return model


# ---- 6.6 Calculating the classification loss and accuracy ----

def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            logits = model(input_batch)[:, -1, :]  # the last token has seen the whole text
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    return correct_predictions / num_examples


def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)[:, -1, :]  # logits of the last output token
    return torch.nn.functional.cross_entropy(logits, target_batch)


def calc_loss_loader(data_loader, model, device, num_batches=None):
    # chapter 5's loop, with this chapter's calc_loss_batch
    return ch05_train.calc_loss_loader(data_loader, model, device, num_batches, calc_loss_batch)


# ---- 6.7 Fine-tuning the model on supervised data ----

def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    return ch05_train.evaluate_model(model, train_loader, val_loader, device, eval_iter,
                                     calc_loss_batch)


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                            eval_freq, eval_iter):
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        # Beyond the book: a progress bar (the log lines go through tqdm.write)
        for input_batch, target_batch in tqdm(train_loader, desc=f"Epoch {epoch + 1}",
                                              leave=False, dynamic_ncols=True):
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]  # examples, not tokens
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(
                    model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                tqdm.write(f"Ep {epoch + 1} (Step {global_step:06d}): "
                           f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | "
              f"Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def plot_values(epochs_seen, examples_seen, train_values, val_values, label="loss",
                path=None):
    fig, ax1 = pyplot().subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # examples seen, on a second x-axis
    ax2.plot(examples_seen, train_values, alpha=0)
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    save_figure(fig, path or f"{label}-plot.png")


# ---- 6.8 Using the LLM as a spam classifier ----

def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=50256):
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
        logits = model(input_tensor)[:, -1, :]
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


# ---- Beyond the book: building, saving and loading the classifier ----

def save_classifier(path, model, cfg, settings):
    save_checkpoint(path, model_file("classifier", model.state_dict(), cfg, settings))


def load_classifier(path, device="cpu"):
    """(model, settings) saved by save_classifier; no GPT-2 download needed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No trained classifier at {path}. Train one first, e.g. "
            f"`python ch06_classify.py --out {path.parent}` (or --no-pretrained on a machine "
            "without the GPT-2 weights), then run --classify again with the same --out.")
    saved = load_checkpoint(path, map_location="cpu", mmap=True, kinds=("classifier",),
                            hint=f"Train a classifier with `python ch06_classify.py --out "
                                 f"{path.parent}`, or name another --out.")
    settings, cfg = saved["settings"], saved["config"]
    model = build_lean(lambda: prepare_classifier(
        GPTModel(cfg), cfg, settings["trainable"], settings["lora_rank"],
        settings["lora_alpha"]), saved["model"], source=str(path))
    return model.to(device).eval(), settings


def texts_of_file(path):
    """The non-empty lines of a UTF-8 text file, or an error naming the file."""
    texts = [line for line in read_text(path).splitlines() if not is_blank(line)]
    if not texts:
        raise ValueError(f"--classify-file {path} has no text to classify (every line is empty "
                         "or invisible characters only).")
    return texts


def classify_texts(texts, path, device):
    model, settings = load_classifier(path, device)
    tokenizer = get_gpt2_tokenizer(settings["models_dir"])
    results = []
    for text in texts:
        label, probability = classify_review(text, model, tokenizer, device,
                                             max_length=settings["max_length"])
        results.append((label, probability))
        print(f"{label:>8}  {probability:6.1%}  {text}")
    return results


# ---- The chapter's run ----

def main(args):
    device = get_device(args.device)
    classifier_path = Path(args.out) / "classifier.pth"
    if args.classify or args.classify_file:
        texts = list(args.classify or [])
        if any(is_blank(text) for text in texts):
            raise ValueError("--classify got an empty text (or one of invisible characters "
                             "only): give each message in quotes.")
        if args.classify_file:
            texts += texts_of_file(Path(args.classify_file))
        return {"classified": classify_texts(texts, classifier_path, device)}

    with run_lock(args.out, RESULTS):
        for old in refuse_overwrite([classifier_path, Path(args.out) / "accuracy.json"],
                                    args.overwrite, "Use it with --classify, or keep it and "
                                                    "train into another --out. "):
            old.unlink()
        return finetune(args, classifier_path, device)


# What a run writes in --out (a killed run's temporary files of these are removed)
RESULTS = ("classifier.pth", "accuracy.json", "*.png")


def finetune(args, classifier_path, device):
    """The chapter's run: the data, the model with its new head, training, the
    accuracies, and the classifier saved."""
    start = time.perf_counter()
    data_dir = prepare_spam_data(args)  # 6.2
    tokenizer = get_gpt2_tokenizer(args.models_dir)
    # 6.4 Initializing a model with pretrained weights
    model, cfg = base_model(args, "expect far lower accuracy than the book's finetuned GPT-2")
    context_length = cfg["context_length"]

    train_dataset = SpamDataset(data_dir / "train.csv", tokenizer)
    if train_dataset.max_length > context_length:
        warnings.warn(f"The longest training text has {train_dataset.max_length} tokens; "
                      f"texts are truncated to the model's context of {context_length}.")
        train_dataset = SpamDataset(data_dir / "train.csv", tokenizer, max_length=context_length)
    max_length = train_dataset.max_length
    val_dataset = SpamDataset(data_dir / "validation.csv", tokenizer, max_length=max_length)
    test_dataset = SpamDataset(data_dir / "test.csv", tokenizer, max_length=max_length)
    print("Longest training text (tokens):", max_length)

    torch.manual_seed(args.seed)
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True,
                              drop_last=True)
    val_loader = DataLoader(val_dataset, batch_size=args.batch_size)
    test_loader = DataLoader(test_dataset, batch_size=args.batch_size)
    print(f"{len(train_loader)} training batches, {len(val_loader)} validation batches, "
          f"{len(test_loader)} test batches")
    loaders = {"train": train_loader, "validation": val_loader, "test": test_loader}
    print(ch05_train.run_header(base_model_name(args), model, cfg,
                                f"{len(train_dataset)} / {len(val_dataset)} / "
                                f"{len(test_dataset)} messages", args.out))

    # 6.5 Adding a classification head
    model = prepare_classifier(model, cfg, args.trainable, args.rank if args.lora else None,
                               args.alpha, say=print, seed=args.seed)
    model.to(device)
    plan = speed_up_finetuning(model, args.fast, device)
    print(f"Trainable parameters: {count_trainable(model):,}")
    torch.manual_seed(args.seed)  # the book seeds before the first accuracies (dropout-free)
    for name, loader in zip(("Training", "Validation", "Test"), loaders.values()):
        print(f"{name} accuracy before finetuning: "
              f"{calc_accuracy_loader(loader, model, device, num_batches=10) * 100:.2f}%")

    # 6.7 Fine-tuning the model on supervised data
    torch.manual_seed(args.seed)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, plan["fused_adamw"])
    train_losses, val_losses, train_accs, val_accs, examples_seen = train_classifier_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=args.epochs,
        eval_freq=args.eval_freq, eval_iter=args.eval_iter)
    out_dir = Path(args.out)
    if train_losses:
        plot_values(torch.linspace(0, args.epochs, len(train_losses)),
                    torch.linspace(0, examples_seen, len(train_losses)),
                    train_losses, val_losses, "loss", out_dir / "loss-plot.png")
    plot_values(torch.linspace(0, args.epochs, len(train_accs)),
                torch.linspace(0, examples_seen, len(train_accs)),
                train_accs, val_accs, "accuracy", out_dir / "accuracy-plot.png")

    accuracies = {name: calc_accuracy_loader(loader, model, device)
                  for name, loader in loaders.items()}
    settings = {"model_size": args.model_size, "max_length": max_length,
                "trainable": args.trainable, "lora_rank": args.rank if args.lora else None,
                "lora_alpha": args.alpha, "pretrained": not args.no_pretrained,
                "models_dir": str(args.models_dir), "init_from": args.init_from}
    save_classifier(classifier_path, model, cfg, settings)
    write_text_atomic(out_dir / "accuracy.json", json.dumps(accuracies, indent=2))
    seconds = time.perf_counter() - start
    report(accuracies, seconds, classifier_path, model, tokenizer, device, max_length)
    return {"model": model, "accuracies": accuracies, "train_losses": train_losses,
            "train_accs": train_accs, "seconds": seconds}


def prepare_spam_data(args):
    """The book's balanced train/validation/test CSV files in --data-dir, from
    the downloaded (or the --data) zip; returns that folder."""
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file.")
    data_file = download_and_unzip_spam_data(
        SPAM_URL, args.data or data_dir / "sms_spam_collection.zip",
        data_dir / "sms_spam_collection", data_dir / "SMSSpamCollection.tsv",
        reuse_extracted=not args.data, named=bool(args.data))
    rows = read_spam_data(data_file)
    counts = {label: sum(r[0] == label for r in rows) for label in LABELS}
    if min(counts.values()) < 10:  # fewer leave a split empty
        raise ValueError(f"{data_file} has {counts['ham']} ham and {counts['spam']} spam "
                         "messages; the balanced splits need at least 10 of each (the book's "
                         "file has 4,825 and 747).")
    balanced = create_balanced_dataset(rows)
    print(f"Messages: {len(rows)}; balanced: {len(balanced)} "
          f"({sum(r[0] == 'spam' for r in balanced)} spam)")
    parts = random_split(balanced, 0.7, 0.1)
    for part, name in zip(parts, ("train", "validation", "test")):
        write_csv(part, data_dir / f"{name}.csv")
    print("Train / validation / test:", " / ".join(str(len(p)) for p in parts))
    return data_dir


def base_model(args, without_weights):
    """(model, cfg): GPT-2 of --model-size with OpenAI's weights, the model of
    --init-from (a model you pretrained with ch05_train.py, say), or with
    --no-pretrained the same architecture from random weights (chapters 6, 7)."""
    if args.init_from:
        model, cfg, kind = load_text_model(args.init_from, "cpu", flag="--init-from")
        print(f"Starting from {args.init_from} ({ch05_train.MODEL_FILE_KINDS[kind]}): "
              f"{cfg['n_layers']} layers, embedding size {cfg['emb_dim']}, context "
              f"{cfg['context_length']}; --model-size is not used.")
        return model, cfg
    if not args.no_pretrained:
        return load_gpt2_model(args.model_size, args.models_dir)
    print(f"Note: --no-pretrained, so the model starts from random weights; {without_weights}.")
    cfg = gpt_config(args.model_size, context_length=1024, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(args.seed)
    return GPTModel(cfg), cfg


def base_model_name(args):
    """What base_model() starts from, in the run's header."""
    if args.init_from:
        return args.init_from
    return f"GPT-2 {args.model_size}" + (" (random weights)" if args.no_pretrained else "")


def report(accuracies, seconds, classifier_path, model, tokenizer, device, max_length):
    """The final accuracies, and the book's two example messages classified."""
    print(f"\n{'split':<12}{'accuracy':>10}")
    for name, acc in accuracies.items():
        print(f"{name:<12}{acc * 100:>9.2f}%")
    print(f"Run time: {seconds / 60:.2f} min. Saved {classifier_path}, loss and accuracy "
          f"plots in {classifier_path.parent}.")
    for text in ("You are a winner you have been specially selected to receive $1000 cash "
                 "or a $2000 award.",
                 "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"):
        label, probability = classify_review(text, model, tokenizer, device, max_length)
        print(f"{label} ({probability:.1%}): {text}")


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
        description="Finetune GPT-2 as an SMS spam classifier (the book's chapter 6, with "
                    "appendix E's LoRA), or classify texts with the saved classifier.",
        formatter_class=HelpFormatter,
        epilog=('examples: python ch06_classify.py --lora --rank 16 --alpha 16;  python '
                'ch06_classify.py --classify "You won a prize, reply now"'))
    parser.add_argument("--data", default=None, metavar="ZIP",
                        help="a local sms_spam_collection.zip; default: download it")
    parser.add_argument("--data-dir", default="data/spam",
                        help="folder for the data file and train/validation/test.csv")
    parser.add_argument("--trainable", choices=["head", "last_block", "all"],
                        default="last_block",
                        help="what is trained besides the new head: last_block also trains "
                             "the last transformer block and the final LayerNorm")
    add_finetuning_arguments(parser, model_size="124M", epochs=5, batch_size=8, eval_freq=50,
                             batch_unit="messages",
                             overwrite_help="replace the classifier and accuracies an earlier "
                                            "run saved in --out")
    parser.add_argument("--out", default="runs/ch06",
                        help="folder for classifier.pth, plots and accuracy.json")
    parser.add_argument("--classify", nargs="+", metavar="TEXT", default=None,
                        help="classify these texts with the saved classifier, then stop")
    parser.add_argument("--classify-file", metavar="FILE", default=None,
                        help="classify each non-empty line of FILE with the saved classifier")
    return parser


if __name__ == "__main__":
    plain_warnings()
    try:
        main(parse_finetuning_args(build_parser()))
    except KeyboardInterrupt:
        interrupted("classifier.pth is written only when training ends, so nothing of this "
                    "run was saved; downloads so far are kept.")
    except (ValueError, OSError, DownloadError) as err:
        raise SystemExit(f"error: {err}")
