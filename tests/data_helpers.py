"""Small synthetic corpora shared by the data tests."""

import json

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_texts(n: int):
    return [f"Document {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 11))
            for i in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)
