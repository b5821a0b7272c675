#!/usr/bin/env bash
# The pull-request check of examples/ci/, as one script that any CI can call.
#
#   examples/ci/pr_check.sh BASE_REF OUT [-- RUN_OPTIONS...]
#
# Runs the grid under both versions, interleaved in one session (ftbench ab:
# the pull request's working tree against BASE_REF), reports the new side,
# and writes OUT/comment.md: the verdict, the table and what differed behind
# each flagged change, ready to post as the pull request's comment.
# Exit status: ftbench ab's (0 no regression, 1 a regression, 2 bad input).
set -uo pipefail
BASE_REF="${1:?usage: pr_check.sh BASE_REF OUT [-- RUN_OPTIONS...]}"
OUT="${2:?usage: pr_check.sh BASE_REF OUT [-- RUN_OPTIONS...]}"
shift 2
[ "${1:-}" = "--" ] && shift
RUN_OPTIONS=("$@")
[ ${#RUN_OPTIONS[@]} -eq 0 ] && RUN_OPTIONS=(--grid grids/cpu-smoke.yaml)
# One intra-op thread per process: on a shared runner spinning threads drown the signal in noise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

ftbench ab --base "$BASE_REF" --rounds "${FTBENCH_AB_ROUNDS:-4}" --out "$OUT" -- "${RUN_OPTIONS[@]}"
status=$?
if [ -d "$OUT/B" ]; then
  ftbench report "$OUT/B" --out "$OUT/report" --quiet || true
fi
{
  echo "<!-- ftbench-pr-check -->"
  if [ -f "$OUT/ab.md" ]; then cat "$OUT/ab.md"; else echo "ftbench ab did not finish (exit $status); see the job log."; fi
  echo
  echo "_Interleaved A/B run: each cell ran ${FTBENCH_AB_ROUNDS:-4} times per version in ABBA order; speed is judged on the per-round ratio of the two versions' step times (docs/comparisons.md)._"
} > "$OUT/comment.md"
echo "wrote $OUT/comment.md"
exit $status
