"""Token ids from transformers' own CLIPTokenizer for each line of a prompt corpus.

Usage: tokenizer_reference.py VOCAB_DIR PROMPTS.txt OUT.json

The tokenizer is built by transformers from the same vocab.json and merges.txt diffloom reads (passed
positionally: transformers 5 only converts the files into its BPE model that way), so the comparison
checks diffloom's tokenizer pipeline, not the vocabulary. The empty line case is added explicitly.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import CLIPTokenizer  # noqa: E402


def main(vocab_dir, prompts, out):
    tok = CLIPTokenizer(os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt"))
    with open(prompts, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines.append("")
    ids = [tok(line)["input_ids"] for line in lines]
    # Sanity check of the vocabulary itself against OpenAI CLIP's known ids.
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"prompts": lines, "ids": ids}, f, ensure_ascii=False)
    print(f"tokenized {len(lines)} prompts")


if __name__ == "__main__":
    main(*sys.argv[1:])
