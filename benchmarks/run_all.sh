#!/usr/bin/env bash
# Every measurement of benchmarks/README.md, in the order they were run on the Linux CPU machine.
# Model folders go to benchmarks/out/ (ignored); results to benchmarks/results/*.json.
# About 90 minutes on 2 cores; the 3B runs need ~18 GB of free memory.
set -euo pipefail
cd "$(dirname "$0")/.."
B="python benchmarks/bench.py"
R=benchmarks/results
mkdir -p "$R"

# deep-thin: the whole protocol, fresh processes per system taking turns: 5 in float32 and bfloat16,
# 3 in 4-bit (whose image prompts take about a minute each here)
for dtype in float32 bfloat16; do
  $B run deep-thin --dtype $dtype --processes 5 --runs 1 --json $R/deep-thin-$dtype.json
done
$B run deep-thin --dtype q4 --processes 3 --runs 1 --json $R/deep-thin-q4.json
# a 12-megapixel photo at the hub's max_pixels (ours only: mlx-vlm would hold every head's N x N scores)
$B run deep-thin --systems ours --vision 4032x3024 --generate "" --warmup "" --runs 1 \
  --memory-cap-gb 16 --json $R/deep-thin-12mp.json

# 3B, float32: two image sizes, 16 decode tokens (a float32 3B token takes ~2 s here)
$B run 3B --dtype float32 --vision 672x448,1288x728 --generate 672x448 --warmup 224x224 --tokens 16 --runs 3 \
  --json $R/3B-float32.json
# (3B in bfloat16 and 4-bit is not in the tables: 16-bit and quantized products run at a few GFLOP/s
# on this CPU; on a Mac: $B run 3B --dtype bfloat16 --processes 3 --runs 1, and --dtype q4)

# issue 7: the OpenBLAS binding and float32 vs bfloat16 (3B widths, 2 layers + 2 blocks)
$B blas 3B-slice --dtypes float32,bfloat16 --vision 448x448 --generate 448x448 --warmup 224x224 --tokens 16 \
  --runs 3 --json $R/3B-slice-blas.json

# converting the 3B checkpoint to 4-bit: ours against mlx-vlm's converter
$B convert 3B --runs 3 --json $R/convert-3B.json

# issue 17: start-up of --help and of the README demo, before (8c5500d) and after (c4d9441) the lazy imports
python benchmarks/startup.py run --before 8c5500d --after c4d9441 --json $R/startup.json
# the same with torch installed (an environment with the test extra; mlx-vlm not in it)
python benchmarks/startup.py run --python .venv/bin/python --no-mlx-vlm --before 8c5500d --after c4d9441 --json $R/startup-with-torch.json
