"""Derive the CLIP tokenizer files (vocab.json, merges.txt) from the BPE list in the open_clip wheel.

The rule is the one in the CLIP paper's tokenizer: the 256 byte symbols, the same with an end-of-word
marker, one token per merge (the first 48,894 lines after the header), then the two special tokens.

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl tests/assets/clip-tokenizer
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build(bpe_lines: list[str], out: Path) -> None:
    merges = [tuple(line.split()) for line in bpe_lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    wheel, out = sys.argv[1], Path(sys.argv[2])
    with zipfile.ZipFile(wheel) as zf:
        data = gzip.decompress(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    build(data.decode("utf-8").split("\n"), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
