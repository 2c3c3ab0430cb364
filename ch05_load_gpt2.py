"""Chapter 5 (5.5): Loading pretrained weights from OpenAI.

Defines the book's `download_and_load_gpt2`, `load_gpt2_params_from_tf_ckpt`,
`assign` and `load_weights_into_gpt`; beyond the book, a reader of OpenAI's
TensorFlow checkpoint that needs no TensorFlow (`list_tf_variables`,
`load_tf_variable`, with CRC-32C checks), `load_gpt2_model`
(converts once to model.pth, then loads offline without TensorFlow) and
`get_gpt2_tokenizer` (tiktoken's gpt2, or the same encoding built from the
downloaded encoder.json and vocab.bpe).

Run:  python ch05_load_gpt2.py --model-size 124M --prompt "Every effort moves you"
      python ch05_load_gpt2.py --inspect          (what the checkpoint holds)
      python ch05_load_gpt2.py --neighbors king --analogy king man woman
Imports from ch02_data.py, ch04_gpt.py and ch05_train.py.
"""
import argparse
import functools
import json
import re
from pathlib import Path

import numpy as np
import tiktoken
import torch

from ch02_data import (DownloadError, HelpFormatter, download_file, interrupted, move_aside,
                       plain_warnings)
from ch04_gpt import GPT_CONFIG_124M, GPTModel, add_device_argument, get_device
from ch05_train import (add_sampling_arguments, architecture_difference, architecture_of,
                        build_lean, load_checkpoint, model_file, sampling, save_checkpoint,
                        stream_text, text_to_token_ids)

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
        fetch_again(model_dir / DATA_FILE, str(err), model_size, base_urls)
        try:
            params = load_gpt2_params_from_tf_ckpt(tf_ckpt_path, settings)
        except DamagedCheckpoint as again:
            raise damaged_again(model_dir / DATA_FILE, str(again)) from None
    return settings, params


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
            fetch_again(model_dir / filename, problem, model_size, base_urls)
    return model_dir


def fetch_gpt2_file(path, model_size, base_urls):
    urls = [f"{base.rstrip('/')}/{model_size}/{path.name}" for base in base_urls]
    download_file(urls[0], path, backup_urls=urls[1:])


def fetch_again(path, problem, model_size, base_urls):
    """Move a damaged GPT-2 file aside and download it once more; damaged again,
    it is an error that says what to do."""
    print(f"{path} is damaged ({problem}); moved aside to {move_aside(path).name} and "
          "downloading it again.")
    fetch_gpt2_file(path, model_size, base_urls)
    problem = gpt2_file_problem(path)
    if problem:
        raise damaged_again(path, problem)


def damaged_again(path, problem):
    move_aside(path)
    return DownloadError(f"{path} is damaged ({problem}), also when downloaded again (kept as "
                         ".damaged): the server may be sending an error page. Try later, "
                         f"another --base-url, or delete {path.parent} and download again.")


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


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """{'wte': ..., 'wpe': ..., 'g': ..., 'b': ..., 'blocks': [{'attn': {...}, ...}]}"""
    # Beyond the book: TensorFlow's functions, or the same from our own reader
    list_variables, load_variable = checkpoint_functions()
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
    # GPT-2 ties the output layer to the token embedding
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"], "out_head.weight")


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


def checkpoint_functions():
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


def load_gpt2_model(model_size="124M", models_dir="gpt2", drop_rate=0.0, base_urls=BASE_URLS):
    """(GPTModel with GPT-2's weights in eval mode, its config).

    The first call downloads and converts OpenAI's checkpoint and saves the
    result as models_dir/model_size/model.pth; later calls load that file and
    need neither TensorFlow nor the network.
    """
    model_dir = Path(models_dir) / model_size
    pth, hparams = model_dir / "model.pth", model_dir / "hparams.json"
    if pth.exists() and hparams.exists() and gpt2_file_problem(hparams) is None:
        cfg = config_from_settings(json.loads(hparams.read_text(encoding="utf-8")), drop_rate)
        state_dict, problem = read_converted_model(pth, cfg)
        if problem is None:
            return build_lean(lambda: GPTModel(cfg), state_dict, source=str(pth)).eval(), cfg
        print(f"{pth} {problem}; moved aside to {move_aside(pth).name}, converting again.")
    settings, params = download_and_load_gpt2(model_size, models_dir, base_urls)
    cfg = config_from_settings(settings, drop_rate)
    model = GPTModel(cfg)
    load_weights_into_gpt(model, params, free_params=True)
    save_checkpoint(pth, model_file("gpt2", model.state_dict(), {**cfg, "drop_rate": 0.0},
                                    {"model_size": model_size}))
    print(f"Saved the converted weights to {pth}; later runs load them offline.")
    return model.eval(), cfg


def read_converted_model(pth, cfg):
    """(model.pth's state dict, None), or (None, what keeps it from being GPT-2 as
    hparams.json describes it)."""
    try:
        saved = load_checkpoint(pth, mmap=True, kinds=("gpt2",))
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


def gpt2_byte_symbols():
    """GPT-2's byte-to-character table: bytes that print stand for themselves, the
    others (space, controls) for characters from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b], n = chr(256 + n), n + 1
    return {ch: b for b, ch in symbols.items()}


def gpt2_tokenizer_from_files(encoder_json, vocab_bpe):
    """GPT-2's byte-level BPE built from the two files of OpenAI's model download.
    encoder.json's ids are the merge ranks (vocab.bpe lists the merges in that
    order), so it alone gives tiktoken's ranks. Read here rather than through
    tiktoken's loader, which copies every file it reads into its cache folder."""
    byte_of = gpt2_byte_symbols()
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[ch] for ch in token): rank for token, rank in encoder.items()
             if token != "<|endoftext|>"}
    merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
    n_merges = sum(1 for line in merges if line.strip())
    if len(ranks) != 256 + n_merges or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{encoder_json} ({len(ranks)} tokens) and {vocab_bpe} ({n_merges} "
                         "merges) are not one GPT-2 vocabulary; delete both to download them "
                         "again.")
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, spaces
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")


def get_gpt2_tokenizer(models_dir=None):
    """tiktoken's gpt2 encoding; when tiktoken cannot get its vocabulary (offline,
    no cache), the same encoding from encoder.json and vocab.bpe under models_dir."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # a network error of any kind
        for encoder in sorted(Path(models_dir or "gpt2").glob("*/encoder.json")):
            vocab = encoder.with_name("vocab.bpe")
            if vocab.exists():
                return gpt2_tokenizer_from_files(encoder, vocab)
        raise DownloadError(
            f"tiktoken could not load the gpt2 encoding ({err}) and no encoder.json/vocab.bpe "
            f"were found under {models_dir or 'gpt2'}/*/. Connect once, or set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache.") from None


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
    list_variables, _ = checkpoint_functions()
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


# ---- The demo ----

def main(args):
    torch.set_printoptions(precision=4, sci_mode=False)
    base_urls = ([args.base_url] if args.base_url else []) + list(BASE_URLS)
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
    model, cfg = load_gpt2_model(args.model_size, args.models_dir, base_urls=base_urls)
    model.to(device)
    tokenizer = get_gpt2_tokenizer(args.models_dir)
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
    return parser


if __name__ == "__main__":
    plain_warnings()
    try:
        main(build_parser().parse_args())
    except KeyboardInterrupt:
        interrupted("Files downloaded so far are kept; a cut download's .part file resumes "
                    "next time.")
    except (ValueError, OSError, DownloadError) as err:
        raise SystemExit(f"error: {err}")
