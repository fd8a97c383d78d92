//! Spreadsheets: the templates and reports we write (`template`, `report`) and the uploads we
//! read — parsed in a separate worker process (`worker`) whose rows reach the parent through
//! a compact byte stream (`codec`) read by `reader`.

pub mod codec;
pub mod reader;
pub mod report;
pub mod template;
mod unzip;
pub mod worker;
mod xlsx;
