"""Chapter 5 (5.5): Loading pretrained weights from OpenAI.

Defines the book's `download_and_load_gpt2`, `load_gpt2_params_from_tf_ckpt`,
`assign` and `load_weights_into_gpt`. Beyond the book, in this order: the
checks of the downloaded files (a damaged one is fetched again), a reader of
OpenAI's TensorFlow checkpoint that needs no TensorFlow (`list_tf_variables`,
`load_tf_variable`, with CRC-32C checks), `load_gpt2_model` (converts once to
model.pth, then loads offline), Hugging Face's model.safetensors of the same
weights (`load_hf_gpt2`), `--export-hf` (any text model of chapters 5 and 7 as
a Hugging Face GPT-2 folder), and a look inside the checkpoint. Chapters 6 and
7 take `load_gpt2_model` from here.

Run:  python ch05_load_gpt2.py --model-size 124M --prompt "Every effort moves you"
      python ch05_load_gpt2.py --inspect          (what the checkpoint holds)
      python ch05_load_gpt2.py --neighbors king --analogy king man woman
      python ch05_load_gpt2.py --export-hf runs/mine-hf --from runs/mine/checkpoint.pt
Imports from ch02_data.py (downloads, GPT-2's BPE files), ch04_gpt.py and
ch05_generate.py (model files, generating); nothing from ch05_train.py.
"""
import argparse
import contextlib
import functools
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import numpy as np
import torch
from tqdm import tqdm

from ch02_data import (EOT, DownloadError, HelpFormatter, bpe_tokenizer, check_output_file,
                       check_writable, collect_text_files, damaged_again, download_checked,
                       download_file, fetch_again, hf_endpoint, hf_vocabulary_files,
                       move_aside, number, parquet_module, pinned, read_text, run_command,
                       sha256_of, write_text_atomic)
from ch04_gpt import (GPT_CONFIG_124M, MODEL_CONFIGS, GPTModel, add_device_argument,
                     get_device)
from ch05_generate import (add_sampling_arguments, architecture_difference, architecture_of,
                           build_lean, load_checkpoint, load_text_model, model_file, sampling,
                           save_checkpoint, stream_text, text_to_token_ids)

ALLOWED_SIZES = ("124M", "355M", "774M", "1558M")
BASE_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/models",
             "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")  # the book's backup
FILENAMES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
             "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")


# ---- 5.5 Downloading OpenAI's checkpoint ----

def download_and_load_gpt2(model_size, models_dir, base_urls=BASE_URLS):
    """Download GPT-2 `model_size` into models_dir/model_size (files already there are
    kept) and return (settings, params) read from its TensorFlow checkpoint."""
    model_dir = download_gpt2(model_size, models_dir, base_urls)
    tf_ckpt_path = latest_checkpoint(model_dir)  # the book: tf.train.latest_checkpoint
    settings = json.loads((model_dir / "hparams.json").read_text(encoding="utf-8"))
    try:
        params = load_gpt2_params_from_tf_ckpt(tf_ckpt_path, settings)
    except DamagedCheckpoint as err:  # beyond the book: bytes that fail their checksum
        data_file = model_dir / DATA_FILE
        aside = fetch_again(data_file, str(err),
                            lambda: fetch_gpt2_file(data_file, model_size, base_urls),
                            gpt2_file_problem, gpt2_advice(data_file))
        try:
            params = load_gpt2_params_from_tf_ckpt(tf_ckpt_path, settings)
        except DamagedCheckpoint as again:
            raise damaged_again(data_file, str(again), aside, gpt2_advice(data_file)) from None
    return settings, params


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings, list_variables=None, load_variable=None):
    """{'wte': ..., 'wpe': ..., 'g': ..., 'b': ..., 'blocks': [{'attn': {...}, ...}]}"""
    # Beyond the book: TensorFlow's functions, or the same from our own reader; or
    # another reader's, which names OpenAI's variables (Hugging Face's file)
    if list_variables is None:
        list_variables, load_variable = checkpoint_functions(ckpt_path)
    params = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in list_variables(ckpt_path):
        # squeeze: OpenAI stores linear weights as 1x1 convolutions, (1, in, out)
        variable_array = np.squeeze(load_variable(ckpt_path, name))
        variable_name_parts = name.split("/")[1:]  # skip the leading "model/"
        target_dict = params
        if variable_name_parts[0].startswith("h"):  # h0, h1, ...: a transformer block
            target_dict = params["blocks"][int(variable_name_parts[0][1:])]
        for key in variable_name_parts[1:-1]:
            target_dict = target_dict.setdefault(key, {})
        target_dict[variable_name_parts[-1]] = variable_array
    return params


# ---- 5.5 Loading the weights into our GPTModel ----

def assign(left, right, name="parameter"):
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch for {name}: our model has {tuple(left.shape)}, "
                         f"the checkpoint has {tuple(right.shape)}.")
    # Row-major, as a saved and reloaded model has it: `right` may be a transposed
    # view, whose strides torch.tensor would keep (and matmuls would then round differently)
    return torch.nn.Parameter(torch.tensor(np.ascontiguousarray(right), dtype=left.dtype))


def load_weights_into_gpt(gpt, params, free_params=False):
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"], "pos_emb.weight")
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"], "tok_emb.weight")

    for b, block_params in enumerate(params["blocks"]):
        if free_params:  # beyond the book: free each block's arrays once they are copied
            params["blocks"][b] = None
        block, name = gpt.trf_blocks[b], f"trf_blocks.{b}"
        # OpenAI keeps query, key and value in one matrix, c_attn: split it in three
        q_w, k_w, v_w = np.split(block_params["attn"]["c_attn"]["w"], 3, axis=-1)
        # .T: OpenAI's weights are (in, out), nn.Linear's are (out, in)
        block.att.W_query.weight = assign(block.att.W_query.weight, q_w.T, f"{name}.att.W_query.weight")
        block.att.W_key.weight = assign(block.att.W_key.weight, k_w.T, f"{name}.att.W_key.weight")
        block.att.W_value.weight = assign(block.att.W_value.weight, v_w.T, f"{name}.att.W_value.weight")

        q_b, k_b, v_b = np.split(block_params["attn"]["c_attn"]["b"], 3, axis=-1)
        block.att.W_query.bias = assign(block.att.W_query.bias, q_b, f"{name}.att.W_query.bias")
        block.att.W_key.bias = assign(block.att.W_key.bias, k_b, f"{name}.att.W_key.bias")
        block.att.W_value.bias = assign(block.att.W_value.bias, v_b, f"{name}.att.W_value.bias")

        c_proj = block_params["attn"]["c_proj"]
        block.att.out_proj.weight = assign(block.att.out_proj.weight, c_proj["w"].T,
                                           f"{name}.att.out_proj.weight")
        block.att.out_proj.bias = assign(block.att.out_proj.bias, c_proj["b"],
                                         f"{name}.att.out_proj.bias")

        mlp = block_params["mlp"]
        block.ff.layers[0].weight = assign(block.ff.layers[0].weight, mlp["c_fc"]["w"].T,
                                           f"{name}.ff.layers.0.weight")
        block.ff.layers[0].bias = assign(block.ff.layers[0].bias, mlp["c_fc"]["b"],
                                         f"{name}.ff.layers.0.bias")
        block.ff.layers[2].weight = assign(block.ff.layers[2].weight, mlp["c_proj"]["w"].T,
                                           f"{name}.ff.layers.2.weight")
        block.ff.layers[2].bias = assign(block.ff.layers[2].bias, mlp["c_proj"]["b"],
                                         f"{name}.ff.layers.2.bias")

        block.norm1.scale = assign(block.norm1.scale, block_params["ln_1"]["g"], f"{name}.norm1.scale")
        block.norm1.shift = assign(block.norm1.shift, block_params["ln_1"]["b"], f"{name}.norm1.shift")
        block.norm2.scale = assign(block.norm2.scale, block_params["ln_2"]["g"], f"{name}.norm2.scale")
        block.norm2.shift = assign(block.norm2.shift, block_params["ln_2"]["b"], f"{name}.norm2.shift")

    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"], "final_norm.scale")
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"], "final_norm.shift")
    # GPT-2 ties the output layer to the token embedding (beyond the book: a model
    # exported by --export-hf with a head of its own brings it as lm_head)
    gpt.out_head.weight = assign(gpt.out_head.weight, params.get("lm_head", params["wte"]),
                                 "out_head.weight")


# ---- Beyond the book: downloading the release, each file checked ----

def download_gpt2(model_size, models_dir, base_urls=BASE_URLS):
    """The seven files of OpenAI's release in models_dir/model_size (that folder)."""
    if model_size not in ALLOWED_SIZES:
        raise ValueError(f"Unknown GPT-2 model size {model_size!r}; "
                         f"the sizes are {', '.join(ALLOWED_SIZES)}.")
    model_dir = Path(models_dir) / model_size
    for filename in FILENAMES:
        try:
            fetch_gpt2_file(model_dir / filename, model_size, base_urls)
        except DownloadError as err:  # offline, say: every file still needed, and a way around
            missing = [n for n in FILENAMES if not (model_dir / n).exists()]
            raise DownloadError(
                f"{err}\nGPT-2 {model_size} needs these {len(missing)} files of OpenAI's release "
                f"in {model_dir}: {', '.join(missing)}. Without them, ch06_classify.py and "
                "ch07_instruct.py run with --no-pretrained (random weights) or --init-from "
                "(a model of yours).") from None
    # Beyond the book: a file is used only if it is whole. A damaged one (an error
    # page saved as JSON, a cut download) is moved aside and fetched once more.
    for filename in CHECKED_IN_ORDER:
        problem = gpt2_file_problem(model_dir / filename)
        if problem:
            path = model_dir / filename
            fetch_again(path, problem, lambda: fetch_gpt2_file(path, model_size, base_urls),
                        gpt2_file_problem, gpt2_advice(path))
    return model_dir


def gpt2_advice(path):
    """What to do when a file of GPT-2's is damaged also when downloaded again."""
    return f"Try later, another --base-url, or delete {path.parent} and download again."


def fetch_gpt2_file(path, model_size, base_urls):
    urls = [f"{base.rstrip('/')}/{model_size}/{path.name}" for base in base_urls]
    download_file(urls[0], path, backup_urls=urls[1:])


DATA_FILE = "model.ckpt.data-00000-of-00001"
# The index first: hparams.json is checked against it, and the data file's size
# follows from it. The data file's bytes are checked as they are read (their CRCs).
CHECKED_IN_ORDER = ("checkpoint", "encoder.json", "vocab.bpe", "model.ckpt.index", "hparams.json",
                    DATA_FILE)
HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def gpt2_file_problem(path):
    """What is wrong with a downloaded GPT-2 file, or None when it is whole."""
    name = path.name
    try:
        if name == "hparams.json":
            return hparams_problem(json.loads(path.read_text(encoding="utf-8")), path)
        if name == "encoder.json":
            json.loads(path.read_text(encoding="utf-8"))
        elif name == "vocab.bpe" and not path.read_text(encoding="utf-8").startswith("#version"):
            return "not a BPE merges file"
        elif name == "checkpoint" and "model_checkpoint_path" not in path.read_text(
                encoding="utf-8"):
            return "it names no checkpoint"
        elif name == "model.ckpt.index":
            list_tf_variables(path.with_suffix(""))
        elif name.startswith("model.ckpt.data"):
            entries, _ = tf_index(path.with_name("model.ckpt"))
            expected = max(f.get(4, [0])[0] + f.get(5, [0])[0] for f in entries.values())
            if path.stat().st_size != expected:
                return f"{path.stat().st_size:,} bytes where its index says {expected:,}"
    except (ValueError, UnicodeDecodeError) as err:
        return str(err).split(";")[0]
    return None


def hparams_problem(hparams, path):
    """What hparams.json gets wrong: a missing number, or one the checkpoint beside
    it (its index, checked first) contradicts; None when it fits."""
    if not isinstance(hparams, dict):
        return "not a JSON object"
    missing = [k for k in HPARAMS if not isinstance(hparams.get(k), int) or hparams[k] < 1]
    if missing:
        return f"no whole number for {', '.join(missing)}"
    prefix = path.with_name("model.ckpt")
    if not Path(f"{prefix}.index").is_file():
        return None
    shapes = dict(list_tf_variables(prefix))
    held = {"n_layer": len({n.split("/")[1] for n in shapes if re.match(r"model/h\d+/", n)}),
            "n_vocab": shapes.get("model/wte", [None])[0],
            "n_embd": shapes.get("model/wte", [None, None])[-1],
            "n_ctx": shapes.get("model/wpe", [None])[0]}
    wrong = [f"{k} {hparams[k]} where the checkpoint holds {v}" for k, v in held.items()
             if hparams[k] != v]
    return f"it says {'; '.join(wrong)}" if wrong else None


# ---- Beyond the book: reading OpenAI's checkpoint without TensorFlow ----
# A TensorFlow checkpoint is two files. PREFIX.index is a sorted table in
# LevelDB's format: tensor name -> a BundleEntryProto (dtype, shape, shard,
# offset, size, CRC-32C). PREFIX.data-00000-of-00001 holds each tensor's raw
# little-endian bytes. Reading them needs only numpy, so GPT-2 loads on any
# Python, TensorFlow or not.

TF_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 9: "<i8", 19: "<f2"}  # DataType enum -> numpy
TABLE_MAGIC = 0xdb4775248b80fb57  # the last 8 bytes of every table file


class DamagedCheckpoint(ValueError):
    """A tensor of the checkpoint fails its checksum, or its bytes are missing."""


def checkpoint_functions(ckpt_path):
    """(list_variables, load_variable): TensorFlow's where it is installed, else
    this file's reader, which returns the same arrays, bit for bit. Both verify
    every tensor's checksum, and both report damage as DamagedCheckpoint."""
    try:
        import tensorflow as tf
    except ImportError:
        say_once("TensorFlow is not installed: reading the checkpoint with ch05_load_gpt2.py's "
                 "own reader (every tensor's checksum is verified).")
        return list_tf_variables, load_tf_variable
    say_once("Reading the checkpoint with TensorFlow.")

    def load_variable(ckpt_path, name):
        try:
            return tf.train.load_variable(ckpt_path, name)
        except tf.errors.OpError as err:  # e.g. "Checksum does not match: stored ..."
            raise DamagedCheckpoint(f"{name}: {err.message.splitlines()[0][:200]}") from None
    return tf.train.list_variables, load_variable


@functools.cache
def say_once(message):
    print(message)


def latest_checkpoint(model_dir):
    """The checkpoint prefix that model_dir/checkpoint names (as tf.train.latest_checkpoint
    returns it), or None."""
    path = Path(model_dir) / "checkpoint"
    if not path.is_file():
        return None
    found = re.search(r'^model_checkpoint_path:\s*"(.*)"', path.read_text(encoding="utf-8"), re.M)
    if not found:
        return None
    prefix = Path(found.group(1))
    prefix = prefix if prefix.is_absolute() else Path(model_dir) / prefix
    return str(prefix) if Path(f"{prefix}.index").is_file() else None


CRC32C_TABLE = np.arange(256, dtype=np.uint32)
for _ in range(8):  # the reflected Castagnoli polynomial, one bit at a time
    CRC32C_TABLE = (CRC32C_TABLE >> 1) ^ (np.uint32(0x82F63B78) * (CRC32C_TABLE & 1))
CRC32C_LIST = CRC32C_TABLE.tolist()


def crc32c(data, lanes=1 << 14):
    """The CRC-32C of `data` (bytes). numpy runs `lanes` equal pieces side by
    side, each from a zero register; then each piece's register joins the
    running one through the linear map "feed n zero bytes" (crc(A+B) =
    zeros_n(crc(A)) ^ crc0(B)); a short tail goes byte by byte."""
    data = np.frombuffer(data, dtype=np.uint8)
    n = len(data) // lanes
    crc = 0xFFFFFFFF
    if n:
        pieces = data[:n * lanes].reshape(lanes, n)
        regs = np.zeros(lanes, dtype=np.uint32)
        for j in range(n):
            regs = CRC32C_TABLE[(regs ^ pieces[:, j]) & 0xFF] ^ (regs >> 8)
        zeros = _zero_bytes_map(n)
        for reg in regs.tolist():
            crc = (zeros[0][crc & 0xFF] ^ zeros[1][(crc >> 8) & 0xFF] ^
                   zeros[2][(crc >> 16) & 0xFF] ^ zeros[3][crc >> 24] ^ reg)
    for byte in data[n * lanes:].tolist():
        crc = CRC32C_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _zero_bytes_map(n):
    """The map "feed n zero bytes" on a CRC register, as four 256-entry tables,
    one per register byte (the map is linear: the images of the 32 bits suffice)."""
    images = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for _ in range(n):
        images = CRC32C_TABLE[images & 0xFF] ^ (images >> 8)
    values, tables = np.arange(256), []
    for byte in range(4):
        table = np.zeros(256, dtype=np.uint32)
        for bit in range(8):
            table ^= np.where((values >> bit) & 1, images[8 * byte + bit], 0).astype(np.uint32)
        tables.append(table.tolist())
    return tables


def unmask_crc(masked):
    """TensorFlow stores CRCs masked (rotated and offset), as LevelDB does."""
    rotated = (masked - 0xa282ead8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def _varint(buf, pos):
    """The varint (protobuf's and LevelDB's) at buf[pos]: (value, position after it)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(message):
    """A protobuf message as {field number: [values]}: varints as ints, others as bytes."""
    fields, pos = {}, 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
            value, pos = message[pos:pos + size], pos + size
        elif wire == 2:  # length-delimited: bytes, strings, nested messages
            size, pos = _varint(message, pos)
            value, pos = message[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by checkpoints")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def _table_block(data, handle, source):
    """The (key, value) entries of the table block that `handle` (offset and size,
    two varints) points to, after checking the block's checksum."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    block, trailer = data[offset:offset + size], data[offset + size:offset + size + 5]
    if len(trailer) != 5 or trailer[0] != 0:  # 0: not compressed, as TensorFlow writes it
        raise ValueError(f"{source} is damaged or incomplete (a table block is cut short).")
    if unmask_crc(int.from_bytes(trailer[1:], "little")) != crc32c(data[offset:offset + size + 1]):
        raise ValueError(f"{source} is damaged: a table block fails its checksum.")
    restarts = int.from_bytes(block[-4:], "little")
    end, pos, key, entries = len(block) - 4 * (restarts + 1), 0, b"", []
    while pos < end:  # each key shares a prefix with the previous one
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_size]))
        pos += value_size
    return entries


@functools.lru_cache(maxsize=4)
def _tf_index(prefix, mtime_ns):
    """{tensor name: its BundleEntryProto's fields} and the number of data shards."""
    path = Path(f"{prefix}.index")
    data = path.read_bytes()
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise ValueError(f"{path} is not a complete TensorFlow checkpoint index; delete it to "
                         "download it again.")
    footer = data[-48:]  # two block handles (the metaindex's, the index's), padding, magic
    _, pos = _varint(footer, _varint(footer, 0)[1])
    entries, num_shards = {}, 1
    for _, handle in _table_block(data, footer[pos:], path):
        for key, value in _table_block(data, handle, path):
            fields = _fields(value)
            if not key:  # the empty key holds the BundleHeaderProto
                num_shards = fields.get(1, [1])[0]
                if fields.get(2, [0])[0] != 0:
                    raise ValueError(f"{path} holds big-endian tensors, which this reader "
                                     "does not read; install TensorFlow to load it.")
            else:
                entries[key.decode("utf-8")] = fields
    return entries, num_shards


def tf_index(ckpt_path):
    """The parsed index of a checkpoint, read again only when its file changes."""
    return _tf_index(str(ckpt_path), Path(f"{ckpt_path}.index").stat().st_mtime_ns)


def list_tf_variables(ckpt_path):
    """[(name, shape)] of a checkpoint, sorted by name, as tf.train.list_variables."""
    entries, _ = tf_index(ckpt_path)
    return [(name, _shape(fields)) for name, fields in sorted(entries.items())]


def _shape(fields):
    shape = _fields(fields[2][0]) if 2 in fields else {}  # TensorShapeProto: dim = 2
    return [_fields(dim).get(1, [0])[0] for dim in shape.get(2, [])]  # Dim: size = 1


def load_tf_variable(ckpt_path, name):
    """One tensor of a checkpoint as a numpy array, as tf.train.load_variable
    returns it; a tensor whose bytes fail their CRC-32C is refused."""
    entries, num_shards = tf_index(ckpt_path)
    fields = entries[name]
    dtype = fields.get(1, [0])[0]
    if dtype not in TF_DTYPES or 7 in fields:  # 7: a tensor saved in slices
        raise ValueError(f"{name}: this reader reads whole tensors of types {sorted(TF_DTYPES)} "
                         f"(TensorFlow's DataType numbers), not type {dtype}; install TensorFlow.")
    shard, offset, size = (fields.get(k, [0])[0] for k in (3, 4, 5))
    data_path = Path(f"{ckpt_path}.data-{shard:05d}-of-{num_shards:05d}")
    raw = bytearray(size)  # writable, as TensorFlow's arrays are
    with open(data_path, "rb") as f:
        f.seek(offset)
        got = f.readinto(raw)
    if got != size:
        raise DamagedCheckpoint(f"{name}: {data_path.name} is shorter than its index says")
    if 6 in fields and unmask_crc(int.from_bytes(fields[6][0], "little")) != crc32c(raw):
        raise DamagedCheckpoint(f"{name} fails its checksum (CRC-32C)")
    return np.frombuffer(raw, dtype=TF_DTYPES[dtype]).reshape(_shape(fields))


# ---- Beyond the book: convert once, then load offline ----

def config_from_settings(settings, drop_rate=GPT_CONFIG_124M["drop_rate"]):
    """Our config dict from GPT-2's hparams.json (GPT-2 has biases in q, k, v)."""
    return {"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"],
            "emb_dim": settings["n_embd"], "n_heads": settings["n_head"],
            "n_layers": settings["n_layer"], "drop_rate": drop_rate, "qkv_bias": True}


def load_gpt2_model(model_size="124M", models_dir="gpt2", drop_rate=0.0, base_urls=BASE_URLS,
                    source=None, hf_file=None):
    """(GPTModel with GPT-2's weights in eval mode, its config).

    source "openai": OpenAI's checkpoint, from base_urls in turn. The first call
    downloads and converts it and saves the result as models_dir/model_size/model.pth;
    later calls load that file and need neither TensorFlow nor the network.
    source "hf": Hugging Face's model.safetensors (hf_file, else downloaded into
    models_dir/model_size), read as it is. source None: the weights already there,
    else OpenAI's files, else Hugging Face's. One line says which served.
    """
    model_dir, openai_failed = Path(models_dir) / model_size, None
    if hf_file is None and source != "hf":
        found = converted_gpt2(model_dir, drop_rate)
        if found:
            print(f"GPT-2 {model_size}: OpenAI's weights as converted earlier "
                  f"({model_dir / 'model.pth'}).")
            return found
        if source == "openai" or not (model_dir / HF_FILE).is_file():
            try:
                return convert_gpt2(model_size, models_dir, drop_rate, base_urls)
            except DownloadError as err:
                if source == "openai":
                    raise
                openai_failed = err
                print(f"GPT-2 {model_size}: OpenAI's server and the book's backup did not serve "
                      "it; trying Hugging Face.")
    try:
        return load_hf_gpt2(model_size, models_dir, drop_rate, hf_file)
    except DownloadError as err:
        if openai_failed:
            raise DownloadError(f"{openai_failed}\nNor from Hugging Face: {err}") from None
        raise


def converted_gpt2(model_dir, drop_rate):
    """(model, cfg) from model_dir/model.pth converted earlier, or None; one that
    does not fit its hparams.json is moved aside."""
    pth, hparams = model_dir / "model.pth", model_dir / "hparams.json"
    if not (pth.exists() and hparams.exists() and gpt2_file_problem(hparams) is None):
        return None
    cfg = config_from_settings(json.loads(hparams.read_text(encoding="utf-8")), drop_rate)
    state_dict, problem = read_converted_model(pth, cfg)
    if problem is None:
        return build_lean(lambda: GPTModel(cfg), state_dict, source=str(pth)).eval(), cfg
    print(f"{pth} {problem}; moved aside to {move_aside(pth).name}, converting again.")
    return None


def convert_gpt2(model_size, models_dir, drop_rate, base_urls):
    """OpenAI's checkpoint downloaded, loaded as the book does, and saved as model.pth."""
    settings, params = download_and_load_gpt2(model_size, models_dir, base_urls)
    cfg = config_from_settings(settings, drop_rate)
    model = GPTModel(cfg)
    load_weights_into_gpt(model, params, free_params=True)
    pth = Path(models_dir) / model_size / "model.pth"
    save_checkpoint(pth, model_file("gpt2", model.state_dict(), {**cfg, "drop_rate": 0.0},
                                    {"model_size": model_size},
                                    what="GPT-2's weights converted by ch05_load_gpt2.py"))
    print(f"GPT-2 {model_size}: OpenAI's checkpoint, converted and saved to {pth}; later runs "
          "load it offline.")
    return model.eval(), cfg


def read_converted_model(pth, cfg):
    """(model.pth's state dict, None), or (None, what keeps it from being GPT-2 as
    hparams.json describes it)."""
    try:
        saved = load_checkpoint(pth, mmap=True, kinds=("gpt2",), wanted="GPT-2's converted "
                                "weights", earlier=lambda s: "gpt2" if s["config"] is None
                                else None)  # earlier, model.pth was a bare state dict
    except ValueError as err:
        if str(err).startswith("Could not read"):
            return None, "is damaged (not a whole PyTorch file)"
        what = str(err)[len(str(pth)) + 1:].rstrip(".")  # the message less the path
        return None, f"is not GPT-2's converted weights ({what})"
    wanted = {k: cfg[k] for k in ("n_layers", "vocab_size", "emb_dim", "context_length")}
    difference = architecture_difference(architecture_of(saved["model"]), wanted)
    if difference:
        return None, f"holds a model with {difference[0]}, where hparams.json says {difference[1]}"
    return saved["model"], None


# ---- Beyond the book: Hugging Face's safetensors, both ways ----
# Hugging Face's GPT-2 (openai-community/gpt2 and its larger siblings) holds
# OpenAI's arrays under other names, in one safetensors file: a JSON header of
# names, dtypes, shapes and byte ranges, then the raw bytes. Its Conv1D layers
# keep OpenAI's (in, out) weights, so a rename is the whole mapping; the book's
# load_weights_into_gpt does the rest (splitting c_attn, transposing).

HF_NAMES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
HF_FILE = "model.safetensors"
# hparams.json of each of OpenAI's releases (Hugging Face's file comes without one)
GPT2_HPARAMS = {size: {"n_vocab": 50257, "n_ctx": 1024, "n_embd": MODEL_CONFIGS[size]["emb_dim"],
                       "n_head": MODEL_CONFIGS[size]["n_heads"],
                       "n_layer": MODEL_CONFIGS[size]["n_layers"]} for size in ALLOWED_SIZES}
HF_DTYPES = {"F64", "F32", "F16", "BF16"}  # floats, read as float32
# Bytes per element of each dtype the safetensors format names
SAFETENSORS_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                     "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
                     "U8": 1, "BOOL": 1}


def gpt2_variable_names(n_layer):
    """[(OpenAI's name, Hugging Face's name)] of GPT-2's variables, in OpenAI's order
    within a block. The one mapping both ways: loading and --export-hf."""
    blocks = [(f"model/h{i}/{layer}/{leaf}",
               f"h.{i}.{layer.replace('/', '.')}.{'bias' if leaf == 'b' else 'weight'}")
              for i in range(n_layer)
              for layer in ("ln_1", "attn/c_attn", "attn/c_proj", "ln_2", "mlp/c_fc", "mlp/c_proj")
              for leaf in ("gb" if layer.startswith("ln") else "wb")]
    return [("model/wte", "wte.weight"), ("model/wpe", "wpe.weight"), *blocks,
            ("model/ln_f/g", "ln_f.weight"), ("model/ln_f/b", "ln_f.bias")]


def hf_shapes(settings):
    """{Hugging Face name: shape} of GPT-2 as hparams.json's numbers describe it."""
    d, v = settings["n_embd"], settings["n_vocab"]
    by_ending = {"wte.weight": (v, d), "wpe.weight": (settings["n_ctx"], d),
                 "c_attn.weight": (d, 3 * d), "c_attn.bias": (3 * d,),
                 "attn.c_proj.weight": (d, d), "c_fc.weight": (d, 4 * d), "c_fc.bias": (4 * d,),
                 "mlp.c_proj.weight": (4 * d, d)}  # the rest: layer norms and biases, (d,)
    return {hf: next((shape for end, shape in by_ending.items() if hf.endswith(end)), (d,))
            for _, hf in gpt2_variable_names(settings["n_layer"])}


def safetensors_header(path):
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file ("transformer."
    dropped from names, as GPT2LMHeadModel.save_pretrained writes them), checked
    to describe exactly the bytes the file holds; ValueError says what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or not 2 <= n <= min(size - 8, 100_000_000):
            raise ValueError("not a safetensors file")
        try:
            header = json.loads(f.read(n))
            tensors = {k.removeprefix("transformer."): {**v, "key": k} for k, v in header.items()
                       if k != "__metadata__"}
            for v in tensors.values():
                v["data_offsets"] = [int(x) for x in v["data_offsets"]]
                if not all(isinstance(d, int) and d >= 0 for d in v["shape"]):
                    raise TypeError("a shape that is no list of sizes")
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError("not a safetensors file (its header is not one)") from None
    if size != 8 + n + end:
        raise ValueError(f"{size:,} bytes where its header says {8 + n + end:,} (a cut "
                         "download?)")
    for name, v in tensors.items():
        if v["dtype"] not in SAFETENSORS_SIZES:
            raise ValueError(f"not a safetensors file (its {name} has the unknown dtype "
                             f"{v['dtype']!r})")
        begin, stop = v["data_offsets"]
        needed = math.prod(v["shape"]) * SAFETENSORS_SIZES[v["dtype"]]
        if stop - begin != needed:
            raise ValueError(f"damaged: its header gives {name} {stop - begin:,} bytes, where "
                             f"its shape {v['shape']} of {v['dtype']} needs {needed:,}")
    return tensors


def hf_file_problem(path, settings):
    """What keeps `path` from being Hugging Face's GPT-2 as `settings` (hparams.json's
    numbers) describe it, or None when it is whole and fits."""
    try:
        header = safetensors_header(path)
    except ValueError as err:
        return str(err)
    shapes = {name: tuple(v["shape"]) for name, v in header.items()}
    held = {"n_layers": hf_layer_count(shapes),
            "vocab_size": shapes.get("wte.weight", (None, None))[0],
            "emb_dim": shapes.get("wte.weight", (None, None))[-1]}
    wanted = config_from_settings(settings)
    difference = architecture_difference(held, {k: wanted[k] for k in held})
    if difference:
        same = [size for size, h in GPT2_HPARAMS.items()
                if (h["n_embd"], h["n_layer"]) == (held["emb_dim"], held["n_layers"])]
        return (f"holds a model with {difference[0]}, not {difference[1]}"
                + (f": GPT-2 {same[0]}, pass --model-size {same[0]}" if same else ""))
    for name, shape in hf_shapes(settings).items():
        if name not in shapes:
            return f"has no tensor {name}"
        if shapes[name] != shape:
            return f"has {name} of shape {list(shapes[name])} where GPT-2 has {list(shape)}"
        if header[name]["dtype"] not in HF_DTYPES:
            return f"holds {name} as {header[name]['dtype']}, not as floating-point numbers"
    if "lm_head.weight" in shapes and shapes["lm_head.weight"] != shapes["wte.weight"]:
        return f"has lm_head.weight of shape {list(shapes['lm_head.weight'])}, not wte's"
    return None


def hf_layer_count(names):
    """How many transformer blocks (h.0. to h.N.) Hugging Face's names hold."""
    return len({n.split(".")[1] for n in names if re.match(r"h\.\d+\.", n)})


@functools.cache
def _hf_variables(path, mtime_ns):
    header = safetensors_header(Path(path))
    names = [*gpt2_variable_names(hf_layer_count(header)), ("model/lm_head", "lm_head.weight")]
    return {tf: header[hf] for tf, hf in names if hf in header}


def hf_variables(path):
    """{OpenAI's name: its entry in the header} of a Hugging Face GPT-2 file; its own
    output layer, if any, as model/lm_head. Read again only when the file changes."""
    return _hf_variables(str(path), Path(path).stat().st_mtime_ns)


def list_hf_variables(path):
    """[(OpenAI's name, shape)], as list_tf_variables gives them."""
    return [(name, entry["shape"]) for name, entry in sorted(hf_variables(path).items())]


def load_hf_variable(path, name):
    """One of OpenAI's variables from Hugging Face's file (memory-mapped), as float32."""
    from safetensors import safe_open  # only Hugging Face's files need it
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(hf_variables(path)[name]["key"]).float().numpy()


def hf_url(model_size):
    return f"{hf_endpoint()}/openai-community/{HF_NAMES[model_size]}/resolve/main/{HF_FILE}"


def find_hf_file(path):
    """--hf-file: a model.safetensors, a folder holding one, or a Hugging Face cache
    folder (models--openai-community--gpt2) whose newest snapshot holds one."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob(f"snapshots/*/{HF_FILE}"), key=lambda p: p.stat().st_mtime)
        found = [path / HF_FILE] if (path / HF_FILE).is_file() else found[-1:]
        if not found:
            raise FileNotFoundError(f"--hf-file {path}: no {HF_FILE} there, nor in its "
                                    "snapshots/*/ (as in a Hugging Face cache folder).")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"--hf-file {path}: no such file.")
    return path


def load_hf_gpt2(model_size="124M", models_dir="gpt2", drop_rate=0.0, hf_file=None):
    """(GPTModel in eval mode, its config) from Hugging Face's model.safetensors:
    hf_file, or the file downloaded (once) into models_dir/model_size."""
    settings = GPT2_HPARAMS[model_size]
    if hf_file is not None:
        path = find_hf_file(hf_file)
        problem = hf_file_problem(path, settings)
        if problem:
            raise ValueError(f"--hf-file {path} is not GPT-2 {model_size}'s safetensors file: "
                             f"{problem}.")
        print(f"GPT-2 {model_size}: Hugging Face's weights from {path}.")
    else:
        path = Path(models_dir) / model_size / HF_FILE
        # an error page, a cut file: as with OpenAI's files, fetched once more
        download_checked(hf_url(model_size), path, lambda p: hf_file_problem(p, settings),
                         gpt2_advice(path))
        print(f"GPT-2 {model_size}: Hugging Face's model.safetensors ({path}).")
    cfg = config_from_settings(settings, drop_rate)
    model = GPTModel(cfg)
    params = load_gpt2_params_from_tf_ckpt(path, settings, list_hf_variables, load_hf_variable)
    load_weights_into_gpt(model, params, free_params=True)
    return model.eval(), cfg


def openai_variables_of(state_dict, n_layers):
    """load_weights_into_gpt undone: OpenAI's variables {name: float32 tensor},
    weights as (in, out), from a GPTModel state dict. A model built with
    qkv_bias false gets zero query, key and value biases (GPT-2 always has them)."""
    sd = {k: v.detach().float() for k, v in state_dict.items()}
    d = sd["tok_emb.weight"].shape[1]
    out = {"model/wte": sd["tok_emb.weight"], "model/wpe": sd["pos_emb.weight"],
           "model/ln_f/g": sd["final_norm.scale"], "model/ln_f/b": sd["final_norm.shift"]}
    for i in range(n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"model/h{i}/"
        qkv = [f"{ours}att.W_{n}" for n in ("query", "key", "value")]
        out[theirs + "attn/c_attn/w"] = torch.cat([sd[n + ".weight"] for n in qkv]).T
        out[theirs + "attn/c_attn/b"] = torch.cat([sd.get(n + ".bias", torch.zeros(d))
                                                   for n in qkv])
        for layer, linear in (("attn/c_proj", "att.out_proj"), ("mlp/c_fc", "ff.layers.0"),
                              ("mlp/c_proj", "ff.layers.2")):
            out[f"{theirs}{layer}/w"] = sd[f"{ours}{linear}.weight"].T
            out[f"{theirs}{layer}/b"] = sd[f"{ours}{linear}.bias"]
        for layer, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{theirs}{layer}/g"] = sd[f"{ours}{norm}.scale"]
            out[f"{theirs}{layer}/b"] = sd[f"{ours}{norm}.shift"]
    return out


def hf_config(cfg, tied):
    """config.json of a Hugging Face GPT-2 with our model's dimensions."""
    drop = GPT_CONFIG_124M["drop_rate"]  # GPT-2's, for finetuning there
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg["vocab_size"], "n_positions": cfg["context_length"],
            "n_ctx": cfg["context_length"],  # llama.cpp's converter reads n_ctx
            "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"], "n_head": cfg["n_heads"],
            "n_inner": None, "activation_function": "gelu_new",  # the book's tanh GELU
            "layer_norm_epsilon": 1e-5, "resid_pdrop": drop, "embd_pdrop": drop,
            "attn_pdrop": drop, "initializer_range": 0.02, "scale_attn_weights": True,
            "use_cache": True, "bos_token_id": 50256, "eos_token_id": 50256,
            "tie_word_embeddings": tied, "torch_dtype": "float32"}


def export_hf(checkpoint, out_dir, overwrite=False, models_dir="gpt2"):
    """Write a text model of chapters 5 and 7 (a checkpoint.pt, GPT-2's model.pth, an
    instruction or DPO model, LoRA merged in) as a Hugging Face GPT-2 folder, which
    GPT2LMHeadModel.from_pretrained loads; returns its config.json."""
    out_dir = Path(out_dir)
    check_export_folder(out_dir, overwrite)
    model, cfg, _, _ = load_text_model(
        checkpoint, "cpu", flag="--from", why_not=" (Hugging Face's GPT2LMHeadModel has no "
        "place for a classifier's head)")
    if cfg["vocab_size"] < 50257:
        raise ValueError(f"{checkpoint} holds a model with a vocabulary of {cfg['vocab_size']:,} "
                         "tokens; the export carries GPT-2's tokenizer, which needs 50,257.")
    return write_hf_folder(model.state_dict(), cfg, out_dir, models_dir, overwrite)


# A folder written whole or not at all, as atomic_path writes a file

@contextlib.contextmanager
def atomic_folder(path, replaces=()):
    """atomic_path for a folder: the block fills a temporary folder beside `path`,
    which then takes its place. A folder already there is replaced only when it is
    empty or holds nothing but files named in `replaces` (an earlier run's output),
    and only once the new one is whole; a failed block leaves it as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_folders(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                                dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as mkdir would make it, not mkdtemp's private 0o700
    try:
        yield tmp
        for file in tmp.iterdir():  # as open() makes files (some writers make theirs private)
            file.chmod(0o666 & ~umask)
        problem = folder_in_the_way(path, replaces)
        if problem:
            raise FileExistsError(f"{path} appeared while it was being written (another run?) "
                                  f"and {problem}; it is kept as it is.")
        old = move_aside(path, ".old.tmp") if path.exists() else None
        tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def folder_in_the_way(path, replaces=()):
    """Why `path` may not be replaced by a folder (None: it is absent, empty, or
    holds only files named in `replaces`): a file, or what else the folder holds."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        return "is a file, not a folder"
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                    if not (p.name in replaces and p.is_file()))
    if not others:
        return None
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return f"holds files this command did not write ({shown})"


def remove_abandoned_folders(path):
    """Remove temporary folders of `path` (atomic_folder's) whose writer is gone: a
    killed run's leftovers. A writer still running keeps its own."""
    for tmp in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.*-*.tmp"):
        pid = tmp.name[len(Path(path).name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def process_running(pid):
    """Whether a process `pid` runs on this machine (on Windows, where no signal
    asks it without harm, every process counts as running)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


# What an export writes, and all that --overwrite replaces
EXPORT_FILES = (HF_FILE, "config.json", "generation_config.json", "tokenizer_config.json",
                "vocab.json", "merges.txt")


def check_export_folder(out_dir, overwrite):
    """Before the work: --export-hf may write out_dir. --overwrite replaces an
    earlier export only, never a folder holding anything else."""
    problem = folder_in_the_way(out_dir, EXPORT_FILES)
    if problem:
        raise FileExistsError(f"--export-hf {out_dir} {problem}: name a new folder" +
                              ("." if out_dir.is_file() else ", or one that holds an earlier "
                               "export, which --overwrite replaces."))
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"--export-hf {out_dir} holds an earlier export. Replace it "
                              "with --overwrite, or name another folder.")
    check_writable(out_dir.parent, "--export-hf")


def save_file(tensors, path, metadata=None):
    """safetensors' writer, imported where it is used: only --export-hf needs it."""
    from safetensors.torch import save_file as write_safetensors
    write_safetensors(tensors, path, metadata=metadata)


def write_hf_folder(state_dict, cfg, out_dir, models_dir="gpt2", overwrite=False):
    """A GPTModel's state dict and config as a Hugging Face GPT-2 folder, written
    whole or not at all; returns its config.json."""
    variables = openai_variables_of(state_dict, cfg["n_layers"])
    tensors = {f"transformer.{hf}": variables[tf].contiguous()
               for tf, hf in gpt2_variable_names(cfg["n_layers"])}
    tied = torch.equal(state_dict["out_head.weight"], state_dict["tok_emb.weight"])
    if not tied:  # the book's models have their own output layer
        tensors["lm_head.weight"] = state_dict["out_head.weight"].float().contiguous()
    config = hf_config(cfg, tied)
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT,
                        "unk_token": EOT, "model_max_length": cfg["context_length"],
                        "add_prefix_space": False}
    files = {"config.json": json.dumps(config, indent=2),
             "generation_config.json": json.dumps({"bos_token_id": 50256,
                                                   "eos_token_id": 50256}, indent=2),
             "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
             **hf_vocabulary_files(bpe_tokenizer(models_dir))}
    with atomic_folder(out_dir, replaces=EXPORT_FILES if overwrite else ()) as tmp:
        save_file(tensors, tmp / HF_FILE, metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return config


# ---- Beyond the book: a look inside ----

# Where each of OpenAI's variables goes in our model ("#" is the block number)
TF_TO_OURS = {
    "wte": "tok_emb.weight, and out_head.weight (tied)",
    "wpe": "pos_emb.weight",
    "h#/attn/c_attn/w": "trf_blocks.#.att.W_query/W_key/W_value.weight (split in 3, transposed)",
    "h#/attn/c_attn/b": "trf_blocks.#.att.W_query/W_key/W_value.bias (split in 3)",
    "h#/attn/c_proj/w": "trf_blocks.#.att.out_proj.weight (transposed)",
    "h#/attn/c_proj/b": "trf_blocks.#.att.out_proj.bias",
    "h#/mlp/c_fc/w": "trf_blocks.#.ff.layers.0.weight (transposed)",
    "h#/mlp/c_fc/b": "trf_blocks.#.ff.layers.0.bias",
    "h#/mlp/c_proj/w": "trf_blocks.#.ff.layers.2.weight (transposed)",
    "h#/mlp/c_proj/b": "trf_blocks.#.ff.layers.2.bias",
    "h#/ln_1/g": "trf_blocks.#.norm1.scale", "h#/ln_1/b": "trf_blocks.#.norm1.shift",
    "h#/ln_2/g": "trf_blocks.#.norm2.scale", "h#/ln_2/b": "trf_blocks.#.norm2.shift",
    "ln_f/g": "final_norm.scale", "ln_f/b": "final_norm.shift",
}


def inspect_checkpoint(model_dir):
    """Rows of (OpenAI variable, shape, where it goes in GPTModel), and the hparams."""
    model_dir = Path(model_dir)
    ckpt = latest_checkpoint(model_dir)
    if ckpt is None:
        raise FileNotFoundError(f"No TensorFlow checkpoint in {model_dir}; run once without "
                                "--inspect to download it.")
    rows = []
    list_variables, _ = checkpoint_functions(ckpt)
    for name, shape in list_variables(ckpt):
        short = name.split("/", 1)[1]
        block = short.split("/")[0][1:] if short.startswith("h") else None
        key = "h#" + short[len(block) + 1:] if block is not None else short
        target = TF_TO_OURS.get(key, "(not used)")
        rows.append((name, tuple(shape), target.replace("#", block or "#")))
    hparams = json.loads((model_dir / "hparams.json").read_text(encoding="utf-8"))
    return rows, hparams


def nearest_tokens(embeddings, vector, tokenizer, k=10, exclude=()):
    """The k tokens whose embeddings have the highest cosine similarity to `vector`."""
    sims = torch.nn.functional.cosine_similarity(embeddings, vector.unsqueeze(0), dim=-1)
    sims[list(exclude)] = -2.0  # below any cosine similarity
    top = torch.topk(sims, k)
    return [(tokenizer.decode([i]), round(s, 4)) for s, i in zip(top.values.tolist(),
                                                                 top.indices.tolist())]


def word_token(word, tokenizer):
    ids = tokenizer.encode(" " + word.strip())  # GPT-2's word tokens start with a space
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} GPT-2 tokens "
                         f"{[tokenizer.decode([i]) for i in ids]}; pick a word that is one token.")
    return ids[0]


# ---- Beyond the book: how good is a model (HellaSwag, LAMBADA, WikiText, your text) ----
# Zero-shot scores of any model this file loads, beside OpenAI GPT-2's published
# numbers. Every score is a cross-entropy of some tokens given the ones before
# them (continuation_losses), computed in batches, padded and masked.

# benchmark: (the file as it downloads, where it is published, its published SHA-256
# where one is on record; the others are checked by what they hold, see benchmark_data)
EVAL_FILES = {
    "hellaswag": ("hellaswag_val.jsonl",
                  "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                  "hellaswag_val.jsonl", None),
    "lambada": ("lambada_test.jsonl",
                "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
    "wikitext2": ("wikitext-2-raw-v1-test.parquet",
                  "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/"
                  "wikitext-2-raw-v1/test-00000-of-00001.parquet", None),
    "wikitext103": ("wikitext-103-raw-v1-test.parquet",
                    "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/"
                    "wikitext-103-raw-v1/test-00000-of-00001.parquet", None),
}
# Items in each benchmark file as published: fewer are a part, not compared as the whole
EVAL_ITEMS = {"hellaswag": 10042, "lambada": 5153}
# OpenAI GPT-2's published numbers with the same methods: (size, metric, value, source)
PUBLISHED = {
    "hellaswag": [("124M", "acc", 0.2859, "llm.c and build-nanogpt, completion style, zero-shot"),
                  ("124M", "acc_norm", 0.2955, "llm.c and build-nanogpt, completion style"),
                  ("1558M", "acc", 0.3842, "llm.c, completion style, zero-shot"),
                  ("1558M", "acc_norm", 0.4893, "llm.c, completion style, zero-shot")],
    # the harness's LAMBADA task of 2021 read OpenAI's file with this method
    "lambada": [("1558M", "acc", 0.5121, "EleutherAI's GPT-J model card, lm-evaluation-harness "
                                         "on OpenAI's file, zero-shot"),
                ("1558M", "ppl", 10.63, "EleutherAI's GPT-J model card, lm-evaluation-harness "
                                        "on OpenAI's file, zero-shot")],
    "wikitext2": [("774M", "ppl", 16.53, "Hugging Face, 'Perplexity of fixed-length models', "
                                         "stride 512 (19.64 at stride 1024)")],
}


class DamagedFile(ValueError):
    """A benchmark file that is not what its name says: a downloaded one is fetched again."""


def continuation_losses(model, pairs, device, context_length):
    """For each (prefix ids, continuation ids): (the summed cross-entropy of the
    continuation's tokens, their count, whether each was the greedy choice). A pair
    longer than the context keeps its last context_length + 1 tokens."""
    rows = []
    for prefix, continuation in pairs:
        ids = (prefix + continuation)[-(context_length + 1):]
        rows.append((ids, max(len(ids) - len(continuation), 1)))
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (ids, start) in enumerate(rows):
        n = len(ids) - 1  # target t is token t + 1: the continuation's from start - 1
        inputs[i, :n], targets[i, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        scored[i, start - 1:n] = True
    targets, scored = targets.to(device), scored.to(device)
    with torch.no_grad():  # on the device: only three numbers a row come back, not the logits
        logits = model(inputs.to(device)).float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                   reduction="none")
        greedy = (logits.argmax(-1) == targets) | ~scored
    return (losses * scored).sum(1).cpu(), scored.sum(1).cpu(), greedy.all(1).cpu()


def score_hellaswag(model, items, device, context_length, batch_items=4):
    """Per item (context, the 4 endings, the label): whether the lowest summed (acc)
    and the lowest mean (acc_norm) ending loss picks the label."""
    results = []
    for i in tqdm(range(0, len(items), batch_items), desc="HellaSwag", unit="batch",
                  leave=False):
        batch = items[i:i + batch_items]
        pairs = [(context, ending) for context, endings, _ in batch for ending in endings]
        sums, counts, _ = continuation_losses(model, pairs, device, context_length)
        for j, (_, _, label) in enumerate(batch):
            total, count = sums[4 * j:4 * j + 4], counts[4 * j:4 * j + 4]
            results.append({"acc": int(total.argmin()) == label,
                            "acc_norm": int((total / count).argmin()) == label,
                            "losses": total.tolist()})
    return results


def score_lambada(model, items, device, context_length, batch_items=16):
    """Per passage (context ids, target ids: the last word with its space): whether
    every target token is the greedy choice, and the target's summed loss."""
    results = []
    for i in tqdm(range(0, len(items), batch_items), desc="LAMBADA", unit="batch", leave=False):
        sums, _, greedy = continuation_losses(model, items[i:i + batch_items], device,
                                              context_length)
        results += [{"acc": bool(g), "loss": float(s)} for s, g in zip(sums, greedy)]
    return results


def sliding_windows(n_tokens, context_length, stride):
    """[(begin, end, first scored target)]: windows of the inputs ids[begin:end]
    (targets ids[begin + 1:end + 1]), `stride` apart, each token after the first
    scored once, in the first window that reaches it."""
    if not 0 < stride <= context_length:
        raise ValueError(f"--stride {stride}: give 1 to the context's {context_length} tokens.")
    windows, begin, scored_to = [], 0, 0  # targets ids[1..scored_to] are scored
    while scored_to < n_tokens - 1:
        end = min(begin + context_length, n_tokens - 1)
        windows.append((begin, end, scored_to))
        scored_to, begin = end, begin + stride
    return windows


def text_perplexity(model, ids, device, context_length, stride, tokenizer, batch_size=8):
    """{"tokens": scored, "ppl", "bpb"} of token ids, by sliding windows (each token
    with up to context_length tokens before it), and bits per byte of its text."""
    if len(ids) < 2:
        raise ValueError("The text has fewer than 2 tokens: nothing to score.")
    pairs = [(ids[begin:scored_to + 1], ids[scored_to + 1:end + 1])
             for begin, end, scored_to in sliding_windows(len(ids), context_length, stride)]
    total, count = 0.0, 0
    for i in tqdm(range(0, len(pairs), batch_size), desc="Perplexity", unit="batch",
                  leave=False):
        sums, counts, _ = continuation_losses(model, pairs[i:i + batch_size], device,
                                              context_length)
        total, count = total + float(sums.sum()), count + int(counts.sum())
    n_bytes = sum(len(tokenizer.decode_single_token_bytes(t)) for t in ids[1:])
    return {"tokens": count, "ppl": math.exp(total / count),
            "bpb": total / math.log(2) / n_bytes}


def hellaswag_items(path, tokenizer, limit=None):
    """(context ids, [4 ending ids], label) of hellaswag_val.jsonl's lines: each
    ending with a leading space, as the context would continue."""
    items = []
    for line, record in jsonl_lines(path, limit):
        try:
            endings, label = record["endings"], int(record["label"])
            context = tokenizer.encode(record["ctx"])
            if len(endings) != 4 or not 0 <= label < 4:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DamagedFile(f"{path}, line {line}: not a HellaSwag item (ctx, 4 endings and "
                              "a label 0-3).") from None
        items.append((context, [tokenizer.encode(" " + e) for e in endings], label))
    return items


def lambada_items(path, tokenizer, limit=None):
    """(context ids, last word ids with its space) of lambada_test.jsonl's passages."""
    items = []
    for line, record in jsonl_lines(path, limit):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            raise DamagedFile(f"{path}, line {line}: not a LAMBADA passage (a \"text\" of "
                              "several words).")
        context, word = text.strip().rsplit(" ", 1)
        items.append((tokenizer.encode(context), tokenizer.encode(" " + word)))
    return items


def jsonl_lines(path, limit=None):
    """(line number, JSON value) of a JSON-lines file, the first `limit` lines."""
    out = []
    for line, raw in enumerate(read_text(path).splitlines(), 1):
        if not raw.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append((line, json.loads(raw)))
        except json.JSONDecodeError as err:
            raise DamagedFile(f"{path}, line {line}: not JSON ({err.msg}).") from None
    if not out:
        raise DamagedFile(f"{path} holds no items.")
    return out


def wikitext(path):
    """WikiText's test split as one text: its Parquet rows joined, as published."""
    pq = parquet_module()
    try:
        return "".join(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    except Exception as err:  # pyarrow's own errors, of a file that is no Parquet
        raise DamagedFile(f"{path} is not WikiText's Parquet file ({type(err).__name__}).") \
            from None


def evaluate(model, cfg, names, settings, device, tokenizer):
    """{benchmark: its metrics} for `names`, and "text" for settings["eval_text"]."""
    ctx, results = cfg["context_length"], {}
    stride = settings["stride"] or ctx // 2
    for name in names:
        data = benchmark_data(name, settings, tokenizer)
        if name.startswith("wikitext"):
            data = tokenizer.encode(data, disallowed_special=())[:settings["limit"] and
                                                                 settings["limit"] * ctx]
        results[name] = benchmark_metrics(name, model, data, device, ctx, stride, tokenizer)
    if settings["eval_text"]:
        results["text"] = benchmark_metrics("text", model, text_ids(settings["eval_text"],
                                                                    tokenizer),
                                            device, ctx, stride, tokenizer)
    return results


def benchmark_metrics(name, model, data, device, context_length, stride, tokenizer):
    """One benchmark's metrics: HellaSwag's and LAMBADA's of their items, the
    perplexity and bits per byte of token ids for the others. The model is scored
    in eval mode, then left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        if name == "hellaswag":
            scored = score_hellaswag(model, data, device, context_length)
            return {"n": len(scored), "acc": sum(r["acc"] for r in scored) / len(scored),
                    "acc_norm": sum(r["acc_norm"] for r in scored) / len(scored)}
        if name == "lambada":
            scored = score_lambada(model, data, device, context_length)
            return {"n": len(scored), "acc": sum(r["acc"] for r in scored) / len(scored),
                    "ppl": math.exp(sum(r["loss"] for r in scored) / len(scored))}
        return text_perplexity(model, data, device, context_length, stride, tokenizer)
    finally:
        model.train(was_training)


def text_ids(path, tokenizer):
    """The token ids of a text file, or of a folder's text files joined by newlines."""
    files = collect_text_files([path])
    return tokenizer.encode("\n".join(read_text(f) for f in files), disallowed_special=())


def benchmark_data(name, settings, tokenizer):
    """The benchmark's items (WikiText: its text). A downloaded file that does not
    read as its benchmark (an error page, a cut file) is moved aside and fetched
    once more; one of --eval-data-dir is only named."""
    read = {"hellaswag": lambda p: hellaswag_items(p, tokenizer, settings["limit"]),
            "lambada": lambda p: lambada_items(p, tokenizer, settings["limit"])}.get(name, wikitext)
    path = eval_file(name, settings)
    try:
        return read(path)
    except DamagedFile as err:
        if settings["eval_data_dir"]:
            raise
        print(f"{err} Moved aside to {move_aside(path).name}; downloading it again.")
        return read(eval_file(name, settings))


def eval_file(name, settings):
    """The benchmark's file: in --eval-data-dir when given, else downloaded once."""
    filename, url, sha256 = EVAL_FILES[name]
    if settings["eval_data_dir"]:
        path = Path(settings["eval_data_dir"]) / filename
        if not path.is_file():
            raise FileNotFoundError(f"--eval-data-dir {settings['eval_data_dir']} has no "
                                    f"{filename} (the file {name} needs).")
        return path
    destination = Path(settings["data_dir"]) / filename
    if sha256 is None:
        return download_file(url, destination)
    return download_checked(url, destination, pinned(sha256))


def run_eval(settings, base_urls):
    """--eval and --eval-text: score the model, print the table, write the JSON."""
    if settings["json"]:
        check_output_file(settings["json"], settings["overwrite"], "--json")
    device = get_device(settings["device"])
    tokenizer = None
    if settings["from_file"]:  # a model with a tokenizer of its own is scored with it
        model, cfg, _, tokenizer = load_text_model(settings["from_file"], device,
                                                   own_tokenizer=True)
        source = Path(settings["from_file"])
    else:
        model, cfg = load_gpt2_model(settings["model_size"], settings["models_dir"],
                                     base_urls=base_urls, source=settings["source"],
                                     hf_file=settings["hf_file"])
        model.to(device)
        source = find_hf_file(settings["hf_file"]) if settings["hf_file"] else None
    tokenizer = tokenizer or bpe_tokenizer(settings["models_dir"])
    results = evaluate(model, cfg, settings["eval"], settings, device, tokenizer)
    size = min(GPT2_HPARAMS, key=lambda s: abs(GPT2_HPARAMS[s]["n_layer"] *
                                                GPT2_HPARAMS[s]["n_embd"] ** 2 -
                                                cfg["n_layers"] * cfg["emb_dim"] ** 2))
    print(eval_table(results, size, settings["limit"] is not None))
    if settings["json"]:
        used = [eval_file(n, settings) for n in settings["eval"]]
        used += collect_text_files([settings["eval_text"]]) if settings["eval_text"] else []
        report = {"results": results, "model": str(source or f"GPT-2 {settings['model_size']}"),
                  "model_sha256": sha256_of(source) if source else None,
                  "data_sha256": {str(p): sha256_of(p) for p in used},
                  "settings": {k: settings[k] for k in ("eval", "eval_text", "stride", "limit")}}
        write_text_atomic(settings["json"], json.dumps(report, indent=2))
        print(f"Wrote {settings['json']}")
    return results


def eval_table(results, size, limited):
    """The results beside OpenAI GPT-2's published numbers for the nearest size
    (`size`), where one was published with the same method."""
    lines = [f"{'benchmark':<12}{'metric':<10}{'this model':>12}  published (GPT-2 {size})"]
    for name, metrics in results.items():
        whole = not limited and metrics.get("n", EVAL_ITEMS.get(name)) == EVAL_ITEMS.get(name)
        for metric, value in metrics.items():
            if metric in ("n", "tokens"):
                continue
            known = [p for p in PUBLISHED.get(name, []) if p[:2] == (size, metric)]
            shown = f"{known[0][2]:.4g} ({known[0][3]})" if whole and known else ""
            lines.append(f"{name:<12}{metric:<10}" +
                         (f"{value:>12.4f}" if value < 1e6 else f"{value:>12.4g}") + f"  {shown}")
        if not whole and name in EVAL_ITEMS:
            lines.append(f"{'':<12}({metrics['n']:,} of the {EVAL_ITEMS[name]:,} items: not "
                         "compared with the published numbers of the whole)")
    return "\n".join(lines)


# ---- The demo ----

def main(args):
    torch.set_printoptions(precision=4, sci_mode=False)
    base_urls = ([args.base_url] if args.base_url else []) + list(BASE_URLS)
    if args.eval or args.eval_text:
        return run_eval(vars(args), base_urls)
    if args.export_hf:
        config = export_hf(args.from_file, args.export_hf, args.overwrite, args.models_dir)
        files = sorted(p.name for p in Path(args.export_hf).iterdir())
        print(f"Exported {args.from_file} to {args.export_hf}: {', '.join(files)} "
              f"({config['n_layer']} layers, embedding size {config['n_embd']}, context "
              f"{config['n_positions']}, {'tied' if config['tie_word_embeddings'] else 'own'} "
              f"output layer).\nLoad it with transformers: GPT2LMHeadModel.from_pretrained("
              f"{str(args.export_hf)!r})")
        return config
    if args.inspect:
        rows, hparams = inspect_checkpoint(download_gpt2(args.model_size, args.models_dir,
                                                         base_urls))
        print("hparams:", json.dumps(hparams))
        width = max(len(r[0]) for r in rows)
        print(f"{'OpenAI variable':<{width}}  {'shape':<20}  in our GPTModel")
        for name, shape, target in rows:
            print(f"{name:<{width}}  {str(shape):<20}  {target}")
        return rows

    device = get_device(args.device)
    model, cfg = load_gpt2_model(args.model_size, args.models_dir, base_urls=base_urls,
                                 source=args.source, hf_file=args.hf_file)
    model.to(device)
    tokenizer = bpe_tokenizer(args.models_dir)
    results = {}
    if args.neighbors or args.analogy:
        emb = model.tok_emb.weight.detach().float().cpu()
        if args.neighbors:
            i = word_token(args.neighbors, tokenizer)
            results["neighbors"] = nearest_tokens(emb, emb[i], tokenizer, exclude=[i])
            print(f"Nearest tokens to {args.neighbors!r}:", results["neighbors"])
        if args.analogy:
            a, b, c = (word_token(w, tokenizer) for w in args.analogy)
            results["analogy"] = nearest_tokens(emb, emb[a] - emb[b] + emb[c], tokenizer,
                                                exclude=[a, b, c])
            print(f"{args.analogy[0]} - {args.analogy[1]} + {args.analogy[2]} ≈",
                  results["analogy"])
        return results

    torch.manual_seed(args.seed)
    print("Output text:\n", args.prompt, sep="", end="")
    new_ids = stream_text(model, text_to_token_ids(args.prompt, tokenizer).to(device), tokenizer,
                          args.max_new_tokens, cfg["context_length"], **sampling(args))
    print()
    results["text"] = args.prompt + tokenizer.decode(new_ids)
    return results


def build_parser():
    parser = argparse.ArgumentParser(
        description="Load OpenAI's GPT-2 weights into our GPTModel and generate text "
                    "(downloads once; later runs work offline).",
        formatter_class=HelpFormatter,
        epilog=('example: python ch05_load_gpt2.py --model-size 355M --prompt "Every '
                'effort moves you"'))
    parser.add_argument("--model-size", default="124M", choices=ALLOWED_SIZES,
                        help="which GPT-2 checkpoint")
    parser.add_argument("--models-dir", default="gpt2",
                        help="folder for the downloaded and converted weights")
    parser.add_argument("--base-url", default=None,
                        help="a mirror to try before OpenAI's URL and the book's backup; it "
                             "must hold SIZE/FILENAME like the originals")
    parser.add_argument("--source", choices=("openai", "hf"), default=None,
                        help="where GPT-2's weights come from: OpenAI's TensorFlow checkpoint "
                             "(its server, then the book's backup) or Hugging Face's "
                             "model.safetensors (openai-community/gpt2...; $HF_ENDPOINT names a "
                             "mirror). Default: the weights already in --models-dir, else "
                             "OpenAI's, else Hugging Face's")
    parser.add_argument("--hf-file", metavar="PATH", default=None,
                        help="a model.safetensors of GPT-2 you already have, or a folder "
                             "holding one (a Hugging Face cache folder such as "
                             "~/.cache/huggingface/hub/models--openai-community--gpt2 too); "
                             "--model-size must match it")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    add_sampling_arguments(parser, max_new_tokens=25, temperature=1.5, top_k=50)
    parser.add_argument("--seed", type=int, default=123, help="random seed")
    add_device_argument(parser)
    parser.add_argument("--inspect", action="store_true",
                        help="print the checkpoint's variables, shapes and hparams, and "
                             "where each goes in our model, then stop")
    parser.add_argument("--neighbors", metavar="WORD", default=None,
                        help="print the tokens nearest to WORD in GPT-2's embedding space")
    parser.add_argument("--analogy", nargs=3, metavar=("A", "B", "C"), default=None,
                        help="print the tokens nearest to A - B + C, e.g. king man woman")
    export = parser.add_argument_group("export to Hugging Face")
    export.add_argument("--export-hf", metavar="DIR", default=None,
                        help="write the model of --from as a Hugging Face GPT-2 folder "
                             "(config.json, model.safetensors, generation_config.json, "
                             "vocab.json, merges.txt, tokenizer_config.json), then stop")
    export.add_argument("--from", dest="from_file", metavar="FILE", default=None,
                        help="the model to export or --eval: a checkpoint.pt of "
                             "ch05_train.py, gpt2/SIZE/model.pth, or a model of "
                             "ch07_instruct.py (finetuned, LoRA or DPO)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing --export-hf folder or --json file")
    scores = parser.add_argument_group(
        "how good is a model: zero-shot benchmarks (GPT-2 of --model-size or --hf-file, or "
        "the model of --from)")
    scores.add_argument("--eval", metavar="NAMES", default=None,
                        help=f"comma-separated: {', '.join(EVAL_FILES)}; then stop")
    scores.add_argument("--eval-text", metavar="FILE_OR_FOLDER", default=None,
                        help="your own text (files, or a folder of .txt files): sliding-window "
                             "perplexity and bits per byte")
    scores.add_argument("--stride", type=number(int, at_least=1), default=None,
                        help="sliding-window step for perplexities (default: half the context)")
    scores.add_argument("--limit", type=number(int, at_least=1), default=None,
                        help="score the first N items of each benchmark (WikiText: N "
                             "contexts of tokens); such results are not compared as if whole")
    scores.add_argument("--eval-data-dir", metavar="DIR", default=None,
                        help="the benchmark files, as they download (hellaswag_val.jsonl, "
                             "lambada_test.jsonl, wikitext-2-raw-v1-test.parquet, ...); "
                             "default: download them once into --data-dir")
    scores.add_argument("--data-dir", default="data/eval", help="folder for downloaded benchmarks")
    scores.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results, the model's and the data files' SHA-256 "
                             "and the settings as JSON")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.export_hf and not args.from_file or args.from_file and not (args.export_hf or
                                                                         args.eval or args.eval_text):
        parser.error("--export-hf DIR and --from FILE go together: the folder to write and "
                     "the model to write there (--from also names the model for --eval)")
    names = [n.strip() for n in (args.eval or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in EVAL_FILES]
    if unknown:
        parser.error(f"argument --eval: unknown benchmark {unknown[0]!r}; choose from "
                     f"{', '.join(EVAL_FILES)}")
    args.eval = names
    if args.hf_file and args.source == "openai":
        parser.error("--hf-file names Hugging Face's file: drop --source openai")
    return args


def kept_when_stopped(settings):
    """What an interrupted run of this command kept, in its words."""
    if settings["eval"] or settings["eval_text"]:
        return ("Nothing was written (--json is written whole, at the end); benchmark files "
                "downloaded so far are kept.")
    if settings["export_hf"]:
        return (f"Nothing was exported: {settings['export_hf']} is written whole or not at all "
                "(an earlier export there is as it was).")
    return "Files downloaded so far are kept; a cut download's .part file resumes next time."


if __name__ == "__main__":
    run_command(main, parse_args(), kept_when_stopped)
