"""Chapter 7's dataset tools (the chapter's bonus material), beside ch07_instruct.py.

Finding near-duplicate entries of an instruction file, as the bonus's
find-near-duplicates.py does (character 1-3-gram TF-IDF, cosine above 0.75), but
block by block on sparse rows, so that memory stays bounded for Alpaca's 52,000
entries, and with the pairs indexed into the file (`find_near_duplicates`,
`remove_near_duplicates`).

Run:  python ch07_data.py --find-duplicates instruction-data.json
      python ch07_data.py --find-duplicates data.json --remove-duplicates clean.json
Imports from ch02_data.py (files, the command's frame) and ch07_instruct.py
(the entries' checks). Needs scikit-learn for the TF-IDF vectors.
"""
import argparse
import json
import re

import numpy as np

from ch02_data import (HelpFormatter, check_output_file, number, read_json, run_command,
                       write_text_atomic)
from ch07_instruct import check_entries

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


# ---- The command ----

def main(args):
    return run(data_settings(args))


def data_settings(args):
    """The command's settings, resolved once from its flags."""
    settings = dict(vars(args))
    fields = [f.strip() for f in settings.pop("field").split(",") if f.strip()]
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or not fields:
        raise ValueError(f"--field {','.join(unknown) or '(none)'}: give fields among "
                         f"{','.join(FIELDS)}.")
    settings["fields"] = fields
    if settings["remove_duplicates"] and not settings["find_duplicates"]:
        raise ValueError("--remove-duplicates writes what --find-duplicates FILE finds: "
                         "give both.")
    return settings


def run(settings):
    if settings["find_duplicates"]:
        return duplicates(settings)
    raise ValueError("Nothing to do: give --find-duplicates FILE (see --help).")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Chapter 7's dataset tools: find (and remove) near-duplicate entries of "
                    "an instruction file, as the bonus's find-near-duplicates.py does.",
        formatter_class=HelpFormatter)
    dup = parser.add_argument_group("near-duplicates")
    dup.add_argument("--find-duplicates", metavar="FILE", default=None,
                     help="a JSON list of entries in the chapter's format")
    dup.add_argument("--threshold", type=number(float, at_least=0, at_most=1), default=0.75,
                     help="a pair counts when the cosine of its TF-IDF vectors is above this")
    dup.add_argument("--field", default=",".join(FIELDS),
                     help="the fields compared, comma-separated, in this order")
    dup.add_argument("--json", metavar="PATH", default=None,
                     help="write the pairs here: field, i and j (indices into FILE), similarity")
    dup.add_argument("--remove-duplicates", metavar="OUT", default=None,
                     help="write FILE without the later entry of each pair found in input or "
                          "output (the bonus's removal; instructions are never removed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files --json and --remove-duplicates name")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def kept_when_stopped(settings):
    return "Each file is written whole or not at all: nothing of this run was written."


if __name__ == "__main__":
    run_command(main, parse_args(), kept_when_stopped)
