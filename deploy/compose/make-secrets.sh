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
#   secrets/tls_ca.pem, tls_ca.key  the private CA of every internal TLS link (docs/transport-security.md): its
#                                certificate is mounted into everything that dials or serves TLS; its key is
#                                mounted nowhere and only signs the certificates below
#   secrets/tls_grpc_<service>.pem, .key  each service's own gRPC certificate (mutual TLS: serverAuth and
#                                clientAuth, SAN = the service's compose name + 127.0.0.1 for its health check)
#   secrets/tls_mongo.pem, .key, tls_rabbitmq.pem, .key  the servers' certificates (SAN = their compose name,
#                                localhost, 127.0.0.1): mongod requires TLS, RabbitMQ listens on amqps (5671) only
#   secrets/tls_mllp.pem, .key, tls_smtp.pem, .key  notifications' MLLP listener and cloud-comms' Direct SMTP
#                                listener (STARTTLS), issued by the same CA as stand-ins: replace them with
#                                certificates for the names your lab interface and partner HISPs dial
#   secrets/rabbitmq_definitions.json  deploy/rabbitmq/definitions.json (one broker user per service, its
#                                permissions, the shared exchanges and queues) with each user's password hash,
#                                made again every run from the RABBITMQ_<SERVICE>_PASSWORD values in .env;
#                                the broker loads it at every start
#   .env                         passwords, the partner API keys (portal, lab interface), PHI_MASTER_KEY_ID and
#                                the gateway's public key; docker compose reads it for ${...} substitution
#
# Re-running keeps what exists (only the derived public keys, bus_producer_keys and .env are refreshed
# from the secrets), so rotation is: edit the files as docs/deploy.md says, run this again, `docker compose up -d`.
# A certificate is renewed by deleting it (its .pem and .key) and running this again; each run warns about a
# certificate that expires within 30 days or that the CA did not sign.
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

# --- TLS on every internal link ------------------------------------------------------------------------
# A private CA and one certificate per server and per gRPC peer, each with its own ECDSA P-256 key.
tls_days=825
ec_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256
}
# quiet COMMAND...: runs an openssl command that writes its result to a file, showing its chatter only on failure.
quiet() {
  local output
  if ! output="$("$@" 2>&1)"; then
    echo "$output" >&2
    return 1
  fi
}
create tls_ca.key ec_key
# Without tls_ca.pem (deleted to renew it) the same key signs a new CA certificate with the same name, so
# every certificate issued before still verifies.
if [ ! -s secrets/tls_ca.pem ]; then
  quiet openssl req -new -x509 -key secrets/tls_ca.key -days 3650 -subj "/CN=Clinic Message Board internal CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out secrets/.tls_ca.pem.tmp
  mv secrets/.tls_ca.pem.tmp secrets/tls_ca.pem
  echo "created secrets/tls_ca.pem"
fi
# check_certificate CERT internal|edge: warns when CERT expires within 30 days, or (internal) when the CA did not
# sign it. An edge certificate may come from another CA (the one your partners trust).
check_certificate() {
  if ! openssl x509 -in "$1" -noout -checkend $((30 * 86400)) >/dev/null; then
    echo "WARNING: $1 expires within 30 days: delete it and its .key, run $0 again, then docker compose up -d" >&2
  fi
  if [ "$2" = internal ] && ! openssl verify -CAfile secrets/tls_ca.pem "$1" >/dev/null 2>&1; then
    echo "WARNING: $1 is not signed by secrets/tls_ca.pem: delete it and its .key, and run $0 again" >&2
  fi
}
# issue NAME SUBJECT_ALT_NAMES internal|edge: secrets/tls_NAME.pem and secrets/tls_NAME.key, signed by the CA for
# server and client authentication, unless both exist.
issue() {
  local name="$1" names="$2" cert="secrets/tls_$1.pem" key="secrets/tls_$1.key"
  if [ -s "$cert" ] && [ -s "$key" ]; then
    check_certificate "$cert" "$3"
    return 0
  fi
  ec_key > "secrets/.tls_$name.key.tmp"
  printf '%s\n' "basicConstraints = critical, CA:FALSE" "keyUsage = critical, digitalSignature" \
    "extendedKeyUsage = serverAuth, clientAuth" "subjectKeyIdentifier = hash" "authorityKeyIdentifier = keyid" \
    "subjectAltName = $names" > "secrets/.tls_$name.ext"
  quiet openssl req -new -key "secrets/.tls_$name.key.tmp" -subj "/CN=$name" -out "secrets/.tls_$name.csr"
  quiet openssl x509 -req -in "secrets/.tls_$name.csr" -CA secrets/tls_ca.pem -CAkey secrets/tls_ca.key \
    -set_serial "0x$(openssl rand -hex 16)" -days "$tls_days" -extfile "secrets/.tls_$name.ext" \
    -out "secrets/.tls_$name.pem.tmp"
  rm -f "secrets/.tls_$name.csr" "secrets/.tls_$name.ext"
  mv "secrets/.tls_$name.key.tmp" "$key"
  mv "secrets/.tls_$name.pem.tmp" "$cert"
  echo "created $cert ($names)"
}
# The servers, by the name the services dial (and localhost for their own health checks).
issue mongo "DNS:mongo,DNS:localhost,IP:127.0.0.1" internal
issue rabbitmq "DNS:rabbitmq,DNS:localhost,IP:127.0.0.1" internal
# One gRPC certificate per service: it serves as <service>:<port> and presents the same one when it calls another.
grpc_peers="directory inbox notifications auto-reply erx-bridge cloud-comms audit web"
for peer in $grpc_peers; do
  issue "grpc_${peer}" "DNS:${peer},IP:127.0.0.1" internal
done
# Listeners for peers outside the stack (published on loopback here): stand-ins until you bring your own.
issue mllp "DNS:notifications,DNS:localhost,IP:127.0.0.1" edge
issue smtp "DNS:cloud-comms,DNS:localhost,IP:127.0.0.1" edge

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
patient_portal_api_key="$(password PATIENT_PORTAL_API_KEY)"
lab_interface_api_key="$(password LAB_INTERFACE_API_KEY)"
practice_management_api_key="$(password PRACTICE_MANAGEMENT_API_KEY)"
compliance_tracker_api_key="$(password COMPLIANCE_TRACKER_API_KEY)"
dashboards_api_key="$(password DASHBOARDS_API_KEY)"
# One line, "\n" escapes: compose expands them inside double quotes.
public_key_escaped="$(awk 'BEGIN { ORS = "\\n" } { print }' secrets/jwt_public_key.pem)"

# --- The broker's users: one per service (docs/bus-security.md) ---------------------------------------
# Each service signs in to RabbitMQ as itself, with the password RABBITMQ_<SERVICE>_PASSWORD (.env, kept across
# runs) and the permissions deploy/rabbitmq/definitions.json gives it. The broker loads that file at every start
# with each user's password hash filled in: secrets/rabbitmq_definitions.json, made again on every run.
broker_definitions="../rabbitmq/definitions.json"
if [ ! -s "$broker_definitions" ]; then
  echo "$(pwd)/$broker_definitions is missing (the broker's users and permissions)" >&2
  exit 1
fi
broker_variable() {
  printf 'RABBITMQ_%s_PASSWORD' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
}
# RabbitMQ's rabbit_password_hashing_sha256 of USER's PASSWORD: base64(salt + sha256(salt + password)). The
# 4-byte salt comes from the user and the (random) password, so the same password gives the same file.
rabbit_password_hash() {
  printf 'clinic-broker-salt:%s:%s' "$1" "$2" | openssl dgst -sha256 -binary > secrets/.broker_seed
  head -c 4 secrets/.broker_seed > secrets/.broker_salt
  { cat secrets/.broker_salt; printf '%s' "$2"; } | openssl dgst -sha256 -binary > secrets/.broker_digest
  cat secrets/.broker_salt secrets/.broker_digest | openssl base64 -A
  rm -f secrets/.broker_seed secrets/.broker_salt secrets/.broker_digest
}
broker_env=""
broker_hashes=""
for user in $bus_producers; do
  variable="$(broker_variable "$user")"
  value="$(password "$variable")"
  broker_env="${broker_env:+${broker_env}
}${variable}=${value}"
  broker_hashes="${broker_hashes} ${user} $(rabbit_password_hash "$user" "$value")"
done
# Each user object of the file (json.dumps, indent 2) has its "name" line before its empty "password_hash".
if ! awk -v hashes="$broker_hashes" '
  BEGIN { n = split(hashes, words, " "); for (i = 1; i < n; i += 2) hash[words[i]] = words[i + 1] }
  /"name": "/ { name = $0; sub(/^[^"]*"name": "/, "", name); sub(/".*$/, "", name) }
  /"password_hash": ""/ {
    if (!(name in hash)) { print "make-secrets.sh: no password for the broker user " name > "/dev/stderr"; exit 1 }
    sub(/"password_hash": ""/, "\"password_hash\": \"" hash[name] "\"")
  }
  { print }
' "$broker_definitions" > secrets/.rabbitmq_definitions.json.tmp; then
  rm -f secrets/.rabbitmq_definitions.json.tmp
  exit 1
fi
mv secrets/.rabbitmq_definitions.json.tmp secrets/rabbitmq_definitions.json

# Files bind-mounted as compose secrets keep their host mode; the services run as uid 10001
# (mongod as 999), so the files are world-readable while the folder stays private to you.
chmod 644 secrets/*
# The CA's key is mounted nowhere: private to you.
chmod 600 secrets/tls_ca.key
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
${broker_env}
PATIENT_PORTAL_API_KEY=${patient_portal_api_key}
LAB_INTERFACE_API_KEY=${lab_interface_api_key}
PRACTICE_MANAGEMENT_API_KEY=${practice_management_api_key}
COMPLIANCE_TRACKER_API_KEY=${compliance_tracker_api_key}
DASHBOARDS_API_KEY=${dashboards_api_key}
JWT_PUBLIC_KEY_PEM="${public_key_escaped}"
SERVICE_CLIENTS=${service_clients}
ENV
# Settings you added yourself (CORS_ORIGIN=..., RATE_LIMIT_MINUTE=...) are kept.
managed='PHI_MASTER_KEY_ID|MONGO_ROOT_PASSWORD|MONGO_DIRECTORY_PASSWORD|MONGO_INBOX_PASSWORD|MONGO_NOTIFICATIONS_PASSWORD|MONGO_AUTO_REPLY_PASSWORD|MONGO_ERX_BRIDGE_PASSWORD|MONGO_CLOUD_COMMS_PASSWORD|MONGO_AUDIT_PASSWORD|RABBITMQ_PASSWORD|RABBITMQ_[A-Z_]+_PASSWORD|PATIENT_PORTAL_API_KEY|LAB_INTERFACE_API_KEY|PRACTICE_MANAGEMENT_API_KEY|COMPLIANCE_TRACKER_API_KEY|DASHBOARDS_API_KEY|JWT_PUBLIC_KEY_PEM|SERVICE_CLIENTS'
if [ -f .env ]; then
  grep -Ev "^(#|(${managed})=)" .env >> .env.tmp || true
fi
mv .env.tmp .env
echo "wrote .env (PHI_MASTER_KEY_ID=${phi_key_id})"
echo "Next: docker compose -f $(pwd)/docker-compose.yml up --build --wait"
