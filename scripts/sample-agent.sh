#!/usr/bin/env sh
# A sample agent for the demo: thinks aloud on stderr and streams a Markdown answer to stdout
# token by token, the way an LLM agent does (no newline until a line is done).
set -eu
say() { printf '%s' "$1"; sleep "${TOKEN_DELAY:-0.05}"; }
echo '{"level":"info","message":"agent started","model":"demo"}' >&2
for word in "#" "Comparing" "two" "sorting" "strategies"; do say "$word "; done; echo; echo
for word in "The" "agent" "streams" "**tokens**" "as" "it" "thinks," "so" "the" "page" "fills" "in" "live." ; do say "$word "; done; echo; echo
echo '{"level":"info","message":"benchmarking","step":2}' >&2
say "| algorithm | time |"; echo; say "|---|---|"; echo
for alg in quicksort mergesort; do
    say "| \`$alg\` | "; say "$(( $(printf '%s' "$alg" | wc -c) * 7 )) ms |"; echo
done
echo
say '```rust'; echo; say 'fn main() { println!("done"); }'; echo; say '```'; echo
echo '{"level":"warn","message":"mergesort used more memory","bytes":1048576}' >&2
say "Done: *quicksort* wins on this input."; echo
