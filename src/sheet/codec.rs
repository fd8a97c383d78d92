//! The byte stream between the parsing worker process and its parent.
//!
//! Frames: `I` + JSON (workbook info, first), then `R` rows, then `N` + JSON notes (optional),
//! then `Z` + the worker's peak memory in KiB (end) or `X` + JSON (a fatal problem). Numbers
//! are little-endian; lengths are LEB128 varints, but for a row frame's own length (u32).
//! A row is its zero-based sheet index and its non-empty cells, each with its column index.
//! The worker encodes straight into one buffer ([`RowWriter`]); the parent decodes a row
//! from its reader's buffer in one pass, reusing the caller's cells, so a million rows cost
//! no allocation per cell on either side.

use std::io::{self, BufRead, Read, Write};

pub const FRAME_INFO: u8 = b'I';
pub const FRAME_ROW: u8 = b'R';
pub const FRAME_END: u8 = b'Z';
pub const FRAME_FATAL: u8 = b'X';
/// Notes found while reading (a JSON list of sentences), sent after the rows.
pub const FRAME_NOTES: u8 = b'N';

/// What kind of value a cell holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellKind {
    Text = 1,
    Int = 2,
    Float = 3,
    Bool = 4,
    /// An Excel date/time serial number in `num`; `text` is empty.
    Date = 5,
    /// An ISO 8601 date/time in `text` (OpenDocument files).
    DateIso = 6,
    /// A spreadsheet error such as `#N/A` in `text`.
    Error = 7,
    /// Text longer than the limit; `num` holds its length in characters.
    TooLong = 8,
}

impl CellKind {
    /// Whether the value travels as text (otherwise as a number).
    pub fn has_text(self) -> bool {
        matches!(self, CellKind::Text | CellKind::DateIso | CellKind::Error)
    }

    fn from_u8(b: u8) -> io::Result<CellKind> {
        Ok(match b {
            1 => CellKind::Text,
            2 => CellKind::Int,
            3 => CellKind::Float,
            4 => CellKind::Bool,
            5 => CellKind::Date,
            6 => CellKind::DateIso,
            7 => CellKind::Error,
            8 => CellKind::TooLong,
            _ => return Err(bad("unknown cell kind")),
        })
    }
}

/// One non-empty cell. For Text/DateIso/Error the value is in `text`; otherwise in `num`
/// (Bool: 0 or 1; Int: exact up to 2^53, larger integers travel as text).
#[derive(Debug, Clone, PartialEq)]
pub struct RawCell {
    pub col: u32,
    pub kind: CellKind,
    pub text: String,
    pub num: f64,
}

/// One row as read from the sheet, with buffers kept between rows.
#[derive(Debug, Default, Clone)]
pub struct RawRow {
    /// Zero-based row index in the sheet (the header is row 0; Excel shows index + 1).
    pub index: u32,
    cells: Vec<RawCell>,
    len: usize,
    /// The parent's scratch for a row frame cut by its reader's buffer.
    frame: Vec<u8>,
}

impl RawRow {
    pub fn cells(&self) -> &[RawCell] {
        &self.cells[..self.len]
    }

    pub fn clear(&mut self, index: u32) {
        self.index = index;
        self.len = 0;
    }

    /// Adds a cell, reusing a slot (and its string buffer) from an earlier row.
    pub fn push(&mut self, col: u32, kind: CellKind, text: &str, num: f64) {
        if self.len == self.cells.len() {
            self.cells.push(RawCell {
                col,
                kind,
                text: String::new(),
                num,
            });
        }
        let c = &mut self.cells[self.len];
        c.col = col;
        c.kind = kind;
        c.num = num;
        c.text.clear();
        c.text.push_str(text);
        self.len += 1;
    }

    /// The cell in column `col`, if it is filled.
    pub fn get(&self, col: u32) -> Option<&RawCell> {
        self.cells().iter().find(|c| c.col == col)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("worker stream: {what}"))
}

pub fn write_varint(w: &mut impl Write, v: u64) -> io::Result<()> {
    let mut buf = Vec::with_capacity(10);
    put_varint(&mut buf, v);
    w.write_all(&buf)
}

fn read_u8(r: &mut impl BufRead) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub fn read_varint(r: &mut impl BufRead) -> io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = read_u8(r)?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("varint too long"))
}

/// Peak resident memory of this process in KiB (`VmHWM`), 0 when unknown.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Writes the end frame.
pub fn write_end(w: &mut impl Write) -> io::Result<()> {
    w.write_all(&[FRAME_END])?;
    write_varint(w, peak_rss_kib())
}

/// Writes a frame with a JSON body (info or fatal).
pub fn write_json_frame(w: &mut impl Write, tag: u8, json: &str) -> io::Result<()> {
    w.write_all(&[tag])?;
    write_varint(w, json.len() as u64)?;
    w.write_all(json.as_bytes())
}

/// Appends `v` to `buf` as a LEB128 varint.
fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// How many encoded bytes the worker gathers before writing them to the pipe.
const CHUNK: usize = 1 << 16;

/// The first chunks are smaller (the first row, the header, goes alone, then 4 KiB, 16 KiB,
/// then `CHUNK`): the parent checks the header and starts its checks on the first rows
/// without waiting for a full chunk (a worker reading ahead reads on meanwhile; a paced
/// one waits until the checks ask for the next rows).
const FIRST_CHUNK: usize = 1 << 12;

/// The worker's side: rows are encoded cell by cell straight into one byte buffer (no
/// per-cell copy into a row structure, no small writes), which goes to the pipe in 64 KiB
/// chunks.
///
/// A row frame is `R`, the length of the rest of the frame (u32, patched when the row
/// ends), the row index, then its cells: column, kind, and the text (length + UTF-8) or the
/// number (f64).
#[derive(Debug)]
pub struct RowWriter {
    buf: Vec<u8>,
    /// Where the open row's frame starts.
    open: Option<usize>,
    /// The size of the next chunk (growing to `CHUNK`, see `FIRST_CHUNK`).
    chunk: usize,
}

impl Default for RowWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl RowWriter {
    pub fn new() -> Self {
        RowWriter {
            buf: Vec::with_capacity(CHUNK + CHUNK / 2),
            open: None,
            chunk: 1,
        }
    }

    /// Starts row `index` (call `end` first if a row is open).
    pub fn begin(&mut self, index: u32) {
        debug_assert!(
            self.open.is_none(),
            "a row was begun before the last one ended"
        );
        self.open = Some(self.buf.len());
        self.buf.push(FRAME_ROW);
        self.buf.extend_from_slice(&[0; 4]);
        put_varint(&mut self.buf, u64::from(index));
    }

    /// Adds a cell whose value is text (`Text`, `DateIso`, `Error`).
    pub fn text(&mut self, col: u32, kind: CellKind, text: &str) {
        debug_assert!(kind.has_text());
        put_varint(&mut self.buf, u64::from(col));
        self.buf.push(kind as u8);
        put_varint(&mut self.buf, text.len() as u64);
        self.buf.extend_from_slice(text.as_bytes());
    }

    /// Adds a cell whose value is a number (every other kind).
    pub fn num(&mut self, col: u32, kind: CellKind, num: f64) {
        debug_assert!(!kind.has_text());
        put_varint(&mut self.buf, u64::from(col));
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(&num.to_le_bytes());
    }

    /// Ends the open row, if any; writes the buffer out once it holds a chunk. True when a
    /// chunk went out.
    pub fn end(&mut self, w: &mut impl Write) -> io::Result<bool> {
        if let Some(start) = self.open.take() {
            let len =
                u32::try_from(self.buf.len() - start - 5).map_err(|_| bad("row over 4 GiB"))?;
            self.buf[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
        }
        if self.buf.len() >= self.chunk {
            w.write_all(&self.buf)?;
            self.buf.clear();
            self.chunk = (self.chunk * 4).clamp(FIRST_CHUNK, CHUNK);
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes out the complete rows buffered and drops the open one (the worker is about
    /// to report a problem in it: the rows before it still reach the parent first).
    pub fn flush_complete(&mut self, w: &mut impl Write) -> io::Result<()> {
        if let Some(start) = self.open.take() {
            self.buf.truncate(start);
        }
        w.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Ends the open row and writes out everything buffered.
    pub fn finish(&mut self, w: &mut impl Write) -> io::Result<()> {
        self.end(w)?;
        w.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

/// A frame as read by the parent.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Json(u8, String),
    /// The row was decoded into the caller's buffer.
    Row,
    /// End of the rows, with the worker's peak resident memory in KiB.
    End(u64),
}

/// Reads the next frame; rows are decoded into `row`. A cell's text may be at most
/// `max_text` bytes, a row frame at most `max_row` bytes.
pub fn read_frame(
    r: &mut impl BufRead,
    row: &mut RawRow,
    max_text: usize,
    max_row: usize,
) -> io::Result<Frame> {
    let tag = read_u8(r)?;
    match tag {
        FRAME_INFO | FRAME_FATAL | FRAME_NOTES => {
            let len = read_varint(r)? as usize;
            if len > 16 * 1024 * 1024 {
                return Err(bad("oversized json frame"));
            }
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf)?;
            let s = String::from_utf8(buf).map_err(|_| bad("json frame is not UTF-8"))?;
            Ok(Frame::Json(tag, s))
        }
        FRAME_END => Ok(Frame::End(read_varint(r)?)),
        FRAME_ROW => {
            let mut len = [0u8; 4];
            r.read_exact(&mut len)?;
            let len = u32::from_le_bytes(len) as usize;
            if len > max_row {
                return Err(bad("oversized row"));
            }
            let available = r.fill_buf()?;
            if let Some(frame) = available.get(..len) {
                // The usual case: the whole row is in the reader's buffer already.
                decode_row(frame, row, max_text)?;
                r.consume(len);
            } else {
                // A row cut by the buffer's end: gathered (growing with the bytes that
                // really come, not with the claimed length), then decoded.
                let mut frame = std::mem::take(&mut row.frame);
                frame.clear();
                r.by_ref().take(len as u64).read_to_end(&mut frame)?;
                let decoded = if frame.len() == len {
                    decode_row(&frame, row, max_text)
                } else {
                    // The stream ended inside the row: the worker's end tells why.
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "worker stream: ended inside a row",
                    ))
                };
                row.frame = frame;
                decoded?;
            }
            Ok(Frame::Row)
        }
        _ => Err(bad("unknown frame")),
    }
}

/// Takes a varint from the front of `b`.
fn take_varint(b: &mut &[u8]) -> io::Result<u64> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *b = &b[i + 1..];
            return Ok(v);
        }
    }
    Err(bad("bad varint"))
}

/// Takes `n` bytes from the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if n > b.len() {
        return Err(bad("row cut short"));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

/// Decodes one row frame's body into `row`, reusing its cells' buffers.
fn decode_row(mut b: &[u8], row: &mut RawRow, max_text: usize) -> io::Result<()> {
    let index = u32::try_from(take_varint(&mut b)?).map_err(|_| bad("row index"))?;
    row.clear(index);
    // The cells' bytes are checked as UTF-8 in one pass when they can be (a row of text
    // cells in the first 128 columns, each under 128 bytes: every column, kind and length
    // is one ASCII byte), instead of text by text; each text is then cut out of that
    // checked string (`str::get` refuses a cut inside a character). Other rows, with
    // numbers or long texts, are checked text by text.
    let cells = b;
    let checked = std::str::from_utf8(cells).ok();
    while !b.is_empty() {
        let col = u32::try_from(take_varint(&mut b)?).map_err(|_| bad("column index"))?;
        let kind = CellKind::from_u8(take(&mut b, 1)?[0])?;
        if row.len == row.cells.len() {
            row.cells.push(RawCell {
                col,
                kind,
                text: String::new(),
                num: 0.0,
            });
        }
        let slot = &mut row.cells[row.len];
        slot.col = col;
        slot.kind = kind;
        slot.text.clear();
        if kind.has_text() {
            let len = take_varint(&mut b)? as usize;
            if len > max_text {
                return Err(bad("oversized cell"));
            }
            let at = cells.len() - b.len();
            let text = take(&mut b, len)?;
            let text = match checked {
                Some(all) => all.get(at..at + len),
                None => std::str::from_utf8(text).ok(),
            };
            slot.text
                .push_str(text.ok_or_else(|| bad("cell not UTF-8"))?);
            slot.num = 0.0;
        } else {
            let mut n = [0u8; 8];
            n.copy_from_slice(take(&mut b, 8)?);
            slot.num = f64::from_le_bytes(n);
        }
        row.len += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `row` as the worker does.
    fn encode(w: &mut RowWriter, row: &RawRow) {
        w.begin(row.index);
        for c in row.cells() {
            if c.kind.has_text() {
                w.text(c.col, c.kind, &c.text);
            } else {
                w.num(c.col, c.kind, c.num);
            }
        }
    }

    #[test]
    fn rows_round_trip() {
        let mut row = RawRow::default();
        row.clear(7);
        row.push(0, CellKind::Text, "ada@example.com", 0.0);
        row.push(3, CellKind::Float, "", 12.5);
        row.push(4, CellKind::Text, "", 0.0);
        row.push(300, CellKind::Date, "", 45000.25);
        let mut second = RawRow::default();
        second.clear(200_000);
        second.push(1, CellKind::Error, "#N/A", 0.0);
        let mut buf = Vec::new();
        write_json_frame(&mut buf, FRAME_INFO, "{\"a\":1}").unwrap();
        let mut w = RowWriter::new();
        encode(&mut w, &row);
        w.end(&mut buf).unwrap();
        encode(&mut w, &second);
        w.finish(&mut buf).unwrap();
        buf.push(FRAME_END);
        write_varint(&mut buf, 1234).unwrap();
        let mut r = io::BufReader::new(&buf[..]);
        let mut out = RawRow::default();
        assert_eq!(
            read_frame(&mut r, &mut out, 100, 1000).unwrap(),
            Frame::Json(FRAME_INFO, "{\"a\":1}".into())
        );
        assert_eq!(read_frame(&mut r, &mut out, 100, 1000).unwrap(), Frame::Row);
        assert_eq!(out.index, 7);
        assert_eq!(out.cells(), row.cells());
        assert_eq!(out.get(300).unwrap().num, 45000.25);
        assert_eq!(read_frame(&mut r, &mut out, 100, 1000).unwrap(), Frame::Row);
        assert_eq!(out.index, 200_000);
        assert_eq!(out.cells(), second.cells());
        assert_eq!(
            read_frame(&mut r, &mut out, 100, 1000).unwrap(),
            Frame::End(1234)
        );
        assert!(read_frame(&mut r, &mut out, 100, 1000).is_err());

        // Rows cut by the reader's buffer (any capacity) decode the same.
        for cap in 1..48 {
            let mut r = io::BufReader::with_capacity(cap, &buf[..]);
            let mut out = RawRow::default();
            read_frame(&mut r, &mut out, 100, 1000).unwrap();
            assert_eq!(read_frame(&mut r, &mut out, 100, 1000).unwrap(), Frame::Row);
            assert_eq!(out.cells(), row.cells(), "capacity {cap}");
            assert_eq!(read_frame(&mut r, &mut out, 100, 1000).unwrap(), Frame::Row);
            assert_eq!(out.cells(), second.cells(), "capacity {cap}");
        }
    }

    #[test]
    fn rows_are_written_in_chunks() {
        let mut w = RowWriter::new();
        let mut pipe = Vec::new();
        let mut rows = 0u32;
        // The first row goes alone, then chunks grow to `CHUNK`.
        let mut writes = Vec::new();
        while writes.last().is_none_or(|&n| n < CHUNK) {
            let before = pipe.len();
            w.begin(rows);
            w.text(0, CellKind::Text, "a text of some length");
            w.end(&mut pipe).unwrap();
            rows += 1;
            if pipe.len() > before {
                writes.push(pipe.len() - before);
            }
            assert!(rows < 100_000, "chunks do not grow to CHUNK: {writes:?}");
        }
        assert_eq!(writes[0], 1 + 4 + 1 + 1 + 1 + 1 + 21, "the first row alone");
        assert!(writes[1] >= FIRST_CHUNK && writes[1] < 2 * FIRST_CHUNK);
        assert!(writes[2] >= 4 * FIRST_CHUNK && writes[2] < 8 * FIRST_CHUNK);
        assert!(writes[3] >= CHUNK && writes[3] < CHUNK + 100);
        // Once full size, chunks stay so.
        let before = pipe.len();
        while pipe.len() == before {
            w.begin(rows);
            w.text(0, CellKind::Text, "a text of some length");
            w.end(&mut pipe).unwrap();
            rows += 1;
        }
        assert!(
            pipe.len() - before >= CHUNK,
            "written before a chunk was full"
        );
        w.begin(rows);
        w.num(2, CellKind::Int, 5.0);
        w.end(&mut pipe).unwrap();
        // A row left open when the worker stops on a problem is dropped; those before it
        // are written.
        w.begin(rows + 1);
        w.text(0, CellKind::Text, "cut");
        w.flush_complete(&mut pipe).unwrap();
        w.finish(&mut pipe).unwrap();
        let mut r = io::BufReader::with_capacity(1000, &pipe[..]);
        let mut out = RawRow::default();
        for i in 0..rows {
            assert_eq!(read_frame(&mut r, &mut out, 100, 1000).unwrap(), Frame::Row);
            assert_eq!(out.index, i);
            assert_eq!(out.cells()[0].text, "a text of some length");
        }
        assert_eq!(read_frame(&mut r, &mut out, 100, 1000).unwrap(), Frame::Row);
        assert_eq!((out.index, out.cells()[0].num), (rows, 5.0));
        assert!(read_frame(&mut r, &mut out, 100, 1000).is_err());
    }

    /// Texts are checked as UTF-8 a row at a time when the row's cell bytes allow it and
    /// text by text otherwise; either way every text arrives whole, and a text that is not
    /// UTF-8, or that ends inside a character, is an error.
    #[test]
    fn texts_are_checked_as_utf8_by_row_or_by_text() {
        let decode = |bytes: &[u8]| {
            let mut r = io::BufReader::new(bytes);
            let mut out = RawRow::default();
            read_frame(&mut r, &mut out, 1000, 1000).map(|f| {
                assert_eq!(f, Frame::Row);
                out.cells()
                    .iter()
                    .map(|c| (c.col, c.text.clone(), c.num))
                    .collect::<Vec<_>>()
            })
        };
        // Texts only (one check for the row), then with a number whose bytes are not UTF-8
        // (-1.5: ... F8 BF) and a text of 200 bytes (its length is two bytes): text by text.
        let mut only_texts = RawRow::default();
        only_texts.clear(300);
        only_texts.push(0, CellKind::Text, "Zoë", 0.0);
        only_texts.push(2, CellKind::Text, "日本語", 0.0);
        let mut mixed = RawRow::default();
        mixed.clear(301);
        mixed.push(0, CellKind::Text, "Zoë", 0.0);
        mixed.push(1, CellKind::Float, "", -1.5);
        mixed.push(2, CellKind::Text, &"é".repeat(100), 0.0);
        for row in [&only_texts, &mixed] {
            let mut w = RowWriter::new();
            let mut bytes = Vec::new();
            encode(&mut w, row);
            w.finish(&mut bytes).unwrap();
            let expected: Vec<_> = row
                .cells()
                .iter()
                .map(|c| (c.col, c.text.clone(), c.num))
                .collect();
            assert_eq!(decode(&bytes).unwrap(), expected);
        }
        // Hand-made frames: row 1, column 0, Text, then the text's length and bytes.
        let frame = |text_len: u8, rest: &[u8]| {
            let mut body = vec![1u8, 0, CellKind::Text as u8, text_len];
            body.extend_from_slice(rest);
            let mut f = vec![FRAME_ROW];
            f.extend_from_slice(&(body.len() as u32).to_le_bytes());
            f.extend_from_slice(&body);
            f
        };
        // "é" is C3 A9: a length of 1 ends the text inside it, although the row's bytes
        // as a whole are UTF-8 ("é" then nothing).
        assert!(decode(&frame(2, "é".as_bytes())).is_ok());
        assert!(decode(&frame(1, &[0xC3, 0xA9, 0, 1, 0])).is_err());
        // Not UTF-8 at all.
        assert!(decode(&frame(2, &[0xFF, 0x41])).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut one = RawRow::default();
        one.clear(1);
        one.push(0, CellKind::Text, "ab", 0.0);
        let mut w = RowWriter::new();
        let mut good = Vec::new();
        encode(&mut w, &one);
        w.finish(&mut good).unwrap();
        // A text that is not UTF-8, on the buffered path and the cut one.
        let mut not_utf8 = good.clone();
        let at = not_utf8.len() - 2;
        not_utf8[at] = 0xff;
        // The frame claims more bytes than follow; fewer than its cells need; more than allowed.
        let mut long = good.clone();
        long[1] += 1;
        let mut short = good.clone();
        short[1] -= 1;
        let mut huge = good.clone();
        huge[1..5].copy_from_slice(&2000u32.to_le_bytes());
        // A text longer than allowed.
        let mut w = RowWriter::new();
        let mut too_long = Vec::new();
        w.begin(1);
        w.text(0, CellKind::Text, &"x".repeat(101));
        w.finish(&mut too_long).unwrap();
        for cap in [1, 3, 64] {
            for junk in [
                &not_utf8[..],
                &long[..],
                &short[..],
                &huge[..],
                &too_long[..],
                b"R\x05\x00\x00\x00\xff\xff\xff\xff\xff",
                b"R\x03\x00\x00\x00\x01\x00\x09",
                b"R\x0c\x00\x00\x00\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                b"Q",
                b"",
            ] {
                let mut r = io::BufReader::with_capacity(cap, junk);
                let mut out = RawRow::default();
                assert!(read_frame(&mut r, &mut out, 100, 1000).is_err(), "{junk:?}");
            }
        }
    }
}
