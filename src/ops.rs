//! Operator commands: `backup` (a consistent online snapshot in one archive), `restore`
//! (into an empty data directory, verifying the archive and the audit chain) and
//! `healthcheck` (does the server answer).
//!
//! The archive is a zip holding `rollcall.db` (made with `VACUUM INTO`, consistent while the
//! server runs), `audit/*.jsonl` (copied under the audit log's lock, so files and the
//! database's anchor agree), the data directory's `rules/` and `rollcall.toml` if present,
//! and `MANIFEST.json` with the SHA-256 of every entry.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::DataDir;
use crate::error::{AppError, AppResult};
use crate::service::App;

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    rollcall_version: String,
    schema_version: i64,
    created_at: String,
    /// The data directory the backup was taken from (stored upload paths start with it).
    #[serde(default)]
    source_root: String,
    /// Entry name -> SHA-256 of its content.
    entries: std::collections::BTreeMap<String, String>,
}

fn io(what: &str, p: &Path, e: std::io::Error) -> AppError {
    AppError::internal(
        format!("{what} {}", p.display()),
        crate::config::describe_io(&e),
    )
}

fn zerr(e: zip::result::ZipError) -> AppError {
    AppError::internal("writing the backup archive", e)
}

/// Files below `dir`, as (path, name relative to `base` with `/` separators).
fn walk(dir: &Path, base: &Path, out: &mut Vec<(PathBuf, String)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, base, out);
        } else if p.is_file()
            && let Ok(rel) = p.strip_prefix(base)
        {
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((p, name));
        }
    }
}

/// Writes a backup of the data directory to `out`; returns the number of entries.
pub fn backup(app: &App, out: &Path) -> AppResult<usize> {
    let data = &app.data;
    let tmp_db = data
        .tmp_dir()
        .join(format!("backup-{}.db", std::process::id()));
    let _ = fs::remove_file(&tmp_db);
    let partial = out.with_extension("partial");
    let result = (|| {
        let mut files: Vec<(PathBuf, String)> = Vec::new();
        // The audit files and the database snapshot under the audit lock: the anchor in the
        // snapshot then matches the files' end.
        let audit_dir = data.audit_dir();
        let audit_copy = data
            .tmp_dir()
            .join(format!("backup-audit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&audit_copy);
        fs::create_dir_all(&audit_copy).map_err(|e| io("creating", &audit_copy, e))?;
        crate::audit::with_lock(&audit_dir, || {
            app.conn
                .execute("VACUUM INTO ?1", [tmp_db.to_string_lossy()])
                .map_err(|e| AppError::internal("snapshotting the database", e))?;
            for f in crate::audit::files(&audit_dir)? {
                let dest = audit_copy.join(f.file_name().unwrap_or_default());
                fs::copy(&f, &dest).map_err(|e| io("copying", &f, e))?;
            }
            Ok(())
        })?;
        files.push((tmp_db.clone(), "rollcall.db".into()));
        walk(&audit_copy, &audit_copy, &mut files);
        for f in files.iter_mut().skip(1) {
            f.1 = format!("audit/{}", f.1);
        }
        let mut rules = Vec::new();
        walk(&data.rules_dir(), data.root(), &mut rules);
        files.extend(rules);
        if data.config_file().is_file() {
            files.push((data.config_file(), "rollcall.toml".into()));
        }
        // The files of uploads that are still to be run (waiting jobs, valid uploads not yet
        // submitted): a restored worker needs them. Asked of the snapshot, not the live
        // database, whose jobs may have moved on since.
        let snapshot = rusqlite::Connection::open_with_flags(
            &tmp_db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| AppError::internal("reading the database snapshot", e))?;
        let mut st = snapshot.prepare(
            "SELECT DISTINCT u.stored_path FROM uploads u
             WHERE u.stored_path <> ''
               AND (EXISTS (SELECT 1 FROM jobs j WHERE j.upload_id = u.id AND j.state IN ('queued', 'running', 'scheduled', 'awaiting_approval'))
                    OR (u.status = 'validated' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.upload_id = u.id)))",
        )?;
        let pending: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        for path in pending {
            let path = PathBuf::from(path);
            if let Ok(rel) = path.strip_prefix(data.root())
                && path.is_file()
            {
                let name = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                files.push((path.clone(), name));
            }
        }
        let mut manifest = Manifest {
            format: 1,
            rollcall_version: env!("CARGO_PKG_VERSION").into(),
            schema_version: crate::db::schema_version(),
            created_at: crate::db::now(),
            source_root: data.root().to_string_lossy().into_owned(),
            entries: Default::default(),
        };
        let file = File::create(&partial).map_err(|e| io("writing", &partial, e))?;
        let mut z = zip::ZipWriter::new(file);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        let mut buf = vec![0u8; 1 << 16];
        for (path, name) in &files {
            z.start_file(name.as_str(), opts).map_err(zerr)?;
            let mut f = File::open(path).map_err(|e| io("reading", path, e))?;
            let mut h = Sha256::new();
            loop {
                let n = f.read(&mut buf).map_err(|e| io("reading", path, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                z.write_all(&buf[..n])
                    .map_err(|e| io("writing", &partial, e))?;
            }
            manifest
                .entries
                .insert(name.clone(), hex::encode(h.finalize()));
        }
        z.start_file("MANIFEST.json", opts).map_err(zerr)?;
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| AppError::internal("writing the manifest", e))?;
        z.write_all(&text).map_err(|e| io("writing", &partial, e))?;
        let file = z.finish().map_err(zerr)?;
        file.sync_all().map_err(|e| io("writing", &partial, e))?;
        fs::rename(&partial, out).map_err(|e| io("writing", out, e))?;
        let _ = fs::remove_dir_all(&audit_copy);
        Ok(files.len())
    })();
    let _ = fs::remove_file(&tmp_db);
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// Restores an archive into `data`, which must hold no database and no audit log yet.
/// The archive's entries are checked against its manifest and the audit chain against the
/// restored database before anything is kept.
pub fn restore(archive: &Path, data: &DataDir) -> AppResult<usize> {
    let refuse =
        |why: String| AppError::Refused(format!("{} cannot be restored: {why}", archive.display()));
    if data.database().exists() || !crate::audit::files(&data.audit_dir())?.is_empty() {
        return Err(AppError::Usage(format!(
            "the data directory {data} already holds a database or an audit log; restore into a new, empty directory (--data-dir)"
        )));
    }
    let f = File::open(archive)
        .map_err(|e| AppError::Usage(format!("cannot read {}: {e}", archive.display())))?;
    let mut z = zip::ZipArchive::new(f)
        .map_err(|e| refuse(format!("it is not a rollcall backup ({e})")))?;
    let manifest: Manifest = {
        let mut m = z
            .by_name("MANIFEST.json")
            .map_err(|_| refuse("it has no MANIFEST.json".into()))?;
        let mut text = String::new();
        m.read_to_string(&mut text)
            .map_err(|e| refuse(format!("its manifest cannot be read ({e})")))?;
        serde_json::from_str(&text).map_err(|e| refuse(format!("its manifest is damaged ({e})")))?
    };
    if manifest.schema_version > crate::db::schema_version() {
        return Err(refuse(format!(
            "it was made by a newer rollcall (schema {}, this binary knows up to {})",
            manifest.schema_version,
            crate::db::schema_version()
        )));
    }
    if !manifest.entries.contains_key("rollcall.db") {
        return Err(refuse("it holds no database".into()));
    }
    // Extract into a staging folder; only names the manifest lists, and only plain ones.
    let stage = data
        .tmp_dir()
        .join(format!("restore-{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    let result = (|| {
        for (name, sha) in &manifest.entries {
            let safe = !name.is_empty()
                && !name.starts_with('/')
                && name
                    .split('/')
                    .all(|part| !part.is_empty() && part != "." && part != "..")
                && (name == "rollcall.db"
                    || name == "rollcall.toml"
                    || name.starts_with("audit/")
                    || name.starts_with("uploads/")
                    || name.starts_with("rules/"));
            if !safe {
                return Err(refuse(format!(
                    "it holds an entry with an unsafe name ({name:?})"
                )));
            }
            let mut e = z
                .by_name(name)
                .map_err(|_| refuse(format!("the entry {name} is missing")))?;
            let dest = stage.join(name);
            if let Some(d) = dest.parent() {
                fs::create_dir_all(d).map_err(|e| io("creating", d, e))?;
            }
            let mut out = File::create(&dest).map_err(|e| io("writing", &dest, e))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = e
                    .read(&mut buf)
                    .map_err(|err| refuse(format!("the entry {name} is damaged ({err})")))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| io("writing", &dest, e))?;
            }
            if hex::encode(h.finalize()) != *sha {
                return Err(refuse(format!(
                    "the entry {name} does not match its checksum (the archive is damaged)"
                )));
            }
        }
        // The audit chain must be whole against the restored database.
        let conn = crate::db::open(
            &stage.join("rollcall.db"),
            &crate::config::DatabaseConfig::default(),
        )?;
        let v = crate::audit::verify(&conn, &stage.join("audit"))?;
        drop(conn);
        if let Some(p) = v.problem {
            return Err(refuse(format!("its audit log does not verify: {p}")));
        }
        // Stored upload paths point into the old data directory: point them here.
        if !manifest.source_root.is_empty() {
            let conn = crate::db::open(
                &stage.join("rollcall.db"),
                &crate::config::DatabaseConfig::default(),
            )?;
            let old = format!("{}/", manifest.source_root.trim_end_matches('/'));
            let new = format!("{}/", data.root().to_string_lossy().trim_end_matches('/'));
            conn.execute(
                "UPDATE uploads SET stored_path = ?2 || substr(stored_path, length(?1) + 1) WHERE substr(stored_path, 1, length(?1)) = ?1",
                rusqlite::params![old, new],
            )?;
        }
        // Keep it: move everything into place.
        let mut moved = 0;
        for name in manifest.entries.keys() {
            let from = stage.join(name);
            let to = data.root().join(name);
            if let Some(d) = to.parent() {
                fs::create_dir_all(d).map_err(|e| io("creating", d, e))?;
            }
            fs::rename(&from, &to).map_err(|e| io("restoring", &to, e))?;
            moved += 1;
        }
        Ok(moved)
    })();
    let _ = fs::remove_dir_all(&stage);
    result
}

/// Asks the server at `addr` for its health; Ok when it answers 200.
pub fn healthcheck(addr: &str) -> AppResult<()> {
    let down =
        |why: String| AppError::Refused(format!("the server at {addr} does not answer: {why}"));
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| AppError::Usage(format!("{addr:?} is not an address like 127.0.0.1:8080")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(3))
        .map_err(|e| down(e.to_string()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(
        format!("GET /api/v1/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .map_err(|e| down(e.to_string()))?;
    let mut resp = Vec::new();
    let _ = s.take(64 * 1024).read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(down(text.lines().next().unwrap_or("no answer").to_string()))
    }
}
