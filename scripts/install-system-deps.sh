#!/usr/bin/env bash
# Installs the Debian packages kdgate's tests and benchmarks run for real: Prometheus (with
# promtool), Alertmanager (with amtool), Node.js + npm (the dashboards type-check against
# @grafana/schema), wrk (the closed-loop load generator of `make bench`) and HAProxy (the load
# balancer in front of the replicas of the fleet system test). A no-op when they
# are already there.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "kdgate: missing system packages: ${missing[*]} (apt-get install --no-install-recommends as root)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
