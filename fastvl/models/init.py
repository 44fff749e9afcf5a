"""Weight initialisation shared by the encoders (BERT/ViT style: N(0, 0.02), zero biases, unit norms)."""
from torch import nn

INIT_STD = 0.02


def init_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """Initialise one module in place; use with ``root.apply(init_weights)``.

    Linear/Conv/Embedding weights ~ truncated N(0, std) (cut at 2 std), biases 0, LayerNorm (1, 0).
    Parameters registered directly on a model (class token, positions) are initialised by their owner.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
