// One-shot (the compose `mongo-init` service, run with mongosh): makes the compose MongoDB a
// single-node replica set and gives each service its own user, allowed only its own database.
// Safe to run again: an initiated set is left alone and existing users get the current password.
const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const admin = db.getSiblingDB("admin");
admin.auth("root", env("MONGO_ROOT_PASSWORD"));

try {
  rs.status();
  print("replica set already initiated");
} catch (error) {
  if (error.codeName !== "NotYetInitialized") throw error;
  rs.initiate({ _id: env("MONGO_REPLICA_SET"), members: [{ _id: 0, host: env("MONGO_MEMBER_HOST") }] });
  print("replica set initiated");
}

// Users can only be created on the primary; a fresh set elects itself within seconds.
for (let waited = 0; !db.hello().isWritablePrimary; waited += 1) {
  if (waited >= 60) throw new Error("no primary after 60 s");
  sleep(1000);
}

const prefix = env("MONGO_DB_PREFIX");

// The audit service's user may read and append its records, chains and checkpoints but never change or
// remove one (services/audit/store.py has no such code path; this makes it so for the database too).
// Its other collections (outbox of its reads, processed events, relay lease) are ordinary.
function auditRole() {
  const name = "clinicAuditAppendOnly";
  const database = `${prefix}audit`;
  const appendOnly = ["find", "insert", "createIndex", "listIndexes", "createCollection"];
  const ordinary = [...appendOnly, "update", "remove"];
  const privileges = [
    ...["audit_records", "audit_checkpoints", "audit_chains"].map((collection) => ({
      resource: { db: database, collection },
      actions: appendOnly,
    })),
    ...["access_records", "security_outbox", "processed_events", "outbox_leases"].map((collection) => ({
      resource: { db: database, collection },
      actions: ordinary,
    })),
    { resource: { db: database, collection: "" }, actions: ["listCollections"] },
  ];
  if (admin.getRole(name)) {
    admin.updateRole(name, { privileges, roles: [] });
  } else {
    admin.createRole({ role: name, privileges, roles: [] });
  }
  return name;
}
for (const [service, passwordVariable] of [
  ["directory", "MONGO_DIRECTORY_PASSWORD"],
  ["inbox", "MONGO_INBOX_PASSWORD"],
  ["notifications", "MONGO_NOTIFICATIONS_PASSWORD"],
  ["auto-reply", "MONGO_AUTO_REPLY_PASSWORD"],
  ["erx-bridge", "MONGO_ERX_BRIDGE_PASSWORD"],
  ["cloud-comms", "MONGO_CLOUD_COMMS_PASSWORD"],
  ["audit", "MONGO_AUDIT_PASSWORD"],
]) {
  const roles =
    service === "audit" ? [{ role: auditRole(), db: "admin" }] : [{ role: "readWrite", db: `${prefix}${service}` }];
  const pwd = env(passwordVariable);
  if (admin.getUser(service)) {
    admin.updateUser(service, { pwd, roles });
  } else {
    admin.createUser({ user: service, pwd, roles });
  }
  print(`user ${service}: ${roles[0].role} on ${prefix}${service}`);
}
