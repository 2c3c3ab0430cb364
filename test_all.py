"""Tests for every chapter file: `pytest test_all.py`.

Runs offline: data comes from ../shared when it is there (else it is
downloaded), and download code is tested against HTTP servers on 127.0.0.1
started by the tests themselves.
"""
import http.server
import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parent.parent / "shared"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

import ch02_data as ch02  # noqa: E402  (after TIKTOKEN_CACHE_DIR is set)
import ch03_attention as ch03  # noqa: E402
import ch04_gpt as ch04  # noqa: E402

TINY = ch04.gpt_config("tiny", context_length=32, vocab_size=50257, drop_rate=0.0)


def shared_or_download(name, url_downloader):
    path = SHARED / "data" / name
    return path if path.exists() else url_downloader()


@pytest.fixture(scope="session")
def verdict_path(tmp_path_factory):
    path = SHARED / "data" / "the-verdict.txt"
    if path.exists():
        return path
    return ch02.download_file(ch02.VERDICT_URL, tmp_path_factory.mktemp("data") / path.name)


@pytest.fixture(scope="session")
def verdict(verdict_path):
    return ch02.read_text(verdict_path)


@pytest.fixture(scope="session")
def tokenizer():
    return ch02.bpe_tokenizer()


# ---- A small HTTP server for download tests ----

class FileServer:
    """Serves `files` ({url path: bytes}) on 127.0.0.1 with Range support.

    `cut_short` names paths whose next response stops halfway; `missing` names
    paths that answer 404; every request is logged in `requests`.
    """

    def __init__(self, files):
        self.files, self.cut_short, self.missing, self.requests = dict(files), set(), set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None or self.path in server.missing:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
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
                self.end_headers()
                if self.path in server.cut_short:
                    server.cut_short.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    servers = []

    def start(files):
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ======================= Chapter 2 =======================

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
    with pytest.raises(ValueError, match=r"has 4 tokens.*needs 9"):
        ch02.GPTDatasetV1("Every effort moves you", tokenizer, max_length=8, stride=1)


def test_sinusoidal_position_encoding():
    pe = ch02.sinusoidal_position_encoding(50, 16)
    assert pe.shape == (50, 16)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0] * 8))
    pos, i = 7, 3
    assert math.isclose(pe[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / 16)), rel_tol=1e-5)
    assert math.isclose(pe[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / 16)), rel_tol=1e-5)
    assert ch02.sinusoidal_position_encoding(5, 7).shape == (5, 7)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        ch02.read_text(tmp_path / "nothere.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        ch02.read_text(bad)


def test_download_file_reuses_existing_and_falls_back(file_server, tmp_path):
    server = file_server({"/a/f.txt": b"hello" * 1000, "/b/f.txt": b"hello" * 1000})
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


def test_download_file_resumes_a_cut_download(file_server, tmp_path):
    data = bytes(range(256)) * 1600  # 400 kB: several 64 kB chunks
    server = file_server({"/f.bin": data})
    server.cut_short.add("/f.bin")
    dest = tmp_path / "f.bin"
    with pytest.raises(RuntimeError) as err:
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


def test_chapter2_main(verdict_path):
    args = type("Args", (), dict(text=verdict_path, data_dir="unused", batch_size=8,
                                 max_length=4, emb_dim=256))
    assert ch02.main(args).shape == (8, 4, 256)


# ======================= Chapter 3 =======================

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
    ch03.main(type("Args", (), {"out": tmp_path}))
    png = (tmp_path / "causal_attention_weights.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


# ======================= Chapter 4 =======================

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
    torch.manual_seed(1)
    model = ch04.GPTModel(TINY).eval()
    idx = torch.randint(0, 50257, (2, 12))
    assert model(idx).shape == (2, 12, 50257)
    for t in (0, 6, 11):
        assert_causal(model, idx, t)


def test_dropout_only_in_training_mode():
    torch.manual_seed(1)
    model = ch04.GPTModel({**TINY, "drop_rate": 0.5})
    idx = torch.randint(0, 50257, (1, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_too_long_input_names_both_lengths():
    model = ch04.GPTModel(TINY)
    with pytest.raises(ValueError, match="has 33 tokens but the model's context_length is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


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
    args = type("Args", (), dict(prompt="Hello, I am", max_new_tokens=3, model="tiny"))
    assert ch04.main(args).shape == (1, 7)
