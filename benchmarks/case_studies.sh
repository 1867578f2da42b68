#!/bin/sh
# The case studies of docs/case_studies.md, end to end, on SmolLM2-135M-Instruct with the
# 30-layer transcoders of RUN (default runs/viewer-all: `transcoders train --layers all
# --expansion-factor 4 --total-tokens 409600 --run-dir runs/viewer-all`, and its feature store,
# `transcoders features runs/viewer-all --tokens 100000`). Writes OUT/ (default runs/case-studies)
# and copies the figures to docs/images/. About 2.5 hours on 2 CPU cores.
#
#   sh benchmarks/case_studies.sh [RUN] [OUT]
set -eu
RUN=${1:-runs/viewer-all}
OUT=${2:-runs/case-studies}
T=${TRANSCODERS:-.venv/bin/transcoders}
mkdir -p "$OUT"
$T task make greater-than --n 200 --seed 0 --out "$OUT/greater-than.jsonl" --force
$T task make ioi --n 200 --seed 0 --out "$OUT/ioi.jsonl" --force
$T task make arithmetic --n 55 --seed 0 --out "$OUT/arithmetic.jsonl" --force
$T task study "$RUN" "$OUT/greater-than.jsonl" --limit 60 --select 20 --out "$OUT/greater-than" --force
$T task study "$RUN" "$OUT/greater-than.jsonl" --limit 30 --select 10 --objective counterfactual --out "$OUT/greater-than-cf" --force
$T task study "$RUN" "$OUT/ioi.jsonl" --limit 20 --select 8 --out "$OUT/ioi" --force
$T task study "$RUN" "$OUT/arithmetic.jsonl" --limit 20 --select 8 --out "$OUT/arithmetic" --force
head -1 "$OUT/greater-than.jsonl" > "$OUT/greater-than-one.jsonl"
rm -f "$OUT/graphs/greater-than-one-0.json"
$T task trace "$RUN" "$OUT/greater-than-one.jsonl" --out-dir "$OUT/graphs"
$T paths "$OUT/graphs/greater-than-one-0.json" -n 8 --run-dir "$RUN" > "$OUT/greater-than-one-paths.txt"
for s in greater-than greater-than-cf ioi arithmetic; do cp "$OUT/$s/study.png" "docs/images/case_$s.png"; done
echo "blind case study: $T blind $RUN --n 10 --seed 0 --out $OUT/blind (write the hypotheses, then --reveal)"
