//! Runs one checked request against the backend (blocking: called off the runtime threads)
//! and encodes its reply in the negotiated style.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tracing::warn;

use super::backend::{nbd_errno, Route, ZeroError};
use super::buffers::{Buffers, Payload};
use super::export::ExportState;
use super::request::Op;
use super::wire::{self, chunk, errno, ReplyStyle, Request, MAX_PAYLOAD};

/// Most extents one block status reply carries (the spec's ceiling is 2^20).
const MAX_EXTENTS: usize = 1 << 16;

/// One checked request on its way to the disk.
pub(crate) struct Job {
    pub(crate) export: Arc<ExportState>,
    pub(crate) buffers: Arc<Buffers>,
    pub(crate) style: ReplyStyle,
    pub(crate) context: u32,
    pub(crate) req: Request,
    pub(crate) op: Op<Payload>,
    pub(crate) stats: Arc<super::NbdStats>,
    /// How a write goes to the file when the connection already chose (see
    /// [`super::backend::Backend::route`]); `None`: chosen here.
    pub(crate) route: Option<Route>,
    /// The connection's write lane found the range of a plain zeroing or trim already a hole
    /// (see [`super::backend::Backend::all_hole`]): nothing is left to do.
    pub(crate) already_zero: bool,
}

impl Job {
    /// Does the disk work (blocking) and encodes the reply.
    pub(crate) fn run(self) -> Vec<Bytes> {
        let Job {
            export,
            buffers,
            style,
            context,
            req,
            op,
            stats,
            route,
            already_zero,
        } = self;
        let b = &export.backend;
        let done = match op {
            Op::Read { offset, len, df } => {
                return read_reply(&export, &buffers, style, &req, offset, len, df).unwrap_or_else(
                    |e| {
                        stats.count_error();
                        error_reply(style, &req, nbd_errno(&e), &format!("read failed: {e}"))
                    },
                )
            }
            Op::Write {
                offset, fua, data, ..
            } => {
                let len = data.data().len() as u64;
                let route = match (route, fua) {
                    (_, true) => Route::Cached,
                    (Some(route), false) => route,
                    (None, false) => b.route(offset, data.data().len()),
                };
                let written = b.write_routed(data.data(), offset, fua, route);
                data.recycle(&buffers);
                if written.is_ok() {
                    stats.count_written(len);
                }
                written.map_err(|e| (nbd_errno(&e), format!("write failed: {e}")))
            }
            Op::Flush => b
                .flush()
                .map_err(|e| (nbd_errno(&e), format!("flush failed: {e}"))),
            Op::Trim { fua: false, .. }
            | Op::WriteZeroes {
                no_hole: false,
                fua: false,
                ..
            } if already_zero => Ok(()),
            Op::Trim { offset, len, fua } => b
                .trim(offset, len, fua)
                .map_err(|e| (nbd_errno(&e), format!("trim failed: {e}"))),
            Op::Cache { offset, len } => b
                .cache(offset, len)
                .map_err(|e| (nbd_errno(&e), format!("cache failed: {e}"))),
            Op::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua,
            } => match b.write_zeroes(offset, len, no_hole, fast, fua) {
                Ok(()) => Ok(()),
                Err(ZeroError::NotFast) => Err((
                    errno::ENOTSUP,
                    "zeroing this range is not faster than writing zeroes".to_string(),
                )),
                Err(ZeroError::Io(e)) => Err((nbd_errno(&e), format!("write zeroes failed: {e}"))),
            },
            Op::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let max = if req_one { 1 } else { MAX_EXTENTS };
                match b.extents(offset, len, max) {
                    Ok(extents) if !extents.is_empty() => {
                        let mut buf = BytesMut::with_capacity(40 + extents.len() * 16);
                        wire::put_block_status_chunk(
                            &mut buf, style, req.cookie, req.offset, context, &extents,
                        );
                        return vec![buf.freeze()];
                    }
                    Ok(_) => Err((errno::EINVAL, "empty range".to_string())),
                    Err(e) => Err((nbd_errno(&e), format!("block status failed: {e}"))),
                }
            }
            Op::Disconnect => Ok(()),
        };
        match done {
            Ok(()) => ok_reply(style, &req),
            Err((errno, message)) => {
                stats.count_error();
                warn!(export = %export.name, cookie = req.cookie, %message, "request failed");
                error_reply(style, &req, errno, &message)
            }
        }
    }
}

fn ok_reply(style: ReplyStyle, req: &Request) -> Vec<Bytes> {
    let mut buf = BytesMut::with_capacity(32);
    match style {
        // Without extended headers a payload-less success may be a simple reply (the shortest).
        ReplyStyle::Simple | ReplyStyle::Structured => {
            wire::put_simple_reply(&mut buf, 0, req.cookie)
        }
        ReplyStyle::Extended => wire::put_none_chunk(&mut buf, style, req.cookie, req.offset),
    }
    vec![buf.freeze()]
}

pub(crate) fn error_reply(
    style: ReplyStyle,
    req: &Request,
    errno: u32,
    message: &str,
) -> Vec<Bytes> {
    let mut buf = BytesMut::with_capacity(64 + message.len());
    match style {
        ReplyStyle::Simple => wire::put_simple_reply(&mut buf, errno, req.cookie),
        _ => wire::put_error_chunk(&mut buf, style, req.cookie, req.offset, errno, message),
    }
    vec![buf.freeze()]
}

/// Reads `[offset, offset + len)`. With chunked replies, holes go out as `OFFSET_HOLE` chunks
/// (no bytes read or sent for them) unless the client asked not to fragment (`DF`).
fn read_reply(
    export: &ExportState,
    buffers: &Arc<Buffers>,
    style: ReplyStyle,
    req: &Request,
    offset: u64,
    len: u32,
    df: bool,
) -> std::io::Result<Vec<Bytes>> {
    let b = &export.backend;
    let mut head = BytesMut::with_capacity(64);
    if len == 0 {
        match style {
            ReplyStyle::Simple => wire::put_simple_reply(&mut head, 0, req.cookie),
            _ => wire::put_none_chunk(&mut head, style, req.cookie, req.offset),
        }
        return Ok(vec![head.freeze()]);
    }
    let extents = if style.chunked() && !df {
        // Unknown allocation is read as data, which is never wrong.
        b.extents(offset, u64::from(len), usize::MAX)
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    let all_data =
        covered != u64::from(len) || extents.iter().all(|e| e.flags & wire::state::HOLE == 0);
    if all_data {
        let mut data = buffers.take_read(len as usize);
        b.read_at(data.as_mut_slice(), offset)?;
        match style {
            ReplyStyle::Simple => wire::put_simple_reply(&mut head, 0, req.cookie),
            _ => wire::put_data_chunk_header(
                &mut head,
                style,
                chunk::FLAG_DONE,
                req.cookie,
                req.offset,
                offset,
                u64::from(len),
            ),
        }
        return Ok(vec![head.freeze(), Bytes::from_owner(data)]);
    }
    // Read all data extents into one buffer, then describe it chunk by chunk.
    let data_len: u64 = extents
        .iter()
        .filter(|e| e.flags & wire::state::HOLE == 0)
        .map(|e| e.length)
        .sum();
    let mut data = buffers.take_read(data_len as usize);
    let (mut at, mut filled) = (offset, 0usize);
    for e in &extents {
        if e.flags & wire::state::HOLE == 0 {
            let n = e.length as usize;
            b.read_at(&mut data.as_mut_slice()[filled..filled + n], at)?;
            filled += n;
        }
        at += e.length;
    }
    let data = Bytes::from_owner(data);
    let mut parts = Vec::with_capacity(extents.len() * 2);
    let (mut at, mut used) = (offset, 0usize);
    for (i, e) in extents.iter().enumerate() {
        let flags = if i + 1 == extents.len() {
            chunk::FLAG_DONE
        } else {
            0
        };
        let mut h = BytesMut::with_capacity(48);
        if e.flags & wire::state::HOLE != 0 {
            // Hole extents are within a read of at most MAX_PAYLOAD bytes.
            let hole = u32::try_from(e.length).unwrap_or(MAX_PAYLOAD);
            wire::put_hole_chunk(&mut h, style, flags, req.cookie, req.offset, at, hole);
            parts.push(h.freeze());
        } else {
            let n = e.length as usize;
            wire::put_data_chunk_header(&mut h, style, flags, req.cookie, req.offset, at, e.length);
            parts.push(h.freeze());
            parts.push(data.slice(used..used + n));
            used += n;
        }
        at += e.length;
    }
    Ok(parts)
}
