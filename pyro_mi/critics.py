"""Critic functions T(x, z) for contrastive and dual MI bounds.

* :class:`JointCritic`: an MLP on the concatenation [x, z] (Belghazi et al. 2018,
  sec. 4; Brekelmans et al. 2022, App. O.2 use ReLU layers of width 2000 — width
  and depth are parameters here).
* :class:`SeparableCritic`: T(x, z) = f(x)ᵀ g(z) (Poole et al. 2019), which
  scores all B×B pairs of a batch with one matrix product.

Critics are torch modules (``torch.nn.Module``); any module with the same call signature can be
passed where a critic is expected.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: tuple[int, ...], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """An MLP with the given layer sizes and an activation between layers (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class JointCritic(nn.Module):
    """T(x, z) = MLP([x, z]) -> scalar.

    Args:
        x_dim, z_dim: feature sizes of x and z.
        hidden_sizes: widths of the hidden layers (default two of 256).
        activation: activation module class (default ReLU).

    Call: ``critic(x, z)`` with x (..., x_dim) and z (..., z_dim) broadcasting
    over leading dims; returns (...,) scores. ``critic.pairwise(x, z)`` scores
    all pairs: x (B, x_dim), z (M, z_dim) -> (B, M), entry [i, j] = T(x_i, z_j).
    """

    def __init__(self, x_dim: int, z_dim: int, hidden_sizes: tuple[int, ...] = (256, 256), activation=nn.ReLU):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.net = mlp((x_dim + z_dim, *hidden_sizes, 1), activation)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The first layer is affine in [x, z]: applied to x and to z apart and added by
        # broadcasting, it costs B + M products for B x's against M z's, not B M.
        first, rest = self.net[0], self.net[1:]
        h = x @ first.weight[:, : self.x_dim].T + first.bias + z @ first.weight[:, self.x_dim :].T
        return rest(h).squeeze(-1)

    def pairwise(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scores of all pairs: (B, x_dim), (M, z_dim) -> (B, M)."""
        return self(x.unsqueeze(1), z.unsqueeze(0))


class SeparableCritic(nn.Module):
    """T(x, z) = f(x)ᵀ g(z) with MLP embeddings f, g of size ``embed_dim``.

    Args:
        x_dim, z_dim: feature sizes.
        embed_dim: size of the embeddings.
        hidden_sizes, activation: as for :class:`JointCritic`.

    Call: ``critic(x, z)`` -> (...,) scores of matched pairs; ``critic.pairwise(x, z)``
    -> (B, M) scores of all pairs in one matrix product.
    """

    def __init__(
        self, x_dim: int, z_dim: int, embed_dim: int = 32, hidden_sizes: tuple[int, ...] = (256,), activation=nn.ReLU
    ):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.f = mlp((x_dim, *hidden_sizes, embed_dim), activation)
        self.g = mlp((z_dim, *hidden_sizes, embed_dim), activation)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (self.f(x) * self.g(z)).sum(-1)

    def pairwise(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scores of all pairs: (B, x_dim), (M, z_dim) -> (B, M)."""
        return self.f(x) @ self.g(z).T


def check_critic(critic, x_dim: int, z_dim: int, what: str = "critic") -> None:
    """Calls ``critic`` once on two zero pairs, x (2, ``x_dim``) and z (2, ``z_dim``), and raises
    ValueError, in one line naming the sizes, if it fails or does not return one score per pair
    (a critic built for other sizes; the error torch would give is a matrix-shape mismatch)."""
    param = next((p for p in getattr(critic, "parameters", lambda: iter(()))()), None)
    kw = {} if param is None else dict(dtype=param.dtype, device=param.device)
    try:
        with torch.no_grad():
            out = critic(torch.zeros(2, x_dim, **kw), torch.zeros(2, z_dim, **kw))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ValueError(f"the {what} does not take x of {x_dim} features and z of {z_dim} (the sizes here): "
                         f"{str(e).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the {what} must return one score per pair: for 2 pairs of x ({x_dim}) and z ({z_dim}) "
                         f"it returned {shape}")
