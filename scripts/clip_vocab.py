#!/usr/bin/env python3
"""Derive HF-style CLIP tokenizer files (vocab.json + merges.txt) from
OpenAI/open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

Usage:
    python3 scripts/clip_vocab.py <bpe_simple_vocab_16e6.txt.gz | open_clip_torch-*.whl> <out_dir> [--tokenizer-json]

With --tokenizer-json a HF ``tokenizers`` tokenizer.json is written as well; it has
the same pipeline as transformers 5.x ``CLIPTokenizer`` (NFC, \s+ -> " ",
Lowercase; Split(CLIP regex, Removed, invert) + ByteLevel; BPE with '</w>'
suffix, unk '<|endoftext|>'; RobertaProcessing(sot, eot)).

Derivation (identical to open_clip/OpenAI ``SimpleTokenizer.__init__``):
  * the .gz holds UTF-8 text; line 0 is a header
    ('"bpe_simple_vocab_16e6.txt#version: 0.2'), lines 1..48894 (inclusive) are
    the merges used by CLIP (``lines[1:49152-256-2+1]``); the rest are ignored.
  * vocab = the 256 ``bytes_to_unicode()`` characters (in the dict's insertion
    order), then the same 256 characters with '</w>' appended, then one entry per
    merge (the two halves concatenated), then '<|startoftext|>' (49406) and
    '<|endoftext|>' (49407).  Total 49408.
  * merges.txt = '#version: 0.2' header line + the 48894 merges, one per line.

Only the Python standard library is used.  No network access.
"""
import gzip
import io
import json
import os
import sys
import zipfile

N_MERGES = 49152 - 256 - 2  # 48894
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"


def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe_text(path):
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz")]
            if not names:
                raise SystemExit(f"no bpe_simple_vocab_16e6.txt.gz inside {path}")
            raw = zf.read(names[0])
        return gzip.GzipFile(fileobj=io.BytesIO(raw)).read().decode("utf-8")
    with gzip.open(path) as f:
        return f.read().decode("utf-8")


def build(text):
    lines = text.split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges), "unexpected bpe file"
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT, EOT]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == len(vocab) == 49408, "duplicate tokens in vocab"
    assert encoder[SOT] == 49406 and encoder[EOT] == 49407
    return encoder, merges


CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def tokenizer_json(encoder, merges):
    def added(tok):
        return {"id": encoder[tok], "content": tok, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(SOT), added(EOT)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOT, encoder[EOT]],
                           "cls": [SOT, encoder[SOT]], "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": EOT, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": encoder,
                  # "a b" strings: the legacy merges form, read by old and new tokenizers versions
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def main(argv):
    args = [a for a in argv[1:] if a != "--tokenizer-json"]
    want_json = len(args) != len(argv) - 1
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out_dir = args
    encoder, merges = build(read_bpe_text(src))
    os.makedirs(out_dir, exist_ok=True)
    # Same layout as HF's CLIPTokenizer.save_vocabulary (openai/clip-vit-large-patch14).
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(encoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    if want_json:
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_json(encoder, merges), f, ensure_ascii=False)
    print(f"wrote {len(encoder)} vocab entries and {len(merges)} merges to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
