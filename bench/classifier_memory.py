"""Resident memory of a text classifier that opens each set of graphs at its first call: after load, after
texts one at a time (the graphs without the padding mask), then after one padded batch (the masked ones
beside them, what every process held before the sets were opened lazily). Each step in one process.

    .venv/bin/python bench/classifier_memory.py stdlib-bert/pabee.eec stdlib-bert/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("texts", help="a JSON-lines file with a 'text' field")
    args = parser.parse_args()
    from eec.runtime import load

    with open(args.texts, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:40]
    before = rss_mb()
    model = load(args.artifact)
    loaded = rss_mb()
    for text in texts[:5]:
        model.classify(text, epsilon=0.99)
    single = rss_mb()
    model.classify(texts, epsilon=0.99, batch_size=32)
    both = rss_mb()
    print(f"resident MB: before load {before:.0f}, after load {loaded:.0f}, after 5 texts one at a time {single:.0f}, "
          f"after a padded batch too {both:.0f}")


if __name__ == "__main__":
    main()
