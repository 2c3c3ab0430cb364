"""Chapter 5 (5.1.1, 5.3, 5.4): generating text, and saving and loading models.

As the book's own gpt_generate.py, this file holds what generating needs:
5.1.1's `text_to_token_ids` and `token_ids_to_text`, 5.3's `generate` (with
temperature and top-k), and 5.4's saving and loading of model files. Beyond the
book: the one model-file layout of chapters 5 to 7 (`model_file`,
`load_checkpoint`, checksums, lean loading), generating from any model file of
this project with the text streamed as it comes (`load_text_model`,
`generate_stream`, LoRA merged in), and the sampling flags every command that
generates shares (`SAMPLING`, `add_sampling_arguments`).

Run:  python ch05_generate.py --from runs/ch05/checkpoint.pt --prompt "Every effort moves you"
Imports from ch02_data.py and ch04_gpt.py; ch05_train.py, ch05_load_gpt2.py and
chapters 6 and 7 take their model files and generation from here.
"""
import argparse
import os
import signal
import sys
import zlib
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import torch

from ch02_data import (HelpFormatter, atomic_path, bpe_tokenizer, number, run_command,
                       saved_tokenizer)
from ch04_gpt import GPTModel, add_device_argument, cached_step, get_device, new_kv_cache


# ---- 5.1.1 Using GPT to generate text ----

def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


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
             eos_id=None, *, top_p=None, use_cache=False):
    # Beyond the book, keyword-only: top-p sampling, and a KV cache (the same tokens,
    # computed incrementally)
    if use_cache:
        new = list(generate_stream(model, idx, max_new_tokens, context_size, temperature,
                                   top_k, eos_id, top_p=top_p, use_cache=True))
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


# ---- 5.4 Loading and saving model weights in PyTorch ----
# The book saves with torch.save and loads with torch.load; here every model file of
# chapters 5 to 7 is written through a temporary file and read with weights_only=True.

def save_checkpoint(path, checkpoint):
    """torch.save via a temporary file: a crash keeps the previous checkpoint. A
    model file also gets a CRC-32 of each weight tensor, which loading checks."""
    if "kind" in checkpoint and "model" in checkpoint:  # one copy to the host, summed and saved
        weights = {name: t.detach().cpu() for name, t in checkpoint["model"].items()}
        checkpoint = {**checkpoint, "model": weights, "checksums": tensor_checksums(weights)}
    with atomic_path(path) as tmp:
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as err:  # a full disk shows as PyTorch's "enforce fail ..."
            raise OSError(f"Could not write {path}: {str(err).splitlines()[0][:200]} (is the "
                          "disk full?); the previous file is kept.") from None


def load_checkpoint(path, map_location="cpu", mmap=False, kinds=None, wanted="", hint="",
                    earlier=None):
    """A model file of this project in today's layout (a file of an earlier
    version converted; earlier(saved) names its kind). With `kinds`, a file of
    another kind gets one line saying what it holds, not `wanted`, and `hint`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a model file: name the file in it "
                                "(a checkpoint.pt, model.pth or *.pth).")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is a safetensors file (Hugging Face's layout), not a model "
                         "file of chapters 5 to 7: GPT-2's model.safetensors loads with `python "
                         f"ch05_load_gpt2.py --hf-file {path}`.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # PyTorch's own text may advise weights_only=False: never pass it on
        raise ValueError(f"Could not read the checkpoint {path}: it is damaged or not a PyTorch "
                         f"checkpoint ({type(err).__name__}). Delete it, or name another "
                         "file.") from None
    checkpoint = _in_current_layout(checkpoint, earlier)
    if checkpoint is None:
        raise ValueError(f"{path} is not a model file of chapters 5 to 7 (it has no 'model' "
                         f"entry). {hint}".strip())
    if kinds and checkpoint["kind"] not in kinds:
        raise ValueError(f"{path} holds {what_is(checkpoint)}, not {wanted}. {hint}".strip())
    damaged = damaged_tensors(checkpoint)
    if damaged:
        raise ValueError(f"{path} is damaged: the bytes of {damaged[0]}"
                         f"{f' and {len(damaged) - 1} more tensors' if len(damaged) > 1 else ''} "
                         "differ from the checksums saved with them. Delete it, or name another "
                         "file.")
    return checkpoint


# ---- Beyond the book: one model-file layout for chapters 5 to 7 ----
# Every model file holds the weights ("model"), the config dict that builds the
# model ("config"), its kind and what wrote it, in words ("what"), that command's
# settings, and a CRC-32 of each weight tensor; a training checkpoint adds the
# optimizer and random state. A file describes itself: each chapter names only
# its own kind, and converts its own earlier layouts (load_checkpoint's `earlier`).

def model_file(kind, state_dict, config, settings=None, what=None, **extra):
    return {"kind": kind, "what": what or f"a model file of kind {kind!r}", "model": state_dict,
            "config": config, "settings": settings or {}, **extra}


def what_is(saved):
    """What a model file holds, in its own words."""
    return saved.get("what") or (f"a model file of kind {saved['kind']!r}" if saved.get("kind")
                                 else "a model file of an earlier version")


def tensor_checksums(state_dict):
    """{name: CRC-32 of the (CPU) tensor's bytes}: a flipped bit in a saved file shows."""
    return {name: zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            for name, t in state_dict.items()}


def damaged_tensors(checkpoint):
    """The tensors of a model file whose bytes differ from their saved checksums."""
    saved = checkpoint.get("checksums") or {}
    found = tensor_checksums({k: v.cpu() for k, v in checkpoint["model"].items() if k in saved})
    return [name for name, crc in found.items() if crc != saved[name]]


def _in_current_layout(saved, earlier=None):
    """A file of an earlier version in today's layout (None: not a model file).
    Earlier versions kept the config in the settings ("cfg"), or saved a bare
    state dict; earlier(saved), a chapter's own, names the kind of its files."""
    if not isinstance(saved, dict):
        return None
    if "kind" in saved:
        return saved if "model" in saved else None
    if all(isinstance(v, torch.Tensor) for v in saved.values()) and saved:
        saved = {"model": saved, "config": None}  # a bare state dict
    if "model" not in saved:
        return None
    settings = saved.get("settings") or {}
    converted = {**saved, "config": saved.get("config") or settings.get("cfg"),
                 "settings": settings, "kind": None}
    converted["kind"] = earlier(converted) if earlier else None
    return converted


def architecture_of(state_dict):
    """What a GPTModel state dict's shapes say of the config that built it."""
    found = {"n_layers": len({k.split(".")[1] for k in state_dict
                              if k.startswith("trf_blocks.")})}
    if "tok_emb.weight" in state_dict:
        found["vocab_size"], found["emb_dim"] = tuple(state_dict["tok_emb.weight"].shape)
    if "pos_emb.weight" in state_dict:
        found["context_length"] = state_dict["pos_emb.weight"].shape[0]
    return found


def architecture_difference(held, wanted):
    """(what `held` has, what `wanted` has) in words, for the keys where two
    architectures differ; None when they agree."""
    words = {"n_layers": "layers", "emb_dim": "embedding size", "vocab_size": "vocabulary",
             "context_length": "context length"}
    differ = [k for k in wanted if held.get(k) != wanted[k]]
    describe = lambda arch: ", ".join(f"{words[k]} {arch.get(k)}" for k in differ)  # noqa: E731
    return (describe(held), describe(wanted)) if differ else None


def check_state_dict(model, state_dict, source="the checkpoint"):
    """Raise an error naming how the file's model differs (layers, sizes), or else
    every missing, unexpected or differently shaped tensor."""
    expected = model.state_dict()
    difference = architecture_difference(architecture_of(state_dict), architecture_of(expected))
    if difference:
        raise ValueError(f"{source} holds a model with {difference[0]}; the model built for it "
                         f"has {difference[1]}.")
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
                         "LoRA rank).")


def build_lean(build, state_dict, source="the checkpoint"):
    """build() the model on the meta device (no memory, no random init), then
    adopt state_dict's tensors as its parameters: with a memory-mapped state
    dict, peak memory stays near one copy of the weights."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    return model


# ---- Beyond the book: generating from any model file, text streamed as it comes ----

def merge_lora(state_dict, alpha):
    """A LoRA-finetuned state dict (appendix E's LinearWithLoRA computes
    W x + alpha x A B) as the plain model's: each weight W becomes
    W + alpha (A B)^T, so the book's GPTModel loads it and computes the same."""
    merged = {}
    for key, value in state_dict.items():
        if ".lora." in key:
            continue
        if ".linear." in key:
            prefix, name = key.rsplit(".linear.", 1)
            if name == "weight":
                lora_a, lora_b = state_dict[f"{prefix}.lora.A"], state_dict[f"{prefix}.lora.B"]
                value = value + alpha * (lora_a @ lora_b).T
            key = f"{prefix}.{name}"
        merged[key] = value
    return merged


def load_text_model(path, device, flag="--from", why_not="", own_tokenizer=False):
    """(model in eval mode, its config, what the file holds, its tokenizer) from
    any model file of this project that generates text: one whose output layer
    scores the vocabulary (a LoRA-finetuned model has its LoRA merged in). The
    tokenizer is None for GPT-2's; a model pretrained with a tokenizer of its own
    (ch05_train.py --tokenizer) is refused unless own_tokenizer."""
    saved = load_checkpoint(path, mmap=True)
    if saved.get("tokenizer") and not own_tokenizer:
        raise ValueError(f"{path} was pretrained with a tokenizer of its own (ch05_train.py "
                         f"--tokenizer), and {flag} here takes a model of GPT-2's tokenizer: "
                         "generate from it with ch05_generate.py.")
    if saved["config"] is None:
        raise ValueError(f"{path} is a bare state dict of an earlier version, without the "
                         "config that builds its model: write it again with the command that "
                         "made it.")
    cfg, state_dict = {**saved["config"], "drop_rate": 0.0}, saved["model"]
    if saved["settings"].get("lora_rank"):
        state_dict = merge_lora(state_dict, saved["settings"]["lora_alpha"])
    head = state_dict.get("out_head.weight")
    if head is None or head.shape[0] != cfg["vocab_size"]:
        outputs = "no" if head is None else f"{head.shape[0]:,}"
        raise ValueError(f"{path} holds {what_is(saved)}, whose output layer has {outputs} "
                         f"outputs, not one per token of its vocabulary: {flag} takes a model "
                         f"that generates text{why_not}.")
    model = build_lean(lambda: GPTModel(cfg), state_dict, source=str(path))
    tokenizer = saved_tokenizer(saved["tokenizer"]) if saved.get("tokenizer") else None
    return model.to(device).eval(), cfg, what_is(saved), tokenizer


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
                    eos_id=None, *, top_p=None, use_cache=True):
    """Beyond the book: `generate` as a generator that yields each new token
    (batch, 1) as soon as it is chosen, for printing text as it is produced.

    With use_cache, each block keeps its keys and values (a KV cache), so a new
    token costs one position's work instead of the whole window's. On CUDA the
    cache is a StaticKVCache and each step is replayed as a CUDA graph
    (GraphedStep); use_cache="static" asks for that cache on any device. Once the
    window is full, positions would shift: then every step recomputes the last
    context_size tokens, exactly as the uncached loop does.
    """
    static = use_cache == "static" or (use_cache and idx.device.type == "cuda")
    kv_cache = new_kv_cache(model, static=static) if use_cache else None
    cached = min(idx.shape[1], context_size)  # positions the cache holds
    with torch.no_grad():
        logits = model(idx[:, -context_size:], kv_cache=kv_cache)[:, -1, :]
    step_fn = None
    for step in range(max_new_tokens):
        idx_next = sample_next_token(logits, temperature, top_k, top_p)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            return
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next
        if step + 1 == max_new_tokens:
            return
        if kv_cache is not None and cached >= context_size:
            kv_cache = None  # the window is full: recompute from here on
        with torch.no_grad():
            if kv_cache is None:
                logits = model(idx[:, -context_size:])[:, -1, :]
                continue
            if step_fn is None:
                step_fn = cached_step(model, kv_cache, idx_next)
            logits = step_fn(idx_next)
            cached += 1


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


# ---- Beyond the book: the sampling settings, named once ----

# Every sampling option, once: sample_next_token's keyword, its flag's type and help.
# They serve the flags, the settings, generate()'s keyword arguments and the run's
# description: a new method is one argument, one entry here.
SAMPLING = {
    "temperature": (number(float, at_least=0), "sampling temperature; 0 is greedy decoding"),
    "top_k": (number(int, at_least=1), "sample only among the k most likely tokens"),
    "top_p": (number(float, above=0, at_most=1), "sample only among the most likely tokens "
              "whose probabilities add up to p (nucleus sampling)"),
}


def sampling(args):
    """The sampling flags as generate()'s keyword arguments."""
    return sampling_of(vars(args))


def sampling_of(settings):
    return {k: settings[k] for k in SAMPLING}


def describe_sampling(settings):
    """"greedy", or the options in use, the temperature last: "top-k 25, temperature 1.4"."""
    if not settings["temperature"]:
        return "greedy"
    return ", ".join(f"{name.replace('_', '-')} {settings[name]}"
                     for name in sorted(SAMPLING, key="temperature".__eq__) if settings[name])


def add_sampling_arguments(parser, max_new_tokens, temperature, top_k,
                           max_new_help="tokens to generate"):
    """--max-new-tokens and a flag for each of SAMPLING: the same flags wherever a
    command generates (chapters 5 and 7), each with that command's defaults."""
    parser.add_argument("--max-new-tokens", type=number(int, at_least=1),
                        default=max_new_tokens, help=max_new_help)
    defaults = {"temperature": temperature, "top_k": top_k}
    for name, (kind, words) in SAMPLING.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults.get(name),
                            help=words)


# ---- The command: text from any model file ----

def generate_from(settings):
    """Stream a continuation of settings["prompt"] from the model file settings["from_file"]."""
    device = get_device(settings["device"])
    path = Path(settings["from_file"])
    model, cfg, what, tokenizer = load_text_model(path, device, own_tokenizer=True)
    tokenizer = tokenizer or bpe_tokenizer()
    torch.manual_seed(settings["seed"])
    print(f"{path} ({what}): {sum(p.numel() for p in model.parameters()):,} parameters")
    print(settings["prompt"], end="", flush=True)
    new_ids = stream_text(model, text_to_token_ids(settings["prompt"], tokenizer).to(device),
                          tokenizer, settings["max_new_tokens"], cfg["context_length"],
                          **sampling_of(settings))
    print()
    return {"text": settings["prompt"] + tokenizer.decode(new_ids), "model": model}


def main(args):
    return generate_from(vars(args))


def build_parser():
    parser = argparse.ArgumentParser(
        description="Generate text with any model file of this project: a checkpoint.pt of "
                    "ch05_train.py, GPT-2's converted model.pth, or a model of "
                    "ch07_instruct.py (LoRA merged in), printing it as it comes.",
        formatter_class=HelpFormatter,
        epilog='example: python ch05_generate.py --from runs/ch05/checkpoint.pt --prompt '
               '"Every effort moves you" --temperature 0')
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        default="runs/ch05/checkpoint.pt", help="the model file")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    add_sampling_arguments(parser, max_new_tokens=100, temperature=1.4, top_k=25)
    parser.add_argument("--seed", type=int, default=123, help="random seed of the sampling")
    add_device_argument(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    run_command(main, parse_args(), "Generating writes no files.")
