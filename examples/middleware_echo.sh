#!/bin/sh
# Echo middleware in plain sh: every line (one hex-encoded message) goes back as it came.
#   --middleware "sh examples/middleware_echo.sh"
# One-liners that drop recorded responses (hex "32" is TYPE 2; "31" requests, "33" replayed responses):
#   --middleware "grep --line-buffered -v ^32"
#   --middleware "awk '!/^32/ { print; fflush() }'"
# mawk (Debian's awk) reads its input in blocks: give it -W interactive when messages stream in
# (capture, play), or it answers only when a block fills or the input ends.
while IFS= read -r line; do
  printf '%s\n' "$line"
done
