#!/bin/sh
# Entrypoint of the Docker image (Dockerfile.tensorrt). Like the Python handler qwen-edit replaces:
# a RunPod serverless worker by default (`qwen-edit worker`), the HTTP server with STANDALONE_MODE=1
# (or true/yes/on). Arguments run that qwen-edit command instead (`build --bundle ...`, `serve ...`).
set -e
if [ "$#" -gt 0 ]; then
  exec qwen-edit "$@"
fi
case "$(printf '%s' "${STANDALONE_MODE:-0}" | tr '[:upper:]' '[:lower:]')" in
  1 | true | yes | on) exec qwen-edit serve ;;
  *) exec qwen-edit worker ;;
esac
