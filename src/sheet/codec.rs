//! The byte stream between the parsing worker process and its parent.
//!
//! Frames: `I` + JSON (workbook info, first), then `R` rows, then `N` + JSON notes (optional),
//! then `Z` + the worker's peak memory in KiB (end) or `X` + JSON (a fatal problem). Numbers are little-endian; lengths are LEB128 varints.
//! A row is its zero-based sheet index and its non-empty cells, each with its column index.
//! Decoding reuses the caller's buffers so a million rows cost no allocation per cell.

use std::io::{self, BufRead, Write};

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

pub fn write_varint(w: &mut impl Write, mut v: u64) -> io::Result<()> {
    let mut buf = [0u8; 10];
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[i] = byte;
            i += 1;
            break;
        }
        buf[i] = byte | 0x80;
        i += 1;
    }
    w.write_all(&buf[..i])
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

/// Writes one row.
pub fn write_row(w: &mut impl Write, row: &RawRow) -> io::Result<()> {
    w.write_all(&[FRAME_ROW])?;
    write_varint(w, u64::from(row.index))?;
    write_varint(w, row.len as u64)?;
    for c in row.cells() {
        write_varint(w, u64::from(c.col))?;
        w.write_all(&[c.kind as u8])?;
        match c.kind {
            CellKind::Text | CellKind::DateIso | CellKind::Error => {
                write_varint(w, c.text.len() as u64)?;
                w.write_all(c.text.as_bytes())?;
            }
            _ => w.write_all(&c.num.to_le_bytes())?,
        }
    }
    Ok(())
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

/// Reads the next frame; rows are decoded into `row`. Lengths are bounded by `max_text`.
pub fn read_frame(r: &mut impl BufRead, row: &mut RawRow, max_text: usize) -> io::Result<Frame> {
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
            let index = u32::try_from(read_varint(r)?).map_err(|_| bad("row index"))?;
            row.clear(index);
            let n = read_varint(r)? as usize;
            let mut scratch = Vec::new();
            for _ in 0..n {
                let col = u32::try_from(read_varint(r)?).map_err(|_| bad("column index"))?;
                let kind = CellKind::from_u8(read_u8(r)?)?;
                match kind {
                    CellKind::Text | CellKind::DateIso | CellKind::Error => {
                        let len = read_varint(r)? as usize;
                        if len > max_text {
                            return Err(bad("oversized cell"));
                        }
                        // Decode straight into the reused slot's buffer.
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
                        slot.num = 0.0;
                        slot.text.clear();
                        if len == 0 {
                            // An empty text: nothing to read (and no wait for more bytes).
                        } else if let Some(text) = r.fill_buf()?.get(..len) {
                            // The usual case: the text is in the reader's buffer already.
                            slot.text.push_str(
                                std::str::from_utf8(text).map_err(|_| bad("cell not UTF-8"))?,
                            );
                            r.consume(len);
                        } else {
                            scratch.clear();
                            scratch.resize(len, 0);
                            r.read_exact(&mut scratch)?;
                            slot.text.push_str(
                                std::str::from_utf8(&scratch).map_err(|_| bad("cell not UTF-8"))?,
                            );
                        }
                        row.len += 1;
                    }
                    _ => {
                        let mut b = [0u8; 8];
                        r.read_exact(&mut b)?;
                        row.push(col, kind, "", f64::from_le_bytes(b));
                    }
                }
            }
            Ok(Frame::Row)
        }
        _ => Err(bad("unknown frame")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        let mut row = RawRow::default();
        row.clear(7);
        row.push(0, CellKind::Text, "ada@example.com", 0.0);
        row.push(3, CellKind::Float, "", 12.5);
        row.push(300, CellKind::Date, "", 45000.25);
        let mut buf = Vec::new();
        write_json_frame(&mut buf, FRAME_INFO, "{\"a\":1}").unwrap();
        write_row(&mut buf, &row).unwrap();
        buf.push(FRAME_END);
        write_varint(&mut buf, 1234).unwrap();
        let mut r = io::BufReader::new(&buf[..]);
        let mut out = RawRow::default();
        assert_eq!(
            read_frame(&mut r, &mut out, 100).unwrap(),
            Frame::Json(FRAME_INFO, "{\"a\":1}".into())
        );
        assert_eq!(read_frame(&mut r, &mut out, 100).unwrap(), Frame::Row);
        assert_eq!(out.index, 7);
        assert_eq!(out.cells(), row.cells());
        assert_eq!(out.get(300).unwrap().num, 45000.25);
        assert_eq!(read_frame(&mut r, &mut out, 100).unwrap(), Frame::End(1234));
        assert!(read_frame(&mut r, &mut out, 100).is_err());

        // Texts cut by the reader's buffer (any capacity) decode the same; a text that is not
        // UTF-8 is refused on either path.
        for cap in 1..24 {
            let mut r = io::BufReader::with_capacity(cap, &buf[..]);
            let mut out = RawRow::default();
            read_frame(&mut r, &mut out, 100).unwrap();
            assert_eq!(read_frame(&mut r, &mut out, 100).unwrap(), Frame::Row);
            assert_eq!(out.cells(), row.cells(), "capacity {cap}");
        }
        let mut bad_row = Vec::new();
        let mut one = RawRow::default();
        one.clear(1);
        one.push(0, CellKind::Text, "ab", 0.0);
        write_row(&mut bad_row, &one).unwrap();
        let at = bad_row.len() - 2;
        bad_row[at] = 0xff;
        for cap in [1, 64] {
            let mut r = io::BufReader::with_capacity(cap, &bad_row[..]);
            assert!(read_frame(&mut r, &mut RawRow::default(), 100).is_err());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for junk in [
            &b"R\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
            b"Q",
            b"R\x01\x01\x00\x09",
        ] {
            let mut r = io::BufReader::new(junk);
            let mut out = RawRow::default();
            assert!(read_frame(&mut r, &mut out, 100).is_err());
        }
    }
}
