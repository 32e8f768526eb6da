"""Model presets: the authors' ``paper`` configuration and this project's ``native`` configuration.

``paper`` (spec section 1): 35 px chips resized to 256 x 256; branch widths 32-64-128-256-512 with a 2 x 2 pool
after each of the first four convolutions, a dilated block with dilations (1, 3, 6, 9) on the 16 x 16 map; the
CNN5 head pools four more times. About 63.9 M parameters and 37 GFLOP per site.

``native``: the same layer types on the 35 px chip at Landsat's native 30 m, no upsampling. Three pools in the
branch (35 -> 17 -> 8 -> 4), a fifth convolution that keeps 256 channels, dilations (1, 2, 3) that fit a 4 x 4 map
(dilations 6 and 9 would only see padding there), and a head that pools twice (4 -> 2 -> 1) and then uses 1 x 1
convolutions, since a 3 x 3 kernel on a 1 x 1 map only ever multiplies padding with eight of its nine taps. The
receptive field of a branch output is 86 px, so every output still sees the whole chip. Any input of at least 32 px
works. Its parameters and FLOPs per site are listed in the README beside the paper preset's
(``fusionkern.models.profile`` computes them).
"""

from __future__ import annotations

from dataclasses import dataclass

from fusionkern.errors import ConfigError

# MixPool alpha per pooling layer, lowest layer first.
ALPHAS = {
    "paper": (1.0, 0.8, 0.6, 0.4),  # the paper: max pooling at the lowest layer, 0.2 less per layer
    "authors": (1.0, 0.6, 0.2, 0.2),  # the authors' code
}


@dataclass(frozen=True)
class Preset:
    """Shapes of one FusionNet configuration (before the width multiplier)."""

    name: str
    input_size: int  # the side, in px, the model is fed (chips are resized to it when it differs)
    chip_px: int  # the side of a chip at 30 m, in px (about 1 km)
    widths: tuple[int, ...]  # branch convolutions' output channels
    pools: tuple[bool, ...]  # a 2 x 2 pool after branch convolution i
    dilations: tuple[int, ...]  # the dilated block's dilations
    head_widths: tuple[int, ...]  # CNN5 head convolutions' output channels
    head_pools: tuple[bool, ...]  # a 2 x 2 max-pool after head convolution i
    head_kernels: tuple[int, ...]  # head convolutions' kernel sizes

    @property
    def min_input(self) -> int:
        """The smallest input side for which every pool of FusionNet still has at least 1 px to pool."""
        return 2 ** (sum(self.pools) + sum(self.head_pools))

    @property
    def branch_min_input(self) -> int:
        """The smallest input side for a single-input model (branch pools only)."""
        return 2 ** sum(self.pools)


PRESETS = {
    "paper": Preset(
        name="paper",
        input_size=256,
        chip_px=35,
        widths=(32, 64, 128, 256, 512),
        pools=(True, True, True, True, False),
        dilations=(1, 3, 6, 9),
        head_widths=(32, 64, 128, 256, 512),
        head_pools=(True, True, True, True, False),
        head_kernels=(3, 3, 3, 3, 3),
    ),
    "native": Preset(
        name="native",
        input_size=35,
        chip_px=35,
        widths=(32, 64, 128, 256, 256),
        pools=(True, True, True, False, False),
        dilations=(1, 2, 3),
        head_widths=(32, 64, 128, 256, 512),
        head_pools=(True, True, False, False, False),
        head_kernels=(3, 3, 1, 1, 1),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def resolve_alphas(alphas: str | tuple[float, ...] | list[float], n_pools: int) -> tuple[float, ...]:
    """MixPool initial alphas for ``n_pools`` layers from a name in :data:`ALPHAS` or an explicit sequence."""
    if isinstance(alphas, str):
        if alphas not in ALPHAS:
            raise ConfigError(f"unknown alphas {alphas!r}; choose one of {sorted(ALPHAS)} or give numbers")
        alphas = ALPHAS[alphas]
    alphas = tuple(float(a) for a in alphas)
    if len(alphas) < n_pools:
        raise ConfigError(f"alphas needs {n_pools} values (one per pooling layer), got {len(alphas)}")
    return alphas[:n_pools]


def scale_width(channels: int, width: float) -> int:
    """Channels after the width multiplier (at least 2, so that attention's C / 2 stays non-empty)."""
    if width <= 0:
        raise ConfigError(f"width must be positive, got {width}")
    return max(2, int(round(channels * width)))
