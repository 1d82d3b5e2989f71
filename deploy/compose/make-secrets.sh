#!/usr/bin/env bash
# Generates everything secret that the compose stack needs, once:
#
#   secrets/phi_master_keys      PHI master key ring, "id:<base64 of 32 random bytes>" (PHI_MASTER_KEYS_FILE)
#   secrets/jwt_signing_keys.pem RSA-3072 private key that signs access tokens (JWT_SIGNING_KEYS_FILE)
#   secrets/jwt_public_key.pem   its public key, derived from the FIRST key of the PEM file (the active one)
#   secrets/mongo_keyfile        shared key of the replica set members (internal authentication)
#   secrets/gateway_identity_key the key Kong signs partner identities with and the services check
#                                (GATEWAY_IDENTITY_KEY_FILE; Kong: docs/gateway-identity.md)
#   secrets/service_inbox_secret, secrets/service_auto-reply_secret  the service-client secrets of inbox
#                                and auto-reply (SERVICE_CLIENT_SECRET_FILE); directory
#                                gets only its SHA-256, as SERVICE_CLIENTS in .env
#   secrets/service_notifications_secret  the same for notifications
#   .env                         passwords, the partner API keys (portal, lab interface), PHI_MASTER_KEY_ID and the gateway's
#   secrets/service_web_secret   web's, likewise
#   secrets/service_erx-bridge_secret  erx-bridge's, likewise
#   secrets/service_cloud-comms_secret  cloud-comms', likewise
#   secrets/service_audit_secret  audit's, likewise
#   secrets/audit_signing_key.pem  the Ed25519 key that signs the audit chain's checkpoints (AUDIT_SIGNING_KEY_FILE);
#                                give auditors its public key: openssl pkey -in secrets/audit_signing_key.pem -pubout
#   secrets/direct_cert.pem, direct_key.pem, direct_anchors.pem  cloud-comms' Direct identity and trust
#                                anchors: a self-signed STAND-IN (CN "REPLACE ME") so the stack starts;
#                                replace them with your HISP-issued certificate + key and your
#                                partners' anchor bundle (services/cloud_comms/README.md)
#   secrets/fax_callback_token   eFax callback HMAC token (random); secrets/fax_api_key, fax_api_secret:
#                                "REPLACE-..." until you write your provider's credentials in
#   secrets/triage_index_key     cloud-comms' key of the patient roster's blind indexes (random; changing
#                                it needs the roster imported again)
#   secrets/patient_ref_key      the key audit records name patients by (PATIENT_REF_KEY_FILE; random): an MRN
#                                or a vendor's patient id becomes a keyed pseudonym (docs/audit-coverage.md);
#                                mounted into notifications, erx-bridge and audit. Never replace it casually:
#                                earlier records are then found only with the old key (PATIENT_REF_PREVIOUS_KEYS)
#   secrets/erx_practices.json   erx-bridge's practices at the ePrescribing vendor (ERX_PRACTICES_FILE):
#                                "{}" (none) until you write them in (services/erx_bridge/README.md)
#   secrets/bus_signing_<service>.pem  each service's own Ed25519 key (PKCS#8 PEM) that signs what it
#                                publishes on the bus (BUS_SIGNING_KEY_FILE; docs/bus-security.md), mounted
#                                into that service alone
#   secrets/bus_producer_keys    every service's public key, "<service>:<base64 of the raw 32-byte key>" a line,
#                                derived from those keys every run, then the lines of
#                                secrets/bus_producer_keys.retired if you keep one (replaced keys still
#                                accepted while old messages may be queued); BUS_PRODUCER_KEYS_FILE of all
#                                public key; docker compose reads it for ${...} substitution
#
# Re-running keeps what exists (only the derived public keys, bus_producer_keys and .env are refreshed
# from the secrets), so rotation is: edit the files as docs/deploy.md says, run this again, `docker compose up -d`.
# --force throws everything away and starts over (existing data becomes unreadable).
set -euo pipefail

cd "$(dirname "$0")"
force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

command -v openssl >/dev/null || { echo "openssl is required (apt-get install openssl)" >&2; exit 1; }

umask 077
mkdir -p secrets
# Partners' Direct certificates for outbound Direct (cloud-comms' CLOUD_DIRECT_RECIPIENT_CERTS): public, not secret.
mkdir -p direct-recipients
chmod 700 secrets
if [ "$force" = 1 ]; then
  rm -f secrets/* .env
fi

# create NAME COMMAND...: writes COMMAND's output to secrets/NAME unless it already exists.
create() {
  local name="$1"; shift
  if [ -s "secrets/$name" ]; then
    return 0
  fi
  "$@" > "secrets/.$name.tmp"
  mv "secrets/.$name.tmp" "secrets/$name"
  echo "created secrets/$name"
}

# A value of .env kept across runs, or a new random one.
existing() {
  [ -f .env ] && sed -n "s/^$1=//p" .env | tail -n 1 || true
}
password() {
  local value
  value="$(existing "$1")"
  [ -n "$value" ] && echo "$value" || openssl rand -hex 24
}

phi_key_ring() {
  printf 'phi-%s:%s\n' "$(date -u +%Y%m%d)" "$(openssl rand -base64 32)"
}
create phi_master_keys phi_key_ring
# Kong signs each partner request's identity with it; directory, inbox and notifications check it.
create gateway_identity_key openssl rand -hex 32
rsa_private_key() {
  # -quiet (OpenSSL 3) hides the progress dots; older versions print them to stderr.
  if openssl genpkey -help 2>&1 | grep -q -- '-quiet'; then
    openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:3072
  else
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 2>/dev/null
  fi
}
create jwt_signing_keys.pem rsa_private_key
create mongo_keyfile openssl rand -base64 756
create service_inbox_secret openssl rand -hex 32
create service_notifications_secret openssl rand -hex 32
create service_auto-reply_secret openssl rand -hex 32
create service_web_secret openssl rand -hex 32
create service_erx-bridge_secret openssl rand -hex 32
no_practices() {
  printf '{}\n'
}
create erx_practices.json no_practices
create service_cloud-comms_secret openssl rand -hex 32
# A stand-in Direct identity (self-signed, its own anchor): replace with the real ones.
if [ ! -s secrets/direct_key.pem ] || [ ! -s secrets/direct_cert.pem ]; then
  rsa_private_key > secrets/.direct_key.pem.tmp
  openssl req -new -x509 -key secrets/.direct_key.pem.tmp -days 365 -subj "/CN=REPLACE ME Direct stand-in" \
    -addext "subjectAltName=DNS:direct.clinic.example" -addext "keyUsage=critical,digitalSignature,keyEncipherment" \
    -out secrets/.direct_cert.pem.tmp
  mv secrets/.direct_key.pem.tmp secrets/direct_key.pem
  mv secrets/.direct_cert.pem.tmp secrets/direct_cert.pem
  echo "created secrets/direct_key.pem and secrets/direct_cert.pem (a stand-in: replace them)"
fi
stand_in_anchors() {
  cat secrets/direct_cert.pem
}
create direct_anchors.pem stand_in_anchors
create fax_callback_token openssl rand -hex 32
replace_me() {
  printf 'REPLACE-with-your-fax-provider-credential\n'
}
create fax_api_key replace_me
create fax_api_secret replace_me
create triage_index_key openssl rand -hex 32
# notifications and erx-bridge name patients in audit records with it; audit searches with the same one.
create patient_ref_key openssl rand -hex 32
create service_audit_secret openssl rand -hex 32
create audit_signing_key.pem openssl genpkey -algorithm ED25519

# One bus signing key per service (the producer names of services/kit/bus/signing.py), and the list of
# their public keys every consumer checks signatures against.
bus_producers="directory inbox notifications erx-bridge cloud-comms auto-reply web audit"
for producer in $bus_producers; do
  create "bus_signing_${producer}.pem" openssl genpkey -algorithm ED25519
done
bus_producer_keys() {
  local producer
  for producer in $bus_producers; do
    # The raw key is the last 32 bytes of the Ed25519 SubjectPublicKeyInfo.
    printf '%s:%s\n' "$producer" \
      "$(openssl pkey -in "secrets/bus_signing_${producer}.pem" -pubout -outform DER | tail -c 32 | openssl base64 -A)"
  done
  if [ -f secrets/bus_producer_keys.retired ]; then
    grep -Ev '^[[:space:]]*(#|$)' secrets/bus_producer_keys.retired || true
  fi
}
bus_producer_keys > secrets/.bus_producer_keys.tmp
mv secrets/.bus_producer_keys.tmp secrets/bus_producer_keys

# directory registers each service client by the SHA-256 (hex) of its secret, never the secret.
service_digest() {
  printf '%s' "$(cat "secrets/service_$1_secret")" | openssl dgst -sha256 -r | cut -d' ' -f1
}
service_clients="inbox:$(service_digest inbox),notifications:$(service_digest notifications),auto-reply:$(service_digest auto-reply),erx-bridge:$(service_digest erx-bridge),web:$(service_digest web),cloud-comms:$(service_digest cloud-comms),audit:$(service_digest audit)"

# The gateway verifies tokens with the public half of the active (first) signing key.
openssl pkey -in secrets/jwt_signing_keys.pem -pubout -out secrets/jwt_public_key.pem

# The active PHI key is the first of the ring unless .env already names another one.
phi_key_id="$(existing PHI_MASTER_KEY_ID)"
if [ -z "$phi_key_id" ]; then
  phi_key_id="$(head -n 1 secrets/phi_master_keys | cut -d, -f1 | cut -d: -f1)"
fi

mongo_root_password="$(password MONGO_ROOT_PASSWORD)"
mongo_directory_password="$(password MONGO_DIRECTORY_PASSWORD)"
mongo_inbox_password="$(password MONGO_INBOX_PASSWORD)"
mongo_notifications_password="$(password MONGO_NOTIFICATIONS_PASSWORD)"
mongo_auto_reply_password="$(password MONGO_AUTO_REPLY_PASSWORD)"
mongo_erx_bridge_password="$(password MONGO_ERX_BRIDGE_PASSWORD)"
mongo_cloud_comms_password="$(password MONGO_CLOUD_COMMS_PASSWORD)"
mongo_audit_password="$(password MONGO_AUDIT_PASSWORD)"
rabbitmq_password="$(password RABBITMQ_PASSWORD)"
patient_portal_api_key="$(password PATIENT_PORTAL_API_KEY)"
lab_interface_api_key="$(password LAB_INTERFACE_API_KEY)"
practice_management_api_key="$(password PRACTICE_MANAGEMENT_API_KEY)"
compliance_tracker_api_key="$(password COMPLIANCE_TRACKER_API_KEY)"
# One line, "\n" escapes: compose expands them inside double quotes.
public_key_escaped="$(awk 'BEGIN { ORS = "\\n" } { print }' secrets/jwt_public_key.pem)"

# Files bind-mounted as compose secrets keep their host mode; the services run as uid 10001
# (mongod as 999), so the files are world-readable while the folder stays private to you.
chmod 644 secrets/*
chmod 700 secrets

cat > .env.tmp <<ENV
# Generated by make-secrets.sh; git-ignored. Passwords are kept when it runs again.
PHI_MASTER_KEY_ID=${phi_key_id}
MONGO_ROOT_PASSWORD=${mongo_root_password}
MONGO_DIRECTORY_PASSWORD=${mongo_directory_password}
MONGO_INBOX_PASSWORD=${mongo_inbox_password}
MONGO_NOTIFICATIONS_PASSWORD=${mongo_notifications_password}
MONGO_AUTO_REPLY_PASSWORD=${mongo_auto_reply_password}
MONGO_ERX_BRIDGE_PASSWORD=${mongo_erx_bridge_password}
MONGO_CLOUD_COMMS_PASSWORD=${mongo_cloud_comms_password}
MONGO_AUDIT_PASSWORD=${mongo_audit_password}
RABBITMQ_PASSWORD=${rabbitmq_password}
PATIENT_PORTAL_API_KEY=${patient_portal_api_key}
LAB_INTERFACE_API_KEY=${lab_interface_api_key}
PRACTICE_MANAGEMENT_API_KEY=${practice_management_api_key}
COMPLIANCE_TRACKER_API_KEY=${compliance_tracker_api_key}
JWT_PUBLIC_KEY_PEM="${public_key_escaped}"
SERVICE_CLIENTS=${service_clients}
ENV
# Settings you added yourself (CORS_ORIGIN=..., RATE_LIMIT_MINUTE=...) are kept.
managed='PHI_MASTER_KEY_ID|MONGO_ROOT_PASSWORD|MONGO_DIRECTORY_PASSWORD|MONGO_INBOX_PASSWORD|MONGO_NOTIFICATIONS_PASSWORD|MONGO_AUTO_REPLY_PASSWORD|MONGO_ERX_BRIDGE_PASSWORD|MONGO_CLOUD_COMMS_PASSWORD|MONGO_AUDIT_PASSWORD|RABBITMQ_PASSWORD|PATIENT_PORTAL_API_KEY|LAB_INTERFACE_API_KEY|PRACTICE_MANAGEMENT_API_KEY|COMPLIANCE_TRACKER_API_KEY|JWT_PUBLIC_KEY_PEM|SERVICE_CLIENTS'
if [ -f .env ]; then
  grep -Ev "^(#|(${managed})=)" .env >> .env.tmp || true
fi
mv .env.tmp .env
echo "wrote .env (PHI_MASTER_KEY_ID=${phi_key_id})"
echo "Next: docker compose -f $(pwd)/docker-compose.yml up --build --wait"
