"""Options of the SAE architectures beyond ReLU + L1 (SPEC section 2), of the kernels, and of the GPU fast path.
Mixed into :class:`domain_sae.config.TrainConfig`; documented once here (docs/options.md and
``dsae train --help`` are generated from these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .fields import opt


@dataclass
class ArchitectureConfig:
    """TopK / BatchTopK / Matryoshka / JumpReLU options and the sparse-kernel switch."""

    k: int = opt(32, "topk: latents kept per token (the k largest of ReLU(z)); batchtopk / matryoshka: average "
                 "latents per token (the k * B largest over a batch of B tokens).", group="architecture")
    aux_k_coefficient: float = opt(1.0 / 32.0, "TopK family: coefficient alpha of the AuxK loss alpha * mean_t "
                                   "||e_t - sum_{i in top k_aux dead} z_ti W_dec,i||^2, e = stopgrad(x' - x_hat').",
                                   group="architecture")
    aux_k: Optional[int] = opt(None, "TopK family: k_aux = min(aux_k, #dead latents); default d_in // 2.",
                               group="architecture")
    topk_threshold_lr: float = opt(0.01, "batchtopk / matryoshka: EMA rate r of the inference threshold theta <- "
                                   "(1 - r) theta + r * min kept activation (saved as jumprelu with threshold "
                                   "theta).", group="architecture")
    jumprelu_bandwidth: float = opt(0.05, "jumprelu: bandwidth epsilon of the rectangle-kernel straight-through "
                                    "estimator of d/d theta.", group="architecture")
    jumprelu_init_threshold: float = opt(0.001, "jumprelu: initial threshold theta = exp(log_threshold).",
                                         group="architecture")
    jumprelu_sparsity_loss: Literal["tanh", "step"] = opt(
        "tanh", "jumprelu: sparsity term, tanh (mean_t sum_i tanh(c f_ti ||W_dec,i||)) or step (the L0 "
        "mean_t sum_i 1[z_ti > theta_i]); its coefficient is l1_coefficient.", group="architecture")
    jumprelu_tanh_scale: float = opt(4.0, "jumprelu: c of the tanh sparsity term.", group="architecture")
    matryoshka_widths: list[int] = opt([], "matryoshka: increasing dictionary prefix sizes m_1 < ... < d_sae "
                                       "(d_sae appended when missing); each prefix reconstructs x on its own and "
                                       "the loss sums their MSEs. Default: d_sae/8, d_sae/4, d_sae/2, d_sae.",
                                       group="architecture")
    kernels: Literal["auto", "dense", "sparse"] = opt(
        "auto", "SAE kernels: dense matrix products, sparse (gathered decoder rows, gradients only where f != 0), or "
        "auto (TopK family sparse from the start; ReLU sparse while its density is below "
        "sparse_density_threshold; JumpReLU dense).", group="architecture")
    sparse_density_threshold: float = opt(0.05, "kernels=auto: a ReLU SAE uses the sparse kernels while the "
                                          "fraction of non-zero latents (measured every step on CPU, every 25 "
                                          "on a GPU) is below this.", group="architecture")

    def architecture_problems(self) -> list[str]:
        """Messages for values that cannot work (TrainConfig.validate raises them as ConfigError)."""
        out = []
        if self.k <= 0:
            out.append(f"k must be positive (got {self.k}).")
        if self.aux_k is not None and self.aux_k <= 0:
            out.append(f"aux_k must be positive or null (got {self.aux_k}).")
        if self.aux_k_coefficient < 0:
            out.append("aux_k_coefficient must be >= 0.")
        if not 0 < self.topk_threshold_lr <= 1:
            out.append("topk_threshold_lr must be in (0, 1].")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            out.append("jumprelu_bandwidth and jumprelu_init_threshold must be positive.")
        w = list(self.matryoshka_widths)
        if w and (w[0] <= 0 or any(b <= a for a, b in zip(w, w[1:]))):
            out.append(f"matryoshka_widths must be positive and strictly increasing (got {w}), e.g. 512,1024,2304.")
        if not 0 < self.sparse_density_threshold <= 1:
            out.append("sparse_density_threshold must be in (0, 1].")
        return out


@dataclass
class FastPathConfig:
    """Device options of the training step."""

    tf32: bool = opt(True, "CUDA: allow TF32 matrix products (fp32 master weights either way).", group="performance")
    autocast: Literal["auto", "none", "bfloat16"] = opt(
        "auto", "Run the SAE forward/backward under torch.autocast: bfloat16 (weights, optimizer and loss stay "
        "fp32; no GradScaler needed), none, or auto (bfloat16 on CUDA, none on CPU).", group="performance")
    fused_adam: bool = opt(True, "Use torch's fused Adam kernel (CUDA and CPU; same update as the loop).",
                           group="performance")
    compile_backend: Optional[str] = opt(None, "torch.compile the SAE loss with this backend (e.g. inductor); "
                                         "null = no compilation.", group="performance")
