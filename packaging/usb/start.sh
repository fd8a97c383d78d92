#!/bin/sh
# Starts rollcall from this folder; its data lives in rollcall-data/ beside it.
# Open http://127.0.0.1:8080 on this machine. Stop with Ctrl-C.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/rollcall" serve "$@"
