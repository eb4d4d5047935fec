"""The shapes that set a decoder-only LM's FLOPs and parameter count (bench and random LMs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LMShape:
    """The shapes that set a decoder-only LM's FLOPs and parameter count."""

    vocab: int
    hidden: int
    n_layers: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    gated_mlp: bool = True  # gate/up/down (Llama) rather than up/down (GPT-2)

    @property
    def query_width(self) -> int:
        return self.n_heads * self.head_dim

    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls: q, k, v, o and the MLP (biases and norms left out)."""
        kv = self.n_kv_heads * self.head_dim
        attention = self.hidden * self.query_width * 2 + self.hidden * kv * 2
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attention + mlp

    def n_params(self) -> int:
        """All parameters of a Llama-style model: embeddings, blocks with two RMSNorms, final norm, head."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.n_layers * (self.layer_matmul_params() + 2 * self.hidden) + self.hidden

    def as_dict(self) -> dict:
        return asdict(self)
