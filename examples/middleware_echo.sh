#!/bin/sh
# Echo middleware in plain sh: every line (one hex-encoded message) goes back as it came.
#   --middleware "sh examples/middleware_echo.sh"
# The same in awk, dropping recorded responses (hex "32" is TYPE 2):
#   --middleware "awk '!/^32/ { print; fflush() }'"
while IFS= read -r line; do
  printf '%s\n' "$line"
done
