//! The archive an .xlsx is read from (by `xlsx`, or calamine when that falls back): the
//! upload's own parts, presented as a stored (uncompressed) zip whose bytes are inflated
//! from the upload on demand, as the reader asks for them (one part may also be read apart,
//! `part_reader`) — each part once; a large one on a thread of its own, a few chunks ahead of the
//! parser (`Ahead`).
//!
//! Every size limit is checked on the upload's central directory before a byte is inflated
//! (`Unzipped::new`), and a part is never inflated past the size it declares: that size is
//! all the presented archive holds of it. So a zip bomb is refused from its directory, and a
//! part that lies about its size is cut at its claim (its checksum then fails, and the file
//! is reported as damaged). Nothing is inflated twice, nothing is held whole.
//!
//! While worksheets are served, their bytes are scanned for a merged cell's mark, so only a
//! file with merged cells pays for reading the sheet's merge list.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::worker::{Fail, MarkScan, XLSX_MERGE, check_declared_size, fatal, too_many_parts};
use crate::config::Limits;

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL: u32 = 0x0605_4b50;
/// General-purpose flag: the name is UTF-8 (we write names as zip decoded them).
const UTF8_NAME: u16 = 1 << 11;
const LOCAL_LEN: u64 = 30;
const CENTRAL_LEN: usize = 46;
/// Zero bytes between the last part and the central directory. zip looks for the end
/// record in the archive's last 64 KiB (and reads its last KiB first): with this gap that
/// search reads only zeros, the directory and the end record, never a part's data (which
/// would inflate it).
const GAP: u64 = 66 * 1024;
/// Fewer parts than the 16-bit count's all-ones value, which zip takes as a sign of a
/// zip64 archive (and would then look for a zip64 record in bytes a part's name gives).
const MAX_PARTS: usize = 0xFFFE;
/// A deflated part at least this large is inflated on a thread of its own, ahead of the
/// parsing (see `Ahead`). Below it the thread costs more than it gives: measured in
/// interleaved rounds, a 10k-row file's 4 MB sheet read with it made the import 6-8% slower
/// (one more thread taking turns with the pass's writer, for no gain: the worker waits for
/// the pass anyway) and validation no faster; a 100k-row file's 41 MB sheet gains nothing
/// in an import or a validation, a 1M-row file's validation 2% and its bare read 10%. (The
/// tests take both ways with a smaller floor.)
#[cfg(not(test))]
const AHEAD_MIN: u64 = 16 << 20;
#[cfg(test)]
const AHEAD_MIN: u64 = 1 << 20;
/// The bytes that thread hands over at a time, and how many it may have waiting.
const AHEAD_CHUNK: usize = 1 << 16;
const AHEAD_DEPTH: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Method {
    Stored,
    Deflated,
}

/// One part as presented, and where its bytes come from in the upload.
#[derive(Debug)]
struct Part {
    name: String,
    crc: u32,
    /// Bytes presented: the size the part declares.
    size: u64,
    /// Virtual offsets of its local header and its data.
    header_at: u64,
    data_at: u64,
    /// Where its compressed bytes start in the upload, how many there are, and how.
    source_at: u64,
    compressed: u64,
    method: Method,
    /// Look for a merged cell's mark in it (see `scan_for_merges`).
    scan: bool,
}

/// The part being inflated and how far.
struct Inflating {
    part: usize,
    pos: u64,
    reader: Box<dyn Read>,
}

struct State {
    file: Arc<File>,
    parts: Vec<Part>,
    /// Where the last part ends: zeros follow up to `central_at`.
    parts_end: u64,
    /// The central directory and its end record, at `central_at`.
    central: Vec<u8>,
    central_at: u64,
    pos: u64,
    open: Option<Inflating>,
    marks: MarkScan,
    /// Bytes inflated so far (skipped ones included), by either thread.
    inflated: Arc<AtomicU64>,
}

/// A handle on the presented archive. calamine owns one; the worker keeps a clone to ask,
/// once the rows are read, whether a worksheet held merged cells.
#[derive(Clone)]
pub struct Unzipped(Rc<RefCell<State>>);

impl std::fmt::Debug for Unzipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unzipped")
            .field("parts", &self.0.borrow().parts.len())
            .finish()
    }
}

impl Unzipped {
    /// Checks every part's declared sizes against the limits and lays out the archive;
    /// `file` is the upload itself.
    pub fn new<R: Read + Seek>(
        zip: &mut zip::ZipArchive<R>,
        file: File,
        limits: &Limits,
    ) -> Result<Unzipped, Fail> {
        if zip.len() > MAX_PARTS {
            return Err(too_many_parts(zip.len()));
        }
        let mut parts = Vec::with_capacity(zip.len());
        let mut at = 0u64;
        let mut total = 0u64;
        for i in 0..zip.len() {
            let entry = zip.by_index_raw(i).map_err(|e| {
                fatal(
                    "file_damaged",
                    format!("The file is damaged: part {i} cannot be read ({e})."),
                )
            })?;
            let decoded = entry.name().ok().map(|n| n.into_owned());
            let name = match decoded {
                Some(n) if n.len() <= usize::from(u16::MAX) => n,
                // A name that is not text is no part calamine looks for.
                _ => format!("#{i}"),
            };
            // Every part is presented (calamine finds parts by the names the relationships
            // give), but only the parts calamine reads are ever inflated.
            if entry.encrypted() {
                return Err(fatal(
                    "file_encrypted",
                    "The file is password-protected (its parts are encrypted). Remove the password, save and upload it again.",
                ));
            }
            let declared = entry.size();
            let compressed = entry.compressed_size();
            let method = match entry.compression() {
                zip::CompressionMethod::Stored => Method::Stored,
                zip::CompressionMethod::Deflated => Method::Deflated,
                other => {
                    return Err(fatal(
                        "file_damaged",
                        format!(
                            "The file cannot be read: its part {name} is compressed with a method spreadsheet programs do not use ({other:?}). Save it again from your spreadsheet program and upload the new copy."
                        ),
                    ));
                }
            };
            check_declared_size(&name, declared, compressed, limits)?;
            total = total.saturating_add(declared);
            if total > limits.max_zip_total_mib.saturating_mul(1024 * 1024) {
                return Err(super::worker::bomb(
                    &name,
                    format!(
                        "brings the inflated total above {} MiB",
                        limits.max_zip_total_mib
                    ),
                ));
            }
            if method == Method::Stored && declared != compressed {
                return Err(fatal(
                    "file_damaged",
                    format!(
                        "The file is damaged: its part {name} claims {declared} bytes but holds {compressed}. Save it again from your spreadsheet program and upload the new copy."
                    ),
                ));
            }
            let size = declared;
            let source_at = match entry.data_start() {
                Some(s) => s,
                None => {
                    return Err(fatal(
                        "file_damaged",
                        format!("The file is damaged: part {name} cannot be found in it."),
                    ));
                }
            };
            let header_at = at;
            let data_at = header_at + LOCAL_LEN + name.len() as u64;
            // Sizes were checked against the limits; with limits set past any sense, the
            // 4 GiB check below refuses what does not fit.
            at = data_at.saturating_add(size);
            parts.push(Part {
                crc: entry.crc32(),
                size,
                header_at,
                data_at,
                source_at,
                compressed,
                method,
                scan: false,
                name,
            });
        }
        let parts_end = at;
        let central_at = at.saturating_add(GAP);
        let central = central_directory(&parts, central_at);
        if central_at.saturating_add(central.len() as u64) > u64::from(u32::MAX) {
            return Err(super::worker::bomb(
                "(all)",
                "inflates to more than 4 GiB, the most rollcall reads".to_string(),
            ));
        }
        Ok(Unzipped(Rc::new(RefCell::new(State {
            file: Arc::new(file),
            parts,
            parts_end,
            central,
            central_at,
            pos: 0,
            open: None,
            marks: MarkScan::new(XLSX_MERGE),
            inflated: Arc::new(AtomicU64::new(0)),
        }))))
    }

    /// Which parts to scan for a merged cell's mark as they are served, by index and name.
    pub fn scan_for_merges(&self, scan: impl Fn(usize, &str) -> bool) {
        for (i, part) in self.0.borrow_mut().parts.iter_mut().enumerate() {
            part.scan = scan(i, &part.name);
        }
    }

    /// Whether a scanned part held a merged cell's mark. The rest of the part being read is
    /// scanned first (calamine stops at the end of the cells; the merge list follows them).
    pub fn saw_merge(&self) -> bool {
        let mut s = self.0.borrow_mut();
        if !s.marks.seen() {
            s.scan_rest();
        }
        s.marks.seen()
    }

    /// A reader of its own for the part named `name` (exactly, else without regard to case
    /// and slash direction), beside the one the archive is read through: the shared
    /// strings are read as the cells first need them, while the sheet is being read. The
    /// part is inflated from its first byte (a large one on a thread of its own), never
    /// past its declared size, and its checksum is checked at its end. `None` when there
    /// is no such part.
    pub fn part_reader(&self, name: &str) -> Option<io::Result<PartReader>> {
        let s = self.0.borrow();
        let want = name.replace('\\', "/").to_lowercase();
        let k = s.parts.iter().position(|p| p.name == name).or_else(|| {
            s.parts
                .iter()
                .position(|p| p.name.replace('\\', "/").to_lowercase() == want)
        })?;
        let part = &s.parts[k];
        Some(s.inflate(k).map(|open| PartReader {
            reader: open.reader,
            crc: flate2::Crc::new(),
            left: part.size,
            expect: part.crc,
            name: part.name.clone(),
        }))
    }

    /// Bytes inflated so far, skipped ones and those inflated ahead of the parser included
    /// (for tests of what is never inflated).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn inflated(&self) -> u64 {
        self.0.borrow().inflated.load(Ordering::Relaxed)
    }
}

fn u16le(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn u32le(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Sizes and offsets fit 32 bits: `Unzipped::new` refuses a layout that does not.
fn low32(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// The fields a local header and a central directory header share, from the version
/// needed to the extra field's length.
fn common_fields(v: &mut Vec<u8>, p: &Part) {
    u16le(v, 20); // version needed
    u16le(v, UTF8_NAME);
    u16le(v, 0); // stored
    u16le(v, 0); // time
    u16le(v, 0x21); // date: 1980-01-01
    u32le(v, p.crc);
    u32le(v, low32(p.size));
    u32le(v, low32(p.size));
    u16le(v, p.name.len() as u16);
    u16le(v, 0); // extra
}

fn local_header(p: &Part) -> Vec<u8> {
    let mut v = Vec::with_capacity(LOCAL_LEN as usize + p.name.len());
    u32le(&mut v, LOCAL_HEADER);
    common_fields(&mut v, p);
    v.extend_from_slice(p.name.as_bytes());
    v
}

fn central_directory(parts: &[Part], at: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        u32le(&mut v, CENTRAL_HEADER);
        u16le(&mut v, 20); // made by
        common_fields(&mut v, p);
        u16le(&mut v, 0); // comment
        u16le(&mut v, 0); // disk
        u16le(&mut v, 0); // internal attributes
        u32le(&mut v, 0); // external attributes
        u32le(&mut v, low32(p.header_at));
        v.extend_from_slice(p.name.as_bytes());
    }
    let size = v.len();
    debug_assert!(size >= parts.len() * CENTRAL_LEN);
    let n = parts.len().min(usize::from(u16::MAX)) as u16;
    u32le(&mut v, END_OF_CENTRAL);
    u16le(&mut v, 0);
    u16le(&mut v, 0);
    u16le(&mut v, n);
    u16le(&mut v, n);
    u32le(&mut v, low32(size as u64));
    u32le(&mut v, low32(at));
    u16le(&mut v, 0); // comment
    v
}

fn copy_from(src: &[u8], at: u64, buf: &mut [u8]) -> usize {
    let Some(rest) = usize::try_from(at).ok().and_then(|a| src.get(a..)) else {
        return 0;
    };
    let n = rest.len().min(buf.len());
    buf[..n].copy_from_slice(&rest[..n]);
    n
}

impl State {
    fn len(&self) -> u64 {
        self.central_at + self.central.len() as u64
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self.pos;
        if buf.is_empty() || p >= self.len() {
            return Ok(0);
        }
        let n = if p >= self.central_at {
            copy_from(&self.central, p - self.central_at, buf)
        } else if p >= self.parts_end {
            let n = usize::try_from(self.central_at - p)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            buf[..n].fill(0);
            n
        } else {
            // The first part starts at 0, so one starts at or before `p`.
            let k = self.parts.partition_point(|x| x.header_at <= p) - 1;
            let part = &self.parts[k];
            if p < part.data_at {
                copy_from(&local_header(part), p - part.header_at, buf)
            } else {
                self.read_data(k, p - part.data_at, buf)?
            }
        };
        self.pos += n as u64;
        Ok(n)
    }

    /// Starts inflating part `k` from its first byte.
    fn inflate(&self, k: usize) -> io::Result<Inflating> {
        let part = &self.parts[k];
        let raw = BufReader::with_capacity(
            1 << 16,
            Compressed {
                file: self.file.clone(),
                at: part.source_at,
                end: part.source_at.saturating_add(part.compressed),
            },
        );
        let counted = |r| Counted {
            inner: r,
            count: self.inflated.clone(),
        };
        // Never more than the declared size: that is all the presented archive holds.
        let reader: Box<dyn Read> = match part.method {
            Method::Stored => Box::new(counted(Box::new(raw.take(part.size)))),
            Method::Deflated => {
                let inflate = counted(Box::new(
                    flate2::bufread::DeflateDecoder::new(raw).take(part.size),
                ));
                if part.size >= AHEAD_MIN {
                    Ahead::start(inflate)
                } else {
                    Box::new(inflate)
                }
            }
        };
        Ok(Inflating {
            part: k,
            pos: 0,
            reader,
        })
    }

    /// Bytes of part `k` from offset `o` (below its size). A part whose data ends before
    /// its declared size reads as ending there (its checksum then tells).
    fn read_data(&mut self, k: usize, o: u64, buf: &mut [u8]) -> io::Result<usize> {
        let reuse = matches!(&self.open, Some(i) if i.part == k && i.pos <= o);
        if !reuse {
            // The old reader (and its thread) goes first.
            self.open = None;
            self.open = Some(self.inflate(k)?);
            self.marks.restart();
        }
        let part = &self.parts[k];
        let Some(open) = self.open.as_mut() else {
            return Ok(0);
        };
        let name = &part.name;
        let damaged =
            |e: io::Error| io::Error::new(e.kind(), format!("part {name} cannot be inflated: {e}"));
        if open.pos < o {
            let skipped = io::copy(&mut (&mut open.reader).take(o - open.pos), &mut io::sink())
                .map_err(damaged)?;
            open.pos += skipped;
            if open.pos < o {
                return Ok(0);
            }
        }
        let want = usize::try_from(part.size - o)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = open.reader.read(&mut buf[..want]).map_err(damaged)?;
        open.pos += n as u64;
        if part.scan {
            self.marks.feed(&buf[..n]);
        }
        Ok(n)
    }

    /// Inflates what is left of the worksheet being read, looking for the mark only.
    fn scan_rest(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let part = &self.parts[open.part];
        if !part.scan {
            return;
        }
        let mut left = part.size.saturating_sub(open.pos);
        let mut chunk = vec![0u8; 1 << 16];
        while left > 0 && !self.marks.seen() {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            match open.reader.read(&mut chunk[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    open.pos += n as u64;
                    left -= n as u64;
                    self.marks.feed(&chunk[..n]);
                }
            }
        }
    }
}

/// One part's bytes, read apart from the archive (`Unzipped::part_reader`).
pub struct PartReader {
    reader: Box<dyn Read>,
    crc: flate2::Crc,
    /// Bytes of the declared size not read yet.
    left: u64,
    expect: u32,
    name: String,
}

impl Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = if want == 0 {
            0
        } else {
            self.reader.read(&mut buf[..want]).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("part {} cannot be inflated: {e}", self.name),
                )
            })?
        };
        self.crc.update(&buf[..n]);
        self.left -= n as u64;
        // At the part's end (or where its data stops short of its claim) the checksum
        // tells whether the bytes are the ones that were saved; the words are zip's, so a
        // damaged part reads the same whichever way it was read.
        if n == 0 && !buf.is_empty() && self.crc.sum() != self.expect {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("Invalid checksum (part {})", self.name),
            ));
        }
        Ok(n)
    }
}

/// A part's bytes as they are inflated, counted in the archive's total.
struct Counted {
    inner: Box<dyn Read + Send>,
    count: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A part's compressed bytes in the upload, read at their own offsets (`read_at`): readers
/// of different parts, or of one part twice, never share a file position.
struct Compressed {
    file: Arc<File>,
    at: u64,
    end: u64,
}

impl Read for Compressed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = usize::try_from(self.end.saturating_sub(self.at)).unwrap_or(usize::MAX);
        let want = left.min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// What the inflating thread hands over.
enum Handed {
    Chunk(Vec<u8>),
    /// The part is complete.
    End,
    Failed(io::Error),
}

/// A large part inflated on a thread of its own, a few chunks ahead of the parser: the
/// worker's second core takes the inflating (a tenth of the reading), the parsing thread
/// only copies. At most `AHEAD_DEPTH + 1` chunks beyond the one being read are inflated,
/// never past the part's declared size. The thread ends at the part's end, on an error
/// (after the bytes inflated before it), or soon after the part is dropped (it checks
/// between reads; a thread blocked handing over is woken by the drop).
struct Ahead {
    chunks: Receiver<Handed>,
    /// Chunks already read, handed back for the thread to fill again.
    spent: SyncSender<Vec<u8>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    current: Vec<u8>,
    at: usize,
    ended: bool,
}

impl Ahead {
    /// Starts the thread; where no thread can be started, `inflate` is read in place.
    fn start(inflate: Counted) -> Box<dyn Read> {
        let (filled, chunks) = sync_channel::<Handed>(AHEAD_DEPTH);
        let (spent, empties) = sync_channel::<Vec<u8>>(AHEAD_DEPTH + 2);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        // The reader goes to the thread once it runs, so that it stays here if it cannot.
        let (ready, go) = sync_channel::<Counted>(1);
        let thread = std::thread::Builder::new()
            .name("inflate".into())
            .stack_size(1 << 20)
            .spawn(move || {
                let Ok(mut inflate) = go.recv() else {
                    return;
                };
                loop {
                    let mut chunk = empties
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(AHEAD_CHUNK));
                    chunk.resize(AHEAD_CHUNK, 0);
                    let mut n = 0;
                    let mut failed = None;
                    while n < AHEAD_CHUNK {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        match inflate.read(&mut chunk[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    let full = n == AHEAD_CHUNK;
                    chunk.truncate(n);
                    if n > 0 && filled.send(Handed::Chunk(chunk)).is_err() {
                        return;
                    }
                    if let Some(e) = failed {
                        let _ = filled.send(Handed::Failed(e));
                        return;
                    }
                    if !full {
                        let _ = filled.send(Handed::End);
                        return;
                    }
                }
            });
        let inflate = match thread {
            Ok(_) => match ready.send(inflate) {
                Ok(()) => None,
                Err(back) => Some(back.0),
            },
            Err(_) => Some(inflate),
        };
        if let Some(inflate) = inflate {
            return Box::new(inflate);
        }
        Box::new(Ahead {
            chunks,
            spent,
            stop,
            current: Vec::new(),
            at: 0,
            ended: false,
        })
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Read for Ahead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            if self.ended || buf.is_empty() {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Handed::Chunk(chunk)) => {
                    let spent = std::mem::replace(&mut self.current, chunk);
                    let _ = self.spent.try_send(spent);
                    self.at = 0;
                }
                Ok(Handed::End) => self.ended = true,
                Ok(Handed::Failed(e)) => {
                    self.ended = true;
                    return Err(e);
                }
                Err(_) => {
                    self.ended = true;
                    return Err(io::Error::other(
                        "the inflating thread stopped before the part's end",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Read for Unzipped {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl Seek for Unzipped {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let mut s = self.0.borrow_mut();
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => s.len().checked_add_signed(d),
            SeekFrom::Current(d) => s.pos.checked_add_signed(d),
        };
        let Some(to) = to else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the archive",
            ));
        };
        s.pos = to;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn archive(parts: &[(&str, &[u8], zip::CompressionMethod)]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        {
            let mut w = zip::ZipWriter::new(f.as_file_mut());
            for (name, data, method) in parts {
                let o = zip::write::SimpleFileOptions::default().compression_method(*method);
                w.start_file(*name, o).unwrap();
                w.write_all(data).unwrap();
            }
            w.finish().unwrap();
        }
        f
    }

    fn open(f: &tempfile::NamedTempFile, limits: &Limits) -> Result<Unzipped, Fail> {
        let mut zip = zip::ZipArchive::new(File::open(f.path()).unwrap()).unwrap();
        Unzipped::new(&mut zip, File::open(f.path()).unwrap(), limits)
    }

    #[test]
    fn every_part_reads_back_as_it_was_stored_or_deflated() {
        let big: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("<c r=\"A{i}\"><v>{i}</v></c>").into_bytes())
            .collect();
        let f = archive(&[
            (
                "[Content_Types].xml",
                b"<Types/>",
                zip::CompressionMethod::Stored,
            ),
            (
                "xl/worksheets/sheet1.xml",
                &big,
                zip::CompressionMethod::Deflated,
            ),
            (
                "xl/media/image1.png",
                b"\x89PNG....",
                zip::CompressionMethod::Deflated,
            ),
            (
                "xl/workbook.xml",
                b"<workbook/>",
                zip::CompressionMethod::Deflated,
            ),
        ]);
        let u = open(&f, &Limits::default()).unwrap();
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        assert_eq!(z.len(), 4);
        // Opening the archive inflates nothing (zip's search for the end record reads the
        // gap after the last part, not the part).
        assert_eq!(u.inflated(), 0);
        let mut read = |name: &str| {
            let mut v = Vec::new();
            z.by_name(name).unwrap().read_to_end(&mut v).unwrap();
            v
        };
        // Out of order, and one part twice (it is inflated again from its start).
        assert_eq!(read("xl/workbook.xml"), b"<workbook/>");
        assert_eq!(u.inflated(), 11);
        assert_eq!(read("xl/worksheets/sheet1.xml"), big);
        assert_eq!(read("[Content_Types].xml"), b"<Types/>");
        assert_eq!(read("xl/worksheets/sheet1.xml"), big);
        assert_eq!(read("xl/media/image1.png"), b"\x89PNG....");
        assert!(!u.saw_merge());
    }

    #[test]
    fn a_merge_mark_is_found_after_the_cells_and_limits_come_first() {
        let mut sheet = b"<worksheet><sheetData>".to_vec();
        sheet.extend(std::iter::repeat_n(b'x', 200_000));
        sheet.extend_from_slice(
            b"</sheetData><mergeCells><mergeCell ref=\"A2:B2\"/></mergeCells></worksheet>",
        );
        // Wherever the package's relationships put its worksheets.
        let f = archive(&[(
            "data/sheets/s1.xml",
            &sheet,
            zip::CompressionMethod::Deflated,
        )]);
        let u = open(&f, &Limits::default()).unwrap();
        u.scan_for_merges(|i, name| i == 0 && name == "data/sheets/s1.xml");
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        // Read only the cells' part, as calamine does, then ask.
        let mut head = vec![0u8; 1000];
        z.by_name("data/sheets/s1.xml")
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        drop(z);
        assert!(u.saw_merge());
        // A part that is not scanned tells nothing.
        let u = open(&f, &Limits::default()).unwrap();
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        std::io::copy(&mut z.by_index(0).unwrap(), &mut std::io::sink()).unwrap();
        drop(z);
        assert!(!u.saw_merge());

        let limits = Limits {
            max_zip_ratio: 10,
            ..Limits::default()
        };
        // 200 kB of one byte compresses far beyond 10:1, but is under the 1 MiB floor.
        assert!(open(&f, &limits).is_ok());
        let limits = Limits {
            max_zip_entry_mib: 0,
            ..Limits::default()
        };
        match open(&f, &limits) {
            Err(Fail::Fatal(e)) => assert_eq!(e.code, "zip_bomb", "{}", e.message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_part_read_apart_comes_whole_with_its_checksum_checked() {
        let table: Vec<u8> = (0..50_000u32)
            .flat_map(|i| {
                format!("<si><t>s{}</t></si>", i.wrapping_mul(2_654_435_761)).into_bytes()
            })
            .collect();
        assert!(table.len() as u64 > AHEAD_MIN);
        let sheet = b"<worksheet><sheetData/></worksheet>";
        let f = archive(&[
            (
                "xl/sharedStrings.xml",
                &table,
                zip::CompressionMethod::Deflated,
            ),
            (
                "xl/worksheets/sheet1.xml",
                sheet,
                zip::CompressionMethod::Stored,
            ),
        ]);
        let u = open(&f, &Limits::default()).unwrap();
        // Read beside the archive's own reading of another part, in turns.
        let mut apart = u.part_reader("XL\\SharedStrings.xml").unwrap().unwrap();
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        let mut other = z.by_name("xl/worksheets/sheet1.xml").unwrap();
        let (mut got, mut got_other) = (Vec::new(), Vec::new());
        let mut chunk = [0u8; 1000];
        loop {
            let n = apart.read(&mut chunk).unwrap();
            got.extend_from_slice(&chunk[..n]);
            let m = other.read(&mut chunk[..7]).unwrap();
            got_other.extend_from_slice(&chunk[..m]);
            if n == 0 {
                break;
            }
        }
        assert!(got == table);
        assert_eq!(got_other, sheet);
        assert!(u.part_reader("xl/nothing.xml").is_none());

        // A part whose bytes are not the ones saved (its stored checksum changed here)
        // fails at its end with zip's words.
        let bytes = std::fs::read(f.path()).unwrap();
        let central = bytes
            .windows(4)
            .rposition(|w| w == CENTRAL_HEADER.to_le_bytes())
            .unwrap();
        // The second central record is the sheet's; the first, the table's.
        let first = bytes
            .windows(4)
            .position(|w| w == CENTRAL_HEADER.to_le_bytes())
            .unwrap();
        assert!(first < central);
        let mut damaged = bytes.clone();
        damaged[first + 16] ^= 0xFF;
        let g = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(g.path(), &damaged).unwrap();
        let mut zip = zip::ZipArchive::new(File::open(g.path()).unwrap()).unwrap();
        let u = Unzipped::new(&mut zip, File::open(g.path()).unwrap(), &Limits::default()).unwrap();
        let e = io::copy(
            &mut u.part_reader("xl/sharedStrings.xml").unwrap().unwrap(),
            &mut io::sink(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("Invalid checksum"), "{e}");
    }

    #[test]
    fn a_large_part_is_inflated_ahead_within_bounds_and_its_damage_comes_through() {
        // Varied text, so that its deflated stream is long enough to damage in the middle.
        let big: Vec<u8> = (0..200_000u32)
            .flat_map(|i| {
                format!("<c r=\"A{i}\"><v>{}</v></c>", i.wrapping_mul(2_654_435_761)).into_bytes()
            })
            .collect();
        assert!(big.len() as u64 > AHEAD_MIN);
        let f = archive(&[(
            "xl/worksheets/sheet1.xml",
            &big,
            zip::CompressionMethod::Deflated,
        )]);
        let u = open(&f, &Limits::default()).unwrap();
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        let mut v = Vec::new();
        z.by_index(0).unwrap().read_to_end(&mut v).unwrap();
        assert!(v == big);
        assert_eq!(u.inflated(), big.len() as u64);

        // Read a little and stop: the thread inflates only a few chunks ahead, however long
        // it is given (it waits to hand over the next one).
        let u = open(&f, &Limits::default()).unwrap();
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        let mut head = vec![0u8; 100];
        z.by_index(0).unwrap().read_exact(&mut head).unwrap();
        assert_eq!(head, big[..100]);
        drop(z);
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let ahead = u.inflated();
            assert!(
                ahead <= ((AHEAD_DEPTH + 2) * AHEAD_CHUNK) as u64,
                "{ahead} bytes inflated ahead"
            );
        }
        // Reading the part again from its start (as a second pass over a sheet does) gives
        // the same bytes: the new reader does not share the old one's file position.
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        let mut v = Vec::new();
        z.by_index(0).unwrap().read_to_end(&mut v).unwrap();
        assert!(v == big);

        // Damage in the middle of the deflated bytes is an error, not a hang or a panic.
        let data_at = {
            let mut zip = zip::ZipArchive::new(File::open(f.path()).unwrap()).unwrap();
            let e = zip.by_index_raw(0).unwrap();
            e.data_start().unwrap() + e.compressed_size() / 2
        };
        let mut bytes = std::fs::read(f.path()).unwrap();
        for b in &mut bytes[data_at as usize..data_at as usize + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(f.path(), &bytes).unwrap();
        let u = open(&f, &Limits::default()).unwrap();
        let mut z = zip::ZipArchive::new(u.clone()).unwrap();
        let mut v = Vec::new();
        assert!(z.by_index(0).unwrap().read_to_end(&mut v).is_err());
    }
}
