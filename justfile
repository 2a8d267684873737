# onehead recipes. Install just with `cargo install just` (or use the cargo commands shown).

# Run one experiment file: `just run experiments/replay.toml --set seed=1`
run FILE *ARGS:
    cargo run --release -- run {{FILE}} {{ARGS}}

# The offline quickstart pair on the built-in benchmark
quickstart:
    cargo run --release -- sweep experiments/quickstart_no_replay.toml experiments/quickstart_replay.toml --name quickstart

# Redraw a run's plots and report.html: `just plot results/quickstart/quickstart_replay/<run-id>`
plot +RUN_DIRS:
    cargo run --release -- plot {{RUN_DIRS}}

# Compare runs or sweeps: `just compare results/quickstart --out results/quickstart/compare`
compare +ARGS:
    cargo run --release -- compare {{ARGS}}

# Check a report in headless Chromium and screenshot it (needs `apt-get install chromium`)
check-report TARGET:
    scripts/check_report.sh {{TARGET}}

# The README's picture, from the quickstart's replay run
readme-image:
    run=results/quickstart/runs/quickstart_replay && cargo run --release -- plot "$run" && cp "$run/plots/metrics.png" docs/quickstart_metrics.png

# Sweep files and/or a grid: `just sweep experiments/quickstart_*.toml --set seed=0,1,2`
sweep +ARGS:
    cargo run --release -- sweep {{ARGS}}

# Write the synthetic benchmark: `just synth data/synth`
synth OUT *ARGS:
    cargo run --release -- synth --out {{OUT}} {{ARGS}}

# Download and sample the real course sets (needs the internet)
prepare OUT="data/course" *ARGS:
    cargo run --release -- prepare --out {{OUT}} {{ARGS}}

# Model size, shapes and latency
info *ARGS:
    cargo run --release -- info {{ARGS}}

# Training/inference throughput
bench *ARGS:
    cargo run --release -- bench {{ARGS}}

# The test suite (what CI runs)
test:
    cargo test --all-targets

lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Prove the CUDA code paths (and the CUDA-vs-CPU tests) compile without a GPU (needs nvcc; see README)
check-cuda:
    CUDA_COMPUTE_CAP=80 cargo build --release --features cuda
    CUDA_COMPUTE_CAP=80 cargo test --release --features cuda --test cuda --no-run

# On a GPU machine: every test, the CUDA-vs-CPU comparisons (tests/cuda.rs) included
test-cuda:
    cargo test --release --features cuda --all-targets
