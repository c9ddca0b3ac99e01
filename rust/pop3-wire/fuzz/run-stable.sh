#!/usr/bin/env bash
# Fuzz every pop3-wire target on STABLE Rust for a fixed time: libFuzzer (from the
# libfuzzer-sys crate) with rustc's SanitizerCoverage pass instead of cargo-fuzz, which
# needs nightly for -Zsanitizer. Coverage-guided, no sanitizer (the crate forbids
# unsafe); panics, overflow and debug assertions abort the run.
#
#   rust/pop3-wire/fuzz/run-stable.sh [SECONDS_PER_TARGET]   (default 12)
#
# Each run starts from the committed seeds (seeds/<target>/, read only) and a fresh
# corpus in a temporary directory. On a failure it prints the failing input (escaped
# and in hex) and how to reproduce it, and exits 1. Needs a C++ compiler (libFuzzer).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-12}
targets=(framer stuff unstuff roundtrip proxy)
host=$(rustc -vV | sed -n 's/^host: //p')
target_dir="$here/target/stable"

# --target keeps the instrumentation out of build scripts; debug assertions and
# overflow checks as cargo-fuzz builds.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
(cd "$here" && cargo build --quiet --release --locked --target "$host" --target-dir "$target_dir" \
    $(printf -- '--bin %s ' "${targets[@]}"))

work=$(mktemp -d "${TMPDIR:-/tmp}/pop3-wire-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
status=0
for t in "${targets[@]}"; do
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    seeds=()
    [ -d "$here/seeds/$t" ] && seeds=("$here/seeds/$t")
    start=$SECONDS
    if RUST_BACKTRACE=0 "$target_dir/$host/release/$t" "$work/$t/corpus" "${seeds[@]}" \
        -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$work/$t/artifacts/" -print_final_stats=1 \
        >"$work/$t/log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/log")
        cov=$(grep -o 'cov: [0-9]*' "$work/$t/log" | tail -1)
        printf 'fuzz %-9s ok: %s runs in %ss, %s, corpus %s inputs\n' \
            "$t" "${runs:-?}" "$((SECONDS - start))" "${cov:-cov: ?}" \
            "$(find "$work/$t/corpus" -type f | wc -l)"
    else
        status=1
        echo "fuzz $t FAILED; the end of libFuzzer's log:"
        tail -n 40 "$work/$t/log" | cut -c1-600
        for f in "$work/$t/artifacts"/*; do
            [ -f "$f" ] || continue
            echo "--- failing input $(basename "$f") ($(wc -c <"$f") octets; the first octet"
            echo "    picks the chunking). Escaped:"
            python3 -c 'import sys; print(repr(open(sys.argv[1], "rb").read()))' "$f" 2>/dev/null ||
                od -c "$f"
            echo "    hex:"
            od -A d -t x1 "$f"
            mkdir -p "$here/artifacts/$t"
            cp "$f" "$here/artifacts/$t/"
            echo "    kept as rust/pop3-wire/fuzz/artifacts/$t/$(basename "$f"); reproduce with:"
            echo "    $target_dir/$host/release/$t rust/pop3-wire/fuzz/artifacts/$t/$(basename "$f")"
        done
    fi
done
exit "$status"
