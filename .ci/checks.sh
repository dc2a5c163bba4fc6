#!/usr/bin/env bash
# Static checks: lint (ruff), types (mypy on the three packages), docs (mkdocs --strict).
# Runs every check, prints a summary, exits non-zero if any failed.
# Uses the active Python environment: `pip install ".[docs,dev]"` first.
set -uo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python}"
failed=()

run() {
    local name="$1"
    shift
    echo "== $name: $*"
    if "$@"; then
        echo "== $name: ok"
    else
        echo "== $name: FAILED" >&2
        failed+=("$name")
    fi
}

# Lint: the library, the examples and the benchmarks (rules in pyproject.toml [tool.ruff]).
lint=(bogc_core backends integrations examples)
[ -d benchmarks ] && lint+=(benchmarks)
run ruff "$python" -m ruff check "${lint[@]}"
# Types: the core, the fast paths and the integrations must type-check cleanly
# (config in pyproject.toml [tool.mypy]; optional libraries without stubs are
# ignored there, so the check needs no GPU library installed).
run mypy "$python" -m mypy bogc_core backends integrations
# Docs: warnings (broken links, missing pages, docstrings mkdocstrings cannot
# parse) are errors. Built into a temporary folder so no site/ is left behind.
site="$(mktemp -d)"
run mkdocs env NO_MKDOCS_2_WARNING=1 "$python" -m mkdocs build --strict -d "$site"
rm -rf "$site"

if [ "${#failed[@]}" -ne 0 ]; then
    echo "checks failed: ${failed[*]}" >&2
    exit 1
fi
echo "all static checks passed"
