"""Chapter 7: Fine-tuning to follow instructions.

Defines the book's `download_and_load_file`, `format_input`,
`InstructionDataset`, `custom_collate_fn`, `generate_response`, and the
judge-model evaluation `query_model`, `check_if_running`,
`generate_model_scores` (Ollama's chat API). Beyond the book, in this order:
masking the instruction in the loss (exercise 7.2), LoRA (exercise 7.4), the
judge's scores kept entry by entry, saving, loading and an interactive chat,
preference tuning with DPO (the chapter's bonus: `PreferenceDataset`,
`dpo_loss`, `train_model_dpo_simple`), serving a model to a chat page
(ch07_chat.html) and an OpenAI-style API, and the command, its settings
resolved once from its flags.

Run:  python ch07_instruct.py                 (finetune GPT-2 355M, write test responses)
      python ch07_instruct.py --evaluate      (score them with a local Ollama model)
      python ch07_instruct.py --chat          (talk to the finetuned model)
      python ch07_instruct.py --dpo           (tune it with the preference data)
      python ch07_instruct.py --serve         (a chat page and an API at http://127.0.0.1:8000/)
Imports from ch02_data.py, ch04_gpt.py, ch05_generate.py (model files,
generating), ch05_train.py (training) and ch06_classify.py (LoRA, the shared
finetuning flags and settings).
"""
import contextlib
import copy
import hashlib
import importlib
import itertools
import json
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads: one line and 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\nInterrupted while starting; nothing "
                                                   "was done.", file=sys.stderr),
                                             os._exit(130)))

import numpy as np
import requests
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ch02_data import (HelpFormatter, bpe_tokenizer, download_checked, download_file, number,
                       pinned, read_json, run_command, write_text_atomic)
from ch04_gpt import GPTModel, get_device
from ch05_generate import (add_sampling_arguments, build_lean, generate, generate_stream,
                           load_checkpoint, load_text_model, model_file, sampling_of,
                           save_checkpoint, stream_text)
from ch05_load_gpt2 import ALLOWED_SIZES, load_gpt2_model
from ch05_train import (FlagsTypedParser, _unwrap, agree, calc_loss_loader, end_processes,
                        is_sharded, launched_processes, make_optimizer, plot_losses,
                        process_rank, refuse_overwrite, run_header, run_lock, shard_model,
                        speed_up, speed_up_finetuning, train_model_shared, train_model_simple,
                        wait_for_all, whole_batch_tokens, whole_model_state)
from ch06_classify import (ApiError, ApiHandler, ModelWorker, add_finetuning_arguments,
                           add_server_arguments, base_model, base_model_name, finetuning_settings,
                           freeze_and_add_lora, parse_finetuning_args, plot_values, processes,
                           serve_until_stopped, share_training)

DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
            "ch07/01_main-chapter-code/instruction-data.json")
OLLAMA_URL = "http://localhost:11434/api/chat"
EOT_ID = 50256  # <|endoftext|>


# ---- 7.2 Preparing a dataset for supervised instruction fine-tuning ----

def download_and_load_file(file_path, url):
    download_file(url, file_path)  # kept once downloaded
    data = read_json(file_path, "Fix it, or delete it to download the book's file again.")
    check_entries(data, file_path)
    return data


def check_entries(data, source="the data"):
    """Every entry needs an instruction and an output; 'input' may be empty or absent."""
    if not isinstance(data, list):
        raise ValueError(f"{source} must hold a JSON list of entries, not {type(data).__name__}.")
    for i, entry in enumerate(data):
        missing = [k for k in ("instruction", "output")
                   if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing:
            raise ValueError(f"Entry {i} of {source} has no {' or '.join(missing)} text "
                             f"(it is {json.dumps(entry)[:120]}).")


def format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def prompt_of(entry):
    """Beyond the book: format_input with the response header after it, the text a
    finetuned model continues with its response."""
    return format_input(entry) + "\n\n### Response:\n"


def split_data(data):
    """The book's split: 85% training, 10% test, the remaining 5% validation."""
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    return train_data, test_data, val_data


# ---- 7.3 Organizing data into training batches ----

class InstructionDataset(Dataset):
    def __init__(self, data, tokenizer, mask_instructions=False):
        self.data = data
        self.mask_instructions = mask_instructions
        self.encoded_texts, self.prompt_lengths = [], []
        for entry in data:
            instruction_plus_input = format_input(entry)
            response_text = f"\n\n### Response:\n{entry['output']}"
            full_text = instruction_plus_input + response_text
            self.encoded_texts.append(tokenizer.encode(full_text))
            # Beyond the book (exercise 7.2): where the response starts, for masking
            self.prompt_lengths.append(len(tokenizer.encode(instruction_plus_input)))

    def __getitem__(self, index):
        if self.mask_instructions:
            return self.encoded_texts[index], self.prompt_lengths[index]
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=EOT_ID, ignore_index=-100, allowed_max_length=None,
                      device="cpu"):
    # Items are token lists, or (token list, prompt length) to mask the prompt
    batch_max_length = max(len(item[0] if isinstance(item, tuple) else item) + 1
                           for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        item, prompt_length = item if isinstance(item, tuple) else (item, 0)
        new_item = item.copy()
        new_item += [pad_token_id]  # one end-of-text token ends every text
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])  # drop the last token for inputs
        targets = torch.tensor(padded[1:])  # shift +1 to the right for targets

        # Ignore every padding token in the loss but the first, which ends the text
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        # Beyond the book (exercise 7.2): no loss on predicting the prompt's tokens
        targets[:max(prompt_length - 1, 0)] = ignore_index

        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


# ---- 7.7 Extracting and saving responses ----

def encode_prompt(text, tokenizer, context_size):
    """Token ids of `text` as a batch of one. The whole prompt is kept; only one
    longer than the context (less one token for the answer) loses its start,
    with a warning."""
    ids = tokenizer.encode(text, disallowed_special=())
    room = context_size - 1
    if len(ids) > room:
        warnings.warn(f"The prompt has {len(ids)} tokens; only its last {room} are used "
                      f"(the model's context is {context_size}).")
        ids = ids[-room:]
    return torch.tensor([ids])


def answer_room(idx, context_size, max_new_tokens):
    """New tokens to generate after the prompt `idx`: at most max_new_tokens, and
    never past the context, which would push the prompt's start out of view."""
    return min(max_new_tokens, context_size - idx.shape[1])


def generate_response(model, entry, tokenizer, device, context_size, max_new_tokens=256,
                      **sampling):
    input_text = format_input(entry)
    idx = encode_prompt(input_text, tokenizer, context_size).to(device)
    token_ids = generate(model, idx, max_new_tokens=answer_room(idx, context_size, max_new_tokens),
                         context_size=context_size, eos_id=EOT_ID, use_cache=True, **sampling)
    new_text = tokenizer.decode(token_ids[0, idx.shape[1]:].tolist())
    return new_text.replace("### Response:", "").strip()


# ---- 7.8 Evaluating the finetuned LLM with a judge model (Ollama) ----

class JudgeUnavailable(RuntimeError):
    pass


def query_model(prompt, model="llama3", url=OLLAMA_URL, timeout=300):
    """The judge's answer, with a fixed seed and temperature 0 for repeatable
    scores. Beyond the book: through ModelClient, so also from an OpenAI-style
    server (asked once, as the book asks; ModelClient retries on request)."""
    return ModelClient(url, model, timeout=timeout, retries=0).ask(prompt)


def check_if_running(url=OLLAMA_URL, timeout=3):
    """Whether a server answers at url's host (the book checks for Ollama's process;
    beyond the book, any HTTP answer counts: OpenAI-style servers have no page there)."""
    base = re.match(r"https?://[^/]+", url)
    try:
        requests.get(base.group(0) if base else url, timeout=timeout)
        return True
    except requests.RequestException:
        return False


def generate_model_scores(json_data, json_key, model="llama3", url=OLLAMA_URL, scores_path=None,
                          timeout=300, overwrite=False, client=None, workers=1):
    """Scores 0-100 from the judge; an answer that is not such a number is reported
    and left out. Beyond the book: with scores_path, each entry's score (None where
    the answer was no number) is saved as it comes, and a later call goes on where
    this one stopped: entries already scored are not asked again, failed ones are.
    `client`: a ModelClient (any API style, retries, a cache); `workers`: requests
    in flight at once."""
    client = client or ModelClient(url, model, timeout=timeout)
    fingerprint = responses_fingerprint(json_data, json_key)
    by_entry = saved_scores(scores_path, fingerprint, client.model, overwrite)
    todo = [i for i in range(len(json_data)) if by_entry.get(str(i)) is None]
    if len(todo) < len(json_data):
        print(f"{len(json_data) - len(todo)} entries were scored by an earlier run "
              f"({scores_path}); scoring the other {len(todo)}.")
    i = None
    try:
        answered = as_answered(lambda i: score_entry(json_data[i], json_key, client), todo,
                               workers)
        for i, future in tqdm(answered, total=len(todo), desc="Scoring entries", unit="entry"):
            by_entry[str(i)] = future.result()
            if scores_path:
                write_text_atomic(scores_path, json.dumps(
                    {"model": client.model, "responses": fingerprint, "scores": by_entry},
                    indent=2))
    except JudgeUnavailable as err:
        done = sum(v is not None for v in by_entry.values())
        kept = f"; they are saved in {scores_path}, and --evaluate goes on from there" \
            if scores_path else ""
        raise JudgeUnavailable(f"{err} That was entry {i}; the {done} scores obtained are "
                               f"kept{kept}.") from None
    scores = [by_entry[str(i)] for i in range(len(json_data)) if by_entry.get(str(i)) is not None]
    failed = [i for i in range(len(json_data)) if by_entry.get(str(i)) is None]
    if failed:
        print(f"{len(failed)} of {len(json_data)} answers were not a score from 0 to 100 "
              f"(entries {failed[:20]}{'...' if len(failed) > 20 else ''}).")
    return scores


# ---- Beyond the book: the judge's scores, kept entry by entry ----
# generate_model_scores keeps each score in scores.json as it is given, so a judge
# that fails (or a Ctrl-C) costs only the entries not yet scored.

def judge_error(response):
    """An error reply in one line: Ollama's {"error": ...}, or the start of its text."""
    try:
        detail = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        detail = response.text
    return " ".join(detail.split())[:300]


def responses_fingerprint(json_data, json_key):
    """Changes when any entry or response changes: scores belong to one set of responses."""
    text = json.dumps([[format_input(e), e["output"], e.get(json_key)] for e in json_data])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def saved_scores(scores_path, fingerprint, model, overwrite):
    """The scores an earlier call saved for these responses with this judge ({}
    for none). Scores by another judge, or of other responses, are refused
    unless `overwrite`: they are an earlier run's results."""
    if not scores_path or overwrite or not Path(scores_path).exists():
        return {}
    saved = read_json(scores_path, "Delete it, or give --overwrite to score anew.")
    if not isinstance(saved, dict) or not isinstance(saved.get("scores"), dict):
        raise ValueError(f"{scores_path} holds no scores; delete it, or give --overwrite.")
    if saved.get("model") != model:
        raise ValueError(f"{scores_path} holds scores by the judge {saved.get('model')!r}, not "
                         f"{model!r}: give --judge-model {saved.get('model')} to go on with "
                         "them, or --overwrite to score anew.")
    if saved.get("responses", fingerprint) != fingerprint:  # files before it had none
        raise ValueError(f"{scores_path} holds scores of other responses than those beside it "
                         "(they changed since): give --overwrite to score these anew.")
    return {k: v for k, v in saved["scores"].items() if isinstance(v, int) or v is None}


def score_entry(entry, json_key, client):
    """The judge's score of one response, or None when its answer is not one."""
    prompt = (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )
    try:
        score = client.ask(prompt)
        value = int(score.strip())
        if not 0 <= value <= 100:
            raise ValueError(f"{value} is outside 0-100")
        return value
    except ValueError as err:
        tqdm.write(f"Could not convert score of an entry: {err}")
        return None


# ---- Beyond the book: one client for Ollama and every OpenAI-style server ----
# The judge (and ch07_data.py's generator) may be Ollama's native chat API or any
# server that speaks OpenAI's /v1/chat/completions: OpenAI, Ollama's /v1, vLLM,
# llama.cpp's server, this command's own --serve. Connection errors, timeouts,
# 429 and 5xx are retried with backoff (honouring Retry-After); every answer is
# cached by (style, model, messages, options), so a rerun pays nothing twice.

API_STYLES = ("ollama", "openai")


def api_style_of(url):
    """openai for a URL whose path ends in /v1 or /v1/chat/completions, else ollama."""
    path = url.split("?")[0].rstrip("/")
    return "openai" if path.endswith(("/v1", "/v1/chat/completions")) else "ollama"


def chat_endpoint(url, style):
    """The URL to POST chats to: an OpenAI-style base URL (…/v1) gets /chat/completions."""
    url = url.rstrip("/")
    return url + "/chat/completions" if style == "openai" and url.endswith("/v1") else url


class RetryableFailure(Exception):
    """A failure worth asking again: the server may answer later (wait: its Retry-After)."""

    def __init__(self, message, wait=None):
        super().__init__(message)
        self.wait = wait


class ModelClient:
    """A chat model behind HTTP: `ask(prompt or messages)` returns its answer.

    api_style: "ollama" (POST /api/chat, streamed JSON lines) or "openai" (POST
    /v1/chat/completions); by default from the URL. The key (api_key) is sent as
    a bearer token and never printed or saved. timeout: seconds a request may take;
    retries: how often a failed request is asked again (waiting backoff, 2 x
    backoff, ... up to 60 s, or the server's Retry-After). cache_path: a JSON Lines
    file of answers, read at the start (unless not `reuse`: everything is asked
    anew) and appended as answers come."""

    def __init__(self, url, model, api_style=None, api_key=None, timeout=300, retries=4,
                 backoff=1.0, cache_path=None, options=None, reuse=True):
        self.style = api_style or api_style_of(url)
        self.url, self.model, self.api_key = chat_endpoint(url, self.style), model, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.options = dict(options or {"seed": 123, "temperature": 0, "num_ctx": 2048})
        self.cache = AnswerCache(cache_path, reuse) if cache_path else None
        self.requests = 0  # requests sent (a cached answer sends none)

    def ask(self, prompt, options=None):
        """The answer to a prompt (or a list of messages); `options` replace the
        client's (seed, temperature, ...) for this request."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        options = self.options if options is None else options
        key = hashlib.sha256(json.dumps([self.style, self.model, messages, options],
                                        sort_keys=True).encode()).hexdigest()
        if self.cache and key in self.cache:
            return self.cache[key]
        for attempt in itertools.count():
            try:
                answer = self.ask_once(messages, options)
                break
            except RetryableFailure as err:
                if attempt >= self.retries:
                    tries = f" ({attempt + 1} tries)" if attempt else ""
                    raise JudgeUnavailable(f"{err}{tries}") from None
                time.sleep(err.wait if err.wait is not None
                           else min(60.0, self.backoff * 2 ** attempt))
        if self.cache:
            self.cache[key] = answer
        return answer

    def ask_once(self, messages, options):
        self.requests += 1
        if self.style == "openai":
            body = {"model": self.model, "messages": messages, "stream": False,
                    **{k: v for k, v in options.items() if k in ("seed", "temperature",
                                                                 "top_p")}}
        else:
            body = {"model": self.model, "messages": messages, "options": options}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with requests.post(self.url, json=body, headers=headers, stream=True,
                               timeout=self.timeout) as response:
                self.check_status(response)
                if self.style == "openai":
                    return openai_answer(response, self.url)
                return ollama_answer(response, self.url)
        except requests.Timeout:
            raise RetryableFailure(f"The server at {self.url} answered the check, but gave no "
                                   f"answer within {self.timeout:g} s.") from None
        except requests.RequestException as err:
            what = "Ollama server" if self.style == "ollama" else "server"
            start = (f"Start one with `ollama serve` and `ollama pull {self.model}`, or pass "
                     "--judge-url." if self.style == "ollama" else "Is --judge-url right?")
            raise RetryableFailure(f"No {what} answered at {self.url} "
                                   f"({type(err).__name__}). {start}") from None

    def check_status(self, response):
        """The reply's status and kind: retried (429, 5xx), or one line that says why not."""
        status = response.status_code
        if status == 429 or status >= 500:
            raise RetryableFailure(f"The server at {self.url} answered {status}: "
                                   f"{judge_error(response)}.", retry_after(response))
        if status != 200:
            hint = {"ollama": f"Is the model pulled? (`ollama pull {self.model}`)",
                    "openai": "Is the API key right (--api-key, or $OPENAI_API_KEY)?" if status
                    in (401, 403) else f"Does the server have the model {self.model!r}?"}
            raise JudgeUnavailable(f"The server at {self.url} answered {status}: "
                                   f"{judge_error(response)}. {hint[self.style]}")
        if "text/html" in response.headers.get("Content-Type", ""):
            raise JudgeUnavailable(f"The server at {self.url} answered a web page, not the "
                                   f"{self.style} chat API: give the API's URL to --judge-url "
                                   "(Ollama: …/api/chat; OpenAI-style: …/v1).")


def retry_after(response):
    """The seconds a 429 or 503 asks to wait (Retry-After in seconds), or None."""
    try:
        return min(300.0, max(0.0, float(response.headers.get("Retry-After", ""))))
    except ValueError:
        return None


def ollama_answer(response, url):
    """The text of Ollama's streamed chat reply (one JSON object a line)."""
    response_data = ""
    for line in response.iter_lines():
        if not line:
            continue
        try:
            message = json.loads(line)
        except ValueError:  # this entry fails, not the run
            raise ValueError(f"a reply that is not Ollama's JSON: {line[:60]!r}") from None
        if "error" in message:
            raise JudgeUnavailable(f"The Ollama server at {url} said: {message['error']}")
        response_data += message.get("message", {}).get("content", "")
        if message.get("done"):
            break
    return response_data


def openai_answer(response, url):
    """choices[0].message.content of an OpenAI-style chat completion."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"a reply from {url} that is not a chat completion: "
                         f"{response.text[:60]!r}") from None
    if not isinstance(content, str):
        raise ValueError(f"a reply from {url} without text: {content!r:.60}")
    return content


def as_answered(work, items, workers=1):
    """(item, future of work(item)) as each finishes, with at most `workers` at work
    at once. A caller that stops (an error, Ctrl-C) starts nothing more; what is at
    work finishes in the background (and reaches the cache)."""
    pool, items, running = ThreadPoolExecutor(max_workers=workers), iter(items), {}
    try:
        for item in itertools.islice(items, workers):
            running[pool.submit(work, item)] = item
        while running:
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                yield running.pop(future), future
                for item in itertools.islice(items, 1):  # the next, once this one is taken
                    running[pool.submit(work, item)] = item
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class AnswerCache:
    """Answers by key, in a JSON Lines file appended one answer at a time (a line
    cut short by a kill is skipped when read); safe for several threads."""

    def __init__(self, path, reuse=True):
        self.path, self.answers, self.lock = Path(path), {}, threading.Lock()
        if reuse and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    self.answers[record["key"]] = record["answer"]
                except (ValueError, KeyError, TypeError):
                    continue

    def __contains__(self, key):
        return key in self.answers

    def __getitem__(self, key):
        return self.answers[key]

    def __setitem__(self, key, answer):
        with self.lock:
            self.answers[key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "answer": answer}) + "\n")


def compare_judges(path_a, path_b):
    """--compare-judges: two judges' scores of the same responses side by side (the
    bonus's correlation analysis): means, rank correlations, the widest gaps."""
    judges = [read_scores(path) for path in (path_a, path_b)]
    (a, model_a, seen_a), (b, model_b, seen_b) = judges
    if seen_a and seen_b and seen_a != seen_b:
        raise ValueError(f"{path_a} and {path_b} score different responses: compare two "
                         "judges of the same responses file.")
    both = sorted(set(a) & set(b), key=int)
    if len(both) < 2:
        raise ValueError(f"{path_a} and {path_b} have {len(both)} entries scored by both: "
                         "comparing needs at least 2.")
    x, y = np.array([a[i] for i in both], float), np.array([b[i] for i in both], float)
    result = {"entries": len(both), "mean_a": x.mean(), "mean_b": y.mean(),
              "spearman": spearman(x, y), "kendall": kendall_tau_b(x, y),
              "apart": [(int(i), a[i], b[i]) for i in both if abs(a[i] - b[i]) >= 50]}
    print(f"{'judge':<24}{'file':<40}{'mean':>8}")
    for model, path, mean in ((model_a, path_a, result["mean_a"]),
                              (model_b, path_b, result["mean_b"])):
        print(f"{model:<24}{str(path)[-39:]:<40}{mean:>8.2f}")
    print(f"Entries scored by both: {len(both)}; Spearman's rho {result['spearman']:.3f}, "
          f"Kendall's tau-b {result['kendall']:.3f}")
    print(f"{len(result['apart'])} entries 50 or more points apart" +
          "".join(f"\n  entry {i}: {sa} vs {sb}" for i, sa, sb in result["apart"]))
    return result


def read_scores(path):
    """({entry: score}, judge model, responses fingerprint) of a scores.json."""
    saved = read_json(path, "Give a scores.json that --evaluate wrote.")
    if not isinstance(saved, dict) or not isinstance(saved.get("scores"), dict):
        raise ValueError(f"{path} holds no scores: give a scores.json that --evaluate wrote.")
    scores = {k: v for k, v in saved["scores"].items() if isinstance(v, int)}
    return scores, str(saved.get("model", "?")), saved.get("responses")


def average_ranks(values):
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(x, y):
    """Spearman's rho: Pearson's correlation of the average ranks (nan if one is constant)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def kendall_tau_b(x, y):
    """Kendall's tau-b: (concordant - discordant) pairs over the tie-corrected count."""
    s = pairs_x = pairs_y = 0
    for i in range(len(x) - 1):  # entry i against the later ones: memory stays O(n)
        dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
        s, pairs_x, pairs_y = s + (dx * dy).sum(), pairs_x + (dx != 0).sum(), pairs_y + (
            dy != 0).sum()
    return float(s / np.sqrt(float(pairs_x) * pairs_y)) if pairs_x and pairs_y else float("nan")


def add_client_arguments(group, who):
    """The flags of how `who` (the judge; ch07_data.py's model that writes) is
    asked through ModelClient: its API, requests in flight, timeout, retries."""
    group.add_argument("--api-style", choices=API_STYLES, default=None,
                       help=f"{who}'s API (default: openai for a URL ending in /v1 or "
                            "/v1/chat/completions, else ollama)")
    group.add_argument("--workers", type=number(int, at_least=1), default=1, metavar="N",
                       help=f"requests to {who} in flight at once")
    group.add_argument("--timeout", type=number(float, above=0), default=300, metavar="S",
                       help=f"seconds {who} may take for one answer")
    group.add_argument("--retries", type=number(int, at_least=0), default=4, metavar="N",
                       help="times a failed request (no connection, timeout, 429, 5xx) is "
                            "asked again, waiting 1, 2, 4 ... s or the server's Retry-After")


def judge_client(settings, cache_folder=None):
    """The judge of --judge-url/--judge-model, as the command's flags set it up
    (--overwrite asks everything anew)."""
    return ModelClient(settings["judge_url"], settings["judge_model"], settings["api_style"],
                       settings["judge_key"], settings["timeout"], settings["retries"],
                       cache_path=Path(cache_folder) / JUDGE_CACHE if cache_folder else None,
                       reuse=not settings["overwrite"])


JUDGE_CACHE = "judge-cache.jsonl"


# ---- Beyond the book: saving, loading and chatting ----

def build_model(cfg, lora_rank=None, lora_alpha=None):
    model = GPTModel(cfg)
    return freeze_and_add_lora(model, lora_rank, lora_alpha) if lora_rank else model


def load_finetuned(path, device="cpu"):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No finetuned model at {path}. Finetune one first with "
                                f"`python ch07_instruct.py --out {path.parent}`.")
    saved = load_checkpoint(path, map_location="cpu", mmap=True, kinds=("instruct",),
                            wanted="an instruction-finetuned model of ch07_instruct.py",
                            hint="--chat talks to a model that ch07_instruct.py finetuned.",
                            earlier=lambda s: "instruct" if s["settings"].get("cfg") and
                            "trainable" not in s["settings"] else None)  # config in settings
    settings, cfg = saved["settings"], saved["config"]
    model = build_lean(lambda: build_model(cfg, settings["lora_rank"], settings["lora_alpha"]),
                       saved["model"], str(path))
    return model.to(device).eval(), {**settings, "cfg": cfg}


def chat(model, tokenizer, device, context_size, max_new_tokens=256, temperature=0.0,
         top_k=None, stdin=None, out=None, top_p=None):
    """Read instructions line by line and stream each response. Earlier turns stay
    in the prompt while they fit the context (/reset forgets them). Ctrl-C stops
    a response and returns to the prompt; an empty line, end of input (Ctrl-D)
    or Ctrl-C at the prompt ends the chat. Returns the responses."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin is sys.stdin and sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # where the platform has it, input() then
            importlib.import_module("readline")  # edits lines and keeps a history
    responses, turns = [], []
    while True:
        try:
            line = input(">>> ") if interactive else read_line(stdin, out)
        except (KeyboardInterrupt, EOFError):
            line = ""
        if not line.strip():  # "" at end of input, "\n" for an empty line
            out.write("\n")
            return responses
        if line.strip() == "/reset":
            turns = []
            out.write("(earlier turns forgotten)\n")
            continue
        if line.strip() in ("/help", "/?"):
            out.write(CHAT_HELP)
            continue
        idx = chat_prompt(turns, line.strip(), tokenizer, context_size, max_new_tokens)
        try:
            new_ids = stream_text(model, idx.to(device), tokenizer,
                                  answer_room(idx, context_size, max_new_tokens), context_size,
                                  out, temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_id=EOT_ID)
        except KeyboardInterrupt:
            out.write(" [stopped]\n")
            continue
        out.write("\n")
        responses.append(tokenizer.decode(new_ids).strip())
        turns.append((line.strip(), responses[-1]))


CHAT_HELP = ("Type an instruction and press Enter; the answer streams as it is made.\n"
             "  /reset   forget the earlier turns (they stay in the prompt while they fit)\n"
             "  /help    this list\n"
             "  Ctrl-C   stop an answer; at the prompt, end the chat\n"
             "  an empty line or Ctrl-D ends the chat\n")


def read_line(stdin, out):
    out.write(">>> ")
    out.flush()
    return stdin.readline()


def chat_prompt(turns, instruction, tokenizer, context_size, max_new_tokens):
    """The prompt for a new instruction after the earlier turns that fit the
    context with room for an answer (at most half the context); the oldest go first."""
    return encode_prompt(chat_text(turns, instruction, tokenizer, context_size, max_new_tokens),
                         tokenizer, context_size)


def chat_text(turns, instruction, tokenizer, context_size, max_new_tokens, system=""):
    """chat_prompt's text (--serve: after a system message's text, when given)."""
    def text(kept):
        earlier = "".join(prompt_of({"instruction": i}) + r + "\n\n" for i, r in kept)
        return (system + "\n\n" if system else "") + earlier + \
            prompt_of({"instruction": instruction})
    room = context_size - min(max_new_tokens, context_size // 2)
    kept = list(turns)
    while kept and len(tokenizer.encode(text(kept), disallowed_special=())) > room:
        kept.pop(0)
    return text(kept)


# ---- Beyond the book: preference tuning with DPO (the chapter's bonus material) ----
# Direct Preference Optimization (Rafailov et al., 2023) makes the finetuned model
# (the policy) prefer each entry's chosen response over its rejected one, more
# than a frozen copy of it (the reference) does.

PREFERENCE_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                  "04_preference-tuning-with-dpo/instruction-data-with-preference.json")
PREFERENCE_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


def load_preference_data(path=None, data_dir="data", url=PREFERENCE_URL):
    """The bonus's 1,100 preference entries, downloaded once into data_dir and
    checked against the published file's SHA-256; or a file of your own (path)."""
    if path is None:
        path = download_checked(url, Path(data_dir) / "instruction-data-with-preference.json",
                                pinned(PREFERENCE_SHA256))
    data = read_json(path, "Fix it, or give another preference file.")
    check_preference_entries(data, path)
    return data


def check_preference_entries(data, source):
    """Every entry needs instruction, chosen and rejected texts ('input' may be empty)."""
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source} must hold a non-empty JSON list of entries.")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"Entry {i} of {source} is not an object with instruction, "
                             "chosen and rejected texts.")
        for key in ("instruction", "chosen", "rejected", "input"):
            if key == "input" and key not in entry:
                continue
            if not isinstance(entry.get(key), str):
                what = "no" if key not in entry else "a non-text"
                raise ValueError(f"Entry {i} of {source} has {what} {key!r} "
                                 f"(it is {json.dumps(entry)[:120]}).")


class PreferenceDataset(Dataset):
    """Each entry as token ids, as the bonus encodes it: the prompt (format_input),
    and the whole text with the response header and the chosen, or the rejected,
    response."""

    def __init__(self, data, tokenizer):
        self.items = []
        for entry in data:
            encode = lambda text: tokenizer.encode(text, disallowed_special=())  # noqa: E731
            self.items.append({key: encode(prompt_of(entry) + entry[key])
                               for key in ("chosen", "rejected")} |
                              {"prompt": encode(format_input(entry))})

    def __getitem__(self, index):
        return self.items[index]

    def __len__(self):
        return len(self.items)


def preference_collate_fn(batch, pad_token_id=EOT_ID, allowed_max_length=None, device="cpu"):
    """The batch's chosen and rejected sequences padded with pad_token_id to its
    longest + 1 and cut at allowed_max_length, each with a mask that is False at
    the padding and, as the bonus masks them, at the prompt and the two newline
    tokens after it: "### Response:\\n" and the response are what count."""
    longest = max(len(item[key]) for item in batch for key in ("chosen", "rejected")) + 1
    out = {}
    for key in ("chosen", "rejected"):
        ids, masks = [], []
        for item in batch:
            n, start = len(item[key]), len(item["prompt"]) + 2
            ids.append(item[key] + [pad_token_id] * (longest - n))
            masks.append([False] * start + [True] * (n - start) + [False] * (longest - n))
        ids, masks = torch.tensor(ids), torch.tensor(masks)
        if allowed_max_length is not None:
            ids, masks = ids[:, :allowed_max_length], masks[:, :allowed_max_length]
        out[key], out[f"{key}_mask"] = ids.to(device), masks.to(device)
    return out


def token_logprobs(model, ids):
    """log p(token t+1 | tokens up to t) for each position: (batch, num_tokens - 1)."""
    log_probs = torch.log_softmax(model(ids[:, :-1]), dim=-1)
    return log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sequence_logprob(logprobs, mask):
    """The mean log-probability of each sequence's response tokens (mask: True
    there; logprobs[:, t] belongs to token t + 1)."""
    selected = mask[:, 1:].to(logprobs.dtype)
    return (logprobs * selected).sum(-1) / selected.sum(-1).clamp(min=1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """-log sigmoid(beta ((pi_c - pi_r) - (ref_c - ref_r))), averaged over the batch,
    with the mean rewards (policy - reference, detached) of the chosen and the
    rejected responses and the reward accuracy: the share of pairs whose chosen
    response has the higher reward."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    loss = -torch.nn.functional.logsigmoid(beta * logits).mean()
    chosen_rewards = (policy_chosen - reference_chosen).detach()
    rejected_rewards = (policy_rejected - reference_rejected).detach()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return loss, chosen_rewards.mean(), rejected_rewards.mean(), accuracy


def dpo_loss_batch(batch, policy_model, reference_model, beta):
    policy = [sequence_logprob(token_logprobs(policy_model, batch[key]), batch[f"{key}_mask"])
              for key in ("chosen", "rejected")]
    with torch.no_grad():  # the reference only scores
        reference = [sequence_logprob(token_logprobs(reference_model, batch[key]),
                                      batch[f"{key}_mask"]) for key in ("chosen", "rejected")]
    return dpo_loss(*policy, *reference, beta=beta)


def evaluate_dpo_loss_loader(policy_model, reference_model, loader, beta, num_batches=None):
    """(loss, reward margin, reward accuracy), averaged over the first num_batches."""
    policy_model.eval()
    totals, n = [0.0, 0.0, 0.0], 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            loss, chosen, rejected, accuracy = dpo_loss_batch(batch, policy_model,
                                                              reference_model, beta)
            for j, value in enumerate((loss, chosen - rejected, accuracy)):
                totals[j] += value.item()
            n += 1
    policy_model.train()
    return tuple(total / max(n, 1) for total in totals)


def train_model_dpo_simple(policy_model, reference_model, train_loader, val_loader, optimizer,
                           num_epochs, beta, eval_freq, eval_iter, shares=None):
    """The bonus's loop: one optimizer step per batch, an evaluation of the loss,
    the reward margin and (beyond the bonus) the reward accuracy every eval_freq
    steps. Returns what it tracked. Beyond the bonus: under torchrun each process
    trains on its share of every batch (`shares`, as in chapter 6) and evaluates
    the whole model on whole batches."""
    tracking = {k: [] for k in ("train_losses", "val_losses", "train_margins", "val_margins",
                                "train_accuracies", "val_accuracies", "tokens_seen",
                                "steps")}
    tokens_seen, global_step = 0, -1
    module = _unwrap(policy_model)
    for epoch in range(num_epochs):
        policy_model.train()
        for batch in tqdm(shares or train_loader, desc=f"DPO epoch {epoch + 1}", leave=False):
            optimizer.zero_grad()
            loss, _, _, _ = dpo_loss_batch(batch, policy_model, reference_model, beta)
            loss.backward()
            optimizer.step()
            tokens_seen += whole_batch_tokens(batch["chosen"])
            global_step += 1
            if global_step % eval_freq == 0:
                train = evaluate_dpo_loss_loader(module, reference_model, train_loader,
                                                 beta, eval_iter)
                val = evaluate_dpo_loss_loader(module, reference_model, val_loader, beta,
                                               eval_iter)
                for split, (split_loss, margin, accuracy) in (("train", train), ("val", val)):
                    tracking[f"{split}_losses"].append(split_loss)
                    tracking[f"{split}_margins"].append(margin)
                    tracking[f"{split}_accuracies"].append(accuracy)
                tracking["tokens_seen"].append(tokens_seen)
                tracking["steps"].append(global_step)
                tqdm.write(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train[0]:.3f}, "
                           f"Val loss {val[0]:.3f}, Train reward margins {train[1]:.5f}, Val "
                           f"reward margins {val[1]:.5f}, reward accuracy {train[2]:.2f} / "
                           f"{val[2]:.2f}")
    return tracking


# ---- Beyond the book: serving the model (--serve): a chat page and an OpenAI-style API ----
# On chapter 6's server (http.server: its limits, API key, page and model
# thread). Each request's thread streams its own tokens as the model thread
# makes them. The API follows OpenAI's chat completions, completions and models
# routes, so its official clients (and the tools built on them) talk to it.

CHAT_PAGE = Path(__file__).with_name("ch07_chat.html")


class Job:
    """One request's generation: its prompt and options in, its token ids out
    (then None); `cancelled` when its client leaves or a stop sequence ends it."""

    def __init__(self, idx, max_tokens, sampling, seed):
        self.idx, self.max_tokens, self.sampling, self.seed = idx, max_tokens, sampling, seed
        self.tokens, self.cancelled = queue.Queue(), threading.Event()


TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false",
              dict: "an object"}


def check_option(body, key, kind, low=None, high=None, default=None):
    """body[key] of the right type and range (a bool is no number), or ApiError 400."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(
            value, (int, float) if kind is float else kind):
        raise ApiError(400, f"'{key}' must be {TYPE_WORDS[kind]}, not {json.dumps(value)}.",
                       param=key, code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"'{key}' must be {bounds}, not {value}.", param=key,
                       code="invalid_value")
    return value


def request_options(body, served):
    """A request's generation options, checked: (max_tokens, sampling, seed, stop,
    stream, include_usage)."""
    ctx = served.cfg["context_length"]
    if body.get("n", 1) != 1:
        raise ApiError(400, "Only n=1 (one answer a request) is supported.", param="n",
                       code="invalid_value")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = check_option(body, key, int, 1, ctx, served.defaults["max_new_tokens"])
    sampling = {"temperature": check_option(body, "temperature", float, 0, 2,
                                            served.defaults["temperature"]),
                "top_p": check_option(body, "top_p", float, 0, 1, served.defaults["top_p"]),
                "top_k": check_option(body, "top_k", int, 1, None, served.defaults["top_k"])}
    if sampling["top_p"] is not None and sampling["top_p"] <= 0:
        raise ApiError(400, "'top_p' must be above 0.", param="top_p", code="invalid_value")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and
                                 all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings.",
                       param="stop", code="invalid_value")
    stream_options = check_option(body, "stream_options", dict, default={})
    return (max_tokens, sampling, check_option(body, "seed", int), stop or [],
            check_option(body, "stream", bool, default=False),
            bool(stream_options.get("include_usage")))


def message_text(message, i):
    """A chat message's text: a string, or a list of text parts."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "user",
                                                                       "assistant"):
        raise ApiError(400, f"messages[{i}] must be an object with a role of system, user or "
                            "assistant.", param=f"messages[{i}].role")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                 for p in content]
        content = None if None in parts else "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string (or text parts).",
                       param=f"messages[{i}].content")
    return message["role"], content


def chat_ids(messages, served, max_tokens):
    """The chapter's prompt for a conversation: system text first, then each
    user/assistant turn in the chapter's format, earlier turns dropped (the oldest
    first) while the whole does not fit the context with room for the answer."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages")
    parsed = [message_text(m, i) for i, m in enumerate(messages)]
    system = "\n\n".join(text for role, text in parsed if role == "system")
    rest = [(role, text) for role, text in parsed if role != "system"]
    roles = [role for role, _ in rest]
    if not rest or roles != ["user", "assistant"] * (len(rest) // 2) + ["user"] * (len(rest) % 2) \
            or roles[-1] != "user":
        raise ApiError(400, "After system messages, 'messages' must alternate user and "
                            "assistant turns and end with a user's.", param="messages")
    turns = [(rest[i][1], rest[i + 1][1]) for i in range(0, len(rest) - 1, 2)]
    ctx = served.cfg["context_length"]
    text = chat_text(turns, rest[-1][1], served.tokenizer, ctx, max_tokens, system)
    return prompt_fits(served.tokenizer.encode(text, disallowed_special=()), ctx,
                       "The last message")


def prompt_fits(ids, ctx, what):
    if len(ids) > ctx - 1:
        raise ApiError(400, f"{what} has {len(ids)} tokens; the model's context is {ctx}, "
                            "with at least one token for the answer.", param="messages",
                       code="context_length_exceeded")
    return ids


def completion_ids(body, served):
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string.", param="prompt")
    ids = served.tokenizer.encode(prompt, disallowed_special=()) or [EOT_ID]
    return prompt_fits(ids, served.cfg["context_length"], "The prompt")


def answer_pieces(job, served, stop, client_gone):
    """The answer's text as it comes, in pieces, then (finish_reason, completion
    tokens). Text that may begin a stop sequence waits until it cannot; a stop
    sequence ends the answer before it."""
    ids, shown, hold = [], 0, max((len(s) for s in stop), default=1) - 1
    checked = time.monotonic()
    while True:
        try:
            token = job.tokens.get(timeout=0.2)
        except queue.Empty:
            token = ...
        if time.monotonic() - checked > 0.2:  # a client that left frees the model at once
            if client_gone():
                job.cancelled.set()
                return
            checked = time.monotonic()
        if token is ...:
            continue
        if isinstance(token, ApiError):
            raise token
        if token is not None:
            ids.append(token)
        text = served.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            job.cancelled.set()
            yield text[shown:cut]
            yield ("stop", len(ids))
            return
        if token is None:
            yield text[shown:]
            yield ("length" if len(ids) == job.max_tokens else "stop", len(ids))
            return
        ready = len(text) - hold if not text.endswith("\ufffd") else shown
        if ready > shown:  # a multi-byte character is sent whole
            yield text[shown:ready]
            shown = ready


class ChatHandler(ApiHandler):
    """The routes: GET / (the chat page), GET /v1/models, POST /v1/chat/completions
    and POST /v1/completions (chapter 6's ApiHandler answers the rest)."""

    def routes(self):
        return {("GET", "/"): self.page, ("GET", "/v1/models"): self.models,
                ("POST", "/v1/chat/completions"): self.chat_completions,
                ("POST", "/v1/completions"): self.completions}

    def models(self):
        self.send_json(200, {"object": "list", "data": [model_card(self.served)]})

    def chat_completions(self):
        body = self.read_body()
        if not self.served.chat:
            raise ApiError(400, f"{self.served.name} is not instruction-finetuned: it continues "
                                "text, at POST /v1/completions.", code="model_not_chat")
        options = request_options(body, self.served)
        self.generate(chat_ids(body.get("messages"), self.served, options[0]), options, True)

    def completions(self):
        body = self.read_body()
        options = request_options(body, self.served)
        self.generate(completion_ids(body, self.served), options, False)

    def generate(self, ids, options, chat):
        max_tokens, sampling, seed, stop, stream, include_usage = options
        ctx = self.served.cfg["context_length"]
        idx = torch.tensor([ids])
        job = Job(idx, answer_room(idx, ctx, max_tokens), sampling, seed)
        self.served.submit(job)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": kind, "created": int(time.time()), "model": self.served.name}
        pieces = answer_pieces(job, self.served, stop, self.client_gone)
        try:
            if stream:
                self.stream(pieces, head, chat, len(ids), include_usage)
            else:
                text, end = "", None
                for piece in pieces:
                    if isinstance(piece, tuple):
                        end = piece
                    else:
                        text += piece
                if end is None:  # the client left
                    return
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": end[0]} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": end[0]})
                self.send_json(200, {**head, "choices": [choice],
                                     "usage": usage(len(ids), end[1])})
        finally:
            job.cancelled.set()  # however this ends, the model stops working for it

    def stream(self, pieces, head, chat, prompt_tokens, include_usage):
        """Server-sent events in OpenAI's chunk format, ending with data: [DONE]."""
        first = next(pieces, None)  # errors before the first token are answered as errors
        if first is None:  # the client left before it
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.cors_headers()
        self.end_headers()
        self.close_connection = True
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def send(data):
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def event(delta=None, finish=None):
            choice = ({"index": 0, "delta": delta or {}, "finish_reason": finish} if chat else
                      {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None,
                       "finish_reason": finish})
            send(json.dumps({**head, "choices": [choice]}))
        if chat:
            event({"role": "assistant", "content": ""})
        try:
            for piece in itertools.chain([first], pieces):
                if isinstance(piece, tuple):
                    event(finish=piece[0])
                    if include_usage:
                        send(json.dumps({**head, "choices": [],
                                         "usage": usage(prompt_tokens, piece[1])}))
                    send("[DONE]")
                elif piece:
                    event({"content": piece})
        except ApiError as err:  # after the headers: the error as the stream's last event
            send(json.dumps(err.body()))

    def client_gone(self):
        """Whether the client closed its connection (a stop button, a lost network)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True


class ServedModel(ModelWorker):
    """The model, and the thread that runs it (chapter 6's ModelWorker): each job is
    a request's generation, its tokens sent to the request's thread as they come."""
    handler, page = ChatHandler, CHAT_PAGE

    def __init__(self, model, tokenizer, device, cfg, name, chat, defaults, max_queue=16):
        self.model, self.tokenizer, self.device, self.cfg = model, tokenizer, device, cfg
        self.name, self.chat, self.defaults = name, chat, defaults
        super().__init__(max_queue)

    def work(self, job):
        try:
            if job.cancelled.is_set():
                return
            if job.seed is not None:
                torch.manual_seed(job.seed)
            for token in generate_stream(self.model, job.idx.to(self.device), job.max_tokens,
                                         self.cfg["context_length"], eos_id=EOT_ID,
                                         **job.sampling):
                if job.cancelled.is_set():
                    break
                job.tokens.put(int(token))
        except Exception as err:  # a failed generation is its request's error, not ours
            job.tokens.put(ApiError(500, f"Generation failed: {err}", kind="server_error"))
        finally:
            job.tokens.put(None)

    def refuse(self, job, err):
        job.tokens.put(err)


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(served):
    """GET /v1/models' entry: OpenAI's fields, and what the page shows and sends."""
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "ch07_instruct.py",
            "context_length": served.cfg["context_length"], "chat": served.chat,
            "defaults": served.defaults}


def load_served_model(settings, device):
    """(model, tokenizer, cfg, name, chat): the model --serve serves, as --chat
    finds it; or --model-file: a finetuned model (chat), a chapter-5 checkpoint or
    a GPT-2 size such as 124M (text, at the completions route)."""
    choice = settings["model_file"]
    if choice in ALLOWED_SIZES and not Path(choice).exists():
        model, cfg = load_gpt2_model(choice, settings["models_dir"])
        return model.to(device).eval(), cfg, f"gpt2-{choice}", False
    path = Path(choice) if choice else saved_model_path(settings)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: finetune one first (`python "
                                f"ch07_instruct.py --out {path.parent}`), or give "
                                "--model-file FILE (or a GPT-2 size such as 124M).")
    chat = load_checkpoint(path, mmap=True)["kind"] == "instruct"
    model, cfg, _, _ = load_text_model(path, device, flag="--model-file")
    return model, cfg, path.stem, chat


def serve(settings):
    """--serve: the chat page and the API until Ctrl-C or SIGTERM, which stop taking
    requests and end the answers under way; then exit 0."""
    device = get_device(settings["device"])
    model, cfg, name, chat = load_served_model(settings, device)
    served = ServedModel(model, bpe_tokenizer(settings["models_dir"]), device, cfg, name, chat,
                         {"max_new_tokens": settings["max_new_tokens"], **sampling_of(settings)},
                         settings["max_queue"])
    url = serve_until_stopped(served, settings, lambda url: (
        f"Serving {name} ({'chat' if chat else 'text'}, context {cfg['context_length']}) at "
        f"{url}/ : the chat page there, the OpenAI-style API at {url}/v1"))
    return {"url": url, "name": name}


# ---- The chapter's run ----

def evaluate_saved(responses_path, settings):
    """--evaluate: score the saved responses, holding --out's run lock."""
    responses_path = Path(responses_path)
    if not responses_path.exists():
        raise FileNotFoundError(f"No responses to score at {responses_path}; finetune first "
                                "with `python ch07_instruct.py`.")
    with run_lock(responses_path.parent, RESULTS):
        return score_responses(responses_path, settings)


def score_responses(responses_path, settings):
    """Score the responses with the judge, going on from the scores saved beside them."""
    test_data = read_json(responses_path, "It is written by a finetuning run: run one again "
                                          f"with --overwrite --out {responses_path.parent}.")
    check_entries(test_data, responses_path)
    without = [i for i, e in enumerate(test_data) if not isinstance(e.get("model_response"), str)]
    if without:
        raise ValueError(f"Entry {without[0]} of {responses_path} has no model_response text.")
    if not check_if_running(settings["judge_url"]):
        raise JudgeUnavailable(f"No server answered at {settings['judge_url']}. "
                               f"{start_judge(settings)}; the responses stay in "
                               f"{responses_path}.")
    scores = generate_model_scores(test_data, "model_response", scores_path=scores_of(
        responses_path), overwrite=settings["overwrite"], workers=settings["workers"],
        client=judge_client(settings, responses_path.parent))
    average = sum(scores) / len(scores) if scores else float("nan")
    print(f"Number of scores: {len(scores)} of {len(test_data)}")
    print(f"Average score: {average:.2f}")
    return {"scores": scores, "average": average}


# What a run writes in --out (a killed run's temporary files of these are removed)
RESULTS = ("*.pth", "*.json", "*.png")


def start_judge(settings):
    """How to get the judge of --judge-url going, in the user's words."""
    if ModelClient(settings["judge_url"], "", settings["api_style"]).style == "ollama":
        return (f"Start one with `ollama serve` and `ollama pull {settings['judge_model']}`, "
                "or give --judge-url")
    return "Start it, or give another --judge-url"


def responses_of(model_path):
    """The test responses a model file's run wrote: the chapter's file for a
    finetuned model, instruction-data-with-dpo-response.json for a DPO one."""
    model_path = Path(model_path)
    dpo = model_path.name.endswith("-dpo.pth")
    return model_path.with_name(f"instruction-data-with-{'dpo-' if dpo else ''}response.json")


def scores_of(responses_path):
    """scores.json beside the chapter's responses; scores-dpo.json beside the DPO ones."""
    return responses_path.with_name("scores-dpo.json" if "-dpo-" in responses_path.name
                                    else "scores.json")


def run_dpo(settings):
    """--dpo: tune the finetuned model with the preference data, save it in --out as
    NAME-dpo.pth, and write its responses to the test set (the preference file's
    entries are the chapter's, in the same order). A DPO model whose responses
    were not written (the run was stopped) gets them, without tuning again."""
    out_dir = Path(settings["out"])
    sft_path = Path(settings["model_file"] or saved_model_path(settings))
    if not sft_path.exists():
        raise FileNotFoundError(f"--dpo tunes a model this command finetuned, and there is none "
                                f"at {sft_path}: finetune one first (`python ch07_instruct.py "
                                f"--out {out_dir}`), or name it with --model-file.")
    dpo_path = out_dir / (sft_path.name.removesuffix("-sft.pth").removesuffix(".pth") +
                          "-dpo.pth")
    source = settings["preference_data"] or "the bonus's preference file"
    splits = checked_splits(load_preference_data(settings["preference_data"], settings["data_dir"]),
                            settings["limit"], source)  # before the model: a bad file costs nothing
    rank, world_size, device = processes(settings, "ch07_instruct.py --dpo")
    with run_lock(out_dir, RESULTS) if rank == 0 else contextlib.nullcontext():
        responses_path = responses_of(dpo_path)
        if world_size == 1 and responses_missing(dpo_path, responses_path,
                                                 settings["overwrite"]):
            return respond_again(dpo_path, splits[1], responses_path, settings)
        earlier = agree(lambda: refuse_overwrite(
            [dpo_path, responses_path, scores_of(responses_path)], settings["overwrite"],
            f"Chat with it with --chat --model-file {dpo_path}, or keep it and tune into "
            "another --out. ", also=[out_dir / name for name in DPO_PLOTS]), rank)
        try:
            result = tune_with_dpo(settings, sft_path, dpo_path, splits, earlier, device)
            wait_for_all()
        finally:
            end_processes()
        if rank == 0:
            earlier.retire()
        return result


def responses_missing(model_path, responses_path, overwrite):
    """A model saved by a run that was stopped before its responses were written."""
    return not overwrite and model_path.exists() and not responses_path.exists()


def respond_again(model_path, test_data, responses_path, settings):
    """Write the test responses of a model saved earlier, as its run would have."""
    print(f"{model_path} has no responses yet ({responses_path.name}): writing them; "
          "it is not trained again (--overwrite trains anew).")
    device = get_device(settings["device"])
    model, saved = load_finetuned(model_path, device)
    write_responses(model, test_data, bpe_tokenizer(saved["models_dir"]), device,
                    saved["cfg"]["context_length"], settings["max_new_tokens"], responses_path,
                    **sampling_of(settings))
    return {"model": model, "path": model_path, "responses": responses_path}


DPO_PLOTS = ("dpo-loss-plot.png", "dpo-margins-plot.png")
# The bonus's settings, where the chapter's flags were not given
DPO_DEFAULTS = {"lr": 5e-6, "weight_decay": 0.01, "epochs": 1}


def tune_with_dpo(settings, sft_path, dpo_path, splits, earlier, device):
    """The bonus's run: the finetuned model and its frozen reference, the preference
    batches, training, the plots, the model saved as dpo_path, its test responses.
    Under torchrun (beyond the bonus) each process takes a share of every batch,
    the policy copied (DDP) or sharded (--fsdp, the reference sharded too); the
    first process writes."""
    hp = settings["dpo_hp"]
    policy, reference, saved, plan = dpo_models(sft_path, device, settings)
    cfg = saved.pop("cfg")
    tokenizer = bpe_tokenizer(saved["models_dir"])
    train_loader, val_loader = dpo_loaders(splits, tokenizer, cfg, device, settings)
    print(run_header(sft_path, policy, cfg, " / ".join(str(len(s)) for s in splits) +
                     " preference pairs (training / test / validation)", dpo_path.parent))
    print(f"DPO: beta {settings['beta']:g}, learning rate {hp['lr']:g}" +
          (" (the bonus's value, chosen there for GPT-2 355M: --lr sets another)"
           if hp["lr"] == DPO_DEFAULTS["lr"] else "") +
          f", weight decay {hp['weight_decay']:g}, {hp['epochs']} epoch(s)")
    policy.train()
    for name, loader in (("Training", train_loader), ("Validation", val_loader)):
        loss, margin, accuracy = evaluate_dpo_loss_loader(policy, reference, loader,
                                                          settings["beta"], settings["eval_iter"])
        print(f"{name} before DPO: loss {loss:.3f}, reward margin {margin:.3f}, reward "
              f"accuracy {accuracy:.2f}")
    if is_sharded(policy):  # the optimizer must see the sharded parameters, not gathered ones
        policy.reshard()
    torch.manual_seed(settings["seed"])
    optimizer = make_optimizer(policy, hp["lr"], hp["weight_decay"], plan["fused_adamw"])
    start = time.perf_counter()
    policy, shares = share_training(policy, train_loader, settings, device)
    tracking = train_model_dpo_simple(policy, reference, train_loader, val_loader, optimizer,
                                      hp["epochs"], settings["beta"], settings["eval_freq"],
                                      settings["eval_iter"], shares)
    print(f"DPO took {(time.perf_counter() - start) / 60:.2f} minutes.")
    saved["dpo"] = {"from": str(sft_path), "beta": settings["beta"], **hp,
                    "preference_data": str(settings["preference_data"] or "the bonus's file")}
    policy = save_finetuned(dpo_path, _unwrap(policy), cfg, saved, device=device,
                            what="a model tuned with DPO by ch07_instruct.py")
    if policy is None:  # the first process writes the plots and the responses
        return {"tracking": tracking, "path": dpo_path}
    if tracking["train_losses"]:  # each evaluation at the epochs its step has seen
        steps = torch.tensor([(s + 1) / len(train_loader) for s in tracking["steps"]])
        for label, key, name in (("DPO loss", "losses", "dpo-loss-plot.png"),
                                 ("reward margin", "margins", "dpo-margins-plot.png")):
            plot_values(steps, tracking["tokens_seen"], tracking[f"train_{key}"],
                        tracking[f"val_{key}"], label, dpo_path.parent / name)
    earlier.retire(responses_of(dpo_path), scores_of(responses_of(dpo_path)))  # another model's
    write_responses(policy, splits[1], tokenizer, device, cfg["context_length"],
                    settings["max_new_tokens"], responses_of(dpo_path), **sampling_of(settings))
    print(f"Score them with `python ch07_instruct.py --evaluate --model-file {dpo_path}`, as "
          "the finetuned model's: the same test entries, the same judge.")
    return {"model": policy, "reference": reference, "tracking": tracking, "path": dpo_path}


def dpo_models(sft_path, device, settings):
    """(the policy: the finetuned model, with LoRA if asked; the reference: a
    frozen copy; the saved model's settings; the speed plan)."""
    policy, saved = load_finetuned(sft_path, device)
    if settings["lora"] and not saved["lora_rank"]:
        torch.manual_seed(settings["seed"])
        freeze_and_add_lora(policy, settings["rank"], settings["alpha"], say=print)
        saved.update(lora_rank=settings["rank"], lora_alpha=settings["alpha"])
    if settings["fsdp"] and saved["lora_rank"]:
        raise ValueError(f"--fsdp with a LoRA model ({sft_path}) is not supported: LoRA's "
                         "small matrices train well with DDP (torchrun without --fsdp).")
    reference = copy.deepcopy(policy).eval()  # frozen: DPO measures against it
    for param in reference.parameters():
        param.requires_grad_(False)
    plan = speed_up_finetuning(policy, settings["fast"], device)
    speed_up(reference, plan, device)
    if settings["fsdp"]:  # the reference sharded like the policy: neither is whole anywhere
        shard_model(policy, plan)
        shard_model(reference, plan)
    return policy, reference, saved, plan


def dpo_loaders(splits, tokenizer, cfg, device, settings):
    """The training and validation preference batches (the bonus's collate)."""
    train_data, _, val_data = splits
    collate = partial(preference_collate_fn, allowed_max_length=cfg["context_length"],
                      device=device)
    torch.manual_seed(settings["seed"])
    batch_size = settings["batch_size"]
    train_loader = DataLoader(PreferenceDataset(train_data, tokenizer), batch_size=batch_size,
                              collate_fn=collate, shuffle=True, drop_last=True)
    val_loader = DataLoader(PreferenceDataset(val_data, tokenizer), batch_size=batch_size,
                            collate_fn=collate)
    if len(train_loader) == 0 or len(val_loader) == 0:
        raise ValueError(f"{len(train_data)} training and {len(val_data)} validation pairs do "
                         f"not fill a batch of {batch_size}; lower --batch-size or raise "
                         "--limit.")
    return train_loader, val_loader


def main(args):
    return run(instruct_settings(args))


def instruct_settings(args):
    """The command's settings, resolved once: chapter 6's, with DPO's own defaults
    (the bonus's) for the flags not given."""
    settings = finetuning_settings(args)
    given = getattr(args, "given", set())
    settings["dpo_hp"] = {k: settings[k] if k in given else v for k, v in DPO_DEFAULTS.items()}
    # --api-key: the key --serve asks of its clients, or else the one sent to the judge
    settings["judge_key"] = settings["api_key"] or os.environ.get("OPENAI_API_KEY") or None
    settings["api_key"] = settings["api_key"] or os.environ.get("API_KEY") or None
    modes = [f"--{m.replace('_', '-')}" for m in ("evaluate", "dpo", "chat", "serve",
                                                  "compare_judges") if settings[m]]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are different tasks: give one.")
    return settings


def run(settings):
    """The command: score, tune with DPO, chat, or finetune."""
    out_dir = Path(settings["out"])
    responses_path = out_dir / "instruction-data-with-response.json"
    modes = [f"--{m.replace('_', '-')}" for m in ("evaluate", "chat", "serve", "compare_judges")
             if settings[m]]
    if modes and launched_processes() > 1:
        raise ValueError(f"Under torchrun, ch07_instruct.py finetunes (and tunes with --dpo); run {modes[0]} as one "
                         "process (python ch07_instruct.py ...).")
    if settings["compare_judges"]:
        return compare_judges(*settings["compare_judges"])
    if settings["evaluate"]:
        return evaluate_saved(responses_of(settings["model_file"]) if settings["model_file"]
                              else responses_path, settings)
    if settings["dpo"]:
        return run_dpo(settings)
    if settings["chat"]:
        return chat_with_saved(settings)
    if settings["serve"]:
        return serve(settings)
    model_path = out_dir / model_name(settings)
    rank, world_size, device = processes(settings, "ch07_instruct.py")
    splits = load_splits(settings)  # before the lock and the model: a bad file costs nothing
    with run_lock(out_dir, RESULTS) if rank == 0 else contextlib.nullcontext():
        if world_size == 1 and responses_missing(model_path, responses_path,
                                                 settings["overwrite"]):
            return respond_again(model_path, splits[1], responses_path, settings)
        earlier = agree(lambda: refuse_overwrite(
            [model_path, responses_path, out_dir / "scores.json"], settings["overwrite"],
            "Use it with --chat, or keep it and train into another --out. ",
            also=[out_dir / "loss-plot.png"]), rank)
        try:
            result = finetune(settings, model_path, responses_path, splits, earlier,
                              (rank, world_size, device))
            wait_for_all()
        finally:
            end_processes()
        if rank == 0:
            earlier.retire()
        return result


def chat_with_saved(settings):
    """--chat: the saved model (--model-file, or the one finetuned in --out)."""
    device = get_device(settings["device"])
    model, saved = load_finetuned(settings["model_file"] or saved_model_path(settings), device)
    tokenizer = bpe_tokenizer(saved["models_dir"])
    print("Chat with the finetuned model. Earlier turns stay while they fit (/reset forgets "
          "them, /help lists the commands); Ctrl-C stops an answer; an empty line, Ctrl-D or "
          "Ctrl-C at the prompt ends the chat.")
    return {"responses": chat(model, tokenizer, device, saved["cfg"]["context_length"],
                              settings["max_new_tokens"], **sampling_of(settings))}


def model_name(settings):
    """gpt2-SIZE-sft.pth for GPT-2 (or its random twin), NAME-sft.pth for --init-from NAME.pt."""
    name = Path(settings["init_from"]).stem if settings["init_from"] else \
        f"gpt2-{settings['model_size']}"
    return f"{name}-sft.pth"


def saved_model_path(settings):
    """The finetuned model that --chat talks to: this --model-size's, or else the one
    model a finetuning run saved in --out; several are named, to choose one."""
    out_dir = Path(settings["out"])
    path = out_dir / model_name(settings)
    found = sorted(out_dir.glob("*-sft.pth"))
    if path.exists() or not found:
        return path
    if len(found) == 1:
        print(f"Using {found[0]}, the model finetuned in {out_dir}.")
        return found[0]
    raise FileNotFoundError(f"No {path.name} in {out_dir}, which holds "
                            f"{', '.join(p.name for p in found)}: give the --model-size (or "
                            "--init-from) it was finetuned with.")


def finetune(settings, model_path, responses_path, splits, earlier, ranks=None):
    """The chapter's run: finetune, save the model, write the test set's responses
    and score them when a judge answers. `earlier`: an earlier run's files, each
    replaced as its new one is written (EarlierResults). `ranks`: (rank, processes,
    device) under torchrun; the first process writes every file."""
    rank, world_size, device = ranks or (0, 1, get_device(settings["device"]))
    out_dir, is_main = Path(settings["out"]), rank == 0
    start = time.perf_counter()
    train_data, test_data, val_data = splits
    tokenizer = bpe_tokenizer(settings["models_dir"])
    # 7.5 Loading a pretrained LLM
    model, cfg = base_model(settings, "its responses will be gibberish. Use it to try the "
                                      "pipeline, not the model")
    if settings["lora"]:  # exercise 7.4: only the LoRA matrices train
        torch.manual_seed(settings["seed"])
        freeze_and_add_lora(model, settings["rank"], settings["alpha"], say=print)
    model.to(device)
    plan = speed_up_finetuning(model, settings["fast"], device)
    if settings["fsdp"]:
        shard_model(model, plan)
    train_loader, val_loader = instruction_loaders(train_data, val_data, tokenizer, cfg, device,
                                                   settings)  # 7.4
    print(run_header(base_model_name(settings), model, cfg,
                     f"{len(train_data)} / {len(val_data)} / {len(test_data)} entries", out_dir))
    torch.manual_seed(settings["seed"])
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=5)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=5)
    print(f"Training loss before finetuning: {train_loss:.3f}, validation loss: {val_loss:.3f}")
    if is_sharded(model):  # the optimizer must see the sharded parameters, not gathered ones
        model.reshard()

    # 7.6 Fine-tuning the LLM on instruction data
    torch.manual_seed(settings["seed"])
    optimizer = make_optimizer(model, settings["lr"], settings["weight_decay"],
                               plan["fused_adamw"])
    options = dict(num_epochs=settings["epochs"], eval_freq=settings["eval_freq"],
                   eval_iter=settings["eval_iter"], start_context=format_input(val_data[0]),
                   tokenizer=tokenizer)
    if world_size == 1:
        train_losses, val_losses, tokens_seen = train_model_simple(
            model, train_loader, val_loader, optimizer, device, **options)
    else:  # beyond the book: each process a share of every batch, one process's steps
        model, shares = share_training(model, train_loader, settings, device)
        train_losses, val_losses, tokens_seen = train_model_shared(
            model, shares, (train_loader, val_loader), optimizer, device, **options)
        model = _unwrap(model)
    print(f"Training completed in {(time.perf_counter() - start) / 60:.2f} minutes.")
    if train_losses and is_main:
        plot_losses(torch.linspace(0, settings["epochs"], len(train_losses)), tokens_seen,
                    train_losses, val_losses, out_dir / "loss-plot.png")
    saved = {"model_size": settings["model_size"], "models_dir": str(settings["models_dir"]),
             "init_from": settings["init_from"],
             "lora_rank": settings["rank"] if settings["lora"] else None,
             "lora_alpha": settings["alpha"], "mask_instructions": settings["mask_instructions"]}
    model = save_finetuned(model_path, model, cfg, saved, device=device,
                           what="an instruction-finetuned model of ch07_instruct.py")
    result = {"model": model, "train_losses": train_losses, "val_losses": val_losses,
              "test_data": test_data}
    if not is_main:  # the first process writes the responses and scores them
        return result
    earlier.retire(responses_path, out_dir / "scores.json")  # the earlier model's, not this one's
    write_responses(model, test_data, tokenizer, device, cfg["context_length"],
                    settings["max_new_tokens"], responses_path, **sampling_of(settings))
    if check_if_running(settings["judge_url"]):
        result.update(score_responses(responses_path, settings))
    else:
        print(f"No judge answered at {settings['judge_url']}: to score the responses later, "
              f"{start_judge(settings)[0].lower() + start_judge(settings)[1:]}, and run "
              f"`python ch07_instruct.py --evaluate --out {out_dir}`.")
    print(f"Total run time: {(time.perf_counter() - start) / 60:.2f} minutes.")
    return result


def instruction_loaders(train_data, val_data, tokenizer, cfg, device, settings):
    """7.4's training and validation loaders (the book's collate)."""
    collate = partial(custom_collate_fn, device=device, allowed_max_length=cfg["context_length"])
    make_loader = lambda data, train: DataLoader(  # noqa: E731
        InstructionDataset(data, tokenizer, mask_instructions=settings["mask_instructions"]),
        batch_size=settings["batch_size"], collate_fn=collate, shuffle=train, drop_last=train)
    torch.manual_seed(settings["seed"])
    train_loader, val_loader = make_loader(train_data, True), make_loader(val_data, False)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_data)} training entries do not fill one batch of "
                         f"{settings['batch_size']}; lower --batch-size or raise --limit.")
    return train_loader, val_loader


def save_finetuned(path, model, cfg, saved, what, device="cpu"):
    """Save the model with `saved` (its settings) as `what`: the first process,
    a sharded model gathered to it first. Returns the model whole on the first
    process (a sharded one as a model of its own on `device`, to write the
    responses with) and None on the others."""
    state = whole_model_state(model)
    if process_rank() != 0:
        return None
    save_checkpoint(path, model_file("instruct", state, cfg, saved, what=what))
    print(f"Model saved as {path}")
    if is_sharded(model):
        model = build_model(cfg, saved["lora_rank"], saved["lora_alpha"])
        model.load_state_dict(state)
        model.to(device)
    return model


def load_splits(settings):
    """The book's training, test and validation entries (cut to --limit each)."""
    data_path = Path(settings["data"] or Path(settings["data_dir"]) / "instruction-data.json")
    data = download_and_load_file(data_path, DATA_URL)
    print("Number of entries:", len(data))
    train_data, test_data, val_data = checked_splits(data, settings["limit"], data_path)
    print(f"Training set length: {len(train_data)}, validation: {len(val_data)}, "
          f"test: {len(test_data)}")
    return train_data, test_data, val_data


def checked_splits(data, limit, source):
    """split_data's training, test and validation entries, cut to `limit` each;
    too few entries for any of the three are named."""
    splits = [split[:limit] if limit else split for split in split_data(data)]
    if not all(splits):
        raise ValueError(f"{source} has {len(data)} entries: too few for the book's "
                         "training, test and validation splits (85%, 10%, 5%); it needs at "
                         "least 20 (the book's file has 1,100).")
    return splits


def write_responses(model, test_data, tokenizer, device, context_size, max_new_tokens, path,
                    **sampling):
    """The finetuned model's response to each test entry, saved with the entries
    (greedy, as the book's, unless --temperature says otherwise)."""
    model.eval()
    for entry in tqdm(test_data, desc="Generating test responses"):
        entry["model_response"] = generate_response(model, entry, tokenizer, device,
                                                    context_size, max_new_tokens, **sampling)
    write_text_atomic(path, json.dumps(test_data, indent=4))
    print(f"Responses saved as {path}")
    for entry in test_data[:3]:
        print(f"\n{format_input(entry)}\n\nCorrect response:\n>> {entry['output']}\n\n"
              f"Model response:\n>> {entry['model_response']}\n" + "-" * 40)


def build_parser():
    parser = FlagsTypedParser(
        description="Instruction-finetune GPT-2 (the book's chapter 7), write responses for "
                    "the test set, score them with a judge model, or chat with the result.",
        formatter_class=HelpFormatter,
        epilog=('examples: python ch07_instruct.py --model-size tiny --no-pretrained '
                '--limit 40 --max-new-tokens 20 (about a minute);  python '
                'ch07_instruct.py --chat'))
    parser.add_argument("--data", default=None, metavar="JSON",
                        help="a local instruction-data.json; default: download it")
    parser.add_argument("--data-dir", default="data", help="folder for downloaded data")
    parser.add_argument("--limit", type=number(int, at_least=1), default=None,
                        help="use only the first N entries of each split (quick runs)")
    parser.add_argument("--mask-instructions", action="store_true",
                        help="compute the loss on the response tokens only (exercise 7.2)")
    add_finetuning_arguments(parser, model_size="355M", epochs=2, batch_size=8, eval_freq=5,
                             batch_unit="entries",
                             overwrite_help="replace the model, responses and scores an earlier "
                                            "run saved in --out; with --evaluate, score the "
                                            "responses anew")
    add_sampling_arguments(parser, max_new_tokens=256, temperature=0.0, top_k=None,
                           max_new_help="longest response to generate (responses also stop "
                                        "at the model's context)")
    parser.add_argument("--out", default="runs/ch07",
                        help="folder for the finetuned model, responses and plots")
    parser.add_argument("--evaluate", action="store_true",
                        help="only score the saved responses with the judge model")
    parser.add_argument("--compare-judges", nargs=2, metavar=("A.json", "B.json"), default=None,
                        help="compare two judges' scores.json of the same responses: their "
                             "means, Spearman's and Kendall's rank correlations, and the "
                             "entries they score 50 or more points apart")
    judge = parser.add_argument_group(
        "the judge (beyond the book: Ollama, or any OpenAI-style server)")
    judge.add_argument("--judge-url", "--ollama-url", dest="judge_url", default=OLLAMA_URL,
                       metavar="URL",
                       help="the judge's chat endpoint: Ollama's …/api/chat, or an OpenAI-style "
                            "…/v1 (OpenAI, Ollama's /v1, vLLM, llama.cpp, --serve)")
    judge.add_argument("--judge-model", default="llama3", metavar="NAME",
                       help="the model that scores")
    add_client_arguments(judge, "the judge")
    parser.add_argument("--chat", action="store_true",
                        help="chat with the saved finetuned model (empty line or Ctrl-D ends)")
    parser.add_argument("--model-file", metavar="FILE", default=None,
                        help="the model --chat talks to, --evaluate scores the responses of, or "
                             "--dpo tunes (default: the one finetuned in --out)")
    srv = parser.add_argument_group("serving (beyond the book): a chat page and an "
                                    "OpenAI-style API")
    srv.add_argument("--serve", action="store_true",
                     help="serve the model --chat talks to (or --model-file: also a "
                          "ch05_train.py checkpoint or a GPT-2 size such as 124M, which "
                          "continue text) at http://HOST:PORT/, until Ctrl-C")
    add_server_arguments(srv, "with --serve, the key every API request must send as "
                              "'Authorization: Bearer KEY' (default: $API_KEY; none on this "
                              "machine's address); when judging, the key sent to an OpenAI-style "
                              "judge (default: $OPENAI_API_KEY); never printed or saved")
    dpo = parser.add_argument_group("preference tuning with DPO (beyond the book: the "
                                    "chapter's bonus)")
    dpo.add_argument("--dpo", action="store_true",
                     help="tune the finetuned model with Direct Preference Optimization, save "
                          "it as NAME-dpo.pth and write its test responses; the bonus's "
                          "settings unless given: --lr 5e-6, --weight-decay 0.01, --epochs 1")
    dpo.add_argument("--beta", type=number(float, above=0), default=0.1,
                     help="how far the tuned model may move from the reference")
    dpo.add_argument("--preference-data", metavar="JSON", default=None,
                     help="entries with instruction, input, chosen and rejected; default: the "
                          "bonus's instruction-data-with-preference.json, downloaded into "
                          "--data-dir")
    return parser


def kept_when_stopped(settings):
    """What an interrupted run of this command kept, in its words."""
    if settings["evaluate"]:
        return ("The scores obtained so far are kept; --evaluate again goes on from them.")
    return ("Each file is written whole or not at all: what this run finished (the model, "
            "its responses) is kept, and an earlier run's files that it had not replaced yet "
            "are as they were. Run the same command again to write what is missing.")


def parse_args(argv=None):
    return parse_finetuning_args(build_parser(), argv)


if __name__ == "__main__":
    run_command(main, parse_args(), kept_when_stopped,
                errors=(ValueError, OSError, JudgeUnavailable))
