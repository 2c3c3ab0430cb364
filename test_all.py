"""Tests for every chapter file: `pytest test_all.py -rs`.

The data files they read (TEST_FILES) come from ../shared beside the project
when it is there, or from the folder TEST_SHARED_DIR names; else they are
downloaded once into .test-data/ with the project's checked downloads
($TEST_DATA_URL names a mirror of the same layout, tried first). Download code
is tested against HTTP servers on 127.0.0.1 started by the tests themselves.
Tests that need TensorFlow or transformers say so in one line where they are
missing (and fail under CI=true, where .ci/run installs them).
"""
import argparse
import collections
import concurrent.futures
import contextlib
import csv
import errno
import hashlib
import http.server
import importlib
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest.mock
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from torch.utils.data import DataLoader

import bench
import ch02_data as ch02
import ch03_attention as ch03
import ch04_gpt as ch04
import ch05_generate as gen
import ch05_load_gpt2 as gpt2
import ch05_train as ch05
import ch06_classify as ch06
import ch07_data as ch07d
import ch07_instruct as ch07

HERE = Path(__file__).resolve().parent
# The files the tests read, where each is published, and its SHA-256 (None: checked
# by what it holds): the book's, OpenAI's GPT-2 vocabulary, the SMS Spam Collection
TEST_FILES = {
    "data/the-verdict.txt": (
        [ch02.VERDICT_URL], "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"),
    "data/instruction-data.json": (
        [ch07.DATA_URL], "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),
    "data/instruction-data-with-preference.json": ([ch07.PREFERENCE_URL], ch07.PREFERENCE_SHA256),
    "data/sms_spam_collection.zip": ([ch06.SPAM_URL, ch06.SPAM_BACKUP_URL], None),
    "gpt2_vocab/encoder.json": ([f"{base}/124M/encoder.json" for base in gpt2.BASE_URLS],
                                "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "gpt2_vocab/vocab.bpe": ([f"{base}/124M/vocab.bpe" for base in gpt2.BASE_URLS],
                             "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def data_files_folder():
    """TEST_SHARED_DIR; else ../shared beside the project (CI's copy); else
    .test-data/ in the project (git-ignored), which the tests fill themselves."""
    if os.environ.get("TEST_SHARED_DIR"):
        return Path(os.environ["TEST_SHARED_DIR"])
    beside = HERE.parent / "shared"
    return beside if (beside / "data" / "the-verdict.txt").exists() else HERE / ".test-data"


SHARED = data_files_folder()
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


def fetch_test_files(folder, files=TEST_FILES, mirror=None, say=print):
    """Download the files of `files` missing in `folder` (a mirror of the same
    layout first), each checked; returns the names fetched. What cannot be had
    is one error listing exactly what to put where."""
    missing = [name for name in files if not (folder / name).exists()]
    if missing:
        say(f"Fetching the tests' data files into {folder} (once): {', '.join(missing)}")
    failed = []
    for name in missing:
        urls, sha256 = files[name]
        urls = ([f"{mirror.rstrip('/')}/{name}"] if mirror else []) + list(urls)
        try:
            path = ch02.download_file(urls[0], folder / name, backup_urls=urls[1:], retries=2,
                                      backoff=0.2, timeout=30)
        except ch02.DownloadError:
            failed.append(name)
            continue
        problem = downloaded_file_problem(path, sha256)
        if problem:
            failed.append(f"{name} (the download {problem}; kept as "
                          f"{ch02.move_aside(path).name})")
    if failed:
        raise ch02.DownloadError(
            f"The tests need these files in {folder}, and they could not be downloaded (no "
            f"network?): {'; '.join(failed)}. Copy them there from a machine that has them "
            "(the layout: data/ and gpt2_vocab/), or set TEST_SHARED_DIR to a folder that "
            "holds them.")
    return missing


def downloaded_file_problem(path, sha256):
    """What is wrong with a downloaded test file, or None."""
    if sha256:
        digest = ch02.sha256_of(path)
        return None if digest == sha256 else f"has SHA-256 {digest[:12]}..., not {sha256[:12]}..."
    try:
        with ch06.zipfile.ZipFile(path) as archive:
            return None if "SMSSpamCollection" in archive.namelist() else "holds no SMSSpamCollection"
    except ch06.zipfile.BadZipFile:
        return "is no zip archive"


def optional(module, why):
    """An optional package a test needs: imported, or the test skipped with one
    line saying how to install it. Under CI=true (.ci/run installs it) a missing
    one fails the test: a test that skips in CI would be a test that does not exist."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"needs {module} ({why}): pip install -r .ci/test-requirements.txt"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


TINY = ch04.gpt_config("tiny", context_length=32, vocab_size=50257, drop_rate=0.0)
SMALL_VOCAB = 1000  # for random token ids: a training step is about 10x faster than at 50,257


def tiny_model(seed=0, **overrides):
    """The tests' one model: TINY with `overrides`, built after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return ch04.GPTModel({**TINY, **overrides})


# Tests that touch devices run on each: the CPU always (CI), CUDA where there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def verdict_path():
    return SHARED / "data" / "the-verdict.txt"


@pytest.fixture(scope="session")
def verdict(verdict_path):
    return ch02.read_text(verdict_path)


@pytest.fixture(scope="session")
def tokenizer():
    return ch02.bpe_tokenizer()


# ---- Local HTTP servers: downloads (FileServer) and Ollama's API (StubOllama) ----

class LocalServer:
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler`, in a thread."""

    def __init__(self, handler):
        handler.log_message = lambda *args: None  # no request lines in the test output
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # a short poll: shutdown() waits for it, at every test's end
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    """serve(FileServer, files) or serve(StubOllama, answer): a server for this test."""
    servers = []

    def start(kind, arg, **options):
        servers.append(kind(arg, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class FileServer(LocalServer):
    """Serves `files` ({url path: bytes}) on 127.0.0.1 with Range support.

    `cut_short` names paths whose next response stops halfway; `missing` names
    paths that answer 404; `wrong_once` ({path: bytes}) is served, with status
    200, instead of the file, once. Each file has an ETag (unless `validators`
    is false, as on some servers), and an If-Range that does not match it gets
    the whole file. Every request is logged in `requests`.
    """

    def __init__(self, files, validators=True):
        self.files, self.cut_short, self.missing, self.requests = dict(files), set(), set(), []
        self.wrong_once, self.validators = {}, validators
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.wrong_once.pop(self.path, None) or server.files.get(self.path)
                if data is None or self.path in server.missing:
                    self.send_error(404)
                    return
                start, etag = 0, f'"{hash(data) & 0xFFFFFFFF:x}"'
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if self.headers.get("If-Range", etag) != etag:
                    match = None  # the file changed since the part was fetched: send it whole
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if server.validators:
                    self.send_header("ETag", etag)
                self.end_headers()
                if self.path in server.cut_short:
                    server.cut_short.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture(scope="session", autouse=True)
def data_files(pytestconfig):
    """The data files, fetched once into .test-data/ when there is no ../shared;
    a folder named by TEST_SHARED_DIR is only read, never written."""
    missing = [name for name in TEST_FILES if not (SHARED / name).exists()]
    if not missing:
        return SHARED
    if SHARED != HERE / ".test-data":
        pytest.exit(f"The tests need these files in {SHARED} (TEST_SHARED_DIR): "
                    f"{', '.join(missing)}. Copy them there, or unset TEST_SHARED_DIR to "
                    "download them.", returncode=1)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the user sees why the first run waits
        try:
            fetch_test_files(SHARED, mirror=os.environ.get("TEST_DATA_URL"))
        except ch02.DownloadError as err:
            pytest.exit(str(err), returncode=1)
    return SHARED


def args_of(chapter, argv):
    """A command's arguments, parsed as its __main__ parses them: the one way
    the tests build them."""
    return chapter.parse_args(argv)


# ======= Chapter 2: the book's listings =======


def test_vocabulary_sizes_are_the_books(verdict):
    assert len(ch02.split_text(verdict)) == 4690
    assert len(ch02.build_vocab(verdict)) == 1130
    vocab = ch02.build_vocab(verdict, special_tokens=["<|endoftext|>", "<|unk|>"])
    assert len(vocab) == 1132
    assert list(vocab)[-2:] == ["<|endoftext|>", "<|unk|>"]
    assert list(vocab)[:-2] == sorted(list(vocab)[:-2])


def test_simple_tokenizers_round_trip(verdict):
    tok = ch02.SimpleTokenizerV1(ch02.build_vocab(verdict))
    ids = tok.encode(verdict)
    assert tok.encode(tok.decode(ids)) == ids
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    # punctuation goes back without a space before it
    assert tok.decode(tok.encode(text)) == \
        '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'

    tok2 = ch02.SimpleTokenizerV2(
        ch02.build_vocab(verdict, special_tokens=["<|endoftext|>", "<|unk|>"]))
    ids = tok2.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace.")
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tok2.decode(ids).count("<|unk|>") == 2 and "<|endoftext|>" in tok2.decode(ids)


def test_simple_tokenizer_v1_names_unknown_word(verdict):
    tok = ch02.SimpleTokenizerV1(ch02.build_vocab(verdict))
    with pytest.raises(ValueError, match="'Zanzibar' is not in the vocabulary"):
        tok.encode("the Zanzibar")


def test_bpe_special_token_and_round_trip(tokenizer):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terracesof someunknownPlace."
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252,
                   18250, 8812, 2114, 1659, 617, 34680, 27271, 13]
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 4), (8, 3), (16, 20), (256, 128)])
def test_dataloader_windows_are_slices_with_shifted_targets(verdict, tokenizer, max_length, stride):
    ids = torch.tensor(tokenizer.encode(verdict))
    loader = ch02.create_dataloader_v1(verdict, batch_size=3, max_length=max_length,
                                       stride=stride, shuffle=False, drop_last=False)
    starts = list(range(0, len(ids) - max_length, stride))
    assert len(loader.dataset) == len(starts)
    inputs = torch.cat([x for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    expected_in = torch.stack([ids[i:i + max_length] for i in starts])
    expected_out = torch.stack([ids[i + 1:i + max_length + 1] for i in starts])
    assert torch.equal(inputs, expected_in) and torch.equal(targets, expected_out)
    assert inputs.dtype == torch.long


def test_dataset_keeps_one_token_array():
    tokens = np.arange(10_000, dtype=np.uint16)
    dataset = ch02.GPTDatasetV1.from_token_ids(tokens, max_length=8, stride=1)
    assert dataset.token_ids is tokens  # windows are sliced on access, not stored
    x, y = dataset[9990]
    assert x.tolist() == list(range(9990, 9998)) and y.tolist() == list(range(9991, 9999))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_too_short_text_says_how_many_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"has 4 tokens, but one window of max_length=8 needs 9"):
        ch02.GPTDatasetV1("Every effort moves you", tokenizer, max_length=8, stride=1)


def test_chapter2_main(verdict_path):
    args = args_of(ch02, ["--data", str(verdict_path), "--emb-dim", "64"])
    assert ch02.main(args).shape == (8, 4, 64)


# ---- Chapter 2, beyond the book: files, downloads, token files, fixed positions ----


def test_offline_tokenizer_and_missing_gpu_errors_say_what_to_do(monkeypatch):
    def offline(name):
        raise ch02.requests.ConnectionError("HTTPSConnectionPool(host='openaipublic...')")
    monkeypatch.setattr(ch02.tiktoken, "get_encoding", offline)
    with pytest.raises(ch02.DownloadError, match=r"tiktoken could not download GPT-2's "
                                                 r"vocabulary .*set TIKTOKEN_CACHE_DIR"):
        ch02.bpe_tokenizer()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for build, words in [(None, "this PyTorch is a CPU build"),
                         ("12.4", "this PyTorch is built for CUDA 12.4, but no GPU answers")]:
        monkeypatch.setattr(torch.version, "cuda", build)
        with pytest.raises(ValueError, match=rf"--device cuda was asked for.*\({words}"):
            ch04.get_device("cuda", log=lambda *a: None)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        ch02.read_text(tmp_path / "nothere.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("one\ntwo\ncafé\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt, line 3, is not UTF-8 text \(byte 0xe9"):
        ch02.read_text(bad)
    with pytest.raises(ValueError, match=r"latin1\.txt, line 3, is not UTF-8"):
        list(ch02.iter_text_blocks(bad))


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "sub" / "out.json"
    ch02.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with ch02.atomic_path(target) as tmp:
            tmp.write_text("half a fi", encoding="utf-8")
            raise RuntimeError("crash while writing")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no .tmp left
    ch02.write_text_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "new"


def test_an_unwritable_out_is_named_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    with pytest.raises(OSError, match=rf"^--out {re.escape(str(tmp_path / 'a_file' / 'x'))}: "
                                      rf"{re.escape(str(tmp_path / 'a_file'))} is a file, not a "
                                      r"folder\. Choose another --out\.$"):
        ch02.check_writable(tmp_path / "a_file" / "x")
    with read_only_folders():
        for check in (ch02.check_writable, lambda f: ch05.run_lock(f).__enter__()):
            with pytest.raises(OSError, match=rf"^--out {re.escape(str(tmp_path / 'ro'))} cannot "
                                              r"be written to \(Permission denied\)\. Choose "
                                              r"another --out, or make it writable\.$"):
                check(tmp_path / "ro")


@contextlib.contextmanager
def read_only_folders():
    """Every folder answers a write as a read-only one does (root may write anywhere)."""
    def read_only(self, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_bytes", read_only)
        yield mp


def test_a_fresh_clone_fetches_the_tests_data_once_or_names_what_to_put_where(serve, tmp_path):
    published = {name: (SHARED / name).read_bytes() for name in TEST_FILES}
    server = serve(FileServer, {f"/pub/{name}": data for name, data in published.items()})
    files = {name: ([f"{server.url}/pub/{name}"], sha) for name, (_, sha) in TEST_FILES.items()}
    folder, said = tmp_path / ".test-data", []
    assert fetch_test_files(folder, files, say=said.append) == list(TEST_FILES)
    assert said == [f"Fetching the tests' data files into {folder} (once): "
                    f"{', '.join(TEST_FILES)}"]
    assert all((folder / name).read_bytes() == data for name, data in published.items())
    requests = len(server.requests)
    assert fetch_test_files(folder, files, say=said.append) == [] and len(said) == 1
    assert len(server.requests) == requests  # once: later runs read what is there
    # a mirror ($TEST_DATA_URL) is asked first; a file that is not the published one is
    # moved aside and named, and so is one that cannot be had at all
    server.files["/mirror/data/the-verdict.txt"] = b"an error page"
    server.missing.add("/pub/data/instruction-data.json")
    with pytest.raises(ch02.DownloadError, match=(
            rf"^The tests need these files in {re.escape(str(tmp_path / 'again'))}, and they "
            r"could not be downloaded \(no network\?\): data/the-verdict\.txt \(the download "
            r"has SHA-256 [0-9a-f]{12}\.\.\., not b41e41a68f03\.\.\.; kept as the-verdict\.txt\."
            r"damaged\); data/instruction-data\.json\. Copy them there .* or set TEST_SHARED_DIR")):
        fetch_test_files(tmp_path / "again", files, mirror=server.url + "/mirror",
                         say=said.append)
    assert (tmp_path / "again" / "gpt2_vocab" / "vocab.bpe").exists()  # the rest are kept


def test_download_file_reuses_existing_and_falls_back(serve, tmp_path):
    server = serve(FileServer, {"/a/f.txt": b"hello" * 1000, "/b/f.txt": b"hello" * 1000})
    server.missing.add("/a/f.txt")
    dest = tmp_path / "sub" / "f.txt"
    ch02.download_file(server.url + "/a/f.txt", dest, backup_urls=[server.url + "/b/f.txt"],
                       backoff=0)
    assert dest.read_bytes() == b"hello" * 1000
    # a 404 is not retried: one request to the primary, then the backup
    assert [p for p, _ in server.requests] == ["/a/f.txt", "/b/f.txt"]
    ch02.download_file(server.url + "/a/f.txt", dest)
    assert len(server.requests) == 2  # already there: no request at all
    assert not list(tmp_path.rglob("*.part"))


def test_download_file_resumes_a_cut_download(serve, tmp_path):
    data = bytes(range(256)) * 1600  # 400 kB: several 64 kB chunks
    server = serve(FileServer, {"/f.bin": data})
    server.cut_short.add("/f.bin")
    dest = tmp_path / "f.bin"
    with pytest.raises(ch02.DownloadError) as err:
        ch02.download_file(server.url + "/f.bin", dest, retries=1)
    assert "f.bin" in str(err.value) and server.url in str(err.value)
    assert "place it at" in str(err.value)
    assert not dest.exists()  # nothing under the final name
    part = tmp_path / "f.bin.part"
    have = part.stat().st_size
    assert 0 < have < len(data)
    ch02.download_file(server.url + "/f.bin", dest)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("/f.bin", f"bytes={have}-")  # resumed, not restarted


def test_a_part_file_is_resumed_only_when_it_is_the_same_files(serve, tmp_path):
    data = bytes(range(256)) * 40
    server = serve(FileServer, {"/f.bin": data})
    part = tmp_path / "f.bin.part"
    part.write_bytes(b"bytes of some other file")  # no note: of unknown origin
    ch02.download_file(server.url + "/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == data and server.requests[-1][1] is None
    assert not list(tmp_path.glob("*.part*"))
    # a part of this URL, but the file changed on the server since: If-Range restarts it
    part.write_bytes(data[:1000])
    (tmp_path / "f.bin.part.json").write_text(json.dumps(
        {"url": server.url + "/f.bin", "validator": '"an-older-etag"'}), encoding="utf-8")
    (tmp_path / "f.bin").unlink()
    server.files["/f.bin"] = data[::-1]
    ch02.download_file(server.url + "/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == data[::-1]


def test_a_part_from_a_server_without_validators_is_fetched_anew(serve, tmp_path):
    """No ETag or Last-Modified: a resumed .part could join bytes of two versions
    of the file, reaching the right size with the wrong bytes."""
    old, new = bytes(range(256)) * 1600, bytes(range(255, -1, -1)) * 1600
    server = serve(FileServer, {"/f.bin": old}, validators=False)
    server.cut_short.add("/f.bin")
    with pytest.raises(ch02.DownloadError):
        ch02.download_file(server.url + "/f.bin", tmp_path / "f.bin", retries=1)
    assert 0 < (tmp_path / "f.bin.part").stat().st_size < len(old)
    server.files["/f.bin"] = new  # the file changed on the server meanwhile
    ch02.download_file(server.url + "/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == new
    assert server.requests[-1] == ("/f.bin", None)  # from byte 0, not resumed


def test_token_file_matches_in_memory_windows(tmp_path, verdict, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(verdict[:9000], encoding="utf-8")
    (docs / "b.txt").write_text(verdict[9000:], encoding="utf-8")
    files = ch02.collect_text_files([docs])
    logs = []
    tokens = ch02.build_token_file(files, tmp_path / "cache", tokenizer, log=logs.append)
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    in_memory = ch02.GPTDatasetV1(verdict[:9000] + "<|endoftext|>" + verdict[9000:] +
                                  "<|endoftext|>", tokenizer, 64, 17)
    mapped = ch02.GPTDatasetV1.from_token_ids(tokens, 64, 17)
    assert len(mapped) == len(in_memory)
    for i in (0, 1, len(mapped) // 2, len(mapped) - 1):
        assert all(torch.equal(a, b) for a, b in zip(mapped[i], in_memory[i]))
    assert "tokens/s" in logs[0]
    ch02.build_token_file(files, tmp_path / "cache", tokenizer, log=logs.append)
    assert logs[-1].startswith("Reusing")
    (docs / "b.txt").write_text(verdict[9000:] + " more", encoding="utf-8")
    ch02.build_token_file(ch02.collect_text_files([docs]), tmp_path / "cache", tokenizer,
                          log=logs.append)
    assert "tokens/s" in logs[-1]  # the text changed: tokenized again


def test_sinusoidal_position_encoding():
    pe = ch02.sinusoidal_position_encoding(50, 16)
    assert pe.shape == (50, 16)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0] * 8))
    pos, i = 7, 3
    assert math.isclose(pe[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / 16)), rel_tol=1e-5)
    assert math.isclose(pe[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / 16)), rel_tol=1e-5)
    assert ch02.sinusoidal_position_encoding(5, 7).shape == (5, 7)


# ======= Chapter 2's bonus: BPE from scratch =======

MULTILINGUAL = ("Grüße aus München! Привет, мир. こんにちは世界。 مرحبا بالعالم 🙂🚀 naïve café "
                "ünïcödé   \n\n\t x  don't I'LL WE'VE 12345 3.14159 — ½ ‽ 東京 𝔘𝔫𝔦 \r\n end  ")


def naive_bpe_merges(text, n_merges):
    """An independent reference: every pair recounted before each merge (the
    bonus notebook's way), the most frequent first, ties to the smallest ids."""
    byte_id = {b: i for i, b in enumerate(ch02.gpt2_byte_symbols().values())}
    pieces = [p.encode() for chunk in text.split(ch02.EOT) if chunk
              for p in ch02.regex.findall(ch02.GPT2_PATTERN, chunk)]
    words = [[byte_id[b] for b in p] for p in pieces]
    vocab = {i: bytes([b]) for b, i in byte_id.items()}
    for _ in range(n_merges):
        counts = collections.Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        new = len(vocab)
        vocab[new] = vocab[pair[0]] + vocab[pair[1]]
        words = [ch02.merge_pair(w, pair, new) for w in words]
    return [vocab[i] for i in range(256, len(vocab))]


def test_bpe_trained_here_merges_as_a_full_recount_would_and_round_trips_any_text(
        verdict, tmp_path):
    text = verdict[:6000] + ch02.EOT + verdict[6000:9000]
    trained = ch02.BPETokenizer().train(text, 400)
    assert trained.n_vocab == 400 and trained.eot_token == 399
    assert trained.vocab[256:] == naive_bpe_merges(text, 143)  # same merges, same order
    for sample in (MULTILINGUAL, verdict, "", "<|endoftext|>", "a<|endoftext|>b 🙂" * 3):
        ids = trained.encode(sample, allowed_special={"<|endoftext|>"})
        assert trained.decode(ids) == sample
    assert trained.encode("x<|endoftext|>", allowed_special="all")[-1] == 399
    assert trained.encode("x<|endoftext|>", disallowed_special=()) != \
        trained.encode("x<|endoftext|>", allowed_special="all")
    with pytest.raises(ValueError, match="special token"):
        trained.encode("x<|endoftext|>")  # as tiktoken: not allowed, not silently text
    trained.save(tmp_path / "tok")
    loaded = ch02.BPETokenizer.load(tmp_path / "tok")
    assert loaded.vocab == trained.vocab and loaded.special_tokens == trained.special_tokens
    fast = ch02.tokenizer_from_folder(tmp_path / "tok")  # tiktoken with these ranks
    for sample in (MULTILINGUAL, verdict):
        assert fast.encode(sample, allowed_special="all") == \
            trained.encode(sample, allowed_special="all")
    (tmp_path / "tok" / "vocab.bpe").write_text("#version: 0.2\nh e\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not one byte-level BPE vocabulary"):
        ch02.BPETokenizer.load(tmp_path / "tok")
    with pytest.raises(ValueError, match="at least 257"):
        ch02.BPETokenizer().train(text, 100)


def test_gpt2s_own_files_encode_here_exactly_as_tiktoken(verdict, tokenizer):
    gpt2_files = SHARED / "gpt2_vocab"
    ours = ch02.BPETokenizer.from_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe")
    assert ours.n_vocab == tokenizer.n_vocab == 50257
    for text in (verdict, MULTILINGUAL, MULTILINGUAL + ch02.EOT + verdict[:500]):
        ids = ours.encode(text, allowed_special="all")
        assert ids == tokenizer.encode(text, allowed_special="all")
        assert ours.decode(ids) == text
    assert ours.files() == ch02.BPETokenizer.from_tiktoken(tokenizer).files()


def test_a_tokenizer_trained_here_pretrains_generates_and_goes_with_its_model(
        tmp_path, verdict_path, capsys):
    ch02.main(args_of(ch02, ["--train-bpe", str(verdict_path), "--vocab-size", "300",
                             "--tokenizer-out", str(tmp_path / "tok")]))
    assert "merges/s" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        ch02.main(args_of(ch02, ["--train-bpe", str(verdict_path), "--tokenizer-out",
                                 str(tmp_path / "tok")]))
    run = ch05.main(train_args(tmp_path / "run", "--tokenizer", str(tmp_path / "tok"),
                               "--max-steps", "2", "--memmap"))
    assert run["model"].tok_emb.weight.shape[0] == 300  # its vocabulary, not GPT-2's
    (tmp_path / "tok").rename(tmp_path / "gone")  # the model file carries its tokenizer
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    capsys.readouterr()
    generated = gen.main(args_of(gen, ["--from", str(checkpoint), "--max-new-tokens", "5",
                                       "--device", "cpu"]))
    assert generated["text"].startswith("Every effort moves you")  # GPT-2's ids would not fit
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer: it needs encoder\.json "
                                                r"and vocab\.bpe \(what `python ch02_data\.py "
                                                r"--train-bpe` writes\)"):
        ch05.main(train_args(tmp_path / "other", "--tokenizer", str(tmp_path / "tok")))
    (tmp_path / "gone" / "encoder.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="are not one byte-level BPE vocabulary"):
        ch05.main(train_args(tmp_path / "other", "--tokenizer", str(tmp_path / "gone")))
    with pytest.raises(ValueError, match="named corpus fineweb-edu is tokenized with GPT-2's"):
        ch05.main(train_args(tmp_path / "other", "--tokenizer", str(tmp_path / "gone"),
                             "--data", "fineweb-edu"))
    with pytest.raises(ValueError, match="tokenizer of its own"):
        ch07.base_model({"init_from": str(checkpoint)}, False)


# ======= Chapter 3: the book's listings =======


def test_simple_attention_matches_book():
    weights, context = ch03.simple_attention(ch03.INPUTS)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(6))
    assert torch.allclose(context[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4)


def test_seeded_attention_modules_match_book():
    batch = torch.stack((ch03.INPUTS, ch03.INPUTS))
    torch.manual_seed(123)
    assert torch.allclose(ch03.SelfAttention_v1(3, 2)(ch03.INPUTS)[1],
                          torch.tensor([0.3061, 0.8210]), atol=1e-4)
    torch.manual_seed(123)
    out = ch03.CausalAttention(3, 2, 6, 0.0)(batch)
    assert out.shape == (2, 6, 2)
    assert torch.allclose(out[0, 0], torch.tensor([-0.4519, 0.2216]), atol=1e-4)
    torch.manual_seed(123)
    assert ch03.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)(batch).shape == (2, 6, 4)
    torch.manual_seed(123)
    out = ch03.MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)(batch)
    assert out.shape == (2, 6, 2)
    assert torch.allclose(out[0, 0], torch.tensor([0.3190, 0.4858]), atol=1e-4)


def assert_causal(fn, x, change_at):
    """Changing position `change_at` leaves every earlier output unchanged."""
    out1 = fn(x)
    x2 = x.clone()
    x2[:, change_at] = x2[:, change_at] + 1 if x.is_floating_point() else (x2[:, change_at] + 1) % 50257
    out2 = fn(x2)
    assert torch.allclose(out1[:, :change_at], out2[:, :change_at], atol=1e-6)
    assert not torch.allclose(out1[:, change_at:], out2[:, change_at:])


@pytest.mark.parametrize("make", [
    lambda: ch03.CausalAttention(8, 8, 10, 0.0),
    lambda: ch03.MultiHeadAttentionWrapper(8, 4, 10, 0.0, num_heads=2),
    lambda: ch03.MultiHeadAttention(8, 8, 10, 0.0, num_heads=4),
])
def test_attention_is_causal(make):
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(2, 10, 8)
    for t in (1, 5, 9):
        assert_causal(module, x, t)


def test_multihead_attention_checks_head_split():
    with pytest.raises(ValueError, match=r"d_out \(10\) must be divisible by num_heads \(4\)"):
        ch03.MultiHeadAttention(8, 10, 16, 0.0, num_heads=4)


def test_chapter3_main_saves_heatmap(tmp_path):
    ch03.main(args_of(ch03, ["--out", str(tmp_path)]))
    png = (tmp_path / "causal_attention_weights.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


# ======= Chapter 4: the book's listings =======


@pytest.fixture(scope="module")
def gpt124m():
    torch.manual_seed(123)
    return ch04.GPTModel(ch04.GPT_CONFIG_124M).eval()


def test_parameter_counts_are_the_books(gpt124m):
    total = sum(p.numel() for p in gpt124m.parameters())
    assert total == 163_009_536
    assert total - gpt124m.out_head.weight.numel() == 124_412_160


def test_seeded_generation_is_the_books(gpt124m, tokenizer):
    idx = torch.tensor([tokenizer.encode("Hello, I am")])
    out = ch04.generate_text_simple(gpt124m, idx, max_new_tokens=10, context_size=1024)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348,
                             7267, 49706, 43231, 47062, 34657]]


def test_gpt_model_is_causal_and_shaped():
    model = tiny_model(1, vocab_size=SMALL_VOCAB).eval()
    idx = torch.randint(0, SMALL_VOCAB, (2, 12))
    assert model(idx).shape == (2, 12, SMALL_VOCAB)
    for t in (0, 6, 11):
        assert_causal(model, idx, t)


def test_dropout_only_in_training_mode():
    model = tiny_model(1, drop_rate=0.5, vocab_size=SMALL_VOCAB)
    idx = torch.randint(0, SMALL_VOCAB, (1, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_layer_norm_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32) * 5 + 3
    out = ch04.LayerNorm(32)(x)
    assert torch.allclose(out.mean(-1), torch.zeros(4, 7), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(4, 7), atol=1e-3)
    assert torch.allclose(ch04.LayerNorm(32)(x), torch.nn.functional.layer_norm(x, (32,)), atol=1e-5)


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 101)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.allclose(ch04.GELU()(x), expected, atol=1e-6)
    assert ch04.GELU()(torch.tensor(0.0)) == 0


def test_gpt_config_sizes():
    assert ch04.gpt_config("355M")["n_layers"] == 24
    assert ch04.gpt_config("1558M", qkv_bias=True)["emb_dim"] == 1600
    with pytest.raises(ValueError, match="Unknown model size '7B'"):
        ch04.gpt_config("7B")


def test_chapter4_main_runs_tiny():
    args = args_of(ch04, ["--max-new-tokens", "3", "--model-size", "tiny"])
    assert ch04.main(args).shape == (1, 7)  # "Hello, I am" and 3 new tokens


# ---- Chapters 3 and 4, beyond the book: the key-value cache and the fast kernels ----


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_every_attention_implementation_equals_the_books(qkv_bias, recwarn):
    """The same weights, the same outputs and gradients (to 1e-5), eight ways;
    FlexAttention has no backward on the CPU, so there its forward alone."""
    torch.manual_seed(0)
    mha = ch03.MultiHeadAttention(32, 32, 16, 0.0, 4, qkv_bias=qkv_bias).eval()
    x = torch.randn(2, 16, 32, requires_grad=True)
    expected = mha(x)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in [*mha.named_parameters(), ("x", x)]}
    implementations = ch03.attention_implementations()
    assert len(implementations) >= 7 and "FlexAttention" in implementations  # torch >= 2.5
    for name, attention in implementations.items():
        mha.zero_grad()
        x.grad = None
        if name == "FlexAttention" and x.device.type == "cpu":
            with torch.no_grad():
                assert torch.allclose(attention(mha, x), expected, atol=1e-5), name
            continue
        out = attention(mha, x)
        assert torch.allclose(out, expected, atol=1e-5), name
        out.sum().backward()
        for n, p in [*mha.named_parameters(), ("x", x)]:
            assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-5), (name, n)


def test_flops_counted_by_pytorch_equal_the_formula_mfu_uses(capsys):
    for cfg, context in ((TINY, 32), ({**TINY, **ch04.FAST_KERNELS}, 32),
                         (ch04.gpt_config("124M"), 128)):
        for training in (False, True):
            counted = ch04.counted_flops_per_token(cfg, context, training)
            assert counted == pytest.approx(ch04.flops_per_token(cfg, context, training),
                                            rel=0.02)
    assert bench.training_flops(TINY, 2, 32) == ch04.flops_per_token(TINY, 32) * 64
    rows = ch04.flops_table(["tiny"])
    assert rows[0]["params"] == sum(p.numel() for p in ch04.GPTModel(
        ch04.gpt_config("tiny")).parameters())
    assert "count/formula" in capsys.readouterr().out
    # the largest batch, searched by doubling and halving (the CPU never runs out: the limit)
    assert ch04.largest_batch(TINY, torch.device("cpu"), context=8, limit=5) == 5
    assert ch04.parse_args(["--flops", "--device", "cpu"]).flops


def test_chapters_3_and_4_copied_alone_build_gptmodel_with_torch_alone(tmp_path):
    """Copying a file is one way this repository is used: ch03_attention.py and
    ch04_gpt.py, alone in a folder where only torch can be imported, give GPTModel."""
    for name in ("ch03_attention.py", "ch04_gpt.py"):
        (tmp_path / name).write_bytes((HERE / name).read_bytes())
    code = f"""
import importlib.abc, sys
BLOCKED = {{"tiktoken", "requests", "tqdm", "numpy", "matplotlib", "ch02_data"}}
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Guard())
sys.path.insert(0, {str(tmp_path)!r})
import torch
from ch04_gpt import GPTModel, gpt_config
model = GPTModel(gpt_config("tiny", context_length=16, vocab_size=100))
print(tuple(model(torch.tensor([[1, 2, 3]])).shape), sorted(m for m in sys.modules if m.startswith("ch0")))
"""
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=120)  # -I: no current folder, no user site on sys.path
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(1, 3, 100) ['ch03_attention', 'ch04_gpt']"


def test_too_long_input_names_both_lengths():
    model = tiny_model()
    with pytest.raises(ValueError, match="has 33 tokens but the model's context_length is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["book", "sdpa"])
def test_cached_generation_equals_uncached(impl, device):
    model = tiny_model(0, context_length=16, attn_impl=impl,
                       vocab_size=SMALL_VOCAB).to(device).eval()
    idx = torch.randint(0, SMALL_VOCAB, (2, 5), device=device)
    # 30 new tokens: the 16-token window fills up, and the cache falls back to recomputing.
    # use_cache=True: a growing KVCache on the CPU, a CUDA graph over a StaticKVCache on
    # CUDA; "static": that cache without the graph
    greedy = gen.generate(model, idx, 30, 16)
    for use_cache in (True, "static"):
        assert torch.equal(gen.generate(model, idx, 30, 16, use_cache=use_cache), greedy)
        for kw in ({"temperature": 1.0, "top_k": 50}, {"temperature": 0.8, "top_p": 0.9}):
            torch.manual_seed(7)
            sampled = gen.generate(model, idx, 30, 16, **kw)
            torch.manual_seed(7)
            assert torch.equal(gen.generate(model, idx, 30, 16, use_cache=use_cache, **kw),
                               sampled)
    # a cache position beyond the context is refused, not silently wrong
    cache = ch04.new_kv_cache(model)
    model(idx.repeat(1, 3)[:, :15], kv_cache=cache)
    with pytest.raises(ValueError, match="has 17 tokens but the model's context_length is 16"):
        model(idx[:, :2], kv_cache=cache)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("impl", ["book", "sdpa"])
def test_cached_forward_matches_full_forward(impl, static):
    model = tiny_model(0, vocab_size=SMALL_VOCAB, attn_impl=impl).eval()
    idx = torch.randint(0, SMALL_VOCAB, (2, 12))
    cache = ch04.new_kv_cache(model, static=static)
    with torch.no_grad():
        parts = [model(idx[:, :5], kv_cache=cache), model(idx[:, 5:9], kv_cache=cache),
                 model(idx[:, 9:10], kv_cache=cache), model(idx[:, 10:], kv_cache=cache)]
        assert torch.allclose(torch.cat(parts, dim=1), model(idx), atol=1e-5)
    if static:  # the buffers keep their shape and place; the position is on the device
        assert cache[0].keys.shape[2] == 32 and int(cache[0].length) == 12


@pytest.mark.parametrize("device", DEVICES)
def test_fast_kernels_match_the_book_with_the_same_parameters(device):
    book = tiny_model(0, qkv_bias=True).to(device).eval()
    fast = tiny_model(1, qkv_bias=True, **ch04.FAST_KERNELS).to(device).eval()
    assert list(book.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(book.state_dict())
    kernels = lambda model: [(type(m).__name__, getattr(m, "attn_impl", None),  # noqa: E731
                              getattr(m, "fused", None), getattr(m, "fused_qkv", None),
                              getattr(m, "padded_head", None)) for m in model.modules()]
    assert kernels(ch04.use_fast_kernels(tiny_model(2, qkv_bias=True))) == kernels(fast)
    # 8 x 32 tokens: enough for the padded output head, whose rows are 50,304 apart
    x, y = (torch.randint(0, 50257, (8, 32), device=device) for _ in range(2))
    assert fast(x).stride(1) == 50304 and book(x).stride(1) == 50257
    losses = [ch05.calc_loss_batch(x, y, model, device) for model in (book, fast)]
    for loss in losses:
        loss.backward()
    tol = 1e-5 if device == "cpu" else 1e-4  # TF32 is off here: fp32 against fp32
    assert torch.isclose(losses[1], losses[0], rtol=tol)
    with torch.no_grad():
        assert torch.allclose(fast(x), book(x), atol=tol)
    for (name, a), b in zip(book.named_parameters(), fast.parameters()):
        assert torch.allclose(b.grad, a.grad, atol=tol), name
    # the fast path under bf16 autocast (as --fast trains on CUDA) stays within bf16's precision
    with torch.autocast(device, dtype=torch.bfloat16), torch.no_grad():
        assert math.isclose(ch05.calc_loss_batch(x, y, fast, device).item(), losses[0].item(),
                            rel_tol=1e-2)
    torch.manual_seed(0)
    mha = ch03.MultiHeadAttention(16, 16, 8, 0.0, num_heads=4).eval()
    sdpa = ch03.ExtendedMultiHeadAttention(16, 16, 8, 0.0, num_heads=4, attn_impl="sdpa",
                                           fused_qkv=True).eval()
    sdpa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 8, 16)
    assert torch.allclose(sdpa(x), mha(x), atol=1e-6)
    assert_causal(sdpa, x, 4)
    with pytest.raises(ValueError, match="attn_impl must be 'book' or 'sdpa'"):
        ch03.ExtendedMultiHeadAttention(16, 16, 8, 0.0, num_heads=4, attn_impl="flash")


# ======= Chapter 5: the book's listings =======


def test_untrained_loss_is_near_log_vocab(verdict, tokenizer):
    model = tiny_model(123).eval()
    loader = ch02.create_dataloader_v1(verdict, batch_size=4, max_length=32, stride=32,
                                       shuffle=False)
    with torch.no_grad():
        loss = ch05.calc_loss_loader(loader, model, "cpu", num_batches=5)
    assert abs(loss - math.log(50257)) < 0.3


def test_tiny_model_overfits_one_batch(verdict, tokenizer):
    model = tiny_model(123, vocab_size=SMALL_VOCAB)
    x, y = next(iter(ch02.create_dataloader_v1(verdict, batch_size=2, max_length=16,
                                               stride=16)))
    x, y = x % SMALL_VOCAB, y % SMALL_VOCAB
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = ch05.calc_loss_batch(x, y, model, "cpu").item()
    for _ in range(50):
        optimizer.zero_grad()
        loss = ch05.calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first


def test_calc_loss_loader_num_batches_and_empty():
    model = tiny_model(0, vocab_size=SMALL_VOCAB).eval()
    batches = [(torch.randint(0, SMALL_VOCAB, (2, 8)), torch.randint(0, SMALL_VOCAB, (2, 8)))
               for _ in range(4)]
    losses = [ch05.calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
    assert math.isclose(ch05.calc_loss_loader(batches, model, "cpu", num_batches=2),
                        sum(losses[:2]) / 2, rel_tol=1e-6)
    assert math.isclose(ch05.calc_loss_loader(batches, model, "cpu", num_batches=99),
                        sum(losses) / 4, rel_tol=1e-6)
    assert math.isnan(ch05.calc_loss_loader([], model, "cpu"))


def test_generate_greedy_top_k_and_eos(tokenizer):
    model = tiny_model(0).eval()
    idx = gen.text_to_token_ids("Every effort moves you", tokenizer)
    greedy = ch04.generate_text_simple(model, idx, 8, 32)
    assert torch.equal(gen.generate(model, idx, 8, 32), greedy)
    assert torch.equal(gen.generate(model, idx, 8, 32, temperature=1.0, top_k=1), greedy)
    # stop as soon as the end-of-sequence token would come next
    eos = greedy[0, idx.shape[1] + 2].item()
    assert torch.equal(gen.generate(model, idx, 8, 32, eos_id=eos), greedy[:, :idx.shape[1] + 2])
    # sampling is reproducible under a seed, and top-k keeps per-row thresholds in a batch
    torch.manual_seed(5)
    a = gen.generate(model, idx.repeat(3, 1), 6, 32, temperature=1.5, top_k=3)
    torch.manual_seed(5)
    assert torch.equal(a, gen.generate(model, idx.repeat(3, 1), 6, 32, temperature=1.5, top_k=3))
    assert gen.token_ids_to_text(idx, tokenizer) == "Every effort moves you"


def test_lr_schedule_warmup_peak_and_end():
    lrs = [ch05.lr_at_step(s, 100, 1e-3, 20, 1e-4, 1e-5) for s in range(100)]
    assert math.isclose(lrs[0], 1e-4) and lrs[10] == pytest.approx(5.5e-4)
    assert lrs[20] == pytest.approx(1e-3)  # the peak, right after warm-up
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # then only falling
    assert lrs[99] == pytest.approx(1e-5, abs=2e-6)


def test_the_commands_schedule_spans_the_steps_the_run_takes(tmp_path, capsys):
    """--max-steps 10 of a 10-epoch run: warm-up, peak and decay within those 10."""
    result = ch05.main(train_args(tmp_path, "--schedule", "cosine", "--max-steps", "10",
                                  "--lr", "1e-3", "--eval-freq", "5"))
    lrs = result["history"]["lrs"]
    assert len(lrs) == 10 and lrs[0] == pytest.approx(3e-5) and lrs[2] == pytest.approx(1e-3)
    assert lrs == [ch05.lr_at_step(s, 10, 1e-3, 2, 3e-5, 1e-6) for s in range(10)]
    assert lrs[-1] < 1e-4  # decayed within the run, not a tenth of the way up the warm-up
    assert "Learning rate: warm-up from 3e-05 to the peak 0.001 over 2 steps, then cosine " \
        f"decay to {lrs[-1]:.3g} at the last of 10 steps" in capsys.readouterr().out
    ch05.main(train_args(tmp_path / "constant", "--max-steps", "2"))
    assert "Learning rate: 0.0004 for all 2 steps" in capsys.readouterr().out


def test_a_run_says_how_long_it_will_take_and_when_evaluation_costs_too_much(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text((SHARED / "data" / "the-verdict.txt").read_text(encoding="utf-8") * 2,
                    encoding="utf-8")
    ch05.main(train_args(tmp_path / "a", "--data", str(text), "--max-steps", "12",
                         "--eval-freq", "1", "--eval-iter", "5"))
    out = capsys.readouterr().out
    assert re.search(r"Estimated time for the run: \d+ s more \(\d+ steps at [\d.]+ s each, "
                     r"evaluations included\)", out), out
    assert re.search(r"Evaluation takes \d+% of the time \(every 1 steps, 5 batches each\): a "
                     r"larger --eval-freq", out)
    book = train_args_argv(tmp_path / "b", "--max-steps", "12", "--eval-freq", "1")
    del book[:2]  # no --data: the book's text (here from --data-dir), the book's cadence
    ch05.main(args_of(ch05, [*book, "--data-dir", str(SHARED / "data")]))
    assert "Evaluation takes" not in capsys.readouterr().out
    # a model between tiny and 124M: any GPT-2 shape, heads dividing the width
    result = ch05.main(train_args(tmp_path / "c", "--n-layers", "3", "--emb-dim", "48",
                                  "--n-heads", "6", "--max-steps", "1"))
    cfg = gen.load_checkpoint(tmp_path / "c" / "checkpoint.pt")["config"]
    assert (cfg["n_layers"], cfg["emb_dim"], cfg["n_heads"]) == (3, 48, 6)
    assert len(result["model"].trf_blocks) == 3
    assert "Model: tiny reshaped: 3 layers, embedding size 48, 6 heads" in capsys.readouterr().out
    assert ch04.gpt_config("mini")["n_layers"] == 6 and ch04.gpt_config("mini")["emb_dim"] == 384
    with pytest.raises(SystemExit):
        train_args(tmp_path, "--emb-dim", "50", "--n-heads", "4")
    assert "--n-heads 4 does not divide the embedding size 50: each head takes an equal " \
        "share (try --n-heads 2)" in capsys.readouterr().err


def test_train_model_appendix_d_clips_after_warmup(verdict, tokenizer, monkeypatch):
    model = tiny_model(123)
    loader = ch02.create_dataloader_v1(verdict[:3000], batch_size=2, max_length=32, stride=32)
    clipped_at = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clipped_at.append(max_norm) or
                        real_clip(params, max_norm))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    *_, lrs = ch05.train_model(model, loader, loader, optimizer, "cpu", 2, 100, 1,
                               "Every", tokenizer, warmup_steps=3, initial_lr=1e-4, min_lr=1e-5)
    assert len(lrs) == 2 * len(loader) and lrs[0] == 1e-4 and lrs[3] == pytest.approx(1e-3)
    assert len(clipped_at) == len(lrs) - 3 and set(clipped_at) == {1.0}


# ---- Chapter 5, beyond the book: top-p, streaming, lean loading, bf16, fused AdamW ----


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = torch.isfinite(gen.top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.isfinite(gen.top_p_filter(logits, 0.8)).sum(-1).tolist() == [2, 2]
    assert torch.isfinite(gen.top_p_filter(logits, 0.81)).sum(-1).tolist() == [3, 3]
    assert torch.isfinite(gen.top_p_filter(logits, 0.01)).sum(-1).tolist() == [1, 1]
    torch.manual_seed(0)
    draws = {gen.sample_next_token(logits[:1], temperature=1.0, top_p=0.75).item()
             for _ in range(200)}
    assert draws == {0, 1}


def test_stream_text_prints_what_generate_returns(tokenizer):
    model = tiny_model(0).eval()
    idx = gen.text_to_token_ids("Every effort", tokenizer)
    out = io.StringIO()
    torch.manual_seed(3)
    new_ids = gen.stream_text(model, idx, tokenizer, 10, 32, out, temperature=1.0, top_k=20)
    torch.manual_seed(3)
    expected = gen.generate(model, idx, 10, 32, temperature=1.0, top_k=20)
    assert new_ids == expected[0, idx.shape[1]:].tolist()
    assert out.getvalue() == tokenizer.decode(new_ids)


def test_lean_loading_gives_the_plain_paths_logits(tmp_path):
    model = tiny_model(0).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    plain = tiny_model(1)
    plain.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    state_dict = torch.load(tmp_path / "m.pth", weights_only=True, mmap=True)
    lean = gen.build_lean(tiny_model, state_dict)
    assert all(p.device.type == "cpu" for p in lean.parameters())
    assert lean.tok_emb.weight.data_ptr() == state_dict["tok_emb.weight"].data_ptr()  # no copy
    idx = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        assert torch.equal(lean.eval()(idx), plain.eval()(idx))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_forward_trains_in_bf16_and_returns_fp32(device):
    """--fast's bf16 on CUDA: the book's losses and loops get fp32 logits."""
    model = tiny_model(0, vocab_size=SMALL_VOCAB).to(device)
    x, y = (torch.randint(0, SMALL_VOCAB, (2, 16), device=device) for _ in range(2))
    fp32_loss = ch05.calc_loss_batch(x, y, model, device)
    ch05.autocast_forward(model, torch.device(device))
    logits = model(x)
    assert logits.dtype == torch.float32 and torch.is_autocast_enabled(device) is False
    loss = ch05.calc_loss_batch(x, y, model, device)
    assert math.isclose(loss.item(), fp32_loss.item(), rel_tol=1e-2) and loss != fp32_loss
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert list(model.state_dict()) == list(tiny_model(0, vocab_size=SMALL_VOCAB).state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_takes_the_same_step(device):
    models = [tiny_model(0, vocab_size=SMALL_VOCAB).to(device),
              tiny_model(1, vocab_size=SMALL_VOCAB).to(device)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [ch05.make_optimizer(models[0], 1e-3, 0.1),
                  ch05.make_optimizer(models[1], 1e-3, 0.1, fused=True)]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    x, y = torch.randint(0, SMALL_VOCAB, (2, 8)), torch.randint(0, SMALL_VOCAB, (2, 8))
    for _ in range(3):
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            ch05.calc_loss_batch(x, y, model, device).backward()
            opt.step()
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


# ======= The ch05_train.py command: a run =======


def train_args(tmp_path, *extra):
    """The command's arguments for a small, fast run on the-verdict (on the CPU
    unless `extra` names a --device)."""
    return args_of(ch05, train_args_argv(tmp_path, *extra))


def train_args_argv(tmp_path, *extra):
    return ["--data", str(SHARED / "data" / "the-verdict.txt"), "--model-size", "tiny",
            "--context-length", "32", "--batch-size", "2", "--eval-iter", "2", "--device", "cpu",
            "--out", str(tmp_path), *extra]


def log_rows(path):
    """log.csv's rows without the wall-clock column."""
    import csv
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


def test_command_reproduces_train_model_simple(tmp_path, verdict, tokenizer, capsys):
    """The command's loop draws randomness like the book's loop: same losses."""
    verdict = verdict[:5000]  # a quarter of the story is enough, and 4x faster
    (tmp_path / "part.txt").write_text(verdict, encoding="utf-8")
    args = train_args(tmp_path / "run", "--epochs", "2", "--eval-freq", "3", "--drop-rate", "0.1",
                      "--data", str(tmp_path / "part.txt"), "--context-length", "64",
                      "--batch-size", "4")
    result = ch05.main(args)
    command_out = capsys.readouterr().out
    split = int(0.9 * len(verdict))
    make = lambda text, shuffle, drop_last: ch02.create_dataloader_v1(  # noqa: E731
        text, batch_size=4, max_length=64, stride=64, shuffle=shuffle, drop_last=drop_last)
    train_loader, val_loader = make(verdict[:split], True, True), make(verdict[split:], False, False)
    model = tiny_model(123, context_length=64, drop_rate=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    train_losses, val_losses, tokens = ch05.train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", 2, 3, 2, "Every effort moves you",
        tokenizer)
    rows = result["history"]["log"]
    assert [r["train_loss"] for r in rows] == pytest.approx(train_losses, rel=1e-5)
    assert [r["val_loss"] for r in rows] == pytest.approx(val_losses, rel=1e-5)
    assert [r["tokens_seen"] for r in rows] == tokens
    book_out = capsys.readouterr().out
    assert re.search(r"^Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}",
                     command_out, re.M)
    samples = [re.findall(r"^Every effort moves you.*$", out, re.M) for out in (command_out, book_out)]
    assert len(samples[1]) == 2 and samples[0][:2] == samples[1]  # one after each epoch
    for name in ("loss-plot.png", "checkpoint.pt", "log.csv"):
        assert (tmp_path / "run" / name).exists()
    assert (tmp_path / "run" / "loss-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = log_rows(tmp_path / "run" / "log.csv")
    assert [float(r["train_loss"]) for r in logged] == pytest.approx(train_losses, rel=1e-9)
    assert [int(r["step"]) for r in logged] == [r["step"] for r in rows]


def test_memmap_route_trains_and_evaluates_rarely(tmp_path):
    """A memory-mapped corpus is a large one: evaluations every 200 steps by
    default, not the book's every 5."""
    result = ch05.main(train_args(tmp_path / "mapped", "--memmap", "--max-steps", "3"))
    assert result["state"]["step"] == 2 and [r["step"] for r in result["history"]["log"]] == [0]
    assert gen.load_checkpoint(tmp_path / "mapped" / "checkpoint.pt")["settings"]["eval_freq"] == 200
    assert list((tmp_path / "mapped" / "tokens").glob("*.bin"))
    in_memory = ch05.main(train_args(tmp_path / "text", "--max-steps", "6"))
    assert [r["step"] for r in in_memory["history"]["log"]] == [0, 5]


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    common = ("--drop-rate", "0", "--max-steps", "4", "--eval-freq", "100")
    ch05.main(train_args(tmp_path / "big", *common, "--batch-size", "4"))
    ch05.main(train_args(tmp_path / "accum", *common, "--batch-size", "2", "--grad-accum", "2"))
    big = gen.load_checkpoint(tmp_path / "big" / "checkpoint.pt")
    accum = gen.load_checkpoint(tmp_path / "accum" / "checkpoint.pt")
    assert big["step"] == accum["step"] == 3 and big["samples_done"] == accum["samples_done"]
    for k, v in big["model"].items():
        assert torch.allclose(v, accum["model"][k], atol=1e-5), k


def test_generate_streams_text_from_every_kind_of_model_file(tmp_path, gpt2_server, tokenizer,
                                                             capsys):
    """ch05_generate.py --from: a checkpoint of ch05_train.py, GPT-2's converted
    model.pth and a chapter-7 model with appendix E's LoRA (LinearWithLoRA, merged
    in), each giving the tokens its own model gives."""
    ch05.main(train_args(tmp_path / "run", "--max-steps", "1"))
    gpt2.load_gpt2_model("tiny", tmp_path / "gpt2", base_urls=[gpt2_server.url + "/primary"])
    lora = ch07.build_model(TINY, lora_rank=2, lora_alpha=4.0).eval()
    torch.manual_seed(5)
    for name, param in lora.named_parameters():
        if name.endswith("lora.B"):
            param.data.normal_(0, 0.5)  # a LoRA that changes the model
    gen.save_checkpoint(tmp_path / "sft.pth", gen.model_file(
        "instruct", lora.state_dict(), TINY, {"lora_rank": 2, "lora_alpha": 4.0,
                                             "models_dir": "gpt2", "mask_instructions": False}))
    prompt = tokenizer.encode("Every effort moves you")
    for path, reference in [(tmp_path / "run" / "checkpoint.pt", None),
                            (tmp_path / "gpt2" / "tiny" / "model.pth", None),
                            (tmp_path / "sft.pth", lora)]:
        result = gen.main(args_of(gen, ["--prompt", "Every effort moves you", "--from",
                                        str(path), "--max-new-tokens", "6", "--temperature",
                                        "0", "--device", "cpu"]))
        shown = capsys.readouterr().out
        assert result["text"] in shown and len(tokenizer.encode(result["text"])) == len(prompt) + 6
        if reference is None:  # the file's own model, built from its config
            saved = gen.load_checkpoint(path)
            reference = ch04.GPTModel({**saved["config"], "drop_rate": 0.0}).eval()
            reference.load_state_dict(saved["model"])
        expected = gen.generate(reference, torch.tensor([prompt]), 6,
                                 reference.pos_emb.num_embeddings)
        assert tokenizer.encode(result["text"]) == expected[0].tolist(), path
    x = torch.tensor([prompt])
    with torch.no_grad():  # the merged LoRA computes what the LoRA model computes
        assert torch.allclose(result["model"](x), lora(x), rtol=1e-5, atol=1e-4)  # logits ~30
    # --export-hf takes the same files: the LoRA merged in, GPT-2's head tied as GPT-2's is
    for path, tied in ((tmp_path / "sft.pth", False), (tmp_path / "gpt2" / "tiny" / "model.pth",
                                                         True)):
        assert gpt2.export_hf(path, tmp_path / "hf" / path.stem)["tie_word_embeddings"] is tied
    with torch.no_grad():
        assert torch.allclose(exported_model(tmp_path / "hf" / "sft")(x), lora(x), rtol=1e-5,
                              atol=1e-4)
    # a classifier does not generate: one line that says what it holds and what to give
    ch06.save_classifier(tmp_path / "c.pth", ch06.prepare_classifier(tiny_model(0), TINY), TINY,
                         {"trainable": "head", "lora_rank": None, "lora_alpha": 16})
    with pytest.raises(ValueError, match=r"c\.pth holds a classifier finetuned by ch06_classify\.py"
                                         r", whose output layer has 2 outputs, not one per token "
                                         r"of its vocabulary: --from takes a model that generates "
                                         r"text"):
        gen.main(args_of(gen, ["--prompt", "Hi", "--from", str(tmp_path / "c.pth")]))
    # ch05_train.py --generate, where the command lived before, gives the same text
    again = ch05.main(args_of(ch05, ["--generate", "Every effort moves you", "--from",
                                     str(tmp_path / "sft.pth"), "--max-new-tokens", "6",
                                     "--temperature", "0", "--device", "cpu"]))
    assert again["text"] == result["text"]


def test_the_books_imports_from_ch05_train_still_work():
    """The book imports chapter 5's names from one file; they stay importable from
    ch05_train.py, which takes 5.1.1 and 5.3 from ch05_generate.py."""
    from ch05_train import (calc_loss_batch, calc_loss_loader, evaluate_model, generate,
                            generate_and_print_sample, plot_losses, text_to_token_ids,
                            token_ids_to_text, train_model, train_model_simple)
    assert generate is gen.generate and text_to_token_ids is gen.text_to_token_ids
    assert token_ids_to_text is gen.token_ids_to_text
    assert all(callable(f) for f in (calc_loss_batch, calc_loss_loader, evaluate_model,
                                     generate_and_print_sample, plot_losses, train_model,
                                     train_model_simple))
    # loading GPT-2 and pretraining are siblings; no file names a later one's kinds
    assert not re.search(r"^(from|import) ch05_train", (HERE / "ch05_load_gpt2.py").read_text(
        encoding="utf-8"), re.M)
    for name in ("ch05_generate.py", "ch05_train.py"):
        code = (HERE / name).read_text(encoding="utf-8")
        assert not re.search(r'"(classifier|instruct)"', code), name


def test_a_cut_or_damaged_token_file_is_never_trained_on(tmp_path, short_text, capsys):
    args = lambda *extra: train_args(tmp_path, "--data", str(short_text), "--memmap",  # noqa: E731
                                     "--max-steps", "1", "--overwrite", *extra)
    ch05.main(args())
    windows = re.search(r"Training windows: \d+", capsys.readouterr().out).group(0)
    token_file = next((tmp_path / "tokens").glob("*.bin"))
    whole = token_file.read_bytes()
    for damage, said in [(whole[:len(whole) // 3], rf"{len(whole) // 3 // 2 * 2:,} bytes where "
                                                   rf"{len(whole):,} were written"),
                         (whole[:100] + bytes(16) + whole[116:],
                          "its checksum does not match what was written")]:
        token_file.write_bytes(damage[:len(damage) // 2 * 2])
        ch05.main(args())
        out = capsys.readouterr().out
        assert re.search(rf"The token file .*{token_file.name} is damaged \({said}\); moved "
                         r"aside to .*\.damaged(\.1)?, tokenizing again", out), out
        assert windows in out and token_file.read_bytes() == whole
    ch05.main(args())
    assert "Reusing the token file" in capsys.readouterr().out


def test_a_full_disk_while_tokenizing_names_the_file(tmp_path, short_text, monkeypatch):
    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open
    monkeypatch.setattr(ch02, "open", lambda path, mode="r", *a, **k: FullDisk(path, mode)
                        if mode == "wb" and str(path).endswith(".bin.tmp")
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(OSError, match=r"^Could not write the token file .*tokens/\w+\.bin: No "
                                      r"space left on device; [\d.]+ GB free on its disk\. Free "
                                      r"some space, or give another --out\.$"):
        ch05.main(train_args(tmp_path, "--data", str(short_text), "--memmap"))
    assert not list((tmp_path / "tokens").iterdir())  # nothing half-written is left


# ---- The ch05_train.py command: stopping and resuming; nothing lost ----


RESUME_ARGS = ("--epochs", "2", "--eval-freq", "2", "--save-every", "3", "--drop-rate", "0.1",
               "--schedule", "cosine", "--warmup-steps", "2", "--context-length", "32",
               "--batch-size", "4")


@pytest.fixture(scope="session")
def short_text(tmp_path_factory, verdict):
    """The story's first 3,000 characters: 5 steps an epoch, a whole run in seconds."""
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(verdict[:3000], encoding="utf-8")
    return path


def resume_args(out, device, text, *extra):
    return train_args(out, "--data", str(text), *RESUME_ARGS, "--device", device, *extra)


_references = {}


@pytest.fixture
def reference(short_text, tmp_path_factory, capsys):
    """The uninterrupted run on each device, computed once: its log rows, its
    final weights, the samples it printed after each epoch and its last step."""
    def run(device):
        if device not in _references:
            out = tmp_path_factory.mktemp(f"reference-{device}")
            capsys.readouterr()
            result = ch05.main(resume_args(out, device, short_text))
            _references[device] = (log_rows(out / "log.csv"), result["model"].state_dict(),
                                   epoch_samples(capsys.readouterr().out), result["state"]["step"])
        return _references[device]
    return run


def epoch_samples(out):
    return re.findall(r"^Every effort moves you.*$", out, re.M)


def signal_on_call(monkeypatch, name, nth, signals, training=None):
    """Patch ch05.<name> to send `signals` to this process on its nth call (counting
    only calls in training or evaluation mode when `training` says which)."""
    real, calls = getattr(ch05, name), []

    def wrapper(*args, **kwargs):
        if training is None or args[2].training == training:
            calls.append(1)
            if len(calls) == nth:
                for sig in signals:
                    os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(ch05, name, wrapper)


# where the signal comes: (patched function, nth call, signals, training mode, stop expected)
# 5 steps an epoch: evaluations at steps 0, 2, 4, 6, 8; saves after 2, 5, 8 and 9 (the
# last); samples after 4 and 9.
INTERRUPTIONS = {
    "in a step": ("calc_loss_batch", 7, ["SIGINT"], True, "Stopped by SIGINT after step 6"),
    "in an evaluation": ("calc_loss_batch", 9, ["SIGINT"], False, "after step 4"),
    "in the epoch's sample": ("generate_and_print_sample", 1, ["SIGINT"], None, "after step 4"),
    "in a save": ("save_checkpoint", 2, ["SIGINT"], None, "after step 5"),
    "SIGTERM": ("calc_loss_batch", 3, ["SIGTERM"], True, "Stopped by SIGTERM after step 2"),
    "SIGHUP": ("calc_loss_batch", 2, ["SIGHUP"], True, "Stopped by SIGHUP after step 1"),
    "Ctrl-C twice": ("calc_loss_batch", 5, ["SIGINT", "SIGINT"], True,
                     "Stopped at once during step 4; the checkpoint of step 2"),
    "Ctrl-C twice in a save": ("save_checkpoint", 2, ["SIGINT", "SIGINT"], None,
                               "Stopped by SIGINT after step 5; checkpoint saved"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", INTERRUPTIONS)
def test_any_interruption_resumes_exactly(where, device, reference, short_text, tmp_path,
                                          monkeypatch, capsys):
    # the plots are other tests' subject: here they only cost time, twice a run
    monkeypatch.setattr(ch05, "plot_history", lambda *args: None)
    rows, weights, samples, last_step = reference(device)
    name, nth, signals, training, message = INTERRUPTIONS[where]
    signal_on_call(monkeypatch, name, nth, [getattr(signal, s) for s in signals], training)
    with pytest.raises(ch05.Stopped, match=re.escape(message)) as stop:
        ch05.main(resume_args(tmp_path, device, short_text))
    assert stop.value.code == 128 + getattr(signal, signals[-1])
    monkeypatch.undo()
    monkeypatch.setattr(ch05, "plot_history", lambda *args: None)
    assert not list(tmp_path.glob("*.tmp"))
    first_samples = epoch_samples(capsys.readouterr().out)
    # --resume alone: the checkpoint holds every other setting
    result = ch05.main(args_of(ch05, ["--resume", str(tmp_path / "checkpoint.pt"),
                                        "--device", device]))
    assert result["state"]["step"] == last_step
    assert first_samples + epoch_samples(capsys.readouterr().out) == samples
    resumed = log_rows(tmp_path / "log.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in rows]
    for got, want in zip(resumed, rows):
        if device == "cpu":
            assert got == want  # bit for bit
        else:  # CUDA's atomic adds may differ in the last bits between runs
            assert {k: float(v) for k, v in got.items()} == pytest.approx(
                {k: float(v) for k, v in want.items()}, rel=1e-4)
    for key, value in result["model"].state_dict().items():
        assert (torch.equal(value, weights[key]) if device == "cpu"
                else torch.allclose(value, weights[key], atol=1e-5)), key


def test_sigterm_from_outside_saves_and_exits_143(tmp_path, short_text):
    args = ["ch05_train.py", "--data", str(short_text), "--model-size", "tiny", "--context-length",
            "32", "--batch-size", "4", "--eval-iter", "1", "--eval-freq", "1", "--epochs", "500",
            "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while len(log_rows(tmp_path / "log.csv") if (tmp_path / "log.csv").exists() else []) < 1:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    stopped_at = int(re.search(r"Stopped by SIGTERM after step (\d+); checkpoint saved to",
                               err).group(1))
    assert gen.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == stopped_at
    assert [int(r["step"]) for r in log_rows(tmp_path / "log.csv")] == list(range(stopped_at + 1))
    assert (tmp_path / "loss-plot.png").stat().st_size > 0  # the curves so far, also when stopped
    assert f"Saved {tmp_path / 'loss-plot.png'}" in out
    assert re.search(r"Model: tiny, [\d,]+ parameters, context 32; data: .*short\.txt, [\d,]+ "
                     r"tokens; output: ", out)  # the run's header


    # resuming after a SIGTERM is exact: the "SIGTERM" case of the interruption test


def test_a_sweep_killed_after_its_first_trial_goes_on_where_it_stopped(tmp_path, short_text,
                                                                      capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"peak_lr": [0.001, 0.0005]}), encoding="utf-8")  # the bonus's name
    argv = ["--sweep", str(grid), "--sweep-out", str(tmp_path / "sweep"), "--data",
            str(short_text), "--model-size", "tiny", "--context-length", "32", "--batch-size",
            "2", "--max-steps", "3", "--eval-iter", "1", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "ch05_train.py", *argv], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "sweep" / "trial-001" / "result.json"
    deadline = time.time() + 120
    while not first.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.kill()  # no chance to tidy up
    proc.communicate()
    kept = first.read_bytes()
    swept = ch05.main(args_of(ch05, argv))
    out = capsys.readouterr().out
    assert "Trial 1: finished before" in out and "== Trial 2 of 2: --lr 0.0005" in out
    assert first.read_bytes() == kept  # not run again
    with open(tmp_path / "sweep" / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["trial"] for r in rows} == {"1", "2"}
    assert float(rows[0]["val_loss"]) <= float(rows[1]["val_loss"])
    best = swept["best"]
    assert best["trial"] == int(rows[0]["trial"]) and best["val_loss"] == swept["results"][0]["val_loss"]
    command = re.search(r"python ch05_train\.py (.*)\n", out.split("Best:")[1]).group(1)
    again = ch05.parse_args(shlex.split(command))  # the best trial's run, as printed
    assert again.lr == best["point"]["lr"] and again.max_steps == 3 and again.sweep is None
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    trial = gen.load_checkpoint(tmp_path / "sweep" / "trial-002" / "checkpoint.pt")
    assert trial["settings"]["lr"] == 0.0005 and trial["settings"]["seed"] == 123
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lr": [0.002]}), encoding="utf-8")
    with pytest.raises(ValueError, match="holds another sweep .* --overwrite"):
        ch05.main(args_of(ch05, [*argv, "--sweep", str(other)]))


def test_a_failing_trial_is_ranked_last_and_the_sweep_goes_on(tmp_path, short_text, capsys):
    grid = tmp_path / "grid.json"  # a context longer than the text: that trial cannot run
    grid.write_text(json.dumps({"context_length": [100000, 32]}), encoding="utf-8")
    swept = ch05.main(args_of(ch05, [
        "--sweep", str(grid), "--sweep-out", str(tmp_path / "sweep"), "--data", str(short_text),
        "--model-size", "tiny", "--batch-size", "2", "--max-steps", "1", "--eval-iter", "1",
        "--device", "cpu"]))
    failed, ran = sorted(swept["results"], key=lambda r: r["trial"])
    assert "too short for --context-length 100000" in failed["error"]
    assert math.isnan(failed["val_loss"]) and ran["val_loss"] > 0
    assert swept["best"]["trial"] == 2 and swept["results"][-1]["trial"] == 1  # failed: last
    with open(tmp_path / "sweep" / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["2", "1"] and "too short" in rows[1]["error"]
    assert "Trial 1 failed: The training split is too short" in capsys.readouterr().out
    grid.write_text(json.dumps({"context_length": [100000, 200000]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"No trial of the sweep finished \(.*results\.csv says "
                                         r"why\); trial 1: The training split is too short"):
        ch05.main(args_of(ch05, ["--sweep", str(grid), "--sweep-out", str(tmp_path / "none"),
                                 "--data", str(short_text), "--device", "cpu"]))
    # a problem of the flags every trial shares (a missing file) stops the sweep at once
    with pytest.raises(FileNotFoundError, match="--data path not found"):
        ch05.main(args_of(ch05, ["--sweep", str(grid), "--sweep-out", str(tmp_path / "gone"),
                                 "--data", str(tmp_path / "gone.txt"), "--device", "cpu"]))
    assert not (tmp_path / "gone" / "trial-002").exists()


@pytest.mark.parametrize("grid, error", [
    ("[1, 2]", "must hold a JSON object"), ('{"lr": [0.001', "not valid JSON"),
    ('{"learning_rate": [0.1]}', "'learning_rate' is not a setting a sweep can vary"),
    ('{"out": ["x"]}', "'out' is not a setting"), ('{"lr": 0.001}', "must map to a list"),
    ('{"lr": []}', "must map to a list"), ('{"lr": [0.001, 0]}', "'lr': 0 is refused: must be above 0"),
    ('{"batch_size": [2.5]}', "whole number"), ('{"fast": ["yes"]}', "a switch"),
    ('{"schedule": ["linear"]}', "one of constant, cosine")])
def test_a_bad_grid_is_refused_in_one_line_before_any_trial(tmp_path, grid, error):
    (tmp_path / "grid.json").write_text(grid, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(error)):
        ch05.main(args_of(ch05, ["--sweep", str(tmp_path / "grid.json"), "--sweep-out",
                                 str(tmp_path / "sweep")]))
    assert not list(tmp_path.glob("sweep/trial-*"))
    with pytest.raises(ValueError, match="--trials and --sweep-out go with --sweep"):
        ch05.main(args_of(ch05, ["--trials", "2"]))


def test_a_sweep_draws_the_same_random_points_each_time_and_names_them_as_flags():
    grid = {"lr": [1e-4, 5e-4, 1e-3], "batch_size": [2, 4], "fast": [False, True]}
    every, total = ch05.sweep_points(grid, None, 123)
    assert total == 12 and every == [dict(zip(grid, values))
                                     for values in itertools.product(*grid.values())]
    drawn, _ = ch05.sweep_points(grid, 5, 123)
    assert drawn == ch05.sweep_points(grid, 5, 123)[0] and len(drawn) == 5
    assert all(point in every for point in drawn) and len({json.dumps(p) for p in drawn}) == 5
    assert ch05.sweep_points(grid, 50, 123)[0] == every
    actions = ch05.sweep_actions(ch05.build_parser())
    assert ch05.trial_flags({"lr": 5e-4, "batch_size": 4, "fast": True}, actions) == \
        ["--lr", "0.0005", "--batch-size", "4", "--fast"]
    assert ch05.base_argv(["--sweep", "g.json", "--lr", "1", "--out", "x", "--overwrite",
                           "--trials", "3", "--sweep-out", "s"]) == ["--lr", "1"]


def test_resume_keeps_the_checkpoints_settings_unless_given(tmp_path, capsys):
    ch05.main(train_args(tmp_path, "--max-steps", "2", "--lr", "1e-3", "--eval-freq", "1"))
    checkpoint = str(tmp_path / "checkpoint.pt")
    capsys.readouterr()
    result = ch05.main(args_of(ch05, ["--resume", checkpoint, "--max-steps", "4",
                                        "--weight-decay", "0.5", "--device", "cpu"]))
    assert "Changed on resume: --weight-decay 0.1 -> 0.5, --max-steps 2 -> 4" in capsys.readouterr().out
    assert result["history"]["lrs"] == [1e-3] * 4  # the checkpoint's --lr, not the default
    assert len(result["history"]["log"]) == 4  # and its --eval-freq 1
    saved = gen.load_checkpoint(checkpoint)
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.5
    assert saved["settings"]["max_steps"] == 4
    with pytest.raises(ValueError, match=r"holds a 'tiny' model with context length 32, not "
                                         r"--model-size 124M, --context-length 16\. Leave out"):
        ch05.main(args_of(ch05, ["--resume", checkpoint, "--model-size", "124M",
                                   "--context-length", "16", "--max-steps", "9"]))
    capsys.readouterr()
    with pytest.raises(ValueError, match="at step 3, the last of the 4 steps"):
        ch05.main(args_of(ch05, ["--resume", checkpoint, "--device", "cpu"]))
    assert "Resumed" not in capsys.readouterr().out  # refused before it claims to resume
    # inputs are checked before outputs: a missing --data is named, not the run already there
    with pytest.raises(FileNotFoundError, match=r"--data path not found: .*missing\.txt"):
        ch05.main(train_args(tmp_path, "--data", str(tmp_path / "missing.txt")))


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_resumes_on_the_other_device(device, tmp_path):
    other = "cuda" if device == "cpu" and "cuda" in DEVICES else "cpu"
    ch05.main(train_args(tmp_path, "--max-steps", "2", "--fast", "--device", device))
    # saved with fused AdamW (--fast), resumed with the book's AdamW on the other device
    result = ch05.main(args_of(ch05, ["--resume", str(tmp_path / "checkpoint.pt"),
                                        "--max-steps", "4", "--device", other]))
    assert result["state"]["step"] == 3 and next(result["model"].parameters()).device.type == other
    assert all(math.isfinite(r["train_loss"]) for r in result["history"]["log"])


def test_divergence_keeps_the_last_sound_checkpoint(tmp_path, short_text):
    ch05.main(train_args(tmp_path, "--data", str(short_text), "--context-length", "32",
                         "--max-steps", "4", "--save-every", "2", "--eval-freq", "100"))
    checkpoint = tmp_path / "checkpoint.pt"
    good = gen.load_checkpoint(checkpoint)
    with pytest.raises(ch05.Diverged, match=r"training loss by step 5 became .*; the checkpoint "
                                            r"of step 3 .* is kept.* a lower --lr \(and --resume"):
        ch05.main(args_of(ch05, ["--resume", str(checkpoint), "--max-steps", "12",
                                   "--lr", "1000"]))
    kept = gen.load_checkpoint(checkpoint)
    assert kept["step"] == 3 and all(torch.equal(v, good["model"][k])
                                     for k, v in kept["model"].items())
    result = ch05.main(args_of(ch05, ["--resume", str(checkpoint), "--max-steps", "8",
                                        "--lr", "1e-4", "--eval-freq", "2"]))
    losses = [r["train_loss"] for r in result["history"]["log"] if r["step"] > 3]
    assert result["state"]["step"] == 7 and len(losses) == 2
    assert all(math.isfinite(x) and x < 11 for x in losses)


def test_weights_worse_than_the_runs_start_are_never_kept(tmp_path, short_text):
    """--lr 1 sends the validation loss to about 14.6 at step 3, above the run's
    start (about 11.0) yet below 3 x ln(50257) = 32.5, the limit until now."""
    ch05.main(train_args(tmp_path, "--data", str(short_text), "--max-steps", "3",
                         "--save-every", "2", "--eval-freq", "100"))
    checkpoint = tmp_path / "checkpoint.pt"
    good = gen.load_checkpoint(checkpoint)
    assert good["step"] == 2 and 10 < good["first_loss"] < 12
    with pytest.raises(ch05.Diverged, match=r"validation loss of the weights to be saved at step "
                                            r"3 became 1\d\.\d \(the run started at 1[01]\.\d+\); "
                                            r"the checkpoint of step 2 .* is kept"):
        ch05.main(args_of(ch05, ["--resume", str(checkpoint), "--max-steps", "12",
                                   "--lr", "1", "--save-every", "1"]))
    assert gen.load_checkpoint(checkpoint)["step"] == 2


def test_a_run_killed_before_its_first_save_blocks_nothing(tmp_path, short_text, capsys):
    """A SIGKILL (out of memory, power loss) or a divergence before the first save
    leaves log.csv and perhaps checkpoint.pt.tmp, but no checkpoint to resume."""
    ch05.write_log(tmp_path / "log.csv", [dict.fromkeys(ch05.LOG_FIELDS, 0)])
    (tmp_path / "checkpoint.pt.tmp").write_bytes(bytes(1 << 20))
    (tmp_path / "notes.tmp").write_text("the user's own file", encoding="utf-8")
    with pytest.raises(ValueError, match="too short for --context-length"):  # fails after the lock
        ch05.main(train_args(tmp_path, "--data", str(short_text), "--context-length", "4000"))
    assert not (tmp_path / "checkpoint.pt.tmp").exists()  # a killed run's leftover: removed
    assert (tmp_path / "notes.tmp").read_text(encoding="utf-8") == "the user's own file"
    assert "log.csv is from a run that stopped before saving a checkpoint; kept as " \
           "log.csv.unfinished, and this run starts anew" in capsys.readouterr().out
    assert log_rows(tmp_path / "log.csv.unfinished")[0]["step"] == "0"
    ch05.write_log(tmp_path / "log.csv", [])  # killed again: the first one kept aside stays
    ch05.main(train_args(tmp_path, "--data", str(short_text), "--max-steps", "1"))
    assert gen.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 0
    assert sorted(p.name for p in tmp_path.glob("log.csv*")) == \
        ["log.csv", "log.csv.unfinished", "log.csv.unfinished.1"]


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    ch05.main(train_args(tmp_path, "--max-steps", "2", "--eval-freq", "1"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds an earlier run's results \(checkpoint"
                                         r"\.pt, log\.csv\)\. Continue it with --resume .*"
                                         r"--overwrite"):
        ch05.main(train_args(tmp_path, "--max-steps", "2"))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    # --overwrite with a typo in --data, or stopped before its first save: the earlier
    # run's checkpoint is still there (it goes when this run saves its own)
    bad = [a if a != str(SHARED / "data" / "the-verdict.txt") else str(tmp_path / "typo.txt")
           for a in train_args_argv(tmp_path)]
    with pytest.raises(FileNotFoundError, match="typo.txt"):
        ch05.main(args_of(ch05, [*bad, "--max-steps", "1", "--overwrite"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ch05, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            ch05.main(train_args(tmp_path, "--max-steps", "1", "--overwrite"))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    ch05.main(train_args(tmp_path, "--max-steps", "1", "--overwrite"))
    assert gen.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 0
    assert len(log_rows(tmp_path / "log.csv")) == 1
    for flag in ("--epochs", "--max-steps", "--batch-size", "--grad-accum", "--eval-freq"):
        with pytest.raises(SystemExit) as exit_:
            train_args(tmp_path, flag, "0")
        assert exit_.value.code == 2
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


@contextlib.contextmanager
def lock_held_elsewhere(folder):
    """Another process holding `folder`'s run lock, as a running command does; it is
    SIGKILLed at the end, so it cleans nothing up. Yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time, ch05_train as c\n"
         "with c.run_lock(pathlib.Path(sys.argv[1])):\n print('locked', flush=True)\n"
         " time.sleep(120)", str(folder)], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_out_is_refused_until_the_first_ends(tmp_path):
    with lock_held_elsewhere(tmp_path) as pid:
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {pid} on "):
            ch05.main(train_args(tmp_path, "--max-steps", "1"))
    ch05.main(train_args(tmp_path, "--max-steps", "1"))  # the lock died with its process


# ---- The ch05_train.py command: its settings, and bad input ----


def test_every_flag_is_classified_once_and_explained():
    """A flag changes the model, or is a training setting that may change on
    resume, or belongs to one run: exactly one of them, so a resume treats it right."""
    parser = ch05.build_parser()
    flags = sorted({a.dest for a in parser._actions if a.dest != "help"})  # aliases: one dest
    kinds = ch05.MODEL_SETTINGS + ch05.TRAINING_SETTINGS + ch05.RUN_SETTINGS
    assert sorted(kinds) == flags  # each flag in one kind, none twice, none left out
    assert all(a.help for a in parser._actions)
    assert "(default: 0.0004)" in parser.format_help()


def test_settings_are_resolved_in_one_function_that_changes_nothing():
    args = args_of(ch05, ["--resume", "old/checkpoint.pt", "--lr", "1e-3", "--device", "cpu"])
    before = dict(vars(args))
    saved = {k: getattr(args_of(ch05, []), k) for k in ch05.SAVED_SETTINGS}
    saved.update(epochs=3, eval_freq=2, fast=True)
    settings, messages = ch05.resolve_settings(args, {"settings": saved},
                                               data_size=lambda data: 0)
    assert vars(args) == before  # the parsed flags are read, never changed
    assert (settings["lr"], settings["epochs"], settings["eval_freq"]) == (1e-3, 3, 2)
    assert settings["out"] == "old" and settings["device"] == "cpu" and not settings["fast"]
    assert messages == ["Changed on resume: --lr 0.0004 -> 0.001",
                        "Note: the checkpoint was trained with --fast; this run goes without "
                        "(give it again to keep it)."]
    # the corpus size chooses the memory-mapped route, and with it --eval-freq's default
    for size, memmap, eval_freq in [(50e6, False, 5), (200e6, True, 200)]:
        settings, _ = ch05.resolve_settings(args_of(ch05, ["--data", "corpus/"]),
                                            data_size=lambda data: size)
        assert (settings["memmap"], settings["eval_freq"]) == (memmap, eval_freq)
    # the parser itself records the flags typed: build_parser() and parse_args() agree
    assert ch05.build_parser().parse_args(["--lr", "1e-3", "--data", "a"]).given == {"lr", "data"}


def test_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        ch05.main(train_args(tmp_path, "--resume", str(tmp_path / "none.pt")))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="damaged or not a PyTorch checkpoint") as err:
        gen.load_checkpoint(tmp_path / "bad.pt")
    torch.save({"model": {}, "odd": argparse.Namespace()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="damaged or not a PyTorch checkpoint") as err:
        gen.load_checkpoint(tmp_path / "pickled.pt")
    assert "weights_only" not in str(err.value)
    # a full disk: PyTorch's words become one line, and the previous file stays
    gen.save_checkpoint(tmp_path / "c.pt", {"model": {}, "step": 1})

    def disk_full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"Could not write .*c\.pt: \[enforce fail.*disk full"):
        gen.save_checkpoint(tmp_path / "c.pt", {"model": {}, "step": 2})
    monkeypatch.undo()
    assert gen.load_checkpoint(tmp_path / "c.pt")["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    torch.save({"model": {}, "step": 3}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="older ch05_train.py"):
        ch05.main(train_args(tmp_path, "--resume", str(tmp_path / "old.pt")))
    # a folder, or Hugging Face's file, where a model file goes: each named as what it is
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a model file: name the file "
                                                r"in it"):
        ch05.main(args_of(ch05, ["--generate", "Hi", "--from", str(tmp_path)]))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors is a safetensors file .* loads with "
                                         r"`python ch05_load_gpt2\.py --hf-file "):
        ch05.main(args_of(ch05, ["--generate", "Hi", "--from", str(tmp_path / "model.safetensors")]))


def test_weights_exported_from_a_checkpoint_serve_everywhere_but_resume(tmp_path, capsys):
    ch05.main(train_args(tmp_path, "--max-steps", "2"))
    weights = tmp_path / "weights.pth"
    ch05.main(args_of(ch05, ["--export-weights", str(weights), "--out", str(tmp_path)]))
    saved, full = gen.load_checkpoint(weights), gen.load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(saved) == {"kind", "what", "model", "config", "settings", "checksums"}
    assert saved["what"] == "the weights of a ch05_train.py training checkpoint (--export-weights)"
    assert all(torch.equal(saved["model"][k], v) for k, v in full["model"].items())
    assert weights.stat().st_size < (tmp_path / "checkpoint.pt").stat().st_size / 2
    assert f"as {weights} (" in capsys.readouterr().out
    generated = [ch05.main(args_of(ch05, ["--generate", "Every effort", "--from", str(path),
                                          "--temperature", "0", "--max-new-tokens", "5"]))["text"]
                 for path in (weights, tmp_path / "checkpoint.pt")]
    assert generated[0] == generated[1]
    gpt2.export_hf(weights, tmp_path / "hf")  # --export-hf and --init-from take it too
    model, _ = ch06.base_model(vars(args_of(ch06, ["--init-from", str(weights)])), "")
    assert torch.equal(model.tok_emb.weight, full["model"]["tok_emb.weight"])
    with pytest.raises(ValueError, match=r"weights\.pth holds a model's weights only \(saved by "
                                         r"--export-weights\), not the optimizer"):
        ch05.main(train_args(tmp_path, "--resume", str(weights)))
    with pytest.raises(FileExistsError, match=r"--export-weights .*weights\.pth already exists"):
        ch05.main(args_of(ch05, ["--export-weights", str(weights), "--out", str(tmp_path)]))


def test_a_flipped_byte_in_a_model_files_weights_is_caught(tmp_path):
    model, _ = tiny_text_model_file(tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    weights = model.state_dict()["trf_blocks.1.ff.layers.0.weight"].numpy().tobytes()
    at = data.index(weights[:64]) + 1000  # inside that tensor's stored bytes
    data[at] ^= 0x10
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.pt is damaged: the bytes of trf_blocks\.1\.ff\."
                                         r"layers\.0\.weight differ from the checksums saved "
                                         r"with them"):
        gen.load_text_model(tmp_path / "bad.pt", "cpu")
    assert gen.load_text_model(tmp_path / "m.pt", "cpu")[2] == "a model file of kind " \
        "'pretraining'"  # the whole one loads


def test_bad_data_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words here. " * 5, encoding="utf-8")
    with pytest.raises(ValueError, match=r"training split is too short for --context-length "
                                         r"32: it has \d+ tokens, and one window needs 33 .*"
                                         r"or a smaller --context-length\.$"):
        ch05.main(train_args(tmp_path / "a", "--data", str(short)))
    archive = spam_zip(tmp_path / "texts.zip", {"a.txt": "Some text. " * 2000})
    with pytest.raises(ValueError, match=r"texts\.zip is not a text file \(it is a zip archive's "
                                         r"data\): give UTF-8 text files, and unpack"):
        ch05.main(train_args(tmp_path / "z", "--data", str(archive)))
    short.write_text("Just a few words here. " * 40, encoding="utf-8")
    with pytest.raises(ValueError, match=r"training split has \d+ windows .* one step needs 64 "
                                         r"windows.*--context-length"):
        ch05.main(train_args(tmp_path / "b", "--data", str(short), "--context-length", "8",
                             "--batch-size", "64"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ch05.main(train_args(tmp_path / "c", "--data", str(tmp_path / "missing.txt")))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Beyoncé ".encode("latin-1") * 5000)
    with pytest.raises(ValueError, match=r"latin\.txt, line 1, is not UTF-8"):
        ch05.main(train_args(tmp_path / "d", "--data", str(latin)))
    with pytest.raises(ValueError, match=r"latin\.txt, line 1, is not UTF-8"):
        ch05.main(train_args(tmp_path / "e", "--data", str(latin), "--memmap"))


def test_every_model_file_has_one_layout_and_a_wrong_one_says_what_it_holds(tmp_path, capsys):
    ch05.main(train_args(tmp_path / "ch05", "--max-steps", "1"))
    pretrained = tmp_path / "ch05" / "checkpoint.pt"
    saved = gen.load_checkpoint(pretrained)
    assert saved["kind"] == "pretraining" and saved["config"]["emb_dim"] == TINY["emb_dim"]
    # a chapter-5 checkpoint where chapter 6 or 7 expects its own model: one line each
    (tmp_path / "ch06").mkdir()
    (tmp_path / "ch06" / "classifier.pth").write_bytes(pretrained.read_bytes())
    with pytest.raises(ValueError, match=r"classifier\.pth holds a ch05_train\.py training "
                                         r"checkpoint, not a classifier finetuned by "
                                         r"ch06_classify\.py"):
        ch06.main(args_of(ch06, [
            "--classify", "Free prize!", "--out", str(tmp_path / "ch06"), "--device", "cpu"]))
    # ... and the other way round, for --resume and --chat
    model = tiny_model(0)
    ch06.save_classifier(tmp_path / "c.pth", ch06.prepare_classifier(model, TINY), TINY,
                         {"trainable": "last_block", "lora_rank": None, "lora_alpha": 16,
                          "max_length": 10, "models_dir": "gpt2"})
    with pytest.raises(ValueError, match=r"c\.pth holds a classifier finetuned by ch06_classify"
                                         r"\.py, not a ch05_train\.py training checkpoint\. "
                                         r"--resume continues a checkpoint\.pt"):
        ch05.main(train_args(tmp_path / "r", "--resume", str(tmp_path / "c.pth")))
    (tmp_path / "ch07").mkdir()
    (tmp_path / "ch07" / "gpt2-tiny-sft.pth").write_bytes((tmp_path / "c.pth").read_bytes())
    with pytest.raises(ValueError, match=r"holds a classifier .*, not an instruction-finetuned "
                                         r"model of ch07_instruct\.py"):
        ch07.main(args_of(ch07, ["--chat", "--model-size", "tiny", "--out",
                                                  str(tmp_path / "ch07"), "--device", "cpu"]))
    # files in the earlier layouts (the config inside chapter 6's and 7's settings) still load
    old = gen.load_checkpoint(tmp_path / "c.pth")
    torch.save({"model": old["model"], "settings": {**old["settings"], "cfg": TINY}},
               tmp_path / "old.pth")
    loaded, _ = ch06.load_classifier(tmp_path / "old.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 old["model"].values()))
    sft = ch07.build_model(TINY)
    torch.save({"model": sft.state_dict(), "settings": {"cfg": TINY, "lora_rank": None,
                                                        "lora_alpha": 16, "models_dir": "gpt2",
                                                        "mask_instructions": False}},
               tmp_path / "old-sft.pth")
    assert ch07.load_finetuned(tmp_path / "old-sft.pth")[1]["cfg"] == TINY


# ---- The ch05_train.py command: several processes ----


def torchrun(argv, *launcher, timeout=300, **popen):
    """python -m torch.distributed.run LAUNCHER ch05_train.py ARGV, one thread a process."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher,
                             "ch05_train.py", *argv], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def finished(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def test_fsdp_trains_resumes_and_spans_machines_as_one_process_does(tmp_path, short_text):
    """2 processes (DDP, micro-batch 1, --grad-accum 2) take the steps of one
    process with micro-batch 2; stopped by a real SIGINT, the run resumes under
    --fsdp on two machines (a c10d rendezvous on 127.0.0.1, one process each) and
    in one process as if never stopped, and --fsdp's checkpoint holds one
    process's weights."""
    common = ["--data", str(short_text), "--model-size", "tiny", "--context-length", "32",
              "--drop-rate", "0", "--epochs", "500", "--eval-freq", "1", "--eval-iter", "1",
              "--grad-accum", "2", "--device", "cpu"]
    two = ["--nproc_per_node=2", "--standalone"]
    ch05.main(args_of(ch05, [*common, "--batch-size", "2", "--max-steps", "12",
                             "--out", str(tmp_path / "one")]))
    one = {r["step"]: r for r in log_rows(tmp_path / "one" / "log.csv")}

    def same_losses(folder, steps):
        rows = log_rows(folder / "log.csv")
        assert [int(r["step"]) for r in rows] == list(steps)
        for row in rows:
            for key in ("train_loss", "val_loss"):
                assert float(row[key]) == pytest.approx(float(one[row["step"]][key]), rel=1e-5)
            assert row["tokens_seen"] == one[row["step"]]["tokens_seen"]
    # a real SIGINT to every process, as Ctrl-C in a terminal sends it
    stopped = torchrun([*common, "--batch-size", "1", "--out", str(tmp_path / "int")],
                       *two, start_new_session=True)
    deadline = time.time() + 120
    while len(log_rows(tmp_path / "int" / "log.csv") if (tmp_path / "int" / "log.csv").exists()
              else []) < 3:
        assert stopped.poll() is None and time.time() < deadline, stopped.stderr.read()[-2000:]
        time.sleep(0.1)
    os.killpg(stopped.pid, signal.SIGINT)
    _, err = stopped.communicate(timeout=120)
    step = int(re.search(r"Stopped by SIGINT after step (\d+); checkpoint saved", err).group(1))
    assert gen.load_checkpoint(tmp_path / "int" / "checkpoint.pt")["step"] == step < 8
    same_losses(tmp_path / "int", range(step + 1))  # DDP's steps are one process's
    # resumed under --fsdp on two machines (one process each, meeting at a c10d
    # rendezvous on 127.0.0.1), and in one process
    port = str(free_port())
    machines = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test"]
    resumes = {}
    for layout in ("fsdp", "one"):
        folder = tmp_path / f"resumed-{layout}"
        folder.mkdir()
        shutil.copy(tmp_path / "int" / "checkpoint.pt", folder)
        resumes[layout] = ["--resume", str(folder / "checkpoint.pt"), "--max-steps",
                           str(step + 4)]
    # the two machines' launches at once (most of each is starting Python)
    launched = [torchrun([*resumes["fsdp"], "--fsdp"], *machines) for _ in range(2)]
    out = [finished(p) for p in launched]
    assert any("with 2 process(es) (FSDP); global batch 4 windows, 128 tokens a step" in o
               for o in out)
    ch05.main(args_of(ch05, [*resumes["one"], "--batch-size", "2"]))  # the same global batch
    for layout in resumes:
        same_losses(tmp_path / f"resumed-{layout}", range(step + 4))  # the history, then on
    # the checkpoint is in one process's layout: the weights equal one process's
    ones = gen.load_checkpoint(tmp_path / "resumed-one" / "checkpoint.pt")
    saved = gen.load_checkpoint(tmp_path / "resumed-fsdp" / "checkpoint.pt")
    for key, value in saved["model"].items():
        assert torch.allclose(value, ones["model"][key], atol=1e-6), key


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- The ch05_train.py command: speed ----


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_matches_eager(device, tmp_path, monkeypatch):
    """--compile trains as the eager model does. On the CPU only Dynamo's tracing
    runs (backend "eager"): Inductor's cold compile takes about a minute here."""
    if device == "cpu":
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    common = ("--fast", "--max-steps", "3", "--eval-freq", "1", "--device", device)
    ch05.main(train_args(tmp_path / "eager", *common))
    result = ch05.main(train_args(tmp_path / "compiled", "--compile", *common))
    assert type(result["model"]).__name__ == "GPTModel"  # the compiled wrapper is not saved
    eager, compiled = (log_rows(tmp_path / run / "log.csv") for run in ("eager", "compiled"))
    assert [r["step"] for r in compiled] == ["0", "1", "2"]
    for a, b in zip(eager, compiled):
        for key in ("train_loss", "val_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5 if device == "cpu"
                                                  else 1e-2)


def test_fast_training_command_runs_and_resumes_into_the_book_path(tmp_path, capsys):
    result = ch05.main(train_args(tmp_path, "--fast", "--max-steps", "3", "--eval-freq", "1"))
    assert result["state"]["step"] == 2 and len(result["history"]["log"]) == 3
    # same parameter names: the book's path continues from a fast checkpoint, and says so
    ch05.main(train_args(tmp_path, "--max-steps", "5", "--eval-freq", "100",
                         "--resume", str(tmp_path / "checkpoint.pt")))
    assert "trained with --fast; this run goes without" in capsys.readouterr().out


def test_bench_cuda_measurements_run_on_the_cpu_too(tmp_path, capsys):
    """bench.py --device cuda's children, on the CPU with a tiny model: training
    through the command's loop, decoding whose cached tokens equal the uncached."""
    p = {**bench.CUDA, "model": "tiny", "context": 32, "batch": 2, "eval_every": 2,
         "new_tokens": 6, "device": "cpu", "work_dir": str(tmp_path)}
    p["corpus"] = bench.prepare_corpus(p, SHARED / "data")
    runs = [{"name": "train_command", "variant": v, "others_cpu_cores": 0.0,
             **bench.child_train_command(v, p)} for v in ("book", "fast")]
    runs.append({**runs[-1], "variant": "fast+compile"})  # compiling takes too long here
    runs.append({"name": "mm", "variant": "-", "others_cpu_cores": 0.0, "gflops_per_s": 1e3})
    runs += [{"name": "generate", "variant": v, "others_cpu_cores": 0.0,
              **bench.child_generate(v, p)} for v in ("uncached", "cached", "fast")]
    assert all(r["tokens_per_s"] > 0 for r in runs if "tokens_per_s" in r)
    assert len(runs[-1]["tokens"]) == 6
    runs += [{"name": "train_memory", "variant": v, "others_cpu_cores": 0.0, "peak_gb": gb,
              "processes": n, "failed": failed} for v, gb, n, failed in [
                  ("1558M", float("nan"), 1, "torch.OutOfMemoryError: CUDA out of memory."),
                  ("1558M:fsdp", 9.5, 4, None)]]
    rows, derived, targets, _ = bench.summarise_cuda(runs, p)
    assert derived["KV cache tokens = uncached (1: yes)"] == 1.0
    assert math.isclose(derived["fast path MFU (vs bf16 mm)"], runs[1]["gflops_per_s"] / 1e3)
    bench.print_table(rows, derived, targets, None, False, "cuda")
    out = capsys.readouterr().out
    assert "fast + compile MFU (vs bf16 mm)" in out
    assert re.search(r"peak memory +1558M +nan .* GB \(torch.OutOfMemoryError: CUDA out of ", out)
    assert re.search(r"peak memory +1558M:fsdp +9.5 .* GB, --fsdp over 4 GPUs ", out)
    # each line says whether its target applies to this run, and whether it was met
    line = lambda key: next(l for l in out.splitlines() if l.startswith(key))  # noqa: E731
    assert line("KV cache tokens = uncached").endswith(">= 1     met (a target of the cuda "
                                                        "run: it applies)")
    assert line("cache + fast tokens = uncached").endswith("-        no target")
    bench.print_table(rows, derived, {"KV cache tokens = uncached (1: yes)": (">=", 2.0)},
                      None, True, "cpu")
    # a --quick run measures a smaller model: its lines draw no verdict
    assert bench.child_eval("tiny", {"eval_items": 2, "device": "cpu"})["items_per_s"] > 0
    assert "does not apply: a target of the full run" in capsys.readouterr().out
    optional("pyarrow", "bench.py tokenizes a Parquet corpus")
    tokenize = {"work_dir": str(tmp_path), "models_dir": str(tmp_path), "tokenize_copies": 1}
    assert [bench.child_tokenize(v, tokenize)["workers"] for v in ("1", "all")] == \
        [1, os.cpu_count()]
    assert bench.child_serve("tiny:3", {"serve_tokens": 4})["tokens"] == 12  # 3 clients' whole
    assert bench.child_judge("4", {"judge_entries": 8})["entries_per_s"] > 0
    assert bench.child_flops("tiny", {})["count_over_formula"] == pytest.approx(1, abs=0.02)
    optional("tokenizers", "bench.py trains Hugging Face's BPE beside ours")
    bpe = {"bpe_bytes": 20_000, "bpe_vocab": 300, "models_dir": str(tmp_path),
           "work_dir": str(tmp_path)}
    for variant in ("ours", "hf", "tiktoken"):  # each encodes as tiktoken does
        measured = bench.child_bpe(variant, bpe)
        assert measured["same_ids_as_tiktoken"] == 1.0 and measured["encode_mb_per_s"] > 0
        assert variant == "tiktoken" or measured["merges_per_s"] > 0
    saved = {"model": "tiny", "models_dir": str(tmp_path / "models")}
    bench.child_save("-", saved)  # the loading measurement's model, read both ways
    loads = [{"name": "load", "variant": v, "others_cpu_cores": 0.0,
              **bench.child_load(v, saved)} for v in ("plain", "lean")]
    assert all(r["param_bytes"] > 0 and math.isnan(r["gpu_multiple"]) for r in loads)
    cuda_rows, *_ = bench.summarise_cuda(runs + loads, p)
    assert [r[3] for r in cuda_rows if r[0] == "load 124M"] == ["x params, host",
                                                               "x params, GPU"] * 2
    attention = {"device": "cpu", "attn_batch": 1, "attn_context": 16, "attn_steps": 1}
    runs = [{"name": "attention", "variant": v, "others_cpu_cores": 0.0,
             **bench.child_attention(v, attention)} for v in ("einsum", "SDPA")]
    assert all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in runs)
    assert len(bench.attention_variants(attention)) == len(ch03.attention_implementations())
    rows, *_ = bench.summarise_attention(runs, attention, tmp_path / "attention.png")
    assert len(rows) == 4 and (tmp_path / "attention.png").stat().st_size > 0
    assert bench.child_duplicates("-", {"dup_entries": 300})["pairs"] >= 2  # the planted ones


# ======= Chapter 5, loading GPT-2: the book's listings =======


TINY_HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}


def openai_variables(h, seed=0):
    """Random weights with OpenAI's variable names and shapes (linear layers are
    1x1 convolutions: (1, in, out))."""
    rng = np.random.default_rng(seed)
    d = h["n_embd"]

    def r(*shape, scale=0.02, offset=0.0):
        return (offset + rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model/wte": r(h["n_vocab"], d, scale=0.1), "model/wpe": r(h["n_ctx"], d, scale=0.01),
           "model/ln_f/g": r(d, scale=0.1, offset=1.0), "model/ln_f/b": r(d)}
    for i in range(h["n_layer"]):
        p = f"model/h{i}/"
        out.update({p + "ln_1/g": r(d, scale=0.1, offset=1.0), p + "ln_1/b": r(d),
                    p + "attn/c_attn/w": r(1, d, 3 * d, scale=0.2), p + "attn/c_attn/b": r(3 * d),
                    p + "attn/c_proj/w": r(1, d, d, scale=0.2), p + "attn/c_proj/b": r(d),
                    p + "ln_2/g": r(d, scale=0.1, offset=1.0), p + "ln_2/b": r(d),
                    p + "mlp/c_fc/w": r(1, d, 4 * d, scale=0.2), p + "mlp/c_fc/b": r(4 * d),
                    p + "mlp/c_proj/w": r(1, 4 * d, d, scale=0.1), p + "mlp/c_proj/b": r(d)})
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_files(tmp_path_factory):
    """{filename: bytes} of a tiny GPT-2 release in OpenAI's TensorFlow format."""
    tf = optional("tensorflow", "it writes the tests' GPT-2 checkpoints in OpenAI's format")
    folder = tmp_path_factory.mktemp("openai")
    variables = openai_variables(TINY_HPARAMS)
    tf.raw_ops.SaveV2(prefix=str(folder / "model.ckpt"), tensor_names=list(variables),
                      shape_and_slices=[""] * len(variables),
                      tensors=[tf.constant(v) for v in variables.values()])
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                       'all_model_checkpoint_paths: "model.ckpt"\n')
    (folder / "hparams.json").write_text(json.dumps(TINY_HPARAMS))
    (folder / "model.ckpt.meta").write_bytes(b"graph not needed for loading")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in ("encoder.json", "vocab.bpe"):
        files[name] = (SHARED / "gpt2_vocab" / name).read_bytes()
    assert sorted(files) == sorted(gpt2.FILENAMES)
    return files, variables


@pytest.fixture
def hf_tiny(monkeypatch):
    """"tiny" as a fifth GPT-2 size, as OpenAI and Hugging Face would serve it."""
    monkeypatch.setattr(gpt2, "ALLOWED_SIZES", (*gpt2.ALLOWED_SIZES, "tiny"))
    monkeypatch.setitem(gpt2.GPT2_HPARAMS, "tiny", TINY_HPARAMS)
    monkeypatch.setitem(gpt2.HF_NAMES, "tiny", "gpt2-tiny")


@pytest.fixture
def gpt2_server(serve, tiny_gpt2_files, hf_tiny, monkeypatch):
    """OpenAI's files of GPT-2 "tiny" under /primary and /mirror; /hf, Hugging Face
    (no file until a test puts one there)."""
    files, _ = tiny_gpt2_files
    server = serve(FileServer, {f"/{base}/tiny/{name}": data for base in ("primary", "mirror")
                                for name, data in files.items()})
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/hf")
    return server


def numpy_gpt2_logits(v, ids, n_head):
    """GPT-2's forward pass written directly from OpenAI's variables."""
    def layer_norm(x, g, b):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return g * (x - mean) / np.sqrt(var + 1e-5) + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = v["model/wte"][ids].astype(np.float64) + v["model/wpe"][: len(ids)]
    t, d = x.shape
    for i in range(TINY_HPARAMS["n_layer"]):
        p = lambda name: v[f"model/h{i}/{name}"].astype(np.float64).squeeze()  # noqa: E731
        h = layer_norm(x, p("ln_1/g"), p("ln_1/b"))
        q, k, val = np.split(h @ p("attn/c_attn/w") + p("attn/c_attn/b"), 3, axis=-1)
        heads = lambda m: m.reshape(t, n_head, d // n_head).transpose(1, 0, 2)  # noqa: E731
        scores = heads(q) @ heads(k).transpose(0, 2, 1) / np.sqrt(d // n_head)
        scores = np.where(np.triu(np.ones((t, t)), 1) == 1, -np.inf, scores)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        attn = (w @ heads(val)).transpose(1, 0, 2).reshape(t, d)
        x = x + attn @ p("attn/c_proj/w") + p("attn/c_proj/b")
        h = layer_norm(x, p("ln_2/g"), p("ln_2/b"))
        x = x + gelu(h @ p("mlp/c_fc/w") + p("mlp/c_fc/b")) @ p("mlp/c_proj/w") + p("mlp/c_proj/b")
    x = layer_norm(x, v["model/ln_f/g"], v["model/ln_f/b"])
    return x @ v["model/wte"].T.astype(np.float64)


def test_gpt2_loading_matches_a_numpy_forward_pass(gpt2_server, tiny_gpt2_files, tmp_path,
                                                   tokenizer):
    settings, params = gpt2.download_and_load_gpt2(
        "tiny", tmp_path, base_urls=[gpt2_server.url + "/primary"])
    assert settings == TINY_HPARAMS and len(params["blocks"]) == 2
    model = ch04.GPTModel(gpt2.config_from_settings(settings))
    gpt2.load_weights_into_gpt(model, params)
    model.eval()
    ids = tokenizer.encode("Every effort moves you forward, one token at a time.")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double().numpy()
    expected = numpy_gpt2_logits(tiny_gpt2_files[1], ids, TINY_HPARAMS["n_head"])
    assert np.abs(logits - expected).max() < 1e-5 * max(1.0, np.abs(expected).max())
    # the comparison can fail: swapping query and key (a plausible mapping bug) breaks it
    att = model.trf_blocks[0].att
    att.W_query.weight, att.W_key.weight = att.W_key.weight, att.W_query.weight
    with torch.no_grad():
        swapped = model(torch.tensor([ids]))[0].double().numpy()
    assert np.abs(swapped - expected).max() > 1e-3


def test_gpt2_unknown_size_and_shape_mismatch():
    with pytest.raises(ValueError, match="the sizes are 124M, 355M, 774M, 1558M"):
        gpt2.download_and_load_gpt2("125M", "unused")
    with pytest.raises(ValueError, match=r"trf_blocks.0.att.W_query.weight: our model has "
                                         r"\(4, 4\), the checkpoint has \(4, 3\)"):
        gpt2.assign(torch.zeros(4, 4), np.zeros((4, 3)), "trf_blocks.0.att.W_query.weight")


# ---- Chapter 5, loading GPT-2, beyond the book: checks, our reader, the command ----


def test_gpt2_download_falls_back_and_resumes(gpt2_server, tmp_path, capsys):
    data_file = "/mirror/tiny/model.ckpt.data-00000-of-00001"
    for name in gpt2.FILENAMES:
        gpt2_server.missing.add(f"/primary/tiny/{name}")
    gpt2_server.cut_short.add(data_file)
    gpt2.download_and_load_gpt2("tiny", tmp_path, base_urls=[gpt2_server.url + "/primary",
                                                              gpt2_server.url + "/mirror"])
    fetched = [p for p, _ in gpt2_server.requests]
    assert all(f"/primary/tiny/{n}" in fetched and f"/mirror/tiny/{n}" in fetched
               for n in gpt2.FILENAMES)
    ranges = [r for p, r in gpt2_server.requests if p == data_file]
    assert ranges[0] is None and ranges[1].startswith("bytes=")  # resumed, not restarted
    # which server served each file is said
    assert f"hparams.json: downloaded from {gpt2_server.url}/mirror/tiny/hparams.json" in \
        capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(gpt2.FILENAMES)
    n = len(gpt2_server.requests)
    gpt2.download_and_load_gpt2("tiny", tmp_path, base_urls=[gpt2_server.url + "/primary"])
    assert len(gpt2_server.requests) == n  # complete files are not fetched again


def test_damaged_gpt2_downloads_are_fetched_again(gpt2_server, tiny_gpt2_files, tmp_path,
                                                  capsys):
    files, variables = tiny_gpt2_files
    data_name = "model.ckpt.data-00000-of-00001"
    gpt2_server.wrong_once.update({  # an error page with status 200, and a cut file
        "/primary/tiny/hparams.json": b"<html><body>503 Service Unavailable</body></html>",
        f"/primary/tiny/{data_name}": files[data_name][:100]})
    model_dir = gpt2.download_gpt2("tiny", tmp_path, base_urls=[gpt2_server.url + "/primary"])
    out = capsys.readouterr().out
    assert "hparams.json is damaged (Expecting value" in out
    assert f"{data_name} is damaged (100 bytes where its index says" in out
    for name in gpt2.FILENAMES:  # every file under its final name is whole
        assert (model_dir / name).read_bytes() == files[name], name
    assert (model_dir / "hparams.json.damaged").exists()
    # damaged again on the second try: one clear error, and nothing kept as hparams.json
    (model_dir / "hparams.json").write_text("{not json", encoding="utf-8")
    gpt2_server.wrong_once["/primary/tiny/hparams.json"] = b"<html>still down</html>"
    with pytest.raises(ch02.DownloadError, match=r"hparams\.json is damaged .*also when "
                                                 r"downloaded again.*--base-url"):
        gpt2.download_gpt2("tiny", tmp_path, base_urls=[gpt2_server.url + "/primary"])
    assert not (model_dir / "hparams.json").exists()


def test_a_damaged_converted_model_is_converted_again(gpt2_server, tmp_path, capsys):
    base = [gpt2_server.url + "/primary"]
    model, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    pth = tmp_path / "tiny" / "model.pth"
    pth.write_bytes(pth.read_bytes()[:1000])
    again, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    assert "model.pth is damaged (not a whole PyTorch file); moved aside to model.pth.damaged, " \
           "converting again" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))


@pytest.mark.parametrize("reader", ["tensorflow", "own"])
def test_a_data_file_with_wrong_bytes_is_moved_aside_and_fetched_again(
        reader, gpt2_server, tiny_gpt2_files, tmp_path, monkeypatch, capsys):
    """The right size, the wrong bytes: each reader's checksum error moves the file
    aside and fetches it again, once; wrong again, one line that says what to do."""
    if reader == "own":
        monkeypatch.setitem(sys.modules, "tensorflow", None)  # importing it now fails
    base = [gpt2_server.url + "/primary"]
    model, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    data_path = tmp_path / "tiny" / gpt2.DATA_FILE
    (tmp_path / "tiny" / "model.pth").unlink()
    good = data_path.read_bytes()
    data_path.write_bytes(good[:200] + bytes(16) + good[216:])  # 16 bytes of a tensor zeroed
    capsys.readouterr()
    again, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    out = capsys.readouterr().out
    assert re.search(rf"{gpt2.DATA_FILE} is damaged \(model/\S+:? .*(Checksum does not match|"
                     r"fails its checksum).*\); moved aside to .*\.damaged and downloading", out)
    assert data_path.read_bytes() == good and (tmp_path / "tiny" / f"{gpt2.DATA_FILE}.damaged").exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    # the server itself sends the wrong bytes: named, kept aside, never used
    (tmp_path / "tiny" / "model.pth").unlink()
    data_path.write_bytes(good[:200] + bytes(16) + good[216:])
    gpt2_server.files[f"/primary/tiny/{gpt2.DATA_FILE}"] = good[:200] + bytes(16) + good[216:]
    with pytest.raises(ch02.DownloadError, match=rf"{gpt2.DATA_FILE} is damaged .*also when "
                                                 r"downloaded again.*delete .*tiny and download"):
        gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    assert not data_path.exists()


def test_hparams_that_disagree_with_the_checkpoint_are_fetched_again(gpt2_server, tmp_path,
                                                                   capsys):
    base = [gpt2_server.url + "/primary"]
    model, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    hparams = tmp_path / "tiny" / "hparams.json"
    for wrong, said in [({**TINY_HPARAMS, "n_layer": 3}, "it says n_layer 3 where the "
                                                         "checkpoint holds 2"),
                        ({k: v for k, v in TINY_HPARAMS.items() if k != "n_layer"},
                         "no whole number for n_layer")]:
        (tmp_path / "tiny" / "model.pth").unlink(missing_ok=True)
        hparams.write_text(json.dumps(wrong), encoding="utf-8")
        again, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
        assert f"hparams.json is damaged ({said}); moved aside" in capsys.readouterr().out
        assert json.loads(hparams.read_text(encoding="utf-8")) == TINY_HPARAMS
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     again.state_dict().values()))
    # the server's copy disagrees too: one line naming both numbers and what to do
    gpt2_server.files["/primary/tiny/hparams.json"] = json.dumps(
        {**TINY_HPARAMS, "n_layer": 3}).encode()
    hparams.write_text(json.dumps({**TINY_HPARAMS, "n_layer": 3}), encoding="utf-8")
    with pytest.raises(ch02.DownloadError, match=r"hparams\.json is damaged \(it says n_layer 3 "
                                                 r"where the checkpoint holds 2\), also when "
                                                 r"downloaded again.*delete .*tiny and download"):
        gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)


def test_a_model_pth_of_another_size_or_kind_is_converted_again(gpt2_server, tmp_path, capsys):
    base = [gpt2_server.url + "/primary"]
    model, cfg = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
    pth = tmp_path / "tiny" / "model.pth"
    other = ch04.GPTModel({**cfg, "n_layers": 3})
    for saved, said in [  # a bare state dict (the earlier layout), and a chapter-5 checkpoint
            (other.state_dict(), "holds a model with layers 3, where hparams.json says layers 2"),
            (gen.model_file("pretraining", model.state_dict(), cfg, step=0,
                            what="a ch05_train.py training checkpoint"),
             "is not GPT-2's converted weights (holds a ch05_train.py training checkpoint")]:
        torch.save(saved, pth)
        again, _ = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=base)
        assert f"model.pth {said}" in capsys.readouterr().out
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     again.state_dict().values()))
    assert gen.load_checkpoint(pth)["kind"] == "gpt2"
    assert sorted(p.name for p in pth.parent.glob("model.pth.damaged*")) == \
        ["model.pth.damaged", "model.pth.damaged.1"]  # each kept, none replaced


def test_gpt2_download_that_keeps_failing_says_what_to_do(gpt2_server, tmp_path):
    gpt2_server.missing.update(f"/{b}/tiny/checkpoint" for b in ("primary", "mirror"))
    with pytest.raises(ch02.DownloadError, match=r"(?s)checkpoint.*primary/tiny/checkpoint.*"
                                           r"mirror/tiny/checkpoint.*place it at.*GPT-2 tiny needs "
                                           r"these 7 files .*: checkpoint, encoder\.json, .*"
                                           r"vocab\.bpe\. Without them, .*--no-pretrained"):
        gpt2.download_and_load_gpt2("tiny", tmp_path, base_urls=[gpt2_server.url + "/primary",
                                                                  gpt2_server.url + "/mirror"])


def test_crc32c_is_castagnolis_at_every_length():
    assert gpt2.crc32c(b"123456789") == 0xE3069283  # the standard check value
    data = np.random.default_rng(0).integers(0, 256, 3 * 64 + 5, dtype=np.uint8).tobytes()
    for n in (0, 1, 63, 64, 65, len(data)):  # lanes of 64: whole pieces, a tail, both
        crc = 0xFFFFFFFF
        for byte in data[:n]:  # the definition, one byte at a time
            crc = gpt2.CRC32C_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        assert gpt2.crc32c(data[:n], lanes=64) == crc ^ 0xFFFFFFFF, n


def test_own_reader_returns_tensorflows_arrays_bit_for_bit(tiny_gpt2_files, tmp_path):
    tf = optional("tensorflow", "it writes the tests' GPT-2 checkpoints in OpenAI's format")
    for name, data in tiny_gpt2_files[0].items():
        (tmp_path / name).write_bytes(data)
    prefix = gpt2.latest_checkpoint(tmp_path)
    assert prefix == tf.train.latest_checkpoint(str(tmp_path))
    listed = gpt2.list_tf_variables(prefix)
    assert listed == [(name, list(shape)) for name, shape in tf.train.list_variables(prefix)]
    for name, _ in listed:
        ours, theirs = gpt2.load_tf_variable(prefix, name), tf.train.load_variable(prefix, name)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert ours.tobytes() == theirs.tobytes(), name
    # a damaged or cut download is named, never loaded
    data = bytearray(tiny_gpt2_files[0]["model.ckpt.data-00000-of-00001"])
    data[len(data) // 2] ^= 0x40
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(data)
    gpt2._tf_index.cache_clear()
    damaged = [n for n, _ in listed if _raises(lambda: gpt2.load_tf_variable(prefix, n),
                                               "fails its checksum")]
    assert len(damaged) == 1  # exactly the tensor holding the flipped byte
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(data[:len(data) // 2])
    with pytest.raises(gpt2.DamagedCheckpoint, match=r"model/wte: model\.ckpt\.data-00000-of-"
                                                     r"00001 is shorter than its index says"):
        gpt2.load_tf_variable(prefix, "model/wte")
    index = tiny_gpt2_files[0]["model.ckpt.index"]
    (tmp_path / "model.ckpt.index").write_bytes(index[:-10])
    with pytest.raises(ValueError, match="not a complete TensorFlow checkpoint index"):
        gpt2.list_tf_variables(prefix)
    (tmp_path / "model.ckpt.index").write_bytes(index[:20] + bytes([index[20] ^ 1]) + index[21:])
    with pytest.raises(ValueError, match="a table block fails its checksum"):
        gpt2.list_tf_variables(prefix)


def _raises(fn, message):
    try:
        fn()
    except ValueError as err:
        assert message in str(err)
        return True
    return False


def test_gpt2_loads_the_same_without_tensorflow(gpt2_server, tmp_path, monkeypatch, capsys,
                                                tokenizer):
    gpt2.say_once.cache_clear()
    with_tf, _ = gpt2.load_gpt2_model("tiny", tmp_path / "a", base_urls=[gpt2_server.url + "/primary"])
    assert "Reading the checkpoint with TensorFlow" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # importing it now fails
    without_tf, _ = gpt2.load_gpt2_model("tiny", tmp_path / "b",
                                         base_urls=[gpt2_server.url + "/primary"])
    assert "TensorFlow is not installed: reading the checkpoint with" in capsys.readouterr().out
    ids = torch.tensor([tokenizer.encode("Every effort moves you")])
    with torch.no_grad():
        assert torch.equal(without_tf(ids), with_tf(ids))


def test_converted_weights_load_offline_without_tensorflow(gpt2_server, tmp_path, monkeypatch,
                                                           tokenizer):
    model, cfg = gpt2.load_gpt2_model("tiny", tmp_path, base_urls=[gpt2_server.url + "/primary"])
    assert (tmp_path / "tiny" / "model.pth").exists() and cfg["qkv_bias"] is True
    ids = torch.tensor([tokenizer.encode("Hello, world. Offline now.")])
    with torch.no_grad():
        expected = model(ids)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # importing it now fails
    monkeypatch.setattr(gpt2, "download_file", lambda *a, **k: pytest.fail("went online"))
    reloaded, _ = gpt2.load_gpt2_model("tiny", tmp_path)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        got = reloaded(ids)
    assert torch.equal(got, expected)


def test_local_files_tokenizer_matches_tiktoken(tokenizer, monkeypatch, tmp_path):
    # tiktoken's own loader copies each file it reads into this folder: ours reads in place
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    local = ch02.gpt2_tokenizer_from_files(SHARED / "gpt2_vocab" / "encoder.json",
                                           SHARED / "gpt2_vocab" / "vocab.bpe")
    assert not (tmp_path / "cache").exists()
    assert all(local.decode_single_token_bytes(t) == tokenizer.decode_single_token_bytes(t)
               for t in range(tokenizer.n_vocab))  # the same 50,257 tokens, in the same order
    text = ("Hello, world! It's 2026... naïve café — 東京 🙂 <|endoftext|> don't  "
            "spaces\n\n\tand tabs; numbers 12345 and CamelCaseWords.")
    assert local.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert local.decode(local.encode(text, allowed_special="all")) == text
    (tmp_path / "124M").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / "124M" / name).write_bytes((SHARED / "gpt2_vocab" / name).read_bytes())

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(ch02.tiktoken, "get_encoding", offline)
    fallback = ch02.bpe_tokenizer(tmp_path)
    assert fallback.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    with pytest.raises(ch02.DownloadError, match="TIKTOKEN_CACHE_DIR"):
        ch02.bpe_tokenizer(tmp_path / "empty")


def gpt2_args(server, models_dir, *flags):
    return args_of(gpt2, 
        ["--model-size", "tiny", "--models-dir", str(models_dir), "--base-url",
         server.url + "/primary", "--max-new-tokens", "5", "--temperature", "1.4", "--top-k", "25",
         "--device", "cpu", *flags])


def test_gpt2_command_inspect_generate_and_neighbors(gpt2_server, tmp_path, capsys):
    rows = gpt2.main(gpt2_args(gpt2_server, tmp_path, "--inspect"))
    assert len(rows) == 4 + 12 * TINY_HPARAMS["n_layer"]
    assert not [r for r in rows if r[2] == "(not used)"]
    model = ch04.GPTModel(gpt2.config_from_settings(TINY_HPARAMS))
    ours = dict(model.state_dict())
    for _, _, target in rows:  # every named destination exists in GPTModel
        for qkv in ("W_query", "W_key", "W_value"):
            for name in re.findall(r"[\w.]+\.(?:weight|bias|scale|shift)",
                                   target.replace("W_query/W_key/W_value", qkv)):
                assert name in ours, name
    out = capsys.readouterr().out
    assert "model/h1/attn/c_attn/w" in out and "(1, 32, 96)" in out and '"n_layer": 2' in out
    result = gpt2.main(gpt2_args(gpt2_server, tmp_path))
    assert result["text"].startswith("Every effort moves you")
    assert result == gpt2.main(gpt2_args(gpt2_server, tmp_path))  # seeded: same text
    result = gpt2.main(gpt2_args(gpt2_server, tmp_path, "--neighbors", "king",
                                 "--analogy", "king", "man", "woman"))
    assert len(result["neighbors"]) == 10 and "king" not in [t.strip() for t, _ in result["neighbors"]]
    with pytest.raises(ValueError, match=r"is 4 GPT-2 tokens \[. G., .is., .burn., .esque.\]"):
        gpt2.main(gpt2_args(gpt2_server, tmp_path, "--neighbors", "Gisburnesque"))


# ---- Chapter 5, loading GPT-2, beyond the book: Hugging Face's safetensors, both ways ----


def hub_safetensors(variables, path, n_layer=TINY_HPARAMS["n_layer"]):
    """OpenAI's variables as Hugging Face's hub file holds them: no prefix, Conv1D
    weights (in, out), and each block's causal-mask buffer (attn.bias) besides."""
    from safetensors.torch import save_file
    tensors = {hf: torch.from_numpy(np.squeeze(variables[tf]).copy())
               for tf, hf in gpt2.gpt2_variable_names(n_layer)}
    n_ctx = variables["model/wpe"].shape[0]
    for i in range(n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path).read_bytes()


def test_the_name_mapping_covers_gpt2_124m():
    names = gpt2.gpt2_variable_names(12)
    assert len(names) == 148 == len(dict(names)) == len(set(hf for _, hf in names))
    shapes = gpt2.hf_shapes(gpt2.GPT2_HPARAMS["124M"])
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304) and shapes["wte.weight"] == (50257, 768)
    assert shapes["h.0.mlp.c_proj.weight"] == (3072, 768)
    assert shapes["h.3.attn.c_proj.weight"] == (768, 768)
    # every OpenAI variable that --inspect maps into our model has its Hugging Face name
    assert {re.sub(r"h\d+", "h#", tf)[6:] for tf, _ in names} == set(gpt2.TF_TO_OURS)


def test_hugging_faces_file_loads_bit_for_bit_as_openais_checkpoint(
        gpt2_server, tiny_gpt2_files, hf_tiny, tmp_path, capsys):
    files, variables = tiny_gpt2_files
    from_openai, _ = gpt2.load_gpt2_model("tiny", tmp_path / "a",
                                          base_urls=[gpt2_server.url + "/primary"])
    hub = tmp_path / "hub" / "models--openai-community--gpt2"
    hub_safetensors(variables, hub / "snapshots" / "abc123" / "model.safetensors")
    assert len(gpt2.safetensors_header(hub / "snapshots" / "abc123" / "model.safetensors")) == 30
    assert len(gpt2.list_hf_variables(hub / "snapshots" / "abc123" / "model.safetensors")) == 28
    from_hf, cfg = gpt2.load_gpt2_model("tiny", tmp_path / "b", hf_file=hub)  # the cache folder
    ours, theirs = from_openai.state_dict(), from_hf.state_dict()
    assert sorted(ours) == sorted(theirs) and cfg["qkv_bias"] and cfg["context_length"] == 64
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    out = capsys.readouterr().out
    assert "GPT-2 tiny: OpenAI's checkpoint, converted and saved to" in out
    assert f"GPT-2 tiny: Hugging Face's weights from {hub / 'snapshots' / 'abc123'}" in out
    assert not (tmp_path / "b").exists()  # read where it is: nothing copied, nothing converted


def test_hugging_face_serves_when_openai_does_not_and_damage_is_fetched_again(
        gpt2_server, tiny_gpt2_files, hf_tiny, tmp_path, monkeypatch, capsys):
    files, variables = tiny_gpt2_files
    good = hub_safetensors(variables, tmp_path / "src" / "model.safetensors")
    url_path = "/hf/openai-community/gpt2-tiny/resolve/main/model.safetensors"
    gpt2_server.files[url_path] = good
    gpt2_server.missing.update(f"/primary/tiny/{n}" for n in gpt2.FILENAMES)
    primary = [gpt2_server.url + "/primary"]
    model, _ = gpt2.load_gpt2_model("tiny", tmp_path / "m", base_urls=primary)
    out = capsys.readouterr().out
    assert "OpenAI's server and the book's backup did not serve it; trying Hugging Face" in out
    assert "GPT-2 tiny: Hugging Face's model.safetensors" in out
    n = len(gpt2_server.requests)
    again, _ = gpt2.load_gpt2_model("tiny", tmp_path / "m", base_urls=primary)
    assert len(gpt2_server.requests) == n  # the file already there serves, offline
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values()))
    # an error page with status 200, then a cut file: each moved aside and fetched again
    for bad, words in ((b"<html>503 Service Unavailable</html>", "not a safetensors file"),
                       (good[:-100], "bytes where its header says")):
        folder = tmp_path / f"again-{len(bad)}"
        gpt2_server.wrong_once[url_path] = bad
        gpt2.load_gpt2_model("tiny", folder, source="hf")
        out = capsys.readouterr().out
        assert re.search(rf"model\.safetensors is damaged \([^)]*{words}.*downloading it again",
                         out), out
        assert (folder / "tiny" / "model.safetensors").read_bytes() == good
        assert (folder / "tiny" / "model.safetensors.damaged").read_bytes() == bad
    # cut every time: one damaged copy is kept, not one per attempt
    gpt2_server.files[url_path] = good[:-100]
    with pytest.raises(ch02.DownloadError, match=r"also when downloaded again \(kept as model\."
                                                 r"safetensors\.damaged\)"):
        gpt2.load_gpt2_model("tiny", tmp_path / "cut", source="hf")
    assert sorted(p.name for p in (tmp_path / "cut" / "tiny").iterdir()) == [
        "model.safetensors.damaged"]
    gpt2_server.files[url_path] = good
    # nowhere to be had: one error that names both attempts
    gpt2_server.missing.add(url_path)
    with pytest.raises(ch02.DownloadError, match=r"(?s)GPT-2 tiny needs these 7 files.*"
                                                 r"Nor from Hugging Face: Could not download "
                                                 r"model\.safetensors.*gpt2-tiny/resolve"):
        gpt2.load_gpt2_model("tiny", tmp_path / "none", base_urls=[gpt2_server.url + "/primary"])
    with pytest.raises(ch02.DownloadError, match="Could not download checkpoint"):
        gpt2.load_gpt2_model("tiny", tmp_path / "none", source="openai",
                             base_urls=[gpt2_server.url + "/primary"])


def test_a_wrong_hf_file_gets_one_line_naming_it(tiny_gpt2_files, hf_tiny, tmp_path):
    _, variables = tiny_gpt2_files
    good = tmp_path / "good.safetensors"
    data = hub_safetensors(variables, good)
    from safetensors.torch import load_file, save_file
    tensors = load_file(good)

    def written(name, change):
        t = dict(tensors)
        change(t)
        save_file(t, tmp_path / name)
        return tmp_path / name

    cases = [
        (tmp_path / "cut.safetensors", data[: len(data) // 2], "bytes where its header says"),
        (tmp_path / "page.safetensors", b"<!DOCTYPE html><html>Not found</html>",
         "not a safetensors file"),
        (written("missing.safetensors", lambda t: t.pop("h.1.mlp.c_fc.weight")), None,
         "has no tensor h.1.mlp.c_fc.weight"),
        (written("shape.safetensors", lambda t: t.update({"h.0.attn.c_attn.weight":
                                                          torch.zeros(32, 32)})), None,
         "has h.0.attn.c_attn.weight of shape [32, 32] where GPT-2 has [32, 96]"),
    ]
    # byte ranges that disagree with the shapes (GPT-2's shapes, the file's size as it says)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    first, second = sorted((k for k in header if k != "__metadata__"),
                           key=lambda k: header[k]["data_offsets"][0])[:2]
    header[first]["data_offsets"][1] -= 4
    header[second]["data_offsets"][0] -= 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    size = math.prod(header[first]["shape"]) * 4
    cases.append((tmp_path / "offsets.safetensors", len(raw).to_bytes(8, "little") + raw +
                  data[8 + n:], f"damaged: its header gives {first} {size - 4:,} bytes, where "
                                f"its shape {header[first]['shape']} of F32 needs {size:,}"))
    for path, content, words in cases:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=f"^--hf-file {re.escape(str(path))} is not GPT-2 "
                                             f"tiny's safetensors file: .*{re.escape(words)}"):
            gpt2.load_hf_gpt2("tiny", hf_file=path)
        assert path.exists()  # the user's own file stays where it is
    # 64-bit floats are floats too: read as float32, as the other dtypes are
    doubled = written("f64.safetensors", lambda t: t.update({k: v.double() for k, v in t.items()}))
    as_f64, _ = gpt2.load_hf_gpt2("tiny", hf_file=doubled)
    as_f32, _ = gpt2.load_hf_gpt2("tiny", hf_file=good)
    assert all(torch.equal(a, b) for a, b in zip(as_f64.state_dict().values(),
                                                  as_f32.state_dict().values()))
    with pytest.raises(ValueError, match=r"is not GPT-2 124M's safetensors file: holds a model "
                                         r"with layers 2, embedding size 32, not layers 12, "
                                         r"embedding size 768: GPT-2 tiny, pass --model-size tiny"):
        gpt2.main(args_of(gpt2, ["--hf-file", str(good), "--model-size", "124M"]))
    with pytest.raises(FileNotFoundError, match="no model.safetensors there, nor in its snapshots"):
        gpt2.load_hf_gpt2("tiny", hf_file=tmp_path)


def test_export_flags_go_together(capsys):
    for argv in (["--export-hf", "x"], ["--from", "x"]):
        with pytest.raises(SystemExit) as exit_:
            args_of(gpt2, argv)
        assert exit_.value.code == 2
        assert "error: --export-hf DIR and --from FILE go together" in capsys.readouterr().err


def exported_model(folder):
    """An --export-hf folder read back through the safetensors loader."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    settings = {"n_vocab": config["vocab_size"], "n_ctx": config["n_positions"],
                **{k: config[k] for k in ("n_embd", "n_head", "n_layer")}}
    model = ch04.GPTModel(gpt2.config_from_settings(settings))
    gpt2.load_weights_into_gpt(model, gpt2.load_gpt2_params_from_tf_ckpt(
        folder / "model.safetensors", settings, gpt2.list_hf_variables, gpt2.load_hf_variable))
    return model.eval()


def tiny_text_model_file(path, seed=0, **overrides):
    model = tiny_model(seed, **overrides)
    cfg = {**TINY, **overrides}
    gen.save_checkpoint(path, gen.model_file("pretraining", model.state_dict(), cfg, {}))
    return model.eval(), cfg


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_export_loads_back_and_in_transformers_with_the_same_logits(qkv_bias, tmp_path,
                                                                    tokenizer):
    optional("transformers", "the export is loaded with GPT2LMHeadModel")
    from transformers import GPT2LMHeadModel, GPT2Tokenizer
    model, cfg = tiny_text_model_file(tmp_path / "checkpoint.pt", qkv_bias=qkv_bias)
    config = gpt2.main(args_of(gpt2, ["--export-hf", str(tmp_path / "hf"),
                                      "--from", str(tmp_path / "checkpoint.pt")]))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "tokenizer_config.json", "vocab.json"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == config
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (
        TINY["context_length"], TINY["emb_dim"], TINY["n_layers"], TINY["n_heads"])
    assert config["tie_word_embeddings"] is False and config["activation_function"] == "gelu_new"
    # back through our safetensors loader: every parameter equal (zero biases without qkv_bias)
    ours, theirs = model.state_dict(), exported_model(tmp_path / "hf").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not theirs[k].any() for k in set(theirs) - set(ours))
    assert len(set(theirs) - set(ours)) == (0 if qkv_bias else 3 * TINY["n_layers"])
    # transformers: the same logits and the same greedy tokens
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("Every effort moves you")])
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
        greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=50256)
    assert greedy[0].tolist() == ch04.generate_text_simple(model, ids, 10, 32)[0].tolist()
    hf_tokenizer = GPT2Tokenizer.from_pretrained(tmp_path / "hf")
    text = "It's the last he painted,  you know\n\n Mrs. Gisburn said 123."
    assert hf_tokenizer.encode(text) == tokenizer.encode(text)


def test_exported_tokenizer_files_are_gpt2s_own(tokenizer):
    files = ch02.hf_vocabulary_files(tokenizer)
    assert json.loads(files["vocab.json"]) == json.loads(
        (SHARED / "gpt2_vocab" / "encoder.json").read_text(encoding="utf-8"))
    lines = lambda text: [line for line in text.split("\n") if line.strip()]  # noqa: E731
    assert lines(files["merges.txt"]) == lines(
        (SHARED / "gpt2_vocab" / "vocab.bpe").read_text(encoding="utf-8"))


def test_a_124m_export_gives_transformers_the_same_logits(tmp_path, tokenizer):
    optional("transformers", "the export is loaded with GPT2LMHeadModel")
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = ch04.gpt_config("124M", drop_rate=0.0)  # the book's: no qkv bias, own output layer
    model = ch04.GPTModel(cfg).eval()
    gpt2.write_hf_folder(model.state_dict(), cfg, tmp_path / "hf")  # what --export-hf writes
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("Every effort moves you")])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_a_file_saved_by_transformers_loads_into_gptmodel(hf_tiny, tmp_path, monkeypatch):
    optional("transformers", "the export is loaded with GPT2LMHeadModel")
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                    vocab_size=50257)).eval()
    hf.save_pretrained(tmp_path / "saved")
    model, _ = gpt2.load_gpt2_model("tiny", tmp_path / "unused", hf_file=tmp_path / "saved")
    ids = torch.tensor([[464, 3290, 1807, 345, 2651, 13]])
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_export_refuses_a_classifier_and_an_existing_folder(tmp_path, capsys):
    model, cfg = tiny_text_model_file(tmp_path / "checkpoint.pt")
    classifier = tiny_model()
    ch06.prepare_classifier(classifier, cfg)
    ch06.save_classifier(tmp_path / "classifier.pth", classifier, cfg, {})
    with pytest.raises(ValueError, match="has no place for a classifier's head"):
        gpt2.export_hf(tmp_path / "classifier.pth", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    # a folder of the user's own files is never replaced, --overwrite or not
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"out holds files this command did not write "
                                                  r"\(mine\.txt\): name a new folder, or one "
                                                  r"that holds an earlier export"):
            gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    # interrupted while writing: the earlier export is as it was, no temporary folder is left
    gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    with pytest.raises(FileExistsError, match=r"export holds an earlier export\. Replace it "
                                              r"with --overwrite"):
        gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt2, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "export", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "classifier.pth",
                                                          "export", "out"]
    # another export into the same new folder, finished while this one wrote: kept
    real_save = gpt2.save_file

    def other_run_meanwhile(*args, **kwargs):
        (tmp_path / "race").mkdir()
        (tmp_path / "race" / "theirs.txt").write_text("theirs")
        real_save(*args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt2, "save_file", other_run_meanwhile)
        with pytest.raises(FileExistsError, match="race appeared while it was being written"):
            gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "race")
    assert [p.name for p in (tmp_path / "race").iterdir()] == ["theirs.txt"]
    assert not list(tmp_path.glob(".race*"))  # no temporary folder left
    # a killed export's temporary folder goes with the next export; a running one's stays
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    for pid in (killed.pid, os.getpid()):
        (tmp_path / f".export.{pid}-abc.tmp").mkdir()
    gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "export", overwrite=True)
    assert [p.name for p in tmp_path.glob(".export.*")] == [f".export.{os.getpid()}-abc.tmp"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(gpt2.EXPORT_FILES)
    # a file where the folder should go, and a parent that cannot be written: named at once
    with pytest.raises(FileExistsError, match=r"classifier\.pth is a file, not a folder: name a "
                                              r"new folder\.$"):
        gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "classifier.pth")
    with read_only_folders() as mp:
        mp.setattr(gpt2, "load_text_model", lambda *a, **k: pytest.fail("checked too late"))
        with pytest.raises(OSError, match=r"^--export-hf .*ro cannot be written to"):
            gpt2.export_hf(tmp_path / "checkpoint.pt", tmp_path / "ro" / "export")
    out = tmp_path / "export"
    (tmp_path / "plain").mkdir()  # the folder's permissions are a plain folder's, and so
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain" / "file").write_text("")  # are its files' (safetensors' too)
    assert {p.stat().st_mode for p in out.iterdir()} == \
        {(tmp_path / "plain" / "file").stat().st_mode}
    tiny_text_model_file(tmp_path / "small.pt", vocab_size=SMALL_VOCAB)
    with pytest.raises(ValueError, match="vocabulary of 1,000 tokens; the export carries GPT-2's"):
        gpt2.export_hf(tmp_path / "small.pt", tmp_path / "small")


# ---- Chapter 5, beyond the book: a named corpus (--data fineweb-edu) ----

@pytest.fixture
def corpus(tmp_path, serve, verdict, monkeypatch):
    """FineWeb-Edu in small: the story's paragraphs as documents in three Parquet
    files of row groups of 3 rows (the last file a story of its own), served
    as Hugging Face serves a dataset's files ($HF_ENDPOINT), with 80-token
    validation part and 150-token training shards. Returns (texts, server)."""
    pa = optional("pyarrow", "named corpora are published as Parquet")
    import pyarrow.parquet as pq
    texts = [p.strip() for p in verdict.split("\n\n") if p.strip()]
    files, served = [], {}
    for i, chunk in enumerate((texts[:10], texts[10:25], texts[25:40])):
        path = tmp_path / "published" / f"{i:03d}_00000.parquet"
        path.parent.mkdir(exist_ok=True)
        # the first file large enough (random ids) for a cut download to leave a part
        ids = [os.urandom(12000 if i == 0 else 4).hex() for _ in chunk]
        pq.write_table(pa.table({"text": chunk, "id": ids}), path, row_group_size=3)
        data = path.read_bytes()
        files.append((f"sample/10BT/{path.name}", len(data), hashlib.sha256(data).hexdigest()))
        served[f"/datasets/test/fineweb/resolve/r1/sample/10BT/{path.name}"] = data
    server = serve(FileServer, served)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setitem(ch02.CORPORA, "fineweb-edu", {
        **ch02.CORPORA["fineweb-edu"], "dataset": "test/fineweb", "revision": "r1",
        "files": files, "validation_tokens": 80, "train_from": 0, "default_tokens": 500})
    monkeypatch.setattr(ch02, "SHARD_TOKENS", 150)
    return [t for chunk in (texts[:10], texts[10:25], texts[25:40]) for t in chunk], server


def corpus_tokens(texts, tokenizer):
    """tiktoken's tokens of the documents, <|endoftext|> after each."""
    return tokenizer.encode(ch02.EOT.join(texts) + ch02.EOT, allowed_special={ch02.EOT})


def test_a_named_corpus_is_downloaded_and_tokenized_once_its_validation_part_fixed(
        corpus, tmp_path, tokenizer, capsys):
    texts, server = corpus
    expected = corpus_tokens(texts, tokenizer)
    train, val = ch02.prepare_corpus("fineweb-edu", 200, tmp_path / "data", workers=1)
    # the validation part: whole documents, from the first, until 80 tokens are reached
    ends = list(itertools.accumulate(len(tokenizer.encode(t)) + 1 for t in texts))
    n_val = next(e for e in ends if e >= 80)
    assert list(val) == expected[:n_val]
    assert len(train) == 200 and list(train[0:200]) == expected[n_val:n_val + 200]
    store = next((tmp_path / "data" / "fineweb-edu").glob("tokens-*"))
    shards = sorted(store.glob("train-*.bin"))
    assert len(shards) == 2  # 150 tokens or more each, ended at a document's end
    assert "Tokenized " in capsys.readouterr().out
    # asked again: nothing downloaded or tokenized; asked for more: extended
    requests = len(server.requests)
    again, val_again = ch02.prepare_corpus("fineweb-edu", 200, tmp_path / "data", workers=1)
    assert len(server.requests) == requests and "Tokenized" not in capsys.readouterr().out
    more, val_more = ch02.prepare_corpus("fineweb-edu", 600, tmp_path / "data", workers=1)
    assert list(val_more) == list(val) and list(more[0:600]) == expected[n_val:n_val + 600]
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in
                                              sorted(store.glob("train-*.bin"))[:2]]
    # more than the corpus holds: all of it, said so
    whole, _ = ch02.prepare_corpus("fineweb-edu", 10**9, tmp_path / "data", workers=1)
    assert list(whole[0:len(whole)]) == expected[n_val:]
    assert f"fineweb-edu has {len(expected) - n_val:,} training tokens in all" in \
        capsys.readouterr().out
    # parallel tokenizing equals one process, byte for byte
    ch02.prepare_corpus("fineweb-edu", 10**9, tmp_path / "parallel", workers=2)
    other = next((tmp_path / "parallel" / "fineweb-edu").glob("tokens-*"))
    assert sorted(p.name for p in other.glob("*.bin")) == sorted(p.name for p in store.glob("*.bin"))
    assert all((other / p.name).read_bytes() == p.read_bytes() for p in store.glob("*.bin"))


def test_a_named_corpus_survives_cut_downloads_damaged_files_and_ctrl_c(
        corpus, tmp_path, tokenizer, capsys, monkeypatch):
    texts, server = corpus
    expected = corpus_tokens(texts, tokenizer)
    first = next(iter(server.files))
    server.cut_short.add(first)  # the connection drops halfway: resumed with a Range request
    server.wrong_once[first.replace("000_", "001_")] = b"<html>502 Bad Gateway</html>"
    real_write, calls = ch02.write_token_file, []

    def interrupted(path, ids):  # Ctrl-C while the third part is being written
        calls.append(path.name)
        if len(calls) == 3:
            with ch02.atomic_path(path) as tmp:
                tmp.write_bytes(b"half")
                raise KeyboardInterrupt
        real_write(path, ids)
    monkeypatch.setattr(ch02, "write_token_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ch02.prepare_corpus("fineweb-edu", 1200, tmp_path / "data", workers=1)
    assert [r for r in server.requests if r[0] == first][1][1].startswith("bytes=")  # resumed
    store = next((tmp_path / "data" / "fineweb-edu").glob("tokens-*"))
    assert sorted(p.name for p in store.iterdir()) == [
        "manifest.json", "train-0000.bin", "train-0000.json", "val.bin", "val.json"]
    monkeypatch.setattr(ch02, "write_token_file", real_write)
    train, val = ch02.prepare_corpus("fineweb-edu", 1200, tmp_path / "data", workers=1)
    n_val = len(val)
    assert list(train[0:1200]) == expected[n_val:n_val + 1200]
    out = capsys.readouterr().out
    assert re.search(r"001_00000\.parquet is damaged \(28 bytes, not the published [\d,]+\); "
                     r"moved aside to 001_00000\.parquet\.damaged and downloading it again", out)
    # a damaged token file: it and the ones after it made again, the same
    shard = store / "train-0001.bin"
    shard.write_bytes(b"\0\0" + shard.read_bytes()[2:])
    train, _ = ch02.prepare_corpus("fineweb-edu", 1200, tmp_path / "data", workers=1)
    assert list(train[0:1200]) == expected[n_val:n_val + 1200]
    assert re.search(r"train-0001\.bin is damaged \(its checksum does not match what was "
                     r"written\); it and the \d+ after it are tokenized again",
                     capsys.readouterr().out)
    # a file whose size and SHA-256 are not published: its Parquet footer tells it damaged
    spec = ch02.CORPORA["fineweb-edu"]
    monkeypatch.setitem(spec, "files", spec["files"][:2] + [(spec["files"][2][0], None, None)])
    server.wrong_once[first.replace("000_", "002_")] = b"not Parquet at all" * 100
    whole, val = ch02.prepare_corpus("fineweb-edu", 10**9, tmp_path / "data", workers=1)
    assert list(whole[0:len(whole)]) == expected[len(val):]
    assert re.search(r"002_00000\.parquet is damaged \(no Parquet footer \(Arrow\w+\)\); moved "
                     r"aside", capsys.readouterr().out)
    # a disk without room for the next file is named before it is fetched
    monkeypatch.setattr(ch02.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 10))
    with pytest.raises(OSError, match=r"^000_00000\.parquet needs 0\.00 GB and its disk has "
                                      r"0\.00 GB free .*give another --data-dir"):
        ch02.prepare_corpus("fineweb-edu", 1200, tmp_path / "elsewhere", workers=1)


def test_pretraining_on_a_named_corpus_end_to_end(corpus, tmp_path, capsys):
    result = ch05.main(args_of(ch05, [
        "--data", "fineweb-edu", "--data-tokens", "0.5k", "--data-dir", str(tmp_path / "data"),
        "--workers", "2", "--model-size", "tiny", "--context-length", "16", "--batch-size", "2",
        "--max-steps", "4", "--eval-freq", "2", "--eval-iter", "1", "--device", "cpu", "--out",
        str(tmp_path / "run")]))
    out = capsys.readouterr().out
    assert result["state"]["step"] == 3 and "Tokenized " in out
    assert "data: fineweb-edu" in out and len(log_rows(tmp_path / "run" / "log.csv")) == 2
    assert ch05.resolve_settings(args_of(ch05, ["--data", "fineweb-edu"]))[0]["data_tokens"] == 500
    for argv, message in [(["--data-tokens", "0"], r"--data-tokens: must be above 0"),
                          (["--data-tokens", "1.5"], r"--data-tokens: expected a number"),
                          (["--data-tokens", "lots"], r"--data-tokens: expected a number")]:
        with pytest.raises(SystemExit):
            args_of(ch05, ["--data", "fineweb-edu", *argv])
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"--data-tokens is for a named corpus \(fineweb-edu, "
                                         r"tinystories\), not for text files"):
        ch05.resolve_settings(args_of(ch05, ["--data", str(SHARED / "data" / "the-verdict.txt"),
                                             "--data-tokens", "5k"]))


# ---- Chapter 5, loading GPT-2, beyond the book:  how good is a model ----


def benchmark_files(folder, tokenizer):
    """Small files in the benchmarks' own formats: HellaSwag's JSON lines, LAMBADA's,
    and WikiText's test split as Parquet (where pyarrow is installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    verdict = (SHARED / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    sentences = [s.strip() + "." for s in verdict.split(".") if len(s.split()) > 6][:24]
    (folder / "hellaswag_val.jsonl").write_text("".join(json.dumps(
        {"ctx": sentences[i], "endings": sentences[i + 1:i + 5], "label": i % 4,
         "activity_label": "test"}) + "\n" for i in range(0, 20, 2)), encoding="utf-8")
    (folder / "lambada_test.jsonl").write_text("".join(
        json.dumps({"text": s}) + "\n" for s in sentences[:12]), encoding="utf-8")
    return verdict


def test_benchmark_scores_equal_transformers_on_the_same_weights(tmp_path, tokenizer):
    transformers = optional("transformers", "the scores are compared with GPT2LMHeadModel's")
    model, cfg = tiny_text_model_file(tmp_path / "m.pt", context_length=64)
    gpt2.export_hf(tmp_path / "m.pt", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    benchmark_files(tmp_path / "data", tokenizer)
    items = gpt2.hellaswag_items(tmp_path / "data" / "hellaswag_val.jsonl", tokenizer)
    batched = gpt2.score_hellaswag(model, items, "cpu", 64, batch_items=4)
    alone = gpt2.score_hellaswag(model, items, "cpu", 64, batch_items=1)
    for item, got, one in zip(items, batched, alone):
        context, endings, label = item
        expected = []
        for ending in endings:
            ids = torch.tensor([(context + ending)[-65:]])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids[:, :-1]).logits[0].double(), -1)
            targets = ids[0, 1:]
            nll = -logp[torch.arange(len(targets)), targets][-len(ending):]
            expected.append(float(nll.sum()))
        assert got["losses"] == pytest.approx(expected, abs=1e-4)  # each ending's summed loss
        assert got["losses"] == pytest.approx(one["losses"], abs=1e-5)  # batched = one at a time
    lambada = gpt2.lambada_items(tmp_path / "data" / "lambada_test.jsonl", tokenizer)
    scored = gpt2.score_lambada(model, lambada, "cpu", 64)
    for (context, target), got in zip(lambada, scored):
        ids = torch.tensor([(context + target)[-65:]])
        with torch.no_grad():
            logits = hf(ids[:, :-1]).logits[0].double()
        targets = ids[0, 1:]
        nll = -torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets][-len(target):]
        assert got["loss"] == pytest.approx(float(nll.sum()), abs=1e-4)
        assert got["acc"] == bool((logits.argmax(-1) == targets)[-len(target):].all())


def test_sliding_window_perplexity_counts_each_token_once(tmp_path, tokenizer):
    model, _ = tiny_text_model_file(tmp_path / "m.pt", context_length=32)
    text = (SHARED / "data" / "the-verdict.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[:32 * 6 + 1]
    for stride in (32, 16, 5):
        windows = gpt2.sliding_windows(len(ids), 32, stride)
        scored = [t for _, end, first in windows for t in range(first + 1, end + 1)]
        assert scored == list(range(1, len(ids)))  # every token after the first, once
    # stride = context: the mean loss of calc_loss_loader over the non-overlapping windows
    result = gpt2.text_perplexity(model, ids, "cpu", 32, 32, tokenizer)
    loader = ch02.create_dataloader_v1(tokenizer.decode(ids), batch_size=2, max_length=32,
                                       stride=32, shuffle=False, drop_last=False)
    assert result["tokens"] == 32 * 6
    assert math.log(result["ppl"]) == pytest.approx(ch05.calc_loss_loader(loader, model, "cpu"),
                                                    rel=1e-5)
    n_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
    assert result["bpb"] == pytest.approx(math.log(result["ppl"]) * 192 / math.log(2) / n_bytes)
    # a model that has learned a text by heart: perplexity near 1 on it
    torch.manual_seed(0)
    learner = tiny_model(0, context_length=32)
    opt = torch.optim.AdamW(learner.parameters(), lr=3e-3)
    x, y = torch.tensor([ids[:32]]), torch.tensor([ids[1:33]])
    for _ in range(150):
        opt.zero_grad()
        ch05.calc_loss_batch(x, y, learner, "cpu").backward()
        opt.step()
    learner.eval()
    assert gpt2.text_perplexity(learner, ids[:33], "cpu", 32, 32, tokenizer)["ppl"] < 1.2


def test_benchmark_files_download_once_and_a_damaged_one_is_fetched_again(tmp_path, serve,
                                                                          tokenizer, capsys,
                                                                          monkeypatch):
    tiny_text_model_file(tmp_path / "m.pt", context_length=64)
    benchmark_files(tmp_path / "published", tokenizer)
    published = {name: (tmp_path / "published" / name).read_bytes()
                 for name in ("lambada_test.jsonl", "hellaswag_val.jsonl")}
    server = serve(FileServer, {f"/pub/{name}": data for name, data in published.items()})
    # LAMBADA pinned by its SHA-256, HellaSwag checked by what it holds
    monkeypatch.setitem(gpt2.EVAL_FILES, "lambada", (
        "lambada_test.jsonl", server.url + "/pub/lambada_test.jsonl",
        hashlib.sha256(published["lambada_test.jsonl"]).hexdigest()))
    monkeypatch.setitem(gpt2.EVAL_FILES, "hellaswag", (
        "hellaswag_val.jsonl", server.url + "/pub/hellaswag_val.jsonl", None))
    argv = ["--from", str(tmp_path / "m.pt"), "--eval", "lambada,hellaswag", "--data-dir",
            str(tmp_path / "eval"), "--limit", "4", "--device", "cpu"]
    first = gpt2.main(args_of(gpt2, argv))
    requests = len(server.requests)
    assert gpt2.main(args_of(gpt2, argv)) == first and len(server.requests) == requests  # once
    for name in published:
        (tmp_path / "eval" / name).write_text("<html>502 Bad Gateway</html>")
    capsys.readouterr()
    assert gpt2.main(args_of(gpt2, argv)) == first
    out = capsys.readouterr().out
    assert re.search(r"lambada_test\.jsonl is damaged \(SHA-256 [0-9a-f]{12}\.\.\., not the "
                     r"published [0-9a-f]{12}\.\.\.\); moved aside to lambada_test\.jsonl\."
                     r"damaged and downloading it again\.", out)
    assert "hellaswag_val.jsonl, line 1: not JSON (Expecting value). Moved aside to " \
        "hellaswag_val.jsonl.damaged; downloading it again." in out
    # the server itself sends a changed file: named, and one damaged copy kept
    server.files["/pub/lambada_test.jsonl"] = published["lambada_test.jsonl"][:-40] + b"\n"
    (tmp_path / "eval" / "lambada_test.jsonl").write_text("cut")
    with pytest.raises(ch02.DownloadError, match=r"lambada_test\.jsonl is damaged \(SHA-256 "
                                                 r".*also when downloaded again \(kept as "
                                                 r"lambada_test\.jsonl\.damaged\.1\)"):
        gpt2.main(args_of(gpt2, argv))
    assert not (tmp_path / "eval" / "lambada_test.jsonl").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lambada_test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"lambada_test\.jsonl holds no items"):
        gpt2.main(args_of(gpt2, [*argv, "--eval-data-dir", str(tmp_path / "empty")]))


def test_eval_every_scores_hellaswag_while_training_without_changing_the_run(
        tmp_path, reference, short_text, tokenizer, capsys):
    benchmark_files(tmp_path / "bench", tokenizer)
    rows, weights, samples, last_step = reference("cpu")
    result = ch05.main(resume_args(tmp_path / "run", "cpu", short_text, "--eval-every", "3",
                                   "--eval-data-dir", str(tmp_path / "bench")))
    logged = log_rows(tmp_path / "run" / "log.csv")
    # the book's losses as without it: scoring draws no random numbers, trains nothing
    assert [{k: r[k] for k in rows[0]} for r in logged if r["train_loss"]] == rows
    assert all(torch.equal(v, weights[k]) for k, v in result["model"].state_dict().items())
    scored = [r for r in logged if r["hellaswag_acc_norm"]]
    assert [int(r["step"]) for r in scored] == [0, 3, 6, 9] == list(range(0, last_step + 1, 3))
    # the last score is the final model's, as ch05_load_gpt2.py --eval gives it
    items = gpt2.hellaswag_items(tmp_path / "bench" / "hellaswag_val.jsonl", tokenizer)
    final = gpt2.benchmark_metrics("hellaswag", result["model"], items, "cpu", 32, 16, tokenizer)
    assert float(scored[-1]["hellaswag_acc_norm"]) == pytest.approx(final["acc_norm"])
    assert float(scored[-1]["hellaswag_acc"]) == pytest.approx(final["acc"])
    out = capsys.readouterr().out
    assert f"Ep 2 (Step 000009): HellaSwag acc_norm {final['acc_norm']:.4f}, " \
        f"acc {final['acc']:.4f}" in out
    assert (tmp_path / "run" / "loss-plot.png").stat().st_size > 0
    # --eval-text: the text's perplexity instead, its first N windows with --eval-limit
    result = ch05.main(resume_args(tmp_path / "text", "cpu", short_text, "--eval-every", "3",
                                   "--eval-text", str(short_text), "--eval-limit", "2"))
    scored = [r for r in log_rows(tmp_path / "text" / "log.csv") if r["text_ppl"]]
    assert [int(r["step"]) for r in scored] == [0, 3, 6, 9]
    ids = tokenizer.encode(short_text.read_text(encoding="utf-8"))[:64]
    final = gpt2.text_perplexity(result["model"].eval(), ids, "cpu", 32, 16, tokenizer)
    assert float(scored[-1]["text_ppl"]) == pytest.approx(final["ppl"])
    assert float(scored[-1]["text_bpb"]) == pytest.approx(final["bpb"])
    assert float(scored[0]["text_ppl"]) > final["ppl"]  # the model learnt from the text
    for flag in (["--eval-text", str(short_text)], ["--eval-limit", "3"]):
        with pytest.raises(ValueError, match=rf"{flag[0]} choose what --eval-every N scores: "
                                             r"give --eval-every too"):
            ch05.main(resume_args(tmp_path / "no", "cpu", short_text, *flag))
    with pytest.raises(FileNotFoundError, match=r"--eval-data-dir .*nowhere has no "
                                                r"hellaswag_val\.jsonl"):
        ch05.main(resume_args(tmp_path / "none", "cpu", short_text, "--eval-every", "3",
                              "--eval-data-dir", str(tmp_path / "nowhere")))
    assert not (tmp_path / "none" / "checkpoint.pt").exists()


def test_wikitext_is_read_from_its_parquet_file_and_scored_as_one_text(tmp_path, tokenizer,
                                                                       monkeypatch, capsys):
    pa = optional("pyarrow", "WikiText is published as Parquet")
    import pyarrow.parquet as pq
    model, _ = tiny_text_model_file(tmp_path / "m.pt", context_length=32)
    rows = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : the story "
            "goes on , and on . \n", " It was released in January 2011 . \n"]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": rows}), tmp_path / "data" / "wikitext-2-raw-v1-test.parquet")
    results = gpt2.main(args_of(gpt2, ["--from", str(tmp_path / "m.pt"), "--eval", "wikitext2",
                                       "--eval-data-dir", str(tmp_path / "data"), "--stride",
                                       "16", "--device", "cpu"]))
    ids = tokenizer.encode("".join(rows))
    expected = gpt2.text_perplexity(model, ids, "cpu", 32, 16, tokenizer)
    assert results["wikitext2"] == pytest.approx(expected)
    assert results["wikitext2"]["tokens"] == len(ids) - 1
    assert re.search(r"wikitext2 +ppl +[\d.]+ +$", capsys.readouterr().out, re.M)  # 124M: none
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # importing it now fails
    with pytest.raises(ValueError, match=r"Reading Parquet files needs pyarrow: pip install "
                                         r"pyarrow"):
        gpt2.wikitext(tmp_path / "data" / "wikitext-2-raw-v1-test.parquet")


def test_a_model_made_to_prefer_an_ending_picks_it_and_the_command_reports(tmp_path, tokenizer,
                                                                           capsys):
    model, _ = tiny_text_model_file(tmp_path / "m.pt", context_length=64)
    benchmark_files(tmp_path / "data", tokenizer)
    items = gpt2.hellaswag_items(tmp_path / "data" / "hellaswag_val.jsonl", tokenizer)
    with torch.no_grad():  # hand-set: the final norm gives one vector, whose logit 11 is 50
        model.final_norm.scale.zero_()
        model.final_norm.shift.zero_()
        model.final_norm.shift[0] = 1.0
        model.out_head.weight.zero_()
        model.out_head.weight[11, 0] = 50.0
    favourite = [(c, [[11] * len(endings[0])] + endings[1:], 0) for c, endings, _ in items]
    assert all(r["acc"] and r["acc_norm"] for r in gpt2.score_hellaswag(model, favourite, "cpu",
                                                                         64))
    # the command: a table, the JSON with the data's SHA-256, --limit said as such
    out_json = tmp_path / "scores.json"
    results = gpt2.main(args_of(gpt2, [
        "--from", str(tmp_path / "m.pt"), "--eval", "hellaswag,lambada", "--eval-text",
        str(SHARED / "data" / "the-verdict.txt"), "--eval-data-dir", str(tmp_path / "data"),
        "--limit", "5", "--json", str(out_json), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert set(results) == {"hellaswag", "lambada", "text"} and results["hellaswag"]["n"] == 5
    assert "(5 of the 10,042 items: not compared with the published numbers of the whole)" in out
    assert "0.2859" not in out  # a part is never set beside the whole's published number
    saved = json.loads(out_json.read_text())
    assert saved["results"]["text"]["tokens"] == results["text"]["tokens"]
    assert saved["data_sha256"][str(tmp_path / "data" / "hellaswag_val.jsonl")] == \
        hashlib.sha256((tmp_path / "data" / "hellaswag_val.jsonl").read_bytes()).hexdigest()
    # bad input: one line each
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "hellaswag_val.jsonl").write_text('{"ctx": "x", "endings": ["a"]}\n')
    with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl, line 1: not a HellaSwag item"):
        gpt2.main(args_of(gpt2, ["--from", str(tmp_path / "m.pt"), "--eval", "hellaswag",
                                 "--eval-data-dir", str(tmp_path / "bad"), "--device", "cpu"]))
    with pytest.raises(FileNotFoundError, match=r"--eval-data-dir .*bad has no lambada_test"):
        gpt2.main(args_of(gpt2, ["--from", str(tmp_path / "m.pt"), "--eval", "lambada",
                                 "--eval-data-dir", str(tmp_path / "bad"), "--device", "cpu"]))
    for argv, words in ((["--eval", "mmlu"], "unknown benchmark 'mmlu'"),
                        (["--eval", "lambada", "--limit", "0"], "must be at least 1")):
        with pytest.raises(SystemExit):
            args_of(gpt2, argv)
        assert words in capsys.readouterr().err


# ======= Chapter 6: the book's listings (and appendix E) =======


@pytest.fixture(scope="session")
def spam_tsv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spam")
    zip_path = SHARED / "data" / "sms_spam_collection.zip"
    if not zip_path.exists():
        zip_path = folder / "sms_spam_collection.zip"  # downloaded by the call below
    return ch06.download_and_unzip_spam_data(ch06.SPAM_URL, zip_path, folder / "extracted",
                                             folder / "SMSSpamCollection.tsv")


def test_balancing_and_split_sizes_on_the_real_file(spam_tsv):
    rows = ch06.read_spam_data(spam_tsv)
    assert sum(r[0] == "spam" for r in rows) == 747
    balanced = ch06.create_balanced_dataset(rows)
    assert sum(r[0] == "spam" for r in balanced) == 747 == sum(r[0] == "ham" for r in balanced)
    # the book's rows in the book's order: pandas' ham.sample(747, random_state=123), then spam
    ham, spam = ([r for r in rows if r[0] == label] for label in ("ham", "spam"))
    book = [ham[i] for i in np.random.RandomState(123).choice(len(ham), 747, replace=False)]
    assert balanced == book + spam
    parts = ch06.random_split(balanced, 0.7, 0.1)
    assert [len(p) for p in parts] == [1045, 149, 300]
    assert sorted(r for p in parts for r in p) == sorted(balanced)  # a partition


def test_balancing_and_split_on_a_small_file(tmp_path):
    tsv = tmp_path / "small.tsv"
    tsv.write_text("".join(f"ham\tham message {i}\n" for i in range(30)) +
                   "".join(f"spam\tWIN {i}\n" for i in range(10)), encoding="utf-8")
    balanced = ch06.create_balanced_dataset(ch06.read_spam_data(tsv))
    assert len(balanced) == 20 and sum(r[0] == "spam" for r in balanced) == 10
    assert len(set(balanced)) == 20
    assert balanced == ch06.create_balanced_dataset(ch06.read_spam_data(tsv))  # seeded
    assert [len(p) for p in ch06.random_split(balanced, 0.7, 0.1)] == [14, 2, 4]


def write_spam_csv(path, rows):
    ch06.write_csv(rows, path)
    return path


def test_spam_dataset_pads_and_truncates(tmp_path, tokenizer):
    csv_path = write_spam_csv(tmp_path / "t.csv", [("ham", "Hi there, friend"),
                                                   ("spam", 'Free "prize", call now, now, now!')])
    ds = ch06.SpamDataset(csv_path, tokenizer)
    lengths = [len(tokenizer.encode(t)) for t in ("Hi there, friend", 'Free "prize", call now, now, now!')]
    assert ds.max_length == max(lengths)
    x, y = ds[0]
    assert x.tolist() == tokenizer.encode("Hi there, friend") + [50256] * (ds.max_length - lengths[0])
    assert y.item() == 0 and ds[1][1].item() == 1
    short = ch06.SpamDataset(csv_path, tokenizer, max_length=3)
    assert short[1][0].tolist() == tokenizer.encode('Free "prize", call now, now, now!')[:3]


class LastTokenOnly(torch.nn.Module):
    """Logits that favour class 1 at the last position only."""
    pos_emb = torch.nn.Embedding(16, 1)

    def forward(self, x):
        logits = torch.zeros(*x.shape, 2)
        logits[:, :-1, 0] = 5.0
        logits[:, -1, 1] = 5.0
        return logits


def test_loss_and_accuracy_use_the_last_token():
    model = LastTokenOnly()
    batches = [(torch.zeros(4, 6, dtype=torch.long), torch.ones(4, dtype=torch.long))]
    assert ch06.calc_accuracy_loader(batches, model, "cpu") == 1.0
    expected = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 5.0]] * 4), torch.ones(4, dtype=torch.long))
    assert math.isclose(ch06.calc_loss_loader(batches, model, "cpu"), expected.item(), rel_tol=1e-6)


def separable_loaders(tmp_path, tokenizer):
    rows = [("spam", f"WIN cash prize now {i} claim") for i in range(24)] + \
           [("ham", f"see you at lunch {i} ok") for i in range(24)]
    rows = ch06.random_split(rows, 1.0, 0.0)[0]
    ds = ch06.SpamDataset(write_spam_csv(tmp_path / "sep.csv", rows), tokenizer)
    torch.manual_seed(123)
    return DataLoader(ds, batch_size=8, shuffle=True, drop_last=True)


def test_tiny_classifier_learns_a_separable_task(tmp_path, tokenizer):
    loader = separable_loaders(tmp_path, tokenizer)
    torch.manual_seed(0)
    model = ch06.prepare_classifier(tiny_model(), TINY, trainable="all")
    before = ch06.calc_loss_loader(loader, model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, _, train_accs, _, seen = ch06.train_classifier_simple(
        model, loader, loader, optimizer, "cpu", num_epochs=4, eval_freq=100, eval_iter=10)
    assert seen == 4 * 48
    assert ch06.calc_loss_loader(loader, model, "cpu") < 0.5 * before
    assert train_accs[-1] == 1.0
    label, probability = ch06.classify_review("WIN cash prize now 99 claim", model, tokenizer,
                                              "cpu", max_length=loader.dataset.max_length)
    assert label == "spam" and 0.5 < probability <= 1.0
    assert ch06.classify_review("see you at lunch 3 ok", model, tokenizer, "cpu")[0] == "not spam"


def test_classify_review_truncates_long_text_with_a_warning(tokenizer):
    model = ch06.prepare_classifier(tiny_model(), TINY)  # context 32
    with pytest.warns(UserWarning, match="has 100 tokens; only its first 32"):
        label, p = ch06.classify_review(" word" * 100, model, tokenizer, "cpu", max_length=200)
    assert label in ("spam", "not spam") and 0.5 <= p <= 1.0


def test_lora_starts_equal_to_base_and_trains_only_lora():
    torch.manual_seed(1)
    model = ch06.prepare_classifier(tiny_model(), TINY, trainable="all")
    x = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        base = model(x)
    ch06.replace_linear_with_lora(model, rank=4, alpha=8)
    for p in model.parameters():
        p.requires_grad = False
    for m in model.modules():
        if isinstance(m, ch06.LoRALayer):
            m.A.requires_grad = m.B.requires_grad = True
    with torch.no_grad():
        assert torch.equal(model(x), base)  # B starts at zero
        # the fast kernels leave LoRA's layers to their own forward
        assert torch.allclose(ch04.use_fast_kernels(model)(x), base, atol=1e-5)
    d, r = TINY["emb_dim"], 4
    per_block = r * (d + d) * 4 + r * (d + 4 * d) * 2  # q, k, v, out_proj; the two FF layers
    assert ch06.count_trainable(model) == TINY["n_layers"] * per_block + r * (d + 2)  # + head
    # prepare_classifier's LoRA path: exactly the LoRA matrices train
    lora_model = ch06.prepare_classifier(tiny_model(), TINY, lora_rank=4, lora_alpha=8)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora.A", "lora.B")) for n in trainable)
    assert ch06.count_trainable(lora_model) == ch06.count_trainable(model)


def test_lora_count_for_gpt2_small_is_the_books():
    cfg = ch04.gpt_config("124M", qkv_bias=True)
    with torch.device("meta"):  # shapes only: no memory for 124M parameters
        model = ch04.GPTModel(cfg)
    lines = []
    ch06.prepare_classifier(model, cfg, lora_rank=16, lora_alpha=16, say=lines.append)
    assert lines == ["Total trainable parameters before: 124,441,346",
                     "Total trainable parameters after: 0",
                     "Total trainable LoRA parameters: 2,666,528"]


# ---- Chapter 6, beyond the book: the command, its saved classifier, bad input ----


def test_bad_data_lines_are_named(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("ham\tfine\nspam no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv, line 2: expected 'label<TAB>text'"):
        ch06.read_spam_data(tsv)
    tsv.write_text("ham\tfine\nham\tfine too\neggs\tnot a label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: label 'eggs' is neither 'ham' nor 'spam'"):
        ch06.read_spam_data(tsv)


def test_trainable_choices():
    model = ch06.prepare_classifier(tiny_model(), TINY, trainable="last_block")
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"out_head", "final_norm", f"trf_blocks.{TINY['n_layers'] - 1}"}
    # the counts of each choice, for 5 classes
    d = TINY["emb_dim"]
    size = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    base = tiny_model()
    block, norm, head = size(base.trf_blocks[0]), size(base.final_norm), d * 5 + 5
    everything = size(base) - size(base.out_head) + head
    for choice, expected in [("head", head), ("last_block", head + block + norm),
                             ("last_two_blocks", head + 2 * block + norm), ("all", everything)]:
        model = ch06.prepare_classifier(tiny_model(), TINY, trainable=choice, num_classes=5)
        assert ch06.count_trainable(model) == expected, choice


def test_classify_without_a_saved_model_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No trained classifier.*python ch06_classify.py"):
        ch06.load_classifier(tmp_path / "classifier.pth")


def test_chapter6_end_to_end_then_classify(tmp_path, capsys, spam_tsv):
    # the real file's first 150 spam and 150 ham messages: the whole run, 7x faster
    rows = ch06.read_spam_data(spam_tsv)
    few = [r for r in rows if r[0] == "spam"][:150] + [r for r in rows if r[0] == "ham"][:150]
    lines = "".join(f"{label}\t{text}\n" for label, text in few if '"' not in text)
    args = args_of(ch06, [
        "--data", str(spam_zip(tmp_path / "few.zip", {"SMSSpamCollection": lines})),
        "--data-dir", str(tmp_path / "data"), "--model-size", "tiny", "--no-pretrained",
        "--models-dir", str(tmp_path / "gpt2"), "--lora", "--rank", "2", "--alpha", "4",
        "--epochs", "1", "--lr", "1e-3", "--eval-iter", "2", "--out", str(tmp_path / "out"),
        "--device", "cpu"])
    result = ch06.main(args)
    out = capsys.readouterr().out
    assert re.search(r"Train / validation / test: \d+ / \d+ / \d+", out) and "random weights" in out
    assert set(result["accuracies"]) == {"train", "validation", "test"}
    # the book's two messages, each class named as everywhere else in the command
    demo = out[out.index("The book's two messages"):].splitlines()[1:3]
    assert [line.split()[0] in ("ham", "spam") for line in demo] == [True, True], demo
    assert demo[0].endswith("You are a winner you have been specially selected to receive "
                            "$1000 cash or a $2000 award.")
    for name in ("classifier.pth", "loss-plot.png", "accuracy-plot.png", "accuracy.json"):
        assert (tmp_path / "out" / name).exists()
    (tmp_path / "texts.txt").write_text("You won a prize, reply now\n\n\u200b\nSee you at 5\n",
                                        encoding="utf-8")  # a zero-width space is no text
    classify = args_of(ch06, [
        "--classify", "Free entry!", "--classify-file", str(tmp_path / "texts.txt"),
        "--out", str(tmp_path / "out"), "--device", "cpu"])
    results = ch06.main(classify)["classified"]
    assert len(results) == 3 and all(label in ("ham", "spam") for label, _ in results)
    model, settings = ch06.load_classifier(tmp_path / "out" / "classifier.pth")
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 2, 3]])), result["model"].eval()(torch.tensor([[1, 2, 3]])))
    longest = int(re.search(r"Longest training text \(tokens\): (\d+)", out).group(1))
    assert settings["lora_rank"] == 2 and settings["max_length"] == longest
    with pytest.raises(ValueError, match=r"already holds an earlier run's results \(classifier"
                                         r"\.pth, accuracy\.json, confusion\.json\)\. Use it "
                                         r"with --classify.*--overwrite"):
        ch06.main(args)


def spam_zip(path, members):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


def bad_chapter6_input(tmp_path, case):
    """(extra flags, expected error type, message pattern) for one bad input."""
    real_zip = (SHARED / "data" / "sms_spam_collection.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(real_zip[:len(real_zip) // 2])
    (tmp_path / "page.zip").write_text("<html>Not found</html>", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n  \n\u200b\n\u2060 \n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("Gagnez un café".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    return {
        "not a zip": (["--data", str(tmp_path / "page.zip")], ValueError,  # the user's file:
                      r"page\.zip is not a whole zip file \((?!.*delete).*give the UCI SMS Spam "
                      r"Collection zip with --data\.$"),  # never advise deleting it
        "cut zip": (["--data", str(tmp_path / "cut.zip")], ValueError, r"cut\.zip is not a whole"),
        "no data in the zip": (["--data", str(spam_zip(tmp_path / "other.zip",
                                                       {"readme.txt": "hi"}))],
                               ValueError, r"holds no SMSSpamCollection file \(it holds readme"),
        "one label": (["--data", str(spam_zip(tmp_path / "ham.zip",
                                              {"SMSSpamCollection": "ham\thello\n" * 30}))],
                      ValueError, r"has 30 ham and 0 spam messages; .* at least 10 of each"),
        "missing zip": (["--data", str(tmp_path / "none.zip")], FileNotFoundError,
                        r"--data .*none\.zip: no such file"),
        "empty --classify": (["--classify", " "], ValueError, "--classify got an empty text"),
        "invisible --classify": (["--classify", "\u200b\ufeff"], ValueError,
                                 "--classify got an empty text"),
        "empty file": (["--classify-file", str(tmp_path / "empty.txt")], ValueError,
                       r"empty\.txt has no text to classify"),
        "folder": (["--classify-file", str(tmp_path / "folder")], FileNotFoundError,
                   r"Text file not found: .*folder \(it is a folder\)"),
        "a zip with a non-UTF-8 line": (
            ["--data", str(spam_zip(tmp_path / "latin.zip", {"SMSSpamCollection":
                                                             ("ham\thello\n" * 3).encode() +
                                                             "spam\tWin £100\n".encode("latin-1")}))],
            ValueError, r"SMSSpamCollection\.tsv, line 4, is not UTF-8 text \(byte 0xa3"),
        "not UTF-8": (["--classify-file", str(tmp_path / "latin.txt")], ValueError,
                      r"latin\.txt, line 1, is not UTF-8"),
        "a chapter 5 checkpoint": (["--classify", "Free prize"], ValueError,
                                   r"classifier\.pth holds a model file of an earlier version, "
                                   r"not a classifier finetuned by ch06_classify\.py\. Train a "
                                   r"classifier with `python ch06_classify\.py --out"),
    }[case]


@pytest.mark.parametrize("case", ["not a zip", "cut zip", "no data in the zip", "one label",
                                  "missing zip", "empty --classify", "empty file", "folder",
                                  "not UTF-8", "a chapter 5 checkpoint",
                                  "a zip with a non-UTF-8 line", "invisible --classify"])
def test_chapter6_bad_inputs_get_one_clear_error(case, tmp_path):
    extra, error, message = bad_chapter6_input(tmp_path, case)
    gen.save_checkpoint(tmp_path / "out" / "classifier.pth", {"model": {}, "step": 3})
    args = args_of(ch06, [
        "--data-dir", str(tmp_path / "data"), "--model-size", "tiny", "--no-pretrained",
        "--out", str(tmp_path / "out"), "--device", "cpu", "--overwrite", *extra])
    with pytest.raises(error, match=message):
        ch06.main(args)
    assert not (tmp_path / "data" / "SMSSpamCollection.tsv").exists() or \
        case in ("one label", "a zip with a non-UTF-8 line")  # extracted, then read


def test_finetuning_runs_on_one_out_are_refused_while_one_runs(tmp_path, serve):
    """Chapters 6 and 7 hold --out's run lock as chapter 5 does: a second training
    (or --evaluate) there is refused at once, so no result is replaced midway."""
    common = ["--model-size", "tiny", "--no-pretrained", "--out", str(tmp_path), "--device", "cpu"]
    ch02.write_text_atomic(tmp_path / "instruction-data-with-response.json", "[]")
    with lock_held_elsewhere(tmp_path) as pid:
        for chapter, extra in [(ch06, ["--data", str(SHARED / "data" / "sms_spam_collection.zip"),
                                       "--data-dir", str(tmp_path / "data")]),
                               (ch07, ["--data", str(SHARED / "data" / "instruction-data.json")]),
                               (ch07, ["--evaluate"])]:
            with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))} is in use by "
                                                 rf"another run \(pid {pid} on "):
                chapter.main(args_of(chapter, common + extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["instruction-data-with-response.json", "run.lock"]  # nothing was written


def test_a_named_zip_is_used_even_when_an_extracted_file_exists(tmp_path):
    tsv = tmp_path / "SMSSpamCollection.tsv"
    for text in ("ham\tfirst\n", "spam\tsecond\n"):
        ch06.download_and_unzip_spam_data(
            "http://127.0.0.1:9/unused", spam_zip(tmp_path / "d.zip", {"SMSSpamCollection": text}),
            tmp_path / "x", tsv, reuse_extracted=False)
        assert tsv.read_text(encoding="utf-8") == text


# ---- Chapter 6, beyond the book: data of your own, any number of classes ----


TOPICS = {"food": ["pizza", "pasta", "bread", "soup", "salad"],
          "sports": ["goal", "match", "team", "score", "coach"],
          "tech": ["laptop", "phone", "chip", "code", "server"]}


def topic_rows(n, seed=0):
    """n separable texts: four words of one topic each, the topics in turn."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    return [(" ".join(rng.choice(TOPICS[topics[i % 3]], 4)), topics[i % 3]) for i in range(n)]


def write_table(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def own_data_args(tmp_path, *flags):
    return args_of(ch06, ["--model-size", "tiny", "--no-pretrained", "--out",
                          str(tmp_path / "out"), "--device", "cpu", *flags])


def test_a_three_class_csv_trains_and_its_classes_are_kept(tmp_path, capsys):
    data = write_table(tmp_path / "reviews.csv", [(t, c) for t, c in topic_rows(150)],
                       header=("review", "topic"))
    result = ch06.main(own_data_args(
        tmp_path, "--data", str(data), "--text-column", "review", "--label-column", "topic",
        "--trainable", "all", "--lr", "1e-3", "--epochs", "3", "--eval-freq", "20"))
    out = capsys.readouterr().out
    assert "3 classes: food, sports, tech" in out
    assert "Train / validation / test: 105 / 15 / 30" in out
    assert result["accuracies"]["train"] >= 0.9 and result["classes"] == ["food", "sports", "tech"]
    counts = result["confusion"]
    assert counts.sum() == 30 and counts.shape == (3, 3)  # the test split, true x predicted
    table = out[out.index("true \\ predicted"):]
    for i, name in enumerate(result["classes"]):  # each row: its counts and its accuracy
        row = re.search(rf"^{name} +(.*)$", table, re.M).group(1).split()
        assert row == [str(int(n)) for n in counts[i]] + [f"{result['per_class'][name]:.2%}"]
    saved = json.loads((tmp_path / "out" / "confusion.json").read_text())
    assert saved["counts"] == counts.tolist()
    assert (tmp_path / "out" / "confusion-matrix.png").exists()
    model, settings = ch06.load_classifier(tmp_path / "out" / "classifier.pth")
    assert settings["classes"] == ["food", "sports", "tech"] and model.out_head.out_features == 3
    classified = ch06.main(own_data_args(tmp_path, "--classify", "pizza soup bread pasta",
                                         "laptop code chip server"))["classified"]
    assert [label for label, _ in classified] == ["food", "tech"]
    # many texts, in batches, to a CSV: the same labels as one at a time
    texts = [t for t, _ in topic_rows(40, seed=1)]
    write_table(tmp_path / "many.csv", [(t,) for t in texts], header=("review",))
    batched = ch06.main(own_data_args(tmp_path, "--classify-file", str(tmp_path / "many.csv"),
                                      "--text-column", "review", "--classify-out",
                                      str(tmp_path / "labels.csv"), "--batch-size", "16"))
    with open(tmp_path / "labels.csv", encoding="utf-8", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["text"] for r in written] == texts
    assert [r["label"] for r in written] == [label for label, _ in batched["classified"]]
    one_by_one = [ch06.classify_batch([tokenizer_ids], model, "cpu", settings["max_length"])[0][0]
                  for tokenizer_ids in (ch02.bpe_tokenizer().encode(t) for t in texts)]
    assert [settings["classes"][c] for c, _ in one_by_one] == [r["label"] for r in written]
    assert sum(r["label"] == c for r, (_, c) in zip(written, topic_rows(40, seed=1))) >= 32
    with pytest.raises(FileExistsError, match="labels.csv already exists. Replace it with"):
        ch06.main(own_data_args(tmp_path, "--classify-file", str(tmp_path / "many.csv"),
                                "--text-column", "review", "--classify-out",
                                str(tmp_path / "labels.csv")))
    # a folder as --classify-out, or one that cannot be written: named before the work
    classify_to = lambda out, *flags: ch06.main(own_data_args(  # noqa: E731
        tmp_path, "--classify-file", str(tmp_path / "many.csv"), "--text-column", "review",
        "--classify-out", str(out), *flags))
    with pytest.raises(IsADirectoryError, match=r"--classify-out .*out is a folder; name a file "
                                                r"in it, e\.g\. .*results\.csv"):
        classify_to(tmp_path / "out", "--overwrite")
    with read_only_folders() as mp:
        mp.setattr(ch06, "classify_texts", lambda *a, **k: pytest.fail("checked too late"))
        with pytest.raises(OSError, match=r"^--classify-out .*ro cannot be written to"):
            classify_to(tmp_path / "ro" / "labels.csv")


def test_overwrite_replaces_a_classifier_only_once_the_new_one_exists(tmp_path, capsys):
    data = write_table(tmp_path / "topics.csv", topic_rows(60))
    train = lambda *flags: ch06.main(own_data_args(  # noqa: E731
        tmp_path, "--data", str(data), "--epochs", "1", "--eval-freq", "1", *flags))
    train()
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"}
    assert set(before) == {"classifier.pth", "accuracy.json", "confusion.json",
                           "loss-plot.png", "accuracy-plot.png", "confusion-matrix.png"}
    kept = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.name in before}  # noqa
    # a file that is no zip, or Ctrl-C while the new classifier trains: nothing is lost
    (tmp_path / "notazip.zip").write_text("<html>Not found</html>", encoding="utf-8")
    with pytest.raises(ValueError, match="notazip.zip"):
        ch06.main(own_data_args(tmp_path, "--data", str(tmp_path / "notazip.zip"),
                                "--overwrite"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ch06, "train_classifier_simple",
                   lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train("--overwrite", "--seed", "5")
    assert kept() == before
    # the results are saved before the plots: a plot stopped by Ctrl-C costs no classifier
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ch06, "plot_values", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train("--overwrite", "--seed", "5")
    after = kept()
    assert all(after[name] != before[name] for name in ("classifier.pth", "confusion.json"))
    assert after["loss-plot.png"] == before["loss-plot.png"]  # not yet replaced
    train("--overwrite", "--seed", "7")  # a whole run replaces every file, leaving nothing else
    assert all(v != before[k] for k, v in kept().items()) and set(kept()) == set(before)
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "run.lock"])


def test_many_classes_give_a_plot_without_cell_labels_or_none(tmp_path, capsys, monkeypatch):
    drawn = []
    monkeypatch.setattr(ch06, "save_figure", lambda fig, path: drawn.append(fig))
    counts = torch.randint(0, 5, (40, 40))
    assert ch06.plot_confusion_matrix(counts, [f"c{i}" for i in range(40)], tmp_path / "p.png")
    assert not drawn[0].axes[0].texts  # 1,600 numbers would be unreadable
    assert drawn[0].get_size_inches()[1] <= 40
    classes = [f"c{i}" for i in range(ch06.HEATMAP_UP_TO + 1)]
    assert not ch06.plot_confusion_matrix(torch.zeros(len(classes), len(classes), dtype=torch.long),
                                          classes, tmp_path / "p.png")
    assert len(drawn) == 1 and f"No confusion-matrix plot: {len(classes)} classes are more " \
        "than a heatmap can show" in capsys.readouterr().out
    table = ch06.confusion_table(counts, classes[:40]).splitlines()
    assert len(table) == 41 and table[1].split() == ["c0", str(int(counts[0].sum())),
                                                     f"{counts[0, 0] / counts[0].sum():.2%}"]


def test_more_than_three_classes_show_the_top_three(tmp_path, capsys):
    classes = ["a", "b", "c", "d", "e"]
    model = ch06.prepare_classifier(tiny_model(), TINY, num_classes=5)
    ch06.save_classifier(tmp_path / "out" / "classifier.pth", model, TINY, {
        "trainable": "last_block", "lora_rank": None, "lora_alpha": 16, "max_length": 8,
        "models_dir": "gpt2", "classes": classes, "token": "mean"})
    result = ch06.main(own_data_args(tmp_path, "--classify", "Hi there"))
    [(label, probability)] = result["classified"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    top = re.search(r"\(top 3: (\w) ([\d.]+)%, (\w) ([\d.]+)%, (\w) ([\d.]+)%\)$", line).groups()
    assert top[0] == label and float(top[1]) == pytest.approx(probability * 100, abs=0.06)
    assert float(top[1]) >= float(top[3]) >= float(top[5]) and len(set(top[::2])) == 3


def test_the_token_that_feeds_the_head():
    model = ch06.prepare_classifier(tiny_model(), TINY, num_classes=3).eval()
    ids = torch.tensor([[464, 3290, 1807, 345]])
    padded = torch.cat([ids, torch.full((1, 5), 50256)], dim=1)
    with torch.no_grad():
        logits, logits_padded = model(ids), model(padded)
    # mean: over the real tokens only, so padding changes nothing
    mean = ch06.select_logits(logits, ids, "mean")
    assert torch.allclose(ch06.select_logits(logits_padded, padded, "mean"), mean, atol=1e-6)
    assert torch.allclose(mean, logits[0].mean(dim=0, keepdim=True), atol=1e-6)
    assert not torch.allclose(logits_padded[0].mean(dim=0), mean[0], atol=1e-3)  # padding counted
    assert torch.equal(ch06.select_logits(logits_padded, padded, "first"), logits_padded[:, 0])
    assert torch.equal(ch06.select_logits(logits_padded, padded, "last"), logits_padded[:, -1])
    batch = torch.cat([padded, torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18, 19]])])
    with torch.no_grad():  # each text of a batch pools its own real tokens
        pooled = ch06.select_logits(model(batch), batch, "mean")
    assert torch.allclose(pooled[0], mean[0], atol=1e-6)


def test_own_data_is_split_within_each_class_unless_told_otherwise(tmp_path):
    rows = [(f"text {i}", "common") for i in range(60)] + [(f"rare {i}", "rare") for i in range(10)]
    data = write_table(tmp_path / "d.csv", [(t, c) for t, c in rows])
    count = lambda part: sum(r[0] == "rare" for r in part)  # noqa: E731
    parts, _ = ch06.own_data(vars(own_data_args(tmp_path, "--data", str(data))))
    assert [len(p) for p in parts] == [49, 7, 14] and [count(p) for p in parts] == [7, 1, 2]
    assert len({r[1] for p in parts for r in p}) == 70  # each row once
    assert [r[0] for r in parts[0][:12]] != sorted(r[0] for r in parts[0][:12])  # mixed
    plain, _ = ch06.own_data(vars(own_data_args(tmp_path, "--data", str(data), "--no-stratify")))
    as_read = ch06.read_labeled_file(data)
    assert plain == ch06.random_split(as_read, 0.7, 0.1)  # the book's split of the spam data


def test_a_plot_of_one_evaluation_shows_its_point_from_the_runs_start(monkeypatch):
    drawn = []
    monkeypatch.setattr(ch06, "save_figure", lambda fig, path: drawn.append(fig))
    ch06.plot_values(torch.tensor([0.125]), torch.tensor([640]), [0.69314], [0.69316],
                     "DPO loss", "x.png")
    ax1, ax2 = drawn[0].axes
    assert [line.get_marker() for line in ax1.lines] == ["o", "o"]  # a point, not nothing
    assert ax1.get_xlim()[0] == 0 == ax2.get_xlim()[0] and ax1.get_xlim()[1] > 0.125
    drawn[0].canvas.draw()
    assert ax1.yaxis.get_major_formatter().get_offset() == ""  # the values, not 1e-6+6.93e-1


def test_own_files_labels_and_class_order(tmp_path):
    jsonl = tmp_path / "intents.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"utterance": "play a song", "intent": 10}, {"utterance": "stop", "intent": 9},
        {"utterance": "weather?", "intent": 10}]) + "\n\n", encoding="utf-8")
    rows = ch06.read_labeled_file(jsonl, "utterance", "intent")
    assert [r[:2] for r in rows] == [("10", "play a song"), ("9", "stop"), ("10", "weather?")]
    assert rows[1][2] == f"{jsonl}, line 2"
    assert ch06.class_names(r[0] for r in rows) == ["9", "10"]  # numbers by value
    assert ch06.class_names(["spam", "ham", "Ham"]) == ["Ham", "ham", "spam"]
    # a tab-separated file is never quoted: a text that starts with a quote is that text
    texts = ['"Free" entry, reply now', 'ok "see" you', '"', "plain"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{c}\n" for t, c in zip(texts, "abab")),
                   encoding="utf-8")
    assert [r[:2] for r in ch06.read_labeled_file(tsv)] == list(zip("abab", texts))
    # CSV: a quote left open is named where its row starts, before it swallows the rest
    csv_file = tmp_path / "open.csv"
    csv_file.write_text('text,label\nhello,a\n"Free entry, reply,b\nok,a\nbye,b\n',
                        encoding="utf-8")
    with pytest.raises(ValueError, match=r"open\.csv, line 3: a quoted field does not end where "
                                         r"it should .* quoted whole, its inner quotes doubled"):
        ch06.read_labeled_file(csv_file)
    csv_file.write_text('text,label\n"Free" entry,b\nok,a\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"open\.csv, line 2: a quoted field does not end"):
        ch06.read_labeled_file(csv_file)
    csv_file.write_text('text,label\n"two\nlines, one text",a\n"""Hi"" she said",b\n',
                        encoding="utf-8")
    with pytest.warns(UserWarning, match=r"open\.csv: texts that span several lines: 1, the "
                                         r"first from line 2 to 3"):
        assert [r[:2] for r in ch06.read_labeled_file(csv_file)] == [
            ("a", "two\nlines, one text"), ("b", '"Hi" she said')]
    # Excel's "CSV UTF-8" starts with a byte-order mark, which is no part of a column's name
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufefftext,label\r\ncafé,a\r\n".encode("utf-8"))
    assert [r[:2] for r in ch06.read_labeled_file(bom)] == [("a", "café")]
    # a column named twice is refused, not read from the last of them
    twice = write_table(tmp_path / "twice.csv", [("good", "a", "wrong")],
                        header=("text", "label", "text"))
    with pytest.raises(ValueError, match=r"twice\.csv has 2 columns named 'text' \(its columns: "
                                         r"'text', 'label', 'text'\): rename all but one"):
        ch06.read_labeled_file(twice)
    # balancing any number of classes: each cut to the rarest one's count
    rows = [("a", str(i)) for i in range(9)] + [("b", "x"), ("b", "y")] + \
        [("c", str(i)) for i in range(4)]
    balanced = ch06.create_balanced_dataset(rows)
    assert [r[0] for r in balanced] == ["a", "a", "b", "b", "c", "c"]
    assert set(balanced) <= set(rows)


def bad_own_data(tmp_path, case):
    rows = topic_rows(40)
    files = {  # each written only for its case
        "missing column": lambda: write_table(tmp_path / "d.csv", rows, header=("body", "label")),
        "empty text": lambda: write_table(tmp_path / "d.csv",
                                          rows[:7] + [("  ", "food")] + rows[8:]),
        "one class": lambda: write_table(tmp_path / "d.csv", [(t, "food") for t, _ in rows]),
        "too small": lambda: write_table(tmp_path / "d.csv", rows[:10]),
        "not UTF-8": lambda: tmp_path / "d.csv",
        "JSONL key": lambda: tmp_path / "d.jsonl",
        "other format": lambda: tmp_path / "d.xlsx",
    }
    files = {case: files[case]()} if case in files else {}
    if case == "not UTF-8":
        files[case].write_bytes("text,label\ncafé au lait,food\n".encode("latin-1"))
    if case == "JSONL key":
        files[case].write_text('{"text": "hi", "label": "a"}\n{"text": "ho"}\n', encoding="utf-8")
    if case == "other format":
        files[case].write_bytes(b"PK\x03\x04")
    messages = {
        "missing column": r"d\.csv has no column 'text' \(its columns: 'body', 'label'\); name "
                          r"yours with --text-column\.",
        "empty text": r"d\.csv, line 9: the text is empty",
        "one class": r"The training split holds 1 class \(food\); a classifier needs at least 2",
        "too small": r"The training split has 7 texts, fewer than one batch of 8: give more "
                     r"data, or a smaller --batch-size",
        "not UTF-8": r"d\.csv, line 2, is not UTF-8 text",
        "JSONL key": r"d\.jsonl, line 2 has no key 'label' \(its keys: 'text'\); name yours "
                     r"with --label-column",
        "other format": r"d\.xlsx: give a \.csv, \.tsv or \.jsonl file",
        "label only in test": r"test\.csv, line 2: the label 'music' \(test split\) is not one "
                              r"of the training split's classes \(food, sports, tech\)",
        "half of three files": r"--train, --val and --test go together",
    }
    if case == "label only in test":
        flags = ["--train", str(write_table(tmp_path / "train.csv", rows)),
                 "--val", str(write_table(tmp_path / "val.csv", rows[:5])),
                 "--test", str(write_table(tmp_path / "test.csv", [("drums", "music")]))]
    elif case == "half of three files":
        flags = ["--train", str(write_table(tmp_path / "train.csv", rows))]
    else:
        flags = ["--data", str(files[case])]
    return flags, messages[case]


@pytest.mark.parametrize("case", ["missing column", "empty text", "one class", "too small",
                                  "not UTF-8", "JSONL key", "other format", "label only in test",
                                  "half of three files"])
def test_bad_own_data_gets_one_line_and_writes_nothing(case, tmp_path):
    flags, message = bad_own_data(tmp_path, case)
    with pytest.raises(ValueError, match=message) as err:
        ch06.main(own_data_args(tmp_path, *flags))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written: not even the folder


# ======= Chapter 7: the book's listings =======


class StubOllama(LocalServer):
    """A server on 127.0.0.1 that speaks Ollama's streamed chat API (style
    "ollama") or OpenAI's chat completions (style "openai", at /v1): the answer
    to each prompt is answer(prompt), sent as newline-delimited JSON chunks or as
    one completion. An answer in bytes is sent as it is (not JSON); a (status,
    text) pair as that HTTP error; {"status": S, "retry_after": T} as status S
    with Retry-After T; "DROP" closes the connection unanswered; "HTML" is a web
    page with status 200; None answers after 2 s. Each request's body and
    Authorization header are kept, and the most requests in flight at once."""

    def __init__(self, answer, style="ollama"):
        self.prompts, self.bodies, self.keys = [], [], []
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if style == "ollama" else 404)
                self.end_headers()
                self.wfile.write(b"Ollama is running" if style == "ollama" else b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.bodies.append(body)
                    stub.keys.append(self.headers.get("Authorization"))
                    stub.prompts.append(body["messages"][-1]["content"])
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                try:
                    self.reply(body, answer(body["messages"][-1]["content"]))
                finally:
                    with lock:
                        stub.in_flight -= 1

            def reply(self, body, text):
                if text is None:
                    time.sleep(2)
                    text = "50"
                if isinstance(text, tuple):
                    self.send_error(*text)
                    return
                if isinstance(text, dict):
                    self.send_response(text["status"])
                    self.send_header("Retry-After", str(text["retry_after"]))
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "slow down"}}')
                    return
                if text == "DROP":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(200)
                kind = {"HTML": "text/html", "openai": "application/json"}.get(
                    text if text == "HTML" else style, "application/x-ndjson")
                self.send_header("Content-Type", kind)
                self.end_headers()
                if text == "HTML" or isinstance(text, bytes):
                    self.wfile.write(b"<html>Welcome</html>" if text == "HTML" else text)
                elif style == "openai":
                    self.wfile.write(json.dumps({
                        "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": text}}]}).encode())
                else:
                    for i in range(0, len(text), 2):  # two characters a chunk
                        chunk = {"model": body["model"], "done": False,
                                 "message": {"role": "assistant", "content": text[i:i + 2]}}
                        self.wfile.write((json.dumps(chunk) + "\n").encode())
                    self.wfile.write((json.dumps({"model": body["model"], "done": True,
                                                  "message": {"role": "assistant",
                                                              "content": ""}}) + "\n").encode())

        super().__init__(Handler)
        self.url += "/api/chat" if style == "ollama" else "/v1"


class StubOpenAI(StubOllama):
    def __init__(self, answer):
        super().__init__(answer, style="openai")


@pytest.fixture(scope="session")
def instruction_data():
    path = SHARED / "data" / "instruction-data.json"
    return ch07.download_and_load_file(path, ch07.DATA_URL)


def test_format_input_with_and_without_input(instruction_data):
    assert len(instruction_data) == 1100
    entry = {"instruction": "Identify the correct spelling.", "input": "Ocassion", "output": "Occasion"}
    assert ch07.format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nIdentify the correct spelling."
        "\n\n### Input:\nOcassion")
    assert ch07.format_input({**entry, "input": ""}).endswith("### Instruction:\nIdentify the correct spelling.")
    assert [len(d) for d in ch07.split_data(instruction_data)] == [935, 110, 55]


def test_custom_collate_fn_is_the_books():
    batch = ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])
    inputs, targets = ch07.custom_collate_fn(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256],
                               [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100],
                                [8, 9, 50256, -100, -100]]
    inputs, targets = ch07.custom_collate_fn(batch, allowed_max_length=3)
    assert inputs.shape == targets.shape == (3, 3) and targets[1].tolist() == [6, 50256, -100]
    inputs, targets = ch07.custom_collate_fn(batch, device="meta")
    assert inputs.device.type == targets.device.type == "meta"


def test_ollama_client_scores_and_averages(serve, instruction_data):
    answers = iter(["85", "60", "The score is high", "100"])
    stub = serve(StubOllama, lambda prompt: next(answers))
    entries = [dict(e, model_response="A reply.") for e in instruction_data[:4]]
    scores = ch07.generate_model_scores(entries, "model_response", "llama3", stub.url)
    assert scores == [85, 60, 100]
    assert "score the model response `A reply.`" in stub.prompts[0]
    assert stub.bodies[0]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert ch07.check_if_running(stub.url)


def judge_score(prompt):
    """One judge's answers, whichever API serves them: a number from the prompt."""
    return str(zlib.crc32(prompt.encode()) % 101)


def test_the_judge_scores_alike_through_ollama_and_openai_style_servers(serve, tmp_path,
                                                                        instruction_data):
    entries = [{**e, "model_response": f"Reply {i}."} for i, e in enumerate(instruction_data[:6])]
    ollama, openai_style = serve(StubOllama, judge_score), serve(StubOpenAI, judge_score)
    by_ollama = ch07.generate_model_scores(entries, "model_response", url=ollama.url)
    client = ch07.ModelClient(openai_style.url, "gpt-judge", api_key="sk-test-123")
    assert (client.style, client.url) == ("openai", openai_style.url + "/chat/completions")
    by_openai = ch07.generate_model_scores(entries, "model_response", client=client)
    assert by_openai == by_ollama and len(by_ollama) == 6 and ollama.prompts == openai_style.prompts
    assert openai_style.keys == ["Bearer sk-test-123"] * 6 and ollama.keys == [None] * 6
    assert openai_style.bodies[0] == {"model": "gpt-judge", "stream": False, "seed": 123,
                                      "temperature": 0, "messages": [
                                          {"role": "user", "content": openai_style.prompts[0]}]}
    # the stub is OpenAI's shape: the official client reads the same answer from it
    official = optional("openai", "the judge is checked against OpenAI's own client")
    completion = official.OpenAI(base_url=openai_style.url, api_key="x").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Score this."}])
    assert completion.choices[0].message.content == judge_score("Score this.")
    assert ch07.ModelClient("http://h/api/chat", "m", api_style="openai").url == \
        "http://h/api/chat"  # --api-style wins over the URL's look
    # a judge that answers a web page is one line naming the URL
    with pytest.raises(ch07.JudgeUnavailable, match=r"^The server at .*/api/chat answered a web "
                                                    r"page, not the ollama chat API"):
        ch07.query_model("hi", url=serve(StubOllama, lambda prompt: "HTML").url)
    # this project's own server judges too (a random tiny model: its answers are no scores)
    with chat_server(tmp_path) as (url, served):
        own = ch07.ModelClient(url + "/v1", served.name, options={"temperature": 0})
        answer = own.ask("Name a color.")
        direct = official.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
            model=served.name, temperature=0, messages=[{"role": "user",
                                                          "content": "Name a color."}])
        assert answer == direct.choices[0].message.content and own.requests == 1


def test_the_judge_is_asked_again_after_429_5xx_drops_and_timeouts(serve, instruction_data,
                                                                   tmp_path, capsys):
    replies = iter([{"status": 429, "retry_after": 0}, (500, "oops"), "DROP", None, "77"])
    stub = serve(StubOpenAI, lambda prompt: next(replies))
    client = ch07.ModelClient(stub.url, "m", timeout=1, backoff=0.01)
    start = time.monotonic()
    assert client.ask("Score it.") == "77" and client.requests == len(stub.prompts) == 5
    assert time.monotonic() - start < 8  # Retry-After 0 is honoured, the backoff is small
    # a Retry-After of 1 s is waited for
    replies = iter([{"status": 503, "retry_after": 1}, "60"])
    stub = serve(StubOllama, lambda prompt: next(replies))
    start = time.monotonic()
    assert ch07.ModelClient(stub.url, "m", backoff=0).ask("x") == "60"
    assert time.monotonic() - start >= 1
    # a judge that keeps failing: one line, with the tries
    stub = serve(StubOllama, lambda prompt: (500, "down"))
    with pytest.raises(ch07.JudgeUnavailable, match=r"^The server at .* answered 500: .*down.*"
                                                    r"\(3 tries\)$"):
        ch07.ModelClient(stub.url, "m", retries=2, backoff=0).ask("x")
    # 4 workers give the scores of 1, with requests in flight at once
    entries = [{**e, "model_response": f"Reply {i}."} for i, e in enumerate(instruction_data[:12])]
    one = ch07.generate_model_scores(entries, "model_response",
                                     url=serve(StubOllama, judge_score).url)
    slow = serve(StubOllama, lambda prompt: time.sleep(0.3) or judge_score(prompt))
    assert ch07.generate_model_scores(entries, "model_response", url=slow.url, workers=4) == one
    assert slow.most_in_flight == 4
    # a run stopped by a failing judge resumes from its cache: nothing is asked twice
    cache = tmp_path / "judge-cache.jsonl"
    asked = iter(judge_score(f"{i}") for i in range(7))
    flaky = serve(StubOllama, lambda prompt: next(asked, (404, "gone")))
    with pytest.raises(ch07.JudgeUnavailable, match=r"answered 404"):
        ch07.generate_model_scores(entries, "model_response", client=ch07.ModelClient(
            flaky.url, "m", cache_path=cache))
    assert len(cache.read_text().splitlines()) == 7
    with open(cache, "a") as f:
        f.write('{"key": "cut sho')  # a kill in mid-line
    judge = serve(StubOllama, judge_score)
    client = ch07.ModelClient(judge.url, "m", cache_path=cache)
    scores = ch07.generate_model_scores(entries, "model_response", client=client)
    assert client.requests == len(judge.prompts) == 12 - 7 and len(scores) == 12
    assert ch07.generate_model_scores(entries, "model_response", client=client) == scores
    assert client.requests == 5  # all cached now
    # through the command: the key is sent, never shown or saved
    responses = [{**e, "model_response": "A reply."} for e in instruction_data[:3]]
    ch02.write_text_atomic(tmp_path / "instruction-data-with-response.json", json.dumps(responses))
    keyed = serve(StubOpenAI, judge_score)
    result = ch07.main(args_of(ch07, ["--evaluate", "--out", str(tmp_path), "--judge-url",
                                      keyed.url, "--judge-model", "gpt-judge", "--api-key",
                                      "sk-SECRET-42", "--workers", "2"]))
    assert len(result["scores"]) == 3 and keyed.keys == ["Bearer sk-SECRET-42"] * 3
    with unittest.mock.patch.dict(os.environ, {"OPENAI_API_KEY": "sk-SECRET-42"}):
        refused = serve(StubOpenAI, lambda prompt: (401, "invalid key"))
        with pytest.raises(ch07.JudgeUnavailable, match=r"answered 401: .*Is the API key right "
                                                        r"\(--api-key, or \$OPENAI_API_KEY\)\?"):
            ch07.main(args_of(ch07, ["--evaluate", "--out", str(tmp_path), "--overwrite",
                                     "--judge-url", refused.url]))
    assert refused.keys == ["Bearer sk-SECRET-42"]
    out = capsys.readouterr()
    assert "sk-SECRET" not in out.out + out.err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"sk-SECRET" in p.read_bytes()]


def test_two_judges_are_compared_as_scipy_correlates_them(tmp_path, capsys):
    stats = optional("scipy.stats", "the rank correlations are checked against SciPy's")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 101, 60)
    b = np.clip(a + rng.integers(-30, 31, 60), 0, 100)
    b[[3, 9]] = [0, 100]  # wide gaps, and ties from the clipping and the small range
    a[[3, 9]] = [90, 20]
    files = []
    for name, scores in (("llama3", a), ("gpt-4o", b)):
        by_entry = {str(i): int(v) for i, v in enumerate(scores)}
        by_entry["5"] = None if name == "llama3" else by_entry["5"]  # not a number: left out
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"model": name, "responses": "f1", "scores": by_entry}))
    result = ch07.main(args_of(ch07, ["--compare-judges", *map(str, files)]))
    kept = [i for i in range(60) if i != 5]
    assert result["entries"] == 59
    assert result["spearman"] == pytest.approx(stats.spearmanr(a[kept], b[kept])[0], abs=1e-12)
    assert result["kendall"] == pytest.approx(stats.kendalltau(a[kept], b[kept])[0], abs=1e-12)
    assert result["mean_a"] == pytest.approx(a[kept].mean())
    assert [i for i, _, _ in result["apart"]] == [i for i in kept if abs(a[i] - b[i]) >= 50]
    assert (3, 90, 0) in result["apart"] and (9, 20, 100) in result["apart"]
    out = capsys.readouterr().out
    assert "Entries scored by both: 59; Spearman's rho" in out and "entry 3: 90 vs 0" in out
    other = json.loads(files[1].read_text())
    files[1].write_text(json.dumps({**other, "responses": "f2"}))
    with pytest.raises(ValueError, match=r"score different responses"):
        ch07.main(args_of(ch07, ["--compare-judges", *map(str, files)]))
    files[1].write_text("[1, 2")
    with pytest.raises(ValueError, match=r"gpt-4o\.json is not valid JSON"):
        ch07.main(args_of(ch07, ["--compare-judges", *map(str, files)]))


def test_unreachable_judge_gives_a_clear_error():
    url = "http://127.0.0.1:9/api/chat"  # the discard port: nothing listens
    with pytest.raises(ch07.JudgeUnavailable, match=r"No Ollama server answered at http://127.0.0.1:9/api/chat"):
        ch07.query_model("hi", url=url)
    assert not ch07.check_if_running(url)


# ---- Chapter 7, beyond the book: masking, prompts, kept scores, chat, command ----


def test_masking_instructions_masks_exactly_the_prompt(instruction_data, tokenizer):
    entries = instruction_data[:4]
    plain = ch07.InstructionDataset(entries, tokenizer)
    masked = ch07.InstructionDataset(entries, tokenizer, mask_instructions=True)
    _, t_plain = ch07.custom_collate_fn([plain[i] for i in range(4)])
    _, t_masked = ch07.custom_collate_fn([masked[i] for i in range(4)])
    for i, entry in enumerate(entries):
        prompt_len = len(tokenizer.encode(ch07.format_input(entry)))
        assert masked[i][1] == prompt_len
        # targets[j] predicts token j+1: the prompt's tokens 1..P-1 sit at 0..P-2
        assert (t_masked[i, :prompt_len - 1] == -100).all()
        assert torch.equal(t_masked[i, prompt_len - 1:], t_plain[i, prompt_len - 1:])
        assert t_masked[i, prompt_len - 1] != -100  # the first response token is learned


def test_loss_ignores_masked_targets():
    model = tiny_model(0, vocab_size=SMALL_VOCAB).eval()
    inputs = torch.randint(0, SMALL_VOCAB, (2, 6))
    targets = torch.randint(0, SMALL_VOCAB, (2, 6))
    masked = targets.clone()
    masked[:, :3] = -100
    with torch.no_grad():
        logits = model(inputs)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].flatten(0, 1), targets[:, 3:].flatten())
    with torch.no_grad():
        assert torch.isclose(ch05.calc_loss_batch(inputs, masked, model, "cpu"), expected)


def test_entry_without_output_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match=r"Entry 1 of .*data.json has no output text"):
        ch07.download_and_load_file(path, "http://127.0.0.1:9/unused")


def test_long_prompt_is_left_truncated_with_a_warning(tokenizer):
    with pytest.warns(UserWarning, match="only its last 31 are used"):
        idx = ch07.encode_prompt("one two three " * 20, tokenizer, context_size=32)
    assert idx.tolist()[0] == tokenizer.encode("one two three " * 20)[-31:]
    assert ch07.answer_room(idx, 32, max_new_tokens=10) == 1


def test_a_long_answer_keeps_the_whole_prompt_and_stops_at_the_context(tokenizer, monkeypatch,
                                                                       recwarn):
    """--max-new-tokens at or above the context: the question is kept, and the
    answer ends where the context does."""
    model, calls = tiny_model(0).eval(), []
    real_generate = ch07.generate

    def recording_generate(model, idx, max_new_tokens, context_size, **kwargs):
        out = real_generate(model, idx, max_new_tokens, context_size, **kwargs)
        calls.append((idx[0].tolist(), max_new_tokens, out.shape[1]))
        return out
    monkeypatch.setattr(ch07, "generate", recording_generate)
    entry = {"instruction": "Name a color.", "input": ""}
    for max_new in (32, 500):  # TINY's context is 32
        ch07.generate_response(model, entry, tokenizer, "cpu", 32, max_new_tokens=max_new)
    prompt = tokenizer.encode(ch07.format_input(entry))
    assert [c[0] for c in calls] == [prompt, prompt]  # the whole question, both times
    assert [c[1] for c in calls] == [32 - len(prompt)] * 2
    assert all(length <= 32 for _, _, length in calls)
    assert not [w for w in recwarn if "prompt" in str(w.message)]


def test_judge_failures_keep_the_scores_obtained(serve, instruction_data, tmp_path):
    entries = [{**e, "model_response": "A response."} for e in instruction_data[:5]]
    answers = iter(["80", "70", "60", b"<html>Bad gateway</html>\n", "50"])
    stub = serve(StubOllama, lambda prompt: next(answers))
    scores_path = tmp_path / "scores.json"
    scores = ch07.generate_model_scores(entries, "model_response", url=stub.url,
                                        scores_path=scores_path)
    assert scores == [80, 70, 60, 50]  # the entry whose reply was not JSON is left out
    saved = json.loads(scores_path.read_text(encoding="utf-8"))["scores"]
    assert saved == {"0": 80, "1": 70, "2": 60, "3": None, "4": 50}
    # a judge that accepts the connection but does not answer in time on entry 2
    answers = iter(["80", "70"])
    stub = serve(StubOllama, lambda prompt: next(answers, None))
    with pytest.raises(ch07.JudgeUnavailable, match=r"answered the check, but gave no answer "
                                                    r"within 1 s\. That was entry 2; the 2 "
                                                    r"scores obtained are kept; they are saved"):
        ch07.generate_model_scores(entries, "model_response", scores_path=tmp_path / "new.json",
                                   client=ch07.ModelClient(stub.url, "llama3", timeout=1,
                                                           retries=0))
    saved = json.loads((tmp_path / "new.json").read_text(encoding="utf-8"))
    assert saved["scores"] == {"0": 80, "1": 70} and saved["model"] == "llama3"
    # too little data for the three splits
    (tmp_path / "few.json").write_text(json.dumps(instruction_data[:5]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"few\.json has 5 entries: too few .* at least 20"):
        ch07.main(args_of(ch07, 
            ["--data", str(tmp_path / "few.json"), "--model-size", "tiny", "--no-pretrained",
             "--out", str(tmp_path / "out"), "--device", "cpu"]))


def test_evaluate_goes_on_from_the_saved_scores_and_never_wipes_them(tmp_path, serve,
                                                                   instruction_data, capsys):
    responses = [{**e, "model_response": f"Response {i}."}
                 for i, e in enumerate(instruction_data[:6])]
    ch02.write_text_atomic(tmp_path / "instruction-data-with-response.json", json.dumps(responses))
    scores_path = tmp_path / "scores.json"
    evaluate = lambda url, *extra: ch07.main(args_of(ch07,   # noqa: E731
        ["--evaluate", "--out", str(tmp_path), "--ollama-url", url, "--retries", "0", *extra]))
    answers = iter(["80", "80", "80", (503, "busy")])  # an HTML error page: one line all the same
    busy = serve(StubOllama, lambda prompt: next(answers))
    with pytest.raises(ch07.JudgeUnavailable, match=r"^[^\n]*answered 503: .*Error code: 503.* That was entry 3; the 3 "
                                                    r"scores obtained are kept; they are saved"):
        evaluate(busy.url)
    kept = scores_path.read_bytes()
    # a judge that fails at its first entry (a model not pulled) keeps every score
    missing = serve(StubOllama, lambda prompt: (404, "model 'llama3' not found"))
    with pytest.raises(ch07.JudgeUnavailable, match=r"answered 404.*the 3 scores obtained are "
                                                    r"kept"):
        evaluate(missing.url)
    assert scores_path.read_bytes() == kept
    # another judge (a typo) is refused before it replaces anything
    with pytest.raises(ValueError, match=r"scores\.json holds scores by the judge 'llama3', not "
                                         r"'llama33': give --judge-model llama3 to go on with "
                                         r"them, or --overwrite"):
        evaluate(missing.url, "--judge-model", "llama33")
    assert scores_path.read_bytes() == kept
    # the judge is back: only the entries not yet scored are asked
    judge = serve(StubOllama, lambda prompt: "50")
    result = evaluate(judge.url)
    assert len(judge.prompts) == 3 and all("Response 3." in judge.prompts[0] for _ in "x")
    assert result["scores"] == [80, 80, 80, 50, 50, 50] and result["average"] == 65
    assert "3 entries were scored by an earlier run" in capsys.readouterr().out
    assert evaluate(judge.url)["average"] == 65 and len(judge.prompts) == 3  # nothing left to ask
    # scores of other responses are refused; --overwrite scores anew
    responses[0]["model_response"] = "Edited."
    ch02.write_text_atomic(tmp_path / "instruction-data-with-response.json", json.dumps(responses))
    with pytest.raises(ValueError, match=r"holds scores of other responses .* --overwrite"):
        evaluate(judge.url)
    assert evaluate(judge.url, "--overwrite")["scores"] == [50] * 6
    # a damaged responses file is named, with where it breaks
    (tmp_path / "instruction-data-with-response.json").write_text('[{"instruction": "x",\n "o',
                                                                 encoding="utf-8")
    with pytest.raises(ValueError, match=r"instruction-data-with-response\.json is not valid JSON "
                                         r"\(line 2, column 2: Unterminated string.*\)\. It is "
                                         r"written by a finetuning run"):
        evaluate(judge.url)


# ---- Chapter 7's dataset tools (ch07_data.py) ----

BONUS_EXAMPLE = [  # find-near-duplicates.py's example entries
    {"instruction": "What is the capital of Italy?", "input": "",
     "output": "The capital of Italy is Rome."},
    {"instruction": "What's the capital city of Italy?", "input": "",
     "output": "The capital city is Rome."},
    {"instruction": "Identify the main verb in the sentence: 'The cat sleeps on the couch.'",
     "input": "", "output": "The verb is 'sleeps'."},
    {"instruction": "Identify the verb in the following sentence: The cat sleeps on the couch.",
     "input": "", "output": "The verb in the sentence is \"sleeps.\""}]


def bonus_pairs(entries, field, threshold=0.75):
    """The bonus's computation, the whole matrix at once with scikit-learn's
    cosine_similarity, its positions mapped back to the entries."""
    text = optional("sklearn.feature_extraction.text", "the bonus's TF-IDF is the reference")
    pairwise = optional("sklearn.metrics.pairwise", "the bonus's cosine is the reference")
    kept = [k for k, e in enumerate(entries) if e[field]]
    if not kept:
        return []
    matrix = text.TfidfVectorizer(stop_words=None, analyzer="char", ngram_range=(1, 3)) \
        .fit_transform([re.sub(r"[^\w\s]", "", entries[k][field].lower()) for k in kept])
    sims = pairwise.cosine_similarity(matrix)
    return [(kept[a], kept[b], sims[a, b]) for a in range(len(kept))
            for b in range(a + 1, len(kept)) if sims[a, b] > threshold
            and len(entries[kept[a]][field]) > 1 and len(entries[kept[b]][field]) > 1]


def same_pairs(found, expected):
    assert [(i, j) for i, j, _ in found] == [(i, j) for i, j, _ in expected]
    assert all(abs(s - t) < 1e-6 for (_, _, s), (_, _, t) in zip(found, expected))


def test_near_duplicates_equal_the_bonus_computation(tmp_path, instruction_data, capsys):
    for field in ch07d.FIELDS:
        same_pairs(ch07d.find_near_duplicates(BONUS_EXAMPLE, field=field),
                   bonus_pairs(BONUS_EXAMPLE, field))
    # the chapter's file: most inputs are empty, and the pairs index the file all the same
    entries = instruction_data[:400]
    for field, threshold in (("instruction", 0.75), ("input", 0.5), ("output", 0.6)):
        found = ch07d.find_near_duplicates(entries, threshold, field)
        same_pairs(found, bonus_pairs(entries, field, threshold))
        assert found and all(entries[i][field] and entries[j][field] for i, j, _ in found)
    # small blocks, and every n-gram sparse or every one dense: the same pairs
    rows = ch07d.tfidf_rows([ch07d.preprocess_text(e["output"]) for e in entries])
    reference = ch07d.similar_pairs(rows, 0.6)
    for options in ({"block_cells": 1000}, {"dense_features": 0}, {"dense_features": 10 ** 6}):
        same_pairs(ch07d.similar_pairs(rows, 0.6, **options), reference)
    # the command: the pairs as JSON, and the bonus's filtered list
    path = tmp_path / "data.json"
    path.write_text(json.dumps(BONUS_EXAMPLE + BONUS_EXAMPLE[:1]), encoding="utf-8")
    result = ch07d.main(ch07d.parse_args(["--find-duplicates", str(path), "--json",
                                          str(tmp_path / "pairs.json"), "--remove-duplicates",
                                          str(tmp_path / "clean.json")]))
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert {(p["field"], p["i"], p["j"]) for p in pairs} >= {("instruction", 0, 4),
                                                             ("output", 0, 1)}
    bonus = list(BONUS_EXAMPLE + BONUS_EXAMPLE[:1])  # its loop: field by field, on what is left
    for field in ch07d.FIELDS:
        gone = {j for _, j, _ in bonus_pairs(bonus, field)} if field != "instruction" else set()
        bonus = [e for k, e in enumerate(bonus) if k not in gone]
    assert json.loads((tmp_path / "clean.json").read_text()) == bonus == result["kept"]
    assert "entries; " in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r"--json .*pairs\.json already exists"):
        ch07d.main(ch07d.parse_args(["--find-duplicates", str(path), "--json",
                                     str(tmp_path / "pairs.json")]))
    for bad, message in [('{"instruction": "x"}', r"must hold a JSON list of entries"),
                         ('[{"instruction": "x"}]', r"Entry 0 of .* has no output text"),
                         ('[{"instr', r"is not valid JSON")]:
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            ch07d.main(ch07d.parse_args(["--find-duplicates", str(path)]))
    with pytest.raises(ValueError, match=r"^--field outputs: give fields among"):
        ch07d.main(ch07d.parse_args(["--find-duplicates", str(path), "--field", "outputs"]))


def test_near_duplicates_of_12000_entries_in_bounded_memory(tmp_path):
    """The whole matrix of 12,000 entries would hold 1.15 GB (576 MB as float32);
    block by block the process stays far below (its peak resident memory is printed)."""
    entries = bench.synthetic_entries(12000)  # random words, a near-duplicate every 100th
    (tmp_path / "big.json").write_text(json.dumps(entries), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", "import sys, ch07_data as d\ntry:\n    d.main(d.parse_args("
         "sys.argv[1:]))\nfinally:\n    print(open('/proc/self/status').read())",
         "--find-duplicates", str(tmp_path / "big.json"), "--field", "instruction", "--json",
         str(tmp_path / "pairs.json")], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", done.stdout).group(1)) / 1024
    print(f"peak resident memory for 12,000 entries: {peak_mb:.0f} MB")
    assert peak_mb < 800
    found = {(p["i"], p["j"]) for p in json.loads((tmp_path / "pairs.json").read_text())}
    assert {(k, k + 1) for k in range(0, 12000, 100)} <= found


def fake_generator(duplicate_every=4):
    """A model's answers for ch07_data.py: to Llama 3's user header, an instruction
    of random words (every duplicate_every-th repeats the one before, and one is a
    stray header); to a question, its answer; to a rewrite, a marked text."""
    words = ["".join(random.Random(k).choices("abcdefghijklmnopqrstuvwxyz", k=6))
             for k in range(400)]
    said, lock = [], threading.Lock()

    def answer(prompt):
        with lock:
            if prompt == ch07d.LLAMA3_USER_HEADER:
                n = len(said)
                said.append(" ".join(random.Random(n).sample(words, 6)) + "?")
                if n == 2:
                    return "<|start_header_id|>assistant"
                return "\n" + said[-2 if n and n % duplicate_every == 0 else -1] + "\nMore."
        if "slightly rewrite the output to be more polite" in prompt:
            return "Kindly: " + prompt.split("correct output `")[1].split("`")[0]
        if "more impolite" in prompt:
            return "Whatever: " + prompt.split("correct output `")[1].split("`")[0]
        if prompt.startswith("Rewrite the following text in the passive voice"):
            return "Passively, " + prompt.split("\n\n", 1)[1]
        if "IMPROVED:" in prompt:
            return "" if "Reply 1." in prompt else "Too short.\nIMPROVED:\nA better reply."
        if prompt.startswith("Shout:"):
            return prompt.upper()
        return "The answer to " + prompt
    return answer


def test_new_entries_rewrites_and_preferences_from_a_model(tmp_path, serve, capsys):
    generator = serve(StubOllama, fake_generator())
    out = tmp_path / "new.json"
    run = lambda *argv: ch07d.main(ch07d.parse_args([*argv, "--generator-url",  # noqa: E731
                                                     generator.url]))
    made = run("--generate-data", "6", "--data-out", str(out), "--workers", "2")
    entries = json.loads(out.read_text())
    assert entries == made["entries"] and len(entries) == 6
    assert all(e["output"] == "The answer to " + e["instruction"] and e["input"] == ""
               for e in entries)
    assert not ch07d.find_near_duplicates(entries) and not any("<|" in e["instruction"]
                                                               for e in entries)
    first = generator.bodies[0]
    assert first["messages"] == [{"role": "assistant", "content": ch07d.LLAMA3_USER_HEADER}]
    assert first["options"]["temperature"] == 1.0
    assert len({b["options"]["seed"] for b in generator.bodies}) > 6  # each sample its own
    # the same command again: refused, then with --overwrite every answer from the cache
    with pytest.raises(FileExistsError, match=r"--data-out .*new\.json already exists"):
        run("--generate-data", "6", "--data-out", str(out))
    asked = len(generator.prompts)
    again = run("--generate-data", "6", "--data-out", str(out), "--overwrite")
    assert again["requests"] == 0 and len(generator.prompts) == asked
    assert json.loads(out.read_text()) == entries
    # a preference file the chapter's --dpo reads: polite rewrites chosen, impolite rejected
    source = tmp_path / "source.json"
    source.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": f"{w}."}
                                  for w in ("hi", "yes", "no", "thanks", "maybe") * 4]))
    prefs = run("--make-preferences", str(source), "--data-out", str(tmp_path / "prefs.json"),
                "--workers", "3")["entries"]
    rng = random.Random(123)
    for entry in prefs:
        polite = rng.choice(["polite", "impolite"]) == "polite"
        assert (entry["chosen"], entry["rejected"]) == (
            ("Kindly: " + entry["output"], entry["output"]) if polite else
            (entry["output"], "Whatever: " + entry["output"]))
    assert len(prefs) == 20 and json.loads((tmp_path / "prefs.json").read_text()) == prefs
    common = ["--model-size", "tiny", "--out", str(tmp_path / "run"), "--device", "cpu"]
    ch07.main(args_of(ch07, [*common, "--no-pretrained", "--data",
                             str(SHARED / "data" / "instruction-data.json"), "--limit", "8",
                             "--batch-size", "4", "--epochs", "1", "--max-new-tokens", "2",
                             "--ollama-url", "http://127.0.0.1:9/api/chat"]))
    tuned = ch07.main(args_of(ch07, ["--dpo", *common, "--preference-data",
                                     str(tmp_path / "prefs.json"), "--limit", "4",
                                     "--batch-size", "4", "--max-new-tokens", "2"]))
    assert tuned["tracking"]["train_losses"] and (tmp_path / "run" / "gpt2-tiny-dpo.pth").exists()
    # rewrites: the passive voice, a reflection's improvement, a prompt of one's own
    replies = [{"instruction": "Name a color.", "input": "", "output": f"Reply {i}."}
               for i in range(3)]
    (tmp_path / "replies.json").write_text(json.dumps(replies))
    passive = run("--rewrite", str(tmp_path / "replies.json"), "--data-out",
                  str(tmp_path / "passive.json"))["entries"]
    assert [e["output"] for e in passive] == [f"Passively, Reply {i}." for i in range(3)]
    capsys.readouterr()
    reflected = run("--rewrite", str(tmp_path / "replies.json"), "--style", "reflect",
                    "--data-out", str(tmp_path / "reflect.json"))["entries"]
    assert [e["output"] for e in reflected] == ["A better reply."] * 2  # entry 1 had none
    assert "Entry 1: the answer held no rewrite" in capsys.readouterr().out
    (tmp_path / "shout.txt").write_text("Shout: {instruction} {output}", encoding="utf-8")
    shouted = run("--rewrite", str(tmp_path / "replies.json"), "--style",
                  str(tmp_path / "shout.txt"), "--field", "instruction", "--data-out",
                  str(tmp_path / "shout.json"))["entries"]
    assert shouted[0]["instruction"] == "SHOUT: NAME A COLOR. REPLY 0." and \
        shouted[0]["output"] == "Reply 0."
    # bad input: one line each, nothing written
    (tmp_path / "bad.txt").write_text("Hi {name}", encoding="utf-8")
    for argv, error, message in [
            (["--rewrite", str(tmp_path / "replies.json"), "--style", str(tmp_path / "bad.txt"),
              "--data-out", str(tmp_path / "x.json")], ValueError, r"may hold \{instruction\}"),
            (["--make-preferences", str(tmp_path / "replies.json")], ValueError,
             r"write to --data-out FILE: give one"),
            (["--make-preferences", str(tmp_path / "new.json"), "--generate-data", "2"],
             ValueError, r"are different tasks: give one"),
            (["--rewrite", str(tmp_path / "shout.txt"), "--data-out", str(tmp_path / "x.json")],
             ValueError, r"shout\.txt is not valid JSON")]:
        with pytest.raises(error, match=message):
            run(*argv)
    assert not (tmp_path / "x.json").exists()
    page = serve(StubOllama, lambda prompt: "HTML")  # (a new folder: no cached answers)
    with pytest.raises(ch07.JudgeUnavailable, match=r"answered a web page.*The entries "
                                                    r"finished so far are in .*x\.json"):
        ch07d.main(ch07d.parse_args(["--make-preferences", str(source), "--data-out",
                                     str(tmp_path / "new" / "x.json"), "--generator-url",
                                     page.url]))


def test_a_killed_run_resumes_from_its_cached_answers(tmp_path, serve):
    """ch07_data.py killed (SIGKILL: no goodbye) while the model answers: the
    answers it had are in the cache, and the rerun asks only for the others."""
    slow = serve(StubOllama, lambda prompt: time.sleep(0.1) or "Kindly: yes.")
    source = tmp_path / "source.json"
    source.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."}
                                  for i in range(12)]))
    argv = [sys.executable, "ch07_data.py", "--make-preferences", str(source), "--data-out",
            str(tmp_path / "prefs.json"), "--generator-url", slow.url]
    killed = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    cache = tmp_path / "generator-cache.jsonl"
    deadline = time.time() + 60
    while not cache.exists() or len(cache.read_text().splitlines()) < 4:
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.02)
    killed.kill()
    killed.wait(timeout=30)
    cached = len(cache.read_text().splitlines())
    assert 4 <= cached < 12
    asked = len(slow.prompts)
    ch07d.main(ch07d.parse_args([*argv[2:], "--overwrite"]))  # the same command again
    assert len(slow.prompts) - asked == 12 - cached  # nothing asked twice
    assert len(json.loads((tmp_path / "prefs.json").read_text())) == 12


def readme_tour():
    """The commands of README.md's one-minute path, in its order, as argument lists."""
    text = (HERE / "README.md").read_text(encoding="utf-8")
    block = text.split("## Your own model, from pretraining to chat")[1]
    block = block.split("```bash")[1].split("```")[0]
    return [shlex.split(line.split("  #")[0]) for line in block.strip().splitlines()]


def test_the_readmes_path_from_pretraining_to_chat_runs_in_its_order(tmp_path, spam_tsv,
                                                                     monkeypatch, capsys):
    """Each command as README.md gives it, run in order in a fresh folder through
    the command's entry point. Offline, the data come from ../shared (added flags),
    and smaller sizes keep the test short; the README's timings are measured by hand."""
    rows = ch06.read_spam_data(spam_tsv)
    few = [r for r in rows if r[0] == "spam"][:40] + [r for r in rows if r[0] == "ham"][:40]
    small_zip = spam_zip(tmp_path / "few.zip", {"SMSSpamCollection": "".join(
        f"{label}\t{text}\n" for label, text in few if '"' not in text)})
    offline = {"ch05_train.py": ["--data", str(SHARED / "data" / "the-verdict.txt"),
                                 "--max-steps", "6"],
               "ch06_classify.py": ["--data", str(small_zip), "--data-dir", "data/spam"],
               "ch07_instruct.py": ["--data", str(SHARED / "data" / "instruction-data.json"),
                                    "--limit", "8", "--ollama-url", "http://127.0.0.1:9/api/chat"]}
    chapters = {"ch05_train.py": ch05, "ch05_generate.py": gen, "ch06_classify.py": ch06,
                "ch07_instruct.py": ch07}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\n\n"))
    results = []
    for command in readme_tour():
        assert command[0] == "python" and command[1] in chapters, command
        uses_saved = command[1] == "ch05_generate.py" or {"--classify", "--chat"} & set(command)
        argv = command[2:] + ([] if uses_saved else offline[command[1]]) + ["--device", "cpu"]
        results.append(chapters[command[1]].main(args_of(chapters[command[1]], argv)))
    pretrained, text, classifier, classified, sft, chatted = results
    start = gen.load_checkpoint("runs/tiny/checkpoint.pt")
    assert start["kind"] == "pretraining" and start["config"]["emb_dim"] == TINY["emb_dim"]
    assert text["text"].startswith("Every effort moves you")
    model, settings = ch06.load_classifier("runs/ch06-tiny/classifier.pth")
    assert settings["init_from"] == "runs/tiny/checkpoint.pt"
    assert torch.equal(model.tok_emb.weight, start["model"]["tok_emb.weight"])  # frozen: yours
    assert len(classified["classified"]) == 1
    saved = gen.load_checkpoint("runs/ch07-tiny/checkpoint-sft.pth")
    assert saved["kind"] == "instruct" and saved["settings"]["init_from"] == "runs/tiny/checkpoint.pt"
    assert len(chatted["responses"]) == 1  # --chat found the model that run saved
    out = capsys.readouterr().out
    assert "Using runs/ch07-tiny/checkpoint-sft.pth" in out
    for data, folder in [(r"\d+ / \d+ / \d+ messages", "runs/ch06-tiny"),
                         (r"8 / \d+ / \d+ entries", "runs/ch07-tiny")]:  # each run's header
        assert re.search(rf"Model: runs/tiny/checkpoint\.pt, [\d,]+ parameters, context 256; "
                         rf"data: {data}; output: {folder}", out), folder


def test_chat_keeps_earlier_turns_forgets_them_on_reset_and_ctrl_c_stops_an_answer(
        tokenizer, monkeypatch):
    model, prompts, calls = tiny_model(0, context_length=256).eval(), [], iter(range(100))
    real_stream = ch07.stream_text

    def stream(model, idx, *args, **kwargs):
        prompts.append(tokenizer.decode(idx[0].tolist()))
        if next(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the second answer
        return real_stream(model, idx, *args, **kwargs)
    monkeypatch.setattr(ch07, "stream_text", stream)
    out = io.StringIO()
    responses = ch07.chat(model, tokenizer, "cpu", 256, max_new_tokens=4, out=out,
                          stdin=io.StringIO("Name a color.\nName a fruit.\nName a tree.\n"
                                            "/reset\nName a bird.\n\n"))
    assert len(responses) == 3 and " [stopped]" in out.getvalue()  # the chat went on
    assert prompts[0].count("### Instruction:") == 1
    assert "Name a color." in prompts[2] and responses[0] in prompts[2]  # the first turn stays
    assert "Name a fruit." not in prompts[2]  # a stopped answer is not a turn
    assert prompts[3].count("### Instruction:") == 1 and "Name a color." not in prompts[3]
    assert "(earlier turns forgotten)" in out.getvalue()
    # turns that no longer fit the context go, the oldest first
    long_turns = [(f"Question {i} " + "word " * 40, "answer " * 20) for i in range(5)]
    idx = ch07.chat_prompt(long_turns, "Last question.", tokenizer, 256, max_new_tokens=64)
    text = tokenizer.decode(idx[0].tolist())
    assert idx.shape[1] <= 256 - 64 and "Last question." in text and "Question 4" in text
    assert "Question 0" not in text


def test_chat_loop_streams_and_exits_on_empty_line(tokenizer):
    model = tiny_model(0, context_length=256).eval()
    out = io.StringIO()
    responses = ch07.chat(model, tokenizer, "cpu", 256, max_new_tokens=5,
                          stdin=io.StringIO("What is 2+2?\n\nnever read\n"), out=out)
    assert len(responses) == 1 and responses[0]
    assert out.getvalue().count(">>> ") == 2  # asked twice, stopped at the empty line
    assert ch07.chat(model, tokenizer, "cpu", 256, stdin=io.StringIO(""), out=io.StringIO()) == []
    out = io.StringIO()  # /help lists the commands; it is not an instruction for the model
    responses = ch07.chat(model, tokenizer, "cpu", 256, max_new_tokens=5,
                          stdin=io.StringIO("/help\nWhat is 2+2?\n\n"), out=out)
    assert len(responses) == 1 and ch07.CHAT_HELP in out.getvalue()
    assert "/reset" in ch07.CHAT_HELP and out.getvalue().index(ch07.CHAT_HELP) < \
        out.getvalue().rindex(">>> ")


def test_wrong_combinations_of_processes_and_modes_are_one_line_each(tmp_path, capsys):
    for chapter in (ch05, ch06, ch07):
        with pytest.raises(ValueError, match=r"^--fsdp shards the model over several "
                                             r"processes: launch them with torchrun"):
            chapter.main(args_of(chapter, ["--fsdp", "--out", str(tmp_path / "x"),
                                           "--device", "cpu"]))
    with pytest.raises(ValueError, match=r"^--chat and --serve are different tasks: give one"):
        ch07.main(args_of(ch07, ["--chat", "--serve"]))
    with pytest.raises(FileNotFoundError, match=r"^No model at .*none\.pth: finetune one first"):
        ch07.main(args_of(ch07, ["--serve", "--model-file", str(tmp_path / "none.pth"),
                                 "--device", "cpu"]))
    with pytest.raises(SystemExit):
        args_of(ch07, ["--serve", "--port", "-1"])
    assert "--port: must be at least 0 and at most 65535, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^--only: no measurement fly; they are train,"):
        bench.main(bench.build_parser().parse_args(["--only", "serve,fly", "--device", "cpu"]))
    with unittest.mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match=r"^Under torchrun, ch07_instruct.py finetunes \(and "
                                             r"tunes with --dpo\); run --chat as one process"):
            ch07.main(args_of(ch07, ["--chat"]))


def test_batch_shares_are_the_books_batches_split_among_processes():
    for world_size in (1, 2, 4):
        torch.manual_seed(5)
        book = [b.tolist() for b in DataLoader(range(22), batch_size=4, shuffle=True,
                                                drop_last=True)]
        shares = []
        for rank in range(world_size):
            torch.manual_seed(5)
            shares.append(list(DataLoader(range(22), batch_sampler=ch05.BatchShares(
                22, 4, rank, world_size))))
        assert [sorted(sum((s[i].tolist() for s in shares), [])) for i in range(5)] == \
            [sorted(b) for b in book]
    with pytest.raises(ValueError, match=r"--batch-size 6 does not divide among 4 processes: "
                                         r"give a multiple of 4"):
        ch05.BatchShares(22, 6, 0, 4)


# ---- Chapters 6 and 7 on two processes ----


def chapter6_argv(folder):
    rows = [(" ".join(["free prize now", "see you at lunch", "call home"][i % 3].split() *
                      (1 + i % 4)), ["spam", "ham", "other"][i % 3]) for i in range(48)]
    (folder / "own.csv").write_text("text,label\n" + "".join(f"{t},{label}\n"
                                                            for t, label in rows))
    return ["--data", str(folder / "own.csv"), "--model-size", "tiny", "--no-pretrained",
            "--epochs", "1", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "2",
            "--trainable", "last_block", "--lr", "1e-3", "--device", "cpu"]


CHAPTER7_ARGV = ["--data", str(SHARED / "data" / "instruction-data.json"), "--model-size",
                 "tiny", "--no-pretrained", "--limit", "20", "--batch-size", "4", "--epochs",
                 "1", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "2",
                 "--device", "cpu", "--mask-instructions", "--ollama-url",
                 "http://127.0.0.1:9/api/chat"]


def launch_two(script, argv, out):
    """torchrun --nproc_per_node=2 SCRIPT ARGV --out OUT, its output in files (no pipe
    to fill while nobody reads it)."""
    out.mkdir(parents=True)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         script, *argv, "--out", str(out / "run")], cwd=HERE,
        stdout=open(out / "stdout", "w"), stderr=open(out / "stderr", "w"),
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def launch_done(proc, out, timeout=300):
    """What a launch_two run printed, once it has ended well."""
    proc.wait(timeout=timeout)
    printed, errors = (out / "stdout").read_text(), (out / "stderr").read_text()
    assert proc.returncode == 0, printed[-2000:] + errors[-3000:]
    return printed


def test_chapter6_finetunes_on_two_processes_as_on_one_with_ddp_and_fsdp(tmp_path, capsys):
    """ch06_classify.py under torchrun: each process half of every batch, so the
    losses, accuracies and weights are one process's; the first process writes."""
    argv = chapter6_argv(tmp_path)
    launched = {layout: launch_two("ch06_classify.py", [*argv, *(["--fsdp"] if layout ==
                                                                 "fsdp" else [])],
                                   tmp_path / layout) for layout in ("ddp", "fsdp")}
    ch06.main(args_of(ch06, [*argv, "--out", str(tmp_path / "one")]))
    printed = lambda out: re.findall(r"Ep 1 \(Step \d+\): Train loss [\d.]+, Val loss [\d.]+|"  # noqa: E731
                                     r"Training accuracy: [\d.]+%", out)
    one_lines = printed(capsys.readouterr().out)
    one = gen.load_checkpoint(tmp_path / "one" / "classifier.pth")["model"]
    for layout, proc in launched.items():
        out = tmp_path / layout
        assert printed(launch_done(proc, out)) == one_lines and len(one_lines) == 5  # once
        saved = gen.load_checkpoint(out / "run" / "classifier.pth")["model"]
        # the key biases' gradients are zero but for rounding, which AdamW scales up
        assert all(torch.allclose(v, one[k], atol=1e-5) for k, v in saved.items()
                   if not k.endswith("W_key.bias")), layout
        # those key biases may tip a text near the boundary: one of the 32 at most
        assert json.loads((out / "run" / "accuracy.json").read_text()) == pytest.approx(
            json.loads((tmp_path / "one" / "accuracy.json").read_text()), abs=1 / 32)
        assert sorted(p.name for p in (out / "run").iterdir()) == sorted(
            p.name for p in (tmp_path / "one").iterdir())  # each file once, and one lock
    with unittest.mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match=r"^Under torchrun, ch06_classify.py finetunes; "
                                             r"run --classify and --serve as one process"):
            ch06.main(args_of(ch06, ["--classify", "Hi", "--out", str(tmp_path / "one")]))


def same_printed(lines, expected):
    """The same lines, each number equal to the last digit it is printed with (a
    value at a rounding boundary may print one digit apart)."""
    assert len(lines) == len(expected) and all(
        re.sub(r"-?\d+\.\d+", "#", a) == re.sub(r"-?\d+\.\d+", "#", b)
        for a, b in zip(lines, expected)), (lines, expected)
    for a, b in zip(lines, expected):
        for x, y in zip(re.findall(r"-?\d+\.\d+", a), re.findall(r"-?\d+\.\d+", b)):
            assert abs(float(x) - float(y)) <= 1.01 * 10 ** -len(y.split(".")[1]), (a, b)


def test_chapter7_finetunes_and_tunes_with_dpo_on_two_processes_as_on_one(tmp_path, capsys):
    """Each process takes half of every batch; the loss is the whole batch's, so the
    losses, weights and responses are one process's (finetuning with DDP, DPO with
    --fsdp, its reference sharded too; chapter 6's test runs its finetuning both
    ways); the first process writes."""
    runs = {("sft", "ddp"): launch_two("ch07_instruct.py", CHAPTER7_ARGV, tmp_path / "sft-ddp")}
    ch07.main(args_of(ch07, [*CHAPTER7_ARGV, "--out", str(tmp_path / "one")]))
    sft = tmp_path / "one" / "gpt2-tiny-sft.pth"
    dpo = ["--dpo", "--model-file", str(sft), "--preference-data",
           str(SHARED / "data" / "instruction-data-with-preference.json"), "--limit", "8",
           "--batch-size", "4", "--eval-freq", "1", "--eval-iter", "1", "--lr", "1e-4",
           "--max-new-tokens", "2", "--device", "cpu"]
    runs["dpo", "fsdp"] = launch_two("ch07_instruct.py", [*dpo, "--fsdp"],
                                     tmp_path / "dpo-fsdp")
    ch07.main(args_of(ch07, [*dpo, "--out", str(tmp_path / "one-dpo")]))
    printed = lambda out: re.findall(r"Ep 1 \(Step \d+\): Train loss [\d.]+, Val loss [^\n]+",  # noqa: E731
                                     out)
    one_lines = printed(capsys.readouterr().out)
    assert len(one_lines) == 3 + 2 and "reward margins" in one_lines[-1]
    for (task, layout), proc in runs.items():
        out = tmp_path / f"{task}-{layout}"
        # printed once, the same (DPO under --fsdp: the policy and its reference sharded)
        same_printed(printed(launch_done(proc, out)), one_lines[:3] if task == "sft" else
                     one_lines[3:])
        one, name, responses = {
            "sft": ("one", "gpt2-tiny-sft.pth", "instruction-data-with-response.json"),
            "dpo": ("one-dpo", "gpt2-tiny-dpo.pth", "instruction-data-with-dpo-response.json")
        }[task]
        ones = gen.load_checkpoint(tmp_path / one / name)["model"]
        saved = gen.load_checkpoint(out / "run" / name)["model"]
        assert all(torch.allclose(v, ones[k], atol=1e-5) for k, v in saved.items()), out
        assert (out / "run" / responses).read_text() == \
            (tmp_path / one / responses).read_text()
        assert sorted(p.name for p in (out / "run").iterdir()) == sorted(
            p.name for p in (tmp_path / one).iterdir())  # each file once, and one lock


def test_chapter7_end_to_end_with_a_stub_judge(tmp_path, serve, capsys):
    stub = serve(StubOllama, lambda prompt: "50")
    args = args_of(ch07, [
        "--data", str(SHARED / "data" / "instruction-data.json"), "--model-size", "tiny",
        "--no-pretrained", "--limit", "8", "--batch-size", "4", "--epochs", "2", "--lr", "1e-3",
        "--eval-freq", "2", "--eval-iter", "2", "--max-new-tokens", "8", "--mask-instructions",
        "--out", str(tmp_path), "--device", "cpu", "--ollama-url", stub.url, "--fast"])
    result = ch07.main(args)
    assert "Speed: SDPA attention, fused LayerNorm/GELU/QKV/AdamW" in capsys.readouterr().out
    assert result["train_losses"][-1] < result["train_losses"][0]  # the loss falls
    saved = json.loads((tmp_path / "instruction-data-with-response.json").read_text())
    assert len(saved) == 8 and all("model_response" in e for e in saved)
    assert result["scores"] == [50] * 8 and result["average"] == 50
    assert (tmp_path / "gpt2-tiny-sft.pth").exists() and (tmp_path / "loss-plot.png").exists()
    with pytest.raises(ValueError, match=r"\(gpt2-tiny-sft\.pth, instruction-data-with-response"
                                         r"\.json, scores\.json\)\. Use it with --chat"):
        ch07.main(args)
    # --evaluate alone scores the saved responses
    evaluated = ch07.main(args_of(ch07, 
        ["--evaluate", "--out", str(tmp_path), "--model-size", "tiny", "--ollama-url", stub.url]))
    assert evaluated["average"] == 50
    with pytest.raises(ch07.JudgeUnavailable, match="the responses stay in"):
        ch07.main(args_of(ch07, 
            ["--evaluate", "--out", str(tmp_path), "--ollama-url", "http://127.0.0.1:9/api/chat"]))
    # --overwrite with a cut data file, or stopped while training: the earlier run's files stay
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    (tmp_path / "cut.json").write_text('[{"instruction": "Name a co', encoding="utf-8")
    again = ["--model-size", "tiny", "--no-pretrained", "--limit", "8", "--batch-size", "4",
             "--epochs", "1", "--max-new-tokens", "2", "--out", str(tmp_path), "--device", "cpu",
             "--overwrite", "--ollama-url", "http://127.0.0.1:9/api/chat"]
    with pytest.raises(ValueError, match=r"cut\.json is not valid JSON"):
        ch07.main(args_of(ch07, ["--data", str(tmp_path / "cut.json"), *again]))
    data = ["--data", str(SHARED / "data" / "instruction-data.json")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ch07, "train_model_simple",
                   lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            ch07.main(args_of(ch07, [*data, *again]))
    assert {n: (tmp_path / n).read_bytes() for n in before if n != "run.lock"} == \
        {n: b for n, b in before.items() if n != "run.lock"}
    # stopped while writing the responses: the new model is kept, the old responses and
    # scores are not left beside it, and the same command then writes the responses only
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ch07, "write_text_atomic",
                   lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            ch07.main(args_of(ch07, [*data, *again]))
    model_bytes = (tmp_path / "gpt2-tiny-sft.pth").read_bytes()
    assert model_bytes != before["gpt2-tiny-sft.pth"]
    assert not (tmp_path / "scores.json").exists()
    assert not (tmp_path / "instruction-data-with-response.json").exists()
    capsys.readouterr()
    ch07.main(args_of(ch07, [*data, *[a for a in again if a != "--overwrite"]]))
    out = capsys.readouterr().out
    assert "has no responses yet" in out and "Training loss" not in out
    assert (tmp_path / "gpt2-tiny-sft.pth").read_bytes() == model_bytes
    assert len(json.loads((tmp_path / "instruction-data-with-response.json").read_text())) == 8
    # the chat command as a user runs it: a response is streamed, then Ctrl-C at the prompt
    chat = subprocess.Popen([sys.executable, "ch07_instruct.py", "--chat", "--model-size", "tiny",
                             "--no-pretrained", "--out", str(tmp_path), "--max-new-tokens", "4",
                             "--device", "cpu"], cwd=HERE, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C reaches it even when pytest was started with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chat.stdin.write("Name a color.\n")
    chat.stdin.flush()
    shown = ""
    while shown.count(">>> ") < 2:  # the first prompt, the response, the second prompt
        char = chat.stdout.read(1)
        assert char, chat.stderr.read()[-2000:]
        shown += char
    assert shown.split(">>> ")[1].strip()  # a response was printed
    chat.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: the chat ends, as a chat does
    chat.wait(timeout=60)  # before stdin closes: an end of input would end the chat too
    err = chat.stderr.read()
    assert chat.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "Interrupted" not in err and "files" not in err  # no word of training files


# ---- Chapter 7, beyond the book: preference tuning with DPO (the bonus) ----


PREFERENCES = [
    {"instruction": "Name a color.", "input": "", "output": "Red.", "chosen": "Red.",
     "rejected": "I will not tell you, go away."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "chosen": "5",
     "rejected": "Numbers bore me."},
    {"instruction": "Greet politely.", "input": "", "output": "Hello!", "chosen": "Hello!",
     "rejected": "What do you want?"},
    {"instruction": "Say yes.", "input": "", "output": "Yes.", "chosen": "Yes.",
     "rejected": "No, never, not today."}]


def preference_batch(tokenizer, entries=PREFERENCES, **options):
    dataset = ch07.PreferenceDataset(entries, tokenizer)
    return dataset, ch07.preference_collate_fn([dataset[i] for i in range(len(dataset))],
                                               **options)


def test_dpo_batches_pad_and_mask_exactly_the_response_tokens(tokenizer):
    dataset, batch = preference_batch(tokenizer)
    longest = max(len(item[k]) for item in dataset.items for k in ("chosen", "rejected"))
    for key in ("chosen", "rejected"):
        assert batch[key].shape == batch[f"{key}_mask"].shape == (4, longest + 1)
        for row, item in enumerate(dataset.items):
            n = len(item[key])
            assert batch[key][row, :n].tolist() == item[key] == tokenizer.encode(
                ch07.format_input(PREFERENCES[row]) + "\n\n### Response:\n" + PREFERENCES[row][key])
            assert batch[key][row, n:].eq(50256).all()  # padding: <|endoftext|>
            # as the bonus: the prompt and the two newlines after it are masked, the
            # header's "### Response:\n" and the response count
            start = len(tokenizer.encode(ch07.format_input(PREFERENCES[row])))
            assert tokenizer.decode(batch[key][row, start:start + 2].tolist()) == "\n\n"
            assert batch[f"{key}_mask"][row].nonzero().flatten().tolist() == \
                list(range(start + 2, n))
            response = tokenizer.decode(batch[key][row][batch[f"{key}_mask"][row]].tolist())
            assert response == "### Response:\n" + PREFERENCES[row][key]
    cut = ch07.preference_collate_fn(dataset.items, allowed_max_length=20)
    assert cut["chosen"].shape == cut["chosen_mask"].shape == (4, 20)
    # the masks decide what counts: padding and the prompt's positions change nothing
    model = tiny_model(0, context_length=256).eval()
    with torch.no_grad():
        logprobs = ch07.token_logprobs(model, batch["chosen"])
        base = ch07.sequence_logprob(logprobs, batch["chosen_mask"])
        padded = batch["chosen"].clone()
        padded[0, -1] = 123  # a padding token
        assert torch.equal(ch07.sequence_logprob(ch07.token_logprobs(model, padded),
                                                 batch["chosen_mask"])[0], base[0])
        changed = logprobs.clone()
        for row, item in enumerate(dataset.items):  # the log-probabilities of the prompt's tokens
            changed[row, :len(item["prompt"]) - 1] -= 5.0
        assert torch.equal(ch07.sequence_logprob(changed, batch["chosen_mask"]), base)
        prompt_len = len(dataset.items[0]["prompt"])
        response = batch["chosen"].clone()
        response[0, prompt_len] = 123  # the response's first token
        assert not torch.equal(ch07.sequence_logprob(ch07.token_logprobs(model, response),
                                                     batch["chosen_mask"])[0], base[0])


def test_dpo_starts_at_ln_2_and_training_raises_the_margin(tokenizer):
    import copy
    policy = tiny_model(0, context_length=256)
    reference = copy.deepcopy(policy).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    _, batch = preference_batch(tokenizer)
    loss, chosen, rejected, accuracy = ch07.dpo_loss_batch(batch, policy.eval(), reference, 0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)  # policy = reference
    assert chosen.item() == rejected.item() == accuracy.item() == 0.0
    loader = DataLoader(ch07.PreferenceDataset(PREFERENCES, tokenizer), batch_size=2,
                        collate_fn=ch07.preference_collate_fn)
    before = ch07.evaluate_dpo_loss_loader(policy, reference, loader, 0.1)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    tracking = ch07.train_model_dpo_simple(policy, reference, loader, loader, optimizer,
                                           num_epochs=4, beta=0.1, eval_freq=2, eval_iter=2)
    after = ch07.evaluate_dpo_loss_loader(policy, reference, loader, 0.1)
    assert after[0] < before[0] and after[1] > before[1] + 0.1 and after[2] > before[2]
    assert len(tracking["train_losses"]) == 4 and tracking["train_margins"][-1] > 0
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())


def test_a_bad_preference_file_gets_one_line_naming_the_entry(tmp_path, serve):
    cases = [([{**PREFERENCES[0]}, {k: v for k, v in PREFERENCES[1].items() if k != "chosen"}],
              r"Entry 1 of .*p\.json has no 'chosen'"),
             ([PREFERENCES[0], {**PREFERENCES[1], "rejected": 5}],
              r"Entry 1 of .*p\.json has a non-text 'rejected'"),
             ([], r"p\.json must hold a non-empty JSON list"), ("{not json", r"not valid JSON")]
    for content, message in cases:
        (tmp_path / "p.json").write_text(content if isinstance(content, str)
                                         else json.dumps(content), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            ch07.load_preference_data(tmp_path / "p.json")
    # the published file is checked against its SHA-256 when downloaded
    real = (SHARED / "data" / "instruction-data-with-preference.json").read_bytes()
    server = serve(FileServer, {"/p.json": real[:-2] + b"]\n"})
    with pytest.raises(ch02.DownloadError, match=r"instruction-data-with-preference\.json is "
                                                 r"damaged \(SHA-256 [0-9a-f]{12}\.\.\., not the "
                                                 r"published 305315abf14f\.\.\.\), also when "
                                                 r"downloaded again"):
        ch07.load_preference_data(data_dir=tmp_path / "d", url=server.url + "/p.json")
    assert len(server.requests) == 2 and len(list((tmp_path / "d").glob("*.damaged"))) == 1
    server.files["/p.json"] = real
    assert len(ch07.load_preference_data(data_dir=tmp_path / "d",
                                         url=server.url + "/p.json")) == 1100



def test_dpo_command_end_to_end_then_chat_and_evaluate_with_its_model(tmp_path, serve, capsys,
                                                                      monkeypatch):
    common = ["--model-size", "tiny", "--out", str(tmp_path), "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match=r"--dpo tunes a model this command finetuned, "
                                                r"and there is none at .*finetune one first"):
        ch07.main(args_of(ch07, ["--dpo", *common]))
    ch07.main(args_of(ch07, [*common, "--no-pretrained", "--data",
                             str(SHARED / "data" / "instruction-data.json"), "--limit", "8",
                             "--batch-size", "4", "--epochs", "1", "--max-new-tokens", "2",
                             "--ollama-url", "http://127.0.0.1:9/api/chat"]))
    sft = gen.load_checkpoint(tmp_path / "gpt2-tiny-sft.pth")["model"]
    capsys.readouterr()
    dpo_args = ["--dpo", *common, "--preference-data",
                str(SHARED / "data" / "instruction-data-with-preference.json"), "--limit", "8",
                "--batch-size", "4", "--eval-freq", "1", "--eval-iter", "1", "--lr", "1e-4",
                "--max-new-tokens", "2"]
    result = ch07.main(args_of(ch07, dpo_args))
    out = capsys.readouterr().out
    assert "Training before DPO: loss 0.693, reward margin 0.000, reward accuracy 0.00" in out
    lines = re.findall(r"Ep 1 \(Step (\d+)\): Train loss [\d.]+, Val loss [\d.]+, Train reward "
                       r"margins -?[\d.]+, Val reward margins -?[\d.]+, reward accuracy", out)
    assert lines == ["000000", "000001"]  # 8 pairs, batches of 4: two steps
    path = tmp_path / "gpt2-tiny-dpo.pth"
    saved = gen.load_checkpoint(path)
    assert saved["kind"] == "instruct" and saved["settings"]["dpo"]["beta"] == 0.1
    assert saved["settings"]["dpo"]["lr"] == 1e-4 and saved["settings"]["dpo"]["epochs"] == 1
    assert any(not torch.equal(v, sft[k]) for k, v in saved["model"].items())  # it was tuned
    assert all(torch.equal(v, sft[k]) for k, v in result["reference"].state_dict().items())
    for name in ("dpo-loss-plot.png", "dpo-margins-plot.png",
                 "instruction-data-with-dpo-response.json"):
        assert (tmp_path / name).exists(), name
    with pytest.raises(ValueError, match=r"already holds an earlier run's results \(gpt2-tiny-"
                                         r"dpo\.pth, instruction-data-with-dpo-response\.json\)"):
        ch07.main(args_of(ch07, dpo_args))
    # a cut or too small preference file, with --overwrite: refused before the model loads,
    # and the DPO model and its responses stay
    before = {n: (tmp_path / n).read_bytes() for n in ("gpt2-tiny-dpo.pth",
                                                       "instruction-data-with-dpo-response.json")}
    preference = json.loads((SHARED / "data" / "instruction-data-with-preference.json").read_text())
    (tmp_path / "cut.json").write_text(json.dumps(preference)[:5000], encoding="utf-8")
    (tmp_path / "six.json").write_text(json.dumps(preference[:6]), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ch07, "load_finetuned", lambda *a, **k: pytest.fail("loaded before the check"))
        for name, words in (("cut.json", r"cut\.json is not valid JSON"),
                            ("six.json", r"six\.json has 6 entries: too few for the book's "
                                         r"training, test and validation splits")):
            with pytest.raises(ValueError, match=words):
                ch07.main(args_of(ch07, [a if not a.endswith("preference.json") else
                                         str(tmp_path / name) for a in dpo_args] + ["--overwrite"]))
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())
    # stopped while writing its responses: run again, they are written without tuning again
    (tmp_path / "instruction-data-with-dpo-response.json").unlink()
    capsys.readouterr()
    ch07.main(args_of(ch07, dpo_args))
    out = capsys.readouterr().out
    assert "has no responses yet" in out and "before DPO" not in out
    assert (tmp_path / "gpt2-tiny-dpo.pth").read_bytes() == before["gpt2-tiny-dpo.pth"]
    assert len(json.loads((tmp_path / "instruction-data-with-dpo-response.json").read_text())) == 8
    # a finetuned model from elsewhere: its DPO model goes to --out, not beside it
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine-sft.pth").write_bytes((tmp_path / "gpt2-tiny-sft.pth").read_bytes())
    ch07.main(args_of(ch07, [*dpo_args[:dpo_args.index("--out")], "--out", str(tmp_path / "new"),
                             *dpo_args[dpo_args.index("--out") + 2:], "--model-file",
                             str(tmp_path / "elsewhere" / "mine-sft.pth")]))
    assert (tmp_path / "new" / "mine-dpo.pth").exists()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["mine-sft.pth"]
    # its model in the chat, its responses to the judge, its scores beside them
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\n\n"))
    chatted = ch07.main(args_of(ch07, ["--chat", *common, "--model-file", str(path),
                                       "--max-new-tokens", "3"]))
    assert len(chatted["responses"]) == 1
    judge = serve(StubOllama, lambda prompt: "40")
    scored = ch07.main(args_of(ch07, ["--evaluate", "--out", str(tmp_path), "--model-file",
                                      str(path), "--ollama-url", judge.url]))
    assert scored["average"] == 40 and (tmp_path / "scores-dpo.json").exists()
    assert not (tmp_path / "scores.json").exists()  # the finetuned model's stay apart



# ---- Chapter 7, beyond the book: serving (--serve), a chat page and the API ----

SERVE_CTX = 256  # the chapter's prompt alone takes about 30 tokens


@contextlib.contextmanager
def chat_server(tmp_path, chat=True, extra=(), slow=None):
    """ch07_instruct.py --serve of a tiny model (context 256) on a free port, in
    this process: yields (url, served). slow: seconds each token takes."""
    model = tiny_model(0, context_length=SERVE_CTX)
    path = tmp_path / ("tiny-sft.pth" if chat else "checkpoint.pt")
    gen.save_checkpoint(path, gen.model_file("instruct" if chat else "pretraining",
                                             model.state_dict(),
                                             {**TINY, "context_length": SERVE_CTX}, {}))
    settings = ch07.instruct_settings(args_of(ch07, [
        "--serve", "--model-file", str(path), "--port", "0", "--device", "cpu",
        "--max-new-tokens", "12", *extra]))
    device = torch.device("cpu")
    loaded, cfg, name, is_chat = ch07.load_served_model(settings, device)
    served = ch07.ServedModel(loaded, ch07.bpe_tokenizer(), device, cfg, name, is_chat,
                              {"max_new_tokens": 12, **gen.sampling_of(settings)},
                              settings["max_queue"])
    if slow:
        real = ch07.generate_stream

        def slowed(*args, **kwargs):
            for token in real(*args, **kwargs):
                time.sleep(slow)
                served.made = getattr(served, "made", 0) + 1
                yield token
        served_generate = slowed
    else:
        served_generate = ch07.generate_stream
    with unittest.mock.patch.object(ch07, "generate_stream", served_generate):
        server, url, _ = ch06.start_serving(served, settings)
        try:
            yield url, served
        finally:
            ch06.stop_serving(server, served, timeout=10)


def greedy_answer(served, ids, max_tokens):
    """What generate() makes greedily after the prompt ids: the server's answer."""
    idx = torch.tensor([ids])
    out = gen.generate(served.model, idx, min(max_tokens, SERVE_CTX - len(ids)), SERVE_CTX,
                       eos_id=ch07.EOT_ID)
    return served.tokenizer.decode(out[0, len(ids):].tolist())


def test_the_openai_client_chats_streams_and_completes_with_the_served_model(tmp_path):
    openai = optional("openai", "the server is checked with OpenAI's own client")
    with chat_server(tmp_path) as (url, served):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another one?"}]
        reply = client.chat.completions.create(model="any", messages=messages)
        text = reply.choices[0].message.content
        ids = served.tokenizer.encode(ch07.chat_text(
            [("Name a colour.", "Blue.")], "Another one?", served.tokenizer, SERVE_CTX, 12,
            "Be brief."))
        assert text == greedy_answer(served, ids, 12) and text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 12)
        assert reply.choices[0].finish_reason == "length" and reply.model == "tiny-sft"
        chunks = list(client.chat.completions.create(
            model="any", messages=messages, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 12
        # the completions route, and the models list
        done = client.completions.create(model="any", prompt="Every effort moves you",
                                         max_tokens=5)
        prompt_ids = served.tokenizer.encode("Every effort moves you")
        assert done.choices[0].text == greedy_answer(served, prompt_ids, 5)
        assert [m.id for m in client.models.list().data] == ["tiny-sft"]
        # seed: sampling repeats; a stop sequence ends the answer before it
        sample = lambda seed: client.chat.completions.create(  # noqa: E731
            model="any", messages=messages[-1:], temperature=1.0, seed=seed
        ).choices[0].message.content
        assert sample(7) == sample(7) != sample(8)
        stop = text[len(text) // 2:len(text) // 2 + 3]
        stopped = client.chat.completions.create(model="any", messages=messages, stop=[stop])
        assert stopped.choices[0].message.content == text[:text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model="any", messages=messages, stop=stop,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == \
            text[:text.index(stop)]


def test_bad_requests_get_their_status_and_an_openai_error_and_the_server_goes_on(tmp_path):
    with chat_server(tmp_path, extra=["--api-key", "s3cret"]) as (url, served):
        key = {"Authorization": "Bearer s3cret"}
        chat = url + "/v1/chat/completions"
        user = [{"role": "user", "content": "Hello"}]
        cases = [
            ({"data": b"{not json", "headers": {**key, "Content-Type": "application/json"}},
             400, "invalid_json", None),
            ({"json": {"messages": user, "temperature": "hot"}}, 400, "invalid_type",
             "temperature"),
            ({"json": {"messages": user, "max_tokens": True}}, 400, "invalid_type",
             "max_tokens"),
            ({"json": {"messages": []}}, 400, None, "messages"),
            ({"json": {"messages": [{"role": "robot", "content": "x"}]}}, 400, None,
             "messages[0].role"),
            ({"json": {"messages": [{"role": "assistant", "content": "x"}]}}, 400, None,
             "messages"),
            ({"json": {"messages": user, "n": 2}}, 400, "invalid_value", "n"),
            ({"json": {"messages": user, "max_tokens": 0}}, 400, "invalid_value", "max_tokens"),
            ({"json": {"messages": user, "max_tokens": SERVE_CTX + 1}}, 400, "invalid_value",
             "max_tokens"),
            ({"json": {"messages": [{"role": "user", "content": "word " * 300}]}}, 400,
             "context_length_exceeded", "messages"),
            ({"data": b"x" * (2 << 20), "headers": {**key, "Content-Type": "application/json"}},
             413, "request_too_large", None),
        ]
        for kwargs, status, code, param in cases:
            kwargs.setdefault("headers", key)
            answer = requests.post(chat, timeout=30, **kwargs)
            error = answer.json()["error"]
            assert answer.status_code == status, (kwargs.get("json"), answer.text)
            assert (error["code"], error["param"], error["type"]) == (
                code, param, "invalid_request_error") and error["message"], answer.text
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            answer = requests.get(url + "/v1/models", headers=headers, timeout=30)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == \
                "invalid_api_key"
        assert requests.get(url + "/", timeout=30).status_code == 200  # the page itself is open
        answer = requests.get(url + "/v1/nothing", headers=key, timeout=30)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
        assert "Access-Control-Allow-Origin" not in requests.get(
            url + "/v1/models", headers={**key, "Origin": "http://evil.example"}).headers
        # still answering
        answer = requests.post(chat, json={"messages": user}, headers=key, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    with chat_server(tmp_path, chat=False, extra=["--cors-origin", "http://localhost:3000"]) \
            as (url, served):
        answer = requests.post(url + "/v1/chat/completions", json={"messages": user})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "model_not_chat"
        assert requests.post(url + "/v1/completions", json={"prompt": "Hi"}).status_code == 200
        answer = requests.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert answer.json()["data"][0]["chat"] is False
        assert requests.options(url + "/v1/completions", headers={
            "Origin": "http://localhost:3000"}).status_code == 204
    # other machines only with a key; a port in use is one line
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0 lets other machines in: give "
                                         r"--api-key KEY \(or set \$API_KEY\)"):
        with chat_server(tmp_path, extra=["--host", "0.0.0.0"]):
            pass
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with pytest.raises(OSError, match=rf"Cannot serve on 127\.0\.0\.1:{port} .*give "
                                          r"another --port"):
            with chat_server(tmp_path, extra=["--port", port]):
                pass


def stream_chat(url, content, max_tokens, leave_after=None):
    """A streamed chat request's text and finish reason; leave_after: close the
    connection after that many chunks, as a closed browser tab does."""
    with requests.post(url + "/v1/chat/completions", stream=True, timeout=120, json={
            "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True}) as answer:
        assert answer.status_code == 200, answer.text
        text, finish, done = "", None, False
        for n, line in enumerate(answer.iter_lines()):
            if leave_after is not None and n >= leave_after:
                return None
            if not line:
                continue
            data = line.decode()[6:]
            if data == "[DONE]":
                done = True
                continue
            choice = json.loads(data)["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
        return text, finish, done


def test_sixteen_clients_at_once_get_whole_answers_and_those_who_leave_free_the_model(
        tmp_path):
    with chat_server(tmp_path) as (url, served):
        def client(i):
            if i % 4 == 3:  # 4 of the 16 leave mid-stream
                return [stream_chat(url, f"Question {i}", 40, leave_after=3)]
            return [stream_chat(url, f"Question {i}.{j}", 20) for j in range(3)]

        def round_of_clients():
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                return list(pool.map(client, range(16), timeout=240))
        first = round_of_clients()
        rss = bench.rss_bytes()
        second = round_of_clients()
        assert bench.rss_bytes() - rss < 30e6  # no memory kept per request
        assert first == second  # greedy: the same answers, whoever else was served
        for i, answers in enumerate(first):
            if i % 4 == 3:
                assert answers == [None]
            else:
                assert all(done and finish in ("length", "stop") for _, finish, done in answers)
        single = stream_chat(url, "Question 0.0", 20)
        assert first[0][0] == single  # as when served alone


def test_the_queue_has_a_limit_and_a_client_that_leaves_stops_its_generation(tmp_path):
    with chat_server(tmp_path, extra=["--max-queue", "1"], slow=0.05) as (url, served):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # leaves after 30 tokens (a line each, and a blank line between): 1.5 s
            running = pool.submit(stream_chat, url, "Long", 200, 60)
            time.sleep(0.3)
            waiting = pool.submit(stream_chat, url, "Next", 3)
            time.sleep(0.3)
            busy = requests.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "More"}], "max_tokens": 3})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "overloaded"
            assert running.result(timeout=60) is None
            assert waiting.result(timeout=60)[2]
        assert served.made < 60  # not the 200 tokens the one who left asked for


def test_serve_command_stops_on_sigterm_with_status_0(tmp_path):
    model = tiny_model(0, context_length=SERVE_CTX)
    gen.save_checkpoint(tmp_path / "m.pth", gen.model_file(
        "instruct", model.state_dict(), {**TINY, "context_length": SERVE_CTX}, {}))
    # Ctrl-C takes the same way in serve() (SIGTERM raises Interrupted, a KeyboardInterrupt)
    for sig in (signal.SIGTERM,):
        proc = subprocess.Popen([sys.executable, str(HERE / "ch07_instruct.py"), "--serve",
                                 "--model-file", str(tmp_path / "m.pth"), "--port", "0",
                                 "--device", "cpu"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        line = ""
        while "Serving" not in line:  # after "Using device: cpu"
            line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", line).group(1)
        assert "Serving m (chat, context 256)" in line
        assert requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "m"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Stopped." in out and "Traceback" not in err, err


def chromium_driver():
    """Headless Chromium through Selenium, with the system's chromedriver."""
    webdriver = optional("selenium.webdriver", "the chat page is tested in a real browser")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        message = ("needs Chromium and its chromedriver (the chat page is tested in a real "
                   "browser): apt-get install chromium chromium-driver")
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_chat_page_streams_an_answer_stops_one_and_starts_anew_in_a_browser(tmp_path):
    driver = chromium_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    try:
        with chat_server(tmp_path, slow=0.1) as (url, served):
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny-sft")
            assert "context 256" in driver.find_element(By.ID, "model-info").text
            assert driver.find_element(By.ID, "max_tokens").get_attribute("value") == "12"
            box = driver.find_element(By.ID, "message")
            box.send_keys("Name a colour.", Keys.ENTER)
            turns = lambda: driver.find_elements(By.CSS_SELECTOR, ".turn")  # noqa: E731
            wait.until(lambda d: len(turns()) == 2)
            # streamed: the answer grows in place before it is whole
            lengths = set()
            wait.until(lambda d: lengths.add(len(turns()[1].text)) or
                       d.find_element(By.ID, "send").is_enabled())
            assert len(lengths) > 2
            ids = served.tokenizer.encode(ch07.chat_text([], "Name a colour.", served.tokenizer,
                                                         SERVE_CTX, 12))
            assert turns()[0].text == "Name a colour."
            assert turns()[1].text == greedy_answer(served, ids, 12).strip()
            # a long answer, stopped
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("200")
            box.send_keys("Tell me more.", Keys.ENTER)
            wait.until(lambda d: len(turns()) == 4 and len(turns()[3].text) > 5)
            driver.find_element(By.ID, "stop").click()
            wait.until(lambda d: "[stopped]" in turns()[3].text)
            made = served.made
            time.sleep(1.0)  # 10 tokens' time: the model stopped too, after 2 or 3 more
            assert served.made - made < 5 and made < 100
            driver.find_element(By.ID, "new-chat").click()
            wait.until(lambda d: len(turns()) == 0)
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("5")
            box.send_keys("Hello again", Keys.ENTER)
            wait.until(lambda d: len(turns()) == 2 and d.find_element(By.ID, "send").is_enabled())
            assert turns()[1].text and "error" not in turns()[1].get_attribute("class")
    finally:
        driver.quit()


# ---- Chapter 6, beyond the book: the classifier's page and API (--serve) ----

CLASSES = ["ham", "spam", "promo", "news", "other"]


@contextlib.contextmanager
def classifier_server(tmp_path, extra=()):
    """`ch06_classify.py --serve` of a tiny 5-class classifier (max_length 8) on a
    free port, in this process (the command, with its wait for Ctrl-C left out):
    yields (url, the served classifier)."""
    model = ch06.prepare_classifier(tiny_model(0), TINY, num_classes=len(CLASSES))
    ch06.save_classifier(tmp_path / "out" / "classifier.pth", model, TINY, {
        "trainable": "last_block", "lora_rank": None, "lora_alpha": 16, "max_length": 8,
        "models_dir": "gpt2", "classes": CLASSES, "token": "last"})
    started = {}

    def serve_without_waiting(served, settings, banner):
        started["server"], url, _ = ch06.start_serving(served, settings)
        started["served"] = served
        print(banner(url))
        return url
    with unittest.mock.patch.object(ch06, "serve_until_stopped", serve_without_waiting):
        result = ch06.main(args_of(ch06, ["--serve", "--out", str(tmp_path / "out"), "--port",
                                          "0", "--device", "cpu", *extra]))
    try:
        yield result["url"], started["served"]
    finally:
        ch06.stop_serving(started["server"], started["served"], timeout=10)


def test_the_classify_api_answers_as_the_command_line_does_and_refuses_bad_requests(tmp_path):
    long_text = "This message goes on for rather more than eight tokens, so it is cut."
    with classifier_server(tmp_path, ["--api-key", "k3y"]) as (url, served):
        key = {"Authorization": "Bearer k3y"}
        answer = requests.post(url + "/v1/classify", json={"text": ["Hi there", long_text]},
                               headers=key, timeout=30)
        assert answer.status_code == 200, answer.text
        first, second = answer.json()["data"]
        with pytest.warns(UserWarning, match="only their first 8 are classified"):
            expected = ch06.classify_texts(["Hi there", long_text],
                                           tmp_path / "out" / "classifier.pth", "cpu")
        for got, (label, probability) in zip((first, second), expected):
            assert got["label"] == label and got["probability"] == pytest.approx(probability)
            assert set(got["probabilities"]) == set(CLASSES)
            assert sum(got["probabilities"].values()) == pytest.approx(1, abs=1e-5)
            assert max(got["probabilities"], key=got["probabilities"].get) == label
        assert not first["truncated"] and second["truncated"] and second["tokens"] > 8
        one = requests.post(url + "/v1/classify", json={"text": "Hi there"}, headers=key).json()
        assert one["data"] == [first] and one["model"] == "out-classifier"
        models = requests.get(url + "/v1/models", headers=key).json()["data"][0]
        assert models["classes"] == CLASSES and models["max_length"] == 8
        classify = url + "/v1/classify"
        for kwargs, status, code in [
                ({"json": {"text": ""}}, 400, "invalid_value"),
                ({"json": {"text": " \u200b "}}, 400, "invalid_value"),
                ({"json": {"text": []}}, 400, "invalid_value"),
                ({"json": {"text": 5}}, 400, "invalid_value"),
                ({"json": {"texts": "hi"}}, 400, "invalid_value"),
                ({"json": {"text": ["ok", 3]}}, 400, "invalid_value"),
                ({"json": {"text": ["a"] * (ch06.MAX_TEXTS + 1)}}, 400, "invalid_value"),
                ({"json": ["hi"]}, 400, "invalid_json"),
                ({"data": b"{not json"}, 400, "invalid_json"),
                ({"data": b"x" * (2 << 20)}, 413, "request_too_large")]:
            answer = requests.post(classify, headers=key, timeout=30, **kwargs)
            assert answer.status_code == status, (kwargs, answer.text)
            assert answer.json()["error"]["code"] == code and answer.json()["error"]["message"]
        assert requests.post(classify, json={"text": "hi"}).status_code == 401
        assert requests.get(url + "/", timeout=30).status_code == 200  # the page itself is open
        answer = requests.get(url + "/v1/chat/completions", headers=key)
        assert answer.status_code == 404 and "POST /v1/classify" in answer.json()["error"]["message"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # at once, in order of arrival
            answers = list(pool.map(lambda i: requests.post(classify, headers=key, json={
                "text": f"Hi there {i}"}, timeout=60), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0 lets other machines in"):
        with classifier_server(tmp_path, ["--host", "0.0.0.0"]):
            pass


def test_the_classifier_page_shows_the_class_and_its_probabilities_in_a_browser(tmp_path):
    driver = chromium_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    try:
        with classifier_server(tmp_path, ["--api-key", "k3y"]) as (url, served):
            driver.get(url + "/")
            wait.until(lambda d: "API key" in d.find_element(By.ID, "model-name").text)
            driver.find_element(By.ID, "api_key").send_keys("k3y")
            driver.find_element(By.ID, "classify").click()  # no text yet
            wait.until(lambda d: "Type a text first" in d.find_element(By.ID, "error").text)
            driver.find_element(By.ID, "text").send_keys("Win a prize now", Keys.CONTROL,
                                                         Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "label").text)
            expected = requests.post(url + "/v1/classify", json={"text": "Win a prize now"},
                                     headers={"Authorization": "Bearer k3y"}).json()["data"][0]
            assert driver.find_element(By.ID, "label").text == expected["label"]
            assert driver.find_element(By.ID, "model-name").text == "out-classifier"
            assert not driver.find_element(By.ID, "error").is_displayed()
            bars = driver.find_elements(By.CSS_SELECTOR, ".bar")
            shown = [(b.find_element(By.CLASS_NAME, "name").text,
                      float(b.find_element(By.CLASS_NAME, "value").text.rstrip("%")))
                     for b in bars]
            ranked = sorted(expected["probabilities"].items(), key=lambda kv: -kv[1])
            assert [name for name, _ in shown] == [name for name, _ in ranked]
            assert [p for _, p in shown] == pytest.approx([100 * p for _, p in ranked], abs=0.06)
            assert "top" in bars[0].get_attribute("class")
    finally:
        driver.quit()


# ======= Every command: flags and bad input on the command line =======


@pytest.mark.parametrize("flag,value,words", [
    ("--epochs", "0", "must be at least 1, got 0"), ("--lr", "-0.1", "must be above 0, got -0.1"),
    ("--eval-freq", "0", "must be at least 1"), ("--batch-size", "two", "expected a whole number"),
    ("--limit", "0", "must be at least 1"), ("--max-new-tokens", "-5", "must be at least 1")])
def test_finetuning_flags_refuse_values_out_of_range(flag, value, words, capsys):
    for chapter in (ch07,) if flag in ("--limit", "--max-new-tokens") else (ch06, ch07):
        with pytest.raises(SystemExit) as exit_:
            args_of(chapter, [flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: {words}" in capsys.readouterr().err


def test_each_shared_idea_has_one_flag_name_in_every_script():
    """The model size, the input data, the context length, the seed and the device
    have one name wherever a script has them; the earlier names still parse."""
    parsers = {"ch02_data.py": ch02.build_parser(), "ch03_attention.py": ch03.build_parser(),
               "ch04_gpt.py": ch04.build_parser(), "ch05_train.py": ch05.build_parser(),
               "ch05_load_gpt2.py": gpt2.build_parser(), "ch06_classify.py": ch06.build_parser(),
               "ch07_instruct.py": ch07.build_parser(), "ch07_data.py": ch07d.build_parser(),
               "bench.py": bench.build_parser()}
    shown = {name: {flag for a in parser._actions if a.help != argparse.SUPPRESS
                    for flag in a.option_strings} for name, parser in parsers.items()}
    expected = {"--model-size": ["ch04_gpt.py", "ch05_train.py", "ch05_load_gpt2.py",
                                 "ch06_classify.py", "ch07_instruct.py"],
                "--data": ["ch02_data.py", "ch05_train.py", "ch06_classify.py",
                           "ch07_instruct.py"],
                "--context-length": ["ch02_data.py", "ch05_train.py"],
                "--seed": ["ch04_gpt.py", "ch05_train.py", "ch05_load_gpt2.py",
                           "ch06_classify.py", "ch07_instruct.py", "ch07_data.py"],
                "--device": ["ch04_gpt.py", "ch05_train.py", "ch05_load_gpt2.py",
                             "ch06_classify.py", "ch07_instruct.py", "bench.py"]}
    for flag, scripts in expected.items():
        assert [n for n in parsers if flag in shown[n]] == scripts, flag
    for old in ("--model", "--text"):
        assert not [n for n in parsers if old in shown[n]], old  # shown nowhere
    # ch02's earlier name of --context-length is hidden; chapter 6's --max-length (the
    # book's max_length of the texts, not a context) is its own
    assert [n for n in parsers if "--max-length" in shown[n]] == ["ch06_classify.py"]
    for name in expected["--device"]:
        device = next(a for a in parsers[name]._actions if a.dest == "device")
        assert device.default == "auto", name
    # the earlier spellings still run
    assert args_of(ch05, ["--model", "tiny"]).model_size == "tiny"
    assert args_of(ch04, ["--model", "tiny"]).model_size == "tiny"
    assert args_of(ch02, ["--text", "a.txt", "--max-length", "8"]).data == "a.txt"
    assert args_of(ch02, ["--max-length", "8"]).context_length == 8


def test_a_flag_out_of_range_exits_2_and_an_unwritable_out_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        args_of(gpt2, ["--top-k", "0"])
    assert exit_.value.code == 2
    assert "argument --top-k: must be at least 1, got 0" in capsys.readouterr().err
    for parse, argv, message in [  # the judge's and the generator's numbers, at 0 and below
            (lambda a: args_of(ch07, a), ["--workers", "0"], "--workers: must be at least 1"),
            (lambda a: args_of(ch07, a), ["--timeout", "0"], "--timeout: must be above 0"),
            (lambda a: args_of(ch07, a), ["--retries", "-1"], "--retries: must be at least 0"),
            (ch07d.parse_args, ["--generate-data", "0"], "--generate-data: must be at least 1"),
            (ch07d.parse_args, ["--workers", "-2"], "--workers: must be at least 1"),
            (ch07d.parse_args, ["--threshold", "1.5"], "--threshold: must be at least 0 and "
                                                      "at most 1"),
            (ch02.parse_args, ["--vocab-size", "256"], "--vocab-size: must be at least 257"),
            (ch02.parse_args, ["--vocab-size", "70000"], "at most 65536"),  # uint16 token files
            (ch05.parse_args, ["--trials", "0"], "--trials: must be at least 1"),
            (ch06.parse_args, ["--port", "-1"], "--port: must be at least 0"),
            (ch06.parse_args, ["--max-queue", "0"], "--max-queue: must be at least 1")]:
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    with pytest.raises(OSError, match=re.escape(f"--out {tmp_path / 'a_file' / 'sub'}: "
                                                f"{tmp_path / 'a_file'} is a file")):
        ch06.main(args_of(ch06, ["--out", str(tmp_path / "a_file" / "sub"), "--no-pretrained",
                                 "--model-size", "tiny", "--device", "cpu"]))


@pytest.fixture
def signal_handlers():
    """run_command sets the process's signal handlers: put pytest's back afterwards."""
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)


@pytest.mark.parametrize("name,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_every_command_stops_on_a_signal_in_one_line_of_its_own(name, code, signal_handlers,
                                                               tmp_path, capsys):
    def work(args):
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(5)  # the signal arrives before this ends
        pytest.fail("not stopped")
    with pytest.raises(SystemExit) as exit_:
        ch02.run_command(work, None, "What was kept.")
    assert exit_.value.code == code
    assert capsys.readouterr().err == f"\nInterrupted ({name}). What was kept.\n"
    # each command, and each of its modes, says what holds for it
    kept = lambda chapter, argv: chapter.kept_when_stopped(vars(args_of(chapter, argv)))  # noqa
    assert kept(ch06, ["--classify-file", "f.txt", "--classify-out", "o.csv"]).startswith(
        "Nothing was written: --classify-out")
    assert "written when training ends" in kept(ch06, [])
    assert kept(gpt2, ["--export-hf", "dir", "--from", "m.pt"]).startswith(
        "Nothing was exported: dir is written whole")
    assert "scores obtained so far are kept" in kept(ch07, ["--evaluate"])
    assert kept(ch05, ["--export-weights", "w.pth"]) == "w.pth is written whole or not at all."


def test_a_command_stopped_while_it_loads_or_works_says_so_in_one_line(tmp_path):
    # SIGINT while torch is being imported: one line and 130, not a traceback
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    starting = subprocess.Popen([sys.executable, "ch04_gpt.py"], cwd=HERE, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{starting.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)  # torch's libraries are loading: the import has begun
    starting.send_signal(signal.SIGINT)
    _, err = starting.communicate(timeout=60)
    assert starting.returncode == 130, err[-2000:]
    assert err == "\nInterrupted while starting; nothing was done.\n"
    # SIGTERM while a classifier trains: its own words, 143, and nothing written
    env["PYTHONUNBUFFERED"] = "1"
    data = write_table(tmp_path / "topics.csv", topic_rows(300))
    training = subprocess.Popen(
        [sys.executable, "ch06_classify.py", "--data", str(data), "--no-pretrained",
         "--model-size", "tiny", "--epochs", "50", "--eval-freq", "1", "--device", "cpu",
         "--out", str(tmp_path / "out")], cwd=HERE, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while "Ep 1 (Step 000001)" not in training.stdout.readline():
        assert training.poll() is None, training.stderr.read()[-2000:]
    training.terminate()
    _, err = training.communicate(timeout=60)
    assert training.returncode == 143, err[-2000:]
    assert "\nInterrupted (SIGTERM). The classifier is written when training ends, so nothing " \
        "of this run was saved" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.lock"]


def test_bad_inputs_on_the_command_line_get_one_line_and_no_traceback(tmp_path):
    """Each script run as a user runs it: exit 1 and one line naming the file
    (argparse's exit 2 for a flag out of range: test_a_flag_out_of_range_exits_2)."""
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    (tmp_path / "short.txt").write_text("Hi there.", encoding="utf-8")
    (tmp_path / "reviews.csv").write_text("review,label\nGreat film,good\n", encoding="utf-8")
    cases = [  # (command, exit status, what stderr says)
        (["ch05_load_gpt2.py", "--hf-file", str(tmp_path / "a_file")], 1,
         f"error: --hf-file {tmp_path / 'a_file'} is not GPT-2 124M's safetensors file: not a "
         "safetensors file.\n"),
        (["ch05_train.py", "--model-size", "tiny", "--out", str(tmp_path / "a_file")], 1,
         f"error: --out {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a folder. "
         "Choose another --out."),
        (["-c", "import ch02_data, warnings; ch02_data.plain_warnings(); "
                "warnings.warn('the prompt was cut')"], 0, "Warning: the prompt was cut\n"),
        # the tests themselves, with a TEST_SHARED_DIR that lacks the data: one line
        (["-c", "import os, sys, pytest; sys.stdout = sys.stderr; os.environ['TEST_SHARED_DIR']"
                f" = {str(tmp_path / 'no-shared')!r}; sys.exit(pytest.main(['test_all.py', '-q', "
                "'-p', 'no:cacheprovider', '-k', 'test_vocabulary_sizes_are_the_books']))"], 1,
         f"The tests need these files in {tmp_path / 'no-shared'} (TEST_SHARED_DIR): "
         "data/the-verdict.txt, data/instruction-data.json, "),
        (["bench.py", "--json", str(tmp_path)], 1, "is a folder; name a file"),
        (["ch02_data.py", "--data", str(tmp_path / "short.txt")], 1,
         "error: The text has 3 tokens, but the demo's batches need 33"),
        (["ch06_classify.py", "--data", str(tmp_path / "reviews.csv"), "--no-pretrained",
          "--model-size", "tiny", "--out", str(tmp_path / "own-out")], 1,
         f"error: {tmp_path / 'reviews.csv'} has no column 'text' (its columns: 'review', "
         "'label'); name yours with --text-column.\n"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *command], cwd=HERE, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command, _, _ in cases]  # all at once: each spends its time importing
    for proc, (command, status, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status and "Traceback" not in err, (command, err[-2000:])
        assert "UserWarning" not in err, (command, err[-2000:])  # a warning is its message only
        assert message in err, (command, err[-2000:])
    assert not (tmp_path / "own-out").exists()  # bad data: no output folder
