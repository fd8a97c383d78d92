//! The worker's own reader of an .xlsx workbook's data: its sheets, number formats, shared
//! strings and the cells of a sheet. The SpreadsheetML that spreadsheet programs write is
//! found with a scanner (`Xml`) built for it, which takes 0.44x the instructions of
//! calamine's reader on the bench file (docs/BENCHMARKS.md, seventh session of
//! 2026-12-03; 0.33x since the tenth): the usual shapes of a cell and of a string are
//! taken in one pass or a few byte searches (`Xml::take_cell_tag`, `Xml::take_simple`),
//! anything else token by token.
//!
//! It gives the values calamine gives, cell for cell; the tests read handmade workbooks
//! (with what XML and SpreadsheetML allow), generated ones and our templates both ways and
//! compare. One known difference: a CDATA section in a cell's `<v>` (which no spreadsheet
//! program writes) is read as its text, where calamine reads nothing.
//!
//! The worker opens a workbook with it first (`Book::open`); anything this reader cannot
//! follow before the first row (a part it does not find, a structure it does not expect)
//! sends the file to calamine instead, so an unusual workbook costs speed, never a refusal.
//! Once rows flow, a problem in the sheet is the file's: it is reported, naming what is
//! wrong, as calamine's would be.
//!
//! The shared strings are read as the cells first need them (`Strings`; programs write
//! them in the order of first use), from a reader of the table's part of its own beside the
//! sheet's (`Unzipped::part_reader`), so the first row does not wait for the whole table;
//! after the last cell the rest of the table is read to its end (`Cells::finish`), so a
//! damaged table is refused as before.
//!
//! The scanner holds one token at a time in a window of the part (`MAX_TOKEN` at most), so
//! memory stays flat whatever the part's size; the parts come through `Unzipped`, with its
//! limits. It reads no DTD and expands no entity but XML's five and character references.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::ops::Range;

use super::unzip::{PartReader, Unzipped};
use super::worker::{SheetInfo, Value};

/// The most bytes one token (a tag, a text, a comment) may take.
const MAX_TOKEN: usize = 32 << 20;
/// Bytes asked of the part at a time (more when a token is longer).
const CHUNK: usize = 64 << 10;

/// What went wrong reading a part, in words for the administrator.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct XmlError(pub String);

impl std::fmt::Display for XmlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(what: impl Into<String>) -> Result<T, XmlError> {
    Err(XmlError(what.into()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Tok {
    /// `<name …>`; `Empty` is `<name …/>`.
    Start,
    Empty,
    End,
    /// Character data (`Xml::text_into` decodes it); `cdata` tells a CDATA section.
    Text,
    Eof,
}

/// A pull scanner over one XML part. After `next`, `local`, `attr` and `text_into` refer to
/// the token just returned.
pub(super) struct Xml<R: Read> {
    src: R,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
    name: Range<usize>,
    attrs: Range<usize>,
    text: Range<usize>,
    cdata: bool,
}

impl<R: Read> Xml<R> {
    pub(super) fn new(src: R) -> Self {
        Xml {
            src,
            buf: Vec::with_capacity(CHUNK * 2),
            pos: 0,
            done: false,
            name: 0..0,
            attrs: 0..0,
            text: 0..0,
            cdata: false,
        }
    }

    /// Moves the unread bytes to the front and reads more; false at the end of the part.
    fn more(&mut self) -> Result<bool, XmlError> {
        if self.done {
            return Ok(false);
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        if self.buf.len() > MAX_TOKEN {
            return err(format!(
                "a single tag or text is longer than {} MiB",
                MAX_TOKEN >> 20
            ));
        }
        let want = CHUNK.max(self.buf.len());
        let start = self.buf.len();
        self.buf.resize(start + want, 0);
        let mut got = 0;
        while got < want {
            match self.src.read(&mut self.buf[start + got..]) {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(start + got);
                    return err(e.to_string());
                }
            }
        }
        self.buf.truncate(start + got);
        Ok(got > 0)
    }

    /// The next token.
    pub(super) fn next(&mut self) -> Result<Tok, XmlError> {
        loop {
            let rest = &self.buf[self.pos..];
            if rest.is_empty() {
                if self.more()? {
                    continue;
                }
                return Ok(Tok::Eof);
            }
            if rest[0] != b'<' {
                match memchr::memchr(b'<', rest) {
                    Some(i) => {
                        self.text = self.pos..self.pos + i;
                        self.pos += i;
                    }
                    None if self.more()? => continue,
                    None => {
                        self.text = self.pos..self.buf.len();
                        self.pos = self.buf.len();
                    }
                }
                self.cdata = false;
                return Ok(Tok::Text);
            }
            // Markup: make sure its opening is all here.
            if rest.len() < 9 && !self.done {
                self.more()?;
                continue;
            }
            let rest = &self.buf[self.pos..];
            if matches!(rest.get(1), Some(b'!' | b'?')) {
                let skip = if rest.starts_with(b"<!--") {
                    Some((4, &b"-->"[..]))
                } else if rest.starts_with(b"<?") {
                    Some((2, &b"?>"[..]))
                } else {
                    None
                };
                if let Some((open, close)) = skip {
                    match memchr::memmem::find(&rest[open..], close) {
                        Some(i) => {
                            self.pos += open + i + close.len();
                            continue;
                        }
                        None if self.more()? => continue,
                        None => return err("a comment or instruction is not closed"),
                    }
                }
                if rest.starts_with(b"<![CDATA[") {
                    match memchr::memmem::find(&rest[9..], b"]]>") {
                        Some(i) => {
                            self.text = self.pos + 9..self.pos + 9 + i;
                            self.pos += 9 + i + 3;
                            self.cdata = true;
                            return Ok(Tok::Text);
                        }
                        None if self.more()? => continue,
                        None => return err("a CDATA section is not closed"),
                    }
                }
                return err(
                    "the part declares a document type (DTD), which no spreadsheet holds; entities are never expanded",
                );
            }
            // A tag: its end is the first '>' outside a quoted attribute value.
            let Some(gt) = tag_end(rest) else {
                if self.more()? {
                    continue;
                }
                return err("a tag is not closed");
            };
            let start = self.pos;
            self.pos += gt + 1;
            if rest.get(1) == Some(&b'/') {
                let name = trim(start + 2, start + gt, &self.buf);
                self.name = name;
                return Ok(Tok::End);
            }
            let mut inner_end = start + gt;
            let empty = self.buf[start + 1..inner_end].ends_with(b"/");
            if empty {
                inner_end -= 1;
            }
            let name_end = self.buf[start + 1..inner_end]
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .map_or(inner_end, |i| start + 1 + i);
            if name_end == start + 1 {
                return err("a tag has no name");
            }
            self.name = start + 1..name_end;
            self.attrs = name_end..inner_end;
            return Ok(if empty { Tok::Empty } else { Tok::Start });
        }
    }

    /// The tag's name without its namespace prefix.
    pub(super) fn local(&self) -> &[u8] {
        local(&self.buf[self.name.clone()])
    }

    /// The tag's full name, prefix included.
    fn qname(&self) -> &[u8] {
        &self.buf[self.name.clone()]
    }

    /// The raw value of the start tag's attribute `key` (full name), if present.
    pub(super) fn attr(&self, key: &[u8]) -> Result<Option<&[u8]>, XmlError> {
        let mut it = Attrs {
            s: &self.buf[self.attrs.clone()],
        };
        while let Some((k, v)) = it.next_attr()? {
            if k == key {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The raw values of the attributes `keys` (full names), in one pass.
    fn attrs<const N: usize>(&self, keys: [&[u8]; N]) -> Result<[Option<&[u8]>; N], XmlError> {
        let mut found = [None; N];
        let mut it = Attrs {
            s: &self.buf[self.attrs.clone()],
        };
        while let Some((k, v)) = it.next_attr()? {
            if let Some(i) = keys.iter().position(|want| *want == k) {
                found[i] = Some(v);
            }
        }
        Ok(found)
    }

    /// The value of attribute `key` as text, entities decoded.
    fn attr_text(&self, key: &[u8]) -> Result<Option<String>, XmlError> {
        match self.attr(key)? {
            None => Ok(None),
            Some(raw) => {
                let mut s = String::new();
                decode_into(raw, &mut s, true)?;
                Ok(Some(s))
            }
        }
    }

    /// Appends the text token to `out`: line ends normalised as XML 1.0 has them, and (out
    /// of a CDATA section) entities decoded.
    pub(super) fn text_into(&self, out: &mut String) -> Result<(), XmlError> {
        decode_into(&self.buf[self.text.clone()], out, !self.cdata)
    }

    /// When the window holds, at the scanner's position, `open`, then a text without markup,
    /// then `close` (a cell's usual `<v>12</v></c>`, a string's `<si><t>Ann</t></si>`):
    /// consumes all of it and gives the text's place for `decode`. The same as reading its
    /// tokens one by one, in a few byte searches: this is the hot path of a sheet. `None`
    /// (anything else, or the bytes not all in the window yet) leaves the position as it was.
    fn take_simple(&mut self, open: &[u8], close: &[u8]) -> Option<Range<usize>> {
        let rest = &self.buf[self.pos..];
        if !rest.starts_with(open) {
            return None;
        }
        let lt = open.len() + memchr::memchr(b'<', &rest[open.len()..])?;
        if !rest[lt..].starts_with(close) {
            return None;
        }
        let text = self.pos + open.len()..self.pos + lt;
        self.pos += lt + close.len();
        Some(text)
    }

    /// When the window holds, at the scanner's position, a cell's start tag of the usual
    /// shape (`<c`, then any of ` r="…"`, ` s="…"`, ` t="…"` in that order with one space
    /// before each, then `>` or `/>`): consumes it and gives the places of the three values
    /// and whether the tag is empty. The same as `next` and `attrs` would give, in one pass
    /// over the tag's bytes: the hot path of a sheet, with `take_simple` for the value. `None`
    /// (anything else: other attributes, spacing or quotes, a long value, or the bytes not
    /// all in the window yet) leaves the position as it was.
    fn take_cell_tag(&mut self) -> Option<([Option<Range<usize>>; 3], bool)> {
        let base = self.pos;
        let rest = &self.buf[base..];
        if !rest.starts_with(b"<c") {
            return None;
        }
        let mut i = 2;
        let mut values: [Option<Range<usize>>; 3] = [None, None, None];
        for (slot, key) in values.iter_mut().zip([b'r', b's', b't']) {
            if rest.get(i..i + 4) == Some(&[b' ', key, b'=', b'"'][..]) {
                let start = i + 4;
                // The three are a few bytes long; a longer one is left to the tokens.
                let tail = rest.get(start..)?;
                let len = tail.iter().take(32).position(|&b| b == b'"')?;
                *slot = Some(base + start..base + start + len);
                i = start + len + 1;
            }
        }
        let empty = match rest.get(i)? {
            b'>' => false,
            b'/' if rest.get(i + 1) == Some(&b'>') => {
                i += 1;
                true
            }
            _ => return None,
        };
        self.pos = base + i + 1;
        Some((values, empty))
    }

    /// Appends the text `take_simple` found, as `text_into` does a text token's.
    fn decode(&self, text: Range<usize>, out: &mut String) -> Result<(), XmlError> {
        decode_into(&self.buf[text], out, true)
    }

    /// Skips to the end tag of the element just started (nothing for an empty one).
    fn skip(&mut self, tok: Tok) -> Result<(), XmlError> {
        if tok != Tok::Start {
            return Ok(());
        }
        let mut depth = 1u32;
        loop {
            match self.next()? {
                Tok::Start => depth += 1,
                Tok::End => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                Tok::Eof => return err("the part ends inside an element"),
                _ => {}
            }
        }
    }
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|b| *b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn trim(mut a: usize, mut b: usize, buf: &[u8]) -> Range<usize> {
    while a < b && buf[a].is_ascii_whitespace() {
        a += 1;
    }
    while b > a && buf[b - 1].is_ascii_whitespace() {
        b -= 1;
    }
    a..b
}

/// The offset of the '>' that ends the tag at the start of `s`, quotes respected.
fn tag_end(s: &[u8]) -> Option<usize> {
    let mut quote = 0u8;
    for (i, &b) in s.iter().enumerate().skip(1) {
        if quote != 0 {
            if b == quote {
                quote = 0;
            }
        } else if b == b'>' {
            return Some(i);
        } else if b == b'"' || b == b'\'' {
            quote = b;
        }
    }
    None
}

/// An attribute's full name and raw value.
type Attr<'a> = (&'a [u8], &'a [u8]);

struct Attrs<'a> {
    s: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// The next attribute's full name and raw value. A plain byte loop: attributes are a
    /// few bytes long, shorter than a vectorised search pays for.
    fn next_attr(&mut self) -> Result<Option<Attr<'a>>, XmlError> {
        let s = self.s;
        let mut i = 0;
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == s.len() {
            self.s = &s[i..];
            return Ok(None);
        }
        let key_start = i;
        while i < s.len() && s[i] != b'=' && !s[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == s.len() || s[i] != b'=' {
            return err("an attribute has no value");
        }
        i += 1;
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        let Some(&q) = s.get(i).filter(|q| **q == b'"' || **q == b'\'') else {
            return err("an attribute value is not quoted");
        };
        let value_start = i + 1;
        let mut j = value_start;
        while j < s.len() && s[j] != q {
            j += 1;
        }
        if j == s.len() {
            return err("an attribute value is not closed");
        }
        if key.is_empty() {
            return err("an attribute has no name");
        }
        self.s = &s[j + 1..];
        Ok(Some((key, &s[value_start..j])))
    }
}

/// Appends `raw` to `out`: UTF-8 checked; with `markup`, entities decoded and line ends
/// normalised (CR LF and a lone CR become LF), as an XML reader does for text.
fn decode_into(raw: &[u8], out: &mut String, markup: bool) -> Result<(), XmlError> {
    let Ok(s) = std::str::from_utf8(raw) else {
        return err("a text is not valid UTF-8");
    };
    // Most texts have nothing to decode: one vectorised search says so.
    if memchr::memchr2(b'&', b'\r', raw).is_none() {
        out.push_str(s);
        return Ok(());
    }
    if !markup {
        return push_lines(s, out);
    }
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        push_lines(&rest[..amp], out)?;
        let after = &rest[amp + 1..];
        let Some(semi) = after.find(';').filter(|i| *i <= 10) else {
            let shown: String = after.chars().take(10).collect();
            return err(format!("an '&' that starts no entity (&{shown})"));
        };
        let name = &after[..semi];
        match name {
            "lt" => out.push('<'),
            "gt" => out.push('>'),
            "amp" => out.push('&'),
            "quot" => out.push('"'),
            "apos" => out.push('\''),
            _ => {
                let code = if let Some(h) = name.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = name.strip_prefix('#') {
                    d.parse::<u32>().ok()
                } else {
                    None
                };
                match code.filter(|c| *c != 0).and_then(char::from_u32) {
                    Some(c) => out.push(c),
                    None => return err(format!("unrecognized entity `&{name};`")),
                }
            }
        }
        rest = &after[semi + 1..];
    }
    push_lines(rest, out)
}

fn push_lines(s: &str, out: &mut String) -> Result<(), XmlError> {
    if memchr::memchr(b'\r', s.as_bytes()).is_none() {
        out.push_str(s);
        return Ok(());
    }
    let mut rest = s;
    while let Some(i) = rest.find('\r') {
        out.push_str(&rest[..i]);
        out.push('\n');
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('\n') {
            rest = r;
        }
    }
    out.push_str(rest);
    Ok(())
}

/// Excel's escapes of characters XML cannot hold: `_xHHHH_` is the UTF-16 code unit HHHH
/// (a pair of them one character beyond the BMP; a lone surrogate becomes U+FFFD).
fn unescape_ooxml(s: &str) -> std::borrow::Cow<'_, str> {
    // Most strings have no underscore at all: one vectorised search says so.
    let b = s.as_bytes();
    if !memchr::memchr_iter(b'_', b).any(|i| b.get(i + 1) == Some(&b'x')) {
        return s.into();
    }
    let unit = |t: &str| -> Option<u16> {
        let b = t.as_bytes();
        if b.len() >= 7 && b[0] == b'_' && b[1] == b'x' && b[6] == b'_' {
            u16::from_str_radix(&t[2..6], 16).ok()
        } else {
            None
        }
    };
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while let Some(j) = s[i..].find("_x") {
        let at = i + j;
        let Some(u) = unit(&s[at..]) else {
            i = at + 1;
            continue;
        };
        out.push_str(&s[copied..at]);
        let mut next = at + 7;
        match u {
            0xD800..=0xDBFF => match unit(&s[next..]) {
                Some(low @ 0xDC00..=0xDFFF) => {
                    let c = 0x10000 + ((u32::from(u) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                    out.push(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                    next += 7;
                }
                _ => out.push(char::REPLACEMENT_CHARACTER),
            },
            0xDC00..=0xDFFF => out.push(char::REPLACEMENT_CHARACTER),
            _ => out.push(char::from_u32(u32::from(u)).unwrap_or(char::REPLACEMENT_CHARACTER)),
        }
        i = next;
        copied = next;
    }
    out.push_str(&s[copied..]);
    out.into()
}

/// What XML counts as white space: what a string's text is trimmed of without
/// `xml:space="preserve"`.
const XML_SPACE: [char; 4] = [' ', '\t', '\r', '\n'];

/// `s` without XML white space at either end (most strings have none: two byte tests).
fn trim_xml_space(s: &str) -> &str {
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let b = s.as_bytes();
    if b.first().is_some_and(space) || b.last().is_some_and(space) {
        s.trim_matches(XML_SPACE)
    } else {
        s
    }
}

/// Reads a string item (`<si>`, `<is>`) whose start tag was just read, up to its end tag
/// `closing`: its text, or the text of its runs, without phonetic guides; surrounding
/// spaces dropped unless `xml:space="preserve"`, Excel's escapes undone.
fn read_string<R: Read>(
    xml: &mut Xml<R>,
    closing: &[u8],
    out: &mut String,
    scratch: &mut String,
) -> Result<(), XmlError> {
    out.clear();
    let mut phonetic = false;
    loop {
        let tok = xml.next()?;
        match tok {
            Tok::End if xml.qname() == closing => return Ok(()),
            Tok::End if xml.local() == b"rPh" => phonetic = false,
            Tok::Start if xml.local() == b"rPh" => phonetic = true,
            Tok::Start | Tok::Empty if xml.local() == b"t" && !phonetic => {
                let preserve = xml.attr(b"xml:space")? == Some(b"preserve");
                scratch.clear();
                if tok == Tok::Start {
                    let name = xml.qname().to_vec();
                    loop {
                        match xml.next()? {
                            Tok::Text => xml.text_into(scratch)?,
                            Tok::End if xml.qname() == name.as_slice() => break,
                            Tok::Eof => return err("the part ends inside a text"),
                            _ => {}
                        }
                    }
                }
                let kept = if preserve {
                    scratch.as_str()
                } else {
                    trim_xml_space(scratch)
                };
                out.push_str(&unescape_ooxml(kept));
            }
            Tok::Eof => return err("the part ends inside a string"),
            _ => {}
        }
    }
}

/// Whether a number format shows a date or a time: the built-in ones by number, a custom
/// one by its codes (the first section only; quoted, escaped and bracketed text aside; an
/// elapsed-time `[h]` counts too).
fn is_date_format(code: &str) -> bool {
    let mut escaped = false;
    let mut quoted = false;
    let mut brackets = 0u8;
    let mut prev = ' ';
    let mut elapsed = false;
    let mut am_pm = false;
    for c in code.chars() {
        if escaped {
            escaped = false;
        } else if quoted {
            quoted = c != '"';
        } else {
            match c {
                '_' | '\\' | '*' => escaped = true,
                '"' => quoted = true,
                ';' => return false,
                '[' => brackets += 1,
                ']' if brackets == 1 && elapsed => return true,
                ']' => brackets = brackets.saturating_sub(1),
                'a' | 'A' if !am_pm && brackets == 0 => am_pm = true,
                'p' | 'm' | '/' | 'P' | 'M' if am_pm && brackets == 0 => return true,
                'd' | 'm' | 'h' | 'y' | 's' | 'D' | 'M' | 'H' | 'Y' | 'S'
                    if !am_pm && brackets == 0 =>
                {
                    return true;
                }
                _ => {
                    if !(elapsed && c.eq_ignore_ascii_case(&prev)) {
                        elapsed = prev == '[' && matches!(c, 'm' | 'h' | 's' | 'M' | 'H' | 'S');
                    }
                }
            }
        }
        prev = c;
    }
    false
}

fn is_builtin_date(id: &[u8]) -> bool {
    matches!(
        id,
        b"14"
            | b"15"
            | b"16"
            | b"17"
            | b"18"
            | b"19"
            | b"20"
            | b"21"
            | b"22"
            | b"27"
            | b"28"
            | b"29"
            | b"30"
            | b"31"
            | b"32"
            | b"33"
            | b"34"
            | b"35"
            | b"36"
            | b"45"
            | b"46"
            | b"47"
            | b"50"
            | b"51"
            | b"52"
            | b"53"
            | b"54"
            | b"55"
            | b"56"
            | b"57"
            | b"58"
    )
}

/// An unsigned number in ASCII digits (no sign, no space), as the attributes hold them.
fn number(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 18 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0')))
}

/// A cell reference (`B7`, column letters and row digits, any case) as 0-based (row,
/// column); `None` when it is not one or exceeds what a u32 counts.
fn cell_ref(s: &[u8]) -> Option<(u32, Option<u32>)> {
    let mut i = 0;
    let mut col: u64 = 0;
    while i < s.len() && s[i].is_ascii_alphabetic() {
        col = col * 26 + u64::from(s[i].to_ascii_uppercase() - b'A') + 1;
        if col > u64::from(u32::MAX) {
            return None;
        }
        i += 1;
    }
    let letters = i;
    let mut row: u64 = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        row = row * 10 + u64::from(s[i] - b'0');
        if row > u64::from(u32::MAX) {
            return None;
        }
        i += 1;
    }
    if i != s.len() || i == letters {
        return None;
    }
    let row = u32::try_from(row.checked_sub(1)?).ok()?;
    let col = if letters == 0 {
        None
    } else {
        Some(u32::try_from(col - 1).ok()?)
    };
    Some((row, col))
}

fn ref_error(s: &[u8]) -> XmlError {
    let shown = String::from_utf8_lossy(&s[..s.len().min(40)]).into_owned();
    let letters = s.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    let digits = s.len() - letters;
    let well_formed = digits > 0 && s[letters..].iter().all(u8::is_ascii_digit);
    XmlError(if well_formed && s[letters..].iter().any(|d| *d != b'0') {
        format!("`{shown}` is a cell reference beyond any sheet")
    } else {
        format!("`{shown}` is not a cell reference")
    })
}

/// A workbook as far as the worker needs it: its sheets, where they are, how numbers are
/// shown, and the shared strings.
pub(super) struct Book {
    zip: zip::ZipArchive<Unzipped>,
    pub(super) sheets: Vec<SheetInfo>,
    paths: Vec<String>,
    pub(super) is_1904: bool,
    /// For each cell style: whether it shows numbers as dates or times.
    dates: Vec<bool>,
    strings: Strings,
}

/// The shared-string table, read as far as the cells have needed it so far: programs write
/// it in the order the strings are first used, so the first row does not wait for the
/// whole table (a cell that refers further ahead reads on to its string).
pub(super) struct Strings {
    /// The strings read so far, one after the other (one buffer: a table of millions of
    /// strings costs no allocation, nor an allocator's header, per string).
    text: String,
    /// Where each string ends in `text` (it starts where the one before it ends).
    ends: Vec<usize>,
    /// The table's part (`None`: there is none, or it was read to its end).
    xml: Option<Xml<PartReader>>,
    /// The table's closing tag was read: no more strings.
    read_all: bool,
    s: String,
    scratch: String,
}

impl Strings {
    /// Opens the table at `path` and reads up to its first string (`None` in the result's
    /// place: a workbook without one).
    fn open(unzipped: &Unzipped, path: &str) -> Result<Strings, NotOpened> {
        let mut strings = Strings {
            text: String::new(),
            ends: Vec::new(),
            xml: None,
            read_all: false,
            s: String::new(),
            scratch: String::new(),
        };
        let Some(reader) = unzipped.part_reader(path) else {
            return Ok(strings);
        };
        let mut xml = Xml::new(reader.map_err(|e| format!("{path}: {e}"))?);
        loop {
            match xml.next().map_err(|x| format!("{path}: {x}"))? {
                Tok::Start if xml.local() == b"sst" => break,
                Tok::Empty if xml.local() == b"sst" => return Ok(strings),
                Tok::Eof => return Err(format!("{path} has no string table")),
                _ => {}
            }
        }
        strings.xml = Some(xml);
        Ok(strings)
    }

    /// String `i`, reading on as far as it; `None` when the table has no such string.
    fn get(&mut self, i: usize) -> Result<Option<&str>, XmlError> {
        while self.ends.len() <= i && !self.read_all {
            let Some(xml) = self.xml.as_mut() else {
                break;
            };
            if let Some(text) = xml.take_simple(b"<si><t>", b"</t></si>") {
                self.scratch.clear();
                xml.decode(text, &mut self.scratch)?;
                let kept = trim_xml_space(&self.scratch);
                self.text.push_str(&unescape_ooxml(kept));
                self.ends.push(self.text.len());
                continue;
            }
            match xml.next()? {
                Tok::Start if xml.local() == b"si" => {
                    let closing = xml.qname().to_vec();
                    read_string(xml, &closing, &mut self.s, &mut self.scratch)?;
                    self.text.push_str(&self.s);
                    self.ends.push(self.text.len());
                }
                Tok::Empty if xml.local() == b"si" => self.ends.push(self.text.len()),
                Tok::End if xml.local() == b"sst" => self.read_all = true,
                Tok::Eof => return err("the string table ends early"),
                _ => {}
            }
        }
        Ok(self.string(i))
    }

    /// String `i` of those read so far.
    fn string(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = match i.checked_sub(1) {
            Some(before) => self.ends.get(before).copied().unwrap_or(0),
            None => 0,
        };
        self.text.get(start..end)
    }

    /// Reads what the cells did not need of the table, to the part's end: a damaged table
    /// is refused as a whole, as it is when it is read first, and its checksum is checked.
    fn finish(&mut self) -> Result<(), XmlError> {
        let Some(xml) = self.xml.as_mut() else {
            return Ok(());
        };
        loop {
            if !self.read_all
                && let Some(text) = xml.take_simple(b"<si><t>", b"</t></si>")
            {
                // Decoded only to be checked: no cell needs it.
                self.scratch.clear();
                xml.decode(text, &mut self.scratch)?;
                continue;
            }
            match xml.next()? {
                Tok::Start if !self.read_all && xml.local() == b"si" => {
                    let closing = xml.qname().to_vec();
                    read_string(xml, &closing, &mut self.s, &mut self.scratch)?;
                }
                Tok::End if xml.local() == b"sst" => self.read_all = true,
                Tok::Eof if !self.read_all => return err("the string table ends early"),
                Tok::Eof => break,
                _ => {}
            }
        }
        self.xml = None;
        Ok(())
    }
}

/// Why `open` handed the workbook to calamine (for tests; the worker only falls back).
pub(super) type NotOpened = String;

fn part<'z>(
    zip: &'z mut zip::ZipArchive<Unzipped>,
    path: &str,
) -> Result<Option<zip::read::ZipFile<'z, Unzipped>>, NotOpened> {
    let found = if zip.index_for_name(path).is_some() {
        Some(path.to_string())
    } else {
        let want = path.replace('\\', "/").to_lowercase();
        zip.file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.replace('\\', "/").to_lowercase() == want)
            .map(|n| n.into_owned())
    };
    match found {
        None => Ok(None),
        Some(n) => zip
            .by_name(&n)
            .map(Some)
            .map_err(|e| format!("{path}: {e}")),
    }
}

impl Book {
    /// Reads the workbook's structure, number formats and shared strings.
    pub(super) fn open(unzipped: Unzipped) -> Result<Book, NotOpened> {
        let strings = unzipped.clone();
        let mut zip = zip::ZipArchive::new(unzipped).map_err(|e| e.to_string())?;
        fn e(p: &str) -> impl Fn(XmlError) -> String + '_ {
            move |x| format!("{p}: {x}")
        }
        // Where the workbook is.
        let mut target = None;
        {
            let f = part(&mut zip, "_rels/.rels")?.ok_or("no _rels/.rels")?;
            let mut xml = Xml::new(f);
            loop {
                match xml.next().map_err(e("_rels/.rels"))? {
                    Tok::Start | Tok::Empty if xml.local() == b"Relationship" => {
                        let officedoc = xml
                            .attr(b"Type")
                            .map_err(e("_rels/.rels"))?
                            .is_some_and(|t| t.ends_with(b"/relationships/officeDocument"));
                        if officedoc {
                            target = xml.attr_text(b"Target").map_err(e("_rels/.rels"))?;
                        }
                    }
                    Tok::Eof => break,
                    _ => {}
                }
            }
        }
        let target = target.ok_or("no officeDocument relationship")?;
        let (dir, name) = match target.rfind('/') {
            Some(i) => target.split_at(i + 1),
            None => ("", target.as_str()),
        };
        let xl = dir.strip_prefix('/').unwrap_or(dir).to_string();
        let wb_name = if name.is_empty() {
            "workbook.xml"
        } else {
            name
        };

        let strings = Strings::open(&strings, &format!("{xl}sharedStrings.xml"))?;
        let dates = Self::read_styles(&mut zip, &format!("{xl}styles.xml"))?;

        // The workbook's relationships: id -> (target, type).
        let rels_path = format!("{xl}_rels/{wb_name}.rels");
        let mut rels: HashMap<Vec<u8>, (String, Vec<u8>)> = HashMap::new();
        {
            let f = part(&mut zip, &rels_path)?.ok_or_else(|| format!("no {rels_path}"))?;
            let mut xml = Xml::new(f);
            loop {
                match xml.next().map_err(e(&rels_path))? {
                    Tok::Start | Tok::Empty if xml.local() == b"Relationship" => {
                        if let Some(id) = xml.attr(b"Id").map_err(e(&rels_path))? {
                            let id = id.to_vec();
                            let typ = xml
                                .attr(b"Type")
                                .map_err(e(&rels_path))?
                                .unwrap_or_default()
                                .to_vec();
                            // calamine takes the target as written.
                            let t = xml.attr(b"Target").map_err(e(&rels_path))?;
                            let t = String::from_utf8(t.unwrap_or_default().to_vec())
                                .map_err(|_| "a target is not UTF-8".to_string())?;
                            rels.insert(id, (t, typ));
                        }
                    }
                    Tok::Eof => break,
                    _ => {}
                }
            }
        }

        let wb_path = format!("{xl}{wb_name}");
        let mut sheets = Vec::new();
        let mut paths = Vec::new();
        let mut is_1904 = false;
        {
            let f = part(&mut zip, &wb_path)?.ok_or_else(|| format!("no {wb_path}"))?;
            let mut xml = Xml::new(f);
            loop {
                match xml.next().map_err(e(&wb_path))? {
                    Tok::Start | Tok::Empty if xml.local() == b"sheet" => {
                        let name = xml
                            .attr_text(b"name")
                            .map_err(e(&wb_path))?
                            .unwrap_or_default();
                        let visible = match xml.attr(b"state").map_err(e(&wb_path))? {
                            None | Some(b"visible") => true,
                            Some(b"hidden" | b"veryHidden") => false,
                            Some(_) => return Err("a sheet state is not known".into()),
                        };
                        let mut id = None;
                        let mut it = Attrs {
                            s: &xml.buf[xml.attrs.clone()],
                        };
                        while let Some((k, v)) = it.next_attr().map_err(e(&wb_path))? {
                            if local(k) == b"id" {
                                id = Some(v);
                            }
                        }
                        let (t, typ) = rels
                            .get(id.unwrap_or_default())
                            .ok_or("a sheet has no relationship")?;
                        let path = match t.strip_prefix('/') {
                            Some(abs) => abs.to_string(),
                            None => format!("{xl}{t}"),
                        };
                        let kind = typ.rsplit(|b| *b == b'/').next().unwrap_or_default();
                        if !matches!(kind, b"worksheet" | b"chartsheet" | b"dialogsheet") {
                            return Err("a sheet of an unknown type".into());
                        }
                        sheets.push(SheetInfo { name, visible });
                        paths.push(path);
                    }
                    Tok::Start | Tok::Empty if xml.local() == b"workbookPr" => {
                        if let Some(v) = xml.attr(b"date1904").map_err(e(&wb_path))? {
                            is_1904 = v == b"1" || v == b"true";
                        }
                    }
                    Tok::End if xml.local() == b"workbook" => break,
                    Tok::Eof => return Err(format!("{wb_path} ends early")),
                    _ => {}
                }
            }
        }
        Ok(Book {
            zip,
            sheets,
            paths,
            is_1904,
            dates,
            strings,
        })
    }

    fn read_styles(
        zip: &mut zip::ZipArchive<Unzipped>,
        path: &str,
    ) -> Result<Vec<bool>, NotOpened> {
        let Some(f) = part(zip, path)? else {
            return Ok(Vec::new());
        };
        let e = |x: XmlError| format!("{path}: {x}");
        let mut xml = Xml::new(f);
        let mut custom: HashMap<Vec<u8>, bool> = HashMap::new();
        let mut dates = Vec::new();
        let mut in_xfs = false;
        loop {
            match xml.next().map_err(e)? {
                Tok::Start | Tok::Empty if xml.local() == b"numFmt" => {
                    if let (Some(id), Some(code)) = (
                        xml.attr(b"numFmtId").map_err(e)?,
                        xml.attr_text(b"formatCode").map_err(e)?,
                    ) {
                        custom.insert(id.to_vec(), is_date_format(&code));
                    }
                }
                Tok::Start if xml.local() == b"cellXfs" => in_xfs = true,
                Tok::End if xml.local() == b"cellXfs" => in_xfs = false,
                Tok::Start | Tok::Empty if in_xfs && xml.local() == b"xf" => {
                    let date = match xml.attr(b"numFmtId").map_err(e)? {
                        None => false,
                        Some(id) => match custom.get(id) {
                            Some(d) => *d,
                            None => is_builtin_date(id),
                        },
                    };
                    dates.push(date);
                }
                Tok::End if xml.local() == b"styleSheet" => break,
                Tok::Eof => return Err(format!("{path} ends early")),
                _ => {}
            }
        }
        Ok(dates)
    }

    /// The cells of sheet `index` (of `sheets`).
    pub(super) fn cells(&mut self, index: usize) -> Result<Cells<'_>, NotOpened> {
        let path = self.paths.get(index).ok_or("no such sheet")?.clone();
        let f = part(&mut self.zip, &path)?.ok_or_else(|| format!("no {path}"))?;
        let mut xml = Xml::new(f);
        let mut dims = None;
        let mut first = None;
        let empty = loop {
            let tok = xml.next().map_err(|x| format!("{path}: {x}"))?;
            match tok {
                Tok::Start | Tok::Empty if xml.local() == b"dimension" => {
                    dims = xml
                        .attr(b"ref")
                        .ok()
                        .flatten()
                        .and_then(|r| r.rsplit(|b| *b == b':').next().and_then(cell_ref))
                        .map(|(row, _)| row);
                }
                Tok::Start | Tok::Empty if xml.local() == b"sheetData" => break tok == Tok::Empty,
                Tok::Start | Tok::Empty => {
                    first.get_or_insert_with(|| xml.local().to_vec());
                }
                Tok::Eof => return Err(format!("{path} holds no cells")),
                _ => {}
            }
        };
        if first.as_deref().is_some_and(|f| f != b"worksheet") {
            return Err(format!("{path} is not a worksheet"));
        }
        Ok(Cells {
            xml,
            strings: &mut self.strings,
            dates: &self.dates,
            row: 0,
            col: 0,
            done: empty,
            got: Got::Skip,
            text: String::new(),
            scratch: String::new(),
            last_row: dims,
        })
    }

    /// The key/value pairs of sheet `index` (the template's hidden metadata): the first
    /// two columns of its first 64 rows, as calamine's range of the sheet gives them.
    pub(super) fn meta(&mut self, index: usize) -> Result<BTreeMap<String, String>, NotOpened> {
        let mut cells = self.cells(index)?;
        let mut kept: Vec<(u32, u32, String)> = Vec::new();
        let (mut r0, mut c0, mut c1) = (u32::MAX, u32::MAX, 0);
        while let Some((r, c, _)) = cells.next().map_err(|x| x.0)? {
            let shown = match cells.value(0.0) {
                Value::Skip => continue,
                Value::Text(s) | Value::DateIso(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                Value::Float(f) | Value::Date(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Error(e) => e,
            };
            r0 = r0.min(r);
            c0 = c0.min(c);
            c1 = c1.max(c);
            if kept.len() < 4096 {
                kept.push((r, c, shown));
            }
        }
        let mut meta = BTreeMap::new();
        if kept.is_empty() {
            return Ok(meta);
        }
        let at = |r: u32, c: u32| kept.iter().rev().find(|k| k.0 == r && k.1 == c);
        for r in r0..r0.saturating_add(64) {
            let key = at(r, c0).map(|k| k.2.clone()).unwrap_or_default();
            if key.is_empty() || c1 == c0 {
                continue;
            }
            let value = at(r, c0 + 1).map(|k| k.2.clone()).unwrap_or_default();
            meta.insert(key, value);
        }
        Ok(meta)
    }
}

/// What the last cell held (its text, when it has one, is in `Cells::text`).
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Skip,
    Shared(usize),
    Text,
    DateIso,
    Number(f64, bool),
    Bool(bool),
    Error(&'static str),
}

/// The elements `Cells::next` acts on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Name {
    Row,
    Cell,
    SheetData,
}

/// What a cell's start tag says: its place, whether its style is a date's, its type, and
/// whether the type was given.
struct CellHead {
    pos: (u32, u32),
    date: bool,
    t: T,
    typed: bool,
}

/// Reads a cell's attributes `r`, `s` and `t` (raw values); `row` and `col` are where the
/// cell is when it has no `r` (`col` moves past it).
fn cell_head(
    row: u32,
    col: &mut u32,
    dates: &[bool],
    r: Option<&[u8]>,
    s: Option<&[u8]>,
    t: Option<&[u8]>,
) -> Result<CellHead, XmlError> {
    let pos = match r {
        Some(r) => match cell_ref(r) {
            Some((row, Some(c))) => {
                *col = c;
                (row, c)
            }
            _ => return Err(ref_error(r)),
        },
        None => (row, *col),
    };
    *col = col.saturating_add(1);
    let date = match s {
        Some(s) => dates.get(number(s).unwrap_or(0)).copied().unwrap_or(false),
        None => false,
    };
    let typed = t.is_some();
    let t = match t {
        None | Some(b"n") => T::N,
        Some(b"s") => T::S,
        Some(b"b") => T::B,
        Some(b"e") => T::E,
        Some(b"str") => T::Str,
        Some(b"d") => T::D,
        Some(b"inlineStr" | b"is") => T::Inline,
        Some(other) => {
            let shown = String::from_utf8_lossy(&other[..other.len().min(20)]).into_owned();
            return err(format!("unknown cell type `{shown}`"));
        }
    };
    Ok(CellHead {
        pos,
        date,
        t,
        typed,
    })
}

/// A cell's shared string number that the table does not have (calamine's words).
const NO_SUCH_STRING: &str = "Cell string index not found in shared strings table";

/// A cell's type (its `t`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum T {
    N,
    S,
    B,
    E,
    Str,
    D,
    Inline,
}

fn shorten(v: &str) -> String {
    v.chars().take(40).collect()
}

/// The cells of one sheet, in the order the sheet holds them.
pub(super) struct Cells<'b> {
    xml: Xml<zip::read::ZipFile<'b, Unzipped>>,
    strings: &'b mut Strings,
    dates: &'b [bool],
    row: u32,
    col: u32,
    done: bool,
    got: Got,
    text: String,
    scratch: String,
    /// The last row the sheet declares (its `dimension`), 0-based.
    pub(super) last_row: Option<u32>,
}

impl Cells<'_> {
    /// The next cell: its 0-based row and column and whether it holds a formula; its value
    /// is then `value`. `None` after the last.
    pub(super) fn next(&mut self) -> Result<Option<(u32, u32, bool)>, XmlError> {
        if self.done {
            return Ok(None);
        }
        loop {
            if let Some((values, empty)) = self.xml.take_cell_tag() {
                let [r, s, t] = values.map(|v| v.map(|v| &self.xml.buf[v]));
                let head = cell_head(self.row, &mut self.col, self.dates, r, s, t)?;
                return self.cell_body(head, empty).map(Some);
            }
            let tok = self.xml.next()?;
            // The element's name is looked at once per token (this is the hot loop).
            let name = match tok {
                Tok::Text => continue,
                Tok::Eof => return err("the sheet ends before its last row"),
                _ => match self.xml.local() {
                    b"row" => Name::Row,
                    b"c" => Name::Cell,
                    b"sheetData" => Name::SheetData,
                    _ => continue,
                },
            };
            match (tok, name) {
                (Tok::Start | Tok::Empty, Name::Row) => {
                    if let Some(r) = self.xml.attr(b"r")? {
                        self.row = cell_ref(r).ok_or_else(|| ref_error(r))?.0;
                    }
                    if tok == Tok::Empty {
                        self.row = self.row.saturating_add(1);
                        self.col = 0;
                    }
                }
                (Tok::End, Name::Row) => {
                    self.row = self.row.saturating_add(1);
                    self.col = 0;
                }
                (Tok::Start | Tok::Empty, Name::Cell) => return self.cell(tok).map(Some),
                (Tok::End, Name::SheetData) => {
                    self.done = true;
                    return Ok(None);
                }
                _ => {}
            }
        }
    }

    fn cell(&mut self, tok: Tok) -> Result<(u32, u32, bool), XmlError> {
        let [r, s, t] = self.xml.attrs([b"r", b"s", b"t"])?;
        let head = cell_head(self.row, &mut self.col, self.dates, r, s, t)?;
        self.cell_body(head, tok == Tok::Empty)
    }

    /// The cell whose start tag `cell_head` read: its value (none for an empty tag).
    fn cell_body(&mut self, head: CellHead, empty: bool) -> Result<(u32, u32, bool), XmlError> {
        let CellHead {
            pos,
            date,
            t,
            typed,
        } = head;
        self.got = Got::Skip;
        let mut formula = false;
        if empty {
            return Ok((pos.0, pos.1, false));
        }
        if t != T::Inline
            && let Some(text) = self.xml.take_simple(b"<v>", b"</v></c>")
        {
            // A shared string's number (nearly every text cell) is read from the bytes as
            // they are: digits decode to themselves.
            if t == T::S
                && let Some(i) = number(&self.xml.buf[text.clone()])
            {
                if self.strings.get(i)?.is_none() {
                    return err(NO_SUCH_STRING);
                }
                self.got = Got::Shared(i);
                return Ok((pos.0, pos.1, false));
            }
            self.text.clear();
            self.xml.decode(text, &mut self.text)?;
            self.took_v(t, typed, date)?;
            return Ok((pos.0, pos.1, false));
        }
        loop {
            let tok = self.xml.next()?;
            match tok {
                Tok::End if self.xml.local() == b"c" => break,
                Tok::Start | Tok::Empty => match self.xml.local() {
                    b"f" => {
                        formula = true;
                        self.xml.skip(tok)?;
                    }
                    b"is" => {
                        if tok == Tok::Start {
                            let closing = self.xml.qname().to_vec();
                            read_string(
                                &mut self.xml,
                                &closing,
                                &mut self.text,
                                &mut self.scratch,
                            )?;
                        } else {
                            self.text.clear();
                        }
                        self.got = Got::Text;
                    }
                    b"v" if t == T::Inline => {
                        self.xml.skip(tok)?;
                        self.got = Got::Skip;
                    }
                    b"v" => {
                        self.text.clear();
                        if tok == Tok::Start {
                            loop {
                                match self.xml.next()? {
                                    Tok::Text => self.xml.text_into(&mut self.text)?,
                                    Tok::End if self.xml.local() == b"v" => break,
                                    Tok::Eof => return err("the sheet ends inside a value"),
                                    _ => {}
                                }
                            }
                        }
                        self.took_v(t, typed, date)?;
                    }
                    other => {
                        let shown = String::from_utf8_lossy(&other[..other.len().min(20)]);
                        return err(format!("unexpected element `{shown}` in a cell"));
                    }
                },
                Tok::Eof => return err("the sheet ends inside a cell"),
                _ => {}
            }
        }
        Ok((pos.0, pos.1, formula))
    }

    /// Takes the `<v>`'s text just read into `text` as the cell's value.
    fn took_v(&mut self, t: T, typed: bool, date: bool) -> Result<(), XmlError> {
        self.got = self.read_v(t, typed, date)?;
        if t == T::Str && self.got == Got::Text {
            let plain = unescape_ooxml(&self.text).into_owned();
            self.text = plain;
        }
        Ok(())
    }

    /// A `<v>`'s text (in `text`) as the cell's type makes it.
    fn read_v(&mut self, t: T, typed: bool, date: bool) -> Result<Got, XmlError> {
        let v = self.text.as_str();
        Ok(match t {
            T::S => {
                if v.is_empty() {
                    return Ok(Got::Skip);
                }
                let i = number(v.as_bytes()).unwrap_or(0);
                if self.strings.get(i)?.is_none() {
                    return err(NO_SUCH_STRING);
                }
                Got::Shared(i)
            }
            T::B => {
                let b = v.trim();
                if b.is_empty() {
                    Got::Skip
                } else if b == "0" || b.eq_ignore_ascii_case("false") {
                    Got::Bool(false)
                } else if b == "1" || b.eq_ignore_ascii_case("true") {
                    Got::Bool(true)
                } else {
                    return err(format!("`{}` is not a boolean cell value", shorten(v)));
                }
            }
            T::D => Got::DateIso,
            T::E => match v {
                "#DIV/0!" => Got::Error("#DIV/0!"),
                "#N/A" => Got::Error("#N/A"),
                "#NAME?" => Got::Error("#NAME?"),
                "#NULL!" => Got::Error("#NULL!"),
                "#NUM!" => Got::Error("#NUM!"),
                "#REF!" => Got::Error("#REF!"),
                "#VALUE!" => Got::Error("#VALUE!"),
                _ => return err(format!("`{}` is not a cell error", shorten(v))),
            },
            T::Str => Got::Text,
            T::Inline => Got::Skip,
            T::N => {
                if v.is_empty() {
                    return Ok(Got::Skip);
                }
                match v.parse::<f64>() {
                    Ok(n) => Got::Number(n, date),
                    Err(_) if !typed => Got::Text,
                    Err(_) => return err(format!("`{}` is not a number", shorten(v))),
                }
            }
        })
    }

    /// After the last cell: the rest of the shared-string table is read (`Strings::finish`).
    pub(super) fn finish(&mut self) -> Result<(), XmlError> {
        self.strings.finish()
    }

    /// The value of the last cell `next` gave; `date_offset` is added to a date's number
    /// (1462 for a workbook counting from 1904).
    pub(super) fn value(&self, date_offset: f64) -> Value<'_> {
        match &self.got {
            Got::Skip => Value::Skip,
            Got::Shared(i) => Value::Text(self.strings.string(*i).unwrap_or("")),
            Got::Text => Value::Text(&self.text),
            Got::DateIso => Value::DateIso(&self.text),
            Got::Number(n, true) => Value::Date(n + date_offset),
            Got::Number(n, false) => Value::Float(*n),
            Got::Bool(b) => Value::Bool(*b),
            Got::Error(e) => Value::Error((*e).to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out one byte at a time: every token crosses a refill.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(out)) => {
                    *out = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    fn tokens<R: Read>(src: R) -> Result<Vec<String>, XmlError> {
        let mut xml = Xml::new(src);
        let mut out = Vec::new();
        loop {
            let tok = xml.next()?;
            let shown = match tok {
                Tok::Eof => return Ok(out),
                Tok::Text => {
                    let mut s = String::new();
                    xml.text_into(&mut s)?;
                    format!("text {s:?}")
                }
                Tok::End => format!("end {}", String::from_utf8_lossy(xml.qname())),
                Tok::Start | Tok::Empty => {
                    let mut it = Attrs {
                        s: &xml.buf[xml.attrs.clone()],
                    };
                    let mut attrs = Vec::new();
                    while let Some((k, v)) = it.next_attr()? {
                        attrs.push(format!(
                            "{}={}",
                            String::from_utf8_lossy(k),
                            String::from_utf8_lossy(v)
                        ));
                    }
                    format!(
                        "{tok:?} {} {}",
                        String::from_utf8_lossy(xml.local()),
                        attrs.join(",")
                    )
                }
            };
            out.push(shown);
        }
    }

    #[test]
    fn a_simple_value_is_taken_whole_or_left_to_the_tokens() {
        // All in the window: taken, and decoded as its text token would be.
        let mut xml = Xml::new(&b"<v>1&amp;2\r\n</v></c><c/>"[..]);
        let text = xml.take_simple(b"<v>", b"</v></c>");
        assert!(text.is_none(), "nothing is read before the first token");
        xml.more().unwrap();
        let text = xml.take_simple(b"<v>", b"</v></c>").unwrap();
        let mut s = String::new();
        xml.decode(text, &mut s).unwrap();
        assert_eq!(s, "1&2\n");
        assert_eq!((xml.next().unwrap(), xml.local()), (Tok::Empty, &b"c"[..]));
        // Anything else is left where it was, for the tokens.
        for other in [
            &b"<v>1</v> </c>"[..],
            b"<v a='1'>1</v></c>",
            b"<x:v>1</x:v></x:c>",
            b"<v>1<!-- -->2</v></c>",
            b"<v>1</v></c",
            b"<v>1",
        ] {
            let mut xml = Xml::new(other);
            xml.more().unwrap();
            assert!(xml.take_simple(b"<v>", b"</v></c>").is_none());
            assert_eq!(xml.next().unwrap(), Tok::Start, "{other:?}");
        }
        // Across the end of the window: left for the tokens, which read on.
        let mut part = vec![b'x'; CHUNK - 6];
        part.extend_from_slice(b"<v>12</v></c>");
        let mut xml = Xml::new(&part[..]);
        assert_eq!(xml.next().unwrap(), Tok::Text);
        assert!(xml.take_simple(b"<v>", b"</v></c>").is_none());
        assert_eq!((xml.next().unwrap(), xml.local()), (Tok::Start, &b"v"[..]));
        assert_eq!(xml.next().unwrap(), Tok::Text);
        let mut s = String::new();
        xml.text_into(&mut s).unwrap();
        assert_eq!(s, "12");
    }

    #[test]
    fn a_cell_tag_is_taken_as_its_tokens_give_it() {
        let taken = [
            &b"<c>"[..],
            b"<c/>",
            b"<c r=\"A1\">",
            b"<c r=\"B7\" s=\"3\" t=\"s\">",
            b"<c s=\"1\"/>",
            b"<c t=\"inlineStr\">",
            b"<c r=\"A1\" t=\"s\"/>",
            b"<c r=\"A>1\" t=\"\">",
        ];
        for tag in taken {
            let mut fast = Xml::new(tag);
            fast.more().unwrap();
            let (values, empty) = fast
                .take_cell_tag()
                .unwrap_or_else(|| panic!("not taken: {:?}", String::from_utf8_lossy(tag)));
            assert_eq!(fast.pos, tag.len());
            let got: Vec<Option<&[u8]>> = values
                .iter()
                .map(|v| v.clone().map(|v| &fast.buf[v]))
                .collect();
            let mut slow = Xml::new(tag);
            let tok = slow.next().unwrap();
            assert_eq!(slow.local(), b"c");
            assert_eq!(empty, tok == Tok::Empty);
            assert_eq!(got, slow.attrs([b"r", b"s", b"t"]).unwrap().to_vec());
        }
        // Anything else is left where it was, for the tokens.
        let long = format!("<c r=\"A1\" s=\"{}\">", "1".repeat(40));
        for tag in [
            &b"<c t=\"s\" r=\"A1\">"[..],
            b"<c  r=\"A1\">",
            b"<c r='A1'>",
            b"<c r=\"A1\" />",
            b"<c\tr=\"A1\">",
            b"<c r=\"A1\" r=\"B1\">",
            b"<c r=\"A1\"s=\"1\">",
            b"<c r=\"A1\" x=\"1\">",
            b"<cell>",
            b"<x:c r=\"A1\">",
            b"<c r=\"A1\"",
            b"<c r=\"A1",
            long.as_bytes(),
        ] {
            let mut xml = Xml::new(tag);
            xml.more().unwrap();
            assert!(
                xml.take_cell_tag().is_none(),
                "{:?}",
                String::from_utf8_lossy(tag)
            );
            assert_eq!(xml.pos, 0);
        }
        // Across the end of the window: left for the tokens, which read on.
        let mut part = vec![b'x'; CHUNK - 6];
        part.extend_from_slice(b"<c r=\"A1\"><v>1</v></c>");
        let mut xml = Xml::new(&part[..]);
        assert_eq!(xml.next().unwrap(), Tok::Text);
        assert!(xml.take_cell_tag().is_none());
        assert_eq!((xml.next().unwrap(), xml.local()), (Tok::Start, &b"c"[..]));
        assert_eq!(xml.attr(b"r").unwrap(), Some(&b"A1"[..]));
    }

    #[test]
    fn tokens_are_the_same_however_the_part_arrives() {
        let doc = "<?xml version=\"1.0\"?>\r\n<!-- a > comment --><x:a xmlns:x=\"u\" b = 'q\">' c=\"&amp;\"><b/>t&lt;e&#x41;&#66;\r\nx<![CDATA[<c>]]>\r<c\td=\"1\" /></x:a >";
        let whole = tokens(doc.as_bytes()).unwrap();
        assert_eq!(
            whole,
            [
                "text \"\\n\"",
                "Start a xmlns:x=u,b=q\">,c=&amp;",
                "Empty b ",
                "text \"t<eAB\\nx\"",
                "text \"<c>\"",
                "text \"\\n\"",
                "Empty c d=1",
                "end x:a",
            ]
        );
        assert_eq!(tokens(Trickle(doc.as_bytes())).unwrap(), whole);
    }

    #[test]
    fn what_no_spreadsheet_holds_is_an_error_not_a_guess() {
        for (doc, says) in [
            (
                "<!DOCTYPE x [<!ENTITY a \"b\">]><x>&a;</x>",
                "document type (DTD)",
            ),
            ("<x>&lol9;</x>", "unrecognized entity `&lol9;`"),
            ("<x>&#0;</x>", "unrecognized entity `&#0;`"),
            ("<x>&#xD800;</x>", "unrecognized entity"),
            ("<x>a & b</x>", "starts no entity"),
            ("<x a=1>", "not quoted"),
            ("<x a=\"1>", "not closed"),
            ("<x a>", "no value"),
            ("<x", "not closed"),
            ("<!-- open", "not closed"),
            ("<x><![CDATA[open</x>", "not closed"),
            ("< x>", "no name"),
            ("<x>\u{0}\u{ff}</x>", ""),
        ] {
            let got = tokens(doc.as_bytes());
            if says.is_empty() {
                assert!(got.is_ok(), "{doc}");
                continue;
            }
            let e = got.expect_err(doc);
            assert!(e.0.contains(says), "{doc}: {e}");
        }
        // Text that is not UTF-8.
        let e = tokens(&b"<x>\xff\xfe</x>"[..]).expect_err("latin-1");
        assert!(e.0.contains("UTF-8"), "{e}");
    }

    #[test]
    fn no_bytes_make_the_scanner_panic_or_loop() {
        // Every text of up to three bytes from markup's own characters, then mutations of a
        // real cell row: each ends, in tokens or in an error.
        let alphabet = b"<>/=\"'&;!?[]-x ";
        let mut doc = Vec::new();
        for n in 0..=3u32 {
            for i in 0..alphabet.len().pow(n) {
                doc.clear();
                let mut k = i;
                for _ in 0..n {
                    doc.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                let _ = tokens(&doc[..]);
                let _ = tokens(Trickle(&doc));
            }
        }
        let row = br#"<row r="2"><c r="A2" t="s"><v>1</v></c><c r="B2"><f>1</f><v>2</v></c><c t="inlineStr"><is><t>x</t></is></c></row>"#;
        for at in 0..row.len() {
            for b in alphabet {
                doc.clear();
                doc.extend_from_slice(row);
                doc[at] = *b;
                let _ = tokens(&doc[..]);
                doc.remove(at);
                let _ = tokens(&doc[..]);
            }
        }
    }

    #[test]
    fn cell_references_and_number_formats() {
        assert_eq!(cell_ref(b"A1"), Some((0, Some(0))));
        assert_eq!(cell_ref(b"xfd1048576"), Some((1_048_575, Some(16_383))));
        assert_eq!(cell_ref(b"7"), Some((6, None)));
        assert_eq!(cell_ref(b"A4294967295"), Some((u32::MAX - 1, Some(0))));
        for bad in [
            &b""[..],
            b"A",
            b"A0",
            b"1A",
            b"A1 ",
            b"A-1",
            b"A4294967296",
            b"ZZZZZZZZ1",
        ] {
            assert_eq!(cell_ref(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        for date in [
            "yyyy-mm-dd",
            "d/m/yy h:mm",
            "[h]:mm:ss",
            "[$-409]h:mm AM/PM",
            "mmm",
            "AM/PM h",
        ] {
            assert!(is_date_format(date), "{date}");
        }
        for not in [
            "0.00",
            "\"Day \"0",
            "0.00;[Red]dd",
            "#,##0",
            "General",
            "\\d0",
            "[Red]0",
            "_d0",
        ] {
            assert!(!is_date_format(not), "{not}");
        }
        assert!(is_builtin_date(b"14") && is_builtin_date(b"46") && !is_builtin_date(b"2"));
        assert_eq!(unescape_ooxml("a_x000D_b"), "a\rb");
        assert_eq!(unescape_ooxml("_xD83D__xDE00_"), "😀");
        assert_eq!(unescape_ooxml("_xD83D_x"), "\u{FFFD}x");
        assert_eq!(
            unescape_ooxml("_x005F_x000D_"),
            "__x000D_".replacen("__", "_", 1)
        );
        assert_eq!(unescape_ooxml("_x00G0_ _x12"), "_x00G0_ _x12");
        // An underscore that starts no escape, before one that does, and one at the end.
        assert_eq!(unescape_ooxml("a_b_x0041_c_"), "a_bAc_");
        assert_eq!(unescape_ooxml("snake_case"), "snake_case");
        for (s, kept) in [
            ("a b", "a b"),
            (" \t a b\r\n", "a b"),
            ("\u{a0}a\u{a0}", "\u{a0}a\u{a0}"),
            ("  ", ""),
            ("", ""),
        ] {
            assert_eq!(trim_xml_space(s), kept, "{s:?}");
        }
    }
}
