#!/usr/bin/env bash
# Renders gateway/kong.yml into deploy/k8s/kong/kong.rendered.yml (git-ignored), the declarative
# configuration that kustomization.yaml packs into the `kong-declarative-config` Secret, and copies
# Kong's clinic-identity-signer plugin (gateway/kong-plugins/) into deploy/k8s/kong/plugins/
# (git-ignored) for the `kong-plugin-clinic-identity-signer` ConfigMap.
#
#   export DECK_DIRECTORY_JWT_PUBLIC_KEY="$(kubectl -n clinic exec deploy/directory -- python -m services.directory public-key)"
#   export DECK_PATIENT_PORTAL_API_KEY="$(cat /path/to/patient-portal-api-key)"
#   export DECK_LAB_INTERFACE_API_KEY="$(cat /path/to/lab-interface-api-key)"
#   export DECK_PRACTICE_MANAGEMENT_API_KEY="$(cat /path/to/practice-management-api-key)"
#   export DECK_COMPLIANCE_TRACKER_API_KEY="$(cat /path/to/compliance-tracker-api-key)"
#   export DECK_DASHBOARDS_API_KEY="$(cat /path/to/dashboards-api-key)"
#   deploy/k8s/render-kong-config.sh && kubectl apply -k deploy/k8s
#
# The other DECK_* values come from kong/deck.env (a value already exported wins). Uses a local
# `deck` when there is one, otherwise the kong/deck image.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
deck_image="${DECK_IMAGE:-kong/deck:v1.55.0}"
output="$here/kong/kong.rendered.yml"

names=()
while IFS='=' read -r name value; do
  case "$name" in ''|'#'*) continue ;; esac
  names+=("$name")
  if [ -z "${!name:-}" ]; then
    export "$name=$value"
  fi
done < "$here/kong/deck.env"

for name in DECK_DIRECTORY_JWT_PUBLIC_KEY DECK_PATIENT_PORTAL_API_KEY DECK_LAB_INTERFACE_API_KEY \
  DECK_PRACTICE_MANAGEMENT_API_KEY DECK_COMPLIANCE_TRACKER_API_KEY DECK_DASHBOARDS_API_KEY; do
  if [ -z "${!name:-}" ]; then
    echo "$name is not set (see the top of $0)" >&2
    exit 2
  fi
  names+=("$name")
done
# decK's own settings: no usage reporting, no release check.
export DECK_ANALYTICS=off DECK_SUPPRESS_UPDATE_CHECK=true

umask 077
tmp="$(mktemp "$here/kong/.kong.rendered.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
if command -v deck >/dev/null; then
  deck file render --populate-env-vars "$repo/gateway/kong.yml" --output-file - > "$tmp"
else
  env_args=(--env DECK_ANALYTICS --env DECK_SUPPRESS_UPDATE_CHECK)
  for name in "${names[@]}"; do
    env_args+=(--env "$name")
  done
  docker run --rm --network none "${env_args[@]}" -v "$repo/gateway:/gateway:ro" \
    "$deck_image" file render --populate-env-vars /gateway/kong.yml --output-file - > "$tmp"
fi
mv "$tmp" "$output"
trap - EXIT
echo "rendered $output"

plugins="$here/kong/plugins"
rm -rf "$plugins/clinic-identity-signer"
mkdir -p "$plugins"
cp -R "$repo/gateway/kong-plugins/clinic-identity-signer" "$plugins/"
echo "copied the clinic-identity-signer plugin into $plugins"
