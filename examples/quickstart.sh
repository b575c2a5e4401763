#!/usr/bin/env bash
# memslot in five minutes: ask the demo model a question, inject a counterfactual fact, ask
# again, look at the history, roll back, ask again.
#
#   examples/quickstart.sh
#       starts its own server on ${MEMSLOT_MODEL:-models/demo} with a fresh store in a temporary
#       folder, and stops it at the end (build the model first: `make demo`).
#   MEMSLOT_SERVER=127.0.0.1:50051 examples/quickstart.sh
#       uses a server that is already running (`make run`); the fact it injects is rolled back
#       at the end, so the served answers are as before (the history keeps both versions).
#
# Environment: MEMSLOT_PROMPT and MEMSLOT_TARGET (the fact to inject), MEMSLOT_TOKEN (an
# editor token, for a server with --tokens), MEMSLOT_BIN (the memslot executable).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ -n "${MEMSLOT_BIN:-}" ]]; then
    memslot="$MEMSLOT_BIN"
elif [[ -x "$root/.venv/bin/memslot" ]]; then
    memslot="$root/.venv/bin/memslot"
else
    memslot="memslot"
fi
model="${MEMSLOT_MODEL:-models/demo}"
prompt="${MEMSLOT_PROMPT:-Yusuf Nyberg was born in}"
target="${MEMSLOT_TARGET:-Lisbon}"

step() { printf '\n==> %s\n' "$*"; }
run() {  # print the command the way you would type it, then run it
    local shown="memslot" arg
    for arg in "${@:2}"; do
        if [[ "$arg" == *" "* || -z "$arg" ]]; then shown+=" \"$arg\""; else shown+=" $arg"; fi
    done
    printf '$ %s\n' "$shown"
    "$memslot" "${@:2}"
}

server_pid=""
workdir=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        step "Stop the server"
        kill -TERM "$server_pid"
        wait "$server_pid" || true
        echo "stopped"
    fi
    if [[ -n "$workdir" ]]; then rm -rf "$workdir"; fi
}
trap cleanup EXIT

if [[ -z "${MEMSLOT_SERVER:-}" ]]; then
    if [[ ! -f "$model/config.json" ]]; then
        echo "no model in $model: build the demo model with \`make demo\` (or set MEMSLOT_MODEL)" >&2
        exit 2
    fi
    workdir="$(mktemp -d "${TMPDIR:-/tmp}/memslot-quickstart.XXXXXX")"
    step "Start a server on $model with a fresh store (in a temporary folder)"
    printf '$ memslot serve --model %s --store %s --port 0\n' "$model" "$workdir/store"
    "$memslot" serve --model "$model" --store "$workdir/store" --port 0 \
        >"$workdir/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 600); do
        if grep -q "memslot serving" "$workdir/server.log"; then break; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then
            cat "$workdir/server.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    line="$(grep "memslot serving" "$workdir/server.log")" || {
        cat "$workdir/server.log" >&2
        exit 1
    }
    echo "$line"
    export MEMSLOT_SERVER="127.0.0.1:${line##*127.0.0.1:}"
    MEMSLOT_SERVER="${MEMSLOT_SERVER%% *}"
else
    step "Use the server at $MEMSLOT_SERVER"
fi

run memslot status

step "1. Ask the model"
run memslot query "$prompt"

step "2. Teach it a counterfactual fact: only the memory slots the prompt reads are rewritten"
run memslot inject "$prompt" "$target" -m "quickstart: a counterfactual fact"

step "3. Ask again: the new version answers with the new fact"
run memslot query "$prompt"

step "4. The history: every change is a version"
run memslot log -n 5
run memslot diff head~1 head -n 5

step "5. Roll back: a new version that restores the rows of the version before the injection"
run memslot rollback head~1

step "6. Ask again: the original answer is back"
run memslot query "$prompt"
