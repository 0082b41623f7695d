#!/bin/sh
# The work pools and deployments of infra/prefect.yaml on the local stack (docker-compose.yml,
# profile "pools"). Locally both pools are process pools; on a cluster gpu is a kubernetes pool
# (see docs/operations.md). Run from /opt/mergeline (the image's working directory). The last
# step creates the automation that marks a run Crashed when its worker dies (flows/silent_runs.py).
set -e
prefect work-pool create cpu --type process --overwrite
prefect work-pool create gpu --type process --overwrite
prefect deploy --all --prefect-file infra/prefect.yaml
python -m flows.silent_runs
