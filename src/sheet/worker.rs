//! The parsing worker: the same binary re-executed as `rollcall __read-worker`, run by
//! `sheet::reader` under memory, CPU and time limits. It detects the file's real format,
//! checks archives against the zip limits (an .xlsx through `unzip`, an .ods by inflating
//! it once with counters), opens the file with calamine (or the csv reader) and streams the
//! data sheet's rows to stdout (see `codec`). Anything hostile that makes a library abort
//! kills only this process; the parent turns that into one message.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;

use calamine::{Data, DataRef, Ods, Reader, Xls, Xlsx};
use serde::{Deserialize, Serialize};

use super::codec::{self, CellKind, RowWriter};
use super::unzip::Unzipped;
use super::xlsx;
use crate::config::Limits;
use crate::model::META_SHEET;

/// What the worker tells the parent about the workbook before the rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkbookInfo {
    /// xlsx, xls, ods or csv: the format found in the content, whatever the file's name.
    pub format: String,
    pub sheets: Vec<SheetInfo>,
    /// The sheet that will be streamed: the expected data sheet, matched without regard to
    /// case; `None` when the workbook has no such sheet (no rows follow).
    pub data_sheet: Option<String>,
    /// Key/value pairs of the hidden metadata sheet, if present.
    pub meta: Option<BTreeMap<String, String>>,
    /// Notes on how the file was read (e.g. the CSV delimiter found).
    pub notes: Vec<String>,
    /// About how many data rows follow (from the sheet's declared size, or the CSV's size),
    /// for progress and ETA; not trusted for anything else.
    #[serde(default)]
    pub estimated_rows: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SheetInfo {
    pub name: String,
    pub visible: bool,
}

/// A problem that makes the whole file unreadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fatal {
    pub code: String,
    pub message: String,
}

pub(super) fn fatal(code: &str, message: impl Into<String>) -> Fail {
    Fail::Fatal(Fatal {
        code: code.to_string(),
        message: message.into(),
    })
}

/// What a panic while reading becomes: in a library that parses the file, the file is
/// damaged; anywhere else it is our error.
fn panic_refusal(what: &str, at: Option<(String, u32)>) -> Fail {
    const PARSERS: [&str; 4] = ["/calamine-", "/quick-xml-", "/zip-", "/zlib-rs-"];
    match at {
        Some((file, line)) if !PARSERS.iter().any(|p| file.contains(p)) => fatal(
            "internal",
            format!(
                "The file reader stopped on an internal error ({what}, at {file}:{line}); nothing was changed. Please report it."
            ),
        ),
        _ => fatal(
            "file_damaged",
            format!(
                "The file could not be read: the spreadsheet reader stopped on content no spreadsheet holds ({what}), such as a cell reference beyond any sheet. Save it again from your spreadsheet program and upload the new copy."
            ),
        ),
    }
}

fn unreadable(e: io::Error) -> Fail {
    fatal("file_unreadable", format!("The file cannot be read: {e}."))
}

pub(super) fn too_many_parts(n: usize) -> Fail {
    fatal(
        "zip_too_many_entries",
        format!(
            "The file holds {n} parts; a spreadsheet has far fewer. It is damaged or not a real spreadsheet."
        ),
    )
}

#[derive(Debug)]
pub(super) enum Fail {
    Fatal(Fatal),
    /// Writing to the parent failed (it went away); nothing more to say.
    Pipe(io::Error),
}

/// Arguments of the worker, passed on its command line by the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerArgs {
    pub path: std::path::PathBuf,
    /// The file name the administrator gave (for its extension).
    pub declared_name: String,
    pub expected_sheet: String,
    pub limits: Limits,
    /// Paced by the parent: after each chunk of rows the worker waits for the parent to
    /// ask for the next (a byte on its standard input) before it reads on. A pass that
    /// writes sets it: its writing thread is the slowest part, and a worker reading ahead
    /// while the parent checks would be a third busy thread on two cores, taking turns
    /// with the writer. A dry run leaves it off: there reading and checking overlap.
    #[serde(default)]
    pub paced: bool,
}

/// Runs the worker; returns the process exit code.
pub fn run(args: &WorkerArgs) -> i32 {
    let stdout = io::stdout();
    // Rows come in 64 KiB chunks (`RowWriter`), which pass this small buffer by; it only
    // gathers the small frames.
    let mut out = BufWriter::with_capacity(1 << 13, stdout.lock());
    // A panic inside the spreadsheet library (a cell reference too large for any sheet
    // overflows its arithmetic: see the release profile's overflow checks) is one more way
    // a file cannot be read: it is told as such, not as a crash with a source path. A
    // panic in our own code is an internal error, told with where it happened.
    static PANIC_AT: std::sync::Mutex<Option<(String, u32)>> = std::sync::Mutex::new(None);
    std::panic::set_hook(Box::new(|info| {
        if let (Some(l), Ok(mut at)) = (info.location(), PANIC_AT.lock()) {
            *at = Some((l.file().to_string(), l.line()));
        }
    }));
    // The limits first, before the file is opened (see `crate::confine`).
    let confined = super::reader::confinement(&args.limits)
        .apply()
        .map_err(|e| {
            fatal(
                "internal",
                format!(
                    "The file reader could not limit its memory and time ({e}); nothing was read."
                ),
            )
        });
    let result = confined.and_then(|()| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_file(args, &mut out)))
            .unwrap_or_else(|payload| {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no reason given".into());
                let at = PANIC_AT.lock().ok().and_then(|mut a| a.take());
                Err(panic_refusal(&what, at))
            })
    });
    let written = match result {
        Ok(()) => codec::write_end(&mut out),
        Err(Fail::Fatal(f)) => {
            let json = serde_json::to_string(&f).unwrap_or_default();
            codec::write_json_frame(&mut out, codec::FRAME_FATAL, &json)
        }
        Err(Fail::Pipe(e)) => Err(e),
    };
    match written.and_then(|_| out.flush()) {
        Ok(()) => 0,
        Err(_) => 3,
    }
}

#[derive(Debug)]
enum Format {
    /// Checked from its directory; calamine reads it through `Unzipped`.
    Xlsx(Unzipped),
    /// `merged`: the content holds merged cells (seen while inflating it).
    Ods {
        merged: bool,
    },
    Xls,
    Csv,
}

fn extension(name: &str) -> String {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn detect(path: &Path, declared: &str, limits: &Limits) -> Result<Format, Fail> {
    let mut f = File::open(path).map_err(unreadable)?;
    let mut head = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < head.len() {
        let got = f.read(&mut head[n..]).map_err(unreadable)?;
        if got == 0 {
            break;
        }
        n += got;
    }
    head.truncate(n);
    let ext = extension(declared);
    if head.is_empty() {
        return Err(fatal("file_empty", "The file is empty (0 bytes)."));
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return detect_zip(path, limits);
    }
    if head.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
        // An OLE container: a legacy .xls, or an encrypted .xlsx (which Excel stores as OLE
        // streams named EncryptionInfo/EncryptedPackage).
        let mut all = Vec::new();
        f.rewind().map_err(unreadable)?;
        f.take(limits.max_file_bytes)
            .read_to_end(&mut all)
            .map_err(unreadable)?;
        let marker: Vec<u8> = "EncryptedPackage"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        if all.windows(marker.len()).any(|w| w == marker.as_slice()) {
            return Err(fatal(
                "file_encrypted",
                "The file is password-protected (encrypted). Open it, remove the password (File > Info > Protect Workbook), save and upload it again.",
            ));
        }
        return Ok(Format::Xls);
    }
    let named = |what: &str| {
        fatal(
            "file_wrong_type",
            format!(
                "The file is not a spreadsheet: it is {what}. Upload the .xlsx template you filled in (or an .xls, .ods or .csv file)."
            ),
        )
    };
    if head.starts_with(b"\x89PNG") {
        return Err(named("a PNG image"));
    }
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Err(named("a JPEG image"));
    }
    if head.starts_with(b"GIF8") {
        return Err(named("a GIF image"));
    }
    if head.starts_with(b"%PDF") {
        return Err(named("a PDF document"));
    }
    if head.starts_with(&[0x1F, 0x8B]) {
        return Err(named("a gzip archive"));
    }
    if head.starts_with(b"Rar!") || head.starts_with(b"7z\xBC\xAF") {
        return Err(named("a compressed archive"));
    }
    if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        return Err(fatal(
            "csv_encoding",
            "The file is text in UTF-16. Save it as \"CSV UTF-8\" (Excel) or with UTF-8 encoding and upload it again.",
        ));
    }
    let text = match std::str::from_utf8(&head) {
        Ok(_) => true,
        // A multi-byte character cut by the 64 KiB window is fine.
        Err(e) => e.error_len().is_none() && e.valid_up_to() + 4 > head.len(),
    };
    if !text || head.contains(&0) {
        return Err(named("binary data of an unknown kind"));
    }
    if matches!(ext.as_str(), "xlsx" | "xlsm" | "xls" | "ods") {
        return Err(fatal(
            "file_wrong_type",
            format!(
                "The file is named .{ext} but contains plain text (CSV?). If it is a CSV file, rename it to .csv; otherwise save it from your spreadsheet program as .xlsx."
            ),
        ));
    }
    Ok(Format::Csv)
}

fn detect_zip(path: &Path, limits: &Limits) -> Result<Format, Fail> {
    let mut zip = open_zip(path)?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    let xlsx = if has("xl/workbook.xml") {
        true
    } else if has("xl/workbook.bin") {
        return Err(fatal(
            "file_wrong_type",
            "The file is an Excel binary workbook (.xlsb), which rollcall does not read. Save it as .xlsx (Excel Workbook) and upload it again.",
        ));
    } else if has("mimetype") {
        let mut mt = String::new();
        if let Ok(e) = zip.by_name("mimetype") {
            let _ = e.take(200).read_to_string(&mut mt);
        }
        if mt.trim() == "application/vnd.oasis.opendocument.spreadsheet" {
            false
        } else {
            return Err(fatal(
                "file_wrong_type",
                format!(
                    "The file is an OpenDocument file of another kind ({}) , not a spreadsheet.",
                    mt.trim()
                ),
            ));
        }
    } else if has("word/document.xml") {
        return Err(fatal(
            "file_wrong_type",
            "The file is a Word document, not a spreadsheet.",
        ));
    } else if has("ppt/presentation.xml") {
        return Err(fatal(
            "file_wrong_type",
            "The file is a PowerPoint presentation, not a spreadsheet.",
        ));
    } else {
        return Err(fatal(
            "file_wrong_type",
            "The file is a zip archive, not a spreadsheet. Upload the .xlsx file itself.",
        ));
    };
    if zip.len() > 10_000 {
        return Err(too_many_parts(zip.len()));
    }
    if xlsx {
        // calamine reads an .xlsx through `Unzipped`, which checks every part's declared
        // sizes now and never inflates a part past them, each part once, as it is read.
        let file = File::open(path).map_err(unreadable)?;
        let unzipped = Unzipped::new(&mut zip, file, limits)?;
        // calamine reserves room for as many shared strings as the string table claims when
        // it opens the file. The table is whichever part the relationships name, so every
        // XML part's first KiB is looked at: a count its declared size cannot hold is
        // refused first.
        // Indices of the string tables, in order.
        let mut tables = Vec::new();
        for i in 0..zip.len() {
            let xml = matches!(zip.name_for_index(i), Some(Ok(n)) if n.to_ascii_lowercase().ends_with(".xml"));
            if xml && check_shared_strings_count(&mut zip, i)? {
                tables.push(i);
            }
        }
        // A merged cell is marked in its worksheet, whatever folder the relationships put it
        // in: every XML part but the string tables (large, and never marked) is scanned.
        unzipped.scan_for_merges(|i, name| {
            name.to_ascii_lowercase().ends_with(".xml") && tables.binary_search(&i).is_err()
        });
        return Ok(Format::Xlsx(unzipped));
    }
    // calamine reads an .ods whole: every part is inflated once with counters first.
    let all: Vec<usize> = (0..zip.len()).collect();
    let mut seen = Checked::default();
    check_zip_entries(&mut zip, &all, limits, &mut seen)?;
    Ok(Format::Ods {
        merged: seen.merged,
    })
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>, Fail> {
    let f = File::open(path).map_err(unreadable)?;
    zip::ZipArchive::new(BufReader::new(f)).map_err(|e| {
        fatal(
            "file_damaged",
            format!("The file is damaged or incomplete (its zip structure cannot be read: {e}). Save it again from your spreadsheet program and upload the new copy."),
        )
    })
}

/// What inflating the parts checked so far found.
#[derive(Debug, Default, Clone, Copy)]
struct Checked {
    /// Bytes inflated, against `[limits] max_zip_total_mib`.
    total: u64,
    /// A worksheet (or an .ods's content) holds merged cells.
    merged: bool,
}

const MIB: u64 = 1024 * 1024;

/// A refusal of part `name` as a zip bomb: `what` says what it does.
pub(super) fn bomb(name: &str, what: String) -> Fail {
    fatal(
        "zip_bomb",
        format!(
            "The file was refused: its part {name} {what}. This happens with damaged or deliberately malicious files; save the data again from your spreadsheet program."
        ),
    )
}

fn ratio_bomb(name: &str, n: u64, compressed: u64, limits: &Limits) -> Fail {
    bomb(
        name,
        format!(
            "is compressed {}:1, above the limit of {}:1",
            n / compressed.max(1),
            limits.max_zip_ratio
        ),
    )
}

/// The limits a part's declared sizes must keep: its inflated size, and its compression
/// ratio once it is over 1 MiB.
pub(super) fn check_declared_size(
    name: &str,
    declared: u64,
    compressed: u64,
    limits: &Limits,
) -> Result<(), Fail> {
    if declared > limits.max_zip_entry_mib.saturating_mul(MIB) {
        return Err(bomb(
            name,
            format!(
                "would inflate to {} MiB, above the limit of {} MiB",
                declared / MIB,
                limits.max_zip_entry_mib
            ),
        ));
    }
    if declared > MIB && declared / compressed.max(1) > limits.max_zip_ratio {
        return Err(ratio_bomb(name, declared, compressed, limits));
    }
    Ok(())
}

/// Inflates the parts `indices` of an .ods once with counters, so a bomb or a part that
/// lies about its size is refused before calamine reads it (calamine reads an .ods whole).
/// Sizes and compression ratio are checked as the bytes come, not only at the end.
fn check_zip_entries<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    indices: &[usize],
    limits: &Limits,
    seen: &mut Checked,
) -> Result<(), Fail> {
    let max_entry = limits.max_zip_entry_mib.saturating_mul(MIB);
    let max_total = limits.max_zip_total_mib.saturating_mul(MIB);
    for &i in indices {
        let mut entry = zip.by_index(i).map_err(|e| {
            fatal(
                "file_damaged",
                format!("The file is damaged: part {i} cannot be read ({e})."),
            )
        })?;
        let name = entry
            .name()
            .map(|n| n.into_owned())
            .unwrap_or_else(|_| format!("#{i}"));
        let declared = entry.size();
        let compressed = entry.compressed_size().max(1);
        check_declared_size(&name, declared, compressed, limits)?;
        let lower = name.to_ascii_lowercase();
        if !(lower.ends_with(".xml") || lower.ends_with(".rels") || lower == "mimetype") {
            continue;
        }
        let mut counter = Counter::new((lower == "content.xml").then_some(ODS_MERGE));
        // Stop as soon as the ratio is over the limit: a bomb is not inflated to the end.
        counter.stop_after = Some(MIB.max(compressed.saturating_mul(limits.max_zip_ratio)));
        let copied = io::copy(&mut (&mut entry).take(max_entry + 1), &mut counter);
        let n = counter.bytes;
        if counter.stopped {
            return Err(ratio_bomb(&name, n, compressed, limits));
        }
        copied.map_err(|e| {
            fatal(
                "file_damaged",
                format!("The file is damaged: part {name} cannot be inflated ({e})."),
            )
        })?;
        if n > max_entry {
            return Err(bomb(
                &name,
                format!(
                    "inflates to more than {} MiB although it claims {} bytes",
                    limits.max_zip_entry_mib, declared
                ),
            ));
        }
        seen.merged |= counter.saw_merge();
        seen.total += n;
        if seen.total > max_total {
            return Err(bomb(
                &name,
                format!(
                    "brings the inflated total above {} MiB",
                    limits.max_zip_total_mib
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a string table (a part whose root element is `sst`) whose `uniqueCount` is more
/// than its declared size could hold (`Unzipped` never presents more of it), from the
/// part's first KiB. Other parts pass. Says whether the part is a string table.
fn check_shared_strings_count<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    index: usize,
) -> Result<bool, Fail> {
    let entry = zip.by_index(index).map_err(|e| {
        fatal(
            "file_damaged",
            format!("The file is damaged: its shared strings cannot be read ({e})."),
        )
    })?;
    let declared = entry.size();
    let mut head = Vec::with_capacity(1024);
    // A part that cannot be inflated is reported when calamine reads it.
    let _ = entry.take(1024).read_to_end(&mut head);
    match string_table_head(&head) {
        Some(tag) => shared_strings_count_fits(unique_count(tag), declared).map(|()| true),
        None => Ok(false),
    }
}

/// The root element's start tag, when the root element is a string table (`sst`, with or
/// without a namespace prefix).
fn string_table_head(head: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    loop {
        at += memchr::memchr(b'<', head.get(at..)?)? + 1;
        let rest = head.get(at..)?;
        // The XML declaration, processing instructions, comments and a doctype.
        if rest.starts_with(b"?") || rest.starts_with(b"!") {
            continue;
        }
        let name_len = rest
            .iter()
            .position(|b| b.is_ascii_whitespace() || matches!(b, b'>' | b'/'))
            .unwrap_or(rest.len());
        let name = &rest[..name_len];
        let tag_len = memchr::memchr(b'>', rest).unwrap_or(rest.len());
        return (name == b"sst" || name.ends_with(b":sst")).then_some(&rest[..tag_len]);
    }
}

/// The `uniqueCount` of a shared strings part's start tag (`u64::MAX` when it is not a
/// number).
fn unique_count(head: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(head);
    let at = text.find("uniqueCount=\"")? + "uniqueCount=\"".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().or(Some(u64::MAX))
}

/// The count a shared strings part of at most `bytes` inflated bytes can hold: each string
/// takes at least `<si><t/></si>` (12 bytes).
fn shared_strings_count_fits(count: Option<u64>, bytes: u64) -> Result<(), Fail> {
    match count {
        Some(count) if count > bytes / 12 + 16 => Err(fatal(
            "file_damaged",
            format!(
                "The file is damaged or malicious: its shared strings claim {count} entries but hold at most {}.",
                bytes / 12 + 16
            ),
        )),
        _ => Ok(()),
    }
}

/// Looks for a mark in bytes that come in chunks of any size: a match may straddle two.
#[derive(Debug)]
pub(super) struct MarkScan {
    mark: &'static [u8],
    /// The last bytes of the previous chunk (fewer than the mark).
    tail: Vec<u8>,
    seen: bool,
}

impl MarkScan {
    pub(super) fn new(mark: &'static [u8]) -> Self {
        MarkScan {
            mark,
            tail: Vec::new(),
            seen: false,
        }
    }
    pub(super) fn seen(&self) -> bool {
        self.seen
    }
    /// The next chunk does not follow the last one (another part, or the same from its start).
    pub(super) fn restart(&mut self) {
        self.tail.clear();
    }
    pub(super) fn feed(&mut self, buf: &[u8]) {
        if self.seen {
            return;
        }
        let mark = self.mark;
        let head = &buf[..buf.len().min(mark.len())];
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(head);
        self.seen = memchr::memmem::find(&seam, mark).is_some()
            || memchr::memmem::find(buf, mark).is_some();
        if buf.len() >= mark.len() {
            seam.clear();
            seam.extend_from_slice(&buf[buf.len() - (mark.len() - 1)..]);
        } else {
            let from = seam.len().saturating_sub(mark.len() - 1);
            seam.drain(..from);
        }
        self.tail = seam;
    }
}

/// A sink that counts bytes, stops past a byte budget, and notices a merged cell's mark.
struct Counter {
    bytes: u64,
    /// Refuse more bytes than this (the entry's compressed size times the ratio limit).
    stop_after: Option<u64>,
    stopped: bool,
    mark: Option<MarkScan>,
}

/// An .xlsx merge, also found with a namespace prefix (`<x:mergeCell `); "mergeCells "
/// does not match.
pub(super) const XLSX_MERGE: &[u8] = b"mergeCell ";
/// The cells an .ods merge covers.
const ODS_MERGE: &[u8] = b"covered-table-cell";

impl Counter {
    fn new(mark: Option<&'static [u8]>) -> Self {
        Counter {
            bytes: 0,
            stop_after: None,
            stopped: false,
            mark: mark.map(MarkScan::new),
        }
    }
    fn saw_merge(&self) -> bool {
        self.mark.as_ref().is_some_and(MarkScan::seen)
    }
}

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes += buf.len() as u64;
        if let Some(limit) = self.stop_after
            && self.bytes > limit
        {
            self.stopped = true;
            return Err(io::Error::other("over the compression ratio limit"));
        }
        if let Some(m) = &mut self.mark {
            m.feed(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A cell value on its way out, borrowed from whichever reader produced it.
pub(super) enum Value<'a> {
    Skip,
    Text(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Date(f64),
    DateIso(&'a str),
    Error(String),
}

fn value_ref<'a>(d: &'a DataRef<'_>, date_offset: f64) -> Value<'a> {
    match d {
        DataRef::Empty => Value::Skip,
        DataRef::String(s) => Value::Text(s),
        DataRef::SharedString(s) => Value::Text(s),
        DataRef::Int(i) => Value::Int(*i),
        DataRef::Float(f) => Value::Float(*f),
        DataRef::Bool(b) => Value::Bool(*b),
        DataRef::DateTime(dt) => Value::Date(dt.as_f64() + date_offset),
        DataRef::DateTimeIso(s) => Value::DateIso(s),
        DataRef::DurationIso(s) => Value::Text(s),
        DataRef::Error(e) => Value::Error(e.to_string()),
    }
}

fn value_owned(d: &Data, date_offset: f64) -> Value<'_> {
    match d {
        Data::Empty => Value::Skip,
        Data::String(s) => Value::Text(s),
        Data::Int(i) => Value::Int(*i),
        Data::Float(f) => Value::Float(*f),
        Data::Bool(b) => Value::Bool(*b),
        Data::DateTime(dt) => Value::Date(dt.as_f64() + date_offset),
        Data::DateTimeIso(s) => Value::DateIso(s),
        Data::DurationIso(s) => Value::Text(s),
        Data::Error(e) => Value::Error(e.to_string()),
    }
}

/// Groups cells into rows, enforces the row/column/cell limits and encodes the rows.
struct RowSink<'w, W: Write> {
    out: &'w mut W,
    rows: RowWriter,
    /// The open row's index and its cells so far, once a cell of it was seen.
    open: Option<(u32, u32)>,
    limits: Limits,
    /// See `WorkerArgs::paced`.
    paced: bool,
}

impl<W: Write> Drop for RowSink<'_, W> {
    /// On a problem, the complete rows still buffered go out before it is reported (after
    /// `finish`, nothing is left).
    fn drop(&mut self) {
        let _ = self.rows.flush_complete(self.out);
    }
}

impl<'w, W: Write> RowSink<'w, W> {
    fn new(out: &'w mut W, args: &WorkerArgs) -> Self {
        RowSink {
            out,
            rows: RowWriter::new(),
            open: None,
            limits: args.limits.clone(),
            paced: args.paced,
        }
    }

    /// Paced (`WorkerArgs::paced`): the chunk just written reaches the parent, then the
    /// worker waits until the parent asks for more. Requests that came meanwhile count as
    /// one. When the parent has closed its end, the worker reads on unpaced (the parent
    /// is gone, or stops it).
    fn wait_for_parent(&mut self) -> Result<(), Fail> {
        self.out.flush().map_err(Fail::Pipe)?;
        let mut input = io::stdin().lock();
        match input.fill_buf() {
            Ok(asked) if !asked.is_empty() => {
                let n = asked.len();
                input.consume(n);
            }
            _ => self.paced = false,
        }
        Ok(())
    }

    fn cell(&mut self, r: u32, c: u32, v: Value<'_>) -> Result<(), Fail> {
        if matches!(v, Value::Skip) {
            return Ok(());
        }
        if r > self.limits.max_rows {
            return Err(fatal(
                "too_many_rows",
                format!(
                    "The sheet has data in row {}, beyond the limit of {} data rows below the header. Split the file into smaller files.",
                    u64::from(r) + 1,
                    self.limits.max_rows
                ),
            ));
        }
        if c >= self.limits.max_columns {
            return Err(fatal(
                "too_many_columns",
                format!(
                    "The sheet has data in column {} (row {}), beyond the limit of {} columns. Remove what is right of the template's columns.",
                    crate::model::column_letter(c as usize),
                    u64::from(r) + 1,
                    self.limits.max_columns
                ),
            ));
        }
        match self.open {
            Some((open, cells)) if open == r => {
                // A row holds no more cells than it has columns (a cell given twice is
                // reported on its row by the checks; a flood of them is refused here, and
                // the row's frame stays within the parent's bound).
                if cells >= self.limits.max_columns {
                    return Err(fatal(
                        "file_damaged",
                        format!(
                            "The file is damaged: row {} holds more than {} cells (the same cell given again and again). Save it again from your spreadsheet program and upload the new copy.",
                            u64::from(r) + 1,
                            self.limits.max_columns
                        ),
                    ));
                }
                self.open = Some((r, cells + 1));
            }
            Some((open, _)) if r < open => {
                return Err(fatal(
                    "file_damaged",
                    format!(
                        "The file is damaged: row {} appears after row {}.",
                        u64::from(r) + 1,
                        u64::from(open) + 1
                    ),
                ));
            }
            // A new row (the first, or one after the open row).
            _ => {
                if self.open.is_some() && self.rows.end(self.out).map_err(Fail::Pipe)? && self.paced
                {
                    self.wait_for_parent()?;
                }
                self.rows.begin(r);
                self.open = Some((r, 1));
            }
        }
        let max = self.limits.max_cell_chars as usize;
        let rows = &mut self.rows;
        match v {
            Value::Skip => {}
            Value::Text(s) | Value::DateIso(s) if s.len() > max && s.chars().count() > max => {
                rows.num(c, CellKind::TooLong, s.chars().count() as f64)
            }
            Value::Text(s) => rows.text(c, CellKind::Text, s),
            Value::DateIso(s) => rows.text(c, CellKind::DateIso, s),
            Value::Int(i) if i.unsigned_abs() < (1u64 << 53) => {
                rows.num(c, CellKind::Int, i as f64)
            }
            Value::Int(i) => rows.text(c, CellKind::Text, &i.to_string()),
            Value::Float(f) => rows.num(c, CellKind::Float, f),
            Value::Bool(b) => rows.num(c, CellKind::Bool, if b { 1.0 } else { 0.0 }),
            Value::Date(f) => rows.num(c, CellKind::Date, f),
            Value::Error(e) => rows.text(c, CellKind::Error, &e),
        }
        Ok(())
    }

    /// Ends the last row and writes out every row still buffered.
    fn finish(&mut self) -> Result<(), Fail> {
        self.open = None;
        self.rows.finish(self.out).map_err(Fail::Pipe)
    }
}

fn find_sheet(names: &[SheetInfo], expected: &str) -> Option<String> {
    let want = expected.trim().to_lowercase();
    names
        .iter()
        .find(|s| s.name.trim().to_lowercase() == want)
        .map(|s| s.name.clone())
}

fn meta_from_range(range: &calamine::Range<Data>) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    for row in range.rows().take(64) {
        if let (Some(k), Some(v)) = (row.first(), row.get(1)) {
            let k = k.to_string();
            if !k.is_empty() {
                meta.insert(k, v.to_string());
            }
        }
    }
    meta
}

fn send_info<W: Write>(out: &mut W, info: &WorkbookInfo) -> Result<(), Fail> {
    let json = serde_json::to_string(info).unwrap_or_default();
    // Sent at once: the parent checks the sheets while the rows are being read.
    codec::write_json_frame(out, codec::FRAME_INFO, &json)
        .and_then(|_| out.flush())
        .map_err(Fail::Pipe)
}

fn damaged(e: impl std::fmt::Display) -> Fail {
    let text = e.to_string();
    if text.to_lowercase().contains("password") {
        return fatal(
            "file_encrypted",
            "The file is password-protected. Remove the password, save and upload it again.",
        );
    }
    if text.contains("Invalid checksum") {
        // zip's check of a part's bytes: what a part that lies about its size, or was
        // changed after the file was saved, ends in.
        return fatal(
            "file_damaged",
            "The file is damaged: one of its parts does not match its checksum (it was cut short or changed after it was saved). Save it again from your spreadsheet program and upload the new copy.",
        );
    }
    let text = without_positions(&text);
    fatal(
        "file_damaged",
        format!(
            "The file cannot be read as a spreadsheet ({text}). Save it again from your spreadsheet program and upload the new copy."
        ),
    )
}

/// A parser's message without the byte offsets it gives (`at 0..0`, `at range 3..5`,
/// `position 2`, `at position 5`): they count within a buffer of the parser's own, so they
/// tell an administrator nothing and only look like a place in the file. A phrase is taken
/// out only where it starts a word and ends the message or comes before a colon.
fn without_positions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let word_start = out.is_empty() || out.ends_with(' ') || out.ends_with('(');
        let phrase = offset_phrase(rest)
            .filter(|_| word_start)
            .map(|len| &rest[len..])
            .filter(|tail| tail.is_empty() || tail.starts_with(": "));
        if let Some(tail) = phrase {
            if out.ends_with(' ') {
                out.pop();
            }
            // "error: at 0..0: text" keeps one colon; "character at range 3..5: text" its own.
            let opening = out.is_empty() || out.ends_with('(');
            rest = if opening || out.ends_with(':') {
                tail.strip_prefix(':').unwrap_or(tail)
            } else {
                tail
            };
            if opening {
                rest = rest.trim_start();
            }
            continue;
        }
        let Some(c) = rest.chars().next() else { break };
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.truncate(out.trim_end().len());
    out
}

/// The length of an offset phrase at the start of `s`, if one is there. A bare `at` needs a
/// range (`at 3..5`), so prose such as "look at 3: cells" is left alone.
fn offset_phrase(s: &str) -> Option<usize> {
    let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (after, needs_range) = if let Some(r) = s.strip_prefix("at range ") {
        (r, true)
    } else if let Some(r) = s.strip_prefix("at position ") {
        (r, false)
    } else if let Some(r) = s.strip_prefix("position ") {
        (r, false)
    } else if let Some(r) = s.strip_prefix("at ") {
        (r, true)
    } else {
        return None;
    };
    let n = digits(after);
    if n == 0 {
        return None;
    }
    let mut tail = &after[n..];
    if let Some(end) = tail.strip_prefix("..") {
        let m = digits(end);
        if m == 0 {
            return None;
        }
        tail = &end[m..];
    } else if needs_range {
        return None;
    }
    Some(s.len() - tail.len())
}

fn read_file<W: Write>(args: &WorkerArgs, out: &mut W) -> Result<(), Fail> {
    read_file_with(args, out, XlsxReader::Own)
}

fn read_file_with<W: Write>(
    args: &WorkerArgs,
    out: &mut W,
    reader: XlsxReader,
) -> Result<(), Fail> {
    let format = detect(&args.path, &args.declared_name, &args.limits)?;
    match format {
        Format::Csv => read_csv(args, out),
        Format::Xlsx(unzipped) => read_xlsx(args, out, unzipped, reader),
        Format::Xls => {
            let wb: Xls<_> = calamine::open_workbook(&args.path).map_err(damaged)?;
            let merges = |wb: &Xls<_>, name: &str| wb.merge_cells_by_sheet_name(name).ok();
            read_ranged(wb, "xls", args, out, merges)
        }
        Format::Ods { merged } => {
            let wb: Ods<_> = calamine::open_workbook(&args.path).map_err(damaged)?;
            let path = args.path.clone();
            let merges = move |_: &Ods<_>, name: &str| {
                if merged {
                    ods_merges(&path, name)
                } else {
                    None
                }
            };
            read_ranged(wb, "ods", args, out, merges)
        }
    }
}

fn sheet_list(meta: &[calamine::Sheet]) -> Vec<SheetInfo> {
    meta.iter()
        .map(|s| SheetInfo {
            name: s.name.clone(),
            visible: s.visible == calamine::SheetVisible::Visible,
        })
        .collect()
}

/// What the administrator is told about merged cells below the header row: only the first
/// cell of each holds the value; the others read as empty.
fn merged_note(ranges: &[calamine::Dimensions]) -> Option<String> {
    let cell = |(r, c): (u32, u32)| format!("{}{}", crate::model::column_letter(c as usize), r + 1);
    let data: Vec<String> = ranges
        .iter()
        .filter(|d| d.end.0 >= 1)
        .map(|d| format!("{}:{}", cell(d.start), cell(d.end)))
        .collect();
    if data.is_empty() {
        return None;
    }
    let shown = data[..data.len().min(5)].join(", ");
    let more = if data.len() > 5 {
        format!(" and {} more", data.len() - 5)
    } else {
        String::new()
    };
    let what = if data.len() == 1 {
        "1 merged cell range".to_string()
    } else {
        format!("{} merged cell ranges", data.len())
    };
    Some(format!(
        "{what} ({shown}{more}): only the first cell of each holds the value, the others are read as empty — unmerge them and fill every cell"
    ))
}

/// Which reader reads an .xlsx: ours, or calamine's (what ours falls back to; the tests
/// compare the two).
#[derive(Debug, Clone, Copy, PartialEq)]
enum XlsxReader {
    Own,
    #[cfg_attr(not(test), allow(dead_code))]
    Calamine,
}

fn read_xlsx<W: Write>(
    args: &WorkerArgs,
    out: &mut W,
    unzipped: Unzipped,
    reader: XlsxReader,
) -> Result<(), Fail> {
    // Our own reader first; a workbook it cannot follow up to its first row goes to
    // calamine (see `xlsx`).
    if reader == XlsxReader::Own
        && let Ok(mut book) = xlsx::Book::open(unzipped.clone())
        && let Ok(opened) = open_own(args, &mut book)
    {
        return read_xlsx_own(args, out, opened, unzipped);
    }
    let Some((mut wb, name, mut notes)) = stream_xlsx(args, out, unzipped.clone())? else {
        return Ok(());
    };
    if unzipped.saw_merge() {
        // Only files that have merged cells read the sheet's merge list (a second pass).
        // A merge list calamine cannot read only loses the note, never the file.
        if let Ok(ranges) = wb.merge_cells_by_sheet_name(&name)
            && let Some(note) = merged_note(&ranges)
        {
            notes.push(note);
        }
    }
    send_notes(out, &notes)
}

/// A workbook our reader opened, up to its data sheet's first cell.
struct OpenedOwn<'b> {
    info: WorkbookInfo,
    /// The data sheet's name and its cells (`None` when there is no data sheet).
    cells: Option<(String, xlsx::Cells<'b>)>,
    date_offset: f64,
}

fn open_own<'b>(args: &WorkerArgs, book: &'b mut xlsx::Book) -> Result<OpenedOwn<'b>, String> {
    let sheets = book.sheets.clone();
    let index_of = |name: &str| sheets.iter().position(|s| s.name == name);
    let meta = match find_sheet(&sheets, META_SHEET).and_then(|n| index_of(&n)) {
        Some(i) => Some(book.meta(i)?),
        None => None,
    };
    let data_sheet = find_sheet(&sheets, &args.expected_sheet);
    let date_offset = if book.is_1904 { 1462.0 } else { 0.0 };
    let mut info = WorkbookInfo {
        format: "xlsx".into(),
        sheets: sheets.clone(),
        data_sheet: data_sheet.clone(),
        meta,
        notes: vec![],
        estimated_rows: None,
    };
    let cells = match data_sheet.and_then(|n| index_of(&n).map(|i| (n, i))) {
        Some((name, i)) => {
            let cells = book.cells(i)?;
            let declared = u64::from(cells.last_row.unwrap_or(0));
            info.estimated_rows = Some(declared.min(u64::from(args.limits.max_rows)));
            Some((name, cells))
        }
        None => None,
    };
    Ok(OpenedOwn {
        info,
        cells,
        date_offset,
    })
}

fn read_xlsx_own<W: Write>(
    args: &WorkerArgs,
    out: &mut W,
    opened: OpenedOwn<'_>,
    unzipped: Unzipped,
) -> Result<(), Fail> {
    send_info(out, &opened.info)?;
    let Some((name, mut cells)) = opened.cells else {
        return Ok(());
    };
    let mut sink = RowSink::new(out, args);
    // Formulas are never run: the value the spreadsheet program saved is used, and the
    // administrator is told how many cells that concerns.
    let mut formulas = 0u64;
    let mut first_formula = None;
    while let Some((r, c, formula)) = cells.next().map_err(damaged)? {
        if formula && r > 0 {
            formulas += 1;
            first_formula.get_or_insert((r, c));
        }
        sink.cell(r, c, cells.value(opened.date_offset))?;
    }
    cells.finish().map_err(damaged)?;
    sink.finish()?;
    drop(sink);
    drop(cells);
    let mut notes = Vec::new();
    if let Some((r, c)) = first_formula {
        notes.push(formula_note(formulas, r, c));
    }
    if unzipped.saw_merge() {
        // Only files that have merged cells read the sheet's merge list (a second pass,
        // with calamine). A merge list that cannot be read only loses the note.
        if let Ok(mut wb) = Xlsx::<Unzipped>::new(unzipped)
            && let Ok(ranges) = wb.merge_cells_by_sheet_name(&name)
            && let Some(note) = merged_note(&ranges)
        {
            notes.push(note);
        }
    }
    send_notes(out, &notes)
}

fn formula_note(formulas: u64, r: u32, c: u32) -> String {
    format!(
        "{formulas} cells hold formulas (the first in row {}, column {}); the values your spreadsheet program last saved were used — formulas are never run",
        r + 1,
        crate::model::column_letter(c as usize)
    )
}

fn send_notes<W: Write>(out: &mut W, notes: &[String]) -> Result<(), Fail> {
    if notes.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(notes).unwrap_or_default();
    codec::write_json_frame(out, codec::FRAME_NOTES, &json).map_err(Fail::Pipe)
}

type OpenXlsx = Xlsx<Unzipped>;

/// Streams the data sheet of an .xlsx; returns the workbook, the sheet's name and the notes
/// on how it was read (`None` when there is no data sheet).
fn stream_xlsx<W: Write>(
    args: &WorkerArgs,
    out: &mut W,
    unzipped: Unzipped,
) -> Result<Option<(OpenXlsx, String, Vec<String>)>, Fail> {
    let mut wb: OpenXlsx = Xlsx::new(unzipped).map_err(damaged)?;
    let sheets = sheet_list(wb.sheets_metadata());
    let meta = match find_sheet(&sheets, META_SHEET) {
        Some(name) => Some(meta_from_range(
            &wb.worksheet_range(&name).map_err(damaged)?,
        )),
        None => None,
    };
    let data_sheet = find_sheet(&sheets, &args.expected_sheet);
    let offset = if wb.has_1904_epoch() { 1462.0 } else { 0.0 };
    let mut info = WorkbookInfo {
        format: "xlsx".into(),
        sheets,
        data_sheet: data_sheet.clone(),
        meta,
        notes: vec![],
        estimated_rows: None,
    };
    let Some(name) = data_sheet else {
        send_info(out, &info)?;
        return Ok(None);
    };
    let mut cells = wb.worksheet_cells_reader(&name).map_err(damaged)?;
    let declared = u64::from(cells.dimensions().end.0);
    info.estimated_rows = Some(declared.min(u64::from(args.limits.max_rows)));
    send_info(out, &info)?;
    let mut sink = RowSink::new(out, args);
    // Formulas are never run: the value the spreadsheet program saved is used, and the
    // administrator is told how many cells that concerns.
    let mut formulas = 0u64;
    let mut first_formula = None;
    while let Some(cell) = cells.next_cell_with_formula_metadata().map_err(damaged)? {
        let (r, c) = cell.pos;
        if cell.formula.is_some() && r > 0 {
            formulas += 1;
            first_formula.get_or_insert((r, c));
        }
        sink.cell(r, c, value_ref(&cell.value, offset))?;
    }
    sink.finish()?;
    drop(cells);
    let mut notes = Vec::new();
    if let Some((r, c)) = first_formula {
        notes.push(formula_note(formulas, r, c));
    }
    Ok(Some((wb, name, notes)))
}

fn read_ranged<W: Write, R: Reader<BufReader<File>>>(
    mut wb: R,
    format: &str,
    args: &WorkerArgs,
    out: &mut W,
    merges: impl FnOnce(&R, &str) -> Option<Vec<calamine::Dimensions>>,
) -> Result<(), Fail>
where
    R::Error: std::fmt::Display,
{
    let sheets = sheet_list(wb.sheets_metadata());
    let meta = match find_sheet(&sheets, META_SHEET) {
        Some(name) => Some(meta_from_range(
            &wb.worksheet_range(&name).map_err(damaged)?,
        )),
        None => None,
    };
    let data_sheet = find_sheet(&sheets, &args.expected_sheet);
    let mut info = WorkbookInfo {
        format: format.into(),
        sheets,
        data_sheet: data_sheet.clone(),
        meta,
        notes: vec![],
        estimated_rows: None,
    };
    let Some(name) = data_sheet else {
        return send_info(out, &info);
    };
    let range = wb.worksheet_range(&name).map_err(damaged)?;
    info.estimated_rows = Some((range.height() as u64).saturating_sub(1));
    send_info(out, &info)?;
    let Some((r0, c0)) = range.start() else {
        return Ok(());
    };
    let mut sink = RowSink::new(out, args);
    for (r, c, v) in range.used_cells() {
        sink.cell(r0 + r as u32, c0 + c as u32, value_owned(v, 0.0))?;
    }
    sink.finish()?;
    drop(sink);
    drop(range);
    let notes: Vec<String> = merges(&wb, &name)
        .and_then(|ranges| merged_note(&ranges))
        .into_iter()
        .collect();
    send_notes(out, &notes)
}

/// The merged cell ranges of an .ods sheet, which calamine does not report: read from
/// `content.xml` (cells with `number-columns-spanned` / `number-rows-spanned`), at most
/// 10,000 of them. `None` when the content cannot be read (the note is lost, not the file).
fn ods_merges(path: &Path, sheet: &str) -> Option<Vec<calamine::Dimensions>> {
    use quick_xml::events::{BytesStart, Event};
    let mut zip = open_zip(path).ok()?;
    let entry = zip.by_name("content.xml").ok()?;
    let mut xml = quick_xml::Reader::from_reader(BufReader::new(entry));
    let attr = |e: &BytesStart<'_>, key: &str| -> Option<u32> {
        e.try_get_attribute(key).ok()??.value.trim().parse().ok()
    };
    let mut buf = Vec::new();
    let mut found = Vec::new();
    let (mut inside, mut row, mut col) = (false, 0u32, 0u32);
    let mut row_repeat = 1u32;
    loop {
        let event = xml.read_event_into(&mut buf).ok()?;
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(e) | Event::Empty(e) => match e.local_name().as_ref() {
                "table" => {
                    let name = e.try_get_attribute("table:name").ok()??;
                    inside = name
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .ok()?
                        .as_ref()
                        == sheet;
                    row = 0;
                }
                "table-row" if inside => {
                    col = 0;
                    row_repeat = attr(&e, "table:number-rows-repeated").unwrap_or(1).max(1);
                    if empty {
                        row = row.saturating_add(row_repeat);
                    }
                }
                local @ ("table-cell" | "covered-table-cell") if inside => {
                    let repeat = attr(&e, "table:number-columns-repeated")
                        .unwrap_or(1)
                        .max(1);
                    if local == "table-cell" {
                        let across = attr(&e, "table:number-columns-spanned").unwrap_or(1);
                        let down = attr(&e, "table:number-rows-spanned").unwrap_or(1);
                        if (across > 1 || down > 1) && found.len() < 10_000 {
                            found.push(calamine::Dimensions {
                                start: (row, col),
                                end: (
                                    row.saturating_add(down.max(1) - 1),
                                    col.saturating_add(across.max(1) - 1),
                                ),
                            });
                        }
                    }
                    col = col.saturating_add(repeat);
                }
                _ => {}
            },
            Event::End(e) => match e.local_name().as_ref() {
                "table-row" if inside => row = row.saturating_add(row_repeat),
                "table" if inside => return Some(found),
                _ => {}
            },
            Event::Eof => return Some(found),
            _ => {}
        }
        buf.clear();
    }
}

/// The csv reader's own buffer (it reads ahead at most this much).
const CSV_BUFFER: usize = 8 << 10;

/// How many of the last bytes `Remembered` keeps: more than the csv reader buffers ahead.
const REMEMBERED: usize = 8 * CSV_BUFFER;

/// Whether byte `b`, after `prev`, ends a line as a spreadsheet program reads a CSV file: a
/// CR, or a line feed that does not complete a CRLF.
fn breaks_line(prev: Option<u8>, b: u8) -> bool {
    b == b'\r' || (b == b'\n' && prev != Some(b'\r'))
}

/// The line ends in `bytes` (`breaks_line`), the byte before them being `prev`.
fn line_breaks(mut prev: Option<u8>, bytes: &[u8]) -> u64 {
    let mut n = 0;
    let mut from = 0;
    for at in memchr::memchr2_iter(b'\r', b'\n', bytes) {
        if at > from {
            prev = Some(bytes[at - 1]);
        }
        n += u64::from(breaks_line(prev, bytes[at]));
        prev = Some(bytes[at]);
        from = at + 1;
    }
    n
}

/// A reader that counts the line ends (`breaks_line`) of what it hands on and remembers the
/// last bytes, so that the line ends before any offset the csv reader has reached, and the
/// byte that ended a record, can be told after the reader has read past them.
struct Remembered<R> {
    inner: R,
    ring: Box<[u8]>,
    /// Bytes handed on so far, their line ends, and the last of them.
    given: u64,
    given_breaks: u64,
    last: Option<u8>,
    /// An offset already asked for (`breaks_before`), and the line ends before it.
    counted: u64,
    counted_breaks: u64,
    /// The reader has asked past the end of the file.
    at_end: bool,
}

/// Where the bytes read so far leave a CSV cell, as the csv reader reads them (quotes are
/// doubled inside a quoted cell; a quote after a cell's first byte is text).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Quoting {
    /// At the start of a cell (or of a line).
    CellStart,
    /// In a cell that did not start with a quote, or after a quoted cell's closing quote.
    Unquoted,
    /// Inside a quoted cell.
    Quoted,
    /// Inside a quoted cell just after a quote: it closes the cell, unless another follows.
    QuoteInQuoted,
}

impl Quoting {
    /// The state after `bytes`, read with `delimiter`.
    fn after(mut self, bytes: &[u8], delimiter: u8) -> Quoting {
        let mut at = 0;
        while at < bytes.len() {
            match self {
                // At a cell's start a quote opens it; after a quote inside one, a second
                // quote is the first's double: either way it is (again) inside quotes.
                // Otherwise a delimiter or line end starts the next cell, and anything
                // else is text of a cell that is not (or no longer) quoted.
                Quoting::CellStart | Quoting::QuoteInQuoted => {
                    self = if bytes[at] == b'"' {
                        Quoting::Quoted
                    } else if bytes[at] == delimiter || bytes[at] == b'\r' || bytes[at] == b'\n' {
                        Quoting::CellStart
                    } else {
                        Quoting::Unquoted
                    };
                    at += 1;
                }
                Quoting::Unquoted => {
                    // To the cell's end: the next byte starts a cell.
                    match memchr::memchr3(delimiter, b'\r', b'\n', &bytes[at..]) {
                        Some(i) => {
                            at += i + 1;
                            self = Quoting::CellStart;
                        }
                        None => return self,
                    }
                }
                Quoting::Quoted => match memchr::memchr(b'"', &bytes[at..]) {
                    Some(i) => {
                        at += i + 1;
                        self = Quoting::QuoteInQuoted;
                    }
                    None => return self,
                },
            }
        }
        self
    }
}

impl<R> Remembered<R> {
    fn new(inner: R) -> Self {
        Remembered {
            inner,
            ring: vec![0; REMEMBERED].into_boxed_slice(),
            given: 0,
            given_breaks: 0,
            last: None,
            counted: 0,
            counted_breaks: 0,
            at_end: false,
        }
    }

    /// Whether the file ended inside a quoted cell, for a record read from offset `from` to
    /// `to`: only the record the reader took at the end of the file can (a record before it
    /// ended at its line end). The record's bytes, from the line start where the one before
    /// it left off, show whether a quote stayed open. `None` when they are no longer
    /// remembered (a record longer than the reader's memory).
    fn ended_in_quote(&self, from: u64, to: u64, delimiter: u8) -> Option<bool> {
        if !self.at_end || to != self.given {
            return Some(false);
        }
        let size = REMEMBERED as u64;
        if from > to || self.given - from > size {
            return None;
        }
        // The bytes lie in the ring in at most two pieces.
        let start = (from % size) as usize;
        let len = (to - from) as usize;
        let first = len.min(REMEMBERED - start);
        let state = Quoting::CellStart
            .after(&self.ring[start..start + first], delimiter)
            .after(&self.ring[..len - first], delimiter);
        Some(state == Quoting::Quoted)
    }

    /// The byte at offset `at` of what was handed on, if it is still remembered.
    fn byte_at(&self, at: u64) -> Option<u8> {
        let size = REMEMBERED as u64;
        (at < self.given && self.given - at <= size).then(|| self.ring[(at % size) as usize])
    }

    /// The line ends in the bytes from offset `from` to `to`, if they (and the one before
    /// them) are still remembered.
    fn breaks_between(&self, from: u64, to: u64) -> Option<u64> {
        let size = REMEMBERED as u64;
        if from > to || to > self.given || self.given - from > size {
            return None;
        }
        let prev = match from {
            0 => None,
            _ => Some(self.byte_at(from - 1)?),
        };
        // The bytes lie in the ring in at most two pieces.
        let start = (from % size) as usize;
        let len = (to - from) as usize;
        let first = len.min(REMEMBERED - start);
        let (a, b) = (&self.ring[start..start + first], &self.ring[..len - first]);
        Some(line_breaks(prev, a) + line_breaks(a.last().copied().or(prev), b))
    }

    /// The line ends before offset `at` (at most what was handed on): counted on from the
    /// last offset asked for while its bytes are remembered, else back from the end of what
    /// was handed on (the csv reader is never more than its buffer ahead). `None` when the
    /// bytes needed are no longer remembered.
    fn breaks_before(&mut self, at: u64) -> Option<u64> {
        let breaks = if at < self.counted || at > self.given {
            None
        } else if let Some(n) = self.breaks_between(self.counted, at) {
            Some(self.counted_breaks + n)
        } else {
            self.breaks_between(at, self.given)
                .map(|n| self.given_breaks - n)
        }?;
        self.counted = at;
        self.counted_breaks = breaks;
        Some(breaks)
    }
}

impl<R: Read> Read for Remembered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.at_end = true;
        }
        self.given_breaks += line_breaks(self.last, &buf[..n]);
        if n > 0 {
            self.last = Some(buf[n - 1]);
        }
        // Only the last REMEMBERED bytes matter.
        let keep = &buf[n.saturating_sub(REMEMBERED)..n];
        let skipped = (n - keep.len()) as u64;
        let start = ((self.given + skipped) % REMEMBERED as u64) as usize;
        let first = keep.len().min(REMEMBERED - start);
        self.ring[start..start + first].copy_from_slice(&keep[..first]);
        self.ring[..keep.len() - first].copy_from_slice(&keep[first..]);
        self.given += n as u64;
        Ok(n)
    }
}

fn read_csv<W: Write>(args: &WorkerArgs, out: &mut W) -> Result<(), Fail> {
    let mut file = BufReader::new(File::open(&args.path).map_err(unreadable)?);
    // Skip a UTF-8 byte-order mark, then find the delimiter from the first line.
    let mut bom = [0u8; 3];
    let n = file
        .read(&mut bom)
        .map_err(|e| fatal("file_unreadable", e.to_string()))?;
    if !(n == 3 && bom == [0xEF, 0xBB, 0xBF]) {
        file.seek(io::SeekFrom::Start(0))
            .map_err(|e| fatal("file_unreadable", e.to_string()))?;
    }
    // The first 64 KiB: the row estimate and the delimiter come from them.
    let mut sample = Vec::new();
    let pos = file
        .stream_position()
        .map_err(|e| fatal("file_unreadable", e.to_string()))?;
    let _ = (&mut file).take(64 * 1024).read_to_end(&mut sample);
    file.seek(io::SeekFrom::Start(pos))
        .map_err(|e| fatal("file_unreadable", e.to_string()))?;
    // About how many rows: the file's size over the mean length of the sample's lines.
    let estimated_rows = {
        let lines = line_breaks(None, &sample).max(1);
        let size = std::fs::metadata(&args.path).map(|m| m.len()).unwrap_or(0);
        let per_line = (sample.len() as u64 / lines).max(1);
        Some((size / per_line).saturating_sub(1))
    };
    // The delimiter is judged from the first line that is not blank (the column names),
    // whatever ends it: CRLF, LF or a lone CR.
    let first = sample
        .split(|&b| b == b'\r' || b == b'\n')
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    let count = |b: u8| first.iter().filter(|&&x| x == b).count();
    let (delim, dname) = [(b',', "comma"), (b';', "semicolon"), (b'\t', "tab")]
        .into_iter()
        .max_by_key(|(b, _)| count(*b))
        .unwrap_or((b',', "comma"));
    let stem = Path::new(&args.declared_name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("csv")
        .to_string();
    send_info(
        out,
        &WorkbookInfo {
            format: "csv".into(),
            sheets: vec![SheetInfo {
                name: stem,
                visible: true,
            }],
            data_sheet: Some(args.expected_sheet.clone()),
            meta: None,
            notes: vec![format!(
                "CSV file read as UTF-8 with {dname} as the delimiter"
            )],
            estimated_rows,
        },
    )?;
    // Rows are numbered as a spreadsheet program shows the file: a blank line is a row (the
    // reader skips it), a quoted cell over several lines is not. A record's row is the line
    // ends (CRLF, LF or a lone CR) before it, less those inside earlier cells: the line ends
    // before the offset the reader stopped at (`Remembered`), less the record's own inside
    // its cells and the one that ended it, when the reader took it. Line end by line end, so
    // mixed line ends are numbered right too.
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delim)
        .buffer_capacity(CSV_BUFFER)
        .from_reader(Remembered::new(file));
    let mut rec = csv::ByteRecord::new();
    let mut sink = RowSink::new(out, args);
    let mut index: u32 = 0;
    let mut inside_before = 0u64;
    loop {
        // Where the record starts, blank lines before it included.
        let start = rdr.position().byte();
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                return Err(fatal(
                    "file_damaged",
                    format!("The CSV file cannot be read after row {index}: {e}."),
                ));
            }
        }
        let end = rdr.position().byte();
        let inside: u64 = rec.iter().map(|cell| line_breaks(None, cell)).sum();
        let remembered = rdr.get_mut();
        let is_end = |b: u8| b == b'\r' || b == b'\n';
        let byte_before = |back: u64| end.checked_sub(back).and_then(|at| remembered.byte_at(at));
        // The record's own line end was taken when the last byte read is one, unless that
        // byte is the end of its last cell: a quote left open up to the end of the file.
        let open = remembered
            .ended_in_quote(start, end, delim)
            // Not remembered: a closed quoted cell that ends in a line break has its
            // closing quote after it (a guess only a quote doubled just before the file's
            // end can mislead).
            .unwrap_or_else(|| {
                rec.iter()
                    .next_back()
                    .and_then(|c| c.last())
                    .is_some_and(|&b| is_end(b))
                    && byte_before(2) != Some(b'"')
            });
        let own = byte_before(1).is_some_and(is_end) && !open;
        // (The bytes are always remembered: the csv reader is never more than its buffer
        // ahead. Were they not, the record would take the next row.)
        if let Some(before_end) = remembered.breaks_before(end) {
            let before = before_end
                .saturating_sub(inside_before + inside)
                .saturating_sub(u64::from(own));
            index = index.max(u32::try_from(before).unwrap_or(u32::MAX));
        }
        inside_before += inside;
        for (c, field) in rec.iter().enumerate() {
            if field.is_empty() {
                continue;
            }
            let text = std::str::from_utf8(field).map_err(|_| {
                fatal(
                    "csv_encoding",
                    format!("Row {}, column {} of the CSV file is not UTF-8 text. Save the file as \"CSV UTF-8\" and upload it again.", index + 1, crate::model::column_letter(c)),
                )
            })?;
            let col = u32::try_from(c).unwrap_or(u32::MAX);
            sink.cell(index, col, Value::Text(text))?;
        }
        index = index.saturating_add(1);
    }
    sink.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames a read wrote, up to the end frame (which carries the process's peak
    /// memory), and how the read ended.
    fn upload(path: &Path, sheet: &str) -> WorkerArgs {
        WorkerArgs {
            path: path.to_path_buf(),
            declared_name: "upload.xlsx".into(),
            expected_sheet: sheet.into(),
            limits: Limits::default(),
            paced: false,
        }
    }

    fn read_with(path: &Path, sheet: &str, reader: XlsxReader) -> (Result<(), String>, Vec<u8>) {
        let mut out = Vec::new();
        let ended = read_file_with(&upload(path, sheet), &mut out, reader).map_err(|f| match f {
            Fail::Fatal(f) => f.code,
            Fail::Pipe(e) => e.to_string(),
        });
        (ended, out)
    }

    /// The rows of a CSV file as (Excel row number, first cell's text).
    fn csv_rows(text: &str) -> Vec<(u32, String)> {
        csv_records(text)
            .into_iter()
            .map(|(n, cells)| (n, cells.into_iter().next().unwrap_or_default()))
            .collect()
    }

    /// The rows of a CSV file as (Excel row number, every cell's text).
    fn csv_records(text: &str) -> Vec<(u32, Vec<String>)> {
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let mut args = upload(f.path(), "Add Users");
        args.declared_name = "upload.csv".into();
        let mut out = Vec::new();
        assert!(read_file(&args, &mut out).is_ok());
        let mut r = &out[..];
        let mut row = codec::RawRow::default();
        let mut rows = Vec::new();
        loop {
            // The end frame is the process's to write: the rows end where the bytes do.
            if r.is_empty() {
                return rows;
            }
            match codec::read_frame(&mut r, &mut row, 1 << 20, 1 << 24).unwrap() {
                codec::Frame::Row => {
                    let cells = row.cells().iter().map(|c| c.text.clone()).collect();
                    rows.push((row.index + 1, cells));
                }
                codec::Frame::End(_) => return rows,
                codec::Frame::Json(..) => {}
            }
        }
    }

    #[test]
    fn generated_csv_files_are_numbered_as_they_were_made() {
        // Files made record by record, so each record's row is known: one kind of line end
        // per file, blank lines between records, quoted cells holding quotes, delimiters and
        // line ends of every kind, a last line with or without its end, and sometimes a
        // last cell whose quote is never closed.
        let mut next = crate::test_random(0x9e37_79b9_7f4a_7c15);
        let bits = ["x", "\"", "\n", "\r", "\r\n", ",", " ", "é", "y"];
        for file in 0..400 {
            let end = ["\n", "\r\n", "\r"][file % 3];
            let mut text = String::from("Email,Note");
            let mut want = vec![(1u32, vec!["Email".to_string(), "Note".to_string()])];
            let mut row = 1u32;
            let records = 1 + next(6);
            for r in 0..records {
                text.push_str(end);
                row += 1;
                for _ in 0..next(3) {
                    text.push_str(end);
                    row += 1;
                }
                let mut cells = vec![format!("id{r}")];
                text.push_str(&cells[0]);
                let last = r + 1 == records;
                let open = last && next(3) == 0;
                let count = next(3) + usize::from(open);
                for c in 0..count {
                    let cell: String = (0..next(5)).map(|_| bits[next(bits.len())]).collect();
                    text.push(',');
                    text.push('"');
                    text.push_str(&cell.replace('"', "\"\""));
                    if !(open && c + 1 == count) {
                        text.push('"');
                    }
                    cells.push(cell);
                }
                want.push((row, cells));
                // A closed last record may end with a line end and blank lines after it.
                if last && !open && next(2) == 0 {
                    for _ in 0..1 + next(2) {
                        text.push_str(end);
                    }
                }
            }
            let got: Vec<(u32, Vec<String>)> = csv_records(&text)
                .into_iter()
                .map(|(n, cells)| (n, cells.into_iter().filter(|c| !c.is_empty()).collect()))
                .collect();
            let want: Vec<(u32, Vec<String>)> = want
                .into_iter()
                .map(|(n, cells)| (n, cells.into_iter().filter(|c| !c.is_empty()).collect()))
                .collect();
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn csv_rows_are_numbered_as_a_spreadsheet_shows_them() {
        let want = |v: &[(u32, &str)]| -> Vec<(u32, String)> {
            v.iter().map(|(n, s)| (*n, s.to_string())).collect()
        };
        // Blank lines are rows; a quoted cell over two lines is one.
        assert_eq!(
            csv_rows("Email,Name\na@x.com,A\n\n\nbad,B\n\"c@x.com\",\"two\nlines\"\nd@x.com,D\n"),
            want(&[
                (1, "Email"),
                (2, "a@x.com"),
                (5, "bad"),
                (6, "c@x.com"),
                (7, "d@x.com")
            ])
        );
        // CRLF, a blank line before a last line without a break, and a BOM.
        assert_eq!(
            csv_rows("\u{feff}Email\r\na@x.com\r\n\r\nb@x.com"),
            want(&[(1, "Email"), (2, "a@x.com"), (4, "b@x.com")])
        );
        // CRLF with a cell over two lines and a blank line.
        assert_eq!(
            csv_rows("Email,Note\r\n\"a@x.com\",\"x\r\ny\"\r\n\r\nbad,z\r\n"),
            want(&[(1, "Email"), (2, "a@x.com"), (4, "bad")])
        );
        // Trailing blank lines add no row; a last line without a break is its own row.
        assert_eq!(
            csv_rows("Email\na@x.com\n\n\n"),
            want(&[(1, "Email"), (2, "a@x.com")])
        );
        assert_eq!(
            csv_rows("Email\na@x.com"),
            want(&[(1, "Email"), (2, "a@x.com")])
        );
        // LF ends, a blank line, a last line without a break.
        assert_eq!(
            csv_rows("Email\na@x.com\n\nb@x.com"),
            want(&[(1, "Email"), (2, "a@x.com"), (4, "b@x.com")])
        );
        // Mixed line ends, both ways round.
        assert_eq!(
            csv_rows("Email\r\na@x.com\nb@x.com\n"),
            want(&[(1, "Email"), (2, "a@x.com"), (3, "b@x.com")])
        );
        assert_eq!(
            csv_rows("Email\n\na@x.com\r\nb@x.com"),
            want(&[(1, "Email"), (3, "a@x.com"), (4, "b@x.com")])
        );
        // Far beyond what the reader remembers: a blank line after every 100th row.
        let mut big = String::from("Email,Padding\n");
        let pad = "p".repeat(40);
        let mut expect = vec![(1u32, "Email".to_string())];
        let mut row = 1;
        for i in 0..5000 {
            row += 1;
            big.push_str(&format!("u{i}@x.com,{pad}\n"));
            expect.push((row, format!("u{i}@x.com")));
            if i % 100 == 99 {
                big.push('\n');
                row += 1;
            }
        }
        assert_eq!(csv_rows(&big), expect);
        // A blank first line: the header is in row 2, as a spreadsheet shows it.
        assert_eq!(csv_rows("\nEmail\n"), want(&[(2, "Email")]));
        // The delimiter comes from the column names' line, whatever ends it, even after a
        // blank line: semicolons here, though the cells hold commas.
        for text in [
            "Email;Note\ra@x.com;one, two, three\rb@x.com;four, five\r",
            "\r\nEmail;Note\r\na@x.com;one, two, three\r\n",
        ] {
            let cells: Vec<Vec<String>> = csv_records(text).into_iter().map(|r| r.1).collect();
            assert_eq!(cells[0], ["Email", "Note"], "{text:?}");
            assert_eq!(cells[1], ["a@x.com", "one, two, three"], "{text:?}");
        }
        // Lone CR line ends (as older Mac programs save CSV): blank lines count as rows, a
        // cell over two lines does not.
        assert_eq!(
            csv_rows("Email\ra@x.com\r\rb@x.com\r"),
            want(&[(1, "Email"), (2, "a@x.com"), (4, "b@x.com")])
        );
        assert_eq!(
            csv_rows("Email,Note\r\"a@x.com\",\"x\ry\"\r\rbad,z"),
            want(&[(1, "Email"), (2, "a@x.com"), (4, "bad")])
        );
        // A quote left open to the end of the file, after a blank line: the line ends after
        // it are inside its cell, not rows.
        assert_eq!(csv_rows("a\n\n\"b\n"), want(&[(1, "a"), (3, "b\n")]));
        assert_eq!(
            csv_rows("a\r\n\r\n\"b\r\nc\r\n"),
            want(&[(1, "a"), (3, "b\r\nc\r\n")])
        );
        assert_eq!(csv_rows("a\r\r\"b\r"), want(&[(1, "a"), (3, "b\r")]));
        // ... also when the open cell's text ends in a quote (doubled in the file) and a
        // line end.
        assert_eq!(csv_rows("a\n\n\"b\"\"\n"), want(&[(1, "a"), (3, "b\"\n")]));
        assert_eq!(
            csv_rows("a\r\n\r\n\"b\"\"\r\n"),
            want(&[(1, "a"), (3, "b\"\r\n")])
        );
        assert_eq!(csv_rows("a\r\r\"\"\"\r"), want(&[(1, "a"), (3, "\"\r")]));
        // A closed quoted cell that ends in a line break is a row as usual.
        assert_eq!(
            csv_rows("a\n\n\"b\n\"\nc\n"),
            want(&[(1, "a"), (3, "b\n"), (4, "c")])
        );
        // ... with each line end, with a quote in its text, and as the last line.
        for end in ["\n", "\r\n", "\r"] {
            let text = format!("a{end}{end}\"b\"\"{end}\"{end}c{end}");
            let cell = format!("b\"{end}");
            assert_eq!(
                csv_rows(&text),
                want(&[(1, "a"), (3, &cell), (4, "c")]),
                "{text:?}"
            );
            let text = format!("a{end}{end}\"b{end}\"{end}");
            let cell = format!("b{end}");
            assert_eq!(csv_rows(&text), want(&[(1, "a"), (3, &cell)]), "{text:?}");
        }
        // A record longer than what the reader remembers, with a cell over two lines,
        // then a blank line.
        let long = "n".repeat(30_000);
        assert_eq!(
            csv_rows(&format!(
                "Email,A,B,C,Note\na@x.com,{long},{long},{long},\"two\nlines\"\n\nb@x.com\n"
            )),
            want(&[(1, "Email"), (2, "a@x.com"), (4, "b@x.com")])
        );
    }

    /// Reads `path` with our reader and with calamine's, checks that ours did read it (no
    /// fallback), and that both gave the same frames.
    fn same_both_ways(path: &Path, sheet: &str) -> Vec<u8> {
        let Format::Xlsx(unzipped) = detect(path, "upload.xlsx", &Limits::default()).unwrap()
        else {
            panic!("not an xlsx");
        };
        let mut book = xlsx::Book::open(unzipped).unwrap();
        assert!(
            open_own(&upload(path, sheet), &mut book).is_ok(),
            "our reader fell back"
        );
        let own = read_with(path, sheet, XlsxReader::Own);
        let cal = read_with(path, sheet, XlsxReader::Calamine);
        assert_eq!(own.0, cal.0);
        if own.1 != cal.1 {
            let at = own
                .1
                .iter()
                .zip(&cal.1)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let from = at.saturating_sub(60);
            panic!(
                "the readers differ at byte {at}:\nown: {:?}\ncalamine: {:?}",
                String::from_utf8_lossy(&own.1[from..(at + 400).min(own.1.len())]),
                String::from_utf8_lossy(&cal.1[from..(at + 400).min(cal.1.len())])
            );
        }
        own.1
    }

    /// A workbook written part by part, as other programs than ours write them: `sheet`
    /// is the data sheet's XML, `strings` the shared strings', `styles` the styles'.
    fn handmade(sheet: &str, strings: &str, styles: &str, wb_pr: &str) -> tempfile::NamedTempFile {
        let rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships";
        let pkg = "http://schemas.openxmlformats.org/package/2006/relationships";
        let parts: Vec<(&str, String)> = vec![
            ("[Content_Types].xml", "<?xml version=\"1.0\"?><Types xmlns=\"http://schemas.openxmlformats.org/package/2006/content-types\"/>".into()),
            ("_rels/.rels", format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<Relationships xmlns=\"{pkg}\"><Relationship Id=\"rId1\" Type=\"{rel}/officeDocument\" Target=\"xl/workbook.xml\"/></Relationships>")),
            ("xl/workbook.xml", format!("<?xml version=\"1.0\"?><workbook xmlns=\"http://schemas.openxmlformats.org/spreadsheetml/2006/main\" xmlns:r=\"{rel}\">{wb_pr}<sheets><sheet name=\"Add Users\" sheetId=\"1\" r:id=\"rId1\"/><sheet name='{META_SHEET}' sheetId=\"2\" state=\"veryHidden\" r:id=\"rId2\"/><sheet name=\"R&amp;D &#233;quipe\" sheetId=\"3\" state=\"hidden\" r:id=\"rId5\"/></sheets></workbook>")),
            ("xl/_rels/workbook.xml.rels", format!("<Relationships xmlns=\"{pkg}\"><Relationship Id=\"rId1\" Type=\"{rel}/worksheet\" Target=\"worksheets/sheet1.xml\"/><Relationship Id=\"rId2\" Type=\"{rel}/worksheet\" Target=\"/xl/worksheets/sheet2.xml\"/><Relationship Id=\"rId5\" Type=\"{rel}/worksheet\" Target=\"worksheets/sheet3.xml\"/><Relationship Id=\"rId3\" Type=\"{rel}/styles\" Target=\"styles.xml\"/><Relationship Id=\"rId4\" Type=\"{rel}/sharedStrings\" Target=\"sharedStrings.xml\"/></Relationships>")),
            ("xl/styles.xml", styles.into()),
            ("xl/sharedStrings.xml", strings.into()),
            ("xl/worksheets/sheet1.xml", sheet.into()),
            ("xl/worksheets/sheet2.xml", "<worksheet><sheetData><row r=\"1\"><c r=\"A1\" t=\"inlineStr\"><is><t>operation</t></is></c><c r=\"B1\" t=\"s\"><v>0</v></c></row><row r=\"2\"><c r=\"A2\" t=\"str\"><v>template_version</v></c><c r=\"B2\"><v>3</v></c></row><row r=\"3\"><c r=\"A3\" t=\"str\"><v>column_hash</v></c></row></sheetData></worksheet>".into()),
            ("xl/worksheets/sheet3.xml", "<worksheet><sheetData/></worksheet>".into()),
        ];
        let mut f = tempfile::Builder::new().suffix(".xlsx").tempfile().unwrap();
        {
            let mut w = zip::ZipWriter::new(f.as_file_mut());
            for (name, data) in parts {
                let o = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated);
                w.start_file(name, o).unwrap();
                w.write_all(data.as_bytes()).unwrap();
            }
            w.finish().unwrap();
        }
        f
    }

    const STYLES: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<styleSheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><numFmts count="5"><numFmt numFmtId="164" formatCode="yyyy\-mm\-dd"/><numFmt numFmtId="165" formatCode="[h]:mm:ss"/><numFmt numFmtId="166" formatCode="&quot;Day &quot;0"/><numFmt numFmtId="167" formatCode="0.00;[Red]dd"/><numFmt numFmtId="168" formatCode="[$-409]h:mm AM/PM"/></numFmts><fonts count="1"><font><sz val="11"/></font></fonts><cellXfs count="8"><xf numFmtId="0" fontId="0"/><xf numFmtId="14"/><xf numFmtId="164"><alignment wrapText="1"/></xf><xf numFmtId="165"/><xf numFmtId="2"/><xf numFmtId="166"/><xf numFmtId="167"/><xf numFmtId="168"/></cellXfs></styleSheet>"#;

    const STRINGS: &str = "<?xml version=\"1.0\"?>\n<sst xmlns=\"http://schemas.openxmlformats.org/spreadsheetml/2006/main\" count=\"10\" uniqueCount=\"10\">\
<si><t>add</t></si>\
<si><t xml:space=\"preserve\">  padded &amp; &lt;kept&gt;  </t></si>\
<si><t>  trimmed\r\n</t></si>\
<si><r><rPr><b/></rPr><t>Rich</t></r><r><t xml:space=\"preserve\"> text</t></r><rPh sb=\"0\" eb=\"1\"><t>ルビ</t></rPh></si>\
<si><t>line_x000D_break _x005F_x000D_ literal &#x1F600; &#233;</t></si>\
<si><t><![CDATA[<not a tag> & raw]]></t></si>\
<si/>\
<si><t/></si>\
<si><!-- a comment --><t>=1+2</t><?pi inside?></si>\
<si><t>snake_case_x0041_ _</t></si>\
</sst>";

    fn sheet_xml(body: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\r\n<worksheet xmlns=\"http://schemas.openxmlformats.org/spreadsheetml/2006/main\"><dimension ref=\"A1:L40\"/><sheetViews><sheetView workbookViewId=\"0\"/></sheetViews><sheetData>{body}</sheetData><mergeCells count=\"1\"><mergeCell ref=\"B5:C5\"/></mergeCells></worksheet>"
        )
    }

    #[test]
    fn our_xlsx_reader_gives_what_calamine_gives() {
        let body = concat!(
            r#"<row r="1" spans="1:12"><c r="A1" t="s"><v>0</v></c><c r="B1" t="s"><v>1</v></c><c r="C1" t="s"><v>2</v></c><c r="D1" t="s"><v>3</v></c><c r="E1" t="s"><v>4</v></c><c r="F1" t="s"><v>5</v></c><c r="G1" t="s"><v>6</v></c><c r="H1" t="s"><v>7</v></c><c r="I1" t="s"><v>8</v></c></row>"#,
            r#"<row r="2"><c r="A2"><v>42</v></c><c r="B2" s="1"><v>45000</v></c><c r="C2" s="2"><v>45000.5</v></c><c r="D2" s="3"><v>1.25</v></c><c r="E2" s="4"><v>3.14159</v></c><c r="F2" s="5"><v>7</v></c><c r="G2" s="6"><v>8</v></c><c r="H2" s="7"><v>0.75</v></c><c r="I2" s="99"><v>9</v></c><c r="J2" s="x"><v>10</v></c></row>"#,
            r#"<row r="3"><c r="A3" t="b"><v>1</v></c><c r="B3" t="b"><v>false</v></c><c r="C3" t="e"><v>#DIV/0!</v></c><c r="D3" t="e"><v>#N/A</v></c><c r="E3" t="str"><v>a &amp; b_x000A_c</v></c><c r="F3" t="d"><v>2024-02-29T00:00:00</v></c><c r="G3" t="inlineStr"><is><t> inline </t></is></c><c r="H3" t="inlineStr"><is><r><t>in</t></r><r><t>line</t></r></is><v>ignored</v></c><c r="I3" t="n"><v>-0</v></c></row>"#,
            r#"<row r="4"><c r="A4"><f>SUM(1,2)</f><v>3</v></c><c r="B4" t="str"><f>"x"&amp;"y"</f><v>xy</v></c><c r="C4" s="1"><f t="shared" ref="C4:C5" si="0">TODAY()</f><v>45001</v></c><c r="D4"/><c r="E4" s="1"/><c r="F4"><v/></c><c r="G4" t="s"><v></v></c><c r="H4"><v>1e3</v></c><c r="I4"><v>.5</v></c><c r="J4"><v>1.</v></c><c r="K4"><v>+7</v></c></row>"#,
            r#"<row r="5" hidden="1"><c r="A5"><v> 8</v></c><c r="B5"><v>0x10</v></c><c r="C5" s="1"><f t="shared" si="0"/><v>45002</v></c><c r="D5"><v>12345678901234567890</v></c><c r="E5"><v>1E-7</v></c></row>"#,
            "<row r=\"6\"><c r=\"A6\" t=\"str\"><v>crlf\r\nline\rend</v></c><c r=\"C6\" t='s' ><v>3</v></c><c\n r = \"D6\"\tt=\"inlineStr\"><is><t xml:space=\"preserve\"> keep </t></is></c></row>",
            r#"<row><c t="s"><v>0</v></c><c><v>2</v></c><c r="E7"><v>5</v></c><c><v>6</v></c></row>"#,
            r#"<row r="9"/><row><c><v>10</v></c></row>"#,
            r#"<row r="12"><c r="b12"><v>1</v></c><c r="AA12"><v>2</v></c></row>"#,
            r#"<row r="30"><c r="L30" t="s"><v>4</v></c></row>"#,
            r#"<row r="31"><c r="A31" t="s"><v>9</v></c></row>"#,
        );
        let f = handmade(&sheet_xml(body), STRINGS, STYLES, "");
        let out = same_both_ways(f.path(), "add users");
        // The reads did carry the values (not two empty reads).
        let text = String::from_utf8_lossy(&out);
        for want in [
            "padded & <kept>",
            "Rich text",
            "line\rbreak _x000D_ literal 😀 é",
            "<not a tag> & raw",
            "a & b\nc",
            "crlf\nline\nend",
            "rollcall_meta",
            "R&D équipe",
            "\"operation\":\"add\"",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        // With 1904 dates, and as a namespaced document (`x:` on every element).
        let f = handmade(
            &sheet_xml(body),
            STRINGS,
            STYLES,
            "<workbookPr date1904=\"1\"/>",
        );
        same_both_ways(f.path(), "Add Users");
        let prefixed = |xml: &str| {
            xml.replace("<worksheet xmlns=", "<x:worksheet xmlns:x=")
                .replace("</worksheet>", "</x:worksheet>")
                .replace("<sst xmlns=", "<x:sst xmlns:x=")
                .replace("</sst>", "</x:sst>")
                .replace("<styleSheet xmlns=", "<x:styleSheet xmlns:x=")
                .replace("</styleSheet>", "</x:styleSheet>")
                .replace("<sheetData>", "<x:sheetData>")
                .replace("</sheetData>", "</x:sheetData>")
                .replace("<row", "<x:row")
                .replace("</row>", "</x:row>")
                .replace("<c ", "<x:c ")
                .replace("<c>", "<x:c>")
                .replace("<c\n", "<x:c\n")
                .replace("</c>", "</x:c>")
                .replace("<v>", "<x:v>")
                .replace("<v/>", "<x:v/>")
                .replace("</v>", "</x:v>")
                .replace("<si>", "<x:si>")
                .replace("</si>", "</x:si>")
                .replace("<si/>", "<x:si/>")
                .replace("<t>", "<x:t>")
                .replace("<t ", "<x:t ")
                .replace("<t/>", "<x:t/>")
                .replace("</t>", "</x:t>")
                .replace("<xf ", "<x:xf ")
                .replace("<cellXfs", "<x:cellXfs")
                .replace("</cellXfs>", "</x:cellXfs>")
        };
        let f = handmade(
            &prefixed(&sheet_xml(body)),
            &prefixed(STRINGS),
            &prefixed(STYLES),
            "",
        );
        same_both_ways(f.path(), "Add Users");
    }

    #[test]
    fn our_xlsx_reader_gives_what_calamine_gives_on_the_files_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let bench = dir.path().join("bench.xlsx");
        crate::bench::generate(&bench, 2_000).unwrap();
        same_both_ways(&bench, "Add Users");
        for op in crate::model::Operation::ALL {
            let path = dir.path().join(format!("{op:?}.xlsx"));
            let lists = crate::sheet::template::TemplateLists {
                tenant: "Acme <&> \"Ltd\"".into(),
                teams: vec!["Ops".into(), "=cmd|' /C calc'!A0".into()],
                pools: vec!["Standard".into()],
                rules: None,
            };
            crate::sheet::template::write_template(op, &lists, &path).unwrap();
            let out = same_both_ways(&path, &op.sheet_name());
            assert!(String::from_utf8_lossy(&out).contains("\"meta\":{"));
        }
    }

    #[test]
    fn shared_strings_are_read_as_the_cells_need_them_and_to_the_end() {
        // A cell that refers ahead of the strings read so far reads on to its string.
        let body = r#"<row r="1"><c r="A1" t="s"><v>8</v></c><c r="B1" t="s"><v>0</v></c><c r="C1" t="s"><v>4</v></c></row>"#;
        let f = handmade(&sheet_xml(body), STRINGS, STYLES, "");
        let out = same_both_ways(f.path(), "Add Users");
        assert!(String::from_utf8_lossy(&out).contains("=1+2"));
        // A damaged string after the last one a cell uses: the file is refused, as when
        // the table is read first.
        let strings = STRINGS.replace("<si/>", "<si><t>&bad;</t></si>");
        let body = r#"<row r="1"><c r="A1" t="s"><v>0</v></c></row>"#;
        let f = handmade(&sheet_xml(body), &strings, STYLES, "");
        for reader in [XlsxReader::Own, XlsxReader::Calamine] {
            let (ended, _) = read_with(f.path(), "Add Users", reader);
            assert_eq!(ended, Err("file_damaged".to_string()), "{reader:?}");
        }
    }

    #[test]
    fn a_mutated_sheet_never_makes_our_reader_panic() {
        // Each byte of a row replaced by a character of markup, or dropped: our reader
        // gives rows or refuses the file as damaged, never anything else.
        let row = r#"<row r="2"><c r="A2" t="s"><v>1</v></c><c r="B2" s="1"><f>1</f><v>2</v></c><c t="inlineStr"><is><t>x</t></is></c><c r="D2" t="str"><v>a&amp;b</v></c></row>"#;
        for at in (0..row.len()).step_by(3) {
            for b in ["<", ">", "\"", "&", "/", ""] {
                let mut body = row.as_bytes().to_vec();
                body.splice(at..at + 1, b.bytes());
                let body = String::from_utf8_lossy(&body);
                let f = handmade(&sheet_xml(&body), STRINGS, STYLES, "");
                let (ended, _) = read_with(f.path(), "Add Users", XlsxReader::Own);
                if let Err(code) = &ended {
                    let known = ["file_damaged", "too_many_columns", "too_many_rows"];
                    assert!(known.contains(&code.as_str()), "{body}: {code}");
                }
            }
        }
    }

    #[test]
    fn a_damaged_sheet_is_refused_by_our_reader_as_by_calamine() {
        for body in [
            r#"<row r="1"><c r="A1" t="s"><v>99</v></c></row>"#,
            r#"<row r="1"><c r="A1" t="q"><v>1</v></c></row>"#,
            r#"<row r="1"><c r="A1" t="b"><v>maybe</v></c></row>"#,
            r#"<row r="1"><c r="A1" t="e"><v>#OOPS!</v></c></row>"#,
            r#"<row r="1"><c r="1A"><v>1</v></c></row>"#,
            r#"<row r="1"><c r="A1" t="str"><v>&lol;</v></c></row>"#,
            r#"<row r="1"><c r="A1"><x>1</x></c></row>"#,
            r#"<row r="1"><c r="A1" t="n"><v>abc</v></c></row>"#,
        ] {
            let f = handmade(&sheet_xml(body), STRINGS, STYLES, "");
            let own = read_with(f.path(), "Add Users", XlsxReader::Own);
            let cal = read_with(f.path(), "Add Users", XlsxReader::Calamine);
            assert_eq!(own.0, Err("file_damaged".to_string()), "{body}");
            assert_eq!(own.0, cal.0, "{body}");
        }
    }

    #[test]
    fn a_panic_in_a_parser_is_a_damaged_file_and_elsewhere_an_internal_error() {
        let code_and_message = |f: Fail| match f {
            Fail::Fatal(f) => (f.code, f.message),
            Fail::Pipe(e) => panic!("{e}"),
        };
        let parser = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/calamine-0.38.0/src/xlsx/mod.rs";
        let (code, message) = code_and_message(panic_refusal(
            "attempt to multiply with overflow",
            Some((parser.into(), 3096)),
        ));
        assert_eq!(code, "file_damaged");
        assert!(
            message.contains("(attempt to multiply with overflow)"),
            "{message}"
        );
        assert!(!message.contains(".rs"), "{message}");
        let (code, message) = code_and_message(panic_refusal(
            "index out of bounds",
            Some(("src/sheet/worker.rs".into(), 42)),
        ));
        assert_eq!(code, "internal");
        assert!(message.contains("src/sheet/worker.rs:42"), "{message}");
        assert_eq!(code_and_message(panic_refusal("x", None)).0, "file_damaged");
    }

    #[test]
    fn parser_offsets_are_left_out_of_messages() {
        for (raw, shown) in [
            (
                "Xml error: at 0..0: unrecognized entity `&lol9;`",
                "Xml error: unrecognized entity `&lol9;`",
            ),
            (
                "Xml attribute error: position 2: attribute value must be enclosed in `\"` or `'`",
                "Xml attribute error: attribute value must be enclosed in `\"` or `'`",
            ),
            (
                "Error while escaping character at range 3..5: Cannot find ';' after '&'",
                "Error while escaping character: Cannot find ';' after '&'",
            ),
            (
                "duplicated attribute, previous declaration at position 5",
                "duplicated attribute, previous declaration",
            ),
            ("Xml error: at 0..0: ", "Xml error:"),
            ("at 0..0: x", "x"),
            ("(at 1..2: x)", "(x)"),
            ("é at 1..2: ü", "é: ü"),
            // Not offsets: kept as they are.
            ("look at 3: cells", "look at 3: cells"),
            ("at 1: at 2: x", "at 1: at 2: x"),
            ("number format 12: bad", "number format 12: bad"),
            ("at ..: x", "at ..: x"),
            ("at 4..: x", "at 4..: x"),
            ("thereat 5..6: x", "thereat 5..6: x"),
            ("at 1..2 cells", "at 1..2 cells"),
            ("", ""),
        ] {
            assert_eq!(without_positions(raw), shown, "{raw}");
        }
        // No text makes it panic (every cut is at a character's boundary): all texts of up
        // to five characters from these.
        let alphabet = ['a', 't', ' ', '1', '.', ':', 'é', '(', '€', 'p'];
        let mut texts = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = texts
                .iter()
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            for t in &longer {
                let _ = without_positions(t);
            }
            texts = longer;
        }
        let Fail::Fatal(f) = damaged("Xml error: at 0..0: unrecognized entity `&a;`") else {
            panic!("a damaged file is a refusal")
        };
        assert_eq!(f.code, "file_damaged");
        assert!(
            f.message.contains("(Xml error: unrecognized entity `&a;`)"),
            "{}",
            f.message
        );
    }

    #[test]
    fn a_merge_cell_is_seen_even_across_two_chunks() {
        for split in 0..=XLSX_MERGE.len() + 2 {
            let text =
                b"<sheetData/><mergeCells count=\"1\"><mergeCell ref=\"B2:B3\"/></mergeCells>";
            let at = 34 + split.min(10);
            let mut c = Counter::new(Some(XLSX_MERGE));
            c.write_all(&text[..at]).unwrap();
            c.write_all(&text[at..]).unwrap();
            assert!(c.saw_merge(), "split at {at}");
        }
        // One byte at a time, and with a namespace prefix.
        let mut c = Counter::new(Some(XLSX_MERGE));
        for b in b"<x:mergeCells count=\"1\"><x:mergeCell ref=\"A2:A3\"/>" {
            c.write_all(&[*b]).unwrap();
        }
        assert!(c.saw_merge());
        let mut c = Counter::new(Some(XLSX_MERGE));
        c.write_all(b"<sheetData><row r=\"1\"/></sheetData><mergeCells count=\"0\"></mergeCells>")
            .unwrap();
        assert!(!c.saw_merge());
        let mut c = Counter::new(None);
        c.write_all(b"<mergeCell ref=\"A1:B1\"/>").unwrap();
        assert!(!c.saw_merge(), "without a mark nothing is searched");
        assert_eq!(merged_note(&[]), None);
    }

    #[test]
    fn only_a_string_table_root_is_taken_for_one() {
        let t = |x: &str| string_table_head(x.as_bytes()).map(unique_count);
        let decl = r#"<?xml version="1.0"?><!-- note -->"#;
        assert_eq!(
            t(&format!(r#"{decl}<sst count="3" uniqueCount="2"><si>"#)),
            Some(Some(2))
        );
        assert_eq!(t(r#"<x:sst xmlns:x="m" uniqueCount="9">"#), Some(Some(9)));
        assert_eq!(t(r#"<sst uniqueCount="lots">"#), Some(Some(u64::MAX)));
        // No count on the root: a count later in the part is not the table's.
        assert_eq!(t(r#"<sst><si><t>uniqueCount="x"</t></si>"#), Some(None));
        // A worksheet whose text holds the words is no table.
        assert_eq!(
            t(r#"<worksheet><c><is><t>&lt;sst uniqueCount="x"</t></is></c>"#),
            None
        );
        assert_eq!(t("no markup"), None);
        assert!(shared_strings_count_fits(Some(100), 2000).is_ok());
        assert!(shared_strings_count_fits(Some(1000), 2000).is_err());
    }

    #[test]
    fn the_counter_stops_past_its_budget_and_finds_ods_merges() {
        let mut c = Counter::new(Some(ODS_MERGE));
        c.stop_after = Some(10);
        c.write_all(b"<table:cov").unwrap();
        assert!(!c.stopped);
        assert!(c.write_all(b"ered-table-cell/>").is_err());
        assert!(c.stopped && c.bytes == 27);
        let mut c = Counter::new(Some(ODS_MERGE));
        c.write_all(b"<table:cov").unwrap();
        c.write_all(b"ered-table-cell/>").unwrap();
        assert!(c.saw_merge());
    }
}
