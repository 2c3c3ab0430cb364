"""Chapter 3: Coding attention mechanisms.

The book's progression from simplified self-attention to `MultiHeadAttention`:
`SelfAttention_v1`, `SelfAttention_v2`, `CausalAttention`,
`MultiHeadAttentionWrapper`, `MultiHeadAttention`, each as the book writes it.
Beyond the book: key-value caches (`KVCache`, and `StaticKVCache`, whose shapes
never change, for CUDA graphs), and `ExtendedMultiHeadAttention`, the same
attention with the same parameters that also attends over a cache and can use
PyTorch's fused `scaled_dot_product_attention` (attn_impl="sdpa") and one
matmul for the query, key and value projections (fused_qkv); the plot helpers
the later chapters use.

Run:  python ch03_attention.py [--out runs/ch03]   (prints the book's numbers,
      saves a heatmap of the causal attention weights)
Needs torch alone (with ch04_gpt.py, a copy of the two files builds GPTModel); the
demo and save_figure import ch02_data.py when they run, for whole files and a
clean stop.
"""
import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import torch
import torch.nn as nn

# "Your journey starts with one step": the book's 3-d embeddings of 6 tokens
WORDS = ["Your", "journey", "starts", "with", "one", "step"]
INPUTS = torch.tensor(
    [[0.43, 0.15, 0.89],   # Your     (x^1)
     [0.55, 0.87, 0.66],   # journey  (x^2)
     [0.57, 0.85, 0.64],   # starts   (x^3)
     [0.22, 0.58, 0.33],   # with     (x^4)
     [0.77, 0.25, 0.10],   # one      (x^5)
     [0.05, 0.80, 0.55]]   # step     (x^6)
)


# ---- 3.3 A simple self-attention mechanism without trainable weights ----

def simple_attention(inputs):
    """Dot-product scores of every pair, softmax per row, weighted sum of inputs."""
    attn_scores = inputs @ inputs.T
    attn_weights = torch.softmax(attn_scores, dim=-1)
    return attn_weights, attn_weights @ inputs


# ---- 3.4 Self-attention with trainable weights ----

class SelfAttention_v1(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x):
        keys = x @ self.W_key
        queries = x @ self.W_query
        values = x @ self.W_value
        attn_scores = queries @ keys.T
        # Scaling by sqrt(d_k) keeps the softmax out of its flat, small-gradient regions
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


class SelfAttention_v2(nn.Module):
    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.T
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


# ---- 3.5 Hiding future words with causal attention ----

class CausalAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # A buffer moves with the module to the device and is not trained
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length),
                                                diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)  # (b, num_tokens, num_tokens)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values


# ---- 3.6 Extending single-head attention to multi-head attention ----

class MultiHeadAttentionWrapper(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias)
             for _ in range(num_heads)])

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:  # the book asserts; this says what to change
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}): "
                             "each head gets d_out // num_heads dimensions.")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length),
                                                diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)

        # Split the last dimension into heads: (b, num_tokens, num_heads, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)

        # (b, num_heads, num_tokens, head_dim)
        keys = keys.transpose(1, 2)
        queries = queries.transpose(1, 2)
        values = values.transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_tokens)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        context_vec = self.out_proj(context_vec)
        return context_vec


# ---- Beyond the book: a key-value cache for generating one token at a time ----

class KVCache:
    """The keys and values one attention layer has computed so far, kept in a
    buffer of the context length, so each new token costs one position's work."""

    def __init__(self):
        self.keys = self.values = None
        self.length = 0

    def update(self, keys, values, capacity):
        # keys, values: (b, num_heads, new_tokens, head_dim)
        new = keys.shape[2]
        if self.length + new > capacity:
            raise ValueError(f"The cache holds {capacity} positions; {self.length} are used "
                             f"and {new} more do not fit. Start a new cache.")
        if self.keys is None:
            shape = (*keys.shape[:2], capacity, keys.shape[3])
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        self.keys[:, :, self.length:self.length + new] = keys
        self.values[:, :, self.length:self.length + new] = values
        self.length += new
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]


class StaticKVCache:
    """Beyond the book: a KVCache whose tensors keep their shapes and addresses:
    buffers for the whole context, written in place, and the next position kept
    on the device (`length`, a tensor). Attention runs over the whole buffer
    with the positions not written yet hidden. So one decoding step is the same
    work every time, and ch05_train.py records it once as a CUDA graph."""

    def __init__(self, device):
        self.keys = self.values = None
        self.length = torch.zeros((), dtype=torch.long, device=device)

    def update(self, keys, values, capacity):
        # The caller checks that the tokens fit: comparing with a device tensor here
        # would wait for the device, which a CUDA graph's recording does not allow
        if self.keys is None:
            shape = (*keys.shape[:2], capacity, keys.shape[3])
            self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
        positions = self.length + torch.arange(keys.shape[2], device=keys.device)
        self.keys.index_copy_(2, positions, keys)
        self.values.index_copy_(2, positions, values)
        self.length += keys.shape[2]  # in place: a recorded graph advances it on every replay
        return self.keys, self.values


# ---- Beyond the book: the attention that decoding and --fast use ----

class ExtendedMultiHeadAttention(MultiHeadAttention):
    """The book's MultiHeadAttention (the same parameters, the same results) that
    also attends over a KVCache or StaticKVCache while decoding, and can compute
    the same attention faster: with PyTorch's fused scaled_dot_product_attention
    (attn_impl="sdpa") and the query, key and value projections as one matmul
    (fused_qkv). ch04_gpt.py's GPTModel gives every block this class."""

    def __init__(self, *args, attn_impl="book", fused_qkv=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_kernels(attn_impl, fused_qkv)

    def set_kernels(self, attn_impl, fused_qkv):
        if attn_impl not in ("book", "sdpa"):
            raise ValueError(f"attn_impl must be 'book' or 'sdpa', not {attn_impl!r}.")
        self.attn_impl, self.fused_qkv = attn_impl, fused_qkv
        return self

    def forward(self, x, kv_cache=None):
        if kv_cache is None and self.attn_impl == "book" and not self.fused_qkv:
            return super().forward(x)  # the book's lines, as they are
        b, num_tokens, d_in = x.shape
        projections = (self.W_query, self.W_key, self.W_value)
        if self.fused_qkv and all(type(p) is nn.Linear for p in projections):  # not LoRA's
            queries, keys, values = self._fused_projections(projections, x)
        else:
            queries, keys, values = (p(x) for p in projections)  # (b, num_tokens, d_out)
        # (b, num_heads, num_tokens, head_dim)
        queries, keys, values = (t.view(b, num_tokens, self.num_heads, self.head_dim)
                                 .transpose(1, 2) for t in (queries, keys, values))
        hidden = None  # with a cache, the mask over the keys it holds
        if kv_cache is not None:  # add to, and attend over, earlier tokens
            hidden = self.hidden_keys(kv_cache.length, num_tokens)
            keys, values = kv_cache.update(keys, values, capacity=self.mask.shape[0])
        elif self.attn_impl == "book":  # slice, then convert: only what is used
            hidden = self.mask[:num_tokens, :num_tokens].bool()
        if self.attn_impl == "sdpa":
            return self.out_proj(self._sdpa(queries, keys, values, hidden, kv_cache is None))

        attn_scores = queries @ keys.transpose(2, 3)  # as the book, with the cache's mask
        if hidden is not None:
            attn_scores.masked_fill_(hidden, -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1))
        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        return self.out_proj(context_vec.contiguous().view(b, num_tokens, self.d_out))

    def _fused_projections(self, layers, x):
        """W_query(x), W_key(x), W_value(x) from one matmul with the three weights
        stacked: one large kernel instead of three small ones (the chunks are views)."""
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        return nn.functional.linear(x, weight, bias).chunk(3, dim=-1)

    def hidden_keys(self, start, num_tokens):
        """The causal mask (True: hidden) for new queries at positions start,
        start + 1, ... over the keys a cache holds once theirs are added; None
        when nothing is hidden (one new token sees every earlier one). `start` is
        a tensor for a StaticKVCache, whose keys are its whole buffer: positions
        not written yet are hidden too."""
        if torch.is_tensor(start):
            query_positions = start + torch.arange(num_tokens, device=start.device)
            key_positions = torch.arange(self.mask.shape[0], device=start.device)
            return key_positions > query_positions[:, None]
        if num_tokens == 1:
            return None
        # Slice, then convert: converting the whole (context, context) mask on every call
        # would cost more than attending for a few new tokens
        return self.mask[start:start + num_tokens, :start + num_tokens].bool()

    def _sdpa(self, queries, keys, values, hidden, causal):
        b, _, num_tokens, _ = queries.shape
        dropout_p = self.dropout.p if self.training else 0.0
        context_vec = nn.functional.scaled_dot_product_attention(
            queries, keys, values, dropout_p=dropout_p, is_causal=causal,
            attn_mask=None if causal or hidden is None else ~hidden)
        return context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out)


# ---- Beyond the book: attention implementations side by side (the chapter's bonus) ----
# The same multi-head causal attention computed eight ways, each from the weights
# of one book MultiHeadAttention `mha` (so outputs and gradients can be compared):
# attention_implementations()[name](mha, x). bench.py --attention times them.

def split_heads(t, num_heads):
    b, num_tokens, d_out = t.shape  # -> (b, num_heads, num_tokens, head_dim)
    return t.view(b, num_tokens, num_heads, d_out // num_heads).transpose(1, 2)


def merge_heads(t):
    b, num_heads, num_tokens, head_dim = t.shape  # -> (b, num_tokens, d_out)
    return t.transpose(1, 2).reshape(b, num_tokens, num_heads * head_dim)


def causal_softmax(scores):
    num_tokens = scores.shape[-1]
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax(scores.masked_fill(mask, -torch.inf), dim=-1)


def heads_wrapper(mha, x):
    """Chapter 3's MultiHeadAttentionWrapper: one CausalAttention per head (its slice
    of the weights), the outputs concatenated, then the out_proj MultiHeadAttention has."""
    hd, outputs = mha.head_dim, []
    for h in range(mha.num_heads):
        part = slice(h * hd, (h + 1) * hd)
        q, k, v = (torch.nn.functional.linear(x, layer.weight[part], None if layer.bias is None
                                              else layer.bias[part])
                   for layer in (mha.W_query, mha.W_key, mha.W_value))
        outputs.append(causal_softmax(q @ k.transpose(1, 2) / hd ** 0.5) @ v)
    return mha.out_proj(torch.cat(outputs, dim=-1))


def fused_qkv(mha, x):
    """One matmul for the queries, keys and values (their weights stacked)."""
    weight = torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight])
    bias = None if mha.W_query.bias is None else torch.cat(
        [mha.W_query.bias, mha.W_key.bias, mha.W_value.bias])
    q, k, v = (split_heads(t, mha.num_heads) for t in
               torch.nn.functional.linear(x, weight, bias).chunk(3, dim=-1))
    weights = causal_softmax(q @ k.transpose(2, 3) / mha.head_dim ** 0.5)
    return mha.out_proj(merge_heads(weights @ v))


def einsum_attention(mha, x):
    """Projections, scores and the weighted sum as einsum expressions."""
    q, k, v = (split_heads(torch.einsum("bnd,od->bno", x, layer.weight) +
                           (0 if layer.bias is None else layer.bias), mha.num_heads)
               for layer in (mha.W_query, mha.W_key, mha.W_value))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / mha.head_dim ** 0.5
    context = torch.einsum("bhqk,bhkd->bhqd", causal_softmax(scores), v)
    return mha.out_proj(merge_heads(context))


def sdpa(mha, x, backend=None):
    """PyTorch's scaled_dot_product_attention (is_causal): its fastest kernel, or
    `backend` alone (SDPBackend.MATH: the reference computation)."""
    q, k, v = (split_heads(layer(x), mha.num_heads)
               for layer in (mha.W_query, mha.W_key, mha.W_value))
    if backend is None:
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(backend):
            context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return mha.out_proj(merge_heads(context))


def sdpa_math(mha, x):
    from torch.nn.attention import SDPBackend
    return sdpa(mha, x, SDPBackend.MATH)


def torch_multihead(mha, x):
    """nn.MultiheadAttention's own computation (multi_head_attention_forward) with
    the book's weights: stacked in-projection, a causal mask, the out_proj."""
    num_tokens = x.shape[1]
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=x.device).triu(1)
    bias = None if mha.W_query.bias is None else torch.cat(
        [mha.W_query.bias, mha.W_key.bias, mha.W_value.bias])
    seq_first = x.transpose(0, 1)  # (num_tokens, b, d_in): its layout without batch_first
    out, _ = torch.nn.functional.multi_head_attention_forward(
        seq_first, seq_first, seq_first, mha.d_out, mha.num_heads,
        torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight]), bias,
        None, None, False, 0.0, mha.out_proj.weight, mha.out_proj.bias, training=False,
        need_weights=False, attn_mask=mask)
    return out.transpose(0, 1)


def flex(mha, x):
    """FlexAttention with a causal block mask (PyTorch 2.5 and later)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v = (split_heads(layer(x), mha.num_heads)
               for layer in (mha.W_query, mha.W_key, mha.W_value))
    num_tokens = x.shape[1]
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                   num_tokens, num_tokens, device=x.device.type)
    return mha.out_proj(merge_heads(flex_attention(q, k, v, block_mask=block_mask)))


def attention_implementations():
    """{name: fn(mha, x)}: the book's module first, FlexAttention where PyTorch has it."""
    implementations = {"book MultiHeadAttention": lambda mha, x: mha(x),
                       "wrapper of single heads": heads_wrapper, "fused QKV": fused_qkv,
                       "einsum": einsum_attention, "SDPA": sdpa, "SDPA, math kernel": sdpa_math,
                       "nn.MultiheadAttention": torch_multihead}
    if importlib.util.find_spec("torch.nn.attention.flex_attention"):
        implementations["FlexAttention"] = flex
    return implementations


# ---- Beyond the book: saving plots (chapters 3, 5, 6 and 7 use these) ----

def pyplot():
    """matplotlib.pyplot drawing into files (the Agg backend): no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    from ch02_data import atomic_path  # here, so that the model needs torch alone
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    pyplot().close(fig)


# ---- The chapter's demo ----

def save_heatmap(weights, labels, path):
    fig, ax = pyplot().subplots(figsize=(5, 4))
    image = ax.imshow(weights, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title("Causal attention weights")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def main(args):
    torch.set_printoptions(precision=4, sci_mode=False)
    inputs = INPUTS
    d_in, d_out = inputs.shape[1], 2

    # 3.3.1: attention for the second input, "journey"
    query = inputs[1]
    attn_scores_2 = inputs @ query
    print("Attention scores for 'journey':", attn_scores_2)
    attn_weights_2 = torch.softmax(attn_scores_2, dim=0)
    print("Attention weights:", attn_weights_2, "sum:", attn_weights_2.sum())
    print("Context vector:", attn_weights_2 @ inputs)

    # 3.3.2: all inputs at once
    attn_weights, all_context_vecs = simple_attention(inputs)
    print("All attention weights:\n", attn_weights)
    print("All context vectors:\n", all_context_vecs)

    # 3.4: trainable weights
    torch.manual_seed(123)
    sa_v1 = SelfAttention_v1(d_in, d_out)
    print("SelfAttention_v1:\n", sa_v1(inputs))
    torch.manual_seed(789)
    sa_v2 = SelfAttention_v2(d_in, d_out)
    print("SelfAttention_v2:\n", sa_v2(inputs))

    # 3.5: causal mask on v2's weights, then dropout
    queries, keys = sa_v2.W_query(inputs), sa_v2.W_key(inputs)
    attn_scores = queries @ keys.T
    context_length = attn_scores.shape[0]
    mask = torch.triu(torch.ones(context_length, context_length), diagonal=1)
    masked = attn_scores.masked_fill(mask.bool(), -torch.inf)
    causal_weights = torch.softmax(masked / keys.shape[-1] ** 0.5, dim=1)
    print("Causal attention weights:\n", causal_weights)
    torch.manual_seed(123)
    print("Dropout(0.5) on the weights:\n", torch.nn.Dropout(0.5)(causal_weights))

    heatmap = Path(args.out) / "causal_attention_weights.png"
    save_heatmap(causal_weights.detach().numpy(), WORDS, heatmap)
    print("Saved", heatmap)
    return batched_attention(inputs, d_in, d_out)


def batched_attention(inputs, d_in, d_out):
    """The demo's 3.5.3 and 3.6: causal and multi-head attention over a batch of two."""
    batch = torch.stack((inputs, inputs), dim=0)
    print("Batch shape:", tuple(batch.shape))
    torch.manual_seed(123)
    ca = CausalAttention(d_in, d_out, batch.shape[1], 0.0)
    context_vecs = ca(batch)
    print("CausalAttention:\n", context_vecs)
    print("context_vecs.shape:", tuple(context_vecs.shape))

    # 3.6: multi-head attention
    torch.manual_seed(123)
    mha = MultiHeadAttentionWrapper(d_in, d_out, batch.shape[1], 0.0, num_heads=2)
    context_vecs = mha(batch)
    print("MultiHeadAttentionWrapper:\n", context_vecs)
    print("context_vecs.shape:", tuple(context_vecs.shape))
    torch.manual_seed(123)
    mha = MultiHeadAttention(d_in, d_out, batch.shape[1], 0.0, num_heads=2)
    context_vecs = mha(batch)
    print("MultiHeadAttention:\n", context_vecs)
    print("context_vecs.shape:", tuple(context_vecs.shape))
    return context_vecs


def build_parser():
    parser = argparse.ArgumentParser(
        description="Chapter 3 demo: self-attention, causal attention, multi-head attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='example: python ch03_attention.py --out runs/ch03')
    parser.add_argument("--out", default="runs/ch03",
                        help="folder for the attention-weights heatmap PNG")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    from ch02_data import run_command  # how every command stops; the classes need torch alone
    run_command(main, parse_args(), "A heatmap is written whole or not at all.")
