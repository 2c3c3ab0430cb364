"""Chapter 7's dataset tools (the chapter's bonus material), beside ch07_instruct.py.

Finding near-duplicate entries of an instruction file, as the bonus's
find-near-duplicates.py does (character 1-3-gram TF-IDF, cosine above 0.75), but
block by block on sparse rows, so that memory stays bounded for Alpaca's 52,000
entries, and with the pairs indexed into the file (`find_near_duplicates`,
`remove_near_duplicates`). Then, through chapter 7's client for Ollama and
OpenAI-style servers (ch07_instruct.py's `ModelClient`): new entries written by a
model (`generate_entries`, the bonus's Llama 3 method), entries rewritten
(`rewrite_entries`: passive voice, reflection, or a prompt of your own), and a
preference file for DPO made from an instruction file (`make_preferences`, the
bonus's polite/impolite rewrites).

Run:  python ch07_data.py --find-duplicates instruction-data.json
      python ch07_data.py --find-duplicates data.json --remove-duplicates clean.json
      python ch07_data.py --generate-data 200 --data-out new.json
      python ch07_data.py --rewrite data.json --style passive --data-out passive.json
      python ch07_data.py --make-preferences data.json --data-out preferences.json
Imports from ch02_data.py (files, the command's frame) and ch07_instruct.py
(the entries' checks, format_input, the model client). Needs scikit-learn for
the TF-IDF vectors.
"""
import argparse
import json
import os
import random
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ch02_data import (HelpFormatter, check_output_file, number, read_json, run_command,
                       write_text_atomic)
from ch07_instruct import (OLLAMA_URL, JudgeUnavailable, ModelClient, add_client_arguments,
                           as_answered, check_entries, format_input)

FIELDS = ("instruction", "input", "output")


# ---- Near-duplicates (the bonus's method, block by block) ----

def preprocess_text(text):
    # the bonus's: lowercase, and punctuation removed
    return re.sub(r"[^\w\s]", "", text.lower())


def tfidf_rows(texts):
    """The bonus's vectors: scikit-learn's TfidfVectorizer of character 1-3-grams with
    its defaults (smooth idf, raw counts, rows of length 1), as a sparse matrix."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError:
        raise ValueError("Finding near-duplicates needs scikit-learn: pip install "
                         "scikit-learn") from None
    return TfidfVectorizer(stop_words=None, analyzer="char", ngram_range=(1, 3)).fit_transform(
        texts).tocsr()


def similar_pairs(rows, threshold, block_cells=4_000_000, dense_features=512):
    """(i, j, cosine) for i < j with cosine above threshold, in the order of i, then
    j. Rows of length 1 make the cosine a dot product; a block of rows is compared
    with the rows from its first on, so at most block_cells similarities are held.
    The n-grams most texts share (single letters, the space) are multiplied as a
    dense matrix (dense_features columns: BLAS is fast there), the rest sparse."""
    n, width = rows.shape
    in_texts = np.bincount(rows.indices, minlength=width)  # how many texts hold each n-gram
    common = np.argsort(-in_texts, kind="stable")[:dense_features]
    rare = np.setdiff1d(np.arange(width), common)
    dense, sparse = rows[:, np.sort(common)].toarray(), rows[:, rare].tocsr()  # (n, <=512), (n, rest)
    block = max(1, block_cells // max(n, 1))
    pairs = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = dense[start:stop] @ dense[start:].T  # (block, n - start)
        sims += (sparse[start:stop] @ sparse[start:].T).toarray()
        i, j = np.nonzero(sims > threshold)
        later = j > i  # each pair once, and no text with itself
        pairs += [(start + int(a), start + int(b), float(sims[a, b]))
                  for a, b in zip(i[later], j[later])]
    return pairs


def find_near_duplicates(entries, threshold=0.75, field="instruction"):
    """The pairs of entries whose `field` texts are near-duplicates: (i, j, cosine),
    i < j indexing `entries`. As the bonus: the vectors are fitted on the non-empty
    texts, and texts of one character are in no pair; unlike it, i and j index the
    entries even where some texts are empty."""
    kept = [k for k, entry in enumerate(entries) if entry.get(field)]
    if not kept:
        return []
    rows = tfidf_rows([preprocess_text(entries[k][field]) for k in kept])
    return [(kept[a], kept[b], s) for a, b, s in similar_pairs(rows, threshold)
            if len(entries[kept[a]][field]) > 1 and len(entries[kept[b]][field]) > 1]


def remove_near_duplicates(entries, threshold=0.75, fields=FIELDS):
    """The bonus's removal: field by field, the later entry of each near-duplicate
    pair of `input` or `output` texts leaves (instructions are compared, never
    removed). Returns (the entries kept, the pairs found as (field, i, j, cosine)
    with i and j indexing the original entries)."""
    index = list(range(len(entries)))  # position in the kept list -> in the file
    found = []
    for field in fields:
        pairs = find_near_duplicates(entries, threshold, field)
        found += [(field, index[i], index[j], s) for i, j, s in pairs]
        if field in ("input", "output"):
            gone = {j for _, j, _ in pairs}
            index = [k for pos, k in enumerate(index) if pos not in gone]
            entries = [e for pos, e in enumerate(entries) if pos not in gone]
    return entries, found


def report_pairs(entries, pairs, shown=5):
    """Each field's count of pairs, and its first few, as the bonus prints them."""
    for field in dict.fromkeys(f for f, *_ in pairs):
        mine = [p for p in pairs if p[0] == field]
        print(f"\n==== {field}: {len(mine)} near-duplicate pair(s)")
        for _, i, j, s in mine[:shown]:
            print(f"  {s:.3f}  entry {i}: {entries[i][field][:70]!r}\n"
                  f"         entry {j}: {entries[j][field][:70]!r}")
        if len(mine) > shown:
            print(f"  ... and {len(mine) - shown} more (--json writes them all)")


def read_entries(path):
    """The entries of a JSON file in the chapter's format, checked (one line each)."""
    data = read_json(path, "Give a JSON list of entries (instruction, input, output).")
    check_entries(data, path)
    return data


def duplicates(settings):
    """--find-duplicates (and --remove-duplicates): find, report and write."""
    for flag in ("json", "remove_duplicates"):
        if settings[flag]:
            check_output_file(settings[flag], settings["overwrite"],
                              "--" + flag.replace("_", "-"))
    entries = read_entries(settings["find_duplicates"])
    fields = settings["fields"]
    if settings["remove_duplicates"]:
        kept, pairs = remove_near_duplicates(entries, settings["threshold"], fields)
    else:
        kept, pairs = entries, [(field, i, j, s) for field in fields
                                for i, j, s in find_near_duplicates(entries,
                                                                    settings["threshold"], field)]
    print(f"{settings['find_duplicates']}: {len(entries)} entries; {len(pairs)} near-duplicate "
          f"pair(s) with a cosine above {settings['threshold']:g} in {', '.join(fields)}")
    report_pairs(entries, pairs)
    if settings["json"]:
        write_text_atomic(settings["json"], json.dumps(
            [{"field": f, "i": i, "j": j, "similarity": s} for f, i, j, s in pairs], indent=2))
        print(f"Wrote the pairs to {settings['json']}")
    if settings["remove_duplicates"]:
        write_text_atomic(settings["remove_duplicates"], json.dumps(kept, indent=4))
        print(f"Wrote {len(kept)} entries ({len(entries) - len(kept)} removed) to "
              f"{settings['remove_duplicates']}")
    return {"pairs": pairs, "kept": kept}


# ---- Beyond the bonus: entries made, rewritten and paired by a model ----
# Each asks a model through ModelClient (retries, a cache beside --data-out, so a
# rerun pays nothing twice) with --workers requests in flight, and writes
# --data-out again, whole, after every finished entry: a stopped run keeps them.

LLAMA3_USER_HEADER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
NEW_TASK_PROMPT = ("Write one new, self-contained instruction that a user might give an AI "
                   "assistant: a task, a question or a request, in one line. Return only the "
                   "instruction, nothing else.")
PASSIVE_PROMPT = ("Rewrite the following text in the passive voice, keeping its meaning. "
                  "Return only the rewritten text, nothing else.\n\n{text}")
REFLECT_PROMPT = ("Below is an instruction and a response to it.\n\n{prompt}\n\n### "
                  "Response:\n{text}\n\nFirst criticise the response in a few sentences: "
                  "is it correct, complete, clear and helpful? Then write an improved response "
                  "on the lines after one that says exactly IMPROVED:")
POLITENESS_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, slightly "
                     "rewrite the output to be more {politeness}. Keep the modification "
                     "minimal. Only return the generated response and nothing else.")


def first_line(text):
    """The bonus's extract_instruction: the first non-empty line, stripped."""
    return next((line.strip() for line in text.split("\n") if line.strip()), None)


def new_entry(client, k, template):
    """The k-th new entry, or None: an instruction (the bonus's method for llama3:
    the user header alone, sent as the assistant's message, makes the model write
    one), then that instruction asked for its output. k seeds both requests."""
    options = {"seed": k, "temperature": 1.0, "top_p": 1.0}
    if template == "llama3":
        asked = [{"role": "assistant", "content": LLAMA3_USER_HEADER}]
    else:
        asked = [{"role": "user", "content": NEW_TASK_PROMPT}]
    instruction = first_line(client.ask(asked, options))
    if not instruction or "<|start_header_id|>" in instruction:
        return None
    output = client.ask([{"role": "user", "content": instruction}], options).strip()
    return {"instruction": instruction, "input": "", "output": output} if output else None


def generate_entries(client, count, path, template="llama3", workers=1, seed=0):
    """`count` new entries written to `path` as they come; an entry whose
    instruction is a near-duplicate of an earlier one is dropped."""
    entries, tried = [], 0
    with tqdm(total=count, desc="New entries", unit="entry") as bar:
        while len(entries) < count:
            if tried > 20 * count + 100:
                raise ValueError(f"{tried} requests gave {len(entries)} new entries: the "
                                 "model's instructions repeat; try --template none or "
                                 "another --generator-model.")
            wanted = max(workers, count - len(entries))  # a batch, then its near-duplicates
            batch = sorted(as_answered(lambda k: new_entry(client, k, template),
                                       range(seed + tried, seed + tried + wanted), workers),
                           key=lambda done: done[0])
            tried += wanted
            made = [entry for entry in (future.result() for _, future in batch) if entry]
            before = len(entries)
            entries = without_near_duplicates(entries + made)[:count]
            bar.update(len(entries) - before)
            write_text_atomic(path, json.dumps(entries, indent=4))
    print(f"Wrote {len(entries)} new entries to {path} ({tried} asked; the others gave no "
          "instruction or repeated an earlier one)")
    return entries


def without_near_duplicates(entries, threshold=0.75):
    """The entries, each whose instruction is a near-duplicate of an earlier one left out."""
    later = {j for _, j, _ in find_near_duplicates(entries, threshold, "instruction")}
    return [e for k, e in enumerate(entries) if k not in later]


def rewrite_prompt(entry, field, style):
    """The request for one entry's rewrite: passive, reflect, or a template's text."""
    text = entry.get(field) or ""
    if style == "passive":
        return PASSIVE_PROMPT.format(text=text)
    if style == "reflect":
        return REFLECT_PROMPT.format(prompt=format_input(entry), text=text)
    return style.format_map({"input": "", **entry})


def rewritten(answer, style):
    """The rewrite in an answer (reflect: what follows IMPROVED:), or None."""
    if style == "reflect":
        answer = answer.split("IMPROVED:", 1)[1] if "IMPROVED:" in answer else ""
    return answer.strip() or None


def answer_each(client, entries, prompt_of, path, finish, workers=1, desc="Entries"):
    """Ask the model about each entry (prompt_of(i, entry)); finish(i, entry,
    answer) makes its new entry, or None to leave it out (it says why). The
    entries finished so far are written to `path`, in order, as they come."""
    done, failed = {}, []
    answered = as_answered(lambda i: client.ask(prompt_of(i, entries[i])), range(len(entries)),
                           workers)
    for i, future in tqdm(answered, total=len(entries), desc=desc, unit="entry"):
        try:
            made = finish(i, entries[i], future.result())
        except ValueError as err:  # an answer that is not text: this entry fails
            made = None
            tqdm.write(f"Entry {i}: {err}; left out.")
        if made is None:
            failed.append(i)
        else:
            done[i] = made
            write_text_atomic(path, json.dumps([done[k] for k in sorted(done)], indent=4))
    if failed:
        print(f"{len(failed)} entries got no usable answer and are left out: "
              f"{sorted(failed)[:20]}{'...' if len(failed) > 20 else ''}")
    result = [done[k] for k in sorted(done)]
    write_text_atomic(path, json.dumps(result, indent=4))
    return result


def rewrite_entries(client, entries, path, style, field="output", workers=1):
    """Each entry with its `field` rewritten (style: passive, reflect, or a template
    of {instruction}, {input}, {output})."""
    def finish(i, entry, answer):
        text = rewritten(answer, style)
        if text is None:
            tqdm.write(f"Entry {i}: the answer held no rewrite ({answer[:60]!r}); left out.")
            return None
        return {**entry, field: text}
    return answer_each(client, entries, lambda i, e: rewrite_prompt(e, field, style), path,
                       finish, workers, desc="Rewriting")


def make_preferences(client, entries, path, seed=123, workers=1):
    """The bonus's preference data: each output rewritten slightly more polite or
    more impolite (chosen at random per entry); the polite text is `chosen`."""
    rng = random.Random(seed)
    politeness = [rng.choice(["polite", "impolite"]) for _ in entries]

    def prompt(i, entry):
        return POLITENESS_PROMPT.format(prompt=format_input(entry), output=entry["output"],
                                        politeness=politeness[i])

    def finish(i, entry, answer):
        if not answer.strip():
            tqdm.write(f"Entry {i}: an empty answer; left out.")
            return None
        polite = politeness[i] == "polite"
        return {**entry, "chosen": answer.strip() if polite else entry["output"],
                "rejected": entry["output"] if polite else answer.strip()}
    return answer_each(client, entries, prompt, path, finish, workers, desc="Preferences")


def generator_client(settings):
    """The model of --generator-url/--generator-model, its answers cached beside
    --data-out (generator-cache.jsonl)."""
    return ModelClient(settings["generator_url"], settings["generator_model"],
                       settings["api_style"], settings["api_key"], settings["timeout"],
                       settings["retries"],
                       cache_path=Path(settings["data_out"]).parent / "generator-cache.jsonl")


def style_of(settings):
    """--style: passive, reflect, or the template in a PROMPT_FILE."""
    style = settings["style"]
    if style in ("passive", "reflect"):
        return style
    path = Path(style)
    if not path.is_file():
        raise ValueError(f"--style {style}: give passive, reflect, or a file that holds a "
                         "prompt with {instruction}, {input} and {output}.")
    template = path.read_text(encoding="utf-8")
    try:
        template.format_map({"instruction": "", "input": "", "output": ""})
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"--style {path}: the prompt may hold {{instruction}}, {{input}} and "
                         f"{{output}} only (and {{{{ }}}} for braces): {err!r}.") from None
    return template


def generate(settings):
    """--generate-data, --rewrite or --make-preferences."""
    if not settings["data_out"]:
        raise ValueError("--generate-data, --rewrite and --make-preferences write to "
                         "--data-out FILE: give one.")
    check_output_file(settings["data_out"], settings["overwrite"], "--data-out")
    style = style_of(settings) if settings["rewrite"] else None
    source = settings["rewrite"] or settings["make_preferences"]
    entries = read_entries(source) if source else None
    client = generator_client(settings)
    try:
        if settings["generate_data"]:
            made = generate_entries(client, settings["generate_data"], settings["data_out"],
                                    settings["template"], settings["workers"], settings["seed"])
        elif settings["rewrite"]:
            made = rewrite_entries(client, entries, settings["data_out"], style,
                                   settings["fields"][0], settings["workers"])
        else:
            made = make_preferences(client, entries, settings["data_out"], settings["seed"],
                                    settings["workers"])
    except JudgeUnavailable as err:
        raise JudgeUnavailable(f"{err} The entries finished so far are in "
                               f"{settings['data_out']}; the answers are cached, so the same "
                               "command with --overwrite asks only for the rest.") from None
    print(f"{len(made)} entries in {settings['data_out']}")
    return {"entries": made, "requests": client.requests}


# ---- The command ----

def main(args):
    return run(data_settings(args))


def data_settings(args):
    """The command's settings, resolved once from its flags."""
    settings = dict(vars(args))
    fields = [f.strip() for f in (settings["field"] or ",".join(FIELDS)).split(",")
              if f.strip()]
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise ValueError(f"--field {','.join(unknown) or '(none)'}: give fields among "
                         f"{','.join(FIELDS)}.")
    if settings["rewrite"] and settings["field"] is None:
        fields = ["output"]  # what --rewrite rewrites unless told
    settings["fields"] = fields
    if settings["remove_duplicates"] and not settings["find_duplicates"]:
        raise ValueError("--remove-duplicates writes what --find-duplicates FILE finds: "
                         "give both.")
    modes = [flag for flag in ("find_duplicates", "generate_data", "rewrite", "make_preferences")
             if settings[flag]]
    if len(modes) > 1:
        raise ValueError(" and ".join("--" + m.replace("_", "-") for m in modes) +
                         " are different tasks: give one.")
    if settings["rewrite"] and len(fields) != 1:
        raise ValueError("--rewrite rewrites one --field (default: output).")
    settings["api_key"] = settings["api_key"] or os.environ.get("OPENAI_API_KEY") or None
    return settings


def run(settings):
    if settings["find_duplicates"]:
        return duplicates(settings)
    if settings["generate_data"] or settings["rewrite"] or settings["make_preferences"]:
        return generate(settings)
    raise ValueError("Nothing to do: give --find-duplicates, --generate-data, --rewrite or "
                     "--make-preferences (see --help).")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Chapter 7's dataset tools (the bonus material): find and remove "
                    "near-duplicate entries; write new entries, rewrite them, or make a "
                    "preference file for DPO with a model behind Ollama's or an OpenAI-style "
                    "API.",
        formatter_class=HelpFormatter)
    dup = parser.add_argument_group("near-duplicates")
    dup.add_argument("--find-duplicates", metavar="FILE", default=None,
                     help="a JSON list of entries in the chapter's format")
    dup.add_argument("--threshold", type=number(float, at_least=0, at_most=1), default=0.75,
                     help="a pair counts when the cosine of its TF-IDF vectors is above this")
    dup.add_argument("--field", default=None,
                     help="the fields compared, comma-separated, in this order (default: "
                          "instruction,input,output); with --rewrite, the one rewritten "
                          "(default: output)")
    dup.add_argument("--json", metavar="PATH", default=None,
                     help="write the pairs here: field, i and j (indices into FILE), similarity")
    dup.add_argument("--remove-duplicates", metavar="OUT", default=None,
                     help="write FILE without the later entry of each pair found in input or "
                          "output (the bonus's removal; instructions are never removed)")
    make = parser.add_argument_group("entries written by a model")
    make.add_argument("--generate-data", type=number(int, at_least=1), metavar="N",
                      default=None, help="write N new entries (instruction and output) to "
                                         "--data-out, near-duplicates of earlier ones dropped")
    make.add_argument("--template", choices=["llama3", "none"], default="llama3",
                      help="llama3: the bonus's method (Llama 3's user header alone makes the "
                           "model write an instruction); none: a plain request for one task")
    make.add_argument("--rewrite", metavar="FILE", default=None,
                      help="rewrite each entry's --field (output) of FILE in --style")
    make.add_argument("--style", default="passive",
                      help="passive (into the passive voice), reflect (a critique, then the "
                           "improved text, which is kept), or a PROMPT_FILE holding a prompt "
                           "with {instruction}, {input} and {output}")
    make.add_argument("--make-preferences", metavar="FILE", default=None,
                      help="a preference file for ch07_instruct.py --dpo from FILE: each output "
                           "rewritten slightly more polite or impolite (at random, --seed); the "
                           "polite text is chosen, the other rejected")
    make.add_argument("--data-out", metavar="FILE", default=None,
                      help="where the entries go, written again as each is finished")
    make.add_argument("--generator-url", metavar="URL", default=OLLAMA_URL,
                      help="the model's chat endpoint: Ollama's …/api/chat, or an OpenAI-style "
                           "…/v1")
    make.add_argument("--generator-model", metavar="NAME", default="llama3",
                      help="the model that writes")
    make.add_argument("--api-key", metavar="KEY", default=None,
                      help="the key sent to an OpenAI-style server (default: $OPENAI_API_KEY); "
                           "never printed or saved")
    add_client_arguments(make, "the model")
    make.add_argument("--seed", type=int, default=123,
                      help="seeds the new entries' requests and the polite/impolite choice")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files --json, --remove-duplicates and --data-out name "
                             "(answers cached beside --data-out are not asked again)")
    return parser



def parse_args(argv=None):
    return build_parser().parse_args(argv)


def kept_when_stopped(settings):
    if settings.get("data_out"):
        return (f"{settings['data_out']} holds the entries finished so far, and the answers are "
                "cached beside it: the same command with --overwrite asks only for the rest.")
    return "Each file is written whole or not at all: nothing of this run was written."


if __name__ == "__main__":
    run_command(main, parse_args(), kept_when_stopped,
                errors=(ValueError, OSError, JudgeUnavailable))
