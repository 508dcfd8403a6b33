"""domain-sae: train, fine-tune, evaluate and compare sparse autoencoders on domain-specific LM activations."""

__version__ = "0.1.0"
