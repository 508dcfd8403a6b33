"""What the study feeds its SAEs, measurements and analyses; built when first needed and reused from disk.

- Training caches: per corpus (every domain, every general-mix part) one build of the multi-hook cache
  (:func:`domain_sae.activations.hook_cache.build_cache`): one model pass for all hooks of the study, at
  ``<out>/cache/<corpus>``; a complete cache of the same options is reused, an unfinished one continued.
- Held-out data: per corpus the evaluation's held-out sample (the same builder, ``split="heldout"``: sequences,
  segments, document ids and activations at every hook) at ``<out>/cache/<corpus>.heldout``. Per hook
  (:class:`HookData`): the reconstruction sets (each corpus, and ``general``: the first rows of the general-mix
  parts in their weights), and the model-pass sets (the first ``eval_tokens`` of each domain and of ``general``).
- Probing sets, labelled by what a domain's data is (:func:`probe_kind`): chats give user-vs-assistant turn labels,
  Python sources token-type labels (from the domain's own held-out files); other data is not probed.
- The two prompt sets of the direction analysis, and the steered generations' prompt ids.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..activations.cache import CacheError
from ..activations.heldout_cache import open_heldout_cache
from ..activations.hook_cache import build_cache, data_spec, read_root_manifest
from ..analysis.probing import chat_turn_labels, code_probe_tokens
from ..config import ConfigError, DataConfig
from ..data.formatting import bos_token_id, tokenize_document
from ..data.mixture import weighted_shares
from ..data.segments import USER, training_mask
from ..data.sources import Document, open_source, stdlib_files
from ..data.splits import is_heldout
from ..models.hooks import capture, resolve_hook
from .config import GENERAL, StudyConfig, StudyError, slug
from .runs import cache_tokens

CACHE_DTYPE = "float16"   # training caches (the reconstruction sets are read as float32)
PROBE_FILES = 400         # held-out source files read for the Python token-type probe
KIND_SAMPLE = 20          # documents read to tell what a domain's data is


@dataclass
class HeldoutActivations:
    """A held-out token set at one hook: ``acts`` [S, T, d] (0 where nothing counts), ``ids``, ``segments``,
    ``docs`` (document id per token, -1 for inserted BOS/padding) and ``mask`` (counted positions) [S, T]."""

    acts: torch.Tensor
    ids: torch.Tensor
    segments: torch.Tensor
    docs: torch.Tensor
    mask: torch.Tensor

    @property
    def flat(self) -> torch.Tensor:
        """[N, d] activations of the counted positions."""
        return self.acts[self.mask]

    def head(self, n: int) -> "HeldoutActivations":
        return HeldoutActivations(*(getattr(self, f)[:max(1, n)] for f in ("acts", "ids", "segments", "docs", "mask")))

    @staticmethod
    def of_cache(cache: Any) -> "HeldoutActivations":
        """The sample and activations of an opened held-out cache (:func:`~domain_sae.activations.heldout_cache.
        open_heldout_cache`), positions without an activation set to 0 and left out of ``mask``."""
        acts = torch.cat([a for _, a in cache.batches(64)]).nan_to_num(0.0)
        return HeldoutActivations(acts, cache.input_ids, cache.segments, cache.doc_ids,
                                  training_mask(cache.segments, True))

    @staticmethod
    def mix(parts: list["HeldoutActivations"]) -> "HeldoutActivations":
        """Rows of several sets, document ids kept apart (offset per part)."""
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + int(p.docs.max()) + 1)
        docs = [torch.where(p.docs >= 0, p.docs + o, p.docs) for p, o in zip(parts, offsets)]
        return HeldoutActivations(*(torch.cat([getattr(p, f) for p in parts]) for f in ("acts", "ids", "segments")),
                                  torch.cat(docs), torch.cat([p.mask for p in parts]))


@dataclass
class HookData:
    """Held-out data of one hook: ``held`` (reconstruction sets: each corpus and ``general``) and ``lm_sets`` (the
    model-pass sets: each domain and ``general``)."""

    d_in: int
    held: dict[str, HeldoutActivations]
    lm_sets: dict[str, HeldoutActivations]


def probe_kind(spec: str) -> Optional[str]:
    """What a data spec holds, from its first documents: ``chat`` (conversations), ``code`` (text that parses as
    Python, at least 80% of the sample) or None."""
    docs = list(islice(open_source(spec), KIND_SAMPLE))
    if docs and all(d.kind == "chat" for d in docs):
        return "chat"

    def python(text: Optional[str]) -> bool:
        try:
            ast.parse(text or "")
            return text is not None
        except (SyntaxError, ValueError):
            return False
    return "code" if docs and sum(python(d.text) for d in docs) >= 0.8 * len(docs) else None


class StudyInputs:
    """Caches and held-out data of the study (module docstring), built on first use."""

    def __init__(self, cfg: StudyConfig, out: Path, lm: Any, log: Callable[[str], None] = print):
        self.cfg, self.out, self.lm, self.log = cfg, Path(out), lm, log
        self.cache_tokens: dict[str, int] = {}
        self.split_tokens: dict[str, Optional[int]] = {}   # corpus -> its whole training split, when cached whole
        self.sampling: dict[str, dict] = {}
        self._hooks: dict[str, HookData] = {}
        self._kinds: dict[str, Optional[str]] = {}

    def data_config(self, spec: str) -> DataConfig:
        return DataConfig(model=self.cfg.model, hook=self.cfg.hooks[0], device=self.cfg.device, data=spec,
                          context_size=self.cfg.context_size, holdout_fraction=self.cfg.holdout_fraction,
                          heldout_tokens_per_document=self.cfg.heldout_tokens_per_document)

    def _build(self, name: str, split: str, n_tokens: int) -> Path:
        """The complete multi-hook cache of corpus ``name`` (reused, continued or built)."""
        path = self.out / "cache" / (slug(name) + (".heldout" if split == "heldout" else ""))
        dcfg = self.data_config(self.cfg.corpora()[name])
        root = read_root_manifest(path) if path.is_dir() else None
        if root and root.get("complete"):
            have = int(root["tokens_requested"])  # a training cache may hold more (a prefix is read), a sample not
            same = (root["data"] == _plain(data_spec(dcfg)) and set(self.cfg.hooks) <= set(root["hooks"])
                    and (have >= n_tokens if split == "train" else have == n_tokens) and root["dtype"] == CACHE_DTYPE)
            if same:
                return path
        self.log(f"[study] {name}: caching {split} activations at {', '.join(self.cfg.hooks)} ({n_tokens:,} tokens, "
                 f"one model pass)")
        try:
            return build_cache(self.lm, self.cfg.hooks, dcfg, path, n_tokens, dtype=CACHE_DTYPE, split=split,
                               overwrite=bool(root and root.get("complete")))
        except CacheError as e:
            if "different options" not in str(e):
                raise
            return build_cache(self.lm, self.cfg.hooks, dcfg, path, n_tokens, dtype=CACHE_DTYPE, split=split,
                               overwrite=True)

    def train_caches(self, hook: str) -> dict[str, Path]:
        """Corpus -> the training cache folder of ``hook`` (every corpus is cached at every hook at once)."""
        out = {}
        for name in self.cfg.corpora():
            path = self._build(name, "train", cache_tokens(self.cfg, name))
            root = read_root_manifest(path)
            self.cache_tokens[name] = n = int(root["n_tokens"])
            self.split_tokens[name] = n if n < int(root["tokens_requested"]) else None
            out[name] = path / root["hooks"][hook]["dir"]
        return out

    def one_pass(self, hook: str) -> dict[str, Optional[int]]:
        """Corpus -> tokens of its whole training split when its cache holds all of it, else None (builds the
        caches when needed)."""
        self.train_caches(hook)
        return dict(self.split_tokens)

    def _heldout(self, name: str, hook: str) -> HeldoutActivations:
        cache = open_heldout_cache(self._build(name, "heldout", self.cfg.heldout_tokens()), hook, verify=False)
        self.sampling[name] = cache.manifest.get("sampling", {})
        held = HeldoutActivations.of_cache(cache)
        if int(held.mask.sum()) == 0:
            raise StudyError(f"Corpus {name!r} ({self.cfg.corpora()[name]}) has no countable held-out tokens; raise "
                             f"holdout_fraction or use a larger dataset.")
        return held

    def hook_data(self, hook: str) -> HookData:
        """The held-out sets of ``hook`` (module docstring)."""
        if hook not in self._hooks:
            cfg = self.cfg
            held = {name: self._heldout(name, hook) for name in cfg.corpora()}
            weights = cfg.general_weights()
            n = min(len(held[k].ids) for k in weights)
            held[GENERAL] = self._weighted(held, n)
            k = max(1, math.ceil(cfg.eval_tokens / cfg.context_size))
            lm_sets = {d: held[d].head(k) for d in cfg.domains}
            lm_sets[GENERAL] = self._weighted(held, k)
            self._hooks[hook] = HookData(int(held[GENERAL].acts.shape[-1]), held, lm_sets)
        return self._hooks[hook]

    def _weighted(self, held: dict[str, HeldoutActivations], n_rows: int) -> HeldoutActivations:
        """The first rows of each general-mix part in proportion to its weight (``n_rows`` in all, >= 1 each)."""
        shares = weighted_shares(n_rows, self.cfg.general_weights())
        return HeldoutActivations.mix([held[k].head(shares[k]) for k in self.cfg.general_weights()])

    def kind(self, domain: str) -> Optional[str]:
        if domain not in self._kinds:
            self._kinds[domain] = probe_kind(self.cfg.domains[domain])
        return self._kinds[domain]

    @torch.no_grad()
    def probes(self, hook: str) -> dict[str, dict]:
        """Domain -> {kind, acts [N, d], labels [N]} for every domain whose data gives labels."""
        cfg, lm, out = self.cfg, self.lm, {}
        for d in cfg.domains:
            kind = self.kind(d)
            if kind == "chat":
                h = self.hook_data(hook).held[d]
                labels = chat_turn_labels(h.segments)
                keep = (labels >= 0) & h.mask
                n = cfg.probe_tokens
                out[d] = {"kind": kind, "acts": h.acts[keep][:n], "labels": labels[keep][:n]}
            elif kind == "code":
                texts = (x.text for x in open_source(cfg.domains[d]) if x.text and is_heldout(x, cfg.holdout_fraction))
                bos = bos_token_id(lm.tokenizer)
                ids, labels = code_probe_tokens(list(islice(texts, PROBE_FILES)), lm.tokenizer, cfg.context_size,
                                                max_tokens=cfg.probe_tokens, bos_id=bos, pad_id=bos or 0,
                                                windows_per_document=1)
                point = resolve_hook(lm.model, hook)
                acts = torch.cat([capture(lm.model, point, ids[i:i + 8].to(lm.device)).float().cpu()
                                  for i in range(0, len(ids), 8)])
                out[d] = {"kind": kind, "acts": acts[labels >= 0], "labels": labels[labels >= 0]}
        return out

    def prompts(self) -> tuple[list[str], list[str]]:
        """Prompt sets A and B of the direction analysis (options ``prompts_a`` / ``prompts_b``, else the defaults)."""
        cfg = self.cfg
        chat = next((cfg.domains[d] for d in cfg.domains if self.kind(d) == "chat"), "chat")
        a = _read_prompts(cfg.prompts_a, cfg.n_prompts) if cfg.prompts_a else code_request_prompts(cfg.n_prompts)
        b = _read_prompts(cfg.prompts_b, cfg.n_prompts) if cfg.prompts_b else small_talk_prompts(cfg.n_prompts, chat)
        if len(a) < 2 or len(b) < 2:
            raise StudyError(f"The prompt sets hold {len(a)} and {len(b)} prompts; each needs at least 2 (set "
                             f"prompts_a / prompts_b to files with one prompt per line).")
        return a, b

    def remove_caches(self) -> None:
        shutil.rmtree(self.out / "cache", ignore_errors=True)


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# ----------------------------------------------------------------------------------------------------------------
# Prompts (direction analysis and steered generations)

def _read_prompts(path: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"Prompt file {path} holds no prompts (one per line).")
    return lines[:n]


def code_request_prompts(n: int) -> list[str]:
    """Code requests built from standard-library functions: "Write a Python function `name` that <docstring line>"."""
    out: list[str] = []
    for path in stdlib_files():
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = (ast.get_docstring(node) or "").strip().splitlines()
                if doc and 20 <= len(doc[0]) <= 100:
                    out.append(f"Write a Python function `{node.name}` that does this: {doc[0].rstrip('.')}.")
                    break  # one per module keeps the set varied
        if len(out) >= n:
            break
    return out


def small_talk_prompts(n: int, chat_spec: str = "chat") -> list[str]:
    """First user messages of conversations in a chat corpus (short ones)."""
    out = []
    for doc in open_source(chat_spec):
        if doc.messages:
            first = doc.messages[0]["content"].strip()
            if 15 <= len(first) <= 160:
                out.append(first)
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def prompt_activations(lm, hook, prompts: list[str]) -> torch.Tensor:
    """[n, d]: per prompt, the mean activation over the user-content tokens of the chat-rendered prompt."""
    rows = []
    for p in prompts:
        ids, segs = tokenize_document(Document(messages=[{"role": "user", "content": p}]), lm.tokenizer)
        a = capture(lm.model, hook, torch.tensor([ids]).to(lm.device))[0].float().cpu()
        keep = torch.tensor(segs) == USER
        rows.append(a[keep].mean(0) if keep.any() else a.mean(0))
    return torch.stack(rows)


def generation_prompt_ids(lm, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as a user turn followed by the assistant header (what the model continues)."""
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = f"User: {prompt}\nAssistant:"
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


__all__ = ["HeldoutActivations", "HookData", "StudyInputs", "probe_kind", "prompt_activations",
           "generation_prompt_ids", "code_request_prompts", "small_talk_prompts"]
