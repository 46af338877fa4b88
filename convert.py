"""Convert a Qwen2.5-VL checkpoint into an MLX folder: ``python convert.py --hf-path ... -q``.

The same command as ``mlx-qwenvl convert`` (see ``mlx_qwenvl/convert.py``; the command itself is
in ``mlx_qwenvl/cli.py``).
"""

from mlx_qwenvl.cli import convert_command

if __name__ == "__main__":
    convert_command()
