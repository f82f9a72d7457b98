#!/usr/bin/env bash
# Benchmarks on a lent device machine (an NVIDIA GPU through Vulkan), where
# nothing can be fetched and no Rust toolchain is assumed: the binaries, the
# Vulkan loader and the Python wheels travel with the working tree. Nothing in
# the project depends on this script; CI never runs it.
#
# Here, once per session (.dev/ and .gl/ are ignored, so they travel only
# when `carry` names them):
#   echo /.gl/ >> .git/info/exclude; echo /.dev/ >> .git/info/exclude
#   mkdir -p .gl .dev/whl /tmp/amd64/partial
#   o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .dev/whl gguf numpy
#   python3 -m pip download --no-deps -d .dev/whl pyyaml sentencepiece tqdm  # gguf's imports
#   cargo build --release --example bench_model
#   cargo bench --bench kernels --no-run 2>&1 | grep -o 'target/release/deps/kernels-[0-9a-f]*' | head -1
#   cp target/release/examples/bench_model <that kernels binary> .dev/   (rename it .dev/kernels)
#   strip .dev/bench_model .dev/kernels   # with debug info they pass the 64 MiB a call carries
#   python3 scripts/synth_gguf.py skeleton ~/.cache/kvsieve/download/SmolLM2-135M-Instruct.Q4_1.gguf .dev/skeleton.gguf
# Then: run(command="bash scripts/device_bench.sh", carry=[".gl", ".dev"], timeout_s=540).
#
# It writes $OUT/table.md (one line per run: the bench_model tables) and the
# JSON of each run; kernel benchmarks' figures in $OUT/kernels.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
N=${DECODE_TOKENS:-64}   # a smaller N smoke-tests the script on lavapipe
for f in .gl/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -e "$icd" ] && export VK_DRIVER_FILES=$icd
if ls .dev/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .dev/whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/table.md" 2>&1
python3 scripts/synth_gguf.py fill .dev/skeleton.gguf /tmp/q41.gguf >/dev/null
python3 scripts/synth_gguf.py fill .dev/skeleton.gguf /tmp/f16.gguf --f16 >/dev/null
run() {
    local name=$1
    shift
    echo "## $name: bench_model $*" >>"$OUT/table.md"
    timeout 120 .dev/bench_model --json "$OUT/$name.json" "$@" 2>>"$OUT/stderr.txt" \
        | grep '^|' | grep -v -e 'wgsl' -e 'kernel (decode' -e '^|---|---|---|---|$' >>"$OUT/table.md"
}
# Greedy and sampled decode, steps in flight (the GPU default) and one at a
# time: the in-flight gain and the sampled pick's cost, on the same machine.
run q41_greedy --model /tmp/q41.gguf --decode-tokens $N
run q41_greedy_one --model /tmp/q41.gguf --decode-tokens $N --decode-ahead 1
run q41_sampled --model /tmp/q41.gguf --decode-tokens $N --temperature 0.8
run q41_sampled_one --model /tmp/q41.gguf --decode-tokens $N --temperature 0.8 --decode-ahead 1
run f16_greedy --model /tmp/f16.gguf --decode-tokens $N
# Kernel profile of one run (per-kernel GPU time) for where decode goes.
.dev/bench_model --model /tmp/q41.gguf --decode-tokens 16 --profile-steps 8 --prompt-tokens 128 2>/dev/null \
    | grep 'wgsl' >"$OUT/profile.md"
[ "${KERNELS:-1}" = 1 ] && timeout 200 .dev/kernels --bench 'copy|qgemv|attention_decode' >"$OUT/kernels.txt" 2>&1
cat "$OUT/table.md"
