#!/usr/bin/env bash
# Deploy OSD (deploy/gpu.yaml) on the `ray up` cluster; run on the head node:
#   ray exec deploy/cluster.yaml 'bash ~/osd/deploy/launch-on-head.sh [CONFIG]'
# Redis runs on the head (deploy/redis.conf) with the password in ~/.osd/redis_password.
set -euo pipefail
config="${1:-$HOME/osd/deploy/gpu.yaml}"
head_ip="$(hostname -I | cut -d' ' -f1)"
REDIS_URL="redis://:$(cat "$HOME/.osd/redis_password")@${head_ip}:6380/0"
export REDIS_URL
exec osd launch --config "$config" --address auto
