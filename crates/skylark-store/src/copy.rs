//! Moving an embedded (redb) store into PostgreSQL, offline, verified.
//!
//! Every record of the redb file is written to the shard that owns it (the
//! directory's records to the first), in batches of [`BATCH`] rows per
//! table and shard. Then each table is read back from every shard and
//! compared with the source: the row count and a checksum — the sum of a
//! SHA-256 prefix of every row's canonical form, so the order rows come
//! back in does not matter, and a missing, extra or altered row changes it.

use crate::postgres::{PgStore, holds_data, shard_of};
use crate::record::{INBOUND_SLOT, OwnMarks, PeerMarks};
use crate::redb_store::{self, RedbStore};
use crate::{PgOptions, StoreError};
use redb::{ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use skylark_core::AccountId;
use sqlx::Row;
use std::collections::HashMap;
use std::path::Path;

/// Rows sent in one INSERT.
pub const BATCH: usize = 2_000;

/// One table's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: &'static str,
    pub rows: u64,
    /// Checksum of the source's rows.
    pub source: String,
    /// Rows and checksum read back from PostgreSQL.
    pub copied_rows: u64,
    pub copied: String,
}

impl TableReport {
    pub fn matches(&self) -> bool {
        self.rows == self.copied_rows && self.source == self.copied
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    OptInt,
    Small,
    Text,
    Bytes,
    Json,
}

/// A destination table: its columns, where its rows go (`shard_by`: the
/// column holding the owning account or group; `None`: the directory),
/// and which rows belong to the copy.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    shard_by: Option<usize>,
    filter: &'static str,
}

use Kind::*;

const TABLES: &[Table] = &[
    Table {
        name: "meta",
        columns: &[("key", Text), ("value", Bytes)],
        shard_by: None,
        filter: "key = 'server_id' OR key LIKE 'secret:%'",
    },
    Table { name: "id_counters", columns: &[("name", Text), ("next", Int)], shard_by: None, filter: "" },
    Table {
        name: "accounts",
        columns: &[("id", Int), ("phone", Text), ("created_at_ms", Int)],
        shard_by: None,
        filter: "",
    },
    Table {
        name: "devices",
        columns: &[
            ("id", Int),
            ("account_id", Int),
            ("public_key", Bytes),
            ("name", Text),
            ("created_at_ms", Int),
            ("removed_at_ms", OptInt),
            ("last_seen_ms", OptInt),
        ],
        shard_by: None,
        filter: "",
    },
    Table {
        name: "verifications",
        columns: &[("id", Text), ("created_at_ms", Int), ("record", Json)],
        shard_by: None,
        filter: "",
    },
    Table { name: "push", columns: &[("device", Int), ("target", Json)], shard_by: None, filter: "" },
    // A package's place in its device's stock is not copied (the new
    // database numbers them in the order they come); which one a claim
    // takes first does not matter.
    Table { name: "key_packages", columns: &[("device", Int), ("package", Bytes)], shard_by: None, filter: "" },
    Table { name: "last_resort_keys", columns: &[("device", Int), ("package", Bytes)], shard_by: None, filter: "" },
    Table { name: "log", columns: &[("account", Int), ("seq", Int), ("entry", Bytes)], shard_by: Some(0), filter: "" },
    Table {
        name: "expiries",
        columns: &[("expires_at", Int), ("account", Int), ("seq", Int)],
        shard_by: Some(1),
        filter: "",
    },
    Table {
        name: "outbox",
        columns: &[("account", Int), ("seq", Int), ("item", Bytes)],
        shard_by: Some(0),
        filter: "",
    },
    Table {
        name: "counters",
        columns: &[("account", Int), ("next_seq", Int), ("next_outbox", Int)],
        shard_by: Some(0),
        filter: "",
    },
    Table {
        name: "client_ids",
        columns: &[("account", Int), ("device", Int), ("client_id", Text), ("seq", Int)],
        shard_by: Some(0),
        filter: "",
    },
    Table {
        name: "inbound",
        columns: &[("account", Int), ("source", Int), ("hwm", Int)],
        shard_by: Some(0),
        filter: "",
    },
    Table {
        name: "cursors",
        columns: &[("account", Int), ("device", Int), ("seq", Int)],
        shard_by: Some(0),
        filter: "",
    },
    Table {
        name: "receipts",
        columns: &[("account", Int), ("peer", Int), ("slot", Small), ("hwm", Int)],
        shard_by: Some(0),
        filter: "",
    },
    Table { name: "contacts", columns: &[("account", Int), ("peer", Int)], shard_by: Some(0), filter: "" },
    Table { name: "settings", columns: &[("account", Int), ("visibility", Json)], shard_by: Some(0), filter: "" },
    Table { name: "pins", columns: &[("account", Int), ("record", Json)], shard_by: Some(0), filter: "" },
    Table { name: "profiles", columns: &[("account", Int), ("record", Json)], shard_by: Some(0), filter: "" },
    Table {
        name: "contact_names",
        columns: &[("account", Int), ("peer", Int), ("name", Text)],
        shard_by: Some(0),
        filter: "",
    },
    Table { name: "reports", columns: &[("id", Int), ("record", Json)], shard_by: None, filter: "" },
    Table {
        name: "blocks",
        columns: &[("account", Int), ("peer", Int), ("at_ms", Int)],
        shard_by: Some(0),
        filter: "",
    },
    Table { name: "groups", columns: &[("id", Int), ("meta", Json)], shard_by: Some(0), filter: "" },
    Table { name: "memberships", columns: &[("member", Int), ("group_id", Int)], shard_by: Some(1), filter: "" },
];

/// One value of a row.
#[derive(Debug, Clone)]
enum Value {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
    Bytes(Vec<u8>),
}

fn int(v: u64) -> Result<Value, StoreError> {
    i64::try_from(v).map(Value::Int).map_err(|_| StoreError::Invariant(format!("{v} does not fit int8")))
}

/// A JSON record in one canonical form (keys sorted, no spaces), so the
/// source's and jsonb's renderings compare equal.
fn canonical_json(text: &[u8]) -> Result<Value, StoreError> {
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Value::Text(value.to_string()))
}

/// The order-independent checksum of a table's rows.
#[derive(Default)]
struct Sum {
    rows: u64,
    total: u128,
}

impl Sum {
    fn add(&mut self, row: &[Value]) {
        let mut hash = Sha256::new();
        for value in row {
            match value {
                Value::Int(v) => hash.update(format!("i{v}|")),
                Value::OptInt(Some(v)) => hash.update(format!("i{v}|")),
                Value::OptInt(None) => hash.update("n|"),
                Value::Text(t) => {
                    hash.update(format!("t{}:", t.len()));
                    hash.update(t);
                }
                Value::Bytes(b) => {
                    hash.update(format!("b{}:", b.len()));
                    hash.update(b);
                }
            }
        }
        let digest = hash.finalize();
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&digest[..16]);
        self.total = self.total.wrapping_add(u128::from_be_bytes(prefix));
        self.rows += 1;
    }

    fn hex(&self) -> String {
        format!("{:032x}", self.total)
    }
}

/// Rows waiting to be written, per (table, shard).
struct Pending<'a> {
    store: &'a PgStore,
    rows: HashMap<(usize, usize), Vec<Vec<Value>>>,
    sums: Vec<Sum>,
}

impl Pending<'_> {
    async fn push(&mut self, table: usize, row: Vec<Value>) -> Result<(), StoreError> {
        let spec = &TABLES[table];
        let shard = match spec.shard_by {
            None => 0,
            Some(column) => match row[column] {
                Value::Int(id) => shard_of(AccountId(id as u64), self.store.shard_count()),
                _ => return Err(StoreError::Invariant("a shard key is not an integer".into())),
            },
        };
        self.sums[table].add(&row);
        let batch = self.rows.entry((table, shard)).or_default();
        batch.push(row);
        if batch.len() >= BATCH {
            let batch = std::mem::take(batch);
            self.write(table, shard, batch).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        let mut keys: Vec<(usize, usize)> = self.rows.keys().copied().collect();
        keys.sort();
        for (table, shard) in keys {
            let batch = self.rows.remove(&(table, shard)).unwrap_or_default();
            if !batch.is_empty() {
                self.write(table, shard, batch).await?;
            }
        }
        Ok(())
    }

    async fn write(&self, table: usize, shard: usize, rows: Vec<Vec<Value>>) -> Result<(), StoreError> {
        let spec = &TABLES[table];
        let names: Vec<&str> = spec.columns.iter().map(|c| c.0).collect();
        let arrays: Vec<String> = spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, kind))| {
                let t = match kind {
                    Int | OptInt => "int8",
                    Small => "int2",
                    Text | Json => "text",
                    Bytes => "bytea",
                };
                format!("${}::{t}[]", i + 1)
            })
            .collect();
        let select: Vec<String> =
            spec.columns.iter().map(|(n, k)| if *k == Json { format!("{n}::jsonb") } else { n.to_string() }).collect();
        let sql = format!(
            "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS t({})",
            spec.name,
            names.join(", "),
            select.join(", "),
            arrays.join(", "),
            names.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (i, (_, kind)) in spec.columns.iter().enumerate() {
            let column = rows.iter().map(|r| r[i].clone());
            query = match kind {
                Int => query.bind(column.map(|v| if let Value::Int(x) = v { x } else { 0 }).collect::<Vec<i64>>()),
                Small => {
                    query.bind(column.map(|v| if let Value::Int(x) = v { x as i16 } else { 0 }).collect::<Vec<i16>>())
                }
                OptInt => query.bind(
                    column.map(|v| if let Value::OptInt(x) = v { x } else { None }).collect::<Vec<Option<i64>>>(),
                ),
                Text | Json => query.bind(
                    column.map(|v| if let Value::Text(x) = v { x } else { String::new() }).collect::<Vec<String>>(),
                ),
                Bytes => query.bind(
                    column.map(|v| if let Value::Bytes(x) = v { x } else { Vec::new() }).collect::<Vec<Vec<u8>>>(),
                ),
            };
        }
        let conn = self.store.shard_conns().nth(shard).ok_or(StoreError::Closed)?;
        query.execute(&conn.pool).await.map_err(|e| conn.fail(e))?;
        Ok(())
    }
}

fn index_of(name: &str) -> usize {
    TABLES.iter().position(|t| t.name == name).unwrap_or(0)
}

/// A JSON-record table keyed by an integer.
fn json_rows(txn: &redb::ReadTransaction, def: TableDefinition<u64, &[u8]>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let table = txn.open_table(def)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

/// Copies the redb store file at `from` into the (empty) PostgreSQL store
/// `to`, then verifies every table. `progress` hears each table's name as
/// it is copied.
pub async fn redb_to_postgres(
    from: &Path,
    to: &PgOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<TableReport>, StoreError> {
    if !from.is_file() {
        return Err(StoreError::Unusable(format!("there is no store file at {}", from.display())));
    }
    let source = RedbStore::open(from)?;
    let target = PgStore::open(to).await?;
    for (i, conn) in target.shard_conns().enumerate() {
        if holds_data(conn).await? {
            return Err(StoreError::Unusable(format!(
                "shard {i} of the destination already holds accounts or messages; copy into empty databases only"
            )));
        }
    }
    let mut pending =
        Pending { store: &target, rows: HashMap::new(), sums: TABLES.iter().map(|_| Sum::default()).collect() };
    let txn = source.db.begin_read()?;

    progress("meta");
    let mut counters = vec![("account", 1u64), ("device", 1), ("group", 1), ("report", 1)];
    {
        let meta = txn.open_table(redb_store::META)?;
        for entry in meta.iter()? {
            let (k, v) = entry?;
            let (key, value) = (k.value().to_owned(), v.value().to_vec());
            let counter = match key.as_str() {
                "next_account_id" => Some(0),
                "next_device_id" => Some(1),
                "next_group_id" => Some(2),
                "next_report_id" => Some(3),
                _ => None,
            };
            if let Some(i) = counter {
                let bytes: [u8; 8] = value.try_into().map_err(|_| StoreError::Corrupt(format!("meta {key}")))?;
                counters[i].1 = u64::from_be_bytes(bytes);
            } else if key == "server_id" || key.starts_with("secret:") {
                pending.push(index_of("meta"), vec![Value::Text(key), Value::Bytes(value)]).await?;
            }
        }
    }
    for (name, next) in counters {
        pending.push(index_of("id_counters"), vec![Value::Text(name.into()), int(next)?]).await?;
    }

    progress("accounts");
    for (_, raw) in json_rows(&txn, redb_store::ACCOUNTS)? {
        let a: skylark_core::Account = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        pending
            .push(index_of("accounts"), vec![int(a.id.0)?, Value::Text(a.phone.as_str().into()), int(a.created_at_ms)?])
            .await?;
    }
    progress("devices");
    for (_, raw) in json_rows(&txn, redb_store::DEVICES)? {
        let d: skylark_core::Device = serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let opt = |v: Option<u64>| v.map(|x| i64::try_from(x).unwrap_or(i64::MAX));
        let row = vec![
            int(d.id.0)?,
            int(d.account_id.0)?,
            Value::Bytes(d.public_key.to_vec()),
            Value::Text(d.name),
            int(d.created_at_ms)?,
            Value::OptInt(opt(d.removed_at_ms)),
            Value::OptInt(opt(d.last_seen_ms)),
        ];
        pending.push(index_of("devices"), row).await?;
    }
    progress("verifications");
    {
        let table = txn.open_table(redb_store::VERIFICATIONS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            let session: skylark_core::verification::VerificationSession =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let row = vec![Value::Text(k.value().into()), int(session.created_at_ms)?, canonical_json(v.value())?];
            pending.push(index_of("verifications"), row).await?;
        }
    }
    progress("push");
    for (device, raw) in json_rows(&txn, redb_store::PUSH)? {
        pending.push(index_of("push"), vec![int(device)?, canonical_json(&raw)?]).await?;
    }
    progress("key packages");
    {
        let table = txn.open_table(redb_store::KEY_PACKAGES)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            pending.push(index_of("key_packages"), vec![int(k.value().0)?, Value::Bytes(v.value().to_vec())]).await?;
        }
        let table = txn.open_table(redb_store::LAST_RESORT_KEYS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            pending.push(index_of("last_resort_keys"), vec![int(k.value())?, Value::Bytes(v.value().to_vec())]).await?;
        }
    }
    progress("settings");
    for (account, raw) in json_rows(&txn, redb_store::SETTINGS)? {
        pending.push(index_of("settings"), vec![int(account)?, canonical_json(&raw)?]).await?;
    }
    for (account, raw) in json_rows(&txn, redb_store::PINS)? {
        pending.push(index_of("pins"), vec![int(account)?, canonical_json(&raw)?]).await?;
    }
    {
        let table = txn.open_table(redb_store::CONTACT_NAMES)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (account, peer) = k.value();
            let row = vec![int(account)?, int(peer)?, Value::Text(v.value().to_owned())];
            pending.push(index_of("contact_names"), row).await?;
        }
    }
    for (account, raw) in json_rows(&txn, redb_store::PROFILES)? {
        pending.push(index_of("profiles"), vec![int(account)?, canonical_json(&raw)?]).await?;
    }
    for (id, raw) in json_rows(&txn, redb_store::REPORTS)? {
        pending.push(index_of("reports"), vec![int(id)?, canonical_json(&raw)?]).await?;
    }
    progress("groups");
    for (id, raw) in json_rows(&txn, redb_store::GROUPS)? {
        pending.push(index_of("groups"), vec![int(id)?, canonical_json(&raw)?]).await?;
    }

    progress("outbox");
    {
        let table = txn.open_table(redb_store::OUTBOX)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (account, seq) = k.value();
            pending.push(index_of("outbox"), vec![int(account)?, int(seq)?, Value::Bytes(v.value().to_vec())]).await?;
        }
    }
    {
        let table = txn.open_table(redb_store::EXPIRIES)?;
        for entry in table.iter()? {
            let (k, _) = entry?;
            let (at, account, seq) = k.value();
            pending.push(index_of("expiries"), vec![int(at)?, int(account)?, int(seq)?]).await?;
        }
    }
    progress("log and marks");
    {
        let table = txn.open_table(redb_store::CLIENT_IDS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (account, device, client_id) = k.value();
            let row = vec![int(account)?, int(device)?, Value::Text(client_id.into()), int(v.value())?];
            pending.push(index_of("client_ids"), row).await?;
        }
        let table = txn.open_table(redb_store::BLOCKS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (a, b) = k.value();
            pending.push(index_of("blocks"), vec![int(a)?, int(b)?, int(v.value())?]).await?;
        }
        // The embedded store's account rows hold what PostgreSQL keeps in
        // six tables: each becomes the rows it stood for.
        let table = txn.open_table(redb_store::ROWS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (account, kind, peer) = k.value();
            if kind == redb_store::LOG_ROW {
                let row = vec![int(account)?, int(peer)?, Value::Bytes(v.value().to_vec())];
                pending.push(index_of("log"), row).await?;
                continue;
            }
            if kind != redb_store::MARK_ROW {
                return Err(StoreError::Corrupt(format!("account {account} has a row of unknown kind {kind}")));
            }
            if peer == redb_store::OWN {
                let own = OwnMarks::decode(v.value())?;
                if let Some(c) = own.counters {
                    let row = vec![int(account)?, int(c.next_seq)?, int(c.next_outbox)?];
                    pending.push(index_of("counters"), row).await?;
                }
                for (device, seq) in own.cursors {
                    pending.push(index_of("cursors"), vec![int(account)?, int(device)?, int(seq)?]).await?;
                }
                continue;
            }
            let marks = PeerMarks::decode(v.value())?;
            if let Some(hwm) = marks.slot(INBOUND_SLOT) {
                pending.push(index_of("inbound"), vec![int(account)?, int(peer)?, int(hwm)?]).await?;
            }
            for (slot, hwm) in marks.receipt_rows() {
                let row = vec![int(account)?, int(peer)?, Value::Int(i64::from(slot)), int(hwm)?];
                pending.push(index_of("receipts"), row).await?;
            }
            if marks.contact {
                pending.push(index_of("contacts"), vec![int(account)?, int(peer)?]).await?;
            }
        }
        let table = txn.open_table(redb_store::MEMBERSHIPS)?;
        for entry in table.iter()? {
            let (a, b) = entry?.0.value();
            pending.push(index_of("memberships"), vec![int(a)?, int(b)?]).await?;
        }
    }
    pending.flush().await?;
    drop(txn);

    progress("verifying");
    let mut reports = Vec::new();
    for (i, spec) in TABLES.iter().enumerate() {
        let copied = read_back(&target, spec).await?;
        reports.push(TableReport {
            table: spec.name,
            rows: pending.sums[i].rows,
            source: pending.sums[i].hex(),
            copied_rows: copied.rows,
            copied: copied.hex(),
        });
    }
    Ok(reports)
}

/// A table's checksum as PostgreSQL holds it, over every shard.
async fn read_back(store: &PgStore, spec: &Table) -> Result<Sum, StoreError> {
    let columns: Vec<String> =
        spec.columns.iter().map(|(n, k)| if *k == Json { format!("{n}::text") } else { n.to_string() }).collect();
    let filter = if spec.filter.is_empty() { String::new() } else { format!(" WHERE {}", spec.filter) };
    let sql = format!("SELECT {} FROM {}{filter}", columns.join(", "), spec.name);
    let mut sum = Sum::default();
    for conn in store.shard_conns() {
        let rows = sqlx::query(&sql).fetch_all(&conn.pool).await.map_err(|e| conn.fail(e))?;
        for row in rows {
            let mut values = Vec::with_capacity(spec.columns.len());
            for (i, (_, kind)) in spec.columns.iter().enumerate() {
                let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                values.push(match kind {
                    Int => Value::Int(row.try_get(i).map_err(get)?),
                    Small => Value::Int(i64::from(row.try_get::<i16, _>(i).map_err(get)?)),
                    OptInt => Value::OptInt(row.try_get(i).map_err(get)?),
                    Text => Value::Text(row.try_get(i).map_err(get)?),
                    Json => canonical_json(row.try_get::<String, _>(i).map_err(get)?.as_bytes())?,
                    Bytes => Value::Bytes(row.try_get(i).map_err(get)?),
                });
            }
            sum.add(&values);
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::throwaway::TestPostgres;
    use crate::{AccountStore, GroupStore, MessageStore, MetaStore, SettingsStore, conformance};

    /// A redb file with every kind of record (the conformance suite's
    /// leavings), copied to 1 and to 3 shards: every table verifies, and
    /// the PostgreSQL store answers as the file did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redb_store_copies_whole_to_one_and_to_three_shards() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skylark.redb");
        {
            let redb = RedbStore::open(&path).unwrap();
            conformance::run_all(&redb).await;
        }
        let pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
        for shards in [1usize, 3] {
            let urls: Vec<String> =
                (0..shards).map(|i| pg.create_database(&format!("copy{shards}_{i}")).unwrap()).collect();
            let options = PgOptions { shards: urls, ..PgOptions::default() };
            let mut seen = Vec::new();
            let reports = redb_to_postgres(&path, &options, |t| seen.push(t.to_owned())).await.unwrap();
            assert!(seen.contains(&"verifying".to_string()));
            for report in &reports {
                assert!(report.matches(), "{report:?}");
            }
            let rows = |name: &str| reports.iter().find(|r| r.table == name).unwrap().rows;
            assert!(
                rows("log") > 50 && rows("accounts") >= 4 && rows("groups") >= 1 && rows("devices") >= 5,
                "{reports:?}"
            );
            // What the embedded store keeps in its account rows is copied
            // as the rows of five tables.
            for table in ["counters", "cursors", "inbound", "receipts", "contacts"] {
                assert!(rows(table) >= 1, "no {table} copied: {reports:?}");
            }

            let redb = RedbStore::open(&path).unwrap();
            let copy = PgStore::open(&options).await.unwrap();
            let phone = skylark_core::PhoneNumber::parse("+15550001000").unwrap();
            let account = redb.account_by_phone(&phone).await.unwrap().unwrap();
            assert_eq!(copy.account_by_phone(&phone).await.unwrap(), Some(account.clone()));
            assert_eq!(copy.active_devices(account.id).await.unwrap(), redb.active_devices(account.id).await.unwrap());
            for id in [900u64, 1_000, 1_049, account.id.0] {
                let id = AccountId(id);
                assert_eq!(copy.read_log(id, 0, 100).await.unwrap(), redb.read_log(id, 0, 100).await.unwrap());
                assert_eq!(copy.account_state(id).await.unwrap(), redb.account_state(id).await.unwrap());
                assert_eq!(copy.receipt_state(id).await.unwrap(), redb.receipt_state(id).await.unwrap());
                for device in redb.active_devices(id).await.unwrap() {
                    assert_eq!(copy.cursor(id, device.id).await.unwrap(), redb.cursor(id, device.id).await.unwrap());
                }
                for peer in [900u64, 1_000, 1_049] {
                    let peer = AccountId(peer);
                    assert_eq!(copy.inbound(id, peer).await.unwrap(), redb.inbound(id, peer).await.unwrap());
                    assert_eq!(copy.is_contact(id, peer).await.unwrap(), redb.is_contact(id, peer).await.unwrap());
                }
                assert_eq!(copy.visibility(id).await.unwrap(), redb.visibility(id).await.unwrap());
            }
            let group = AccountId::group(1);
            assert_eq!(copy.group(group).await.unwrap(), redb.group(group).await.unwrap());
            assert_eq!(copy.account_state(group).await.unwrap(), redb.account_state(group).await.unwrap());
            assert_eq!(copy.groups_of(AccountId(902)).await.unwrap(), redb.groups_of(AccountId(902)).await.unwrap());
            assert_eq!(copy.server_id([0; 16]).await.unwrap(), redb.server_id([1; 16]).await.unwrap());
            // Ids go on from where the file left them.
            let next = copy.allocate_group().await.unwrap();
            assert_eq!(next, redb.allocate_group().await.unwrap());
            drop(redb);

            // A second copy into the same databases is refused.
            let again = redb_to_postgres(&path, &options, |_| {}).await;
            assert!(matches!(&again, Err(StoreError::Unusable(m)) if m.contains("already holds")), "{again:?}");
        }
    }

    /// The checksum sees an altered row.
    #[test]
    fn the_checksum_sees_a_changed_row() {
        let mut a = Sum::default();
        let mut b = Sum::default();
        a.add(&[Value::Int(1), Value::Bytes(vec![1, 2])]);
        a.add(&[Value::Int(2), Value::Text("x".into())]);
        b.add(&[Value::Int(2), Value::Text("x".into())]);
        b.add(&[Value::Int(1), Value::Bytes(vec![1, 2])]);
        assert_eq!(a.hex(), b.hex(), "order does not matter");
        b.add(&[Value::OptInt(None)]);
        assert_ne!((a.rows, a.hex()), (b.rows, b.hex()));
        let mut c = Sum::default();
        c.add(&[Value::Int(1), Value::Bytes(vec![1, 3])]);
        c.add(&[Value::Int(2), Value::Text("x".into())]);
        assert_ne!(a.hex(), c.hex(), "an altered byte changes it");
    }
}
