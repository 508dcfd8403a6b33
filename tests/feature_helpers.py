"""Shared pieces of the feature-store and dashboard tests: tiny random SAEs on the tiny in-process Llama, held-out
token sets built from real text (with a planted script tag, multi-byte characters and indented code)."""

from __future__ import annotations

import torch

from domain_sae.sae.standard import SAEModelConfig, StandardSAE

HOOK = "blocks.0.hook_mlp_out"
PLANTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 1">'
TEXTS_A = [
    "Hello there! How are you doing today? I am fine, thank you. " + PLANTED + " What about you?",
    "naïve café — héllo 😀 Grüße aus Köln; the weather is nice and the coffee is hot.",
    "We went to the market and bought apples, pears and a small cake for the party.",
]
TEXTS_B = [
    ("def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\n\nclass Box:\n    def __init__(self):\n"
     "        self.items = []\n"),
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n# comment with <b>html</b> & entities\n",
    ("import os\nimport sys\n\ndef main(argv):\n    return len(argv)\n\n"
     "if __name__ == '__main__':\n    main(sys.argv)\n"),
]


def make_sae(seed: int, d_in: int = 32, d_sae: int = 48, enc_std: float = 100.0, bias: float = -0.3,
             metadata: dict | None = None) -> StandardSAE:
    """A random SAE whose latents fire on roughly a quarter of the tiny model's tokens."""
    meta = {"hook_name": HOOK, "model_name": "tiny-llama", "context_size": 32}  # the tiny in-process Llama
    meta.update(metadata or {})
    s = StandardSAE(SAEModelConfig(architecture="standard", d_in=d_in, d_sae=d_sae, dtype="float32",
                                   apply_b_dec_to_input=False, normalize_activations="none", metadata=meta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        s.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) * enc_std)
        s.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        s.b_enc.fill_(bias)
        s.b_dec.copy_(torch.randn(d_in, generator=g) * 0.01)
    return s


def finetuned_copy(parent: StandardSAE, seed: int, parent_path: str, noise: float = 0.3) -> StandardSAE:
    """A 'fine-tuned' child: the parent's weights plus noise, with lineage metadata naming the parent."""
    child = make_sae(seed, parent.d_in, parent.d_sae, metadata={"lineage": {"parent": parent_path}})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            p = getattr(parent, name)
            getattr(child, name).copy_(p + noise * p.std() * torch.randn(p.shape, generator=g))
    return child


def pack_texts(tokenizer, texts, ctx: int = 32, n_seq: int | None = None):
    """BOS + tokens of each text, concatenated and cut into [N, ctx] (segments: 0 for BOS, 1 otherwise)."""
    ids, segs = [], []
    for t in texts:
        tok = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.bos_token_id or 0] + tok
        segs += [0] + [1] * len(tok)
    n = len(ids) // ctx if n_seq is None else n_seq
    while len(ids) < n * ctx:
        ids, segs = ids + ids, segs + segs
    return (torch.tensor(ids[:n * ctx]).view(n, ctx), torch.tensor(segs[:n * ctx], dtype=torch.int8).view(n, ctx))


def heldout_sets(tokenizer):
    return {"chat": pack_texts(tokenizer, TEXTS_A, n_seq=6), "code": pack_texts(tokenizer, TEXTS_B, n_seq=6)}
