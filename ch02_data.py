"""Chapter 2: Working with text data.

Defines the book's simple tokenizers, BPE through tiktoken, the sliding-window
dataset `GPTDatasetV1` with `create_dataloader_v1`, and beyond the book: the
download helper every later chapter uses, how every command writes its files
and stops (whole files only, run locks, `--overwrite` that keeps the earlier
results until new ones exist, `run_command`'s one-line errors and signals),
memory-mapped token files for corpora larger than memory
(`build_token_file`), named corpora (FineWeb-Edu, TinyStories) downloaded
and tokenized in several processes into sharded token files (`prepare_corpus`),
and byte-level BPE trained from scratch, in GPT-2's file format (`BPETokenizer`).

Run:  python ch02_data.py [--text the-verdict.txt]
      python ch02_data.py --train-bpe my_texts/ --vocab-size 8000 --tokenizer-out my_tokenizer
Imports no earlier chapter file.
"""
import argparse
import collections
import contextlib
import functools
import hashlib
import heapq
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import unicodedata
import warnings
import zlib
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import numpy as np
import regex  # tiktoken's own dependency: GPT-2's pattern needs \p{L}
import requests
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
               "ch02/01_main-chapter-code/the-verdict.txt")


# ---- 2.2 Tokenizing text ----

def split_text(text):
    """The book's split: punctuation, double dashes and whitespace; blanks dropped."""
    tokens = re.split(r'([,.:;?_!"()\']|--|\s)', text)
    return [item.strip() for item in tokens if item.strip()]


# ---- 2.3 Converting tokens into token IDs ----

def build_vocab(text, special_tokens=()):
    """Sorted unique tokens of `text`, then the special tokens, mapped to ids."""
    all_tokens = sorted(set(split_text(text)))
    all_tokens.extend(special_tokens)
    return {token: integer for integer, token in enumerate(all_tokens)}


class SimpleTokenizerV1:
    def __init__(self, vocab):
        self.str_to_int = vocab
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text):
        preprocessed = split_text(text)
        unknown = [s for s in preprocessed if s not in self.str_to_int]
        if unknown:
            raise ValueError(f"Word {unknown[0]!r} is not in the vocabulary "
                             f"({len(self.str_to_int)} tokens). Use SimpleTokenizerV2, "
                             "which maps unknown words to <|unk|>.")
        return [self.str_to_int[s] for s in preprocessed]

    def decode(self, ids):
        text = " ".join([self.int_to_str[i] for i in ids])
        # Remove the spaces that join() put before punctuation
        return re.sub(r'\s+([,.?!"()\'])', r'\1', text)


# ---- 2.4 Adding special context tokens ----

class SimpleTokenizerV2(SimpleTokenizerV1):
    def encode(self, text):
        preprocessed = [item if item in self.str_to_int else "<|unk|>"
                        for item in split_text(text)]
        return [self.str_to_int[s] for s in preprocessed]


# ---- 2.5 Byte pair encoding ----

def bpe_tokenizer(models_dir="gpt2"):
    """GPT-2's BPE tokenizer (tiktoken downloads its vocabulary once, then caches it)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # beyond the book: offline, without tiktoken's cache
        local = local_bpe_tokenizer(models_dir)  # GPT-2's own files, if downloaded
        if local is not None:
            return local
        raise DownloadError(
            f"tiktoken could not download GPT-2's vocabulary ({type(err).__name__}; it fetches "
            "vocab.bpe and encoder.json once, then caches them), and there are no "
            f"encoder.json and vocab.bpe under {models_dir}/*/. Connect once, or set "
            "TIKTOKEN_CACHE_DIR to a folder that holds tiktoken's cache.") from None


# ---- 2.6 Data sampling with a sliding window ----

class GPTDatasetV1(Dataset):
    """Windows of `max_length` tokens every `stride` tokens; targets shifted by one.

    The windows are the book's, but (beyond the book) the dataset keeps one token
    array and slices each window on access, so memory is O(number of tokens)
    whatever the stride. `token_ids` can be any 1-d integer array, including a
    memory-mapped file (see `from_token_ids`).
    """

    def __init__(self, txt, tokenizer, max_length, stride):
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        self._set_windows(np.asarray(token_ids, dtype=np.int64), max_length, stride)

    @classmethod
    def from_token_ids(cls, token_ids, max_length, stride):
        dataset = cls.__new__(cls)
        dataset._set_windows(token_ids, max_length, stride)
        return dataset

    def _set_windows(self, token_ids, max_length, stride):
        if len(token_ids) < max_length + 1:
            raise TextTooShort(len(token_ids), max_length)
        self.token_ids, self.max_length, self.stride = token_ids, max_length, stride
        # The book's loop: for i in range(0, len(token_ids) - max_length, stride)
        self.num_windows = len(range(0, len(token_ids) - max_length, stride))

    def __len__(self):
        return self.num_windows

    def __getitem__(self, idx):
        if not 0 <= idx < self.num_windows:
            raise IndexError(f"window {idx} out of range ({self.num_windows} windows)")
        start = idx * self.stride
        chunk = torch.from_numpy(
            np.asarray(self.token_ids[start:start + self.max_length + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True,
                         drop_last=True, num_workers=0, tokenizer=None):
    tokenizer = tokenizer or bpe_tokenizer()
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, num_workers=num_workers)


# ---- Beyond the book: reading and downloading files ----

class TextTooShort(ValueError):
    """Fewer tokens than one window needs; the commands say it in their flags' words."""

    def __init__(self, n_tokens, max_length):
        super().__init__(f"the text has {n_tokens} tokens, but one window of max_length="
                         f"{max_length} needs {max_length + 1} (inputs plus the shifted "
                         "target): use more text or a smaller max_length.")
        self.n_tokens, self.max_length = n_tokens, max_length


def utf8_error(path, err):
    """The ValueError for a file that is not UTF-8 (err: the UnicodeDecodeError),
    naming the file and the first line that does not decode; a file that is no
    text at all (an archive, say) is named as such."""
    line, byte = None, err.object[err.start:err.start + 1]
    with contextlib.suppress(OSError), open(path, "rb") as f:
        start = f.read(4096)
        kind = next((name for magic, name in BINARY_MAGIC if start.startswith(magic)),
                    "binary" if b"\0" in start else None)
        if kind:
            return ValueError(f"{path} is not a text file (it is {kind} data): give UTF-8 text "
                              "files, and unpack an archive first.")
        f.seek(0)  # err.start counts from the decoder's chunk, not the file: find the line
        for line, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = raw[bad.start:bad.start + 1]
                break
    where = f", line {line}," if line else ""
    return ValueError(f"{path}{where} is not UTF-8 text (byte 0x{byte.hex()}: {err.reason}). "
                      "Save it as UTF-8 first, e.g. `iconv -f latin1 -t utf-8 FILE > "
                      "FILE.utf8`.")


BINARY_MAGIC = ((b"PK\x03\x04", "a zip archive's"), (b"\x1f\x8b", "gzip"),
                (b"%PDF", "a PDF's"), (b"\x89PNG", "a PNG image's"))


def read_text(path):
    """Read a UTF-8 text file, failing with a message that names the file. A
    byte-order mark (Excel's "CSV UTF-8", Notepad's UTF-8) is not part of the text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Text file not found: {path}"
                                f"{' (it is a folder)' if path.is_dir() else ''}. Check the path.")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise utf8_error(path, err) from None


def read_json(path, fix="Delete it, or name another file."):
    """A JSON file's content, or one line naming the file, where it breaks and `fix`."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}). {fix}") from None


def move_aside(path, suffix=".damaged"):
    """Rename `path` to a free name ending in `suffix` (never over an earlier one)
    and return the new path: a damaged or stale file is kept, out of the way."""
    path = Path(path)
    target, n = path.with_name(path.name + suffix), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{suffix}.{n}"), n + 1
    path.replace(target)
    return target


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path to write `path` through: renamed into place when the block
    ends, deleted if it fails, so a crash never leaves a half-written file (and
    never destroys the previous one). Every file this project writes goes here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def unwritable(folder, err, flag="--out"):
    """The OSError for a results folder that cannot be written, in the user's words."""
    folder = Path(folder)
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        blocker = next((p for p in [folder, *folder.parents] if p.is_file()), folder)
        return OSError(f"{flag} {folder}: {blocker} is a file, not a folder. Choose another "
                       f"{flag}.")
    return OSError(f"{flag} {folder} cannot be written to ({err.strerror or err}). Choose "
                   f"another {flag}, or make it writable.")


def check_writable(folder, flag="--out"):
    """Create `folder` and write a file there before long work whose results go
    there: an unwritable --out fails now, in one line naming the folder."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise unwritable(folder, err, flag) from None


def check_output_file(path, overwrite, flag):
    """Before the work: a file `flag` may write (a folder there, an earlier file
    without --overwrite, or a folder that cannot be written is named now)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; name a file in it, e.g. "
                                f"{path / 'results.csv'}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists. Replace it with --overwrite, or "
                              "name another file.")
    check_writable(path.parent, flag)


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def number(kind=int, at_least=None, above=None, below=None, at_most=None):
    """An argparse `type` for a flag's number: `kind` within the given bounds,
    else argparse's one-line error that names the flag (exit status 2)."""
    bounds = [(at_least, lambda v, b: v >= b, "at least"), (above, lambda v, b: v > b, "above"),
              (below, lambda v, b: v < b, "below"), (at_most, lambda v, b: v <= b, "at most")]
    bounds = [(b, ok, words) for b, ok, words in bounds if b is not None]
    wanted = " and ".join(f"{words} {b}" for b, _, words in bounds) or "finite"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or not all(ok(value, b) for b, ok, _ in bounds):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def is_blank(text):
    """True when `text` shows nothing: spaces, and invisible characters such as a
    zero-width space or a byte-order mark (Unicode's format and control classes)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def plain_warnings():
    """Warnings as one line of their message, without the file, line and source
    line Python adds: a command's user has nothing to do with those."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"Warning: {message}\n"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default once: not where the help already names it,
    and not for switches (store_true) or flags without one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class Stopped(Exception):
    """A run that stopped on request once its work was saved (ch05_train.py's
    checkpoint); `code` is the exit status, 128 + the signal's number."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt: a command
    stops on them as on Ctrl-C, its files written whole or not at all."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_command(main, args, kept, errors=(OSError, ValueError)):
    """Every command's __main__: main(args), and however it stops, one line and an
    exit status. An error of `errors` (or a download's) is "error: ..." (1); Ctrl-C,
    SIGTERM and SIGHUP say what was kept, in the command's words (`kept`, or
    kept(the flags as a dict)), and exit with 128 + the signal's number (130, 143, 129)."""
    plain_warnings()
    signals = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
               if hasattr(signal, name)]  # Windows has no SIGHUP
    for sig in signals:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else
                      _raise_interrupted)
    # Python drops an exception raised in a finalizer with a traceback-like note: a
    # Ctrl-C that lands there was too late to stop the work, which ends as usual
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, KeyboardInterrupt) else hook(u)
    try:
        return main(args)
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.code)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"\nInterrupted ({signal.Signals(signum).name}). "
              f"{kept(vars(args)) if callable(kept) else kept}", file=sys.stderr)
        sys.exit(128 + signum)
    except (*errors, DownloadError) as err:
        sys.exit(f"error: {err}")
    finally:  # the work is over: a signal now would only break Python's own exit
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)


class IncompleteDownload(IOError):
    pass


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its URLs."""


def _fetch_into(url, part, timeout, desc):
    """Append the rest of `url` to `part`, resuming with an HTTP Range request.

    `part` is resumed only when its note (PART.json) says it came from the same
    URL; If-Range then carries the server's ETag or Last-Modified, so a file
    that changed on the server is sent whole and starts over."""
    note = part.with_name(part.name + ".json")
    have = part.stat().st_size if part.exists() else 0
    try:
        saved = json.loads(note.read_text(encoding="utf-8")) if have else {}
    except (OSError, ValueError):
        saved = {}
    # A .part is appended to only when it came from this URL and the server named
    # its version (ETag or Last-Modified): If-Range then restarts a file that has
    # changed. Without one, the rest could come from another version of the file.
    if saved.get("url") != url or not saved.get("validator"):
        have = 0
    # identity: Content-Length must count the bytes we write, not gzip'd ones
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if saved.get("validator"):
            headers["If-Range"] = saved["validator"]
    with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
        if have and r.status_code == 416:  # our .part is already as long as the file, or longer
            part.unlink()
            raise IncompleteDownload(f"{url}: partial file did not match; starting over")
        r.raise_for_status()
        if r.status_code != 206:  # the server ignored Range, or the file changed: byte 0
            have = 0
            validator = r.headers.get("ETag", "")
            validator = r.headers.get("Last-Modified") if validator.startswith("W/") or \
                not validator else validator  # If-Range takes strong validators only
            write_text_atomic(note, json.dumps({"url": url, "validator": validator}))
        if r.status_code == 206 and "Content-Range" in r.headers:
            total = int(r.headers["Content-Range"].rsplit("/", 1)[-1])
        elif "Content-Length" in r.headers:
            total = have + int(r.headers["Content-Length"])
        else:
            total = None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=desc,
                disable=total is not None and total < 2**20, leave=False) as bar:
            for chunk in r.iter_content(chunk_size=2**16):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise IncompleteDownload(f"{url}: got {size} of {total} bytes")


def download_file(url, destination, backup_urls=(), retries=3, backoff=1.0, timeout=60):
    """Download `url` to `destination` unless it is already there.

    Bytes go to `destination.part`, which is renamed only once its size matches
    the server's Content-Length; an interrupted download resumes from the .part
    file. Connection errors are retried with exponential back-off, then the
    `backup_urls` are tried in turn.
    """
    destination = Path(destination)
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    failures = []
    for u in [url, *backup_urls]:
        for attempt in range(retries):
            try:
                _fetch_into(u, part, timeout, desc=destination.name)
                part.replace(destination)
                part.with_name(part.name + ".json").unlink(missing_ok=True)
                if u != url:  # which server served, when it was not the first
                    print(f"{destination.name}: downloaded from {u}")
                return destination
            except requests.HTTPError as err:
                failures.append(f"{u}: {err}")
                status = err.response.status_code
                if status < 500 and status not in (408, 429):
                    break  # the server said no: retrying will not help, try the next URL
            except (requests.RequestException, IncompleteDownload) as err:
                failures.append(f"{u}: {err}")
            if attempt + 1 < retries:
                time.sleep(backoff * 2 ** attempt)
    tried = "\n  ".join(_count_repeats(failures))
    raise DownloadError(
        f"Could not download {destination.name}. Attempts:\n  {tried}\n"
        f"Download it by hand and place it at {destination.resolve()} "
        "(the partial .part file, if any, can be deleted).")


def download_checked(url, destination, file_problem, advice="Try again later."):
    """download_file, then `file_problem(path)` (None for a whole file): a damaged
    file (an error page, a cut or changed download) is moved aside and fetched once
    more, and a second damaged copy is an error that says so."""
    path = download_file(url, destination)
    problem = file_problem(path)
    if problem:
        fetch_again(path, problem, lambda: download_file(url, path), file_problem, advice)
    return path


def fetch_again(path, problem, fetch, file_problem, advice="Try again later."):
    """Move a damaged download aside and fetch() it once more; damaged again, it is
    an error that says what to do. Returns where the damaged file went."""
    aside = move_aside(path)
    print(f"{path} is damaged ({problem}); moved aside to {aside.name} and downloading it "
          "again.")
    fetch()
    problem = file_problem(path)
    if problem:
        raise damaged_again(path, problem, aside, advice)
    return aside


def damaged_again(path, problem, aside, advice="Try again later."):
    """The error for a file damaged when fetched again; it takes the place of the
    first damaged copy (`aside`), so one is kept, not two of a download's size."""
    path.replace(aside)
    return DownloadError(f"{path} is damaged ({problem}), also when downloaded again (kept as "
                         f"{aside.name}): the server may be sending an error page. {advice}")


def pinned(sha256):
    """A file_problem for download_checked: the file is not the one published."""
    def problem(path):
        digest = sha256_of(path)
        return None if digest == sha256 else (f"SHA-256 {digest[:12]}..., not the published "
                                              f"{sha256[:12]}...")
    return problem


def sha256_of(path):
    """A file's SHA-256, read in blocks: a pinned download, a model's fingerprint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_repeats(lines):
    """['a', 'a', 'b'] -> ['a (2 attempts)', 'b']"""
    out = []
    for line in lines:
        if out and out[-1][0] == line:
            out[-1][1] += 1
        else:
            out.append([line, 1])
    return [line if n == 1 else f"{line} ({n} attempts)" for line, n in out]


def load_the_verdict(path=None, data_dir="data"):
    """The book's short story: read `path`, or download it once into `data_dir`."""
    if path is None:
        path = download_file(VERDICT_URL, Path(data_dir) / "the-verdict.txt")
    return read_text(path)


# ---- Beyond the book: corpora of any size, tokenized once into a memory-mapped
#      uint16 file that GPTDatasetV1.from_token_ids reads (ch05_train.py --data) ----

EOT = "<|endoftext|>"


def collect_text_files(paths, flag="--data"):
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
            raise FileNotFoundError(f"{flag} path not found: {path}")
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


def corpus_fingerprint(files, vocabulary=""):
    """Changes whenever a file is added, removed, resized or rewritten, or the
    vocabulary is another than GPT-2's (a tokenizer of --train-bpe, by name)."""
    h = hashlib.sha1(b"gpt2-uint16-v1" + vocabulary.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_token_file(files, cache_dir, tokenizer, num_threads=None, log=print, check=True):
    """Tokenize `files` once into cache_dir/<fingerprint>.bin (uint16, an
    <|endoftext|> after each document) and return it memory-mapped. Beside it,
    <fingerprint>.json records its length and CRC-32: a file that is cut or
    damaged is never trained on, but moved aside and tokenized again. check=False
    trusts an existing file (one another process has just checked or written)."""
    own = tokenizer.name if hasattr(tokenizer, "files") else ""  # a trained tokenizer's
    path = Path(cache_dir) / f"{corpus_fingerprint(files, own)}.bin"
    record = path.with_suffix(".json")
    if path.exists():
        problem = token_file_problem(path, record) if check else None
        if problem is None:
            log(f"Reusing the token file {path} (length and checksum verified)")
            return np.memmap(path, dtype=np.uint16, mode="r")
        log(f"The token file {path} is damaged ({problem}); moved aside to "
            f"{move_aside(path).name}, tokenizing again.")
    if tokenizer.n_vocab > 2 ** 16:
        raise ValueError(f"A vocabulary of {tokenizer.n_vocab} tokens does not fit uint16.")
    num_threads = num_threads or os.cpu_count()
    eot = tokenizer.encode(EOT, allowed_special={EOT})
    start, n_tokens, n_chars, crc = time.perf_counter(), 0, 0, 0
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            for f in tqdm(files, desc="Tokenizing", unit="file", disable=len(files) < 2):
                pending = []
                for block in iter_text_blocks(f):
                    pending.append(block)
                    n_chars += len(block)
                    if len(pending) == num_threads * 4:
                        n, crc = _write_tokens(out, tokenizer, pending, num_threads, crc)
                        n_tokens += n
                        pending = []
                n, crc = _write_tokens(out, tokenizer, pending, num_threads, crc, suffix=eot)
                n_tokens += n
            out.flush()
            write_token_record(path, n_tokens, crc)
    except OSError as err:  # a full disk: name the file and the space left
        if err.filename and Path(err.filename).name not in (path.name + ".tmp",
                                                            record.name + ".tmp"):
            raise  # an input file's error names that file
        raise token_file_unwritten(path, err, "--out") from None
    seconds = time.perf_counter() - start
    log(f"Tokenized {len(files)} file(s), {n_chars / 1e6:.1f}M characters, into "
        f"{n_tokens:,} tokens in {seconds:.1f} s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _write_tokens(out, tokenizer, blocks, num_threads, crc, suffix=()):
    ids = [t for encoded in tokenizer.encode_batch(blocks, num_threads=num_threads,
                                                   allowed_special={EOT}) for t in encoded]
    ids.extend(suffix)
    data = np.asarray(ids, dtype="<u2").tobytes()
    out.write(data)
    return len(ids), zlib.crc32(data, crc)


def write_token_record(path, n_tokens, crc):
    """The record beside a token file (PATH.json): its length and CRC-32, which
    token_file_problem checks before the file is used again."""
    write_text_atomic(path.with_suffix(".json"), json.dumps({"tokens": n_tokens, "crc32": crc}))


def token_file_unwritten(path, err, flag):
    """A token file that could not be written (a full disk, say), in one line."""
    return OSError(f"Could not write the token file {path}: {err.strerror or 'the disk is full'}"
                   f"; {_free_space(path.parent)} free on its disk. Free some space, or give "
                   f"another {flag}.")


def token_file_problem(path, record):
    """What is wrong with a token file, checked against the record written with
    it (zlib's CRC-32 reads about 1 GB/s), or None when it is whole."""
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        expected, expected_crc = int(saved["tokens"]), int(saved["crc32"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{record.name}, the record of its length and checksum, is missing or unreadable"
    size = path.stat().st_size
    if size != 2 * expected:
        return f"{size:,} bytes where {2 * expected:,} were written"
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    if crc != expected_crc:
        return "its checksum does not match what was written"
    return None


def _free_space(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 1e9:.2f} GB"
    except OSError:
        return "unknown space"


# ---- Beyond the book: named corpora (ch05_train.py --data fineweb-edu) ----
# A real pretraining corpus in one command: its published Parquet files (a "text"
# column) downloaded file by file, each checked, and tokenized in several
# processes into token files of the format above: a fixed validation part, then
# training shards, each with its length and CRC-32. A manifest records where in
# the source each part ends, so a later run that asks for more tokens goes on
# from there, and a damaged shard costs only itself and the ones after it.

HF_URL = "https://huggingface.co"


def hf_endpoint():
    """Hugging Face, or the mirror in $HF_ENDPOINT (as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or HF_URL).rstrip("/")


# FineWeb-Edu v1.4.0's sample-10BT: the sizes and SHA-256 of the files we found
# published; the others are checked by their download's length and Parquet footer
_FINEWEB_EDU_KNOWN = {
    0: (2_152_819_114, "b1ba7b2ce4cb5ea6ef42dca40263eabb85f37700d01693a68e9b30a31d78e871"),
    1: (2_152_222_432, "3fcf2dc69cd52503986276d3d2d26a8c356d0f2ea28a0de4fdbda8cf87755693"),
    2: (2_151_796_315, "547ae182d132c9f06b6ce63149567208ea9f57630bfd9b1a2938e504f0c9ebd7"),
    13: (540_632_672, "b393f51fefab26cd6f4c8f65707c1924f6666c4961a0ebebe04bb57f7ec832de"),
}
_TINYSTORIES = "data/{}.parquet"
CORPORA = {
    # name: its Hugging Face dataset and revision; its files in the order they are
    # read, each (path, bytes, SHA-256; None where unknown); the validation part
    # (the first tokens of the first file); the file training starts at (after the
    # validation part when 0); the training tokens when --data-tokens is not given
    "fineweb-edu": {
        "about": "FineWeb-Edu sample-10BT: educational web pages, about 10B GPT-2 tokens",
        "dataset": "HuggingFaceFW/fineweb-edu",
        "revision": "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9",  # v1.4.0
        "files": [(f"sample/10BT/{i:03d}_00000.parquet", *_FINEWEB_EDU_KNOWN.get(i, (None, None)))
                  for i in range(14)],
        "file_bytes": 2.16e9,  # for the disk-space check, where a file's size is unknown
        "validation_tokens": 10_000_000, "train_from": 0, "default_tokens": 1_000_000_000,
    },
    "tinystories": {
        "about": "TinyStories: short stories in words a child knows, about 470M GPT-2 tokens",
        "dataset": "roneneldan/TinyStories", "revision": "main",
        "files": [(_TINYSTORIES.format("validation-00000-of-00001-869c898b519ad725"), None,
                   "33406a6206554cfc279c29c11f4df51528af487aa1a602b075566fc83c49dcab"),
                  (_TINYSTORIES.format("train-00000-of-00004-2d5a1467fff1081b"), 248_731_111,
                   "77cf780cebe52b6e83e3a2ac84bc56d8059363113e41d17a023f1d8b2ed0fc0b"),
                  (_TINYSTORIES.format("train-00001-of-00004-5852b56a2bd28fd9"), None, None),
                  (_TINYSTORIES.format("train-00002-of-00004-a26307300439e943"), None, None),
                  (_TINYSTORIES.format("train-00003-of-00004-d243063613e5a057"), None, None)],
        "file_bytes": 2.5e8,
        "validation_tokens": 1_000_000, "train_from": 1, "default_tokens": 20_000_000,
    },
}
SHARD_TOKENS = 100_000_000  # a training token file: 200 MB on disk


def token_amount(text):
    """'100M' -> 100000000: k, M and B (or G) stand for a thousand, a million, a billion."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(text[-1:].lower())
    value = float(text[:-1]) * scale if scale else float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(text)
    return int(value)


def parquet_module():
    """pyarrow's Parquet reader, imported where a Parquet file is read."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Reading Parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def parquet_problem(path, size=None, sha256=None):
    """What is wrong with a downloaded Parquet file of a corpus, or None: its
    size, its footer (the file's own index of row groups), its text column,
    and its SHA-256 where the published one is known."""
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size:,} bytes, not the published {size:,}"
    pq = parquet_module()
    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as err:  # pyarrow's own errors (ArrowInvalid: a cut file, an error page)
        return f"no Parquet footer ({type(err).__name__})"
    if "text" not in metadata.schema.names:
        return f"no text column (its columns: {', '.join(metadata.schema.names)})"
    if metadata.num_rows == 0:
        return "no rows"
    return pinned(sha256)(path) if sha256 else None


class ShardedTokens:
    """Token files read as one sequence, its first `length` tokens: what
    GPTDatasetV1.from_token_ids slices, a window perhaps across two files."""

    def __init__(self, arrays, length=None):
        self.arrays = list(arrays)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.length = int(self.starts[-1]) if length is None else min(length, self.starts[-1])

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        start, stop, step = index.indices(self.length)
        if step != 1:
            raise IndexError("ShardedTokens takes slices with a step of 1")
        parts, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo, hi = start - self.starts[i], min(stop - self.starts[i], len(self.arrays[i]))
            parts.append(self.arrays[i][lo:hi])
            start, i = start + hi - lo, i + 1
        return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else
                                                             np.zeros(0, np.uint16))


def prepare_corpus(name, n_tokens, data_dir, workers=None, models_dir="gpt2", log=print,
                   check=True):
    """(training tokens, validation tokens) of a named corpus of CORPORA: its
    validation part and its first n_tokens training tokens (all it has, when
    fewer), downloaded and tokenized once into data_dir/name. A later call for
    more tokens goes on where the last one stopped. check=False trusts the
    token files (ones another process has just checked or written)."""
    spec = CORPORA[name]
    folder = Path(data_dir) / name
    store = folder / f"tokens-{corpus_id(spec)}"
    manifest = read_manifest(store, check, log)
    have = sum(part["tokens"] for part in manifest["shards"])
    if manifest["val"] is None or (have < n_tokens and not manifest["exhausted"]):
        check_writable(store, "--data-dir")
        manifest = tokenize_corpus(name, spec, folder, store, manifest, n_tokens, workers,
                                   models_dir, log)
        have = sum(part["tokens"] for part in manifest["shards"])
    if have < n_tokens:
        log(f"{name} has {have:,} training tokens in all, fewer than the {n_tokens:,} asked "
            "for: training on all of them.")
    load = lambda part: np.memmap(store / part["file"], dtype=np.uint16, mode="r")  # noqa: E731
    return (ShardedTokens([load(p) for p in manifest["shards"]], n_tokens),
            load(manifest["val"]))


def corpus_id(spec):
    """Changes with the source (dataset, revision, files) and the split, never
    with how many tokens are asked for."""
    keys = ("dataset", "revision", "files", "validation_tokens", "train_from")
    fields = json.dumps({k: spec[k] for k in keys}, sort_keys=True)
    return hashlib.sha1(f"gpt2-uint16-v1|{fields}".encode()).hexdigest()[:12]


def read_manifest(store, check, log):
    """The token files made so far, each checked: the first damaged one and those
    after it are moved aside, and the manifest goes back to where it ended."""
    path = store / "manifest.json"
    empty = {"val": None, "shards": [], "position": [0, 0, 0], "exhausted": False}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return empty
    except (OSError, ValueError):
        log(f"{path} is unreadable; moved aside to {move_aside(path).name}, tokenizing anew.")
        return empty
    parts = ([manifest["val"]] if manifest["val"] else []) + manifest["shards"]
    for i, part in enumerate(parts):
        bin_path = store / part["file"]
        problem = ((token_file_problem(bin_path, bin_path.with_suffix(".json")) if check else
                    None) if bin_path.exists() else "missing")
        if problem:
            for later in parts[i:]:
                if (store / later["file"]).exists():
                    move_aside(store / later["file"])
            log(f"The token file {bin_path} is {problem if problem == 'missing' else 'damaged'} "
                f"({problem}); it and the {len(parts) - i - 1} after it are tokenized again.")
            kept = parts[:i]
            return {"val": kept[0] if kept else None, "shards": kept[1:],
                    "position": kept[-1]["end"] if kept else [0, 0, 0], "exhausted": False}
    return manifest


def tokenize_corpus(name, spec, folder, store, manifest, n_tokens, workers, models_dir, log):
    """Tokenize the corpus from the manifest's position on, file by file (each
    downloaded when reached), into the validation part and training shards,
    until n_tokens training tokens are written or the corpus ends."""
    workers = workers or os.cpu_count()
    files = spec["files"]
    shard_tokens = lambda: sum(p["tokens"] for p in manifest["shards"])  # noqa: E731
    todo = (0 if manifest["val"] else spec["validation_tokens"]) + max(n_tokens - shard_tokens(), 0)
    pending, cursor = [], list(manifest["position"])  # cursor: [file, row group, document]
    started, written = time.perf_counter(), 0
    bar = tqdm(total=todo, unit="tok", unit_scale=True, desc=f"Tokenizing {name}",
               dynamic_ncols=True)

    def wanted():  # the tokens the part being gathered needs in all
        if manifest["val"] is None:
            return spec["validation_tokens"]
        return min(SHARD_TOKENS, n_tokens - shard_tokens())

    def write_part(end):  # end: where in the source the next part begins
        nonlocal pending, written
        ids = np.concatenate(pending)
        part = {"file": "val.bin" if manifest["val"] is None else
                f"train-{len(manifest['shards']):04d}.bin", "tokens": len(ids), "end": end}
        write_token_file(store / part["file"], ids)
        if manifest["val"] is None:
            manifest["val"] = part
        else:
            manifest["shards"].append(part)
        manifest["position"] = end
        write_text_atomic(store / "manifest.json", json.dumps(manifest, indent=1))
        pending, written = [], written + len(ids)
        return end

    with token_workers(workers, models_dir) as tokenize:
        while wanted() > 0 and cursor[0] < len(files):
            f, path = cursor[0], fetch_corpus_file(spec, cursor[0], folder)
            groups = parquet_module().ParquetFile(path).metadata.num_row_groups
            for g, lengths, ids in tokenize(path, range(cursor[1], groups)):
                ends, doc = np.cumsum(lengths), cursor[2] if cursor[:2] == [f, g] else 0
                cursor = [f, g + 1, 0]  # unless a part ends inside this group
                while doc < len(lengths) and wanted() > 0:
                    begin, gathered = (ends[doc - 1] if doc else 0), sum(map(len, pending))
                    # the document whose end completes the part, else the group's last
                    last = min(int(np.searchsorted(ends, begin + wanted() - gathered)),
                               len(lengths) - 1)
                    pending.append(ids[begin:ends[last]])
                    bar.update(int(ends[last] - begin))
                    doc = last + 1
                    if gathered + ends[last] - begin >= wanted():
                        was_val = manifest["val"] is None
                        cursor = [f, g, doc] if doc < len(lengths) else [f, g + 1, 0]
                        if was_val and spec["train_from"] > f:  # training has files of its own
                            cursor = [spec["train_from"], 0, 0]
                        write_part(cursor)
                if wanted() <= 0 or cursor[0] != f:
                    break
            else:
                cursor = [f + 1, 0, 0]
    bar.close()
    if wanted() > 0:  # the whole corpus is read
        if manifest["val"] is None:
            raise ValueError(f"{name} holds fewer tokens than its validation part "
                             f"({spec['validation_tokens']:,}).")
        if pending:
            write_part(cursor)
        manifest["exhausted"] = True
        write_text_atomic(store / "manifest.json", json.dumps(manifest, indent=1))
    seconds = time.perf_counter() - started
    log(f"Tokenized {written:,} tokens of {name} in {seconds:.1f} s "
        f"({written / max(seconds, 1e-9):,.0f} tokens/s, {workers} worker process(es))")
    return manifest


def write_token_file(path, ids):
    """A token file and its record (length, CRC-32), both written whole or not at all."""
    data = np.asarray(ids, dtype="<u2").tobytes()
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        write_token_record(path, len(ids), zlib.crc32(data))
    except OSError as err:
        raise token_file_unwritten(path, err, "--data-dir") from None


def fetch_corpus_file(spec, index, folder):
    """A corpus file, downloaded once (resumable) and checked; a damaged one is
    moved aside and fetched again. A disk without room for it is named first."""
    path_in_repo, size, sha256 = spec["files"][index]
    destination = Path(folder) / Path(path_in_repo).name
    if not destination.exists():
        folder.mkdir(parents=True, exist_ok=True)
        part = destination.with_name(destination.name + ".part")
        need = (size or spec["file_bytes"]) - (part.stat().st_size if part.exists() else 0)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise OSError(f"{destination.name} needs {need / 1e9:.2f} GB and its disk has "
                          f"{free / 1e9:.2f} GB free ({folder}): free some space, or give "
                          "another --data-dir.")
    url = f"{hf_endpoint()}/datasets/{spec['dataset']}/resolve/{spec['revision']}/{path_in_repo}"
    return download_checked(url, destination, lambda p: parquet_problem(p, size, sha256),
                            "Try later, or set $HF_ENDPOINT to a mirror.")


_worker_tokenizer = None


def _start_token_worker(models_dir):
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _worker_tokenizer = bpe_tokenizer(models_dir)


def tokenize_row_group(task, tokenizer=None):
    """A Parquet row group's documents as (their lengths, their token ids), each
    followed by <|endoftext|>, as GPT-2 was trained. Text is encoded as ordinary
    text: an "<|endoftext|>" inside a web page is not a document's end."""
    path, group = task
    tokenizer = tokenizer or _worker_tokenizer
    table = parquet_module().ParquetFile(path).read_row_group(group, columns=["text"])
    eot = tokenizer.encode(EOT, allowed_special={EOT})[0]
    flat, lengths = [], []
    for ids in tokenizer.encode_ordinary_batch([t or "" for t in table.column("text").to_pylist()],
                                               num_threads=1):
        flat.extend(ids)
        flat.append(eot)
        lengths.append(len(ids) + 1)
    return group, np.asarray(lengths, dtype=np.int64), np.asarray(flat, dtype=np.uint16)


@contextlib.contextmanager
def token_workers(workers, models_dir):
    """tokenize(path, groups): the row groups' tokens in order, from `workers`
    processes (a few groups ahead of the reader, never the whole file), or from
    this process when workers is 1. Both give the same tokens, byte for byte.
    The workers are fresh interpreters that import the main script: a script of
    yours that calls this needs Python's usual `if __name__ == "__main__":`."""
    if workers == 1:
        tokenizer = bpe_tokenizer(models_dir)
        yield lambda path, groups: (tokenize_row_group((path, g), tokenizer) for g in groups)
        return
    import multiprocessing  # spawn: a fresh interpreter, safe beside torch's threads
    with multiprocessing.get_context("spawn").Pool(
            workers, initializer=_start_token_worker, initargs=(models_dir,)) as pool:
        def tokenize(path, groups):
            queued = collections.deque()
            for g in groups:
                queued.append(pool.apply_async(tokenize_row_group, ((path, g),)))
                if len(queued) >= 2 * workers:
                    yield queued.popleft().get()
            while queued:
                yield queued.popleft().get()
        yield tokenize


# ---- Beyond the book: BPE from scratch (the chapter's bonus material) ----
# GPT-2's tokenizer is byte-level BPE: GPT2_PATTERN cuts text into words (a
# space goes with the word after it), each word's UTF-8 bytes start as 256
# single-byte tokens, and the learned merges, lowest rank first, join
# neighbours into longer tokens. Training learns those merges from a text: the
# most frequent neighbouring pair becomes a new token, again and again.
# OpenAI's GPT-2 download spells the vocabulary in two files, encoder.json and
# vocab.bpe (Hugging Face: vocab.json and merges.txt), each token's bytes written
# as printable characters; a tokenizer trained here is saved the same way.

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, spaces
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")


def gpt2_byte_symbols():
    """GPT-2's byte-to-character table: bytes that print stand for themselves, the
    others (space, controls) for characters from 256 on, in byte order. The
    table's order is the order of GPT-2's first 256 token ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b], n = chr(256 + n), n + 1
    return {ch: b for b, ch in symbols.items()}


class BPETokenizer:
    """Byte-level BPE as GPT-2's: token ids are the 256 bytes (in GPT-2's order),
    then one per merge in the order learned, then the special tokens. Encoding
    merges a word's lowest-ranked neighbouring pair first, as tiktoken does, so
    GPT-2's own files encode here exactly as tiktoken encodes."""

    def __init__(self):
        self.vocab = [bytes([b]) for b in gpt2_byte_symbols().values()]  # id -> bytes
        self.ranks = {token: i for i, token in enumerate(self.vocab)}  # bytes -> id
        self.merges = []  # (bytes, bytes) in the order learned
        self.special_tokens = {}  # text -> id
        self.merge_seconds = 0.0
        self._pretokenize = regex.compile(GPT2_PATTERN)
        self._cache = {}

    @property
    def n_vocab(self):
        return len(self.vocab) + len(self.special_tokens)

    @property
    def eot_token(self):
        return self.special_tokens[EOT]

    def _add_merge(self, a, b):
        """The id of token a+b, added (with its merge) if new."""
        token = a + b
        if token not in self.ranks:
            self.ranks[token] = len(self.vocab)
            self.vocab.append(token)
            self.merges.append((a, b))
        return self.ranks[token]

    def _add_special_tokens(self, names):
        for name in sorted(names):
            self.special_tokens[name] = self.n_vocab

    # Training: pairs are counted once; a merge then updates only the counts of
    # the words it touches, and a heap finds the next most frequent pair
    def train(self, text, vocab_size, allowed_special=frozenset({EOT}), progress=False):
        n_merges = vocab_size - len(self.vocab) - len(allowed_special)
        if n_merges < 0:
            raise ValueError(f"A vocabulary of {vocab_size} tokens cannot hold the 256 bytes and "
                             f"{len(allowed_special)} special token(s): ask for at least "
                             f"{len(self.vocab) + len(allowed_special)}.")
        start = time.perf_counter()
        words = collections.Counter(  # special tokens are never part of a merge
            piece.encode("utf-8") for chunk in split_at(text, allowed_special)
            if chunk not in allowed_special for piece in self._pretokenize.findall(chunk))
        seqs = [[self.ranks[bytes([b])] for b in word] for word in words]
        freqs = list(words.values())
        counts, where = collections.Counter(), collections.defaultdict(set)
        for i, seq in enumerate(seqs):
            for pair in zip(seq, seq[1:]):
                counts[pair] += freqs[i]
                where[pair].add(i)
        heap = [(-n, pair) for pair, n in counts.items()]
        heapq.heapify(heap)
        target = len(self.vocab) + n_merges
        with tqdm(total=n_merges, desc="Merges", unit="merge", disable=not progress) as bar:
            while len(self.vocab) < target and heap:
                n, pair = heapq.heappop(heap)
                if counts.get(pair) != -n:
                    continue  # an older count of a pair since changed
                before = len(self.vocab)
                new_id = self._add_merge(self.vocab[pair[0]], self.vocab[pair[1]])
                bar.update(len(self.vocab) - before)
                changed = set()
                for i in where.pop(pair):
                    merged = merge_pair(seqs[i], pair, new_id)
                    if len(merged) == len(seqs[i]):
                        continue  # the pair left this word in an earlier merge
                    for p in zip(seqs[i], seqs[i][1:]):
                        counts[p] -= freqs[i]
                        changed.add(p)
                    for p in zip(merged, merged[1:]):
                        counts[p] += freqs[i]
                        where[p].add(i)
                        changed.add(p)
                    seqs[i] = merged
                for p in changed:
                    if counts[p] > 0:
                        heapq.heappush(heap, (-counts[p], p))
                    else:
                        del counts[p]
        self._add_special_tokens(allowed_special)
        self.merge_seconds = time.perf_counter() - start
        self._cache.clear()
        return self

    # Encoding and decoding, with tiktoken's arguments
    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        ids = []
        for chunk in self._split_special(text, allowed_special, disallowed_special):
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            for piece in self._pretokenize.findall(chunk):
                ids.extend(self._encode_word(piece.encode("utf-8")))
        return ids

    def _encode_word(self, word):
        if word in self.ranks:
            return [self.ranks[word]]
        if word not in self._cache:
            parts = [word[i:i + 1] for i in range(len(word))]
            while len(parts) > 1:
                ranked = [(self.ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                          if a + b in self.ranks]
                if not ranked:
                    break
                _, i = min(ranked)  # the lowest rank, the leftmost of equals
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self._cache[word] = [self.ranks[p] for p in parts]
        return self._cache[word]

    def _split_special(self, text, allowed_special, disallowed_special):
        """text cut into plain chunks and the special tokens allowed in it (as their
        ids); a disallowed one in the text raises ValueError, as in tiktoken."""
        known = set(self.special_tokens)
        allowed = known if allowed_special == "all" else known & set(allowed_special)
        disallowed = known - allowed if disallowed_special == "all" else set(disallowed_special)
        for name in disallowed:
            if name in text:
                raise ValueError(f"The text contains the special token {name!r}: pass it in "
                                 "allowed_special to encode it as one token, or "
                                 "disallowed_special=() to encode it as text.")
        return [self.special_tokens[part] if part in allowed else part
                for part in split_at(text, allowed) if part]

    def decode_bytes(self, ids):
        names = {i: name.encode("utf-8") for name, i in self.special_tokens.items()}
        return b"".join(names[i] if i in names else self.vocab[i] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # GPT-2's file format
    def files(self):
        """{"encoder.json": ..., "vocab.bpe": ...}: the tokens with their ids, and the merges."""
        symbol = {b: ch for ch, b in gpt2_byte_symbols().items()}
        spell = lambda token: "".join(symbol[b] for b in token)  # noqa: E731
        encoder = {spell(token): i for i, token in enumerate(self.vocab)}
        encoder.update(self.special_tokens)
        merges = "".join(f"{spell(a)} {spell(b)}\n" for a, b in self.merges)
        return {"encoder.json": json.dumps(encoder, ensure_ascii=False),
                "vocab.bpe": "#version: 0.2\n" + merges}

    def save(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            write_text_atomic(Path(folder) / name, text)

    @classmethod
    def load(cls, folder):
        files = tokenizer_files(folder)
        return cls.from_texts(files["encoder.json"], files["vocab.bpe"], f"The files in {folder}")

    @classmethod
    def from_files(cls, encoder_json, vocab_bpe):
        return cls.from_texts(read_text(encoder_json), read_text(vocab_bpe),
                              f"{encoder_json} and {vocab_bpe}")

    @classmethod
    def from_texts(cls, encoder_text, merges_text, source="The tokenizer's files"):
        """Replays the merges, then checks that encoder.json gives every token the
        id replaying gave it; the tokens after them are special tokens."""
        tokenizer, byte_of = cls(), gpt2_byte_symbols()
        try:
            encoder = json.loads(encoder_text)
            for line in merges_text.split("\n")[1:]:
                if line.strip():
                    a, b = line.split(" ")
                    tokenizer._add_merge(bytes(byte_of[ch] for ch in a),
                                         bytes(byte_of[ch] for ch in b))
            n = len(tokenizer.vocab)
            special = {name: i for name, i in encoder.items() if i >= n}
            plain = {bytes(byte_of[ch] for ch in name): i for name, i in encoder.items() if i < n}
        except (ValueError, KeyError, TypeError, AttributeError):
            plain, special = None, {}
        if plain != tokenizer.ranks or sorted(special.values()) != list(range(n, n + len(special))):
            raise ValueError(f"{source} are not one byte-level BPE vocabulary (the ids of "
                             "encoder.json are not the order of vocab.bpe's merges).")
        tokenizer.special_tokens = dict(sorted(special.items(), key=lambda item: item[1]))
        return tokenizer

    @classmethod
    def from_tiktoken(cls, encoding):
        """The same vocabulary from a tiktoken encoding (its merges found by bpe_merges)."""
        ranks = {t: encoding.encode_single_token(t) for t in encoding.token_byte_values()}
        tokenizer = cls()
        for a, b in bpe_merges(ranks):
            tokenizer._add_merge(a, b)
        if tokenizer.ranks != ranks:
            raise ValueError(f"tiktoken's {encoding.name} is not byte-level BPE in GPT-2's "
                             "byte order.")
        tokenizer.special_tokens = {name: encoding.encode_single_token(name)
                                    for name in sorted(encoding.special_tokens_set)}
        return tokenizer

    def to_tiktoken(self, name):
        """tiktoken's encoding of this vocabulary: the same ids, encoded in Rust."""
        return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens, explicit_n_vocab=self.n_vocab)


def split_at(text, names):
    """text cut before and after each occurrence of the strings in names."""
    if not names:
        return [text]
    return re.split("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")",
                    text)


def merge_pair(seq, pair, new_id):
    """seq with each occurrence of the pair, left to right, replaced by new_id."""
    merged, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(seq[i])
            i += 1
    return merged


def gpt2_tokenizer_from_files(encoder_json, vocab_bpe):
    """GPT-2's byte-level BPE built from the two files of OpenAI's model download,
    encoding in tiktoken. Read here rather than through tiktoken's loader, which
    copies every file it reads into its cache folder."""
    try:
        tokenizer = BPETokenizer.from_files(encoder_json, vocab_bpe)
    except ValueError as err:
        raise ValueError(f"{err} Delete both to download them again.") from None
    if tokenizer.n_vocab != 50257:
        raise ValueError(f"{encoder_json} ({tokenizer.n_vocab} tokens) and {vocab_bpe} are not "
                         "GPT-2's vocabulary; delete both to download them again.")
    return tokenizer.to_tiktoken("gpt2-local")


def local_bpe_tokenizer(models_dir):
    """GPT-2's encoding from the encoder.json and vocab.bpe of a model download
    under models_dir/*/ (ch05_load_gpt2.py's), or None when there are none."""
    for encoder in sorted(Path(models_dir).glob("*/encoder.json")):
        vocab = encoder.with_name("vocab.bpe")
        if vocab.exists():
            return gpt2_tokenizer_from_files(encoder, vocab)
    return None


def tokenizer_files(folder):
    """{"encoder.json": its text, "vocab.bpe": its text} of a tokenizer folder."""
    folder = Path(folder)
    if not (folder / "encoder.json").is_file() or not (folder / "vocab.bpe").is_file():
        raise FileNotFoundError(f"{folder} holds no tokenizer: it needs encoder.json and "
                                "vocab.bpe (what `python ch02_data.py --train-bpe` writes).")
    return {name: read_text(folder / name) for name in ("encoder.json", "vocab.bpe")}


def tokenizer_from_folder(folder):
    """A tokenizer folder of --train-bpe (or GPT-2's own files) as a tiktoken
    encoding named after its files' hash: token files made with another
    tokenizer are never mistaken for its own."""
    encoding = saved_tokenizer(tokenizer_files(folder), f"The files in {folder}")
    if EOT not in encoding.special_tokens_set:
        raise ValueError(f"The tokenizer in {folder} has no {EOT} token, which separates "
                         "documents: train it again with the default special tokens.")
    return encoding


def saved_tokenizer(files, source="The tokenizer's files"):
    """The tiktoken encoding of a tokenizer's two files, as tokenizer_files reads them."""
    digest = hashlib.sha1("\0".join(files[k] for k in sorted(files)).encode()).hexdigest()
    tokenizer = BPETokenizer.from_texts(files["encoder.json"], files["vocab.bpe"], source)
    encoding = tokenizer.to_tiktoken(f"bpe-{digest[:12]}")
    encoding.files = files  # what a model file records of the tokenizer it was trained with
    return encoding


def bpe_merges(ranks):
    """GPT-2's merges (vocab.bpe, Hugging Face's merges.txt) in rank order, from
    tiktoken's ranks alone: byte-level BPE run on a token's bytes with only the
    merges ranked below it ends at the two parts whose merge the token is."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        if len(splits) == 1:  # the only way to make it from two earlier tokens
            merges.append(splits[0])
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"The tokenizer's token {token!r} is no merge of two earlier "
                             "tokens: it is not a byte-level BPE vocabulary.")
        merges.append(tuple(parts))
    return merges


@functools.cache
def hf_vocabulary_files(tokenizer):
    """vocab.json and merges.txt of Hugging Face's GPT-2 tokenizer for tiktoken's
    encoding: GPT-2's own two files under Hugging Face's names."""
    files = BPETokenizer.from_tiktoken(tokenizer).files()
    return {"vocab.json": files["encoder.json"], "merges.txt": files["vocab.bpe"]}


# ---- Beyond the book: fixed sinusoidal positions (the original transformer's) ----

def sinusoidal_position_encoding(context_length, dim):
    """(context_length, dim) sines on even and cosines on odd columns, wavelengths
    growing geometrically to 10000*2*pi: the alternative to a learned pos_emb."""
    positions = torch.arange(context_length, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32)
                            * (-np.log(10000.0) / dim))
    encoding = torch.zeros(context_length, dim)
    encoding[:, 0::2] = torch.sin(positions * frequencies)
    encoding[:, 1::2] = torch.cos(positions * frequencies[: dim // 2])
    return encoding


def count_tokens_cl100k(text):
    """GPT-4's tokenizer for comparison; None when its vocabulary cannot be had."""
    try:
        return len(tiktoken.get_encoding("cl100k_base").encode(text))
    except Exception:  # offline and not in tiktoken's cache: any fetch error
        return None


# ---- Beyond the book: the command that trains a tokenizer (--train-bpe) ----

def train_bpe(settings):
    """Learn a BPE vocabulary from text files and save it in GPT-2's format."""
    files = collect_text_files(settings["train_bpe"], "--train-bpe")
    out = Path(settings["tokenizer_out"])
    for name in ("encoder.json", "vocab.bpe"):
        if (out / name).exists() and not settings["overwrite"]:
            raise FileExistsError(f"{out} already holds a tokenizer ({name}). Replace it with "
                                  "--overwrite, or give another --tokenizer-out.")
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out, "--tokenizer-out")
    text = EOT.join(read_text(f) for f in files)
    tokenizer = BPETokenizer().train(text, settings["vocab_size"], progress=True)
    n_merges, seconds = len(tokenizer.merges), tokenizer.merge_seconds
    print(f"Learned {n_merges:,} merges from {len(text.encode()) / 1e6:.2f} MB of text "
          f"({len(files)} file(s)) in {seconds:.2f} s: {n_merges / seconds:,.0f} merges/s")
    if tokenizer.n_vocab < settings["vocab_size"]:
        print(f"Note: the text has no more pairs to merge; the vocabulary has "
              f"{tokenizer.n_vocab:,} tokens, not {settings['vocab_size']:,}.")
    print("Its last merges:", ", ".join(repr(tokenizer.decode_bytes([i]).decode(errors="replace"))
                                         for i in range(tokenizer.n_vocab - 6,
                                                        tokenizer.n_vocab - 1)))
    sample = "Every effort moves you"
    print(f"{sample!r} in its tokens:", [tokenizer.decode([i]) for i in tokenizer.encode(sample)])
    fast = tokenizer.to_tiktoken("trained")
    n_ours = len(fast.encode(text, allowed_special="all"))
    try:
        n_gpt2 = f"{len(bpe_tokenizer().encode(text, allowed_special='all')):,}"
    except DownloadError:
        n_gpt2 = "n/a (offline)"
    print(f"The text in tokens: {n_ours:,} with this vocabulary of {tokenizer.n_vocab:,}, "
          f"{n_gpt2} with GPT-2's of 50,257")
    tokenizer.save(out)
    print(f"Saved {out / 'encoder.json'} and {out / 'vocab.bpe'}; pretrain with it: "
          f"python ch05_train.py --tokenizer {out}")
    return tokenizer


# ---- The chapter's demo ----

def main(args):
    if args.train_bpe:
        return train_bpe(vars(args))
    raw_text = load_the_verdict(args.data, args.data_dir)
    # Beyond the book: the demo's batches need this many tokens of the user's text
    needed = max(8 * 4, args.batch_size * args.context_length) + 1
    n_tokens = len(bpe_tokenizer().encode(raw_text, allowed_special={"<|endoftext|>"}))
    if n_tokens < needed:
        raise ValueError(f"The text has {n_tokens} tokens, but the demo's batches need "
                         f"{needed} (8 windows of 4, and --batch-size x --max-length, plus "
                         "one): give a longer --text.")
    print("Total number of characters:", len(raw_text))
    print(raw_text[:99])

    # 2.2-2.4: the simple tokenizers
    preprocessed = split_text(raw_text)
    print("Tokens after the regex split:", len(preprocessed))
    vocab = build_vocab(raw_text)
    print("Vocabulary size:", len(vocab))
    tokenizer = SimpleTokenizerV1(vocab)
    text = """"It's the last he painted, you know,"
           Mrs. Gisburn said with pardonable pride."""
    if not all(word in vocab for word in split_text(text)):  # another text than the book's
        text = " ".join(preprocessed[:12])
        print("(Your text lacks words of the book's sentence: encoding its first words.)")
    ids = tokenizer.encode(text)
    print("SimpleTokenizerV1:", ids)
    print("  decoded:", tokenizer.decode(ids))

    vocab = build_vocab(raw_text, special_tokens=["<|endoftext|>", "<|unk|>"])
    print("Vocabulary size with special tokens:", len(vocab))
    tokenizer = SimpleTokenizerV2(vocab)
    text = " <|endoftext|> ".join(("Hello, do you like tea?",
                                   "In the sunlit terraces of the palace."))
    print("SimpleTokenizerV2:", tokenizer.encode(text))
    print("  decoded:", tokenizer.decode(tokenizer.encode(text)))

    # 2.5: BPE
    tokenizer = bpe_tokenizer()
    text = ("Hello, do you like tea? <|endoftext|> In the sunlit terraces"
            "of someunknownPlace.")
    integers = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    print("BPE:", integers)
    print("  decoded:", tokenizer.decode(integers))
    enc_text = tokenizer.encode(raw_text)
    print("BPE tokens (gpt2) in the text:", len(enc_text))
    n_cl100k = count_tokens_cl100k(raw_text)
    print("BPE tokens (cl100k_base) in the text:",
          n_cl100k if n_cl100k is not None else
          "n/a (its vocabulary is not in tiktoken's cache and could not be downloaded)")

    return sliding_windows_and_embeddings(raw_text, args)


def sliding_windows_and_embeddings(raw_text, args):
    """The demo's 2.6 to 2.8: windows of the text, then their embeddings."""
    # 2.6: sliding windows
    dataloader = create_dataloader_v1(raw_text, batch_size=1, max_length=4, stride=1,
                                      shuffle=False)
    data_iter = iter(dataloader)
    print("First batch:", next(data_iter))
    print("Second batch:", next(data_iter))
    dataloader = create_dataloader_v1(raw_text, batch_size=8, max_length=4, stride=4,
                                      shuffle=False)
    inputs, targets = next(iter(dataloader))
    print("Inputs:\n", inputs)
    print("Targets:\n", targets)

    # 2.7-2.8: token and position embeddings
    torch.manual_seed(123)
    embedding_layer = torch.nn.Embedding(6, 3)
    print("Embedding weights:\n", embedding_layer.weight)
    print("Embedding of ids [2, 3, 5, 1]:\n", embedding_layer(torch.tensor([2, 3, 5, 1])))

    vocab_size, output_dim, context_length = 50257, args.emb_dim, args.context_length
    token_embedding_layer = torch.nn.Embedding(vocab_size, output_dim)
    pos_embedding_layer = torch.nn.Embedding(context_length, output_dim)
    dataloader = create_dataloader_v1(raw_text, batch_size=args.batch_size,
                                      max_length=args.context_length, stride=args.context_length,
                                      shuffle=False)
    inputs, targets = next(iter(dataloader))
    token_embeddings = token_embedding_layer(inputs)
    pos_embeddings = pos_embedding_layer(torch.arange(context_length))
    input_embeddings = token_embeddings + pos_embeddings
    print("Token embeddings:", tuple(token_embeddings.shape))
    print("Learned position embeddings:", tuple(pos_embeddings.shape))
    print("Sinusoidal position encoding:",
          tuple(sinusoidal_position_encoding(context_length, output_dim).shape))
    print("Input embeddings:", tuple(input_embeddings.shape))
    return input_embeddings


def build_parser():
    parser = argparse.ArgumentParser(
        description="Chapter 2 demo: tokenizers, sliding-window dataloader, embeddings.",
        formatter_class=HelpFormatter,
        epilog='examples:\n  python ch02_data.py --data my_text.txt --context-length 8\n'
               '  python ch02_data.py --train-bpe the-verdict.txt --vocab-size 1000 '
               '--tokenizer-out my_tokenizer')
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="UTF-8 text file to use; default: download the book's "
                             "the-verdict.txt into --data-dir")
    parser.add_argument("--text", dest="data", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # the earlier name, still accepted
    parser.add_argument("--data-dir", default="data",
                        help="folder for downloaded data")
    parser.add_argument("--batch-size", type=number(int, at_least=1), default=8,
                        help="batch size of the embedding demo")
    parser.add_argument("--context-length", type=number(int, at_least=1), default=4,
                        help="tokens per window (the book's max_length) in the embedding demo")
    parser.add_argument("--max-length", dest="context_length", type=number(int, at_least=1),
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--emb-dim", type=number(int, at_least=1), default=256,
                        help="embedding size in the embedding demo")
    bpe = parser.add_argument_group("training a BPE tokenizer (instead of the demo)")
    bpe.add_argument("--train-bpe", nargs="+", metavar="FILE_OR_FOLDER",
                     help="learn a byte-level BPE vocabulary (GPT-2's kind) from these UTF-8 "
                          "files (folders: their *.txt)")
    bpe.add_argument("--vocab-size", type=number(int, at_least=257, at_most=2 ** 16),
                     default=1000, help="tokens in the vocabulary: the 256 bytes, the merges "
                                        "and <|endoftext|>")
    bpe.add_argument("--tokenizer-out", default="tokenizer", metavar="DIR",
                     help="folder for the tokenizer's encoder.json and vocab.bpe (GPT-2's "
                          "format); ch05_train.py --tokenizer DIR pretrains with it")
    bpe.add_argument("--overwrite", action="store_true",
                     help="replace a tokenizer already in --tokenizer-out")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    run_command(main, parse_args(),
                "A cut download's .part file is kept and resumes next time.")
