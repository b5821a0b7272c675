#!/usr/bin/env bash
# The history page per commit, as a static site: store this commit's result
# set beside the earlier ones and rebuild `ftbench history` over all of them.
#
#   examples/ci/history_site.sh STORE SITE [-- RUN_OPTIONS...]
#
# STORE keeps one result set per commit (STORE/<commit>/); SITE receives the
# HTML page, plots, Markdown and SQLite database (publish it with GitHub Pages
# or any static host). Exit status: ftbench history's (1 when the newest point
# of a series regressed).
set -uo pipefail
STORE="${1:?usage: history_site.sh STORE SITE [-- RUN_OPTIONS...]}"
SITE="${2:?usage: history_site.sh STORE SITE [-- RUN_OPTIONS...]}"
shift 2
[ "${1:-}" = "--" ] && shift
RUN_OPTIONS=("$@")
[ ${#RUN_OPTIONS[@]} -eq 0 ] && RUN_OPTIONS=(--grid grids/cpu-smoke.yaml)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
COMMIT="$(git rev-parse --short=12 HEAD)"
ftbench run "${RUN_OPTIONS[@]}" --out "$STORE/$COMMIT" || exit 2
if [ "$(find "$STORE" -mindepth 2 -maxdepth 2 -name results.jsonl | wc -l)" -lt 2 ]; then
  mkdir -p "$SITE"
  echo "<!doctype html><title>ftbench history</title><p>The history starts with the second stored commit; the first result set is $COMMIT.</p>" > "$SITE/history.html"
  cp "$SITE/history.html" "$SITE/index.html"
  exit 0
fi
ftbench history "$STORE" --out "$SITE" --quiet
status=$?
cp "$SITE/history.html" "$SITE/index.html" 2>/dev/null || true
exit $status
