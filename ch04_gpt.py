"""Chapter 4: Implementing a GPT model from scratch to generate text.

Defines `GPT_CONFIG_124M`, `LayerNorm`, `GELU`, `FeedForward`,
`TransformerBlock`, `GPTModel` and `generate_text_simple` as the book writes
them. Beyond the book, after them: the GPT-2 sizes (`gpt_config`), the device
helper the later chapters use, and subclasses of the book's modules with the
same parameters that GPTModel gives itself (`extend_modules`): a key-value
cache for decoding (`new_kv_cache`, `GPTModel(..., kv_cache=...)`, a static one
replayed as a CUDA graph, `GraphedStep`) and, with `FAST_KERNELS` in the
config, faster kernels with the book's results.

Run:  python ch04_gpt.py [--prompt "Hello, I am"]
      python ch04_gpt.py --flops [--device cuda]   (FLOPs per token; the largest batches)
Imports the attention and the caches from ch03_attention.py, and needs torch alone:
ch03_attention.py and this file, copied into another project, build GPTModel (the
demo imports tiktoken and ch02_data.py when it runs).
"""
import argparse
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import torch
import torch.nn as nn

from ch03_attention import ExtendedMultiHeadAttention, KVCache, MultiHeadAttention, StaticKVCache

# ---- 4.1 Coding an LLM architecture ----

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # BPE vocabulary of GPT-2
    "context_length": 1024,  # maximum number of input tokens
    "emb_dim": 768,          # embedding dimension
    "n_heads": 12,           # attention heads
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout rate
    "qkv_bias": False,       # bias in the query, key and value projections
}

# ---- 4.2 Normalizing activations with layer normalization ----

class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5  # keeps the division finite when the variance is 0
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # GPT-2's (biased) variance
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


# ---- 4.3 Implementing a feed forward network with GELU activations ----

class GELU(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        # The tanh approximation GPT-2 was trained with
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


# ---- 4.4 Adding shortcut connections ----

class ExampleDeepNeuralNetwork(nn.Module):
    def __init__(self, layer_sizes, use_shortcut):
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Linear(n_in, n_out), GELU())
            for n_in, n_out in zip(layer_sizes[:-1], layer_sizes[1:])])

    def forward(self, x):
        for layer in self.layers:
            layer_output = layer(x)
            if self.use_shortcut and x.shape == layer_output.shape:
                x = x + layer_output
            else:
                x = layer_output
        return x


def print_gradients(model, x):
    output = model(x)
    loss = nn.MSELoss()(output, torch.tensor([[0.]]))
    loss.backward()
    for name, param in model.named_parameters():
        if "weight" in name:
            print(f"{name} has gradient mean of {param.grad.abs().mean().item()}")


# ---- 4.5 Connecting attention and linear layers in a transformer block ----

class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)  # pre-LayerNorm, as in GPT-2
        x = self.att(x)  # (batch, num_tokens, emb_dim)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        return x + shortcut


# ---- 4.6 Coding the GPT model ----

class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(
            *[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        extend_modules(self, cfg)  # beyond the book: the KV cache, and FAST_KERNELS if asked

    def forward(self, in_idx, kv_cache=None):
        if kv_cache is not None:  # beyond the book: in_idx continues the cached tokens
            return forward_with_cache(self, in_idx, kv_cache)
        batch_size, seq_len = in_idx.shape
        check_length(self, seq_len)  # beyond the book: a clear error, not an index error
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds  # (batch, num_tokens, emb_dim)
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)  # (batch, num_tokens, vocab_size)
        return logits


# ---- 4.7 Generating text ----

def generate_text_simple(model, idx, max_new_tokens, context_size):
    # idx: (batch, n_tokens) token ids of the current context
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # crop to the supported context size
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # the last position predicts the next token
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


# ---- Beyond the book: GPT-2's sizes, the device, and the fast kernels' keys ----

# Beyond the book, two optional keys choose faster kernels for the same model
# (same parameters, same results to float tolerance): "attn_impl": "sdpa" and
# "fused_ops": True (one kernel each for LayerNorm and GELU, one matmul for the
# query, key and value projections, and an output head computed with its
# vocabulary padded to a multiple of 128). See FAST_KERNELS.
FAST_KERNELS = {"attn_impl": "sdpa", "fused_ops": True}

# What changes from GPT_CONFIG_124M for each GPT-2 size; "tiny" (tests) and "mini"
# (10.6M parameters besides the embeddings: a model that learns on a CPU) are ours.
MODEL_CONFIGS = {
    "124M": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "355M": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "774M": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "1558M": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
    "tiny": {"emb_dim": 32, "n_layers": 2, "n_heads": 4},
    "mini": {"emb_dim": 384, "n_layers": 6, "n_heads": 6},
}


def gpt_config(size="124M", **overrides):
    """GPT_CONFIG_124M with one size's dimensions and any further overrides."""
    if size not in MODEL_CONFIGS:
        raise ValueError(f"Unknown model size {size!r}; choose one of {list(MODEL_CONFIGS)}.")
    return {**GPT_CONFIG_124M, **MODEL_CONFIGS[size], **overrides}


def get_device(name="auto", log=print):
    """An explicit device name, else the best available: cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        why = ("this PyTorch is a CPU build: install a CUDA build (see pytorch.org)"
               if torch.version.cuda is None else
               f"this PyTorch is built for CUDA {torch.version.cuda}, but no GPU answers: check "
               "the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
        raise ValueError(f"--device cuda was asked for, but PyTorch sees no CUDA GPU ({why}). "
                         "Or use --device auto or cpu.")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for, but MPS is not available "
                         "(it needs Apple silicon and macOS 12.3+). Use --device auto or cpu.")
    device = torch.device(name)
    log(f"Using device: {device}")
    return device


def add_device_argument(parser):
    """The --device flag of every command, for get_device."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto picks cuda, then mps, then cpu")


# ---- Beyond the book: the same model with a key-value cache and faster kernels ----
# GPTModel gives its modules these subclasses (extend_modules): each keeps the
# book's parameters, names and results, so every state dict, checkpoint and
# GPT-2 load works either way.

class ExtendedTransformerBlock(TransformerBlock):
    """The book's block; with a cache, its attention continues the cached tokens."""

    def forward(self, x, kv_cache=None):
        if kv_cache is None:
            return super().forward(x)
        shortcut = x
        x = self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        x = x + shortcut
        shortcut = x
        return self.drop_shortcut(self.ff(self.norm2(x))) + shortcut


class FusedLayerNorm(LayerNorm):
    """The book's LayerNorm from one PyTorch kernel: the same result, faster."""

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class FusedGELU(GELU):
    """The book's GELU (the tanh approximation) from one PyTorch kernel."""

    def forward(self, x):
        return nn.functional.gelu(x, approximate="tanh")


class PaddedHead(nn.Linear):
    """The output head with the same weight, computed faster on GPUs: they run a
    matmul fastest when its sizes are multiples of 64 or 128, and 50,257 is odd.
    The weight is padded with zero rows to the next multiple of 128 for the
    matmul, and the padding's logits are cut off: the same parameters and
    results. Only for many tokens at once (training): for a few, copying the
    weight would cost more than it saves."""

    def forward(self, x):
        if x.shape[:-1].numel() < 256:
            return super().forward(x)
        padded = nn.functional.pad(self.weight, (0, 0, 0, -self.weight.shape[0] % 128))
        return nn.functional.linear(x, padded)[..., :self.weight.shape[0]]


def extend_modules(model, cfg):
    """Give a model's book modules the subclasses above: every attention and
    block the key-value cache, and where cfg asks for FAST_KERNELS, SDPA
    attention, fused LayerNorm, GELU and QKV projections and the padded head.
    Only the classes change (the same parameters), so this also switches a
    built or loaded model."""
    attn_impl, fused = cfg.get("attn_impl", "book"), cfg.get("fused_ops", False)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.__class__ = ExtendedMultiHeadAttention
            module.set_kernels(attn_impl, fused)
        elif isinstance(module, TransformerBlock):
            module.__class__ = ExtendedTransformerBlock
        elif fused and type(module) is LayerNorm:
            module.__class__ = FusedLayerNorm
        elif fused and type(module) is GELU:
            module.__class__ = FusedGELU
    if fused and type(model.out_head) is nn.Linear:
        model.out_head.__class__ = PaddedHead
    return model


def use_fast_kernels(model):
    """Switch a built model (loaded weights too) to FAST_KERNELS, as if its config
    had them. Its parameters stay as they are."""
    return extend_modules(model, FAST_KERNELS)


def check_length(model, num_tokens):
    context_length = model.pos_emb.num_embeddings
    if num_tokens > context_length:
        raise ValueError(f"The input has {num_tokens} tokens but the model's context_length "
                         f"is {context_length}; crop it, e.g. idx[:, -{context_length}:].")


def forward_with_cache(model, in_idx, kv_cache):
    """GPTModel's forward for tokens that continue the ones kv_cache holds (one
    cache per block, from new_kv_cache): their positions start where the cache's
    end, and attention also sees the cached keys and values."""
    batch_size, seq_len = in_idx.shape
    start = kv_cache[0].length
    # (a StaticKVCache's length is a device tensor: its user checks the length)
    if not torch.is_tensor(start):
        check_length(model, start + seq_len)
    positions = start + torch.arange(seq_len, device=in_idx.device)
    x = model.drop_emb(model.tok_emb(in_idx) + model.pos_emb(positions))
    for block, layer_cache in zip(model.trf_blocks, kv_cache):
        x = block(x, layer_cache)
    return model.out_head(model.final_norm(x))  # (batch, num_tokens, vocab_size)


def new_kv_cache(model, static=False):
    """An empty key-value cache, one KVCache per transformer block (StaticKVCache
    with static=True, for CUDA graphs)."""
    if static:
        device = model.pos_emb.weight.device
        return [StaticKVCache(device) for _ in model.trf_blocks]
    return [KVCache() for _ in model.trf_blocks]


def cached_step(model, kv_cache, token):
    """A function: one new token per sequence (batch, 1) -> its logits. A CUDA
    graph for a StaticKVCache on CUDA, else the model's forward with the cache."""
    if token.device.type == "cuda" and isinstance(kv_cache[0], StaticKVCache):
        try:
            return GraphedStep(model, kv_cache, token)
        except RuntimeError as err:  # an operation that cannot be recorded: go eager
            print(f"Note: decoding without a CUDA graph ({str(err).splitlines()[0]})",
                  file=sys.stderr)
    return lambda new_token: model(new_token, kv_cache=kv_cache)[:, -1, :]


class GraphedStep:
    """Beyond the book: one decoding step recorded once as a CUDA graph, then
    replayed for every new token. A step of a small model is a few hundred short
    kernels; launching them one by one from Python takes longer than running
    them, and a replay launches them all at once. The StaticKVCache keeps every
    tensor in place and advances its position on the device, so each replay
    continues where the last one stopped."""

    @torch.no_grad()
    def __init__(self, model, kv_cache, token):
        self.token = token.clone()  # the graph's input: new tokens are copied into it
        lengths = [cache.length.clone() for cache in kv_cache]
        # Two steps outside the recording first, so that cuBLAS and the attention
        # kernels set themselves up, on the stream that records (as PyTorch asks);
        # each step's move of the positions is undone
        side = torch.cuda.Stream(token.device)
        side.wait_stream(torch.cuda.current_stream(token.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.token, kv_cache=kv_cache)
                for cache, length in zip(kv_cache, lengths):
                    cache.length.copy_(length)
        torch.cuda.current_stream(token.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.logits = model(self.token, kv_cache=kv_cache)[:, -1, :]

    def __call__(self, token):
        self.token.copy_(token)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites self.logits



# ---- Beyond the book: FLOPs (the chapter's bonus performance analysis) ----
# Every model-FLOPs utilisation (MFU) the project prints divides by this count.

def flops_per_token(cfg, context=None, training=True):
    """FLOPs per token of a forward pass (training=False) or a training step: 2 per
    weight of every matmul (the blocks' 12 * emb_dim^2 and the output head), plus
    attention's 4 * n_layers * context * emb_dim (queries x keys, weights x values);
    a step's backward pass costs twice its forward: 6N + 12 L T d in all."""
    d, layers = cfg["emb_dim"], cfg["n_layers"]
    context = context or cfg["context_length"]
    forward = 2 * (layers * 12 * d * d + d * cfg["vocab_size"]) + 4 * layers * context * d
    return 3 * forward if training else forward


def counted_flops_per_token(cfg, context=None, training=True, device="meta"):
    """The same count, as PyTorch's FlopCounterMode counts the model's operations
    on one sequence of `context` tokens (on the meta device: shapes only, no work)."""
    from torch.utils.flop_counter import FlopCounterMode
    context = context or cfg["context_length"]
    with torch.device(device):
        model = GPTModel({**cfg, "context_length": max(context, cfg["context_length"])})
        ids = torch.zeros(1, context, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        logits = model(ids)
        if training:
            logits.float().sum().backward()
    return counter.get_total_flops() / context


def largest_batch(cfg, device, context=None, limit=1024):
    """The most sequences of `context` tokens a training step (forward, backward,
    AdamW) fits on `device`, by doubling, then halving the gap."""
    context = context or cfg["context_length"]
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters())

    def fits(batch):
        try:
            ids = torch.zeros(batch, context, dtype=torch.long, device=device)
            model(ids).float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return True
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            torch.cuda.empty_cache()
    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, min(high * 2, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def flops_table(sizes, device=None):
    """--flops: per size, the parameters and the FLOPs per token of a forward pass
    and of a training step, counted and by the formula; on CUDA the largest batch."""
    rows = []
    for size in sizes:
        cfg = gpt_config(size)
        row = {"size": size, "params": param_count(cfg),
               "forward": counted_flops_per_token(cfg, training=False),
               "training": counted_flops_per_token(cfg),
               "formula": flops_per_token(cfg)}
        if device is not None and device.type == "cuda":
            row["largest_batch"] = largest_batch(cfg, device)
        rows.append(row)
    print(f"{'size':<7}{'parameters':>14}{'forward/token':>16}{'step/token':>14}"
          f"{'6N+12LTd':>14}{'count/formula':>15}" + ("  largest batch" if device is not None
                                                     and device.type == "cuda" else ""))
    for r in rows:
        print(f"{r['size']:<7}{r['params']:>14,}{r['forward'] / 1e9:>14.2f} G"
              f"{r['training'] / 1e9:>12.2f} G{r['formula'] / 1e9:>12.2f} G"
              f"{r['training'] / r['formula']:>15.4f}" +
              (f"{r['largest_batch']:>15}" if "largest_batch" in r else ""))
    print("Context 1024 tokens; a training step is forward + backward. Counted by "
          "torch.utils.flop_counter.FlopCounterMode (matmuls and attention only).")
    return rows


def param_count(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in GPTModel(cfg).parameters())


# ---- The chapter's demo ----

def main(args):
    if args.flops:
        return flops_table(["124M", "355M", "774M", "1558M"],
                           get_device(args.device) if args.device != "auto" else None)
    import tiktoken  # the demo's only: the model itself needs torch alone
    torch.set_printoptions(precision=4, sci_mode=False)
    tokenizer = tiktoken.get_encoding("gpt2")
    cfg = gpt_config(args.model_size)

    # 4.1: a batch of two texts
    batch = torch.stack([torch.tensor(tokenizer.encode(t))
                         for t in ("Every effort moves you", "Every day holds a")])
    print("Input batch:\n", batch)

    # 4.2: layer normalization
    torch.manual_seed(args.seed)
    batch_example = torch.randn(2, 5)
    layer = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    out = LayerNorm(emb_dim=6)(layer(batch_example))
    print("LayerNorm mean:", out.mean(dim=-1, keepdim=True).squeeze(-1))
    print("LayerNorm variance:", out.var(dim=-1, unbiased=False, keepdim=True).squeeze(-1))

    # 4.4: gradients with and without shortcut connections
    layer_sizes, sample_input = [3, 3, 3, 3, 3, 1], torch.tensor([[1., 0., -1.]])
    for use_shortcut in (False, True):
        print(f"Gradients, use_shortcut={use_shortcut}:")
        torch.manual_seed(args.seed)
        print_gradients(ExampleDeepNeuralNetwork(layer_sizes, use_shortcut), sample_input)

    # 4.6: the full model
    torch.manual_seed(args.seed)
    model = GPTModel(cfg)
    out = model(batch)
    print("Output shape:", tuple(out.shape))
    total_params = sum(p.numel() for p in model.parameters())
    print(f"Total number of parameters: {total_params:,}")
    tied = total_params - sum(p.numel() for p in model.out_head.parameters())
    print(f"Number of trainable parameters considering weight tying: {tied:,}")
    print(f"Total size of the model: {total_params * 4 / 1024 ** 2:.2f} MB")

    # 4.7: the untrained model continues a prompt
    model.eval()  # no dropout
    encoded = torch.tensor(tokenizer.encode(args.prompt)).unsqueeze(0)
    out = generate_text_simple(model, encoded, args.max_new_tokens, cfg["context_length"])
    print("Output:", out)
    print("Output length:", out.shape[1])
    print("Decoded:", tokenizer.decode(out.squeeze(0).tolist()))
    return out


def build_parser():
    parser = argparse.ArgumentParser(
        description="Chapter 4 demo: build GPT-2 124M, count its parameters, and let "
                    "the untrained model continue a prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='example: python ch04_gpt.py --model-size tiny --prompt "Hello, I am"')
    parser.add_argument("--prompt", default="Hello, I am", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="tokens to generate")
    parser.add_argument("--model-size", default="124M", choices=list(MODEL_CONFIGS),
                        help="model size (the book uses 124M)")
    parser.add_argument("--model", dest="model_size", choices=list(MODEL_CONFIGS),
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the earlier name
    parser.add_argument("--seed", type=int, default=123, help="random seed")
    parser.add_argument("--flops", action="store_true",
                        help="instead of the demo: each GPT-2 size's FLOPs per token of a "
                             "forward pass and a training step, counted and by the formula "
                             "MFU uses; with --device cuda also the largest batch that trains")
    add_device_argument(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"argument --max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    return args


if __name__ == "__main__":
    from ch02_data import run_command  # how every command stops; the model needs torch alone
    run_command(main, parse_args(), "The demo writes no files.")
