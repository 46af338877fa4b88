"""How weights are quantized, as one object: ``QuantSettings`` (bits, group size, mode) and the
table of what MLX's modes take, read by the converter (what it may write) and by the loader (what
a folder's shapes imply). A new mode is one row of ``MODES``.

Plain Python, without MLX, so the command line can offer the choices without loading it.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

from .errors import ConversionError


class Mode(NamedTuple):
    """What one of ``mx.quantize``'s modes takes and stores."""

    bits: tuple  # bits per weight it takes
    group_sizes: tuple  # weights per group it takes
    default: tuple  # (bits, group size) when not given, as mlx-lm
    biases: bool  # a bias per group besides the scale (affine); the others store uint8 scales only
    # MLX's CPU quantize holds temporaries of about 7 (affine) to 45 (mxfp4) and 80 (nvfp4) bytes
    # an element: the converter quantizes blocks this many times smaller, so its peak stays near one
    # tensor (nvfp4: 1.3 GB for a 64 MB block, 0.11 GB at 1/16; no slower, measured).
    block_divisor: int


# What mx.quantize takes in this MLX (checked against the library itself): affine in any of these
# bits and group sizes, each floating-point mode in one (bits, group size).
MODES = {
    "affine": Mode((1, 2, 3, 4, 5, 6, 8), (32, 64, 128), (4, 64), True, 1),
    "mxfp4": Mode((4,), (32,), (4, 32), False, 16),
    "nvfp4": Mode((4,), (16,), (4, 16), False, 16),
    "mxfp8": Mode((8,), (32,), (8, 32), False, 4),
}
BITS = tuple(sorted({bits for mode in MODES.values() for bits in mode.bits}))
GROUP_SIZES = tuple(sorted({size for mode in MODES.values() for size in mode.group_sizes}))



def modes_help() -> str:
    """The modes and what each takes, for --q-mode's help: ``affine (1/2/3/4/5/6/8 bits, groups
    of 32/64/128), mxfp4 (4-bit, groups of 32), ...``."""
    def one(name, mode):
        bits = f"{mode.bits[0]}-bit" if len(mode.bits) == 1 else f"{'/'.join(map(str, mode.bits))} bits"
        return f"{name} ({bits}, groups of {'/'.join(map(str, mode.group_sizes))})"

    return ", ".join(one(name, mode) for name, mode in MODES.items())


# Mixed-precision recipes: (low bits, high bits), affine. mlx-lm has the first four; mlx-vlm all.
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_5": (3, 5), "mixed_3_6": (3, 6),
           "mixed_3_8": (3, 8), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}


@dataclass(frozen=True)
class QuantSettings:
    """How one layer's weights are (or are to be) quantized."""

    bits: int
    group_size: int
    mode: str = "affine"

    @classmethod
    def choose(cls, mode: str = "affine", bits: Optional[int] = None,
               group_size: Optional[int] = None) -> "QuantSettings":
        """The settings asked for, the mode's defaults where not given (unchecked: see check).

        Raises ConversionError (one line) for a mode MLX does not have."""
        if mode not in MODES:
            raise ConversionError(f"q_mode (--q-mode) must be one of {', '.join(MODES)}, not {mode!r}")
        default_bits, default_group_size = MODES[mode].default
        return cls(default_bits if bits is None else bits,
                   default_group_size if group_size is None else group_size, mode)

    @classmethod
    def implied(cls, bits: int, group_size: int, biases: bool) -> Optional["QuantSettings"]:
        """The settings a layer's stored bits, group size and (absent) biases imply; None when
        no mode MLX has stores a layer so."""
        for name, mode in MODES.items():
            if mode.biases == biases and bits in mode.bits and group_size in mode.group_sizes:
                return cls(bits, group_size, name)
        return None

    @classmethod
    def from_entry(cls, entry: dict, path: Optional[str] = None) -> "QuantSettings":
        """A layer's settings from config.json's ``quantization`` entry: its own under its module
        ``path`` when the entry has them (mixed recipes), else the entry's; the mode is affine
        unless the entry names another (as mlx-lm writes affine entries)."""
        own = entry.get(path) if path is not None else None
        own = own if isinstance(own, dict) else entry
        return cls(own.get("bits"), own.get("group_size"), own.get("mode", entry.get("mode", "affine")))

    def problem(self) -> Optional[str]:
        """Why MLX cannot quantize with these settings, in one line naming the converter's
        options; None when it can."""
        mode = MODES.get(self.mode)
        if mode is None:
            return f"q_mode (--q-mode) must be one of {', '.join(MODES)}, not {self.mode!r}"
        if len(mode.bits) == 1 and len(mode.group_sizes) == 1:
            if (self.bits, self.group_size) == mode.default:
                return None
            bits, group_size = mode.default
            return (f"{self.mode} quantizes {bits}-bit weights in groups of {group_size} only, not "
                    f"{self.bits}-bit in groups of {self.group_size}; leave --q-bits and --q-group-size out")
        if self.bits not in mode.bits:
            return (f"q_bits (--q-bits) must be one of {', '.join(map(str, mode.bits))} for {self.mode} quantization, "
                    f"not {self.bits}")
        if self.group_size not in mode.group_sizes:
            return (f"q_group_size (--q-group-size) must be one of {', '.join(map(str, mode.group_sizes))} for {self.mode} "
                    f"quantization, not {self.group_size}")
        return None

    def check(self) -> "QuantSettings":
        """These settings; ConversionError (problem's line) when MLX cannot quantize with them."""
        problem = self.problem()
        if problem:
            raise ConversionError(problem)
        return self

    @property
    def biases(self) -> bool:
        """Whether a quantized layer stores biases (affine) besides its scales."""
        return MODES[self.mode].biases

    @property
    def block_divisor(self) -> int:
        return MODES[self.mode].block_divisor

    def as_dict(self) -> dict:
        """``{"group_size", "bits", "mode"}``: ``nn.quantize``'s arguments, a layer's settings."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def entry(self) -> dict:
        """config.json's form, as mlx-lm writes it: "mode" only for the floating-point modes, so
        that older readers see the affine entry they know."""
        entry = {"group_size": self.group_size, "bits": self.bits}
        if self.mode != "affine":
            entry["mode"] = self.mode
        return entry
